"""Data-key rotation, re-wrapping and verification.

Each operation works on one organization at a time in its own transaction, so
an interrupted run leaves every organization either fully done or untouched,
and running the same command again picks up where it stopped.
"""

import logging
from dataclasses import dataclass, field

from django.db import transaction
from django.utils import timezone
from django.views.decorators.debug import sensitive_variables

from .kms import KeyServiceError, get_key_service
from .models import DataKey, Secret
from .vault import (
    SecretUnavailable,
    cache_key_of,
    data_key_cache,
    encryption_context,
    seal,
    unseal,
    unwrap_data_key,
)

logger = logging.getLogger(__name__)


@dataclass
class Failure:
    organization_id: str
    purpose: str
    reference: str
    reason: str


@dataclass
class VerifyReport:
    opened: int = 0
    failures: list = field(default_factory=list)


@sensitive_variables("old_key", "new_key", "plaintexts")
def rotate_data_key(organization):
    """Replace the organization's data key and re-seal its secrets with it.

    Returns the number of secrets re-sealed. The old wrapped key and every old
    ciphertext are overwritten in the same transaction.
    """
    with transaction.atomic():
        data_key = DataKey.objects.select_for_update().get(organization=organization)
        secrets = list(
            Secret.objects.select_for_update().filter(organization=organization)
        )
        old_key = unwrap_data_key(data_key)
        plaintexts = [unseal(old_key, secret) for secret in secrets]

        context = encryption_context(organization.pk)
        new_key, wrapped, kek_id = get_key_service().generate_data_key(context)
        old_cache_key = cache_key_of(data_key)
        data_key.wrapped_key = wrapped
        data_key.kek_id = kek_id
        data_key.created_at = timezone.now()
        data_key.save(update_fields=["wrapped_key", "kek_id", "created_at"])
        for secret, plaintext in zip(secrets, plaintexts):
            secret.ciphertext = seal(
                new_key, organization.pk, secret.purpose, secret.reference, plaintext
            )
            secret.save(update_fields=["ciphertext"])

    data_key_cache.forget(organization.pk)
    data_key_cache.put(cache_key_of(data_key), new_key)
    logger.info(
        "Rotated the data key of organization %s (%d secrets re-sealed, old cache "
        "entry %s dropped)",
        organization.pk,
        len(secrets),
        old_cache_key[1].hex()[:8],
    )
    return len(secrets)


@sensitive_variables("plaintext")
def rewrap_data_key(data_key):
    """Wrap an existing data key under the current key-encryption key.

    The data key itself does not change, so no secret needs re-sealing.
    Returns False when it was already wrapped by the current key.
    """
    service = get_key_service()
    if data_key.kek_id == service.key_id:
        return False
    plaintext = unwrap_data_key(data_key)
    wrapped, kek_id = service.wrap_data_key(
        plaintext, encryption_context(data_key.organization_id)
    )
    # Only replace the row if no rotation changed it since it was read.
    updated = DataKey.objects.filter(
        pk=data_key.pk, wrapped_key=data_key.wrapped_key
    ).update(wrapped_key=wrapped, kek_id=kek_id)
    logger.info(
        "Re-wrapped the data key of organization %s under %s",
        data_key.organization_id,
        kek_id,
    )
    return bool(updated)


def verify_secrets(secrets):
    """Open every secret in `secrets` and report which ones fail, never what they hold."""
    report = VerifyReport()
    for secret in secrets:
        try:
            data_key = DataKey.objects.get(organization_id=secret.organization_id)
            unseal(unwrap_data_key(data_key), secret)
        except DataKey.DoesNotExist:
            reason = "its data key is gone"
        except (KeyServiceError, SecretUnavailable) as error:
            reason = str(error)
        else:
            report.opened += 1
            continue
        report.failures.append(
            Failure(
                str(secret.organization_id), secret.purpose, secret.reference, reason
            )
        )
    return report
