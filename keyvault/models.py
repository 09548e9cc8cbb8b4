from django.db import models
from django.utils import timezone

from orgs.models import Organization


class Purpose(models.TextChoices):
    LLM_API_KEY = "llm_api_key", "LLM API key"
    CONNECTOR_CREDENTIAL = "connector_credential", "Connector credential"


class DataKey(models.Model):
    """An organization's data key, stored only as wrapped by the key service."""

    organization = models.OneToOneField(
        Organization, on_delete=models.CASCADE, related_name="data_key"
    )
    wrapped_key = models.BinaryField()
    # The id of the key-encryption key that wrapped it (a KMS key ARN, or the
    # fingerprint of the local key).
    kek_id = models.CharField(max_length=300)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    def __str__(self):
        return f"Data key of {self.organization_id}"


class Secret(models.Model):
    """A secret an organization handed us, sealed under its data key.

    `ciphertext` is `version (1 byte) | nonce (12) | AES-256-GCM output`; the
    associated data binds it to this organization, purpose and reference, so
    a copy moved to another row does not open.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="secrets"
    )
    purpose = models.CharField(max_length=40, choices=Purpose.choices)
    # The record the secret belongs to: the organization id for its LLM key, a
    # connector id for a connector credential.
    reference = models.CharField(max_length=100)
    ciphertext = models.BinaryField()
    last_four = models.CharField(max_length=4, blank=True)
    # Counts replacements, so audit rows can name which key paid without it.
    version = models.PositiveIntegerField(default=1)
    # The result of checking the key with its provider when it was saved:
    # "valid", or "unverified" when the provider could not be reached.
    check_status = models.CharField(max_length=20, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "purpose", "reference"],
                name="one_secret_per_purpose_and_reference",
            )
        ]

    def __str__(self):
        return f"{self.get_purpose_display()} of {self.organization_id}"
