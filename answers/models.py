import uuid

from django.db import models
from django.utils import timezone

from orgs.models import Organization
from retrieval.models import Principal, Retrieval


class KeySource(models.TextChoices):
    ORGANIZATION = "organization", "Organization key"
    FALLBACK = "fallback", "Shared fallback key"


class AnswerAudit(models.Model):
    """One Grounded Answer request: who asked, which key paid, what came out.

    It records where the key came from, never the key.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="answer_audits"
    )
    principal = models.ForeignKey(Principal, null=True, on_delete=models.SET_NULL)
    retrieval = models.ForeignKey(Retrieval, null=True, on_delete=models.SET_NULL)
    actor = models.CharField(max_length=100)
    # Empty when no synthesis was attempted (no_access, nothing retrieved, or
    # no key could be used).
    key_source = models.CharField(max_length=20, choices=KeySource.choices, blank=True)
    # Which stored version of the organization's key paid; never the key.
    key_version = models.PositiveIntegerField(null=True, blank=True)
    model = models.CharField(max_length=100, blank=True)
    outcome = models.CharField(max_length=40)
    error_code = models.CharField(max_length=60, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.outcome} for {self.organization_id} at {self.created_at:%Y-%m-%d %H:%M}"


class IdempotentRequest(models.Model):
    """The first result of an answer request sent with an Idempotency-Key.

    A retry with the same key from the same organization gets this stored
    response: no second upstream request and no second charge.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="idempotent_requests"
    )
    key = models.CharField(max_length=255)
    # SHA-256 of the canonical request body, so a reused key with a different
    # request is rejected instead of answered with someone else's result.
    fingerprint = models.CharField(max_length=64)
    status_code = models.PositiveSmallIntegerField(null=True)
    response_body = models.JSONField(null=True)
    response_headers = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    completed_at = models.DateTimeField(null=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "key"], name="one_request_per_idempotency_key"
            )
        ]
