from django.core.management.base import BaseCommand, CommandError

from keyvault.models import Secret
from keyvault.rotation import verify_secrets
from orgs.models import Organization


class Command(BaseCommand):
    help = (
        "Check that every stored secret opens. Prints the organization, purpose "
        "and record of each failure, never a secret, and exits with an error "
        "if any fail."
    )

    def add_arguments(self, parser):
        parser.add_argument("--organization", help="Slug of one organization.")
        parser.add_argument(
            "--dry-run", action="store_true", help="Count the secrets without opening them."
        )

    def handle(self, *args, **options):
        secrets = Secret.objects.order_by("organization_id", "purpose", "reference")
        if options["organization"]:
            organization = Organization.objects.filter(slug=options["organization"]).first()
            if organization is None:
                raise CommandError(f"Organization {options['organization']!r} was not found.")
            secrets = secrets.filter(organization=organization)

        if options["dry_run"]:
            self.stdout.write(f"{secrets.count()} secrets would be checked.")
            return

        report = verify_secrets(secrets.iterator(chunk_size=500))
        for failure in report.failures:
            self.stderr.write(
                f"organization {failure.organization_id} {failure.purpose} "
                f"{failure.reference}: {failure.reason}"
            )
        self.stdout.write(f"{report.opened} secrets open; {len(report.failures)} failed.")
        if report.failures:
            raise CommandError(f"{len(report.failures)} secrets could not be opened.")
