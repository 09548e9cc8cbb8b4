"""Find an organization's principals, connectors, policies and resources.

Every lookup goes through `orgs.access.get_owned_or_404`, so a row of another
organization is reported exactly like a row that does not exist.
"""

import uuid

from django.db.models import Case, Q, Value, When
from django.http import Http404

from gateco.errors import NotFound
from orgs.access import get_owned_or_404

from .models import Connector, Policy, Principal, Relationship, Resource


def as_uuid(value):
    """Return `value` as a UUID, or None when it is not one."""
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _by_id_or_name(queryset, organization, value, name_field, message, via):
    """Return the row whose id, or else whose `name_field`, equals `value`."""
    identifier = as_uuid(value)
    matches = Q(**{name_field: value})
    if identifier is not None:
        matches |= Q(id=identifier)
        # An id match wins over a name that happens to spell another row's id.
        queryset = queryset.order_by(
            Case(When(id=identifier, then=Value(0)), default=Value(1))
        )
    try:
        return get_owned_or_404(queryset.filter(matches), organization, via=via)
    except Http404:
        raise NotFound(message) from None


def _by_id(queryset, organization, value, message, via="organization"):
    identifier = as_uuid(value)
    if identifier is None:
        raise NotFound(message)
    try:
        return get_owned_or_404(queryset, organization, via=via, id=identifier)
    except Http404:
        raise NotFound(message) from None


def find_principal(organization, principal_id):
    """Return the principal with this id or external id, or raise NotFound."""
    return _by_id_or_name(
        Principal.objects.all(),
        organization,
        principal_id,
        "external_id",
        f"Principal {principal_id!r} was not found in this organization.",
        via="organization",
    )


def find_connector(organization, connector_id):
    """Return the connector with this id or name, or raise NotFound."""
    return _by_id_or_name(
        Connector.objects.all(),
        organization,
        connector_id,
        "name",
        f"Connector {connector_id!r} was not found in this organization.",
        via="organization",
    )


def find_policy(organization, policy_id):
    """Return the policy with this id, or raise NotFound."""
    return _by_id(
        Policy.objects.all(),
        organization,
        policy_id,
        f"Policy {policy_id!r} was not found in this organization.",
    )


def find_relationship(organization, relationship_id):
    """Return the relationship with this id, or raise NotFound."""
    return _by_id(
        Relationship.objects.select_related("subject", "object"),
        organization,
        relationship_id,
        f"Relationship {relationship_id!r} was not found in this organization.",
    )


def find_resource(organization, resource_id):
    """Return the resource with this id in any of the organization's connectors."""
    return _by_id(
        Resource.objects.select_related("connector", "owner"),
        organization,
        resource_id,
        f"Resource {resource_id!r} was not found in this organization.",
        via="connector__organization",
    )
