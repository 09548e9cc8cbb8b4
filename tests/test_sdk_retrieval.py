"""The published `gateco` SDK drives the retrieval API of a live server.

Each call is one real HTTP request through the SDK's httpx transport, with
retries off, to pytest-django's live server on 127.0.0.1.
"""

import pytest
from gateco_sdk import GatecoClient
from gateco_sdk.errors import (
    ConflictError,
    EntitlementError,
    NotFoundError,
    ValidationError,
)

from orgs.models import Organization, Tier
from retrieval.models import MonthlyUsage, Resource
from retrieval.search import FREE_TIER_MONTHLY_RETRIEVALS, current_month

pytestmark = pytest.mark.django_db(transaction=True)

# The SDK's httpx client sends requests through a proxy named in these.
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)
COMPENSATION_RULES = [
    {
        "description": "Engineers read the salary bands",
        "conditions": [
            {
                "field": "resource.labels",
                "operator": "contains",
                "value": "compensation",
            },
            {"field": "principal.department", "operator": "eq", "value": "engineering"},
        ],
    }
]


@pytest.fixture
def sdk(live_server, monkeypatch, api_key):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    # The live server binds an IPv4 socket for "localhost", so naming
    # 127.0.0.1 reaches it without resolving a host name.
    base_url = live_server.url.replace("://localhost:", "://127.0.0.1:")
    with GatecoClient(
        base_url=base_url, api_key=api_key, max_retries=0, timeout=10
    ) as client:
        yield client


def retrieve(sdk, demo, principal, query, **options):
    return sdk.retrievals.execute(
        principal_id=str(principal.id),
        connector_id=str(demo.connector.id),
        query=query,
        **options,
    )


def granted_resources(retrieval):
    return {r.external_resource_id for r in retrieval.results if r.granted}


def test_ingest_document_and_delete(sdk, demo):
    ingested = sdk.ingest.document(
        str(demo.connector.id),
        "wiki/zeppelins.md",
        "# Zeppelins\n\nThe hangar opens at dawn.",
        classification="public",
        sensitivity="low",
        labels=["aviation"],
        owner_principal_id=str(demo.bob.id),
    )
    found = retrieve(sdk, demo, demo.alice, "zeppelin hangar")
    deleted = sdk.ingest.delete_resource(str(demo.connector.id), "wiki/zeppelins.md")

    assert ingested.status == "ingested"
    assert ingested.chunk_count == 1
    assert ingested.vector_ids
    assert granted_resources(found) == {"wiki/zeppelins.md"}
    assert deleted["status"] == "deleted"
    assert not Resource.objects.filter(external_id="wiki/zeppelins.md").exists()


def test_ingest_rejects_unknown_classification(sdk, demo):
    with pytest.raises(ValidationError) as raised:
        sdk.ingest.document(
            str(demo.connector.id), "secret.md", "Text.", classification="secret"
        )

    assert raised.value.status_code == 422
    assert not Resource.objects.filter(external_id="secret.md").exists()


def test_ingest_batch_and_byoe(sdk, demo):
    batch = sdk.ingest.batch(
        str(demo.connector.id),
        [
            {"external_resource_id": "a.md", "text": "Alpha airship."},
            {"external_resource_id": "b.md", "text": "Beta airship."},
        ],
    )
    byoe = sdk.ingest.document_byoe(
        str(demo.connector.id),
        "vectors.md",
        [{"text": "Pre-embedded chunk", "vector": [0.6, 0.8]}],
        classification="public",
    )

    assert batch.succeeded == 2
    assert batch.failed == 0
    assert byoe.chunk_count == 1


def test_principal_lifecycle(sdk, demo):
    created = sdk.principals.create(
        "dana@acme.test",
        display_name="Dana",
        roles=["employee"],
        attributes={"department": "support"},
    )
    fetched = sdk.principals.get(created.id)
    resolved = sdk.principals.resolve(email="dana@acme.test")
    updated = sdk.principals.update(created.id, groups=["support"])
    page = sdk.principals.list(per_page=2)
    sdk.principals.delete(created.id)
    after = sdk.principals.get(created.id)

    assert fetched.email == "dana@acme.test"
    assert fetched.identity_provider_type == "local"
    assert resolved.id == created.id
    assert updated.groups == ["support"]
    assert page.total == 3
    assert page.total_pages == 2
    assert len(page.items) == 2
    assert after.status == "inactive"


def test_duplicate_principal_raises_conflict(sdk, demo):
    with pytest.raises(ConflictError):
        sdk.principals.create("alice@acme.test")


def test_policy_lifecycle_changes_retrieval(sdk, demo):
    policy = sdk.policies.create(
        "Engineers read compensation documents",
        "abac",
        "allow",
        description="Salary bands for engineers",
        rules=COMPENSATION_RULES,
    )
    before = retrieve(sdk, demo, demo.bob, "salary bands for engineering")
    activated = sdk.policies.activate(policy.id)
    during = retrieve(sdk, demo, demo.bob, "salary bands for engineering")
    archived = sdk.policies.archive(policy.id)
    after = retrieve(sdk, demo, demo.bob, "salary bands for engineering")

    assert policy.status == "draft"
    assert policy.rules[0].effect == "allow"
    assert activated.status == "active"
    assert archived.status == "archived"
    assert "salary-bands.md" not in granted_resources(before)
    assert "salary-bands.md" in granted_resources(during)
    assert "salary-bands.md" not in granted_resources(after)


def test_policy_update_and_list(sdk, demo):
    policy = sdk.policies.create(
        "Compensation", "abac", "allow", rules=COMPENSATION_RULES
    )

    updated = sdk.policies.update(policy.id, description="Edited")
    page = sdk.policies.list(per_page=100)
    sdk.policies.delete(policy.id)

    assert updated.version == 2
    assert policy.id in {p.id for p in page.items}
    with pytest.raises(NotFoundError):
        sdk.policies.get(policy.id)


def test_invalid_policy_raises_validation_error(sdk, demo):
    with pytest.raises(ValidationError) as raised:
        sdk.policies.create(
            "Broken",
            "abac",
            "allow",
            rules=[
                {
                    "conditions": [
                        {"field": "resource.size", "operator": "eq", "value": 1}
                    ]
                }
            ],
        )

    assert raised.value.code == "VALIDATION_ERROR"
    assert "resource.size" in raised.value.message


def test_relationship_grants_access(sdk, demo):
    sdk.policies.activate(
        sdk.policies.create(
            "Editors read what they edit",
            "rebac",
            "allow",
            rules=[
                {
                    "conditions": [
                        {"field": "relation.editor", "operator": "eq", "value": True}
                    ]
                }
            ],
        ).id
    )
    salary = demo.connector.resources.get(external_id="salary-bands.md")

    relationship = sdk.relationships.create(str(demo.bob.id), "editor", str(salary.id))
    listed = sdk.relationships.list(subject_id=str(demo.bob.id))
    related = retrieve(sdk, demo, demo.bob, "salary bands")
    sdk.relationships.delete(relationship["id"])
    unrelated = retrieve(sdk, demo, demo.bob, "salary bands")

    assert [r["id"] for r in listed] == [relationship["id"]]
    assert "salary-bands.md" in granted_resources(related)
    assert "salary-bands.md" not in granted_resources(unrelated)


def test_execute_returns_secured_retrieval(sdk, demo):
    retrieval = retrieve(sdk, demo, demo.bob, "What was revenue in the third quarter?")

    assert retrieval.retrieval_id
    assert retrieval.outcome == "denied"
    assert retrieval.denied_count == retrieval.denied_chunks
    assert retrieval.results
    assert all(result.text is None for result in retrieval.results)
    assert all(result.policy_decision == "denied" for result in retrieval.results)
    # The restricted acquisition memo matches too, and a deny policy names it.
    assert retrieval.denial_reasons == ["no_matching_policy", "policy_denied"]
    assert retrieval.policy_trace
    assert retrieval.model_extra["diagnostics"]["refill_rounds"] == 0


def test_execute_grep_raises_validation_error(sdk, demo):
    with pytest.raises(ValidationError) as raised:
        retrieve(sdk, demo, demo.alice, "revenue", search_mode="grep")

    assert "grep" in raised.value.message


def test_simulator_runs(sdk, demo):
    result = sdk.simulator.run(str(demo.alice.id), connector_id=str(demo.connector.id))

    assert result.outcome == "partial"
    assert result.matched_resources == 6
    assert result.allowed + result.denied == 6
    assert result.policy_trace


def test_free_tier_limit_raises_entitlement_error(sdk, demo):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)
    MonthlyUsage.objects.create(
        organization=demo.organization,
        month=current_month(),
        retrievals=FREE_TIER_MONTHLY_RETRIEVALS - 1,
    )

    last = retrieve(sdk, demo, demo.alice, "pto")
    with pytest.raises(EntitlementError) as raised:
        retrieve(sdk, demo, demo.alice, "pto")

    assert last.retrieval_id
    assert raised.value.is_limit is True
    assert raised.value.upgrade_to == "team"
    assert raised.value.status_code == 403


def test_other_organization_is_not_found(sdk, demo, other_demo):
    with pytest.raises(NotFoundError):
        sdk.principals.get(str(other_demo.alice.id))
