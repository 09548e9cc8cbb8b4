"""Key services that create and unwrap per-organization data keys.

Both backends bind every wrapped data key to an encryption context, and unwrap
it only under the same context. Gateco uses `{"organization_id": "<uuid>"}`, so
one organization's context can never open another organization's data key.
"""

import base64
import functools
import hashlib
import json
import logging
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)


class KeyServiceError(Exception):
    """The key service could not create or unwrap a data key."""


class KeyServiceUnavailable(KeyServiceError):
    """The key service could not be reached or failed; a retry may succeed."""


class KeyAccessDenied(KeyServiceError):
    """The key service rejected the request: wrong context, key or permission."""


def canonical_context(context):
    """Serialize an encryption context the same way every time."""
    return json.dumps(context, sort_keys=True, separators=(",", ":")).encode()


def local_key_id(kek):
    return "local:" + hashlib.sha256(b"gateco-kek-id" + kek).hexdigest()[:16]


class LocalKeyService:
    """Wraps data keys with AES-256-GCM under a local key-encryption key.

    The wrapped form is `b"GLK1" | kek_id (8 bytes) | nonce (12) | ciphertext`,
    with the canonical encryption context as associated data, so unwrapping
    under any other context fails the GCM tag check, as it does in AWS KMS.
    `previous_keks` still unwrap, so data keys can be re-wrapped after the
    key-encryption key changes; new data keys are wrapped with `kek` only.
    """

    MAGIC = b"GLK1"

    def __init__(self, kek, previous_keks=()):
        self._keys = {}
        for candidate in [kek, *previous_keks]:
            if len(candidate) != 32:
                raise ImproperlyConfigured(
                    "A local key-encryption key must be 32 bytes, got "
                    f"{len(candidate)}."
                )
            tag = bytes.fromhex(local_key_id(candidate).removeprefix("local:"))[:8]
            self._keys.setdefault(tag, AESGCM(candidate))
        self.key_id = local_key_id(kek)
        self._kek_tag = bytes.fromhex(self.key_id.removeprefix("local:"))[:8]

    def generate_data_key(self, context):
        """Return `(plaintext_key, wrapped_key, key_id)` for a new data key."""
        plaintext = AESGCM.generate_key(bit_length=256)
        wrapped, key_id = self.wrap_data_key(plaintext, context)
        return plaintext, wrapped, key_id

    def wrap_data_key(self, plaintext, context):
        """Return `(wrapped_key, key_id)` of `plaintext` under the current key."""
        nonce = os.urandom(12)
        sealed = self._keys[self._kek_tag].encrypt(
            nonce, plaintext, canonical_context(context)
        )
        return self.MAGIC + self._kek_tag + nonce + sealed, self.key_id

    def decrypt_data_key(self, wrapped, context, key_id=None):
        wrapped = bytes(wrapped)
        aead = self._keys.get(wrapped[4:12])
        if wrapped[:4] != self.MAGIC or aead is None:
            raise KeyAccessDenied(
                "The data key was not wrapped by a configured key-encryption key."
            )
        nonce, sealed = wrapped[12:24], wrapped[24:]
        try:
            return aead.decrypt(nonce, sealed, canonical_context(context))
        except InvalidTag:
            raise KeyAccessDenied(
                "The data key does not open under this encryption context."
            ) from None


class DropResponseBodies(logging.Filter):
    """A filter that drops botocore's DEBUG record of each raw response body.

    KMS GenerateDataKey and Decrypt responses carry the plaintext data key, and
    botocore 1.44 logs every response body at DEBUG, so LOG_LEVEL=DEBUG would
    otherwise write unwrapped data keys to the log.
    """

    def filter(self, record):
        return not (
            isinstance(record.msg, str) and record.msg.startswith("Response body")
        )


_drop_response_bodies = DropResponseBodies()


def hide_botocore_response_bodies():
    """Attach DropResponseBodies to the botocore.parsers logger, once."""
    parsers_logger = logging.getLogger("botocore.parsers")
    if _drop_response_bodies not in parsers_logger.filters:
        parsers_logger.addFilter(_drop_response_bodies)


class AwsKmsKeyService:
    """Wraps data keys with AWS KMS through boto3.

    boto3 reads the region and endpoint from its usual settings, so
    AWS_ENDPOINT_URL_KMS can point it at a KMS-compatible server.
    """

    def __init__(self, key_id, region=None):
        import boto3
        from botocore.config import Config

        hide_botocore_response_bodies()
        self.key_id = key_id
        self._client = boto3.client(
            "kms",
            region_name=region or None,
            config=Config(
                connect_timeout=3, read_timeout=5, retries={"max_attempts": 2}
            ),
        )

    def generate_data_key(self, context):
        response = self._call(
            "generate_data_key",
            KeyId=self.key_id,
            KeySpec="AES_256",
            EncryptionContext=context,
        )
        return response["Plaintext"], response["CiphertextBlob"], response["KeyId"]

    def wrap_data_key(self, plaintext, context):
        response = self._call(
            "encrypt", KeyId=self.key_id, Plaintext=plaintext, EncryptionContext=context
        )
        return response["CiphertextBlob"], response["KeyId"]

    def decrypt_data_key(self, wrapped, context, key_id=None):
        response = self._call(
            "decrypt",
            CiphertextBlob=bytes(wrapped),
            EncryptionContext=context,
            KeyId=key_id or self.key_id,
        )
        return response["Plaintext"]

    def _call(self, operation, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, operation)(**kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            logger.warning("KMS %s failed with %s", operation, code)
            if code in {
                "AccessDeniedException",
                "InvalidCiphertextException",
                "IncorrectKeyException",
                "NotFoundException",
                "DisabledException",
                "KMSInvalidStateException",
            }:
                raise KeyAccessDenied(f"KMS {operation} was rejected: {code}.") from None
            raise KeyServiceUnavailable(f"KMS {operation} failed: {code}.") from None
        except BotoCoreError as error:
            logger.warning("KMS %s failed: %s", operation, type(error).__name__)
            raise KeyServiceUnavailable(
                f"KMS {operation} failed: {type(error).__name__}."
            ) from None


def decode_kek(encoded, setting_name):
    try:
        return base64.b64decode(encoded, validate=True)
    except ValueError:
        raise ImproperlyConfigured(
            f"{setting_name} is not valid base64; generate a key with "
            "`python -c 'import base64, os; print(base64.b64encode(os.urandom(32)).decode())'`."
        ) from None


def load_local_kek():
    """Return the local key-encryption key from settings or its file."""
    if settings.GATECO_LOCAL_KEK:
        encoded = settings.GATECO_LOCAL_KEK
    else:
        path = settings.GATECO_LOCAL_KEK_DEFAULT_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(base64.b64encode(os.urandom(32)).decode())
            logger.info("Created the local key-encryption key file %s", path)
        encoded = path.read_text().strip()
    return decode_kek(encoded, "GATECO_LOCAL_KEK")


@functools.cache
def get_key_service():
    """Return the configured key service, built once per process."""
    if settings.GATECO_KMS_BACKEND == "aws":
        return AwsKmsKeyService(settings.GATECO_KMS_KEY_ID, settings.GATECO_KMS_REGION)
    previous = [
        decode_kek(encoded, "GATECO_LOCAL_KEK_PREVIOUS")
        for encoded in settings.GATECO_LOCAL_KEK_PREVIOUS
    ]
    return LocalKeyService(load_local_kek(), previous)
