"""Plant a recognizable LLM API key and drive every path that touches it.

Then search the database, the logs, the responses, the LLM requests and the
errors for it in plain, hex and base64 form. Only its last four characters may
show.
"""

import base64
import logging
import re
import traceback
import uuid

import pytest
from django.apps import apps
from django.contrib.sessions.models import Session
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext

from keyvault.models import DataKey, Purpose, Secret
from keyvault.vault import (
    SecretUnavailable,
    data_key_cache,
    get_llm_api_key,
    set_llm_api_key,
)

from .helpers import ask, make_user

pytestmark = pytest.mark.django_db

CANARY_PREFIX = "sk-LEAKCANARY-"
OTHER_KEY = "sk-other-org-key-0000000000000000000000OTHR"
SETTINGS_PAGE = "/settings/api-keys/"
SETTINGS_API = "/api/organization/settings"
# Loggers set to DEBUG by name, in case LOGGING or a library set them higher.
QUIET_LOGGERS = (
    "django",
    "httpx",
    "httpx2",
    "httpcore",
    "openai",
    "botocore",
    "urllib3",
)
KEY_INPUT = re.compile(r'<input[^>]*name="llm_api_key"[^>]*>')


def make_canary():
    return f"{CANARY_PREFIX}{uuid.uuid4().hex}"


def encoded_forms(text):
    """Return `{name: form}` for `text` as is, in hex, and in base64.

    Base64 of a longer blob spells `text` differently depending on its byte
    offset, so each of the three alignments gets its own form.
    """
    raw = text.encode()
    forms = {"plain": text, "hex": raw.hex(), "upper-case hex": raw.hex().upper()}
    for offset in range(3):
        aligned = raw[offset:]
        aligned = aligned[: len(aligned) - len(aligned) % 3]
        forms[f"base64 from byte {offset}"] = base64.b64encode(aligned).decode()
        forms[f"url-safe base64 from byte {offset}"] = base64.urlsafe_b64encode(
            aligned
        ).decode()
    return forms


def find_leaks(canary, sources):
    """Return `{"source: form": excerpt}` for every form of `canary` found.

    The random part is searched on its own too, so a leak that masks only the
    fixed prefix still counts.
    """
    forms = {
        **encoded_forms(canary),
        **{
            f"{name} of the random part": form
            for name, form in encoded_forms(canary.removeprefix(CANARY_PREFIX)).items()
        },
    }
    leaks = {}
    for source, text in sources.items():
        for name, form in forms.items():
            position = text.find(form)
            if position >= 0:
                excerpt = text[max(position - 80, 0) : position + 120]
                leaks[f"{source}: {name}"] = excerpt
    return leaks


def dump_tables():
    """Return every row of every table as text, binary fields in latin-1 and hex."""
    lines = []
    for model in apps.get_models(include_auto_created=True):
        for row in model._base_manager.values():
            for field, value in row.items():
                if isinstance(value, memoryview):
                    value = bytes(value)
                if isinstance(value, bytes):
                    value = f"{value.decode('latin-1')} {value.hex()}"
                lines.append(f"{model._meta.label}.{field}: {value}")
    return "\n".join(lines)


def dump_sessions():
    """Return the decoded session data, which the table dump shows signed and
    possibly compressed."""
    return "\n".join(repr(session.get_decoded()) for session in Session.objects.all())


def dump_logs(caplog):
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        parts.append(repr(vars(record)))
    return "\n".join(parts)


def describe_response(response):
    parts = [response.content.decode("utf-8", "replace")]
    parts += [f"{header}: {value}" for header, value in response.items()]
    parts += [cookie.OutputString() for cookie in response.cookies.values()]
    return "\n".join(parts)


def describe_exception(error):
    return "\n".join([str(error), repr(error), *traceback.format_exception(error)])


def logged_in_client(user):
    client = Client()
    client.force_login(user)
    return client


class Scenario:
    """The clients and recorded evidence of one leak hunt."""

    def __init__(self, demo, other_demo, owner, api_client, outsider_api_client, llm):
        self.demo = demo
        self.other_demo = other_demo
        self.owner_client = logged_in_client(owner)
        self.api_client = api_client
        self.outsider_api_client = outsider_api_client
        self.llm = llm
        self.responses = {}
        self.errors = {}

    def record(self, name, response):
        self.responses[f"response to {name}"] = describe_response(response)
        return response

    def plant_key(self, canary, entry):
        if entry == "settings page":
            response = self.owner_client.post(
                SETTINGS_PAGE, {"llm_api_key": canary, "action": "save"}
            )
            assert response.status_code == 302
        else:
            response = self.api_client.patch(
                SETTINGS_API, {"llm_api_key": canary}, format="json"
            )
            assert response.status_code == 200
        self.record(f"setting the key through the {entry}", response)
        assert get_llm_api_key(self.demo.organization).reveal() == canary

    def visit_pages(self, canary):
        page = self.record("the settings page", self.owner_client.get(SETTINGS_PAGE))
        assert page.status_code == 200
        # The page shows the last four, so the search below does see its text.
        assert f"ending in {canary[-4:]}" in page.content.decode()

        api = self.record("the settings API", self.api_client.get(SETTINGS_API))
        assert api.json()["llm_api_key_last_four"] == canary[-4:]
        browsable = self.api_client.get(SETTINGS_API, HTTP_ACCEPT="text/html")
        self.record("the browsable settings API", browsable)
        assert browsable.status_code == 200

        admin = logged_in_client(
            make_user("admin", is_staff=True, is_superuser=True)
        )
        organization = self.demo.organization
        for name, url in [
            ("the admin index", "/admin/"),
            ("the admin changelist", "/admin/orgs/organization/"),
            (
                "the admin change page",
                f"/admin/orgs/organization/{organization.pk}/change/",
            ),
        ]:
            response = self.record(name, admin.get(url))
            assert response.status_code == 200

    def fail_upstream(self, canary):
        answered = self.record(
            "an answer", ask(self.api_client, self.demo, self.demo.alice)
        )
        assert answered.json()["key_source"] == "organization"

        self.llm.set_failure("500", times=1)
        failed = self.record(
            "an upstream 500", ask(self.api_client, self.demo, self.demo.alice)
        )
        assert failed.status_code == 502

        self.llm.reject_key_suffixes({canary[-4:]})
        rejected = self.record(
            "a rejected key", ask(self.api_client, self.demo, self.demo.alice)
        )
        self.llm.reject_key_suffixes([])
        assert rejected.json()["error"]["code"] == "LLM_KEY_INVALID"

    def fail_decrypt(self):
        # The other organization's row gets a copy of the planted key's ciphertext.
        other = self.other_demo.organization
        set_llm_api_key(other, OTHER_KEY)
        sealed = Secret.objects.get(
            organization=self.demo.organization, purpose=Purpose.LLM_API_KEY
        ).ciphertext
        Secret.objects.filter(organization=other).update(ciphertext=sealed)
        data_key_cache.clear()
        copied = self.record(
            "an answer from a copied ciphertext",
            ask(self.outsider_api_client, self.other_demo, self.other_demo.alice),
        )
        assert copied.status_code == 503
        with pytest.raises(SecretUnavailable) as raised:
            get_llm_api_key(other)
        self.errors["copied ciphertext"] = describe_exception(raised.value)

        # The planted key's own data key, with its GCM tag corrupted.
        data_key = DataKey.objects.get(organization=self.demo.organization)
        corrupted = bytearray(data_key.wrapped_key)
        corrupted[-1] ^= 0x01
        DataKey.objects.filter(pk=data_key.pk).update(wrapped_key=bytes(corrupted))
        data_key_cache.clear()
        failed = self.record(
            "an answer from a corrupt data key",
            ask(self.api_client, self.demo, self.demo.alice),
        )
        assert failed.json()["error"]["code"] == "KEY_UNAVAILABLE"
        with pytest.raises(SecretUnavailable) as raised:
            get_llm_api_key(self.demo.organization)
        self.errors["corrupt data key"] = describe_exception(raised.value)

        after = self.record(
            "the settings page after", self.owner_client.get(SETTINGS_PAGE)
        )
        assert after.status_code == 200


def test_leak_search_finds_encoded_key():
    canary = make_canary()
    suffix_only = f"key ending in {canary[-4:]}"
    shifted = base64.b64encode(b"x" + canary.encode()).decode()

    assert find_leaks(canary, {"text": suffix_only}) == {}
    assert find_leaks(canary, {"text": canary}) != {}
    assert find_leaks(canary, {"text": shifted}) != {}
    assert find_leaks(canary, {"text": canary.encode().hex()}) != {}
    assert find_leaks(canary, {"text": canary.replace(CANARY_PREFIX, "sk-***")}) != {}


@pytest.mark.parametrize("entry", ["settings page", "settings API"])
def test_planted_key_appears_nowhere(
    entry,
    demo,
    other_demo,
    owner,
    api_client,
    outsider_api_client,
    openai_server,
    caplog,
):
    canary = make_canary()
    caplog.set_level(logging.DEBUG)
    for name in QUIET_LOGGERS:
        caplog.set_level(logging.DEBUG, logger=name)
    scenario = Scenario(
        demo, other_demo, owner, api_client, outsider_api_client, openai_server
    )

    # The debug cursor also sends every SQL statement to the django.db.backends log.
    with CaptureQueriesContext(connection) as queries:
        scenario.plant_key(canary, entry)
        scenario.visit_pages(canary)
        scenario.fail_upstream(canary)
        scenario.fail_decrypt()

    sources = {
        **scenario.responses,
        **{f"{name} error": text for name, text in scenario.errors.items()},
        "tables": dump_tables(),
        "sessions": dump_sessions(),
        "logs": dump_logs(caplog),
        "SQL statements": "\n".join(query["sql"] for query in queries.captured_queries),
        "LLM server requests": repr(openai_server.requests),
    }
    chat_requests = [
        r for r in openai_server.requests if r["path"] == "/v1/chat/completions"
    ]
    assert len(chat_requests) == 3
    assert find_leaks(canary, sources) == {}


def test_settings_page_shows_last_four(owner, demo):
    canary = make_canary()
    client = logged_in_client(owner)
    client.post(SETTINGS_PAGE, {"llm_api_key": canary, "action": "save"})

    html = client.get(SETTINGS_PAGE).content.decode()

    assert f"ending in {canary[-4:]}" in html
    assert find_leaks(canary, {"settings page": html}) == {}
    key_input = KEY_INPUT.search(html).group(0)
    assert 'type="password"' in key_input
    assert "value=" not in key_input


INVALID_SUBMISSIONS = {
    "with a space": "{canary} trailing-word",
    "too long": "{canary}" * 9,
}


@pytest.mark.parametrize(
    "form", INVALID_SUBMISSIONS.values(), ids=INVALID_SUBMISSIONS.keys()
)
def test_invalid_key_not_rendered_back(owner, demo, form):
    canary = make_canary()
    client = logged_in_client(owner)

    response = client.post(
        SETTINGS_PAGE, {"llm_api_key": form.format(canary=canary), "action": "save"}
    )

    html = response.content.decode()
    assert response.status_code == 200
    assert "does not look like an OpenAI API key" in html
    assert find_leaks(canary, {"settings page": html}) == {}
    assert "value=" not in KEY_INPUT.search(html).group(0)
    assert get_llm_api_key(demo.organization) is None


@pytest.mark.parametrize(
    "form", INVALID_SUBMISSIONS.values(), ids=INVALID_SUBMISSIONS.keys()
)
def test_api_validation_error_omits_key(api_client, form):
    canary = make_canary()

    response = api_client.patch(
        SETTINGS_API, {"llm_api_key": form.format(canary=canary)}, format="json"
    )

    assert response.status_code == 422
    assert find_leaks(canary, {"response": response.content.decode()}) == {}


def test_api_conflicting_fields_omit_key(api_client):
    canary = make_canary()

    response = api_client.patch(
        SETTINGS_API,
        {"llm_api_key": canary, "clear_llm_api_key": True},
        format="json",
    )

    assert response.status_code == 422
    assert find_leaks(canary, {"response": response.content.decode()}) == {}
