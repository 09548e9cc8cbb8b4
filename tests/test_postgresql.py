"""Behaviour that only PostgreSQL with several connections can show."""

import threading

import pytest
from django.db import connection

from orgs.models import Organization

from .helpers import require_postgresql

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def test_fallback_reservations_never_oversell(demo, settings):
    require_postgresql()
    limit = settings.GATECO_FALLBACK_CALL_LIMIT
    Organization.objects.filter(pk=demo.organization.pk).update(
        fallback_calls_used=limit - 5
    )
    results = []
    start = threading.Barrier(20)

    def reserve():
        organization = Organization.objects.get(pk=demo.organization.pk)
        start.wait()
        results.append(organization.reserve_fallback_call())
        connection.close()

    threads = [threading.Thread(target=reserve) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert results.count(True) == 5
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == limit
