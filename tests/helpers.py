"""Helpers shared by the test modules."""

import os
import socket
from urllib.parse import urlparse

import pytest
from django.contrib.auth import get_user_model

from orgs.models import Membership, Role

SHARED_FALLBACK_KEY = "sk-shared-fallback-key-0000000000000000SHRD"


def make_user(username, organization=None, role=Role.MEMBER, **fields):
    user = get_user_model().objects.create_user(
        username=username, password=f"{username}-password", **fields
    )
    if organization is not None:
        Membership.objects.create(user=user, organization=organization, role=role)
    return user


def ask(
    client,
    demo,
    principal,
    query="What was revenue in the third quarter?",
    headers=None,
    **fields,
):
    """POST a Grounded Answer request and return the response.

    `fields` are added to the request body, `headers` sent as HTTP headers.
    """
    body = {
        "query": query,
        "principal_id": principal.external_id,
        "connector_id": str(demo.connector.id),
        **fields,
    }
    return client.post("/api/answers/execute", body, format="json", headers=headers)


def require_service(name, url):
    """Skip the test when `url` does not accept TCP connections, or fail in CI.

    GATECO_REQUIRE_SERVICES=1 (set by .ci/run) turns a missing service into a
    failure, so CI cannot pass by skipping the tests that need it.
    """
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=1):
            return
    except OSError as error:
        message = f"{name} at {parsed.hostname}:{parsed.port} is not reachable ({error})"
    if os.environ.get("GATECO_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " and GATECO_REQUIRE_SERVICES=1 requires it.")
    pytest.skip(message + "; set GATECO_REQUIRE_SERVICES=1 to fail instead.")


def require_postgresql():
    """Skip unless the tests run on PostgreSQL, or fail in CI."""
    from django.db import connection

    if connection.vendor == "postgresql":
        return
    message = (
        f"the tests run on {connection.vendor}; set DATABASE_URL to a PostgreSQL "
        "database to run this test"
    )
    if os.environ.get("GATECO_REQUIRE_SERVICES") == "1":
        pytest.fail(message + " (GATECO_REQUIRE_SERVICES=1 requires it).")
    pytest.skip(message + ".")
