"""Find an organization's principals and connectors by id or by name."""

import uuid

from gateco.errors import NotFound

from .models import Connector, Principal


def _as_uuid(value):
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def find_principal(organization, principal_id):
    """Return the principal with this id or external id, or raise NotFound."""
    principals = Principal.objects.filter(organization=organization)
    as_uuid = _as_uuid(principal_id)
    principal = (principals.filter(id=as_uuid).first() if as_uuid else None) or (
        principals.filter(external_id=principal_id).first()
    )
    if principal is None:
        raise NotFound(f"Principal {principal_id!r} was not found in this organization.")
    return principal


def find_connector(organization, connector_id):
    """Return the connector with this id or name, or raise NotFound."""
    connectors = Connector.objects.filter(organization=organization)
    as_uuid = _as_uuid(connector_id)
    connector = (connectors.filter(id=as_uuid).first() if as_uuid else None) or (
        connectors.filter(name=connector_id).first()
    )
    if connector is None:
        raise NotFound(f"Connector {connector_id!r} was not found in this organization.")
    return connector
