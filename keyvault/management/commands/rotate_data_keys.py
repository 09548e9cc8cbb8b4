from datetime import datetime, timezone as dt_timezone

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from keyvault.kms import KeyServiceError
from keyvault.models import DataKey
from keyvault.rotation import rotate_data_key
from keyvault.vault import SecretUnavailable
from orgs.models import Organization


class Command(BaseCommand):
    help = (
        "Give organizations new data keys and re-seal their secrets. Each "
        "organization is rotated in its own transaction; rerun with the same "
        "--created-before to resume an interrupted run."
    )

    def add_arguments(self, parser):
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--organization", help="Slug of one organization.")
        target.add_argument(
            "--all", action="store_true", help="Every organization with a data key."
        )
        parser.add_argument(
            "--created-before",
            help="Rotate only data keys created before this ISO 8601 time "
            "(default: when the command starts).",
        )
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be rotated."
        )

    def handle(self, *args, **options):
        cutoff = self.parse_cutoff(options["created_before"])
        data_keys = DataKey.objects.filter(created_at__lt=cutoff).order_by("pk")
        if options["organization"]:
            organization = Organization.objects.filter(slug=options["organization"]).first()
            if organization is None:
                raise CommandError(f"Organization {options['organization']!r} was not found.")
            data_keys = data_keys.filter(organization=organization)

        pending = list(data_keys.values_list("organization_id", flat=True))
        if options["dry_run"]:
            self.stdout.write(f"{len(pending)} data keys would be rotated.")
            return

        rotated = failed = 0
        for organization in Organization.objects.filter(pk__in=pending).order_by("pk"):
            try:
                count = rotate_data_key(organization)
            except (KeyServiceError, SecretUnavailable) as error:
                failed += 1
                self.stderr.write(f"{organization.slug}: not rotated: {error}")
                continue
            rotated += 1
            self.stdout.write(f"{organization.slug}: rotated, {count} secrets re-sealed.")
        self.stdout.write(f"Rotated {rotated} data keys; {failed} failed.")
        if failed:
            raise CommandError(f"{failed} data keys could not be rotated; rerun to retry.")

    def parse_cutoff(self, value):
        if not value:
            return timezone.now()
        try:
            cutoff = datetime.fromisoformat(value)
        except ValueError:
            raise CommandError(f"--created-before {value!r} is not an ISO 8601 time.") from None
        if timezone.is_naive(cutoff):
            cutoff = timezone.make_aware(cutoff, dt_timezone.utc)
        return cutoff
