"""Key vault: per-organization data keys, sealed secrets and their failure modes.

The AWS tests run against moto, in process through `mock_aws` or over HTTP
through a moto server on a loopback port. Fake credentials and empty config
files keep boto3 from looking for real credentials or endpoints.
"""

import base64
import json
import logging
import os
import pickle
import uuid

import boto3
import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.serializers.json import DjangoJSONEncoder
from moto import mock_aws
from moto.server import ThreadedMotoServer
from rest_framework.utils.encoders import JSONEncoder as DrfJSONEncoder

from keyvault.kms import (
    AwsKmsKeyService,
    KeyAccessDenied,
    LocalKeyService,
    get_key_service,
)
from keyvault.models import DataKey, Purpose, Secret
from keyvault.vault import (
    SecretUnavailable,
    SecretValue,
    data_key_cache,
    encryption_context,
    get_llm_api_key,
    open_secret,
    set_llm_api_key,
    store_secret,
)
from orgs.models import Organization

from .helpers import ask

pytestmark = pytest.mark.django_db

REGION = "us-east-1"
KEY_A = "sk-org-a-key-aaaaaaaaaaaaaaaaaaaaaaaaaaAAAA"
KEY_B = "sk-org-b-key-bbbbbbbbbbbbbbbbbbbbbbbbbbBBBB"
CONNECTOR_PASSWORD = "connector-password-5b1c0e7a9d"
# Port 9 (discard) has no listener on the test hosts, so connections fail at once.
CLOSED_LOOPBACK_ENDPOINT = "http://127.0.0.1:9"


@pytest.fixture
def org_a(db):
    return Organization.objects.create(name="Org A", slug="org-a")


@pytest.fixture
def org_b(db):
    return Organization.objects.create(name="Org B", slug="org-b")


@pytest.fixture
def decrypt_calls(monkeypatch):
    """Count the key service's decrypt calls while the real decrypt runs."""
    service = get_key_service()
    real_decrypt = service.decrypt_data_key
    calls = []

    def counting_decrypt(wrapped, context, key_id=None):
        calls.append(context)
        return real_decrypt(wrapped, context, key_id)

    monkeypatch.setattr(service, "decrypt_data_key", counting_decrypt)
    return calls


@pytest.fixture
def aws_credentials(monkeypatch, tmp_path):
    """Fake AWS credentials, with no config file, profile or metadata lookup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_KMS"):
        monkeypatch.delenv(name, raising=False)


def use_aws_kms(settings, key_arn):
    settings.GATECO_KMS_BACKEND = "aws"
    settings.GATECO_KMS_KEY_ID = key_arn
    settings.GATECO_KMS_REGION = REGION
    get_key_service.cache_clear()


@pytest.fixture
def moto_kms(aws_credentials, settings):
    """An in-process moto KMS with one key, set as Gateco's key service."""
    with mock_aws():
        kms = boto3.client("kms", region_name=REGION)
        key_arn = kms.create_key()["KeyMetadata"]["Arn"]
        use_aws_kms(settings, key_arn)
        yield kms


@pytest.fixture
def kms_server(aws_credentials, monkeypatch, settings):
    """A moto KMS server on a loopback port, set as Gateco's key service.

    Yields the endpoint URL, which boto3 reads from AWS_ENDPOINT_URL_KMS.
    """
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", endpoint)
    kms = boto3.client("kms", region_name=REGION, endpoint_url=endpoint)
    use_aws_kms(settings, kms.create_key()["KeyMetadata"]["Arn"])
    yield endpoint
    server.stop()
    # NOTE: moto 5.2.5's ThreadedMotoServer.stop() leaves the listening socket
    # open, so close it here through the private attribute.
    server._server.server_close()


def kms_endpoint(service):
    return service._client.meta.endpoint_url


# Local key service


def test_local_data_key_bound_to_organization():
    service = LocalKeyService(os.urandom(32))
    context_a = {"organization_id": str(uuid.uuid4())}
    context_b = {"organization_id": str(uuid.uuid4())}
    plaintext, wrapped, _ = service.generate_data_key(context_a)

    assert service.decrypt_data_key(wrapped, context_a) == plaintext
    with pytest.raises(KeyAccessDenied):
        service.decrypt_data_key(wrapped, context_b)


def test_local_wrong_kek_rejected():
    context = {"organization_id": str(uuid.uuid4())}
    _, wrapped, _ = LocalKeyService(os.urandom(32)).generate_data_key(context)

    with pytest.raises(KeyAccessDenied):
        LocalKeyService(os.urandom(32)).decrypt_data_key(wrapped, context)


def test_local_forged_kek_tag_rejected():
    # A wrapped key relabelled with the other KEK's id must still fail the
    # GCM tag check, not only the id comparison.
    context = {"organization_id": str(uuid.uuid4())}
    _, wrapped, _ = LocalKeyService(os.urandom(32)).generate_data_key(context)
    other = LocalKeyService(os.urandom(32))
    _, other_wrapped, _ = other.generate_data_key(context)
    forged = wrapped[:4] + other_wrapped[4:12] + wrapped[12:]

    with pytest.raises(KeyAccessDenied):
        other.decrypt_data_key(forged, context)


def test_local_kek_must_be_32_bytes():
    with pytest.raises(ImproperlyConfigured):
        LocalKeyService(os.urandom(16))


# AWS KMS through moto


def test_kms_rejects_other_organization_context(moto_kms, org_a, org_b):
    service = get_key_service()
    context_a = encryption_context(org_a.pk)
    plaintext, wrapped, key_arn = service.generate_data_key(context_a)

    assert isinstance(service, AwsKmsKeyService)
    assert service.decrypt_data_key(wrapped, context_a, key_arn) == plaintext
    with pytest.raises(KeyAccessDenied):
        service.decrypt_data_key(wrapped, encryption_context(org_b.pk), key_arn)


def test_kms_vault_round_trip(moto_kms, settings, org_a):
    set_llm_api_key(org_a, KEY_A)
    data_key_cache.clear()

    assert get_llm_api_key(org_a).reveal() == KEY_A
    assert DataKey.objects.get(organization=org_a).kek_id == settings.GATECO_KMS_KEY_ID


def test_kms_debug_log_omits_data_keys(moto_kms, org_a, caplog):
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="botocore")
    set_llm_api_key(org_a, KEY_A)
    data_key_cache.clear()
    get_llm_api_key(org_a)
    data_key = DataKey.objects.get(organization=org_a)
    plaintext = get_key_service().decrypt_data_key(
        data_key.wrapped_key, encryption_context(org_a.pk), data_key.kek_id
    )

    # The DEBUG records exist, so the check below is not vacuous.
    assert "botocore.endpoint" in {record.name for record in caplog.records}
    assert base64.b64encode(plaintext).decode() not in caplog.text


# NOTE: moto 5.2.5 does not enforce a disabled key, so Decrypt and
# GenerateDataKey still succeed after `disable_key`. These tests make KMS
# reject a request with a wrapped key made under another organization's context.
def test_kms_server_over_http(kms_server, org_a, org_b):
    service = get_key_service()
    assert kms_endpoint(service) == kms_server

    set_llm_api_key(org_a, KEY_A)
    set_llm_api_key(org_b, KEY_B)
    data_key_cache.clear()
    assert get_llm_api_key(org_a).reveal() == KEY_A
    assert get_llm_api_key(org_b).reveal() == KEY_B

    data_key_a = DataKey.objects.get(organization=org_a)
    with pytest.raises(KeyAccessDenied):
        service.decrypt_data_key(
            data_key_a.wrapped_key, encryption_context(org_b.pk), data_key_a.kek_id
        )

    # B's row now contains A's wrapped key. The cache entry for A's key must
    # not be used for B, and KMS must reject the key under B's context.
    DataKey.objects.filter(organization=org_b).update(
        wrapped_key=data_key_a.wrapped_key
    )
    with pytest.raises(SecretUnavailable) as raised:
        get_llm_api_key(org_b)
    assert raised.value.key_service_unavailable is False


# Sealed secrets


def test_ciphertext_copied_to_other_org_fails(org_a, org_b):
    set_llm_api_key(org_a, KEY_A)
    set_llm_api_key(org_b, KEY_B)
    sealed_a = Secret.objects.get(organization=org_a).ciphertext
    Secret.objects.filter(organization=org_b).update(ciphertext=sealed_a)

    with pytest.raises(SecretUnavailable):
        get_llm_api_key(org_b)


def test_ciphertext_copied_to_other_purpose_fails(org_a):
    # Same organization, so the same data key. Only the associated data differs.
    set_llm_api_key(org_a, KEY_A)
    sealed = Secret.objects.get(
        organization=org_a, purpose=Purpose.LLM_API_KEY
    ).ciphertext
    Secret.objects.create(
        organization=org_a,
        purpose=Purpose.CONNECTOR_CREDENTIAL,
        reference=str(org_a.pk),
        ciphertext=sealed,
    )

    with pytest.raises(SecretUnavailable):
        open_secret(org_a, Purpose.CONNECTOR_CREDENTIAL, str(org_a.pk))


def test_ciphertext_copied_to_other_reference_fails(org_a):
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    store_secret(org_a, Purpose.CONNECTOR_CREDENTIAL, first, CONNECTOR_PASSWORD)
    sealed = Secret.objects.get(reference=first).ciphertext
    Secret.objects.create(
        organization=org_a,
        purpose=Purpose.CONNECTOR_CREDENTIAL,
        reference=second,
        ciphertext=sealed,
    )

    with pytest.raises(SecretUnavailable):
        open_secret(org_a, Purpose.CONNECTOR_CREDENTIAL, second)


def test_connector_credential_round_trip(demo):
    organization, reference = demo.organization, str(demo.connector.id)

    store_secret(organization, "connector_credential", reference, CONNECTOR_PASSWORD)

    opened = open_secret(organization, "connector_credential", reference)
    assert opened.reveal() == CONNECTOR_PASSWORD
    secret = Secret.objects.get(organization=organization, reference=reference)
    assert secret.purpose == Purpose.CONNECTOR_CREDENTIAL
    assert CONNECTOR_PASSWORD.encode() not in bytes(secret.ciphertext)
    assert get_llm_api_key(organization) is None


def test_stored_bytes_never_contain_plaintext(org_a):
    set_llm_api_key(org_a, KEY_A)
    ciphertext = bytes(Secret.objects.get(organization=org_a).ciphertext)
    data_key = DataKey.objects.get(organization=org_a)
    wrapped = bytes(data_key.wrapped_key)
    plaintext_data_key = get_key_service().decrypt_data_key(
        wrapped, encryption_context(org_a.pk)
    )

    assert KEY_A.encode() not in ciphertext
    assert KEY_A.encode() not in wrapped
    assert plaintext_data_key not in wrapped
    assert plaintext_data_key not in ciphertext


def test_same_value_sealed_twice_differs(org_a):
    set_llm_api_key(org_a, KEY_A)
    first = bytes(Secret.objects.get(organization=org_a).ciphertext)
    set_llm_api_key(org_a, KEY_A)
    second = bytes(Secret.objects.get(organization=org_a).ciphertext)

    assert first != second
    assert first[1:13] != second[1:13]
    assert get_llm_api_key(org_a).reveal() == KEY_A


# SecretValue


def test_secret_value_text_forms_hidden():
    value = SecretValue(KEY_A)

    for text in (str(value), repr(value), f"{value}", "%s" % value, "%r" % value):
        assert KEY_A not in text
    assert value.last_four == KEY_A[-4:]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_secret_value_pickle_raises(protocol):
    with pytest.raises(TypeError):
        pickle.dumps(SecretValue(KEY_A), protocol=protocol)


@pytest.mark.parametrize(
    "encoder", [json.JSONEncoder, DjangoJSONEncoder, DrfJSONEncoder]
)
def test_secret_value_json_raises(encoder):
    with pytest.raises(TypeError):
        json.dumps({"key": SecretValue(KEY_A)}, cls=encoder)


# Data-key cache


def test_cache_makes_one_decrypt_per_org(org_a, decrypt_calls):
    set_llm_api_key(org_a, KEY_A)
    data_key_cache.clear()

    opened = [get_llm_api_key(org_a).reveal() for _ in range(1000)]

    assert len(decrypt_calls) == 1
    assert set(opened) == {KEY_A}


def test_cache_entries_are_per_organization(org_a, org_b, decrypt_calls):
    set_llm_api_key(org_a, KEY_A)
    set_llm_api_key(org_b, KEY_B)
    data_key_cache.clear()

    for _ in range(10):
        get_llm_api_key(org_a)
    opened_b = get_llm_api_key(org_b).reveal()

    assert opened_b == KEY_B
    assert decrypt_calls == [encryption_context(org_a.pk), encryption_context(org_b.pk)]


def test_replaced_data_key_misses_cache(org_a, decrypt_calls):
    set_llm_api_key(org_a, KEY_A)
    data_key_cache.clear()
    get_llm_api_key(org_a)
    context = encryption_context(org_a.pk)
    _, new_wrapped, _ = get_key_service().generate_data_key(context)
    DataKey.objects.filter(organization=org_a).update(wrapped_key=new_wrapped)

    # The secret was sealed under the old data key, so only a stale cache
    # entry could open it now.
    with pytest.raises(SecretUnavailable):
        get_llm_api_key(org_a)
    assert len(decrypt_calls) == 2


# Grounded Answers when the key service fails


def store_both_keys(demo, other_demo):
    set_llm_api_key(demo.organization, KEY_A)
    set_llm_api_key(other_demo.organization, KEY_B)
    data_key_cache.clear()


def test_unreachable_kms_fails_closed(
    kms_server,
    monkeypatch,
    demo,
    other_demo,
    api_client,
    outsider_api_client,
    openai_server,
):
    store_both_keys(demo, other_demo)
    # Other's data key is unwrapped before the outage, as in a running process.
    assert ask(outsider_api_client, other_demo, other_demo.alice).status_code == 200
    monkeypatch.setenv("AWS_ENDPOINT_URL_KMS", CLOSED_LOOPBACK_ENDPOINT)
    get_key_service.cache_clear()
    assert kms_endpoint(get_key_service()) == CLOSED_LOOPBACK_ENDPOINT
    openai_server.reset()

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "KEY_UNAVAILABLE"
    results = [r["external_resource_id"] for r in body["results"]]
    assert results == ["q3-board-financials.md"]
    assert openai_server.requests == []
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0

    other = ask(outsider_api_client, other_demo, other_demo.alice)
    assert other.status_code == 200
    assert other.json()["outcome"] == "answered"
    assert [r["key_last4"] for r in openai_server.requests] == [KEY_B[-4:]]


def test_kms_rejection_fails_closed(
    kms_server, demo, other_demo, api_client, outsider_api_client, openai_server
):
    store_both_keys(demo, other_demo)
    other_data_key = DataKey.objects.get(organization=other_demo.organization)
    DataKey.objects.filter(organization=demo.organization).update(
        wrapped_key=other_data_key.wrapped_key
    )

    response = ask(api_client, demo, demo.alice)

    assert response.status_code == 503
    body = response.json()
    assert body["error"]["code"] == "KEY_UNAVAILABLE"
    results = [r["external_resource_id"] for r in body["results"]]
    assert results == ["q3-board-financials.md"]
    assert openai_server.requests == []
    demo.organization.refresh_from_db()
    assert demo.organization.fallback_calls_used == 0

    other = ask(outsider_api_client, other_demo, other_demo.alice)
    assert other.status_code == 200
    assert other.json()["outcome"] == "answered"
    assert [r["key_last4"] for r in openai_server.requests] == [KEY_B[-4:]]
