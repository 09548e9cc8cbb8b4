"""Envelope encryption of organization secrets.

1. Each organization has one 256-bit data key, made by the key service under
   the context `{"organization_id": "<uuid>"}` and stored only wrapped.
2. Each secret is sealed with AES-256-GCM under that data key, with a fresh
   96-bit nonce and associated data naming the organization, the purpose and
   the record, so a ciphertext copied elsewhere fails to open.
3. Unwrapped data keys are cached in process memory only, for a bounded time
   and number of uses, keyed by the wrapped bytes so a replaced data key is
   never served from the cache.
"""

import hashlib
import logging
import os
import threading
import time

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.db import IntegrityError, transaction
from django.views.decorators.debug import sensitive_variables

from .kms import KeyAccessDenied, KeyServiceError, get_key_service
from .models import DataKey, Purpose, Secret

logger = logging.getLogger(__name__)

SEAL_VERSION = 1
NONCE_BYTES = 12


class SecretValue:
    """A decrypted secret whose str, repr and pickled forms reveal nothing."""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def reveal(self):
        return self._value

    @property
    def last_four(self):
        return self._value[-4:]

    def __repr__(self):
        return "SecretValue(<hidden>)"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("A SecretValue cannot be pickled or sent to a task.")


class SecretUnavailable(Exception):
    """A stored secret could not be opened. Retrying the same call won't help
    unless `key_service_unavailable` is true."""

    def __init__(self, organization_id, purpose, reason, key_service_unavailable=False):
        self.organization_id = organization_id
        self.purpose = purpose
        self.key_service_unavailable = key_service_unavailable
        super().__init__(
            f"The {purpose} secret of organization {organization_id} could not be "
            f"opened: {reason}"
        )


def encryption_context(organization_id):
    return {"organization_id": str(organization_id)}


def associated_data(organization_id, purpose, reference):
    return "\x00".join(
        ["gateco-secret", str(SEAL_VERSION), str(organization_id), purpose, reference]
    ).encode()


class DataKeyCache:
    """Unwrapped data keys in process memory, bounded by age, uses and entries."""

    def __init__(self, max_entries=1000, max_uses=100_000):
        self.max_entries = max_entries
        self.max_uses = max_uses
        self._entries = {}
        self._lock = threading.Lock()

    def get(self, cache_key):
        with self._lock:
            entry = self._entries.get(cache_key)
            if entry is None:
                return None
            key, expires_at, uses = entry
            if time.monotonic() >= expires_at or uses >= self.max_uses:
                del self._entries[cache_key]
                return None
            self._entries[cache_key] = (key, expires_at, uses + 1)
            return key

    def put(self, cache_key, key):
        ttl = settings.GATECO_DATA_KEY_CACHE_SECONDS
        if ttl <= 0:
            return
        with self._lock:
            if len(self._entries) >= self.max_entries:
                # Drop the entry closest to expiry to make room.
                oldest = min(self._entries, key=lambda k: self._entries[k][1])
                del self._entries[oldest]
            self._entries[cache_key] = (key, time.monotonic() + ttl, 0)

    def clear(self):
        with self._lock:
            self._entries.clear()

    def forget(self, organization_id):
        """Drop every cached data key of one organization."""
        with self._lock:
            for cache_key in [k for k in self._entries if k[0] == str(organization_id)]:
                del self._entries[cache_key]


data_key_cache = DataKeyCache()


def _create_data_key(organization):
    plaintext, wrapped, kek_id = get_key_service().generate_data_key(
        encryption_context(organization.pk)
    )
    try:
        with transaction.atomic():
            data_key = DataKey.objects.create(
                organization=organization, wrapped_key=wrapped, kek_id=kek_id
            )
    except IntegrityError:
        # Another process created it first; use theirs.
        return _unwrap(DataKey.objects.get(organization=organization))
    logger.info("Created a data key for organization %s", organization.pk)
    data_key_cache.put(cache_key_of(data_key), plaintext)
    return plaintext


def cache_key_of(data_key):
    return (str(data_key.organization_id), hashlib.sha256(bytes(data_key.wrapped_key)).digest())


def unwrap_data_key(data_key):
    """Return the plaintext of `data_key`, from the cache when it is there."""
    return _unwrap(data_key)


def _unwrap(data_key):
    cache_key = cache_key_of(data_key)
    plaintext = data_key_cache.get(cache_key)
    if plaintext is None:
        plaintext = get_key_service().decrypt_data_key(
            data_key.wrapped_key,
            encryption_context(data_key.organization_id),
            data_key.kek_id,
        )
        data_key_cache.put(cache_key, plaintext)
    return plaintext


@sensitive_variables("value", "key")
def store_secret(organization, purpose, reference, value, check_status=""):
    """Seal `value` and store it, replacing any earlier secret for the record."""
    data_key = DataKey.objects.filter(organization=organization).first()
    try:
        if data_key is None:
            key = _create_data_key(organization)
        else:
            key = _unwrap(data_key)
    except KeyServiceError as error:
        raise SecretUnavailable(
            organization.pk,
            purpose,
            str(error),
            key_service_unavailable=not isinstance(error, KeyAccessDenied),
        ) from None

    ciphertext = seal(key, organization.pk, purpose, reference, value)
    with transaction.atomic():
        secret = (
            Secret.objects.select_for_update()
            .filter(organization=organization, purpose=purpose, reference=reference)
            .first()
        )
        if secret is None:
            Secret.objects.create(
                organization=organization,
                purpose=purpose,
                reference=reference,
                ciphertext=ciphertext,
                last_four=value[-4:],
                check_status=check_status,
            )
        else:
            secret.ciphertext = ciphertext
            secret.last_four = value[-4:]
            secret.check_status = check_status
            secret.version += 1
            secret.save(
                update_fields=["ciphertext", "last_four", "check_status", "version"]
            )
    logger.info("Stored the %s secret of organization %s", purpose, organization.pk)


def open_secret(organization, purpose, reference):
    """Return the stored secret as a SecretValue, or None if none is stored.

    Raises SecretUnavailable when a secret exists but cannot be opened.
    """
    return open_secret_with_version(organization, purpose, reference)[0]


def open_secret_with_version(organization, purpose, reference):
    """Return `(SecretValue, version)`, or `(None, None)` if none is stored."""
    secret = Secret.objects.filter(
        organization=organization, purpose=purpose, reference=reference
    ).first()
    if secret is None:
        return None, None
    return SecretValue(_open(secret)), secret.version


def _open(secret):
    organization_id = secret.organization_id
    data_key = DataKey.objects.filter(organization_id=organization_id).first()
    if data_key is None:
        raise SecretUnavailable(organization_id, secret.purpose, "its data key is gone")
    try:
        key = _unwrap(data_key)
    except KeyAccessDenied as error:
        raise SecretUnavailable(organization_id, secret.purpose, str(error)) from None
    except KeyServiceError as error:
        raise SecretUnavailable(
            organization_id, secret.purpose, str(error), key_service_unavailable=True
        ) from None

    return unseal(key, secret)


@sensitive_variables("key", "value")
def seal(key, organization_id, purpose, reference, value):
    """Return the versioned blob of `value` sealed for one record."""
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(
        nonce, value.encode(), associated_data(organization_id, purpose, reference)
    )
    return bytes([SEAL_VERSION]) + nonce + sealed


@sensitive_variables("key")
def unseal(key, secret):
    """Return the plaintext of `secret`, or raise SecretUnavailable."""
    blob = bytes(secret.ciphertext)
    if not blob or blob[0] != SEAL_VERSION:
        raise SecretUnavailable(secret.organization_id, secret.purpose, "unknown format")
    nonce, sealed = blob[1 : 1 + NONCE_BYTES], blob[1 + NONCE_BYTES :]
    try:
        plaintext = AESGCM(key).decrypt(
            nonce,
            sealed,
            associated_data(secret.organization_id, secret.purpose, secret.reference),
        )
    except InvalidTag:
        raise SecretUnavailable(
            secret.organization_id,
            secret.purpose,
            "the ciphertext does not match its record",
        ) from None
    return plaintext.decode()


def delete_secret(organization, purpose, reference):
    deleted, _ = Secret.objects.filter(
        organization=organization, purpose=purpose, reference=reference
    ).delete()
    if deleted:
        logger.info("Deleted the %s secret of organization %s", purpose, organization.pk)
    return bool(deleted)


def secret_status(organization, purpose, reference):
    """Return `(is_set, last_four)` without opening the secret."""
    secret = secret_row(organization, purpose, reference)
    if secret is None:
        return False, ""
    return True, secret.last_four


def secret_row(organization, purpose, reference):
    """Return the Secret row without its ciphertext, or None."""
    return (
        Secret.objects.filter(
            organization=organization, purpose=purpose, reference=reference
        )
        .only("last_four", "check_status", "version")
        .first()
    )


@sensitive_variables("value")
def set_llm_api_key(organization, value, check_status=""):
    store_secret(
        organization, Purpose.LLM_API_KEY, str(organization.pk), value, check_status
    )


def get_llm_api_key(organization):
    return open_secret(organization, Purpose.LLM_API_KEY, str(organization.pk))


def get_llm_api_key_with_version(organization):
    return open_secret_with_version(
        organization, Purpose.LLM_API_KEY, str(organization.pk)
    )


def clear_llm_api_key(organization):
    return delete_secret(organization, Purpose.LLM_API_KEY, str(organization.pk))


def llm_api_key_status(organization):
    return secret_status(organization, Purpose.LLM_API_KEY, str(organization.pk))


def llm_api_key_row(organization):
    return secret_row(organization, Purpose.LLM_API_KEY, str(organization.pk))
