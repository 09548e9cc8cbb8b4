"""Idempotency-Key handling for answer requests.

The first request with a key claims it by inserting a row (the unique
constraint decides races between processes), runs, and stores its response.
Later requests with the same key get the stored response. Responses that a
retry may change (429 and 5xx) are not stored, so the key can be used again.
"""

import hashlib
import json
import re

from django.db import IntegrityError, transaction
from django.utils import timezone

from gateco.errors import ApiError, ValidationFailed

from .models import IdempotentRequest

HEADER = "Idempotency-Key"
KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")


class IdempotencyKeyReused(ApiError):
    status_code = 422
    code = "IDEMPOTENCY_KEY_REUSED"
    default_message = (
        "This Idempotency-Key was already used for a different request; use a new "
        "key for a new request."
    )


class IdempotencyInProgress(ApiError):
    status_code = 409
    code = "IDEMPOTENCY_IN_PROGRESS"
    default_message = (
        "A request with this Idempotency-Key is still running; retry in a moment."
    )


def fingerprint(data):
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_stored(status_code):
    return status_code != 429 and status_code < 500


def run_once(organization, key, data, compute):
    """Return `(status, body, headers)` from `compute()`, run once per stored key.

    `compute` returns the same triple. Without a key it simply runs. A result
    that is not stored (429 or 5xx) frees the key, so a retry runs again.
    """
    if key is None:
        return compute()
    if not KEY_PATTERN.fullmatch(key):
        raise ValidationFailed(
            f"{HEADER} must be 1 to 255 printable ASCII characters without spaces."
        )

    request_fingerprint = fingerprint(data)
    record = None
    # A claim can lose to a request whose row is deleted again right after
    # (its result was not stored), so try to claim a few times.
    for _ in range(3):
        try:
            with transaction.atomic():
                record = IdempotentRequest.objects.create(
                    organization=organization, key=key, fingerprint=request_fingerprint
                )
            break
        except IntegrityError:
            stored = replay(organization, key, request_fingerprint)
            if stored is not None:
                return stored
    if record is None:
        raise IdempotencyInProgress(headers={"Retry-After": "1"})

    try:
        status, body, headers = compute()
    except BaseException:
        record.delete()
        raise
    if not is_stored(status):
        record.delete()
        return status, body, headers

    record.status_code = status
    record.response_body = body
    record.response_headers = headers
    record.completed_at = timezone.now()
    record.save(
        update_fields=["status_code", "response_body", "response_headers", "completed_at"]
    )
    return status, body, headers


def replay(organization, key, request_fingerprint):
    """Return the stored response for `key`, or None if its row is gone."""
    record = IdempotentRequest.objects.filter(organization=organization, key=key).first()
    if record is None:
        return None
    if record.fingerprint != request_fingerprint:
        raise IdempotencyKeyReused()
    if record.completed_at is None:
        # NOTE: a process that dies mid-request leaves its row incomplete, and
        # the key then stays in progress; nothing expires such rows yet.
        raise IdempotencyInProgress(headers={"Retry-After": "1"})
    return (
        record.status_code,
        record.response_body,
        {**record.response_headers, "Idempotent-Replayed": "true"},
    )
