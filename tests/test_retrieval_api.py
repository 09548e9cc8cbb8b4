"""The retrieval API end to end: principals, policies, relationships,
ingestion, secured retrievals and the simulator, through Django's test client.

Personas: `api_client` sends an API key of the demo organization, `owner` and
`member` are its signed-in users, and the outsider (`outsider_api_client`,
`outsider`) belongs to a second organization and must see none of it.
"""

import threading

import pytest
from django.db import connection
from rest_framework.test import APIClient

from keyvault.vault import set_llm_api_key
from orgs.models import Organization, Tier
from retrieval.models import (
    AuditEvent,
    Chunk,
    Connector,
    Effect,
    MonthlyUsage,
    Policy,
    PolicyStatus,
    Principal,
    PrincipalStatus,
    Relationship,
    Resource,
    Retrieval,
)
from retrieval.search import FREE_TIER_MONTHLY_RETRIEVALS, current_month

from .helpers import require_postgresql

pytestmark = pytest.mark.django_db

REVENUE_QUERY = "What was revenue in the third quarter?"
LLM_KEY = "sk-retrieval-api-key-000000000000000000RAPI"


def client_for(user):
    client = APIClient()
    client.force_login(user)
    return client


def condition(field, operator, value):
    return {"field": field, "operator": operator, "value": value}


def execute(client, demo, principal, query=REVENUE_QUERY, headers=None, **fields):
    body = {
        "principal_id": principal.external_id,
        "connector_id": str(demo.connector.id),
        "query": query,
        **fields,
    }
    return client.post("/api/retrievals/execute", body, format="json", headers=headers)


def ingest(client, demo, external_id, text, **fields):
    body = {
        "connector_id": str(demo.connector.id),
        "external_resource_id": external_id,
        "text": text,
        **fields,
    }
    return client.post("/api/v1/ingest", body, format="json")


def create_policy(client, **fields):
    body = {
        "name": "Engineers read compensation documents",
        "type": "abac",
        "effect": "allow",
        "rules": [
            {
                "conditions": [
                    condition("resource.labels", "contains", "compensation"),
                    condition("principal.department", "eq", "engineering"),
                ]
            }
        ],
        **fields,
    }
    return client.post("/api/policies", body, format="json")


def index_version(demo):
    return Connector.objects.get(pk=demo.connector.pk).index_version


def error_code(response):
    return response.json()["error"]["code"]


# --- principals --------------------------------------------------------------------


def test_principal_create_is_local(api_client, demo):
    response = api_client.post(
        "/api/principals",
        {
            "email": "dana@acme.test",
            "display_name": "Dana",
            "roles": ["employee"],
            "groups": ["support"],
            "attributes": {"department": "support"},
        },
        format="json",
    )

    assert response.status_code == 201
    body = response.json()
    assert body["external_id"] == "dana@acme.test"
    assert body["identity_provider_type"] == "local"
    assert body["status"] == "active"
    assert Principal.objects.get(id=body["id"]).attributes == {"department": "support"}


def test_principal_create_uses_provider_subject(api_client, demo):
    response = api_client.post(
        "/api/principals",
        {"email": "erin@acme.test", "provider_subject": "okta|erin"},
        format="json",
    )

    assert response.json()["external_id"] == "okta|erin"


def test_duplicate_principal_is_conflict(api_client, demo):
    response = api_client.post(
        "/api/principals", {"email": "alice@acme.test"}, format="json"
    )

    assert response.status_code == 409
    assert error_code(response) == "CONFLICT"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"email": "not-an-email"},
        {"email": "f@acme.test", "roles": "admin"},
        {"email": "f@acme.test", "attributes": ["department"]},
        {"email": "f@acme.test", "attributes": {"has space": 1}},
    ],
)
def test_invalid_principal_is_422(api_client, demo, body):
    response = api_client.post("/api/principals", body, format="json")

    assert response.status_code == 422
    assert error_code(response) == "VALIDATION_ERROR"


def test_principal_limit_on_free_tier(api_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)
    for number in range(8):
        Principal.objects.create(
            organization=demo.organization, external_id=f"p{number}@acme.test"
        )

    response = api_client.post(
        "/api/principals", {"email": "eleventh@acme.test"}, format="json"
    )

    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "ENTITLEMENT_REQUIRED"
    assert error["reason"] == "resource_limit_reached"
    assert error["upgrade_to"] == "team"


def test_principal_list_paginates(api_client, demo):
    for number in range(3):
        Principal.objects.create(
            organization=demo.organization, external_id=f"extra{number}@acme.test"
        )

    body = api_client.get("/api/principals?page=2&per_page=2").json()

    assert len(body["data"]) == 2
    assert body["meta"]["pagination"] == {
        "page": 2,
        "per_page": 2,
        "total": 5,
        "total_pages": 3,
    }


def test_principal_list_filters(api_client, demo):
    Principal.objects.create(
        organization=demo.organization,
        external_id="gone@acme.test",
        groups=["finance"],
        status=PrincipalStatus.INACTIVE,
    )

    def external_ids(query):
        body = api_client.get(f"/api/principals{query}").json()
        return sorted(p["external_id"] for p in body["data"])

    assert external_ids("") == ["alice@acme.test", "bob@acme.test"]
    assert external_ids("?status=all&group=finance") == [
        "alice@acme.test",
        "gone@acme.test",
    ]
    assert external_ids("?search=OKAFOR") == ["bob@acme.test"]
    assert external_ids("?status=inactive") == ["gone@acme.test"]


def test_principal_list_rejects_bad_page(api_client, demo):
    response = api_client.get("/api/principals?page=0")

    assert response.status_code == 422


def test_principal_get_by_id_and_external_id(api_client, demo):
    by_id = api_client.get(f"/api/principals/{demo.alice.id}").json()
    by_external_id = api_client.get("/api/principals/alice@acme.test").json()

    assert by_id["id"] == str(demo.alice.id)
    assert by_external_id["id"] == str(demo.alice.id)


def test_principal_update_changes_fields(api_client, demo):
    response = api_client.patch(
        f"/api/principals/{demo.bob.id}",
        {"attributes": {"department": "finance", "clearance": "confidential"}},
        format="json",
    )

    assert response.status_code == 200
    demo.bob.refresh_from_db()
    assert demo.bob.attributes["department"] == "finance"
    assert demo.bob.roles == ["employee", "engineer"]


def test_principal_delete_deactivates(api_client, demo):
    response = api_client.delete(f"/api/principals/{demo.alice.id}")

    assert response.status_code == 204
    demo.alice.refresh_from_db()
    assert demo.alice.status == PrincipalStatus.INACTIVE
    retrieval = execute(api_client, demo, demo.alice).json()
    assert retrieval["allowed_chunks"] == 0
    assert retrieval["denial_reasons"] == ["principal_inactive"]


def test_principal_resolve_by_email(api_client, demo):
    response = api_client.post(
        "/api/principals/resolve", {"email": "BOB@acme.test"}, format="json"
    )

    assert response.status_code == 200
    assert response.json()["id"] == str(demo.bob.id)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ({"email": "nobody@acme.test"}, 404),
        ({"email": "alice@acme.test", "provider_subject": "other"}, 404),
        ({"email": "alice@acme.test", "identity_provider_id": "okta"}, 404),
        ({}, 422),
    ],
)
def test_principal_resolve_failures(api_client, demo, body, status):
    response = api_client.post("/api/principals/resolve", body, format="json")

    assert response.status_code == status


# --- policies ---------------------------------------------------------------------


def test_policy_create_is_draft(api_client, demo):
    response = create_policy(api_client)

    assert response.status_code == 201
    body = response.json()
    assert body["status"] == "draft"
    assert body["version"] == 1
    assert body["rules"][0]["effect"] == "allow"
    assert body["rules"][0]["priority"] == 0
    assert body["created_by"].startswith("api_key:")


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        ([{"conditions": [condition("resource.size", "eq", 1)]}], "resource.size"),
        (
            [{"conditions": [condition("classification", "eq", "public")]}],
            "classification",
        ),
        (
            [{"conditions": [condition("resource.encryption_mode", "eq", "byok")]}],
            "resource.encryption_mode",
        ),
        ([{"conditions": [condition("resource.title", "like", "Q3")]}], "like"),
        ([{"conditions": [condition("resource.labels", "lte", "internal")]}], "lte"),
        ([], "non-empty"),
    ],
)
def test_policy_create_rejects_unknown_parts(api_client, demo, rules, named):
    response = create_policy(api_client, rules=rules)

    assert response.status_code == 422
    assert error_code(response) == "VALIDATION_ERROR"
    assert named in response.json()["error"]["message"]
    assert not Policy.objects.filter(
        name="Engineers read compensation documents"
    ).exists()


def test_policy_create_rejects_bad_selector(api_client, demo):
    response = create_policy(
        api_client,
        resource_selectors=[condition("principal.department", "eq", "hr")],
    )

    assert response.status_code == 422
    assert "resource_selectors" in response.json()["fields"]


def test_duplicate_policy_name_is_conflict(api_client, demo):
    create_policy(api_client)

    response = create_policy(api_client)

    assert response.status_code == 409


def test_policy_list_paginates(api_client, demo):
    body = api_client.get("/api/policies?per_page=2").json()

    assert len(body["data"]) == 2
    assert (
        body["meta"]["pagination"]["total"]
        == Policy.objects.filter(organization=demo.organization).count()
    )


def test_policy_update_bumps_version(api_client, demo):
    policy = create_policy(api_client).json()

    response = api_client.patch(
        f"/api/policies/{policy['id']}",
        {"description": "Runbooks and incident notes"},
        format="json",
    )

    assert response.status_code == 200
    assert response.json()["version"] == 2
    assert response.json()["description"] == "Runbooks and incident notes"


def test_policy_update_rejects_invalid_rules(api_client, demo):
    policy = create_policy(api_client).json()

    response = api_client.patch(
        f"/api/policies/{policy['id']}",
        {"rules": [{"conditions": [condition("resource.size", "gte", 1)]}]},
        format="json",
    )

    assert response.status_code == 422
    assert Policy.objects.get(id=policy["id"]).version == 1


def granted_resources(body):
    return {r["external_resource_id"] for r in body["results"] if r["granted"]}


def test_policy_lifecycle_changes_access(api_client, demo):
    policy = create_policy(api_client).json()
    query = "salary bands for engineering"
    before = execute(api_client, demo, demo.bob, query).json()

    activated = api_client.post(f"/api/policies/{policy['id']}/activate")
    allowed = execute(api_client, demo, demo.bob, query).json()
    archived = api_client.post(f"/api/policies/{policy['id']}/archive")
    after_archive = execute(api_client, demo, demo.bob, query).json()

    assert "salary-bands.md" not in granted_resources(before)
    assert activated.json()["status"] == "active"
    assert "salary-bands.md" in granted_resources(allowed)
    assert archived.json()["status"] == "archived"
    assert "salary-bands.md" not in granted_resources(after_archive)


def test_policy_delete_removes_it(api_client, demo):
    policy = create_policy(api_client).json()

    response = api_client.delete(f"/api/policies/{policy['id']}")

    assert response.status_code == 204
    assert api_client.get(f"/api/policies/{policy['id']}").status_code == 404


def test_corrupted_policy_cannot_activate(api_client, demo):
    policy = create_policy(api_client).json()
    Policy.objects.filter(id=policy["id"]).update(rules=[{"conditions": "all"}])

    response = api_client.post(f"/api/policies/{policy['id']}/activate")

    assert response.status_code == 422
    assert Policy.objects.get(id=policy["id"]).status == PolicyStatus.DRAFT


# --- relationships ------------------------------------------------------------------


def runbook(demo):
    return demo.connector.resources.get(external_id="oncall-runbook.md")


def relate(client, principal, resource, name="editor"):
    return client.post(
        "/api/relationships",
        {
            "subject_principal_id": str(principal.id),
            "relation_name": name,
            "object_resource_id": str(resource.id),
        },
        format="json",
    )


def test_relationship_create_and_list(api_client, demo):
    created = relate(api_client, demo.alice, runbook(demo))
    relate(api_client, demo.bob, runbook(demo), name="viewer")

    listed = api_client.get(
        f"/api/relationships?subject_id={demo.alice.id}&relation=editor"
    ).json()

    assert created.status_code == 201
    assert created.json()["relation_name"] == "editor"
    assert [r["id"] for r in listed["data"]] == [created.json()["id"]]


def test_relationship_list_filters_by_object(api_client, demo):
    relate(api_client, demo.alice, runbook(demo))
    other = demo.connector.resources.get(external_id="pto-policy.md")
    relate(api_client, demo.alice, other)

    listed = api_client.get(f"/api/relationships?object_id={other.id}").json()

    assert [r["object_resource_id"] for r in listed["data"]] == [str(other.id)]


def test_duplicate_relationship_is_conflict(api_client, demo):
    relate(api_client, demo.alice, runbook(demo))

    response = relate(api_client, demo.alice, runbook(demo))

    assert response.status_code == 409


@pytest.mark.parametrize("name", ["", "has space", "a.b", "x" * 101])
def test_invalid_relation_name_is_422(api_client, demo, name):
    response = relate(api_client, demo.alice, runbook(demo), name=name)

    assert response.status_code == 422


def test_relationship_delete(api_client, demo):
    created = relate(api_client, demo.alice, runbook(demo)).json()

    response = api_client.delete(f"/api/relationships/{created['id']}")

    assert response.status_code == 204
    assert not Relationship.objects.exists()


def test_relationship_to_other_org_resource_is_404(api_client, demo, other_demo):
    foreign = other_demo.connector.resources.get(external_id="oncall-runbook.md")

    response = relate(api_client, demo.alice, foreign)

    assert response.status_code == 404
    assert not Relationship.objects.exists()


# --- ingestion ----------------------------------------------------------------------


def test_ingest_writes_resource_and_chunks(api_client, demo):
    before = index_version(demo)

    response = ingest(
        api_client,
        demo,
        "guides/travel.md",
        "# Travel policy\n\nBook trains for trips under four hours.",
        classification="public",
        sensitivity="medium",
        domain="hr",
        labels=["travel"],
        metadata={"source": "wiki"},
        owner_principal_id=str(demo.bob.id),
    )

    assert response.status_code == 200
    body = response.json()
    resource = Resource.objects.get(id=body["resource_id"])
    assert body["chunk_count"] == 1
    assert body["vector_ids"] == [str(c.id) for c in resource.chunks.all()]
    assert resource.title == "Travel policy"
    assert resource.sensitivity == "medium"
    assert resource.domain == "hr"
    assert resource.metadata == {"source": "wiki"}
    assert resource.owner == demo.bob
    assert resource.chunks.get().embedding == b""
    assert index_version(demo) == before + 1


def test_reingest_replaces_chunks(api_client, demo):
    first = ingest(api_client, demo, "notes.md", "Old zeppelin notes.").json()
    version = index_version(demo)

    second = ingest(api_client, demo, "notes.md", "New dirigible notes.").json()

    assert second["resource_id"] == first["resource_id"]
    assert second["created"] is False
    texts = list(
        Chunk.objects.filter(resource_id=first["resource_id"]).values_list(
            "text", flat=True
        )
    )
    assert texts == ["New dirigible notes."]
    assert index_version(demo) == version + 1


@pytest.mark.parametrize(
    "fields",
    [
        {"classification": "secret"},
        {"sensitivity": "extreme"},
        {"owner_principal_id": "nobody@acme.test"},
        {"labels": ["has space"]},
        {"metadata": ["not", "an", "object"]},
        {"chunking": {"chunk_size": 500, "chunk_overlap": 50}},
        {"chunking": {"separators": ["\n"]}},
        {"text": "   "},
        {"chunking": {"chunk_size": 5}},
        {"chunking": {"strategy": "semantic"}},
        {"embedding": {"provider": "openai_compatible", "base_url": "http://x"}},
    ],
)
def test_invalid_ingest_writes_nothing(api_client, demo, fields):
    resources = Resource.objects.count()
    version = index_version(demo)

    body = {"text": "A document about zeppelins.", **fields}
    response = ingest(api_client, demo, "bad.md", **body)

    assert response.status_code == 422
    assert error_code(response) == "VALIDATION_ERROR"
    assert Resource.objects.count() == resources
    assert index_version(demo) == version


def test_ingest_rejects_infinite_metadata(api_client, demo):
    response = api_client.post(
        "/api/v1/ingest",
        '{"connector_id": "handbook", "external_resource_id": "x.md", '
        '"text": "Zeppelins.", "metadata": {"score": Infinity}}',
        content_type="application/json",
    )

    assert response.status_code == 422
    assert not Resource.objects.filter(external_id="x.md").exists()


def test_ingest_chunk_size_is_applied(api_client, demo):
    text = "\n\n".join(
        f"Paragraph {n} about zeppelins and airships." for n in range(20)
    )

    body = ingest(
        api_client, demo, "long.md", text, chunking={"chunk_size": 100}
    ).json()

    chunks = Chunk.objects.filter(resource_id=body["resource_id"])
    assert body["chunk_count"] > 5
    assert max(len(chunk.text) for chunk in chunks) <= 100


def test_ingest_pre_embedded_chunks(api_client, demo):
    response = api_client.post(
        "/api/v1/ingest",
        {
            "connector_id": str(demo.connector.id),
            "external_resource_id": "byoe.md",
            "pre_embedded_chunks": [
                {"text": "First chunk", "vector": [1.0, 0.0, 0.0]},
                {"text": "Second chunk", "vector": [0.0, 1.0, 0.0]},
            ],
        },
        format="json",
    )

    assert response.status_code == 200
    chunks = list(Chunk.objects.filter(resource_id=response.json()["resource_id"]))
    assert [len(chunk.embedding) for chunk in chunks] == [12, 12]


def test_pre_embedded_length_mismatch_is_422(api_client, demo):
    response = api_client.post(
        "/api/v1/ingest",
        {
            "connector_id": str(demo.connector.id),
            "external_resource_id": "byoe.md",
            "pre_embedded_chunks": [
                {"text": "First chunk", "vector": [1.0, 0.0]},
                {"text": "Second chunk", "vector": [0.0, 1.0, 0.0]},
            ],
        },
        format="json",
    )

    assert response.status_code == 422
    assert not Resource.objects.filter(external_id="byoe.md").exists()


def test_ingest_embeds_with_organization_key(api_client, demo, openai_server):
    set_llm_api_key(demo.organization, LLM_KEY)

    body = ingest(
        api_client, demo, "embedded.md", "Zeppelins float on hydrogen."
    ).json()

    chunk = Chunk.objects.get(resource_id=body["resource_id"])
    assert len(chunk.embedding) == 256 * 4
    assert [r["path"] for r in openai_server.requests] == ["/v1/embeddings"]


def test_ingested_document_is_retrievable(api_client, demo):
    ingest(
        api_client,
        demo,
        "zeppelin.md",
        "Zeppelin hangar opens at dawn.",
        classification="public",
    )

    body = execute(api_client, demo, demo.bob, "zeppelin hangar").json()

    assert [r["external_resource_id"] for r in body["results"]] == ["zeppelin.md"]


def batch(client, demo, records):
    return client.post(
        "/api/v1/ingest/batch",
        {"connector_id": str(demo.connector.id), "records": records},
        format="json",
    )


def test_batch_ingest_writes_all(api_client, demo):
    response = batch(
        api_client,
        demo,
        [
            {"external_resource_id": "a.md", "text": "Alpha zeppelin."},
            {
                "external_resource_id": "b.md",
                "text": "Beta zeppelin.",
                "classification": "public",
            },
        ],
    )

    assert response.status_code == 200
    body = response.json()
    assert body["succeeded"] == 2
    assert body["failed"] == 0
    assert [r["external_resource_id"] for r in body["results"]] == ["a.md", "b.md"]


def test_batch_with_invalid_record_writes_nothing(api_client, demo):
    resources = Resource.objects.count()

    response = batch(
        api_client,
        demo,
        [
            {"external_resource_id": "a.md", "text": "Alpha zeppelin."},
            {
                "external_resource_id": "b.md",
                "text": "Beta.",
                "classification": "secret",
            },
            {"external_resource_id": "c.md"},
        ],
    )

    assert response.status_code == 422
    errors = response.json()["errors"]
    assert [error["index"] for error in errors] == [1, 2]
    assert "classification" in errors[0]["message"]
    assert Resource.objects.count() == resources


def test_batch_duplicate_external_ids_is_422(api_client, demo):
    response = batch(
        api_client,
        demo,
        [
            {"external_resource_id": "a.md", "text": "One."},
            {"external_resource_id": "a.md", "text": "Two."},
        ],
    )

    assert response.status_code == 422


def test_batch_on_free_tier_is_feature_gated(api_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)

    response = batch(api_client, demo, [{"external_resource_id": "a.md", "text": "x"}])

    assert response.status_code == 403
    assert response.json()["error"]["reason"] == "feature_not_in_plan"


def test_delete_resource_by_external_id(api_client, demo):
    ingest(api_client, demo, "guides/travel.md", "Book trains.")
    version = index_version(demo)

    response = api_client.delete(
        f"/api/v1/ingest/resources/guides/travel.md?connector_id={demo.connector.id}"
    )

    assert response.status_code == 200
    assert response.json()["chunks_deleted"] == 1
    assert not Resource.objects.filter(external_id="guides/travel.md").exists()
    assert index_version(demo) == version + 1


def test_delete_unknown_resource_is_404(api_client, demo):
    response = api_client.delete(
        f"/api/v1/ingest/resources/missing.md?connector_id={demo.connector.id}"
    )

    assert response.status_code == 404


def test_delete_without_connector_is_422(api_client, demo):
    response = api_client.delete("/api/v1/ingest/resources/pto-policy.md")

    assert response.status_code == 422


# --- secured retrievals ---------------------------------------------------------


def test_execute_returns_allowed_chunks(api_client, demo):
    response = execute(api_client, demo, demo.alice, top_k=3)

    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] in ("allowed", "partial")
    granted = [r for r in body["results"] if r["granted"]]
    assert granted[0]["external_resource_id"] == "q3-board-financials.md"
    assert "14.2 million" in granted[0]["text"]
    assert granted[0]["policy_decision"] == "allowed"
    assert granted[0]["matched_policy_id"]
    assert body["allowed_chunks"] == len(granted)
    assert body["diagnostics"]["search_mode"] == "keyword"
    assert body["diagnostics"]["refill_rounds"] == 0
    assert {t["policy_name"] for t in body["policy_trace"]} >= {
        "Finance reads finance documents up to its clearance"
    }


def test_denied_text_never_returned(api_client, demo):
    response = execute(api_client, demo, demo.bob)

    body = response.json()
    financials = demo.connector.resources.get(external_id="q3-board-financials.md")
    denied = [r for r in body["results"] if not r["granted"]]
    assert body["outcome"] == "denied"
    assert denied
    assert all(r["text"] is None for r in denied)
    assert all(r["policy_decision"] == "denied" for r in denied)
    for chunk in financials.chunks.all():
        assert chunk.text.encode() not in response.content
    assert b"14.2 million" not in response.content
    assert "title" not in denied[0]["metadata"]


def test_execute_writes_audit_event(api_client, demo):
    body = execute(api_client, demo, demo.bob).json()

    retrieval = Retrieval.objects.get(id=body["retrieval_id"])
    event = AuditEvent.objects.get(retrieval=retrieval)
    assert event.event_type == "retrieval_denied"
    assert event.decision == "denied"
    assert event.principal == demo.bob
    assert event.actor.startswith("api_key:")
    assert retrieval.actor == event.actor
    financials = demo.connector.resources.get(external_id="q3-board-financials.md")
    assert str(financials.id) in event.details["denied_resource_ids"]


def test_allowed_retrieval_audit_type(api_client, demo):
    body = execute(api_client, demo, demo.alice).json()

    event = AuditEvent.objects.get(retrieval_id=body["retrieval_id"])
    assert event.event_type == "retrieval_allowed"


def test_refill_finds_allowed_behind_denied(api_client, demo):
    # Sixteen restricted documents rank above the one public document, more
    # than the first window of 10 candidates holds.
    records = [
        {
            "external_resource_id": f"secret-{n:02}.md",
            "text": "Zeppelin zeppelin zeppelin hangar schedule.",
            "classification": "restricted",
        }
        for n in range(16)
    ]
    records.append(
        {
            "external_resource_id": "public.md",
            "text": "The zeppelin museum is open on Sundays and holidays for visitors.",
            "classification": "public",
        }
    )
    assert batch(api_client, demo, records).status_code == 200

    body = execute(api_client, demo, demo.bob, "zeppelin", top_k=1).json()

    assert [r["external_resource_id"] for r in body["results"] if r["granted"]] == [
        "public.md"
    ]
    assert body["denied_chunks"] == 16
    assert body["diagnostics"]["refill_rounds"] == 1
    assert Retrieval.objects.get(id=body["retrieval_id"]).refill_rounds == 1


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"search_mode": "grep"}, "grep"),
        ({"search_mode": "fuzzy"}, "fuzzy"),
        ({"query": ""}, "query"),
        ({"query_vector": [0.1, 0.2]}, "query_vector"),
        ({"alpha": 0.3}, "alpha"),
        ({"top_k": 0}, "top_k"),
        ({"filters": {"labels": "hr"}}, "filters"),
        ({"include_unresolved": True}, "include_unresolved"),
        ({"pattern_type": "regex"}, "pattern_type"),
    ],
)
def test_invalid_execute_is_422(api_client, demo, fields, named):
    response = execute(api_client, demo, demo.alice, **fields)

    assert response.status_code == 422
    assert error_code(response) == "VALIDATION_ERROR"
    assert named in response.json()["error"]["message"]
    assert not Retrieval.objects.exists()


def test_vector_search_without_key_is_422(api_client, demo):
    response = execute(api_client, demo, demo.alice, search_mode="vector")

    assert response.status_code == 422
    assert error_code(response) == "EMBEDDING_KEY_MISSING"


def test_vector_search_with_query_vector(api_client, demo):
    api_client.post(
        "/api/v1/ingest",
        {
            "connector_id": str(demo.connector.id),
            "external_resource_id": "vectors.md",
            "classification": "public",
            "pre_embedded_chunks": [{"text": "Vector chunk", "vector": [0.0, 1.0]}],
        },
        format="json",
    )

    body = execute(api_client, demo, demo.bob, query="", query_vector=[0.0, 2.0]).json()

    assert body["search_mode"] == "vector"
    assert [r["text"] for r in body["results"]] == ["Vector chunk"]


def test_end_user_token_is_rejected(api_client, demo):
    response = execute(
        api_client, demo, demo.alice, headers={"X-End-User-Token": "eyJ.token"}
    )

    assert response.status_code == 422


def test_broken_policy_is_error_deny(api_client, demo):
    Policy.objects.create(
        organization=demo.organization,
        name="Broken",
        effect=Effect.ALLOW,
        status=PolicyStatus.ACTIVE,
        rules=[{"conditions": [condition("principal.nickname", "eq", "al")]}],
    )

    response = execute(api_client, demo, demo.alice)

    assert response.status_code == 200
    body = response.json()
    assert body["outcome"] == "error_deny"
    assert body["results"] == []
    assert body["allowed_chunks"] == 0
    assert body["denial_reasons"] == ["POLICY_EVALUATION_FAILED"]
    assert "nickname" in body["diagnostics"]["reason"]
    assert b"14.2 million" not in response.content


def test_free_tier_monthly_limit(api_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)
    statuses = [
        execute(api_client, demo, demo.bob, "pto").status_code
        for _ in range(FREE_TIER_MONTHLY_RETRIEVALS)
    ]

    response = execute(api_client, demo, demo.bob, "pto")

    assert set(statuses) == {200}
    assert response.status_code == 403
    error = response.json()["error"]
    assert error["code"] == "ENTITLEMENT_REQUIRED"
    assert error["reason"] == "resource_limit_reached"
    assert error["upgrade_to"] == "team"
    assert Retrieval.objects.count() == FREE_TIER_MONTHLY_RETRIEVALS
    usage = MonthlyUsage.objects.get(organization=demo.organization)
    assert usage.retrievals == FREE_TIER_MONTHLY_RETRIEVALS


def test_last_month_usage_does_not_count(api_client, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)
    last_month = (
        current_month().replace(day=1) - __import__("datetime").timedelta(days=1)
    ).replace(day=1)
    MonthlyUsage.objects.create(
        organization=demo.organization, month=last_month, retrievals=500
    )

    response = execute(api_client, demo, demo.bob, "pto")

    assert response.status_code == 200


def test_paid_tier_has_no_limit(api_client, demo):
    MonthlyUsage.objects.create(
        organization=demo.organization,
        month=current_month(),
        retrievals=FREE_TIER_MONTHLY_RETRIEVALS,
    )

    response = execute(api_client, demo, demo.bob, "pto")

    assert response.status_code == 200
    assert MonthlyUsage.objects.get().retrievals == FREE_TIER_MONTHLY_RETRIEVALS + 1


def test_answer_counts_as_retrieval(api_client, demo, openai_server):
    api_client.post(
        "/api/answers/execute",
        {
            "query": REVENUE_QUERY,
            "principal_id": demo.alice.external_id,
            "connector_id": str(demo.connector.id),
        },
        format="json",
    )

    assert MonthlyUsage.objects.get(organization=demo.organization).retrievals == 1
    assert AuditEvent.objects.filter(organization=demo.organization).count() == 1


def test_answer_passes_search_mode(api_client, demo, openai_server):
    response = api_client.post(
        "/api/answers/execute",
        {
            "query": REVENUE_QUERY,
            "principal_id": demo.alice.external_id,
            "connector_id": str(demo.connector.id),
            "search_mode": "hybrid",
            "alpha": 0.0,
        },
        format="json",
    )

    assert response.status_code == 200
    assert response.json()["diagnostics"]["search_mode"] == "hybrid"
    assert Retrieval.objects.get().search_mode == "hybrid"


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_monthly_limit_holds_under_concurrency(demo):
    require_postgresql()
    from retrieval.search import consume_retrieval

    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)
    MonthlyUsage.objects.create(
        organization=demo.organization,
        month=current_month(),
        retrievals=FREE_TIER_MONTHLY_RETRIEVALS - 5,
    )
    outcomes = []
    start = threading.Barrier(20)

    def consume():
        organization = Organization.objects.get(pk=demo.organization.pk)
        start.wait()
        try:
            consume_retrieval(organization)
            outcomes.append("counted")
        except Exception as error:  # noqa: BLE001 - recorded for the assert
            outcomes.append(type(error).__name__)
        finally:
            connection.close()

    threads = [threading.Thread(target=consume) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes.count("counted") == 5
    assert outcomes.count("EntitlementRequired") == 15
    usage = MonthlyUsage.objects.get(organization=demo.organization)
    assert usage.retrievals == FREE_TIER_MONTHLY_RETRIEVALS


# --- simulator ------------------------------------------------------------------------


def test_simulator_decides_connector_resources(api_client, demo):
    response = api_client.post(
        "/api/simulator/run",
        {"principal_id": str(demo.bob.id), "connector_id": str(demo.connector.id)},
        format="json",
    )

    assert response.status_code == 200
    body = response.json()
    decisions = {r["external_resource_id"]: r["decision"] for r in body["results"]}
    assert decisions["pto-policy.md"] == "allowed"
    assert decisions["q3-board-financials.md"] == "denied"
    assert body["outcome"] == "partial"
    assert body["matched_resources"] == 6
    assert body["allowed"] + body["denied"] == 6
    assert "no_matching_policy" in body["denial_reasons"]
    assert not Retrieval.objects.exists()


def test_simulator_with_resource_ids(api_client, demo):
    financials = demo.connector.resources.get(external_id="q3-board-financials.md")

    body = api_client.post(
        "/api/simulator/run",
        {"principal_id": demo.alice.external_id, "resource_ids": [str(financials.id)]},
        format="json",
    ).json()

    assert body["outcome"] == "allowed"
    assert body["allowed"] == 1


def test_simulator_reports_error_deny(api_client, demo):
    Policy.objects.create(
        organization=demo.organization,
        name="Broken",
        effect=Effect.ALLOW,
        status=PolicyStatus.ACTIVE,
        rules=[{"conditions": [condition("principal.nickname", "eq", "al")]}],
    )

    body = api_client.post(
        "/api/simulator/run", {"principal_id": demo.alice.external_id}, format="json"
    ).json()

    assert body["outcome"] == "error_deny"
    assert body["allowed"] == 0


def test_simulator_rejects_foreign_resource(api_client, demo, other_demo):
    foreign = other_demo.connector.resources.first()

    response = api_client.post(
        "/api/simulator/run",
        {"principal_id": demo.alice.external_id, "resource_ids": [str(foreign.id)]},
        format="json",
    )

    assert response.status_code == 404


# --- members, outsiders and anonymous callers ----------------------------------------


def test_member_reads_but_cannot_write(member, demo):
    client = client_for(member)
    policy = Policy.objects.filter(organization=demo.organization).first()

    reads = [
        client.get("/api/principals"),
        client.get(f"/api/principals/{demo.alice.id}"),
        client.get("/api/policies"),
        client.get(f"/api/policies/{policy.id}"),
        client.get("/api/relationships"),
        execute(client, demo, demo.alice),
        client.post(
            "/api/simulator/run", {"principal_id": str(demo.bob.id)}, format="json"
        ),
    ]
    writes = [
        client.post("/api/principals", {"email": "m@acme.test"}, format="json"),
        client.patch(f"/api/principals/{demo.bob.id}", {"roles": []}, format="json"),
        client.delete(f"/api/principals/{demo.bob.id}"),
        create_policy(client),
        client.post(f"/api/policies/{policy.id}/archive"),
        client.delete(f"/api/policies/{policy.id}"),
        relate(client, demo.alice, runbook(demo)),
        ingest(client, demo, "m.md", "Member text."),
        client.delete(
            f"/api/v1/ingest/resources/pto-policy.md?connector_id={demo.connector.id}"
        ),
    ]

    assert [r.status_code for r in reads] == [200] * len(reads)
    assert [r.status_code for r in writes] == [403] * len(writes)
    assert {error_code(r) for r in writes} == {"AUTH_PERMISSION_DENIED"}
    assert Policy.objects.get(id=policy.id).status == PolicyStatus.ACTIVE


def test_owner_session_can_write(owner, demo):
    response = create_policy(client_for(owner))

    assert response.status_code == 201
    assert response.json()["created_by"] == f"user:{owner.pk}"


def test_outsider_gets_404_everywhere(outsider_api_client, outsider, demo, api_client):
    policy = Policy.objects.filter(organization=demo.organization).first()
    relationship = relate(api_client, demo.alice, runbook(demo)).json()
    financials = demo.connector.resources.get(external_id="q3-board-financials.md")

    for client in (outsider_api_client, client_for(outsider)):
        responses = [
            client.get(f"/api/principals/{demo.alice.id}"),
            client.patch(f"/api/principals/{demo.alice.id}", {}, format="json"),
            client.delete(f"/api/principals/{demo.alice.id}"),
            client.get(f"/api/policies/{policy.id}"),
            client.patch(f"/api/policies/{policy.id}", {}, format="json"),
            client.post(f"/api/policies/{policy.id}/activate"),
            client.post(f"/api/policies/{policy.id}/archive"),
            client.delete(f"/api/policies/{policy.id}"),
            client.delete(f"/api/relationships/{relationship['id']}"),
            execute(client, demo, demo.alice),
            ingest(client, demo, "x.md", "Outsider text."),
            client.delete(
                f"/api/v1/ingest/resources/pto-policy.md?connector_id={demo.connector.id}"
            ),
            client.post(
                "/api/simulator/run",
                {
                    "principal_id": str(demo.alice.id),
                    "resource_ids": [str(financials.id)],
                },
                format="json",
            ),
        ]

        assert [r.status_code for r in responses] == [404] * len(responses)
    assert Relationship.objects.filter(id=relationship["id"]).exists()
    assert Policy.objects.filter(id=policy.id).exists()


def test_outsider_lists_only_own_rows(outsider_api_client, demo, other_demo):
    body = outsider_api_client.get("/api/principals?status=all").json()

    ids = {p["id"] for p in body["data"]}
    assert str(demo.alice.id) not in ids
    assert str(other_demo.alice.id) in ids


def test_anonymous_is_401(demo):
    response = APIClient().get("/api/principals")

    assert response.status_code == 401


@pytest.mark.parametrize(
    "path",
    [
        "/api/principals/not-a-uuid",
        "/api/policies/not-a-uuid",
        "/api/policies/00000000-0000-0000-0000-000000000000",
    ],
)
def test_unknown_ids_are_404(api_client, demo, path):
    response = api_client.get(path)

    assert response.status_code == 404
    assert error_code(response) == "RESOURCE_NOT_FOUND"


def test_non_object_body_is_422(api_client, demo):
    response = api_client.post("/api/policies", [1, 2], format="json")

    assert response.status_code == 422
