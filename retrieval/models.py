import uuid

from django.core.exceptions import ValidationError
from django.db import models
from django.utils import timezone

from orgs.models import Organization


class Classification(models.TextChoices):
    PUBLIC = "public", "Public"
    INTERNAL = "internal", "Internal"
    CONFIDENTIAL = "confidential", "Confidential"
    RESTRICTED = "restricted", "Restricted"


class Sensitivity(models.TextChoices):
    LOW = "low", "Low"
    MEDIUM = "medium", "Medium"
    HIGH = "high", "High"
    CRITICAL = "critical", "Critical"


class PrincipalStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    INACTIVE = "inactive", "Inactive"
    SUSPENDED = "suspended", "Suspended"


class Principal(models.Model):
    """An end user or agent on whose behalf the AI application sends a query."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="principals"
    )
    external_id = models.CharField(max_length=200)
    display_name = models.CharField(max_length=200, blank=True)
    email = models.EmailField(blank=True)
    roles = models.JSONField(default=list, blank=True)
    groups = models.JSONField(default=list, blank=True)
    attributes = models.JSONField(default=dict, blank=True)
    status = models.CharField(
        max_length=20, choices=PrincipalStatus.choices, default=PrincipalStatus.ACTIVE
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "external_id"],
                name="unique_principal_external_id",
            )
        ]
        indexes = [models.Index(fields=["organization", "email"])]

    def __str__(self):
        return self.display_name or self.external_id


class Connector(models.Model):
    """A document source. Only the built-in connector, which keeps resources
    and chunks in Gateco's own database, exists so far."""

    class Kind(models.TextChoices):
        BUILTIN = "builtin", "Built-in"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="connectors"
    )
    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.BUILTIN)
    # Bumped whenever its chunks change, so in-memory search indexes know to
    # rebuild.
    index_version = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "name"], name="unique_connector_name"
            )
        ]

    def __str__(self):
        return self.name


class Resource(models.Model):
    """A document, with the security metadata that policies decide on."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    connector = models.ForeignKey(
        Connector, on_delete=models.CASCADE, related_name="resources"
    )
    external_id = models.CharField(max_length=500)
    title = models.CharField(max_length=500, blank=True)
    classification = models.CharField(
        max_length=20, choices=Classification.choices, default=Classification.INTERNAL
    )
    sensitivity = models.CharField(
        max_length=20, choices=Sensitivity.choices, default=Sensitivity.LOW
    )
    domain = models.CharField(max_length=100, blank=True)
    labels = models.JSONField(default=list, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    owner = models.ForeignKey(
        Principal,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="owned_resources",
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["connector", "external_id"],
                name="unique_resource_external_id",
            )
        ]

    def __str__(self):
        return self.title or self.external_id


class Chunk(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    resource = models.ForeignKey(
        Resource, on_delete=models.CASCADE, related_name="chunks"
    )
    position = models.PositiveIntegerField()
    text = models.TextField()
    # float32 values, little-endian; empty when the chunk has no embedding.
    embedding = models.BinaryField(blank=True, default=b"")

    class Meta:
        ordering = ["resource_id", "position"]
        constraints = [
            models.UniqueConstraint(
                fields=["resource", "position"], name="unique_chunk_position"
            )
        ]

    def __str__(self):
        return f"{self.resource_id}#{self.position}"


class PolicyStatus(models.TextChoices):
    DRAFT = "draft", "Draft"
    ACTIVE = "active", "Active"
    ARCHIVED = "archived", "Archived"


class Effect(models.TextChoices):
    ALLOW = "allow", "Allow"
    DENY = "deny", "Deny"


class Policy(models.Model):
    """Allows or denies access to resources whose metadata meets its rules.

    `rules` is a list of `{"conditions": [{"field", "operator", "value"}]}`; a
    rule matches when all of its conditions hold, and the policy matches when
    any rule does. Only active policies are enforced.
    """

    class Type(models.TextChoices):
        RBAC = "rbac", "Role-based"
        ABAC = "abac", "Attribute-based"
        REBAC = "rebac", "Relationship-based"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="policies"
    )
    name = models.CharField(max_length=200)
    description = models.TextField(blank=True)
    type = models.CharField(max_length=10, choices=Type.choices, default=Type.ABAC)
    status = models.CharField(
        max_length=20, choices=PolicyStatus.choices, default=PolicyStatus.DRAFT
    )
    effect = models.CharField(max_length=10, choices=Effect.choices)
    # Conditions over resource.* fields that pick the resources the policy
    # applies to; empty means every resource.
    resource_selectors = models.JSONField(default=list, blank=True)
    rules = models.JSONField(default=list)
    version = models.PositiveIntegerField(default=1)
    created_by = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "policies"
        ordering = ["created_at", "id"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "name"], name="unique_policy_name"
            )
        ]

    def __str__(self):
        return self.name

    def clean(self):
        # Imported here because the policy engine imports these models.
        from .policy import PolicyDefinitionError, validate_policy

        try:
            validate_policy(self.rules, self.resource_selectors, self.effect)
        except PolicyDefinitionError as error:
            raise ValidationError({error.field: str(error)}) from None


class Retrieval(models.Model):
    """One policy-filtered retrieval, kept so answers can cite it by id."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="retrievals"
    )
    principal = models.ForeignKey(Principal, null=True, on_delete=models.SET_NULL)
    connector = models.ForeignKey(Connector, null=True, on_delete=models.SET_NULL)
    query = models.TextField()
    search_mode = models.CharField(max_length=20)
    candidates = models.PositiveIntegerField(default=0)
    allowed_chunks = models.PositiveIntegerField(default=0)
    denied_chunks = models.PositiveIntegerField(default=0)
    # "allowed", "denied" or "error_deny"; `reason` explains an error_deny.
    decision = models.CharField(max_length=20)
    reason = models.TextField(blank=True)
    refill_rounds = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    actor = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        indexes = [models.Index(fields=["organization", "created_at"])]


class Relationship(models.Model):
    """A named relation from a principal to a resource, such as "editor".

    Policies read it as `relation.<name>`: true when the principal has that
    relation to the resource being decided (one hop, no inheritance).
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="relationships"
    )
    subject = models.ForeignKey(
        Principal, on_delete=models.CASCADE, related_name="relationships"
    )
    relation_name = models.CharField(max_length=100)
    object = models.ForeignKey(
        Resource, on_delete=models.CASCADE, related_name="relationships"
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["subject", "relation_name", "object"],
                name="unique_relationship",
            )
        ]


class AuditEvent(models.Model):
    """An access decision, written before its results are returned."""

    class Type(models.TextChoices):
        RETRIEVAL_ALLOWED = "retrieval_allowed", "Retrieval allowed"
        RETRIEVAL_DENIED = "retrieval_denied", "Retrieval denied"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="audit_events"
    )
    event_type = models.CharField(max_length=40, choices=Type.choices)
    actor = models.CharField(max_length=100, blank=True)
    principal = models.ForeignKey(Principal, null=True, on_delete=models.SET_NULL)
    retrieval = models.ForeignKey(Retrieval, null=True, on_delete=models.SET_NULL)
    decision = models.CharField(max_length=20)
    details = models.JSONField(default=dict)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["organization", "created_at"])]


class MonthlyUsage(models.Model):
    """Secured retrievals per organization and calendar month (UTC)."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="monthly_usage"
    )
    month = models.DateField(help_text="The first day of the month.")
    retrievals = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "month"], name="one_usage_row_per_month"
            )
        ]
