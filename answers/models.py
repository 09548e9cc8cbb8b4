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
