"""Property test: whatever the policies, principal and resource metadata, a
retrieval never returns a chunk that `decide()` denies, and an evaluation
error anywhere means nothing is returned.

Policies are written straight to the database without validation, so the
examples include unknown fields, wrong value types and missing attributes.
"""

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from retrieval.models import (
    Classification,
    Effect,
    Policy,
    PolicyStatus,
    Principal,
    PrincipalStatus,
    Relationship,
    Resource,
    Retrieval,
    Sensitivity,
)
from retrieval.policy import OPERATORS, PolicyEvaluationError, decide
from retrieval.search import execute_retrieval

pytestmark = pytest.mark.django_db

# Words of every demo document, so most examples have candidates to decide.
QUERY = "revenue salary incident failover acquisition request days engineering"
LABELS = ["finance", "hr", "board", "security", "engineering", "handbook"]
DEPARTMENTS = ["finance", "hr", "engineering"]
RELATIONS = ["editor", "viewer"]
FIELDS = [
    "resource.classification",
    "resource.sensitivity",
    "resource.domain",
    "resource.labels",
    "resource.owner",
    "resource.title",
    "resource.external_id",
    "principal.roles",
    "principal.groups",
    "principal.email",
    "principal.external_id",
    "principal.department",
    "principal.attributes.clearance",
    "principal.clearance",
    "relation.editor",
    "relation.viewer",
    # Unknown or often missing: these make evaluation fail.
    "principal.nickname",
    "resource.size",
]
SCALARS = [
    *Classification.values,
    *Sensitivity.values,
    *LABELS,
    "alice@acme.test",
    "bob@acme.test",
    True,
    False,
    3,
    None,
    "{{principal.clearance}}",
    "{{principal.department}}",
    "{{principal.external_id}}",
    "{{resource.owner}}",
    "{{resource.domain}}",
]

values = st.one_of(
    st.sampled_from(SCALARS), st.lists(st.sampled_from(SCALARS), max_size=3)
)
any_conditions = st.fixed_dictionaries(
    {
        "field": st.sampled_from(FIELDS),
        "operator": st.sampled_from(sorted(OPERATORS) + ["like"]),
        "value": values,
    }
)


def condition(field, operators, value_strategy):
    """A condition strategy; `operators` is one operator or a strategy of them."""
    if isinstance(operators, str):
        operators = st.just(operators)
    return st.fixed_dictionaries(
        {"field": st.just(field), "operator": operators, "value": value_strategy}
    )


# Conditions that evaluate without error, so that examples also allow.
sound_conditions = st.one_of(
    condition(
        "resource.classification",
        "in",
        st.lists(st.sampled_from(Classification.values), min_size=1, unique=True),
    ),
    condition(
        "resource.classification",
        st.sampled_from(["lte", "gte"]),
        st.sampled_from(Classification.values),
    ),
    condition("resource.sensitivity", "lte", st.sampled_from(Sensitivity.values)),
    condition("resource.labels", "contains", st.sampled_from(LABELS)),
    condition("principal.department", "eq", st.sampled_from(DEPARTMENTS)),
    condition("principal.roles", "contains", st.sampled_from(["employee", "analyst"])),
    condition("relation.editor", "eq", st.booleans()),
    condition("resource.owner", "eq", st.just("{{principal.external_id}}")),
    condition("resource.domain", "eq", st.just("{{principal.department}}")),
)
# Three sound conditions for each arbitrary one.
conditions = st.one_of(
    sound_conditions, sound_conditions, sound_conditions, any_conditions
)
rules = st.fixed_dictionaries(
    {"conditions": st.lists(conditions, min_size=1, max_size=2)},
    optional={
        "effect": st.sampled_from(Effect.values),
        "priority": st.integers(min_value=-3, max_value=3),
    },
)
policies = st.lists(
    st.fixed_dictionaries(
        {
            "effect": st.sampled_from(Effect.values),
            "status": st.sampled_from([PolicyStatus.ACTIVE] * 3 + PolicyStatus.values),
            "rules": st.lists(rules, min_size=1, max_size=2),
            "resource_selectors": st.lists(sound_conditions, max_size=1),
        }
    ),
    max_size=4,
)
principals = st.fixed_dictionaries(
    {
        "roles": st.lists(
            st.sampled_from(["employee", "analyst", "engineer"]), unique=True
        ),
        "groups": st.lists(st.sampled_from(DEPARTMENTS), unique=True),
        "status": st.sampled_from(
            [PrincipalStatus.ACTIVE] * 4 + [PrincipalStatus.SUSPENDED]
        ),
        "attributes": st.fixed_dictionaries(
            {"department": st.sampled_from(DEPARTMENTS)},
            optional={
                "clearance": st.sampled_from([*Classification.values, "unknown"])
            },
        ),
    }
)
resource_metadata = st.fixed_dictionaries(
    {
        "classification": st.sampled_from(Classification.values),
        "sensitivity": st.sampled_from(Sensitivity.values),
        "domain": st.sampled_from(["", *DEPARTMENTS]),
        "labels": st.lists(st.sampled_from(LABELS), unique=True, max_size=3),
        "owner": st.sampled_from([None, "alice", "bob"]),
    }
)


def apply_example(demo, policy_specs, principal_fields, metadata, related):
    """Replace the organization's policies, the principal and the resources'
    metadata with one example's."""
    organization = demo.organization
    Policy.objects.filter(organization=organization).delete()
    Relationship.objects.filter(organization=organization).delete()
    for number, spec in enumerate(policy_specs):
        Policy.objects.create(organization=organization, name=f"p{number}", **spec)

    Principal.objects.filter(pk=demo.bob.pk).update(**principal_fields)
    principal = Principal.objects.get(pk=demo.bob.pk)

    owners = {None: None, "alice": demo.alice, "bob": demo.bob}
    resources = list(demo.connector.resources.order_by("external_id"))
    for resource, fields in zip(resources, metadata, strict=True):
        Resource.objects.filter(pk=resource.pk).update(
            **{**fields, "owner": owners[fields["owner"]]}
        )
    for resource_number, relation in related:
        Relationship.objects.create(
            organization=organization,
            subject=principal,
            relation_name=relation,
            object=resources[resource_number % len(resources)],
        )
    return principal


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    policy_specs=policies,
    principal_fields=principals,
    metadata=st.lists(resource_metadata, min_size=6, max_size=6),
    related=st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from(RELATIONS)),
        unique=True,
        max_size=3,
    ),
    top_k=st.integers(min_value=1, max_value=8),
)
def test_retrieval_never_returns_denied_chunk(
    demo, policy_specs, principal_fields, metadata, related, top_k
):
    principal = apply_example(demo, policy_specs, principal_fields, metadata, related)

    result = execute_retrieval(
        demo.organization, principal, demo.connector, QUERY, top_k, "keyword"
    )

    active = list(
        Policy.objects.filter(
            organization=demo.organization, status=PolicyStatus.ACTIVE
        )
    )
    record = Retrieval.objects.get(pk=result.record.pk)
    # Shown by --hypothesis-show-statistics, to check both branches run.
    event(f"outcome {result.outcome}")
    if result.decision == "error_deny":
        assert result.allowed == []
        assert record.allowed_chunks == 0
        assert record.reason
        return

    # Every decided candidate was decidable; otherwise the retrieval would
    # have been denied as a whole.
    for scored in result.evaluated:
        resource = Resource.objects.select_related("owner").get(
            pk=scored.chunk.resource_id
        )
        try:
            decision = decide(active, principal, resource)
        except PolicyEvaluationError as error:
            pytest.fail(f"{resource.external_id} errors ({error}) but was not denied")
        granted = any(scored is allowed for allowed in result.allowed)
        assert decision.allowed is granted, resource.external_id
    assert len(result.allowed) <= top_k
    assert record.allowed_chunks == len(result.allowed)
