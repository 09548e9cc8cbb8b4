"""The policy engine: every operator on every kind of field, rule priority and
effect, selectors, relationships, and each way an error denies a retrieval."""

import pytest
from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import connection
from django.test import Client

from retrieval.models import (
    AuditEvent,
    Classification,
    Effect,
    Policy,
    PolicyStatus,
    Principal,
    Relationship,
    Resource,
    Retrieval,
    Sensitivity,
)
from retrieval.policy import (
    PolicyDefinitionError,
    PolicyEvaluationError,
    PolicyEvaluator,
    decide,
    validate_policy,
)
from retrieval.search import execute_retrieval

SALARY_QUERY = "salary bands for engineering"


def condition(field, operator, value):
    return {"field": field, "operator": operator, "value": value}


def policy(*conditions, effect=Effect.ALLOW, selectors=(), rules=None, **fields):
    return Policy(
        name=fields.pop("name", "test policy"),
        effect=effect,
        status=PolicyStatus.ACTIVE,
        resource_selectors=list(selectors),
        rules=rules if rules is not None else [{"conditions": list(conditions)}],
        **fields,
    )


CAROL = Principal(
    external_id="carol@acme.test",
    email="carol@acme.test",
    roles=["employee", "analyst"],
    groups=["finance", "board"],
    attributes={
        "department": "finance",
        "clearance": "confidential",
        "max_sensitivity": "high",
        "floor": 3,
        "roles": "shadowed",
    },
)
REPORT = Resource(
    external_id="reports/q3.md",
    title="Q3 report",
    classification=Classification.CONFIDENTIAL,
    sensitivity=Sensitivity.HIGH,
    domain="finance",
    labels=["finance", "board"],
    owner=CAROL,
)
EDITOR = {REPORT.pk: frozenset({"editor"})}


def outcome(*conditions, relations=None):
    """Return True or False for an allow policy of `conditions`, or "error"."""
    try:
        return decide([policy(*conditions)], CAROL, REPORT, relations or {}).allowed
    except PolicyEvaluationError:
        return "error"


# (field, operator, value, expected) with Carol deciding on her Q3 report.
FIELD_CASES = [
    # A resource level field: classification.
    ("resource.classification", "eq", "confidential", True),
    ("resource.classification", "eq", "public", False),
    ("resource.classification", "ne", "public", True),
    ("resource.classification", "ne", "confidential", False),
    ("resource.classification", "in", ["internal", "confidential"], True),
    ("resource.classification", "in", ["public"], False),
    ("resource.classification", "contains", "fident", True),
    ("resource.classification", "contains", "secret", False),
    ("resource.classification", "lte", "restricted", True),
    ("resource.classification", "lte", "confidential", True),
    ("resource.classification", "lte", "internal", False),
    ("resource.classification", "gte", "public", True),
    ("resource.classification", "gte", "restricted", False),
    ("resource.classification", "lte", "high", "error"),
    # A resource level field: sensitivity.
    ("resource.sensitivity", "eq", "high", True),
    ("resource.sensitivity", "ne", "high", False),
    ("resource.sensitivity", "in", ["low", "medium"], False),
    ("resource.sensitivity", "contains", "hig", True),
    ("resource.sensitivity", "lte", "critical", True),
    ("resource.sensitivity", "lte", "medium", False),
    ("resource.sensitivity", "gte", "medium", True),
    ("resource.sensitivity", "gte", "critical", False),
    ("resource.sensitivity", "gte", "internal", "error"),
    # Resource text fields.
    ("resource.domain", "eq", "finance", True),
    ("resource.domain", "ne", "finance", False),
    ("resource.domain", "in", ["hr", "finance"], True),
    ("resource.domain", "contains", "fin", True),
    ("resource.domain", "lte", "high", "error"),
    ("resource.title", "eq", "Q3 report", True),
    ("resource.title", "contains", "Q4", False),
    ("resource.title", "in", ["Q3 report"], True),
    ("resource.external_id", "eq", "reports/q3.md", True),
    ("resource.external_id", "ne", "reports/q3.md", False),
    ("resource.external_id", "contains", "reports/", True),
    ("resource.external_id", "gte", "low", "error"),
    # A resource list field.
    ("resource.labels", "eq", ["finance", "board"], True),
    ("resource.labels", "ne", ["finance"], True),
    ("resource.labels", "in", ["board", "hr"], True),
    ("resource.labels", "in", ["hr"], False),
    ("resource.labels", "contains", "board", True),
    ("resource.labels", "contains", "hr", False),
    ("resource.labels", "contains", ["board"], "error"),
    ("resource.labels", "lte", "internal", "error"),
    # The resource owner, as the owner's external id.
    ("resource.owner", "eq", "carol@acme.test", True),
    ("resource.owner", "ne", "carol@acme.test", False),
    ("resource.owner", "in", ["carol@acme.test", "dan@acme.test"], True),
    ("resource.owner", "contains", "@acme.test", True),
    ("resource.owner", "lte", "high", "error"),
    # Principal text fields.
    ("principal.email", "eq", "carol@acme.test", True),
    ("principal.email", "ne", "carol@acme.test", False),
    ("principal.email", "in", ["dan@acme.test"], False),
    ("principal.email", "contains", "@acme.test", True),
    ("principal.external_id", "eq", "carol@acme.test", True),
    ("principal.external_id", "in", ["carol@acme.test"], True),
    ("principal.id", "eq", str(CAROL.id), True),
    ("principal.id", "ne", str(CAROL.id), False),
    ("principal.email", "lte", "high", "error"),
    # Principal list fields.
    ("principal.roles", "eq", ["employee", "analyst"], True),
    ("principal.roles", "ne", ["employee"], True),
    ("principal.roles", "in", ["analyst", "engineer"], True),
    ("principal.roles", "in", ["engineer"], False),
    ("principal.roles", "contains", "analyst", True),
    ("principal.roles", "contains", "engineer", False),
    ("principal.groups", "contains", "board", True),
    ("principal.groups", "in", ["hr"], False),
    ("principal.groups", "eq", ["finance", "board"], True),
    ("principal.groups", "ne", ["finance", "board"], False),
    ("principal.roles", "gte", "low", "error"),
    # Principal attributes, by shorthand and by full name.
    ("principal.department", "eq", "finance", True),
    ("principal.department", "ne", "finance", False),
    ("principal.department", "in", ["hr", "finance"], True),
    ("principal.department", "contains", "fin", True),
    ("principal.attributes.department", "eq", "finance", True),
    ("principal.attributes.department", "eq", "hr", False),
    ("principal.clearance", "gte", "internal", True),
    ("principal.clearance", "gte", "restricted", False),
    ("principal.clearance", "lte", "confidential", True),
    ("principal.max_sensitivity", "gte", "medium", True),
    ("principal.max_sensitivity", "lte", "low", False),
    ("principal.clearance", "lte", "low", "error"),
    ("principal.department", "gte", "internal", "error"),
    ("principal.floor", "eq", 3, True),
    ("principal.floor", "in", [1, 2], False),
    ("principal.floor", "contains", "3", "error"),
    ("principal.nickname", "eq", "cj", "error"),
    ("principal.attributes.nickname", "ne", "cj", "error"),
    # A built-in field wins over an attribute of the same name.
    ("principal.roles", "contains", "employee", True),
    ("principal.attributes.roles", "eq", "shadowed", True),
    # Unknown fields and operators.
    ("resource.size", "eq", 1, "error"),
    ("resource.encryption_mode", "eq", "byok", "error"),
    ("classification", "eq", "confidential", "error"),
    ("principal.attributes", "eq", {}, "error"),
    ("resource.title", "like", "Q3", "error"),
    ("resource.classification", "in", "confidential", "error"),
]


@pytest.mark.parametrize(("field", "operator", "value", "expected"), FIELD_CASES)
def test_operator_on_field(field, operator, value, expected):
    assert outcome(condition(field, operator, value)) == expected


RELATION_CASES = [
    ("eq", True, EDITOR, True),
    ("eq", True, {}, False),
    ("eq", False, {}, True),
    ("eq", False, EDITOR, False),
    ("ne", True, {}, True),
    ("ne", True, EDITOR, False),
    ("in", [True], EDITOR, "error"),
    ("contains", True, EDITOR, "error"),
    ("eq", "yes", EDITOR, "error"),
]


@pytest.mark.parametrize(("operator", "value", "relations", "expected"), RELATION_CASES)
def test_operator_on_relation(operator, value, relations, expected):
    result = outcome(condition("relation.editor", operator, value), relations=relations)

    assert result == expected


def test_other_relation_does_not_count():
    viewer = {REPORT.pk: frozenset({"viewer"})}

    assert outcome(condition("relation.editor", "eq", True), relations=viewer) is False


REFERENCE_CASES = [
    ("resource.owner", "eq", "{{principal.external_id}}", True),
    ("principal.external_id", "eq", "{{resource.owner}}", True),
    ("resource.classification", "lte", "{{principal.clearance}}", True),
    ("resource.classification", "gte", "{{ principal.clearance }}", True),
    ("resource.sensitivity", "lte", "{{principal.max_sensitivity}}", True),
    ("resource.sensitivity", "lte", "{{principal.attributes.clearance}}", "error"),
    ("resource.domain", "eq", "{{principal.department}}", True),
    ("principal.groups", "contains", "{{resource.domain}}", True),
    ("resource.labels", "contains", "{{principal.groups}}", "error"),
    ("resource.classification", "eq", "{{principal.nickname}}", "error"),
    ("resource.owner", "eq", "{{relation.editor}}", "error"),
    ("resource.owner", "eq", "{{principal.external_id}", "error"),
]


@pytest.mark.parametrize(("field", "operator", "value", "expected"), REFERENCE_CASES)
def test_reference_to_other_side(field, operator, value, expected):
    assert outcome(condition(field, operator, value)) == expected


def test_unowned_resource_is_not_owner_match():
    unowned = Resource(
        external_id="x.md", classification="public", sensitivity="low", labels=[]
    )
    rule = policy(condition("resource.owner", "eq", "{{principal.external_id}}"))

    assert decide([rule], CAROL, unowned).allowed is False


# --- effects, priorities, selectors ----------------------------------------------

MATCHES = condition("resource.labels", "contains", "finance")
NO_MATCH = condition("resource.labels", "contains", "hr")


def test_rule_effect_overrides_policy_effect():
    mixed = policy(
        rules=[
            {"conditions": [MATCHES]},
            {"effect": "deny", "conditions": [condition("principal.floor", "eq", 3)]},
        ]
    )

    decision = decide([mixed], CAROL, REPORT)

    assert decision.allowed is False
    assert decision.reason == "policy_denied"


def test_rule_without_effect_takes_policy_effect():
    denying = policy(MATCHES, effect=Effect.DENY)

    assert decide([denying], CAROL, REPORT).allowed is False


def test_deny_overrides_higher_priority_allow():
    mixed = policy(
        rules=[
            {"priority": 100, "conditions": [MATCHES]},
            {"priority": -5, "effect": "deny", "conditions": [MATCHES]},
        ]
    )

    assert decide([mixed], CAROL, REPORT).allowed is False


@pytest.mark.parametrize("deny_first", [True, False])
def test_deny_overrides_allow_across_policies(deny_first):
    allowing = policy(MATCHES, name="allow")
    denying = policy(MATCHES, effect=Effect.DENY, name="deny")
    policies = [denying, allowing] if deny_first else [allowing, denying]

    decision = decide(policies, CAROL, REPORT)

    assert decision.allowed is False
    assert decision.policy_id == str(denying.id)


def test_higher_priority_allow_is_credited():
    first = policy(MATCHES, name="first")
    second = policy(rules=[{"priority": 5, "conditions": [MATCHES]}], name="second")

    decision = decide([first, second], CAROL, REPORT)

    assert decision.allowed is True
    assert decision.policy_id == str(second.id)
    assert decision.matched == [str(second.id), str(first.id)]


def test_equal_priority_credits_older_policy():
    first = policy(MATCHES, name="first")
    second = policy(MATCHES, name="second")

    decision = decide([second, first], CAROL, REPORT)

    assert decision.policy_id == str(first.id)


@pytest.mark.parametrize(
    "policies",
    [
        [],
        [policy(NO_MATCH)],
        [policy(MATCHES, effect=Effect.DENY, selectors=[NO_MATCH])],
    ],
)
def test_default_is_deny(policies):
    decision = decide(policies, CAROL, REPORT)

    assert decision.allowed is False
    assert decision.reason == "no_matching_policy"


def test_selector_limits_allow_policy():
    scoped = policy(
        condition("principal.department", "eq", "finance"),
        selectors=[condition("resource.domain", "eq", "finance")],
    )
    handbook = Resource(
        external_id="pto.md",
        classification="public",
        sensitivity="low",
        domain="hr",
        labels=[],
    )

    assert decide([scoped], CAROL, REPORT).allowed is True
    assert decide([scoped], CAROL, handbook).allowed is False


def test_selector_limits_deny_policy():
    restricted_only = policy(
        condition("principal.clearance", "ne", "restricted"),
        effect=Effect.DENY,
        selectors=[condition("resource.classification", "eq", "restricted")],
    )
    allowing = policy(MATCHES)

    assert decide([restricted_only, allowing], CAROL, REPORT).allowed is True


def test_selector_with_level_operator():
    scoped = policy(
        MATCHES, selectors=[condition("resource.sensitivity", "gte", "critical")]
    )

    assert decide([scoped], CAROL, REPORT).allowed is False


@pytest.mark.parametrize(
    ("rules", "selectors", "named"),
    [
        (
            [{"conditions": [MATCHES]}],
            [condition("principal.roles", "eq", [])],
            "selector",
        ),
        ([{"conditions": [MATCHES]}], "all", "resource_selectors"),
        ([{"conditions": [MATCHES], "priority": True}], [], "priority"),
        ([{"conditions": [MATCHES], "priority": 10**9}], [], "priority"),
        ([{"conditions": [MATCHES], "description": 5}], [], "description"),
        ([{"conditions": [condition("relation.owner", "in", [True])]}], [], "relation"),
        ([{"conditions": [condition("relation.a.b", "eq", True)]}], [], "relation.a.b"),
    ],
)
def test_invalid_definitions_are_rejected(rules, selectors, named):
    with pytest.raises(PolicyDefinitionError, match=named):
        validate_policy(rules, selectors, "allow")


def test_rule_with_all_keys_is_valid():
    validate_policy(
        [
            {
                "id": "r1",
                "description": "Finance reads its own",
                "effect": "allow",
                "priority": 10,
                "conditions": [MATCHES],
            }
        ],
        [condition("resource.classification", "lte", "confidential")],
        "deny",
    )


# --- the database: statuses, relationships, saving ---------------------------------


def create_policy(organization, *conditions, **fields):
    fields.setdefault("status", PolicyStatus.ACTIVE)
    fields.setdefault("effect", Effect.ALLOW)
    fields.setdefault("name", "Test policy")
    rules = fields.pop("rules", [{"conditions": list(conditions)}])
    return Policy.objects.create(organization=organization, rules=rules, **fields)


def retrieve(demo, principal, query=SALARY_QUERY, top_k=10):
    return execute_retrieval(
        demo.organization, principal, demo.connector, query, top_k, "keyword"
    )


def granted(result):
    return {scored.chunk.resource.external_id for scored in result.allowed}


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("status", "enforced"),
    [
        (PolicyStatus.DRAFT, False),
        (PolicyStatus.ARCHIVED, False),
        (PolicyStatus.ACTIVE, True),
    ],
)
def test_only_active_policies_are_enforced(demo, status, enforced):
    create_policy(
        demo.organization,
        condition("resource.labels", "contains", "compensation"),
        status=status,
    )

    result = retrieve(demo, demo.bob)

    assert ("salary-bands.md" in granted(result)) is enforced


@pytest.mark.django_db
def test_loaded_policies_are_ordered_by_creation(demo):
    evaluator = PolicyEvaluator.load(demo.organization, demo.alice)

    stamps = [(p.created_at, str(p.id)) for p in evaluator.policies]
    assert stamps == sorted(stamps)


@pytest.mark.django_db
def test_relationship_change_applies_next_request(demo):
    create_policy(
        demo.organization,
        condition("relation.editor", "eq", True),
        name="Editors read what they edit",
        type=Policy.Type.REBAC,
    )
    salary = demo.connector.resources.get(external_id="salary-bands.md")

    before = retrieve(demo, demo.bob)
    relationship = Relationship.objects.create(
        organization=demo.organization,
        subject=demo.bob,
        relation_name="editor",
        object=salary,
    )
    while_related = retrieve(demo, demo.bob)
    relationship.delete()
    after = retrieve(demo, demo.bob)

    assert "salary-bands.md" not in granted(before)
    assert "salary-bands.md" in granted(while_related)
    assert "salary-bands.md" not in granted(after)


@pytest.mark.django_db
def test_relationship_of_other_principal_ignored(demo):
    create_policy(demo.organization, condition("relation.editor", "eq", True))
    salary = demo.connector.resources.get(external_id="salary-bands.md")
    Relationship.objects.create(
        organization=demo.organization,
        subject=demo.alice,
        relation_name="editor",
        object=salary,
    )

    assert "salary-bands.md" not in granted(retrieve(demo, demo.bob))


@pytest.mark.django_db
def test_model_clean_rejects_unknown_field(demo):
    broken = Policy(
        organization=demo.organization,
        name="Broken",
        effect=Effect.ALLOW,
        rules=[{"conditions": [condition("resource.size", "eq", 1)]}],
    )

    with pytest.raises(ValidationError) as raised:
        broken.full_clean()

    assert "rules" in raised.value.message_dict


@pytest.mark.django_db
def test_admin_rejects_invalid_policy(demo):
    admin = get_user_model().objects.create_superuser("root", password="root-pw")
    client = Client()
    client.force_login(admin)
    form = {
        "organization": str(demo.organization.pk),
        "name": "From the admin",
        "description": "",
        "type": "abac",
        "status": "active",
        "effect": "allow",
        "resource_selectors": "[]",
    }

    rejected = client.post(
        "/admin/retrieval/policy/add/",
        {
            **form,
            "rules": '[{"conditions": [{"field": "resource.size", '
            '"operator": "eq", "value": 1}]}]',
        },
    )
    accepted = client.post(
        "/admin/retrieval/policy/add/",
        {
            **form,
            "rules": '[{"conditions": [{"field": "resource.labels", '
            '"operator": "contains", "value": "hr"}]}]',
        },
    )

    assert rejected.status_code == 200
    assert b"resource.size" in rejected.content
    assert accepted.status_code == 302
    assert Policy.objects.filter(name="From the admin").count() == 1


# --- errors deny the whole retrieval -------------------------------------------------


def assert_error_deny(result, reason_part):
    """Check every trace of an error_deny: result, Retrieval row, audit event."""
    assert result.decision == "error_deny"
    assert result.allowed == []
    assert reason_part in result.error
    record = Retrieval.objects.get(id=result.record.id)
    assert record.decision == "error_deny"
    assert record.allowed_chunks == 0
    assert reason_part in record.reason
    event = AuditEvent.objects.get(retrieval=record)
    assert event.event_type == AuditEvent.Type.RETRIEVAL_DENIED
    assert event.decision == "error_deny"
    assert reason_part in event.details["reason"]
    assert event.details["allowed_resource_ids"] == []


@pytest.mark.django_db
def test_missing_attribute_denies_retrieval(demo):
    create_policy(demo.organization, condition("principal.nickname", "eq", "al"))

    result = retrieve(demo, demo.alice, "revenue third quarter")

    assert_error_deny(result, "nickname")
    assert result.error_code == "POLICY_EVALUATION_FAILED"


@pytest.mark.django_db
def test_bad_condition_denies_retrieval(demo):
    # Saved without validation, as a row written by an older version might be.
    create_policy(
        demo.organization, condition("resource.classification", "in", "public")
    )

    result = retrieve(demo, demo.alice, "revenue third quarter")

    assert_error_deny(result, "'in' needs a list value")


@pytest.mark.django_db
def test_wrong_value_type_denies_retrieval(demo):
    # Valid when saved, but the owner of an unowned document is null.
    create_policy(demo.organization, condition("resource.owner", "contains", "alice"))

    result = retrieve(demo, demo.bob, "pto request paid time")

    assert_error_deny(result, "'contains' needs a list or text field")


def corrupt_rules(policy, raw_json):
    """Overwrite a policy's rules column with `raw_json`, bypassing Django."""
    cast = "CAST(%s AS jsonb)" if connection.vendor == "postgresql" else "%s"
    policy_id = Policy._meta.pk.get_db_prep_value(policy.pk, connection)
    with connection.cursor() as cursor:
        cursor.execute(
            f"UPDATE retrieval_policy SET rules = {cast} WHERE id = %s",
            [raw_json, policy_id],
        )


@pytest.mark.django_db
@pytest.mark.parametrize(
    "raw_json",
    ['"everyone may read"', '[{"conditions": 7}]', '[{"conditions": [{"f": 1}]}]'],
)
def test_corrupted_rules_deny_retrieval(demo, raw_json):
    corrupted = create_policy(demo.organization, MATCHES)
    corrupt_rules(corrupted, raw_json)

    result = retrieve(demo, demo.alice, "revenue third quarter")

    assert_error_deny(result, str(corrupted.id))


@pytest.mark.django_db
def test_unreadable_rules_deny_retrieval(demo):
    if connection.vendor != "sqlite":
        pytest.skip("only SQLite can store text that is not JSON in a JSON column")
    corrupted = create_policy(demo.organization, MATCHES)
    with connection.cursor() as cursor:
        cursor.execute("PRAGMA ignore_check_constraints = ON")
        try:
            corrupt_rules(corrupted, "[{broken")
        finally:
            cursor.execute("PRAGMA ignore_check_constraints = OFF")

    result = retrieve(demo, demo.alice, "revenue third quarter")

    # Django hands back text it cannot parse as JSON as a string.
    assert_error_deny(result, str(corrupted.id))


@pytest.mark.django_db
def test_policy_store_failure_denies_retrieval(demo):
    # The rename is rolled back with the test's transaction on both databases.
    with connection.cursor() as cursor:
        cursor.execute("ALTER TABLE retrieval_policy RENAME TO retrieval_policy_away")

    result = retrieve(demo, demo.alice, "revenue third quarter")

    assert_error_deny(result, "reading policies failed")
    assert result.error_code == "POLICY_STORE_FAILED"


@pytest.mark.django_db
def test_time_budget_denies_retrieval(demo, settings):
    settings.GATECO_POLICY_TIME_BUDGET_MS = 0

    result = retrieve(demo, demo.alice, "revenue third quarter")

    assert_error_deny(result, "time budget")
    assert result.error_code == "POLICY_TIME_BUDGET_EXCEEDED"


@pytest.mark.django_db
def test_budget_applies_only_when_evaluating(demo, settings):
    settings.GATECO_POLICY_TIME_BUDGET_MS = 0

    result = retrieve(demo, demo.alice, "xylophone")

    assert result.candidates == 0
    assert result.decision == "denied"


@pytest.mark.django_db
def test_unresolvable_metadata_denies_chunk(demo):
    Resource.objects.filter(
        connector=demo.connector, external_id="pto-policy.md"
    ).update(classification="secret")

    result = retrieve(demo, demo.bob, "paid time off request")

    reasons = {s.chunk.resource.external_id: s.reason for s in result.denied}
    assert reasons["pto-policy.md"] == "metadata_unresolved"
    assert "pto-policy.md" not in granted(result)
    assert result.decision != "error_deny"
