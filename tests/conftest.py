"""Shared fixtures: the local OpenAI server, the demo organizations, personas.

Personas follow one pattern: `owner` and `member` belong to the demo
organization, `outsider` owns a second organization with its own documents,
so every endpoint test can show that the outsider sees nothing.
"""

import pytest
from rest_framework.test import APIClient

from answers.local_openai import LocalOpenAIServer
from keyvault.kms import get_key_service
from keyvault.vault import data_key_cache
from orgs.demo import load_demo_organization
from orgs.models import ApiKey, Role, Tier

from .helpers import SHARED_FALLBACK_KEY, make_user



@pytest.fixture(scope="session")
def llm_server():
    server = LocalOpenAIServer(port=0)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def openai_server(llm_server, settings):
    """The local OpenAI server, reset, with Gateco pointed at it."""
    llm_server.reset()
    settings.OPENAI_BASE_URL = llm_server.base_url
    settings.OPENAI_API_KEY = SHARED_FALLBACK_KEY
    yield llm_server
    llm_server.reset()


@pytest.fixture(autouse=True)
def fresh_key_service():
    """Give each test an empty data-key cache and a freshly built key service."""
    data_key_cache.clear()
    get_key_service.cache_clear()
    yield
    data_key_cache.clear()
    get_key_service.cache_clear()


@pytest.fixture
def demo(db):
    return load_demo_organization()


@pytest.fixture
def other_demo(db):
    """A second organization with the same documents, for isolation tests."""
    return load_demo_organization(slug="globex", name="Globex", tier=Tier.TEAM)


@pytest.fixture
def owner(demo):
    return make_user("owner", demo.organization, Role.OWNER)


@pytest.fixture
def member(demo):
    return make_user("member", demo.organization, Role.MEMBER)


@pytest.fixture
def outsider(other_demo):
    return make_user("outsider", other_demo.organization, Role.OWNER)


@pytest.fixture
def api_key(demo):
    _, raw_key = ApiKey.issue(demo.organization, "tests")
    return raw_key


@pytest.fixture
def api_client(api_key):
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=api_key)
    return client


@pytest.fixture
def outsider_api_client(other_demo):
    _, raw_key = ApiKey.issue(other_demo.organization, "outsider")
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=raw_key)
    return client
