"""Key custody: checking keys on save, rotation, re-wrapping, verification."""

import base64
import json
import os
import threading
import time
import urllib.request

import pytest
from django.core.management import CommandError, call_command

from keyvault.kms import get_key_service, local_key_id
from keyvault.models import DataKey, Secret
from keyvault.vault import (
    data_key_cache,
    get_llm_api_key,
    open_secret,
    set_llm_api_key,
    store_secret,
)
from orgs.models import ApiKey, Organization

from .helpers import require_postgresql

pytestmark = pytest.mark.django_db

KEY = "sk-custody-key-555555555555555555555555CUS5"


def patch_settings(api_client, **fields):
    return api_client.patch("/api/organization/settings", fields, format="json")


def test_rejected_key_not_saved(api_client, demo, openai_server):
    openai_server.reject_key_suffixes({KEY[-4:]})

    response = patch_settings(api_client, llm_api_key=KEY)

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "LLM_KEY_INVALID"
    assert Secret.objects.count() == 0


def test_key_check_uses_model_list(api_client, demo, openai_server):
    patch_settings(api_client, llm_api_key=KEY)

    [request] = openai_server.requests
    assert request["method"] == "GET"
    assert request["path"] == "/v1/models"
    assert request["key_last4"] == KEY[-4:]


def test_checked_key_is_valid(api_client, demo, openai_server):
    body = patch_settings(api_client, llm_api_key=KEY).json()

    assert body["llm_api_key_check"] == "valid"
    assert body["warnings"] == []


def test_unreachable_check_saves_unverified(api_client, demo):
    # No local OpenAI server: the test settings point at a closed port.
    body = patch_settings(api_client, llm_api_key=KEY).json()

    assert body["llm_api_key_configured"] is True
    assert body["llm_api_key_check"] == "unverified"
    assert "could not be reached" in body["warnings"][0]


def test_slow_check_saves_unverified(api_client, demo, openai_server, settings):
    settings.GATECO_KEY_CHECK_TIMEOUT_SECONDS = 0.2
    openai_server.set_failure("slow", delay_seconds=1.0)

    body = patch_settings(api_client, llm_api_key=KEY).json()

    assert body["llm_api_key_check"] == "unverified"
    assert get_llm_api_key(demo.organization).reveal() == KEY


def test_failing_check_does_not_call_key_invalid(api_client, demo, openai_server):
    openai_server.set_failure("500")

    response = patch_settings(api_client, llm_api_key=KEY)

    assert response.status_code == 200
    assert response.json()["llm_api_key_check"] == "unverified"


def test_page_rejects_key_openai_rejects(client, owner, openai_server):
    openai_server.reject_key_suffixes({KEY[-4:]})
    client.force_login(owner)

    response = client.post(
        "/settings/api-keys/", {"llm_api_key": KEY, "action": "save"}, follow=True
    )

    assert "OpenAI rejected this API key" in response.content.decode()
    assert Secret.objects.count() == 0


def test_page_marks_unverified_key(client, owner):
    client.force_login(owner)

    response = client.post(
        "/settings/api-keys/", {"llm_api_key": KEY, "action": "save"}, follow=True
    )

    assert "not verified" in response.content.decode()


def test_rotate_reseals_with_new_data_key(demo):
    set_llm_api_key(demo.organization, KEY)
    store_secret(demo.organization, "connector_credential", "c1", "s3cret-password")
    old_wrapped = bytes(DataKey.objects.get().wrapped_key)
    old_ciphertexts = {bytes(s.ciphertext) for s in Secret.objects.all()}

    call_command("rotate_data_keys", organization="acme")

    assert bytes(DataKey.objects.get().wrapped_key) != old_wrapped
    assert not old_ciphertexts & {bytes(s.ciphertext) for s in Secret.objects.all()}
    data_key_cache.clear()
    assert get_llm_api_key(demo.organization).reveal() == KEY
    opened = open_secret(demo.organization, "connector_credential", "c1")
    assert opened.reveal() == "s3cret-password"


def test_rotate_dry_run_changes_nothing(demo, capsys):
    set_llm_api_key(demo.organization, KEY)
    wrapped = bytes(DataKey.objects.get().wrapped_key)

    call_command("rotate_data_keys", all=True, dry_run=True)

    assert "1 data keys would be rotated" in capsys.readouterr().out
    assert bytes(DataKey.objects.get().wrapped_key) == wrapped


def test_rotate_resume_skips_rotated(demo, other_demo, capsys):
    set_llm_api_key(demo.organization, KEY)
    set_llm_api_key(other_demo.organization, KEY)
    started = "2999-01-01T00:00:00"
    call_command("rotate_data_keys", organization="acme", created_before=started)
    capsys.readouterr()

    # The resumed run only rotates keys created before the first run started.
    call_command("rotate_data_keys", all=True, created_before=started)

    output = capsys.readouterr().out
    assert "Rotated 2 data keys" in output
    call_command("rotate_data_keys", all=True, created_before="2000-01-01T00:00:00")
    assert "Rotated 0 data keys" in capsys.readouterr().out


def test_rewrap_moves_keys_to_new_kek(demo, settings, capsys):
    set_llm_api_key(demo.organization, KEY)
    old_kek = settings.GATECO_LOCAL_KEK
    new_kek = base64.b64encode(os.urandom(32)).decode()
    settings.GATECO_LOCAL_KEK = new_kek
    settings.GATECO_LOCAL_KEK_PREVIOUS = [old_kek]
    get_key_service.cache_clear()
    data_key_cache.clear()

    call_command("rewrap_data_keys", dry_run=True)
    assert "1 data keys would be re-wrapped" in capsys.readouterr().out
    call_command("rewrap_data_keys")

    assert DataKey.objects.get().kek_id == local_key_id(base64.b64decode(new_kek))
    # The old key-encryption key is no longer needed.
    settings.GATECO_LOCAL_KEK_PREVIOUS = []
    get_key_service.cache_clear()
    data_key_cache.clear()
    assert get_llm_api_key(demo.organization).reveal() == KEY


def test_rewrap_without_old_kek_fails(demo, settings):
    set_llm_api_key(demo.organization, KEY)
    settings.GATECO_LOCAL_KEK = base64.b64encode(os.urandom(32)).decode()
    get_key_service.cache_clear()
    data_key_cache.clear()

    with pytest.raises(CommandError):
        call_command("rewrap_data_keys")


def test_verify_reports_broken_secret(demo, other_demo, capsys):
    set_llm_api_key(demo.organization, KEY)
    set_llm_api_key(other_demo.organization, KEY)
    # Give Globex a ciphertext that belongs to Acme's row.
    acme = Secret.objects.get(organization=demo.organization)
    Secret.objects.filter(organization=other_demo.organization).update(
        ciphertext=acme.ciphertext
    )

    with pytest.raises(CommandError):
        call_command("verify_secrets")

    captured = capsys.readouterr()
    assert "1 secrets open; 1 failed" in captured.out
    assert str(other_demo.organization.pk) in captured.err
    assert KEY not in captured.out + captured.err


def test_verify_dry_run_counts(demo, capsys):
    set_llm_api_key(demo.organization, KEY)

    call_command("verify_secrets", dry_run=True)

    assert "1 secrets would be checked" in capsys.readouterr().out


def test_deleted_organization_secret_copy_is_dead(demo):
    set_llm_api_key(demo.organization, KEY)
    copy = Secret.objects.values().get()
    organization_id = demo.organization.pk

    demo.organization.delete()

    assert DataKey.objects.count() == 0
    # Recreate an organization with the same id and plant the old ciphertext:
    # the new data key cannot open it.
    reborn = Organization.objects.create(id=organization_id, name="Reborn", slug="reborn")
    set_llm_api_key(reborn, "sk-placeholder-key-0000000000000000000000")
    Secret.objects.filter(organization=reborn).update(ciphertext=copy["ciphertext"])
    from keyvault.vault import SecretUnavailable

    with pytest.raises(SecretUnavailable):
        get_llm_api_key(reborn)


@pytest.mark.services
@pytest.mark.django_db(transaction=True)
def test_no_request_after_save_uses_old_key(live_server, demo, openai_server):
    """Answers run in threads while the key is replaced; every request that
    starts after the replacement commits is paid by the new key.

    PostgreSQL only: the test database of SQLite is one in-memory database
    whose writers lock each other out under concurrent requests.
    """
    require_postgresql()
    old_key, new_key = KEY, "sk-custody-new-key-66666666666666666666NEW6"
    set_llm_api_key(demo.organization, old_key)
    _, raw_key = ApiKey.issue(demo.organization, "rotation")
    url = live_server.url.replace("localhost", "127.0.0.1") + "/api/answers/execute"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    started_at = {}
    errors = []
    stop = threading.Event()
    deadline = time.monotonic() + 60

    def ask(number):
        body = json.dumps(
            {
                "query": f"What was revenue in the third quarter? request-{number}",
                "principal_id": demo.alice.external_id,
                "connector_id": str(demo.connector.id),
            }
        ).encode()
        request = urllib.request.Request(
            url,
            body,
            {"X-API-Key": raw_key, "Content-Type": "application/json"},
        )
        started_at[number] = time.monotonic()
        opener.open(request, timeout=30).read()

    def worker(first):
        number = first
        while not stop.is_set() and time.monotonic() < deadline:
            try:
                ask(number)
            except OSError as error:
                errors.append(error)
                stop.set()
            number += 100

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    while len(started_at) < 6 and not stop.is_set() and time.monotonic() < deadline:
        time.sleep(0.01)
    set_llm_api_key(demo.organization, new_key)
    committed_at = time.monotonic()
    while (
        len([t for t in started_at.values() if t > committed_at]) < 6
        and not stop.is_set()
        and time.monotonic() < deadline
    ):
        time.sleep(0.01)
    stop.set()
    for thread in threads:
        thread.join(timeout=60)

    assert errors == []
    key_by_request = {}
    for record in openai_server.requests:
        if record["path"] != "/v1/chat/completions":
            continue
        question = record["messages"][-1]["content"].splitlines()[0]
        number = int(question.rsplit("request-", 1)[1])
        key_by_request[number] = record["key_last4"]
    after = [n for n, t in started_at.items() if t > committed_at]
    assert len(after) >= 6
    assert {key_by_request[n] for n in after} == {new_key[-4:]}
    assert old_key[-4:] in key_by_request.values()
