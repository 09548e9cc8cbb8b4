"""The load_demo command: the rows it writes, its output, and the printed request."""

import json
import re
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from rest_framework.test import APIClient

from orgs.demo import POLICIES, PRINCIPALS
from orgs.models import ApiKey, Membership, Organization
from retrieval.models import Chunk, Connector, Policy, PolicyStatus, Principal, Resource
from retrieval.policy import decide

pytestmark = pytest.mark.django_db

DEMO_DOCUMENT_COUNT = 6
MODELS = [Organization, Principal, Connector, Resource, Chunk, Policy, Membership]


def load_demo():
    output = StringIO()
    call_command("load_demo", stdout=output)
    return output.getvalue()


def row_counts():
    counts = {model.__name__: model.objects.count() for model in MODELS}
    counts["User"] = get_user_model().objects.count()
    return counts


def printed_api_key(output):
    return re.search(r"API key:\s+(\S+)", output).group(1)


def printed_request(output):
    """Return the JSON body and API key of the curl command in `output`."""
    body = re.search(r"-d '(\{.*\})'", output).group(1)
    api_key = re.search(r"-H 'X-API-Key: (\S+)'", output).group(1)
    return json.loads(body), api_key


def client_for(api_key):
    client = APIClient()
    client.credentials(HTTP_X_API_KEY=api_key)
    return client


def test_load_demo_writes_demo_rows():
    load_demo()

    counts = row_counts()
    assert counts["Organization"] == 1
    assert counts["Principal"] == len(PRINCIPALS)
    assert counts["Connector"] == 1
    assert counts["Resource"] == DEMO_DOCUMENT_COUNT
    assert counts["Chunk"] >= DEMO_DOCUMENT_COUNT
    assert counts["Policy"] == len(POLICIES)
    assert counts["User"] == 1
    assert counts["Membership"] == 1


def test_demo_policies_are_active():
    load_demo()

    statuses = set(Policy.objects.values_list("status", flat=True))
    assert statuses == {PolicyStatus.ACTIVE}


def test_admin_user_can_manage_demo():
    load_demo()

    admin = get_user_model().objects.get(username="admin")
    assert admin.is_staff
    assert admin.is_superuser
    assert Membership.objects.get(user=admin).can_manage


def test_load_demo_twice_keeps_counts():
    load_demo()
    first = row_counts()

    load_demo()

    assert row_counts() == first


def test_rerun_keeps_one_live_key():
    load_demo()
    load_demo()

    assert ApiKey.objects.filter(name="demo").count() == 2
    assert ApiKey.objects.filter(name="demo", revoked_at__isnull=True).count() == 1


def test_rerun_revokes_old_key():
    old_key = printed_api_key(load_demo())
    new_key = printed_api_key(load_demo())

    assert client_for(old_key).get("/api/organization/settings").status_code == 401
    assert client_for(new_key).get("/api/organization/settings").status_code == 200


def test_rerun_prints_new_admin_password():
    old_password = re.search(r"admin / (\S+)", load_demo()).group(1)
    new_password = re.search(r"admin / (\S+)", load_demo()).group(1)

    assert old_password != new_password
    assert get_user_model().objects.get(username="admin").check_password(new_password)


@pytest.mark.parametrize(
    "expected",
    [
        "http://127.0.0.1:8000/settings/api-keys/",
        "http://127.0.0.1:8000/admin/",
        "http://127.0.0.1:8000/api/answers/execute",
        "admin / ",
        "curl -s -X POST http://127.0.0.1:8000/api/answers/execute",
        "alice@acme.test",
        "bob@acme.test",
    ],
)
def test_output_contains_expected_text(expected):
    assert expected in load_demo()


def test_base_url_option_sets_links():
    output = StringIO()

    call_command("load_demo", base_url="http://127.0.0.1:9000", stdout=output)

    assert "http://127.0.0.1:9000/admin/" in output.getvalue()
    assert "127.0.0.1:8000" not in output.getvalue()


def test_printed_key_authenticates():
    output = load_demo()

    response = client_for(printed_api_key(output)).get("/api/organization/settings")

    assert response.status_code == 200
    assert response.json()["slug"] == "acme"


def test_curl_uses_printed_key():
    output = load_demo()

    _, api_key = printed_request(output)

    assert api_key == printed_api_key(output)


def test_printed_request_answers_alice(openai_server):
    body, api_key = printed_request(load_demo())

    response = client_for(api_key).post("/api/answers/execute", body, format="json")

    assert response.status_code == 200
    answer = response.json()
    assert answer["outcome"] == "answered"
    assert answer["citations"]
    alice = Principal.objects.get(external_id="alice@acme.test")
    policies = list(Policy.objects.filter(status=PolicyStatus.ACTIVE))
    for citation in answer["citations"]:
        resource = Resource.objects.get(id=citation["resource_id"])
        assert decide(policies, alice, resource).allowed, resource.external_id


def test_printed_request_denies_bob(openai_server):
    body, api_key = printed_request(load_demo())
    body["principal_id"] = "bob@acme.test"

    response = client_for(api_key).post("/api/answers/execute", body, format="json")

    assert response.status_code == 200
    answer = response.json()
    assert answer["outcome"] == "no_access"
    assert answer["citations"] == []
    assert answer["answer"] is None
    assert openai_server.requests == []
