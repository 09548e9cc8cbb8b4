import json
import secrets

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from orgs.demo import load_demo_organization
from orgs.models import ApiKey, Membership, Role

DEMO_API_KEY_NAME = "demo"


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
            demo = load_demo_organization()
            password = self.load_admin(demo.organization)
            raw_key = self.issue_api_key(demo.organization)

        self.print_summary(options["base_url"], password, raw_key, demo)

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

    def issue_api_key(self, organization):
        # Only digests are stored, so the old demo key cannot be printed again:
        # revoke it and issue a new one.
        ApiKey.objects.filter(
            organization=organization, name=DEMO_API_KEY_NAME, revoked_at__isnull=True
        ).update(revoked_at=timezone.now())
        _, raw_key = ApiKey.issue(organization, DEMO_API_KEY_NAME)
        return raw_key

    def print_summary(self, base_url, password, raw_key, demo):
        alice, bob, connector = demo.alice, demo.bob, demo.connector
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
