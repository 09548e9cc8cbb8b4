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

    assert sum(1 for entry in results if entry is not None) == 5
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == limit


@pytest.fixture
def gunicorn_server(demo, openai_server, tmp_path):
    """Serve Gateco from 4 gunicorn worker processes on the test database."""
    import os
    import socket
    import subprocess
    import sys
    import time

    from django.conf import settings as django_settings

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    database = connection.settings_dict
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "gateco.settings",
        "DATABASE_URL": (
            f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/"
            f"{database['NAME']}"
        ),
        "GATECO_DATA_DIR": str(tmp_path),
        "GATECO_LOCAL_KEK": django_settings.GATECO_LOCAL_KEK,
        "OPENAI_BASE_URL": openai_server.base_url,
        "OPENAI_API_KEY": django_settings.OPENAI_API_KEY,
        "LOG_LEVEL": "WARNING",
    }
    env.pop("REDIS_URL", None)
    process = subprocess.Popen(
        [
            sys.executable, "-m", "gunicorn", "gateco.wsgi",
            "--bind", f"127.0.0.1:{port}", "--workers", "4", "--timeout", "60",
        ],
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("gunicorn did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_300_concurrent_answers_spend_exactly_100(
    gunicorn_server, demo, api_key, openai_server, settings
):
    import json
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    require_postgresql()
    assert settings.GATECO_FALLBACK_CALL_LIMIT == 100
    request = {
        "query": "What was revenue in the third quarter?",
        "principal_id": demo.alice.external_id,
        "connector_id": str(demo.connector.id),
    }

    def post(_):
        response = httpx.post(
            f"{gunicorn_server}/api/answers/execute",
            content=json.dumps(request),
            headers={"X-API-Key": api_key, "Content-Type": "application/json"},
            timeout=60,
        )
        return response.status_code, response.json()

    with ThreadPoolExecutor(max_workers=40) as pool:
        responses = list(pool.map(post, range(300)))

    answered = [body for status, body in responses if status == 200]
    exhausted = [
        body
        for status, body in responses
        if status == 422 and body["error"]["code"] == "LLM_CREDIT_EXHAUSTED"
    ]
    chat_requests = [r for r in openai_server.requests if r["path"] == "/v1/chat/completions"]
    assert len(chat_requests) == 100
    assert len(answered) == 100
    assert len(exhausted) == 200
    assert all(body["results"] for body in exhausted)
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 100
