"""The policy engine, alone and inside the policy-filtered retrieval."""

import pytest

from orgs.demo import POLICIES
from retrieval.models import (
    Classification,
    Effect,
    Policy,
    PolicyStatus,
    Principal,
    PrincipalStatus,
    Resource,
)
from retrieval.policy import (
    PolicyDefinitionError,
    PolicyEvaluationError,
    decide,
    validate_rules,
)
from retrieval.search import execute_retrieval, keyword_candidates


def condition(field, operator, value):
    return {"field": field, "operator": operator, "value": value}


def allow(*conditions, status=PolicyStatus.ACTIVE):
    return Policy(
        effect=Effect.ALLOW, status=status, rules=[{"conditions": list(conditions)}]
    )


def deny(*conditions):
    return Policy(
        effect=Effect.DENY,
        status=PolicyStatus.ACTIVE,
        rules=[{"conditions": list(conditions)}],
    )


def make_principal(**fields):
    defaults = {
        "external_id": "carol@acme.test",
        "email": "carol@acme.test",
        "roles": ["employee", "analyst"],
        "groups": ["finance"],
        "attributes": {"department": "finance", "clearance": "confidential"},
    }
    return Principal(**{**defaults, **fields})


def make_resource(**fields):
    defaults = {
        "external_id": "reports/q3.md",
        "title": "Q3 report",
        "classification": Classification.CONFIDENTIAL,
        "labels": ["finance", "board"],
    }
    return Resource(**{**defaults, **fields})


def retrieve(demo, principal, query, top_k=50):
    return execute_retrieval(
        demo.organization, principal, demo.connector, query, top_k, "keyword"
    )


def active_policies(organization):
    return list(
        Policy.objects.filter(organization=organization, status=PolicyStatus.ACTIVE)
    )


# --- decide() on unsaved instances -------------------------------------------

OPERATOR_CASES = [
    ("resource.classification", "eq", "confidential", True),
    ("resource.classification", "eq", "public", False),
    ("resource.classification", "ne", "public", True),
    ("resource.classification", "ne", "confidential", False),
    ("resource.classification", "in", ["internal", "confidential"], True),
    ("resource.classification", "in", ["public", "internal"], False),
    ("resource.labels", "in", ["board", "hr"], True),
    ("resource.labels", "in", ["hr", "security"], False),
    ("resource.labels", "contains", "finance", True),
    ("resource.labels", "contains", "hr", False),
    ("resource.title", "contains", "Q3", True),
    ("resource.title", "contains", "Q4", False),
    ("resource.classification", "lte", "confidential", True),
    ("resource.classification", "lte", "internal", False),
    ("resource.classification", "gte", "internal", True),
    ("resource.classification", "gte", "restricted", False),
    ("principal.roles", "contains", "analyst", True),
    ("principal.roles", "contains", "engineer", False),
    ("principal.department", "eq", "finance", True),
    ("principal.department", "eq", "engineering", False),
]


@pytest.mark.parametrize(("field", "operator", "value", "allowed"), OPERATOR_CASES)
def test_operator_decides_allow_policy(field, operator, value, allowed):
    policy = allow(condition(field, operator, value))

    decision = decide([policy], make_principal(), make_resource())

    assert decision.allowed is allowed


@pytest.mark.parametrize(
    ("field", "operator", "reference", "attributes", "allowed"),
    [
        (
            "resource.classification",
            "lte",
            "{{principal.clearance}}",
            {"clearance": "confidential"},
            True,
        ),
        (
            "resource.classification",
            "lte",
            "{{ principal.clearance }}",
            {"clearance": "internal"},
            False,
        ),
        (
            "resource.labels",
            "contains",
            "{{principal.department}}",
            {"department": "finance"},
            True,
        ),
        (
            "resource.labels",
            "contains",
            "{{principal.department}}",
            {"department": "hr"},
            False,
        ),
        (
            "resource.external_id",
            "eq",
            "{{principal.home}}",
            {"home": "reports/q3.md"},
            True,
        ),
    ],
)
def test_principal_reference_is_resolved(
    field, operator, reference, attributes, allowed
):
    policy = allow(condition(field, operator, reference))
    principal = make_principal(attributes=attributes)

    decision = decide([policy], principal, make_resource())

    assert decision.allowed is allowed


def test_owner_reference_matches_owner():
    owner = make_principal(external_id="carol@acme.test")
    policy = allow(condition("resource.owner", "eq", "{{principal.external_id}}"))

    assert decide([policy], owner, make_resource(owner=owner)).allowed is True
    assert decide([policy], owner, make_resource(owner=None)).allowed is False


def test_allowing_policy_is_named():
    policy = allow(condition("resource.labels", "contains", "finance"))

    decision = decide([policy], make_principal(), make_resource())

    assert decision.reason == "policy_allowed"
    assert decision.policy_id == str(policy.id)


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_overrides_allow(deny_first):
    allowing = allow(condition("resource.labels", "contains", "finance"))
    denying = deny(condition("resource.labels", "contains", "board"))
    policies = [denying, allowing] if deny_first else [allowing, denying]

    decision = decide(policies, make_principal(), make_resource())

    assert decision.allowed is False
    assert decision.reason == "policy_denied"
    assert decision.policy_id == str(denying.id)


@pytest.mark.parametrize(
    "policies",
    [
        [],
        [allow(condition("resource.labels", "contains", "hr"))],
        [deny(condition("resource.classification", "eq", "restricted"))],
    ],
)
def test_nothing_matching_is_denied(policies):
    decision = decide(policies, make_principal(), make_resource())

    assert decision.allowed is False
    assert decision.reason == "no_matching_policy"
    assert decision.policy_id is None


@pytest.mark.parametrize(
    "status", [PrincipalStatus.INACTIVE, PrincipalStatus.SUSPENDED]
)
def test_inactive_principal_is_denied(status):
    policy = allow(condition("resource.labels", "contains", "finance"))

    decision = decide([policy], make_principal(status=status), make_resource())

    assert decision.allowed is False
    assert decision.reason == "principal_inactive"


def test_any_matching_rule_matches_policy():
    policy = Policy(
        effect=Effect.ALLOW,
        status=PolicyStatus.ACTIVE,
        rules=[
            {"conditions": [condition("resource.labels", "contains", "hr")]},
            {"conditions": [condition("resource.labels", "contains", "board")]},
        ],
    )

    assert decide([policy], make_principal(), make_resource()).allowed is True


def test_every_condition_must_hold():
    policy = allow(
        condition("resource.labels", "contains", "finance"),
        condition("principal.department", "eq", "engineering"),
    )

    assert decide([policy], make_principal(), make_resource()).allowed is False


UNEVALUABLE_CONDITIONS = [
    pytest.param(condition("principal.nickname", "eq", "cj"), id="missing-attribute"),
    pytest.param(
        condition("resource.classification", "eq", "{{principal.nickname}}"),
        id="missing-referenced-attribute",
    ),
    pytest.param(
        condition("resource.classification", "lte", "secret"), id="lte-non-level"
    ),
    pytest.param(
        condition("principal.department", "gte", "internal"), id="gte-non-level-field"
    ),
    pytest.param(condition("resource.labels", "lte", "internal"), id="lte-list-field"),
    pytest.param(
        condition("resource.classification", "in", "confidential"), id="in-non-list"
    ),
    pytest.param(
        condition("resource.owner", "contains", "carol"), id="contains-on-none"
    ),
    pytest.param(
        condition("resource.title", "contains", ["Q3"]), id="contains-list-in-text"
    ),
    pytest.param(condition("resource.size", "eq", 1), id="unknown-resource-field"),
]


@pytest.mark.parametrize("broken", UNEVALUABLE_CONDITIONS)
def test_unevaluable_condition_raises(broken):
    with pytest.raises(PolicyEvaluationError):
        decide([allow(broken)], make_principal(), make_resource())


def test_evaluation_error_names_policy():
    policy = allow(condition("principal.nickname", "eq", "cj"))

    with pytest.raises(PolicyEvaluationError, match=str(policy.id)):
        decide([policy], make_principal(), make_resource())


# --- validate_rules() ---------------------------------------------------------

VALID_CONDITION = condition("resource.classification", "eq", "public")


@pytest.mark.parametrize(
    "rules",
    [
        [{"conditions": [VALID_CONDITION]}],
        [{"conditions": [condition("principal.clearance", "gte", "internal")]}],
        [
            {
                "conditions": [
                    condition("resource.owner", "eq", "{{principal.external_id}}")
                ]
            }
        ],
        [
            {
                "conditions": [
                    condition("resource.owner", "eq", "{{ principal.external_id }}")
                ]
            }
        ],
    ],
)
def test_valid_rules_are_accepted(rules):
    validate_rules(rules)


@pytest.mark.parametrize("policy", POLICIES, ids=lambda policy: policy["name"])
def test_demo_policies_are_valid(policy):
    validate_rules(policy["rules"])


@pytest.mark.parametrize(
    "rules",
    [
        pytest.param([], id="empty-rules"),
        pytest.param(None, id="rules-not-list"),
        pytest.param({"conditions": [VALID_CONDITION]}, id="rules-object"),
        pytest.param([{"conditions": []}], id="empty-conditions"),
        pytest.param([{}], id="rule-without-conditions"),
        pytest.param(["resource.classification eq public"], id="rule-not-object"),
        pytest.param(
            [{"conditions": [VALID_CONDITION], "negate": True}], id="rule-extra-key"
        ),
        pytest.param(
            [{"conditions": [VALID_CONDITION], "effect": "block"}],
            id="rule-unknown-effect",
        ),
        pytest.param(
            [{"conditions": [VALID_CONDITION], "priority": "high"}],
            id="rule-priority-not-number",
        ),
        pytest.param(
            [{"conditions": [{**VALID_CONDITION, "negate": True}]}],
            id="condition-extra-key",
        ),
        pytest.param(
            [{"conditions": [{"field": "resource.classification", "operator": "eq"}]}],
            id="condition-missing-value",
        ),
        pytest.param(
            [{"conditions": [condition("resource.size", "eq", 1)]}],
            id="unknown-resource-field",
        ),
        pytest.param(
            [{"conditions": [condition("document.title", "eq", "x")]}],
            id="unknown-side",
        ),
        pytest.param(
            [{"conditions": [condition("principal.", "eq", "x")]}],
            id="empty-principal-field",
        ),
        pytest.param(
            [{"conditions": [condition(["resource.title"], "eq", "x")]}],
            id="field-not-text",
        ),
        pytest.param(
            [{"conditions": [condition("resource.classification", "like", "pub")]}],
            id="unknown-operator",
        ),
        pytest.param(
            [{"conditions": [condition("resource.owner", "eq", "{{relation.owner}}")]}],
            id="template-of-relation",
        ),
        pytest.param(
            [
                {
                    "conditions": [
                        condition("resource.owner", "eq", "{{principal.external_id}")
                    ]
                }
            ],
            id="template-unclosed",
        ),
        pytest.param(
            [{"conditions": [condition("resource.owner", "eq", "x{{principal.id}}")]}],
            id="template-with-prefix",
        ),
    ],
)
def test_malformed_rules_are_rejected(rules):
    with pytest.raises(PolicyDefinitionError):
        validate_rules(rules)


@pytest.mark.parametrize(
    ("rules", "named"),
    [
        ([{"conditions": [condition("resource.size", "eq", 1)]}], "resource.size"),
        ([{"conditions": [condition("resource.title", "like", "x")]}], "like"),
        (
            [
                {"conditions": [VALID_CONDITION]},
                {"conditions": [{**VALID_CONDITION, "x": 1}]},
            ],
            "rule 2",
        ),
    ],
)
def test_rejection_names_the_problem(rules, named):
    with pytest.raises(PolicyDefinitionError, match=named):
        validate_rules(rules)


# --- execute_retrieval() with the demo organization --------------------------

QUERIES = [
    "What was revenue in the third quarter?",
    "salary bands for engineering",
    "acquisition offer and cash",
    "how do I request paid time off",
    "security incident within hours",
    "database failover replica",
    "engineers dollars",
]


def demo_principals(demo):
    """Return Alice, Bob and three principals the demo policies treat differently."""
    organization = demo.organization
    extra = [
        Principal.objects.create(
            organization=organization,
            external_id="hana@acme.test",
            roles=["employee"],
            attributes={"department": "hr", "clearance": "restricted"},
        ),
        Principal.objects.create(
            organization=organization,
            external_id="contractor@acme.test",
            roles=["contractor"],
            attributes={"department": "engineering", "clearance": "public"},
        ),
        Principal.objects.create(
            organization=organization,
            external_id="former@acme.test",
            roles=["employee"],
            attributes={"department": "finance", "clearance": "confidential"},
            status=PrincipalStatus.SUSPENDED,
        ),
    ]
    return [demo.alice, demo.bob, *extra]


@pytest.mark.django_db
def test_retrieval_returns_only_allowed_chunks(demo):
    policies = active_policies(demo.organization)
    allowed_total = denied_total = 0

    for principal in demo_principals(demo):
        for query in QUERIES:
            result = retrieve(demo, principal, query)

            for scored in result.allowed:
                resource = scored.chunk.resource
                decision = decide(policies, principal, resource)
                assert decision.allowed, (
                    principal.external_id,
                    query,
                    resource.external_id,
                )
            allowed_total += len(result.allowed)
            denied_total += len(result.denied)

    # Both sides occur, so the loop above checked real allowed chunks.
    assert allowed_total > 0
    assert denied_total > 0


@pytest.mark.django_db
@pytest.mark.parametrize("query", QUERIES)
def test_retrieval_keeps_every_allowed_candidate(demo, query):
    policies = active_policies(demo.organization)

    for principal in demo_principals(demo):
        result = retrieve(demo, principal, query)

        expected = [
            candidate.chunk.id
            for candidate in keyword_candidates(demo.connector, query)
            if decide(policies, principal, candidate.chunk.resource).allowed
        ]
        assert [scored.chunk.id for scored in result.allowed] == expected


@pytest.mark.django_db
def test_allowed_chunk_found_behind_denied(demo):
    query = "salary bands for engineering"
    policies = active_policies(demo.organization)
    candidates = keyword_candidates(demo.connector, query)
    first_allowed = next(
        candidate
        for candidate in candidates
        if decide(policies, demo.bob, candidate.chunk.resource).allowed
    )
    # The setup this test needs: Bob may not read the best match.
    assert candidates[0].chunk.resource.external_id == "salary-bands.md"
    assert decide(policies, demo.bob, candidates[0].chunk.resource).allowed is False

    result = retrieve(demo, demo.bob, query, top_k=1)

    assert [scored.chunk.id for scored in result.allowed] == [first_allowed.chunk.id]
    assert result.decision == "allowed"
    assert result.record.allowed_chunks == 1
    assert result.record.denied_chunks >= 1


@pytest.mark.django_db
def test_top_k_limits_allowed_chunks(demo):
    query = "within days"
    assert len(retrieve(demo, demo.alice, query).allowed) > 2

    result = retrieve(demo, demo.alice, query, top_k=2)

    assert len(result.allowed) == 2


@pytest.mark.django_db
def test_all_denied_is_denied_decision(demo):
    result = retrieve(demo, demo.bob, "What was revenue in the third quarter?")

    assert result.allowed == []
    assert result.decision == "denied"
    assert result.record.denied_chunks > 0


@pytest.mark.django_db
@pytest.mark.parametrize("status", [PolicyStatus.DRAFT, PolicyStatus.ARCHIVED])
def test_inactive_policy_grants_nothing(demo, status):
    Policy.objects.create(
        organization=demo.organization,
        name="Everyone reads finance documents",
        effect=Effect.ALLOW,
        status=status,
        rules=[{"conditions": [condition("resource.labels", "contains", "finance")]}],
    )

    result = retrieve(demo, demo.bob, "What was revenue in the third quarter?")

    assert result.allowed == []
    assert result.policies_evaluated == len(POLICIES)


@pytest.mark.django_db
def test_active_policy_grants_access(demo):
    # The counterpart of the test above: the same policy, once active, allows.
    Policy.objects.create(
        organization=demo.organization,
        name="Everyone reads finance documents",
        effect=Effect.ALLOW,
        status=PolicyStatus.ACTIVE,
        rules=[{"conditions": [condition("resource.labels", "contains", "finance")]}],
    )

    result = retrieve(demo, demo.bob, "What was revenue in the third quarter?")

    assert [s.chunk.resource.external_id for s in result.allowed] == [
        "q3-board-financials.md"
    ]


@pytest.mark.django_db
@pytest.mark.parametrize(
    "broken",
    [
        pytest.param(
            condition("principal.nickname", "eq", "cj"), id="missing-attribute"
        ),
        pytest.param(
            condition("resource.classification", "lte", "secret"), id="lte-non-level"
        ),
        pytest.param(
            condition("resource.classification", "in", "public"), id="in-non-list"
        ),
    ],
)
def test_evaluation_error_denies_retrieval(demo, broken):
    Policy.objects.create(
        organization=demo.organization,
        name="Broken policy",
        effect=Effect.ALLOW,
        status=PolicyStatus.ACTIVE,
        rules=[{"conditions": [broken]}],
    )

    result = retrieve(demo, demo.alice, "What was revenue in the third quarter?")

    assert result.decision == "error_deny"
    assert result.allowed == []
    assert result.error
    assert result.record.decision == "error_deny"
    assert result.record.allowed_chunks == 0
    assert result.record.denied_chunks == result.candidates


@pytest.mark.django_db
def test_other_organization_sees_nothing(demo, other_demo):
    query = "What was revenue in the third quarter?"
    # Alice of Globex has the same roles and attributes as Alice of Acme.
    combinations = [
        (demo.organization, other_demo.alice),
        (other_demo.organization, other_demo.alice),
        (other_demo.organization, demo.alice),
    ]

    for organization, principal in combinations:
        result = execute_retrieval(
            organization, principal, demo.connector, query, 10, "keyword"
        )

        assert result.allowed == [], (organization.slug, principal.organization.slug)
        assert result.decision == "error_deny"


@pytest.mark.django_db
def test_own_organization_still_sees_chunks(demo, other_demo):
    # The counterpart of the test above, with a second organization present.
    result = retrieve(demo, demo.alice, "What was revenue in the third quarter?")

    assert [s.chunk.resource.external_id for s in result.allowed] == [
        "q3-board-financials.md"
    ]
