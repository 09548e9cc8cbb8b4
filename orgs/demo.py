"""The demo organization: documents, two principals and the policies between them.

Tests build their organizations from the same data, so the demo and the test
suite exercise one set of policies.
"""

import json
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction

from retrieval.ingest import Document, ingest_documents
from retrieval.models import Connector, Effect, Policy, PolicyStatus, Principal

from .models import Organization, Tier

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



@dataclass
class DemoOrganization:
    organization: Organization
    connector: Connector
    alice: Principal
    bob: Principal


def read_demo_documents():
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


@transaction.atomic
def load_demo_organization(slug="acme", name="Acme Health", tier=Tier.TEAM):
    """Create or update the demo organization and return its parts."""
    organization, _ = Organization.objects.update_or_create(
        slug=slug, defaults={"name": name, "tier": tier}
    )
    principals = {}
    for fields in PRINCIPALS:
        principal, _ = Principal.objects.update_or_create(
            organization=organization,
            external_id=fields["external_id"],
            defaults={k: v for k, v in fields.items() if k != "external_id"},
        )
        principals[fields["external_id"]] = principal
    connector, _ = Connector.objects.get_or_create(
        organization=organization, name="handbook"
    )
    ingest_documents(connector, read_demo_documents())
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
    return DemoOrganization(
        organization=organization,
        connector=connector,
        alice=principals["alice@acme.test"],
        bob=principals["bob@acme.test"],
    )
