"""Fallback calls: reservation, ledger, idempotent retries, grants, soft cap."""

import uuid

import pytest
from django.db.models import Sum

from answers.models import AnswerAudit, IdempotentRequest
from keyvault.vault import set_llm_api_key
from orgs.models import CreditLedgerEntry, Organization

from .helpers import ask, make_user

pytestmark = pytest.mark.django_db

ORG_KEY = "sk-org-own-key-3333333333333333333333ORG3"


def used_by_ledger(organization):
    return (
        CreditLedgerEntry.objects.filter(
            organization=organization,
            kind__in=[CreditLedgerEntry.Kind.RESERVE, CreditLedgerEntry.Kind.RELEASE],
        ).aggregate(total=Sum("amount"))["total"]
        or 0
    )


def test_ledger_reconciles_with_counter(api_client, demo, openai_server):
    ask(api_client, demo, demo.alice)
    openai_server.set_failure("500", times=1)
    ask(api_client, demo, demo.alice)
    ask(api_client, demo, demo.alice)

    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 2
    assert used_by_ledger(demo.organization) == 2


def test_commit_entry_links_answer_audit(api_client, demo, openai_server):
    ask(api_client, demo, demo.alice)

    commit = CreditLedgerEntry.objects.get(kind=CreditLedgerEntry.Kind.COMMIT)
    assert commit.answer_audit == AnswerAudit.objects.get()
    assert commit.reservation.kind == CreditLedgerEntry.Kind.RESERVE


def test_release_entry_links_failed_answer(api_client, demo, openai_server):
    openai_server.set_failure("500")

    ask(api_client, demo, demo.alice)

    release = CreditLedgerEntry.objects.get(kind=CreditLedgerEntry.Kind.RELEASE)
    assert release.answer_audit.error_code == "LLM_UPSTREAM_ERROR"
    assert release.amount == -1


def test_no_access_spends_no_call(api_client, demo, openai_server):
    ask(api_client, demo, demo.bob)

    assert CreditLedgerEntry.objects.count() == 0


def test_own_key_never_touches_ledger(api_client, demo, openai_server, settings):
    Organization.objects.filter(pk=demo.organization.pk).update(
        fallback_calls_used=settings.GATECO_FALLBACK_CALL_LIMIT
    )
    set_llm_api_key(demo.organization, ORG_KEY)

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 200
    assert CreditLedgerEntry.objects.count() == 0


def test_idempotent_retry_charged_once(api_client, demo, openai_server):
    key = str(uuid.uuid4())

    first = ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})
    second = ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})

    assert first.status_code == 200
    assert second.status_code == 200
    assert second.json() == first.json()
    assert second["Idempotent-Replayed"] == "true"
    assert len(openai_server.requests) == 1
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 1


def test_idempotent_retry_after_failure_runs(api_client, demo, openai_server):
    key = str(uuid.uuid4())
    openai_server.set_failure("500", times=1)

    failed = ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})
    retried = ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})

    assert failed.status_code == 502
    assert retried.status_code == 200
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 1


def test_idempotency_key_reused_for_other_request(api_client, demo, openai_server):
    key = str(uuid.uuid4())
    ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})

    response = ask(
        api_client, demo, demo.alice, query="Who approves time off?", headers={"Idempotency-Key": key}
    )

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "IDEMPOTENCY_KEY_REUSED"


def test_idempotency_keys_are_per_organization(
    api_client, outsider_api_client, demo, other_demo, openai_server
):
    key = str(uuid.uuid4())
    ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})

    response = ask(outsider_api_client, other_demo, other_demo.alice, headers={"Idempotency-Key": key})

    assert response.status_code == 200
    assert "Idempotent-Replayed" not in response
    assert IdempotentRequest.objects.count() == 2


def test_invalid_idempotency_key_is_422(api_client, demo, openai_server):
    response = ask(api_client, demo, demo.alice, headers={"Idempotency-Key": "has spaces"})

    assert response.status_code == 422
    assert openai_server.requests == []


def test_credit_exhausted_response_is_replayed(api_client, demo, openai_server, settings):
    Organization.objects.filter(pk=demo.organization.pk).update(
        fallback_calls_used=settings.GATECO_FALLBACK_CALL_LIMIT
    )
    key = str(uuid.uuid4())

    ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})
    replayed = ask(api_client, demo, demo.alice, headers={"Idempotency-Key": key})

    assert replayed.status_code == 422
    assert replayed.json()["error"]["code"] == "LLM_CREDIT_EXHAUSTED"
    assert replayed.json()["results"]


def test_grant_raises_limit_and_is_recorded(demo, settings):
    staff = make_user("support", is_staff=True)
    Organization.objects.filter(pk=demo.organization.pk).update(
        fallback_calls_used=settings.GATECO_FALLBACK_CALL_LIMIT
    )
    demo.organization.refresh_from_db()

    demo.organization.grant_fallback_calls(5, "Pilot extension", granted_by=staff)

    assert demo.organization.fallback_call_limit == settings.GATECO_FALLBACK_CALL_LIMIT + 5
    assert demo.organization.fallback_calls_remaining == 5
    grant = CreditLedgerEntry.objects.get(kind=CreditLedgerEntry.Kind.GRANT)
    assert grant.reason == "Pilot extension"
    assert grant.actor == f"user:{staff.pk}"
    assert demo.organization.reserve_fallback_call() is not None


def test_admin_grant_form_records_reason(client, demo):
    admin_user = make_user("root", is_staff=True, is_superuser=True)
    client.force_login(admin_user)
    organization = demo.organization
    form = {
        "name": organization.name,
        "slug": organization.slug,
        "tier": organization.tier,
        "llm_key_query_cap": "",
        "memberships-TOTAL_FORMS": "0",
        "memberships-INITIAL_FORMS": "0",
        "credit_ledger-TOTAL_FORMS": "1",
        "credit_ledger-INITIAL_FORMS": "0",
        "credit_ledger-0-amount": "25",
        "credit_ledger-0-reason": "Conference demo",
    }

    response = client.post(
        f"/admin/orgs/organization/{organization.pk}/change/", form
    )

    assert response.status_code == 302
    organization.refresh_from_db()
    assert organization.fallback_calls_granted == 25
    grant = CreditLedgerEntry.objects.get(kind=CreditLedgerEntry.Kind.GRANT)
    assert grant.reason == "Conference demo"
    assert grant.actor == f"user:{admin_user.pk}"


def test_free_tier_grant_gives_no_fallback(demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier="free")
    demo.organization.refresh_from_db()

    demo.organization.grant_fallback_calls(10, "Mistaken grant")

    assert demo.organization.fallback_call_limit == 0
    assert demo.organization.reserve_fallback_call() is None


def test_soft_cap_reports_and_continues(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)
    Organization.objects.filter(pk=demo.organization.pk).update(llm_key_query_cap=2)

    bodies = [ask(api_client, demo, demo.alice).json() for _ in range(3)]

    assert [body["cap_reached"] for body in bodies] == [False, True, True]
    assert [body["outcome"] for body in bodies] == ["answered"] * 3


def test_new_key_resets_uses(api_client, demo, openai_server):
    api_client.patch(
        "/api/organization/settings", {"llm_api_key": ORG_KEY}, format="json"
    )
    ask(api_client, demo, demo.alice)

    response = api_client.patch(
        "/api/organization/settings",
        {"llm_api_key": "sk-org-second-key-444444444444444444KEY4"},
        format="json",
    )

    assert response.json()["llm_key_uses"] == 0


def test_audit_names_key_version(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, ORG_KEY)
    ask(api_client, demo, demo.alice)
    set_llm_api_key(demo.organization, "sk-org-second-key-444444444444444444KEY4")
    ask(api_client, demo, demo.alice)

    versions = list(
        AnswerAudit.objects.order_by("created_at").values_list("key_version", flat=True)
    )
    assert versions == [1, 2]


def test_audit_records_tokens_and_latency(api_client, demo, openai_server):
    ask(api_client, demo, demo.alice)

    audit = AnswerAudit.objects.get()
    assert audit.prompt_tokens > 0
    assert audit.completion_tokens > 0
    assert audit.outcome == "answered"


def test_unexpected_error_releases_call(api_client, demo, openai_server, monkeypatch):
    from answers import llm

    def explode(*args, **kwargs):
        raise RuntimeError("unexpected failure inside synthesis")

    monkeypatch.setattr(llm, "complete", explode)
    api_client.raise_request_exception = False

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 500
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0
    assert used_by_ledger(demo.organization) == 0


def test_api_key_use_recorded_once_a_minute(api_client, demo):
    from orgs.models import ApiKey

    api_client.get("/api/organization/settings")
    first_use = ApiKey.objects.get(name="tests").last_used_at

    api_client.get("/api/organization/settings")

    assert first_use is not None
    assert ApiKey.objects.get(name="tests").last_used_at == first_use
