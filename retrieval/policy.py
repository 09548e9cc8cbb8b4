"""Policy evaluation: deny by default, deny overrides allow, fail closed.

A policy applies to the resources its `resource_selectors` pick (every
resource when the list is empty). Each rule is `{"conditions": [...],
"effect"?, "priority"?, "description"?, "id"?}`: it matches when all of its
conditions hold, and a rule without an effect takes the policy's effect.

For one principal and one resource, the rules of every applicable active
policy are evaluated together in priority order (highest first, ties broken by
policy order, then rule order). The first matching deny rule denies. Otherwise
the first matching allow rule allows. Otherwise the resource is denied.

Any error while evaluating (a missing principal attribute, a malformed stored
rule, a value of the wrong type, the time budget running out) raises
PolicyEvaluationError, and the caller denies the whole retrieval rather than
guess.
"""

import re
import time
from dataclasses import dataclass, field

from django.db import DatabaseError

from gateco.db import serialized_atomic

from .models import (
    Classification,
    Effect,
    Policy,
    PolicyStatus,
    PrincipalStatus,
    Relationship,
    Sensitivity,
)

# Each scale lists its levels from lowest to highest; lte and gte compare
# positions within one scale. The two scales share no level name.
LEVEL_SCALES = (
    tuple(Classification.values),
    tuple(Sensitivity.values),
)
LEVELS = {
    level: position for scale in LEVEL_SCALES for position, level in enumerate(scale)
}
# LEVEL_SCALES as {level: position} maps, for lookups while deciding.
LEVEL_POSITIONS = tuple(
    {level: position for position, level in enumerate(scale)}
    for scale in LEVEL_SCALES
)
OPERATORS = frozenset({"eq", "ne", "in", "contains", "lte", "gte"})
RESOURCE_FIELDS = frozenset(
    {
        "classification",
        "sensitivity",
        "domain",
        "labels",
        "owner",
        "external_id",
        "title",
    }
)
RESOURCE_LEVEL_FIELDS = {
    "classification": tuple(Classification.values),
    "sensitivity": tuple(Sensitivity.values),
}
PRINCIPAL_BUILTIN_FIELDS = frozenset({"id", "external_id", "email", "roles", "groups"})
RULE_KEYS = frozenset({"conditions", "effect", "priority", "description", "id"})
CONDITION_KEYS = frozenset({"field", "operator", "value"})
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,100}")
RELATION_NAME_PATTERN = re.compile(r"[A-Za-z0-9_:-]{1,100}")
TEMPLATE = re.compile(r"^\{\{\s*([A-Za-z0-9_.:-]+)\s*\}\}$")
MAX_PRIORITY = 1_000_000
FIELD_HELP = (
    "use resource.<classification|sensitivity|domain|labels|owner|external_id|"
    "title>, principal.<id|external_id|email|roles|groups>, "
    "principal.attributes.<name>, principal.<name> or relation.<name>"
)


class PolicyEvaluationError(Exception):
    """A policy could not be evaluated, so the retrieval must be denied.

    `code` is the stable code reported to the client.
    """

    def __init__(self, message, code="POLICY_EVALUATION_FAILED"):
        super().__init__(message)
        self.code = code


class PolicyDefinitionError(ValueError):
    """A policy's rules or selectors are malformed; it is rejected when saved.

    `field` names the policy field at fault: "rules" or "resource_selectors".
    """

    def __init__(self, message, field="rules"):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class FieldRef:
    """A parsed field name. `side` is resource, principal, attribute or relation."""

    side: str
    key: str
    name: str


@dataclass(frozen=True)
class Condition:
    field: FieldRef
    operator: str
    value: object
    # Set when the value is a `{{side.field}}` reference instead of a literal.
    reference: FieldRef | None = None


@dataclass
class CompiledRule:
    policy: Policy
    policy_position: int
    rule_position: int
    effect: str
    priority: int
    conditions: list
    # One callable per condition, `check(target, relations) -> bool`, built by
    # PolicyEvaluator for its principal.
    checks: tuple = ()


@dataclass
class Decision:
    allowed: bool
    reason: str
    policy_id: str | None = None
    matched: list = field(default_factory=list)


# --- definitions: parsing and validation -------------------------------------


def parse_field(name):
    """Return the FieldRef for a condition's field, or raise PolicyDefinitionError."""
    if not isinstance(name, str):
        raise PolicyDefinitionError(f"field {name!r} is not a string; {FIELD_HELP}.")
    side, _, key = name.partition(".")
    if side == "resource" and key in RESOURCE_FIELDS:
        return FieldRef("resource", key, name)
    if side == "relation" and RELATION_NAME_PATTERN.fullmatch(key):
        return FieldRef("relation", key, name)
    if side == "principal":
        if key in PRINCIPAL_BUILTIN_FIELDS:
            return FieldRef("principal", key, name)
        prefix, _, attribute = key.partition(".")
        if prefix == "attributes" and NAME_PATTERN.fullmatch(attribute):
            return FieldRef("attribute", attribute, name)
        if key != "attributes" and NAME_PATTERN.fullmatch(key):
            return FieldRef("attribute", key, name)
    raise PolicyDefinitionError(f"unknown field {name!r}; {FIELD_HELP}.")


def compile_condition(condition, where, *, resource_only=False):
    """Return the Condition for one stored condition, or raise PolicyDefinitionError.

    `where` names the condition's place in messages, such as "rule 2".
    """
    if not isinstance(condition, dict) or set(condition) != CONDITION_KEYS:
        raise PolicyDefinitionError(
            f"{where}: each condition is an object with exactly 'field', "
            "'operator' and 'value'."
        )
    try:
        field_ref = parse_field(condition["field"])
    except PolicyDefinitionError as error:
        raise PolicyDefinitionError(f"{where}: {error}") from None
    if resource_only and field_ref.side != "resource":
        raise PolicyDefinitionError(
            f"{where}: a resource selector must name a resource.<field>, not "
            f"{field_ref.name!r}."
        )
    operator = condition["operator"]
    if operator not in OPERATORS:
        raise PolicyDefinitionError(
            f"{where}: unknown operator {operator!r}; use one of "
            f"{', '.join(sorted(OPERATORS))}."
        )

    value = condition["value"]
    reference = None
    if isinstance(value, str) and "{{" in value:
        match = TEMPLATE.match(value)
        try:
            reference = parse_field(match.group(1)) if match else None
        except PolicyDefinitionError:
            reference = None
        if reference is None or reference.side == "relation":
            raise PolicyDefinitionError(
                f"{where}: value {value!r} is not a valid reference; use "
                "{{principal.<name>}} or {{resource.<field>}}."
            )
    compiled = Condition(field_ref, operator, value, reference)
    _check_literal_types(compiled, where)
    return compiled


def _check_literal_types(condition, where):
    """Reject operator and value combinations that can never be evaluated."""
    field_ref, operator, value = condition.field, condition.operator, condition.value
    literal = condition.reference is None
    if field_ref.side == "relation":
        if operator not in ("eq", "ne") or not (literal and isinstance(value, bool)):
            raise PolicyDefinitionError(
                f"{where}: {field_ref.name} is true or false; compare it with eq or "
                "ne and the value true or false."
            )
        return
    if operator == "in" and literal and not isinstance(value, list):
        raise PolicyDefinitionError(
            f'{where}: \'in\' needs a list value, such as ["a", "b"].'
        )
    if operator == "contains" and literal and isinstance(value, (list, dict)):
        raise PolicyDefinitionError(
            f"{where}: 'contains' takes one value; use 'in' to match any of several."
        )
    if operator in ("lte", "gte"):
        if field_ref.side == "resource" and field_ref.key not in RESOURCE_LEVEL_FIELDS:
            raise PolicyDefinitionError(
                f"{where}: '{operator}' compares levels, and {field_ref.name} is not "
                "resource.classification or resource.sensitivity."
            )
        if field_ref.side == "principal":
            raise PolicyDefinitionError(
                f"{where}: '{operator}' compares levels, and {field_ref.name} is not "
                "a level."
            )
        if literal:
            scale = RESOURCE_LEVEL_FIELDS.get(field_ref.key)
            allowed_levels = scale if field_ref.side == "resource" else tuple(LEVELS)
            if value not in allowed_levels:
                raise PolicyDefinitionError(
                    f"{where}: {value!r} is not a level for {field_ref.name}; use one "
                    f"of {', '.join(allowed_levels)}."
                )


def compile_rules(rules, policy_effect=None):
    """Return `[(effect, priority, [Condition])]` for `rules`, or raise.

    A rule's effect defaults to `policy_effect`. Raises PolicyDefinitionError
    naming the first malformed part.
    """
    if not isinstance(rules, list) or not rules:
        raise PolicyDefinitionError("rules must be a non-empty list of rules.")
    compiled = []
    for rule_number, rule in enumerate(rules, start=1):
        where = f"rule {rule_number}"
        if not isinstance(rule, dict):
            raise PolicyDefinitionError(
                f"{where} must be an object with a 'conditions' list."
            )
        unknown = set(rule) - RULE_KEYS
        if unknown:
            raise PolicyDefinitionError(
                f"{where} has unknown keys {sorted(unknown)}; a rule contains "
                f"{', '.join(sorted(RULE_KEYS))}."
            )
        conditions = rule.get("conditions")
        if not isinstance(conditions, list) or not conditions:
            raise PolicyDefinitionError(f"{where} needs a non-empty 'conditions' list.")
        effect = rule.get("effect", policy_effect)
        if "effect" in rule and effect not in Effect.values:
            raise PolicyDefinitionError(
                f"{where}: effect {rule['effect']!r} is invalid; use allow or deny."
            )
        priority = rule.get("priority", 0)
        if (
            not isinstance(priority, int)
            or isinstance(priority, bool)
            or abs(priority) > MAX_PRIORITY
        ):
            raise PolicyDefinitionError(
                f"{where}: priority {priority!r} is invalid; use a whole number "
                f"between -{MAX_PRIORITY} and {MAX_PRIORITY}."
            )
        for key in ("description", "id"):
            if key in rule and not isinstance(rule[key], (str, type(None))):
                raise PolicyDefinitionError(f"{where}: {key} must be a string.")
        compiled.append(
            (
                effect,
                priority,
                [compile_condition(condition, where) for condition in conditions],
            )
        )
    return compiled


def compile_selectors(selectors):
    """Return the Conditions of `resource_selectors`, or raise PolicyDefinitionError."""
    if not isinstance(selectors, list):
        raise PolicyDefinitionError(
            "resource_selectors must be a list of conditions.",
            field="resource_selectors",
        )
    try:
        return [
            compile_condition(selector, f"selector {number}", resource_only=True)
            for number, selector in enumerate(selectors, start=1)
        ]
    except PolicyDefinitionError as error:
        raise PolicyDefinitionError(str(error), field="resource_selectors") from None


def validate_rules(rules):
    """Raise PolicyDefinitionError naming the first malformed part of `rules`."""
    compile_rules(rules)


def validate_policy(rules, resource_selectors, effect):
    """Raise PolicyDefinitionError if a policy with these parts cannot be saved."""
    if effect not in Effect.values:
        raise PolicyDefinitionError(
            f"effect {effect!r} is invalid; use allow or deny.", field="effect"
        )
    compile_rules(rules, effect)
    compile_selectors(resource_selectors)


def uses_relations(policies):
    """Return True if any condition of `policies` reads relation.<name>."""
    for policy in policies:
        for rule in policy.rules if isinstance(policy.rules, list) else []:
            conditions = rule.get("conditions") if isinstance(rule, dict) else None
            for condition in conditions if isinstance(conditions, list) else []:
                name = condition.get("field") if isinstance(condition, dict) else None
                if isinstance(name, str) and name.startswith("relation."):
                    return True
    return False


# --- facts ---------------------------------------------------------------------


class MetadataUnresolved(Exception):
    """A resource's stored metadata is missing or outside its allowed values."""


def principal_facts(principal):
    return {
        "id": str(principal.id),
        "external_id": principal.external_id,
        "email": principal.email,
        "roles": list(principal.roles),
        "groups": list(principal.groups),
    }


def resource_facts(resource):
    """Return the policy facts of `resource`, or raise MetadataUnresolved."""
    if resource is None:
        raise MetadataUnresolved("the chunk has no resource")
    if resource.classification not in Classification.values:
        raise MetadataUnresolved(f"classification {resource.classification!r}")
    if resource.sensitivity not in Sensitivity.values:
        raise MetadataUnresolved(f"sensitivity {resource.sensitivity!r}")
    labels = resource.labels
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise MetadataUnresolved("labels are not a list of strings")
    return {
        "classification": resource.classification,
        "sensitivity": resource.sensitivity,
        "domain": resource.domain,
        "labels": list(labels),
        "owner": resource.owner.external_id if resource.owner_id else None,
        "title": resource.title,
        "external_id": resource.external_id,
    }


# --- evaluation ------------------------------------------------------------------


class PolicyEvaluator:
    """Decides one principal's access to resources under a fixed set of policies.

    Build it once per request: the policies and the principal's relationships
    are read when it is built, so a change to either takes effect on the next
    request. `budget_ms` caps the total time spent in `decide`; None means no
    cap, and 0 fails the first decision.
    """

    def __init__(self, policies, principal, relations=None, budget_ms=None):
        self.principal = principal
        self.policies = sorted(
            policies, key=lambda policy: (policy.created_at, str(policy.id))
        )
        self.relations = relations if relations is not None else {}
        self.budget_seconds = None if budget_ms is None else budget_ms / 1000
        self.spent_seconds = 0.0
        self.subject = principal_facts(principal)
        self.attributes = principal.attributes
        if not isinstance(self.attributes, dict):
            raise PolicyEvaluationError(
                f"principal {principal.pk} has attributes that are not an object"
            )
        self.selectors = {}
        self.selector_checks = []
        self.rules = []
        self.stats = {
            policy.id: {"allowed": 0, "denied": 0, "seconds": 0.0}
            for policy in self.policies
        }
        for position, policy in enumerate(self.policies):
            self._compile(policy, position)
        self.rules.sort(
            key=lambda rule: (-rule.priority, rule.policy_position, rule.rule_position)
        )

    @classmethod
    def load(cls, organization, principal, budget_ms=None):
        """Read the organization's active policies and the principal's relationships.

        Raises PolicyEvaluationError when the store fails or a stored policy
        is invalid.
        """
        try:
            # A savepoint, so a failed read leaves an outer transaction usable.
            with serialized_atomic():
                policies = list(
                    Policy.objects.filter(
                        organization=organization, status=PolicyStatus.ACTIVE
                    ).order_by("created_at", "id")
                )
                relations = {}
                if uses_relations(policies):
                    relations = load_relations(organization, principal)
        except (DatabaseError, ValueError, TypeError) as error:
            raise PolicyEvaluationError(
                f"reading policies failed: {type(error).__name__}: {error}",
                code="POLICY_STORE_FAILED",
            ) from None
        return cls(policies, principal, relations, budget_ms=budget_ms)

    def _compile(self, policy, position):
        try:
            self.selectors[policy.id] = compile_selectors(policy.resource_selectors)
            compiled = compile_rules(policy.rules, policy.effect)
            if policy.effect not in Effect.values:
                raise PolicyDefinitionError(f"effect {policy.effect!r} is invalid")
        except PolicyDefinitionError as error:
            raise PolicyEvaluationError(
                f"policy {policy.id} ({policy.name}) is invalid: {error}"
            ) from None
        self.selector_checks.append(
            self._compile_checks(self.selectors[policy.id])
        )
        for rule_position, (effect, priority, conditions) in enumerate(compiled):
            self.rules.append(
                CompiledRule(
                    policy,
                    position,
                    rule_position,
                    effect,
                    priority,
                    conditions,
                    self._compile_checks(conditions),
                )
            )

    # Compiling binds each condition to this evaluator's principal once, so
    # deciding a resource only reads the resource's facts and compares. The
    # checks raise the same errors, at the same point, as evaluating the
    # Condition afresh would.

    def _compile_checks(self, conditions):
        return tuple(self._compile_check(condition) for condition in conditions)

    def _compile_check(self, condition):
        compare_values = COMPARATORS.get(condition.operator)
        if compare_values is None:
            operator = condition.operator

            def compare_values(left, right):
                return compare(operator, left, right)

        left_side = condition.field.side
        reference = condition.reference
        if reference is None:
            value = condition.value
            if left_side == "resource":
                key = condition.field.key

                def check(target, relations):
                    return compare_values(target[key], value)

                return check
            if left_side != "relation":
                # The principal's side and a literal: one result for every
                # resource, computed at its first use.
                return self._compile_constant_check(
                    self._compile_lookup(condition.field), compare_values, value
                )

        left = self._compile_lookup(condition.field)
        if reference is None:
            right = _constant_lookup(condition.value)
        else:
            right = self._compile_lookup(reference)

        def check(target, relations):
            return compare_values(left(target, relations), right(target, relations))

        return check

    @staticmethod
    def _compile_constant_check(left, compare_values, value):
        results = []

        def check(target, relations):
            if not results:
                results.append(compare_values(left(target, relations), value))
            return results[0]

        return check

    def _compile_lookup(self, field_ref):
        """Return `lookup(target, relations)` for one side of a condition."""
        key = field_ref.key
        if field_ref.side == "resource":
            return lambda target, relations: target[key]
        if field_ref.side == "principal":
            return _constant_lookup(self.subject[key])
        if field_ref.side == "relation":
            return lambda target, relations: key in relations
        if key in self.attributes:
            return _constant_lookup(self.attributes[key])
        message = (
            f"{field_ref.name} is not available: principal "
            f"{self.principal.external_id!r} has no attribute {key!r}"
        )

        def missing_attribute(target, relations):
            raise PolicyEvaluationError(message)

        return missing_attribute

    def decide(self, resource):
        """Return the Decision for the principal on `resource`, or raise."""
        if self.principal.status != PrincipalStatus.ACTIVE:
            return Decision(False, "principal_inactive")
        try:
            target = resource_facts(resource)
        except MetadataUnresolved:
            return Decision(False, "metadata_unresolved")

        started = time.perf_counter()
        try:
            return self._decide(resource, target, started)
        finally:
            self.spent_seconds += time.perf_counter() - started

    def _decide(self, resource, target, started):
        self._check_budget(started)
        relations = self.relations.get(resource.pk, frozenset())
        applicable = [
            self._all_hold(policy, checks, target, relations)
            for policy, checks in zip(self.policies, self.selector_checks)
        ]

        allowed_by, matched = None, []
        for rule in self.rules:
            if not applicable[rule.policy_position]:
                continue
            self._check_budget(started)
            if not self._all_hold(rule.policy, rule.checks, target, relations):
                continue
            matched.append(str(rule.policy.id))
            if rule.effect == Effect.DENY:
                self.stats[rule.policy.id]["denied"] += 1
                return Decision(False, "policy_denied", str(rule.policy.id), matched)
            allowed_by = allowed_by or rule.policy

        if allowed_by is not None:
            self.stats[allowed_by.id]["allowed"] += 1
            return Decision(True, "policy_allowed", str(allowed_by.id), matched)
        return Decision(False, "no_matching_policy")

    def _check_budget(self, started):
        if self.budget_seconds is None:
            return
        spent = self.spent_seconds + time.perf_counter() - started
        if spent >= self.budget_seconds:
            raise PolicyEvaluationError(
                f"policy evaluation ran past its time budget of "
                f"{self.budget_seconds * 1000:g} ms",
                code="POLICY_TIME_BUDGET_EXCEEDED",
            )

    def _all_hold(self, policy, checks, target, relations):
        started = time.perf_counter()
        try:
            for check in checks:
                if not check(target, relations):
                    return False
            return True
        except PolicyEvaluationError as error:
            raise PolicyEvaluationError(
                f"policy {policy.id} ({policy.name}): {error}", code=error.code
            ) from None
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            raise PolicyEvaluationError(
                f"policy {policy.id} ({policy.name}) failed: {type(error).__name__}: "
                f"{error}"
            ) from None
        finally:
            self.stats[policy.id]["seconds"] += time.perf_counter() - started

    def trace(self):
        """Return one entry per policy: what it decided across every decision."""
        entries = []
        for policy in self.policies:
            stats = self.stats[policy.id]
            if stats["denied"]:
                decision = "deny"
            elif stats["allowed"]:
                decision = "allow"
            else:
                decision = "no_match"
            entries.append(
                {
                    "policy_id": str(policy.id),
                    "policy_name": policy.name,
                    "decision": decision,
                    "reason": (
                        f"decided {stats['allowed']} resource(s) allowed and "
                        f"{stats['denied']} denied"
                    ),
                    "duration_ms": round(stats["seconds"] * 1000, 3),
                }
            )
        return entries


def _constant_lookup(value):
    return lambda target, relations: value


def compare(operator, left, right):
    """Apply `operator` to two values, or raise PolicyEvaluationError."""
    compare_values = COMPARATORS.get(operator)
    if compare_values is None:
        raise PolicyEvaluationError(f"unknown operator {operator!r}")
    return compare_values(left, right)


def _equal(left, right):
    return left == right


def _not_equal(left, right):
    return left != right


def _in(left, right):
    if not isinstance(right, list):
        raise PolicyEvaluationError("'in' needs a list value")
    if isinstance(left, list):
        return any(item in right for item in left)
    return left in right


def _contains(left, right):
    if isinstance(right, (list, dict)):
        raise PolicyEvaluationError("'contains' takes one value, not a list")
    if isinstance(left, list):
        return right in left
    if isinstance(left, str) and isinstance(right, str):
        return right in left
    raise PolicyEvaluationError(
        f"'contains' needs a list or text field and a text value, not "
        f"{type(left).__name__} and {type(right).__name__}"
    )


def _at_most(left, right):
    left_level, right_level = _levels(left, right)
    return left_level <= right_level


def _at_least(left, right):
    left_level, right_level = _levels(left, right)
    return left_level >= right_level


COMPARATORS = {
    "eq": _equal,
    "ne": _not_equal,
    "in": _in,
    "contains": _contains,
    "lte": _at_most,
    "gte": _at_least,
}


def _levels(left, right):
    # Levels are strings, and a value of another type is in no scale. The
    # check also keeps unhashable values, such as lists, out of the lookups.
    if isinstance(left, str) and isinstance(right, str):
        for positions in LEVEL_POSITIONS:
            if left in positions and right in positions:
                return positions[left], positions[right]
    raise PolicyEvaluationError(
        f"{left!r} and {right!r} are not levels of one scale (classification: "
        f"{', '.join(LEVEL_SCALES[0])}; sensitivity: {', '.join(LEVEL_SCALES[1])})"
    )


def load_relations(organization, principal):
    """Return `{resource_id: frozenset(relation names)}` held by `principal`."""
    relations = {}
    rows = Relationship.objects.filter(
        organization=organization, subject=principal
    ).values_list("object_id", "relation_name")
    for resource_id, name in rows:
        relations.setdefault(resource_id, set()).add(name)
    return {resource_id: frozenset(names) for resource_id, names in relations.items()}


def decide(policies, principal, resource, relations=None):
    """Return the Decision for one principal on one resource.

    `policies` are the organization's active policies. Relationships are read
    from the database when any policy uses relation.<name> and `relations` is
    None. Raises PolicyEvaluationError when any condition cannot be evaluated.
    """
    if relations is None and uses_relations(policies):
        relations = load_relations(principal.organization_id, principal)
    return PolicyEvaluator(policies, principal, relations).decide(resource)
