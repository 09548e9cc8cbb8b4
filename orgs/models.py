import hashlib
import secrets
import uuid

from django.conf import settings
from django.db import models, transaction
from django.db.models import F
from django.utils import timezone


class Tier(models.TextChoices):
    FREE = "free", "Free"
    TEAM = "team", "Team"
    GROWTH = "growth", "Growth"
    ENTERPRISE = "enterprise", "Enterprise"


PAID_TIERS = frozenset({Tier.TEAM, Tier.GROWTH, Tier.ENTERPRISE})


class Organization(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    slug = models.SlugField(max_length=100, unique=True)
    tier = models.CharField(max_length=20, choices=Tier.choices, default=Tier.FREE)
    # Lifetime count of synthesis calls made on the shared platform key. It is
    # never reset: the fallback is a one-off allowance, not a monthly quota.
    fallback_calls_used = models.PositiveIntegerField(default=0)
    # Extra fallback calls granted by support staff, on top of the setting.
    fallback_calls_granted = models.PositiveIntegerField(default=0)
    # A soft cap on answers paid by the organization's own key: answers go on
    # past it and report cap_reached. Saving a new key resets llm_key_uses.
    llm_key_query_cap = models.PositiveIntegerField(null=True, blank=True)
    llm_key_uses = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    @property
    def is_paid(self):
        return self.tier in PAID_TIERS

    @property
    def fallback_call_limit(self):
        if not self.is_paid:
            return 0
        return settings.GATECO_FALLBACK_CALL_LIMIT + self.fallback_calls_granted

    @property
    def fallback_calls_remaining(self):
        return max(self.fallback_call_limit - self.fallback_calls_used, 0)

    def reserve_fallback_call(self):
        """Take one fallback call if any is left; return its ledger entry or None.

        The conditional UPDATE is atomic on PostgreSQL and SQLite alike, so two
        processes racing for the last call cannot both get it. The ledger row
        is written in the same transaction, so the count and the ledger agree.
        """
        with transaction.atomic():
            rows_updated = Organization.objects.filter(
                pk=self.pk,
                fallback_calls_used__lt=F("fallback_calls_granted")
                + settings.GATECO_FALLBACK_CALL_LIMIT,
                tier__in=PAID_TIERS,
            ).update(fallback_calls_used=F("fallback_calls_used") + 1)
            entry = None
            if rows_updated:
                entry = CreditLedgerEntry.objects.create(
                    organization=self, kind=CreditLedgerEntry.Kind.RESERVE, amount=1
                )
        self.refresh_from_db(fields=["fallback_calls_used", "fallback_calls_granted"])
        return entry

    def commit_fallback_call(self, reservation, answer_audit):
        """Record that a reserved call was used for a synthesis; the count stays."""
        return CreditLedgerEntry.objects.create(
            organization=self,
            kind=CreditLedgerEntry.Kind.COMMIT,
            amount=0,
            reservation=reservation,
            answer_audit=answer_audit,
        )

    def release_fallback_call(self, reservation, answer_audit=None):
        """Give back a call reserved for an upstream request that failed."""
        with transaction.atomic():
            Organization.objects.filter(pk=self.pk, fallback_calls_used__gt=0).update(
                fallback_calls_used=F("fallback_calls_used") - 1
            )
            CreditLedgerEntry.objects.create(
                organization=self,
                kind=CreditLedgerEntry.Kind.RELEASE,
                amount=-1,
                reservation=reservation,
                answer_audit=answer_audit,
            )
        self.refresh_from_db(fields=["fallback_calls_used"])

    def grant_fallback_calls(self, amount, reason, granted_by=None):
        """Add `amount` fallback calls to the limit and record who and why."""
        with transaction.atomic():
            Organization.objects.filter(pk=self.pk).update(
                fallback_calls_granted=F("fallback_calls_granted") + amount
            )
            entry = CreditLedgerEntry.objects.create(
                organization=self,
                kind=CreditLedgerEntry.Kind.GRANT,
                amount=amount,
                reason=reason,
                actor=f"user:{granted_by.pk}" if granted_by else "system",
            )
        self.refresh_from_db(fields=["fallback_calls_granted"])
        return entry

    def count_own_key_use(self):
        """Count one answer paid by the organization's key; return cap_reached."""
        Organization.objects.filter(pk=self.pk).update(
            llm_key_uses=F("llm_key_uses") + 1
        )
        self.refresh_from_db(fields=["llm_key_uses"])
        return self.llm_key_query_cap is not None and (
            self.llm_key_uses >= self.llm_key_query_cap
        )


class CreditLedgerEntry(models.Model):
    """One change to an organization's fallback calls.

    A call is reserved (+1 to used) before the upstream request, then either
    committed (the answer was produced) or released (-1, the request failed).
    Grants raise the limit. `fallback_calls_used` always equals the sum of
    the reserve and release amounts.
    """

    class Kind(models.TextChoices):
        RESERVE = "reserve", "Reserve"
        COMMIT = "commit", "Commit"
        RELEASE = "release", "Release"
        GRANT = "grant", "Grant"

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="credit_ledger"
    )
    kind = models.CharField(max_length=10, choices=Kind.choices)
    amount = models.IntegerField()
    reservation = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    answer_audit = models.ForeignKey(
        "answers.AnswerAudit",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="ledger_entries",
    )
    reason = models.TextField(blank=True)
    actor = models.CharField(max_length=100, blank=True)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "credit ledger entries"

    def __str__(self):
        return f"{self.kind} {self.amount:+d} for {self.organization_id}"


class Role(models.TextChoices):
    OWNER = "owner", "Owner"
    ADMIN = "admin", "Admin"
    MEMBER = "member", "Member"


MANAGING_ROLES = frozenset({Role.OWNER, Role.ADMIN})


class Membership(models.Model):
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["user", "organization"], name="one_membership_per_org"
            )
        ]

    def __str__(self):
        return f"{self.user} in {self.organization} ({self.role})"

    @property
    def can_manage(self):
        return self.role in MANAGING_ROLES


API_KEY_SCHEME = "gk_live_"
API_KEY_PREFIX_LENGTH = len(API_KEY_SCHEME) + 8


def hash_api_key(raw_key):
    # The key carries 256 random bits, so a plain SHA-256 is enough: there is
    # nothing to brute-force that a salt or a slow hash would protect.
    return hashlib.sha256(raw_key.encode()).hexdigest()


class ApiKey(models.Model):
    """A credential for API clients, sent in the X-API-Key header.

    Only the SHA-256 digest and a short lookup prefix are stored; the key
    itself is shown once, when it is issued.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_keys"
    )
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=API_KEY_PREFIX_LENGTH, unique=True)
    digest = models.CharField(max_length=64)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @classmethod
    def issue(cls, organization, name, created_by=None):
        """Create a key and return `(api_key, raw_key)`; raw_key is not kept."""
        lookup = secrets.token_hex(4)
        raw_key = f"{API_KEY_SCHEME}{lookup}_{secrets.token_urlsafe(32)}"
        api_key = cls.objects.create(
            organization=organization,
            name=name,
            prefix=raw_key[:API_KEY_PREFIX_LENGTH],
            digest=hash_api_key(raw_key),
            created_by=created_by,
        )
        return api_key, raw_key

    @property
    def is_active(self):
        return self.revoked_at is None


class FallbackCallGrant(CreditLedgerEntry):
    """The grant entries of the ledger, for the admin's grant form."""

    class Meta:
        proxy = True
        verbose_name = "fallback call grant"
