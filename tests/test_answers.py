"""Grounded Answers over real HTTP to the local OpenAI server."""

import pytest

from answers.models import AnswerAudit
from keyvault.vault import set_llm_api_key
from orgs.models import Organization, Tier

from .helpers import SHARED_FALLBACK_KEY, ask

ORG_KEY = "sk-org-own-key-1111111111111111111111ORG1"

pytestmark = pytest.mark.django_db


def test_answer_cites_only_allowed_chunks(api_client, demo, openai_server):
    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "answered"
    assert body["citations"]
    financials = demo.connector.resources.get(external_id="q3-board-financials.md")
    assert {c["resource_id"] for c in body["citations"]} == {str(financials.id)}
    assert "14.2 million" in body["answer"]
    assert body["model"] == "gpt-4o-mini"


def test_same_question_other_principal_no_access(api_client, demo, openai_server):
    response = ask(api_client, demo, demo.bob)

    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "no_access"
    assert body["citations"] == []
    assert body["answer"] is None
    assert body["denied_chunks"] > 0
    assert openai_server.requests == []


def test_denied_text_never_reaches_llm(api_client, demo, openai_server):
    ask(api_client, demo, demo.alice)

    [request] = openai_server.requests
    prompt = "\n".join(message["content"] for message in request["messages"])
    assert "14.2 million" in prompt
    # The acquisition memo matched "third" but is restricted for Alice.
    assert "Project Heron" not in prompt
    assert "42 million" not in prompt


def test_partial_when_some_candidates_denied(api_client, demo, openai_server):
    body = ask(api_client, demo, demo.alice).json()

    assert body["is_partial"] is True
    assert body["allowed_chunks"] == 1
    assert body["denied_chunks"] == 1


def test_nothing_retrieved_is_insufficient_context(api_client, demo, openai_server):
    body = ask(api_client, demo, demo.alice, query="zebra migration patterns").json()

    assert body["outcome"] == "insufficient_context"
    assert body["allowed_chunks"] == 0
    assert openai_server.requests == []


def test_abstention_is_insufficient_context(api_client, demo, openai_server):
    # Retrieval matches the two-letter term "q3"; the local server ignores
    # words shorter than three letters, so it finds no fitting sentence.
    body = ask(api_client, demo, demo.alice, query="Q3?").json()

    assert body["outcome"] == "insufficient_context"
    assert body["citations"] == []
    assert len(openai_server.requests) == 1


def test_team_tier_without_key_uses_fallback(api_client, demo, openai_server):
    body = ask(api_client, demo, demo.alice).json()

    assert body["key_source"] == "fallback"
    assert openai_server.requests[0]["key_last4"] == SHARED_FALLBACK_KEY[-4:]
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 1
    assert body["fallback_calls_remaining"] == 99


def test_own_key_is_used_and_credit_untouched(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)

    body = ask(api_client, demo, demo.alice).json()

    assert body["key_source"] == "organization"
    assert openai_server.requests[0]["key_last4"] == ORG_KEY[-4:]
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0


def test_new_key_replaces_old_at_once(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)
    ask(api_client, demo, demo.alice)
    set_llm_api_key(demo.organization, "sk-org-replacement-key-22222222222222NEW2")

    ask(api_client, demo, demo.alice)

    assert [r["key_last4"] for r in openai_server.requests] == [ORG_KEY[-4:], "NEW2"]


def test_credit_exhausted_returns_chunks(api_client, demo, openai_server, settings):
    Organization.objects.filter(pk=demo.organization.pk).update(
        fallback_calls_used=settings.GATECO_FALLBACK_CALL_LIMIT
    )

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "LLM_CREDIT_EXHAUSTED"
    assert "Organization Settings" in body["error"]["message"]
    assert [r["external_resource_id"] for r in body["results"]] == [
        "q3-board-financials.md"
    ]
    assert body["results"][0]["score"] > 0
    assert openai_server.requests == []


def test_free_tier_without_key_is_not_configured(api_client, demo, openai_server):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 422
    body = response.json()
    assert body["error"]["code"] == "LLM_KEY_NOT_CONFIGURED"
    assert len(body["results"]) == 1
    assert openai_server.requests == []
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0


def test_free_tier_with_own_key_answers(api_client, demo, openai_server):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)
    set_llm_api_key(demo.organization, ORG_KEY)

    body = ask(api_client, demo, demo.alice).json()

    assert body["outcome"] == "answered"
    assert body["key_source"] == "organization"


@pytest.mark.parametrize(
    ("mode", "status", "code"),
    [
        ("500", 502, "LLM_UPSTREAM_ERROR"),
        ("429", 429, "LLM_RATE_LIMITED"),
    ],
)
def test_upstream_failure_with_own_key(api_client, demo, openai_server, mode, status, code):
    set_llm_api_key(demo.organization, ORG_KEY)
    openai_server.set_failure(mode)

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert len(response.json()["results"]) == 1


def test_rate_limit_passes_retry_after(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)
    openai_server.set_failure("429")

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 429
    assert response["Retry-After"] == "7"


def test_rejected_own_key_is_key_invalid(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)
    openai_server.reject_key_suffixes({ORG_KEY[-4:]})

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "LLM_KEY_INVALID"


def test_timeout_maps_to_504(api_client, demo, openai_server, settings):
    settings.GATECO_LLM_TIMEOUT_SECONDS = 0.3
    openai_server.set_failure("slow", delay_seconds=1.5)

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "LLM_TIMEOUT"


@pytest.mark.parametrize("mode", ["500", "429", "401"])
def test_failed_fallback_call_costs_nothing(api_client, demo, openai_server, mode):
    openai_server.set_failure(mode)

    response = ask(api_client, demo, demo.alice)

    assert response.status_code >= 400
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0


def test_unreachable_upstream_is_502(api_client, demo, openai_server, settings):
    settings.OPENAI_BASE_URL = "http://127.0.0.1:9/v1"

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 502
    assert response.json()["error"]["code"] == "LLM_UPSTREAM_ERROR"
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0


def test_audit_records_key_source_not_key(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)

    ask(api_client, demo, demo.alice)

    audit = AnswerAudit.objects.get()
    assert audit.organization == demo.organization
    assert audit.principal == demo.alice
    assert audit.key_source == "organization"
    assert audit.model == "gpt-4o-mini"
    assert audit.outcome == "answered"
    assert audit.actor.startswith("api_key:gk_live_")
    assert ORG_KEY not in repr(audit.__dict__)


def test_audit_records_fallback(api_client, demo, openai_server):
    ask(api_client, demo, demo.alice)

    assert AnswerAudit.objects.get().key_source == "fallback"


def test_invalid_citation_marker_is_dropped():
    from answers.llm import keep_valid_markers, parse_content

    answer, numbers = parse_content('{"answer": "A [1]. B [7].", "citations": [1, 7]}')

    assert numbers == [1, 7]
    assert keep_valid_markers(answer, {1}) == "A [1]. B ."


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"query": "", "principal_id": "alice@acme.test", "connector_id": "x"},
        {"query": "q", "principal_id": "alice@acme.test"},
        {"query": "q", "principal_id": "a", "connector_id": "c", "top_k": 0},
        {"query": "q", "principal_id": "a", "connector_id": "c", "top_k": "many"},
        {"query": "q", "principal_id": "a", "connector_id": "c", "search_mode": "grep"},
    ],
)
def test_invalid_request_is_422(api_client, demo, body):
    response = api_client.post("/api/answers/execute", body, format="json")

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_malformed_json_is_422(api_client, demo):
    response = api_client.post(
        "/api/answers/execute", "{not json", content_type="application/json"
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_unknown_principal_is_404(api_client, demo):
    response = api_client.post(
        "/api/answers/execute",
        {"query": "q", "principal_id": "nobody", "connector_id": str(demo.connector.id)},
        format="json",
    )

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "RESOURCE_NOT_FOUND"


def test_other_organizations_connector_is_404(api_client, demo, other_demo):
    response = ask(api_client, other_demo, demo.alice)

    assert response.status_code == 404


def test_other_organizations_principal_is_404(api_client, demo, other_demo):
    response = api_client.post(
        "/api/answers/execute",
        {
            "query": "revenue",
            "principal_id": str(other_demo.alice.id),
            "connector_id": str(demo.connector.id),
        },
        format="json",
    )

    assert response.status_code == 404


def test_missing_api_key_is_401(client, demo):
    response = client.post("/api/answers/execute", {}, content_type="application/json")

    assert response.status_code == 401
    assert response.json()["error"]["code"] == "AUTH_INVALID_CREDENTIALS"


def test_wrong_api_key_is_401(client, demo, api_key):
    response = client.post(
        "/api/answers/execute",
        {},
        content_type="application/json",
        headers={"X-API-Key": api_key[:-2] + "xx"},
    )

    assert response.status_code == 401


def test_shared_key_quota_has_own_code(api_client, demo, openai_server):
    openai_server.set_failure("quota")

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 503
    assert response.json()["error"]["code"] == "LLM_FALLBACK_QUOTA_EXHAUSTED"
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0


def test_own_key_quota_has_own_code(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)
    openai_server.set_failure("quota")

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "LLM_KEY_QUOTA_EXHAUSTED"


def test_unsupplied_marker_dropped_end_to_end(api_client, demo, openai_server):
    openai_server.script_replies(
        '{"answer": "Revenue was 14.2 million [1]. Margins fell [7].", "citations": [1, 7]}'
    )

    body = ask(api_client, demo, demo.alice).json()

    assert body["outcome"] == "answered"
    assert [c["index"] for c in body["citations"]] == [1]
    assert "[7]" not in body["answer"]


def test_chunk_cited_twice_listed_once(api_client, demo, openai_server):
    openai_server.script_replies('{"answer": "A [1]. B [1].", "citations": [1, 1]}')

    body = ask(api_client, demo, demo.alice).json()

    assert [c["index"] for c in body["citations"]] == [1]


def test_only_invalid_markers_is_insufficient(api_client, demo, openai_server):
    openai_server.script_replies('{"answer": "Made up [3].", "citations": [3]}')

    body = ask(api_client, demo, demo.alice).json()

    assert body["outcome"] == "insufficient_context"
    assert body["citations"] == []


def test_plain_text_reply_still_parsed(api_client, demo, openai_server):
    openai_server.script_replies("Revenue was 14.2 million dollars [1].")

    body = ask(api_client, demo, demo.alice).json()

    assert body["outcome"] == "answered"
    assert body["answer"] == "Revenue was 14.2 million dollars [1]."


@pytest.mark.parametrize(
    "url", ["/api/answers/execute?format=xml", "/api/organization/settings?format=xml"]
)
def test_unknown_format_is_404_json(api_client, url):
    response = api_client.get(url)

    assert response.status_code == 404
    assert response.json()["error"]["code"] == "RESOURCE_NOT_FOUND"


def test_oversized_body_is_413_json(api_client, demo, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000

    response = api_client.post(
        "/api/answers/execute",
        '{"query": "' + "x" * 2000 + '"}',
        content_type="application/json",
    )

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "REQUEST_TOO_LARGE"
