"""Policy evaluation: deny by default, deny overrides allow, fail closed.

A decision is made per resource. Any error while evaluating (an unknown field,
a missing principal attribute, a malformed rule) raises PolicyEvaluationError,
and the caller denies the whole retrieval rather than guess.
"""

import re
from dataclasses import dataclass, field

from .models import Classification, Effect, PrincipalStatus

LEVELS = {
    Classification.PUBLIC: 0,
    Classification.INTERNAL: 1,
    Classification.CONFIDENTIAL: 2,
    Classification.RESTRICTED: 3,
}
OPERATORS = frozenset({"eq", "ne", "in", "contains", "lte", "gte"})
RESOURCE_FIELDS = frozenset(
    {"classification", "labels", "owner", "title", "external_id"}
)
PRINCIPAL_BUILTIN_FIELDS = frozenset({"id", "external_id", "email", "roles", "groups"})
TEMPLATE = re.compile(r"^\{\{\s*(principal\.[A-Za-z0-9_]+)\s*\}\}$")


class PolicyEvaluationError(Exception):
    """A policy could not be evaluated; the retrieval must be denied."""


class PolicyDefinitionError(ValueError):
    """A policy's rules are malformed; it is rejected when saved."""


@dataclass
class Decision:
    allowed: bool
    reason: str
    policy_id: str | None = None
    matched: list = field(default_factory=list)


def validate_rules(rules):
    """Raise PolicyDefinitionError naming the first malformed part of `rules`."""
    if not isinstance(rules, list) or not rules:
        raise PolicyDefinitionError("rules must be a non-empty list of rules.")
    for rule_number, rule in enumerate(rules, start=1):
        conditions = rule.get("conditions") if isinstance(rule, dict) else None
        if not isinstance(conditions, list) or not conditions:
            raise PolicyDefinitionError(
                f"rule {rule_number} needs a non-empty 'conditions' list."
            )
        # A rule has no effect or negation of its own, so any other key is a
        # mistake that would otherwise be ignored.
        if set(rule) != {"conditions"}:
            raise PolicyDefinitionError(
                f"rule {rule_number} has unknown keys "
                f"{sorted(set(rule) - {'conditions'})}; a rule contains only "
                "'conditions'."
            )
        for condition in conditions:
            _validate_condition(rule_number, condition)


def _validate_condition(rule_number, condition):
    if not isinstance(condition, dict) or set(condition) != {
        "field",
        "operator",
        "value",
    }:
        raise PolicyDefinitionError(
            f"rule {rule_number}: each condition is an object with exactly "
            "'field', 'operator' and 'value'."
        )
    field_name = condition["field"]
    if not _is_known_field(field_name):
        raise PolicyDefinitionError(
            f"rule {rule_number}: unknown field {field_name!r}; use resource.<"
            f"{'|'.join(sorted(RESOURCE_FIELDS))}> or principal.<name>."
        )
    if condition["operator"] not in OPERATORS:
        raise PolicyDefinitionError(
            f"rule {rule_number}: unknown operator {condition['operator']!r}; use "
            f"one of {', '.join(sorted(OPERATORS))}."
        )
    value = condition["value"]
    if isinstance(value, str) and "{{" in value and not TEMPLATE.match(value):
        raise PolicyDefinitionError(
            f"rule {rule_number}: value {value!r} is not a valid "
            "{{principal.<name>}} reference."
        )


def _is_known_field(name):
    if not isinstance(name, str):
        return False
    side, _, attribute = name.partition(".")
    if side == "resource":
        return attribute in RESOURCE_FIELDS
    return side == "principal" and bool(re.fullmatch(r"[A-Za-z0-9_]+", attribute))


def principal_facts(principal):
    facts = {
        "id": str(principal.id),
        "external_id": principal.external_id,
        "email": principal.email,
        "roles": list(principal.roles),
        "groups": list(principal.groups),
    }
    for key, value in principal.attributes.items():
        facts.setdefault(key, value)
    return facts


def resource_facts(resource):
    return {
        "classification": resource.classification,
        "labels": list(resource.labels),
        "owner": resource.owner.external_id if resource.owner_id else None,
        "title": resource.title,
        "external_id": resource.external_id,
    }


def decide(policies, principal, resource):
    """Return the Decision for one principal on one resource.

    `policies` are the organization's active policies. Raises
    PolicyEvaluationError when any condition cannot be evaluated.
    """
    if principal.status != PrincipalStatus.ACTIVE:
        return Decision(False, "principal_inactive")

    subject = principal_facts(principal)
    target = resource_facts(resource)
    allowed_by = None
    for policy in policies:
        if not _policy_matches(policy, subject, target):
            continue
        if policy.effect == Effect.DENY:
            return Decision(False, "policy_denied", str(policy.id))
        allowed_by = allowed_by or str(policy.id)

    if allowed_by:
        return Decision(True, "policy_allowed", allowed_by)
    return Decision(False, "no_matching_policy")


def _policy_matches(policy, subject, target):
    try:
        return any(
            all(_holds(condition, subject, target) for condition in rule["conditions"])
            for rule in policy.rules
        )
    except PolicyEvaluationError as error:
        raise PolicyEvaluationError(f"policy {policy.id}: {error}") from None
    except (KeyError, TypeError, AttributeError) as error:
        raise PolicyEvaluationError(
            f"policy {policy.id} is malformed: {type(error).__name__}"
        ) from None


def _lookup(field_name, subject, target):
    side, _, attribute = field_name.partition(".")
    facts = {"principal": subject, "resource": target}.get(side)
    if facts is None or attribute not in facts:
        raise PolicyEvaluationError(f"{field_name} is not available")
    return facts[attribute]


def _holds(condition, subject, target):
    left = _lookup(condition["field"], subject, target)
    right = condition["value"]
    if isinstance(right, str):
        reference = TEMPLATE.match(right)
        if reference:
            right = _lookup(reference.group(1), subject, target)

    operator = condition["operator"]
    if operator == "eq":
        return left == right
    if operator == "ne":
        return left != right
    if operator == "in":
        if not isinstance(right, list):
            raise PolicyEvaluationError("'in' needs a list value")
        if isinstance(left, list):
            return any(item in right for item in left)
        return left in right
    if operator == "contains":
        if not isinstance(left, (list, str)):
            raise PolicyEvaluationError("'contains' needs a list or text field")
        return right in left
    if operator in ("lte", "gte"):
        left_level, right_level = _level(left), _level(right)
        if operator == "lte":
            return left_level <= right_level
        return left_level >= right_level
    raise PolicyEvaluationError(f"unknown operator {operator!r}")


def _level(value):
    if value not in LEVELS:
        raise PolicyEvaluationError(f"{value!r} is not a classification level")
    return LEVELS[value]
