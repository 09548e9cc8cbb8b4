"""The published `gateco` SDK against a live Gateco server on 127.0.0.1.

Each test issues real HTTP requests through the SDK's httpx transport, with
retries off, to pytest-django's live server, which calls the local OpenAI
server.
"""

import asyncio

import pytest
from gateco_sdk import AsyncGatecoClient, GatecoClient
from gateco_sdk.errors import (
    AuthenticationError,
    LlmCreditExhaustedError,
    LlmKeyNotConfiguredError,
    ValidationError,
)

from keyvault.models import Purpose, Secret
from keyvault.vault import get_llm_api_key, set_llm_api_key
from orgs.models import Organization, Tier

from .helpers import SHARED_FALLBACK_KEY

SDK_KEY = "sk-sdk-settings-key-66666666666666666SDK6"
QUESTION = "What was revenue in the third quarter?"
# The SDK's httpx client sends requests through a proxy named in these.
PROXY_VARIABLES = (
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "http_proxy",
    "https_proxy",
    "all_proxy",
)

pytestmark = pytest.mark.django_db(transaction=True)


def loopback_url(live_server):
    # The live server binds an IPv4 socket for "localhost", so naming
    # 127.0.0.1 reaches it without resolving a host name.
    return live_server.url.replace("://localhost:", "://127.0.0.1:")


@pytest.fixture
def base_url(live_server, monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return loopback_url(live_server)


def make_client(base_url, api_key):
    """Build a synchronous SDK client that makes exactly one request per call."""
    return GatecoClient(base_url=base_url, api_key=api_key, max_retries=0, timeout=10)


@pytest.fixture
def sdk(base_url, api_key):
    with make_client(base_url, api_key) as client:
        yield client


def ask(sdk, demo, principal):
    return sdk.answers.execute(
        QUESTION, principal_id=principal.external_id, connector_id=str(demo.connector.id)
    )


# Grounded Answers.


def test_alice_gets_cited_answer(sdk, demo, openai_server):
    answer = ask(sdk, demo, demo.alice)

    assert answer.outcome == "answered"
    assert answer.citations
    financials = demo.connector.resources.get(external_id="q3-board-financials.md")
    assert {c.resource_id for c in answer.citations} == {str(financials.id)}
    assert "14.2 million" in answer.answer
    assert answer.model_extra["key_source"] == "fallback"
    assert [r["key_last4"] for r in openai_server.requests] == [SHARED_FALLBACK_KEY[-4:]]


def test_bob_gets_no_access(sdk, demo, openai_server):
    answer = ask(sdk, demo, demo.bob)

    assert answer.outcome == "no_access"
    assert answer.citations == []
    assert answer.answer is None
    assert openai_server.requests == []


def test_async_client_answers(base_url, api_key, demo, openai_server):
    async def ask_async():
        async with AsyncGatecoClient(
            base_url=base_url, api_key=api_key, max_retries=0, timeout=10
        ) as client:
            return await client.answers.execute(
                QUESTION,
                principal_id=demo.alice.external_id,
                connector_id=str(demo.connector.id),
            )

    answer = asyncio.run(ask_async())

    assert answer.outcome == "answered"
    assert answer.citations


# Organization settings.


def test_get_org_settings_without_key(sdk, demo):
    settings_body = sdk.users.get_org_settings()

    assert settings_body["id"] == str(demo.organization.id)
    assert settings_body["llm_api_key_configured"] is False
    assert settings_body["llm_fallback_credits_used"] == 0
    assert settings_body["llm_fallback_credits_limit"] == 100
    assert settings_body["llm_key_uses"] == 0


def test_update_org_settings_stores_key(sdk, demo, openai_server):
    settings_body = sdk.users.update_org_settings(llm_api_key=SDK_KEY)

    assert settings_body["llm_api_key_configured"] is True
    assert settings_body["llm_api_key_last_four"] == "SDK6"
    assert SDK_KEY not in repr(settings_body)
    assert get_llm_api_key(demo.organization).reveal() == SDK_KEY

    answer = ask(sdk, demo, demo.alice)

    assert answer.model_extra["key_source"] == "organization"
    assert [(r["path"], r["key_last4"]) for r in openai_server.requests] == [
        ("/v1/models", "SDK6"),
        ("/v1/chat/completions", "SDK6"),
    ]
    assert sdk.users.get_org_settings()["llm_key_uses"] == 1


def test_clear_llm_api_key_removes_key(sdk, demo):
    set_llm_api_key(demo.organization, SDK_KEY)

    settings_body = sdk.users.update_org_settings(clear_llm_api_key=True)

    assert settings_body["llm_api_key_configured"] is False
    assert not Secret.objects.filter(purpose=Purpose.LLM_API_KEY).exists()


def test_key_and_clear_raise_validation_error(sdk, demo):
    set_llm_api_key(demo.organization, SDK_KEY)

    with pytest.raises(ValidationError) as raised:
        sdk.users.update_org_settings(
            llm_api_key="sk-sdk-other-key-777777777777777777777SDK7",
            clear_llm_api_key=True,
        )

    assert raised.value.code == "VALIDATION_ERROR"
    assert raised.value.status_code == 422
    assert get_llm_api_key(demo.organization).reveal() == SDK_KEY


# Typed errors.


def test_spent_fallback_raises_credit_exhausted(sdk, demo, openai_server, settings):
    Organization.objects.filter(pk=demo.organization.pk).update(
        fallback_calls_used=settings.GATECO_FALLBACK_CALL_LIMIT
    )

    with pytest.raises(LlmCreditExhaustedError) as raised:
        ask(sdk, demo, demo.alice)

    assert raised.value.code == "LLM_CREDIT_EXHAUSTED"
    assert raised.value.status_code == 422
    assert "Organization Settings" in raised.value.message
    assert openai_server.requests == []


def test_free_tier_raises_key_not_configured(sdk, demo, openai_server):
    Organization.objects.filter(pk=demo.organization.pk).update(tier=Tier.FREE)

    with pytest.raises(LlmKeyNotConfiguredError) as raised:
        ask(sdk, demo, demo.alice)

    assert raised.value.code == "LLM_KEY_NOT_CONFIGURED"
    assert openai_server.requests == []


def test_wrong_api_key_raises_authentication_error(base_url, api_key, demo):
    wrong_key = api_key[:-2] + "xx"
    with make_client(base_url, wrong_key) as client:
        with pytest.raises(AuthenticationError) as settings_error:
            client.users.get_org_settings()
        with pytest.raises(AuthenticationError) as answer_error:
            ask(client, demo, demo.alice)

    assert settings_error.value.code == "AUTH_INVALID_CREDENTIALS"
    assert settings_error.value.status_code == 401
    assert answer_error.value.code == "AUTH_INVALID_CREDENTIALS"
