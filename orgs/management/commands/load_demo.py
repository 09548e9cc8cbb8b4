import json
import secrets
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from orgs.models import ApiKey, Membership, Organization, Role, Tier
from retrieval.ingest import Document, ingest_documents
from retrieval.models import Connector, Effect, Policy, PolicyStatus, Principal

DEMO_DOCUMENTS = Path(settings.BASE_DIR) / "demo" / "documents"
DEMO_API_KEY_NAME = "demo"

PRINCIPALS = [
    {
        "external_id": "alice@acme.test",
        "display_name": "Alice Moreno (finance analyst)",
        "email": "alice@acme.test",
        "roles": ["employee", "analyst"],
        "groups": ["finance"],
        "attributes": {"department": "finance", "clearance": "confidential"},
    },
    {
        "external_id": "bob@acme.test",
        "display_name": "Bob Okafor (platform engineer)",
        "email": "bob@acme.test",
        "roles": ["employee", "engineer"],
        "groups": ["engineering"],
        "attributes": {"department": "engineering", "clearance": "internal"},
    },
]


def condition(field, operator, value):
    return {"field": field, "operator": operator, "value": value}


POLICIES = [
    {
        "name": "Everyone reads public documents",
        "effect": Effect.ALLOW,
        "rules": [{"conditions": [condition("resource.classification", "eq", "public")]}],
    },
    {
        "name": "Employees read internal documents",
        "effect": Effect.ALLOW,
        "rules": [
            {
                "conditions": [
                    condition("resource.classification", "eq", "internal"),
                    condition("principal.roles", "contains", "employee"),
                ]
            }
        ],
    },
    {
        "name": "Finance reads finance documents up to its clearance",
        "effect": Effect.ALLOW,
        "rules": [
            {
                "conditions": [
                    condition("resource.labels", "contains", "finance"),
                    condition("principal.department", "eq", "finance"),
                    condition("resource.classification", "lte", "{{principal.clearance}}"),
                ]
            }
        ],
    },
    {
        "name": "HR reads HR documents",
        "effect": Effect.ALLOW,
        "rules": [
            {
                "conditions": [
                    condition("resource.labels", "contains", "hr"),
                    condition("principal.department", "eq", "hr"),
                ]
            }
        ],
    },
    {
        "name": "Restricted documents need restricted clearance",
        "effect": Effect.DENY,
        "rules": [
            {
                "conditions": [
                    condition("resource.classification", "eq", "restricted"),
                    condition("principal.clearance", "ne", "restricted"),
                ]
            }
        ],
    },
]


class Command(BaseCommand):
    help = (
        "Load the demo organization (team tier): documents, two principals, "
        "policies, an admin sign-in and a fresh API key. Running it again "
        "updates the same rows instead of adding new ones."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--base-url",
            default="http://127.0.0.1:8000",
            help="Where the service will listen, for the printed links.",
        )

    def handle(self, *args, **options):
        with transaction.atomic():
            organization, _ = Organization.objects.update_or_create(
                slug="acme", defaults={"name": "Acme Health", "tier": Tier.TEAM}
            )
            password = self.load_admin(organization)
            principals = self.load_principals(organization)
            connector, _ = Connector.objects.get_or_create(
                organization=organization, name="handbook"
            )
            ingest_documents(connector, self.read_documents())
            self.load_policies(organization)
            raw_key = self.issue_api_key(organization)

        self.print_summary(options["base_url"], password, raw_key, connector, principals)

    def load_admin(self, organization):
        user, _ = get_user_model().objects.get_or_create(username="admin")
        user.is_staff = True
        user.is_superuser = True
        # A new password each run: the demo prints it rather than shipping one.
        password = secrets.token_urlsafe(12)
        user.set_password(password)
        user.save()
        Membership.objects.update_or_create(
            user=user, organization=organization, defaults={"role": Role.OWNER}
        )
        return password

    def load_principals(self, organization):
        principals = []
        for fields in PRINCIPALS:
            principal, _ = Principal.objects.update_or_create(
                organization=organization,
                external_id=fields["external_id"],
                defaults={k: v for k, v in fields.items() if k != "external_id"},
            )
            principals.append(principal)
        return principals

    def read_documents(self):
        documents = []
        for path in sorted(DEMO_DOCUMENTS.glob("*.md")):
            metadata = json.loads(path.with_name(path.name + ".meta.json").read_text())
            text = path.read_text()
            documents.append(
                Document(
                    external_id=path.name,
                    title=text.splitlines()[0].lstrip("# ").strip(),
                    text=text,
                    classification=metadata["classification"],
                    labels=metadata["labels"],
                    owner=metadata.get("owner", ""),
                )
            )
        return documents

    def load_policies(self, organization):
        for fields in POLICIES:
            Policy.objects.update_or_create(
                organization=organization,
                name=fields["name"],
                defaults={
                    "effect": fields["effect"],
                    "rules": fields["rules"],
                    "status": PolicyStatus.ACTIVE,
                    "type": Policy.Type.ABAC,
                },
            )

    def issue_api_key(self, organization):
        # Only digests are stored, so the old demo key cannot be printed again:
        # revoke it and issue a new one.
        ApiKey.objects.filter(
            organization=organization, name=DEMO_API_KEY_NAME, revoked_at__isnull=True
        ).update(revoked_at=timezone.now())
        _, raw_key = ApiKey.issue(organization, DEMO_API_KEY_NAME)
        return raw_key

    def print_summary(self, base_url, password, raw_key, connector, principals):
        alice, bob = principals
        request = {
            "query": "What was revenue in the third quarter?",
            "principal_id": alice.external_id,
            "connector_id": str(connector.id),
        }
        curl = (
            f"curl -s -X POST {base_url}/api/answers/execute \\\n"
            f"  -H 'X-API-Key: {raw_key}' -H 'Content-Type: application/json' \\\n"
            f"  -d '{json.dumps(request)}'"
        )
        self.stdout.write(
            "\n".join(
                [
                    "",
                    "Demo organization loaded: Acme Health (team tier).",
                    f"  Settings page: {base_url}/settings/api-keys/",
                    f"  Admin:         {base_url}/admin/",
                    f"  API:           {base_url}/api/answers/execute",
                    f"  Sign in as:    admin / {password}",
                    f"  API key:       {raw_key}  (shown once; rerun to get a new one)",
                    f"  Connector:     {connector.id}",
                    f"  Principals:    {alice.external_id} (finance, may read the "
                    f"Q3 financials), {bob.external_id} (engineering, may not)",
                    "",
                    "Ask a Grounded Answer as Alice:",
                    curl,
                    "",
                    f"Ask the same as Bob (expect outcome no_access): replace "
                    f"{alice.external_id} with {bob.external_id}.",
                    "",
                ]
            )
        )
