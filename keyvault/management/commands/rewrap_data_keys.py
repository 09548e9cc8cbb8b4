from django.core.management.base import BaseCommand, CommandError

from keyvault.kms import KeyServiceError, get_key_service
from keyvault.models import DataKey
from keyvault.rotation import rewrap_data_key


class Command(BaseCommand):
    help = (
        "Re-wrap every data key under the current key-encryption key "
        "(GATECO_KMS_KEY_ID, or GATECO_LOCAL_KEK with the old key in "
        "GATECO_LOCAL_KEK_PREVIOUS). Keys already under it are skipped, so an "
        "interrupted run resumes when started again."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--dry-run", action="store_true", help="Count what would be re-wrapped."
        )

    def handle(self, *args, **options):
        current = get_key_service().key_id
        pending = DataKey.objects.exclude(kek_id=current).order_by("pk")
        if options["dry_run"]:
            self.stdout.write(f"{pending.count()} data keys would be re-wrapped under {current}.")
            return

        rewrapped = failed = 0
        # Iterate over ids so each row is re-read just before it is re-wrapped.
        for pk in list(pending.values_list("pk", flat=True)):
            data_key = DataKey.objects.filter(pk=pk).first()
            if data_key is None:
                continue
            try:
                if rewrap_data_key(data_key):
                    rewrapped += 1
            except KeyServiceError as error:
                failed += 1
                self.stderr.write(f"organization {data_key.organization_id}: {error}")
        self.stdout.write(f"Re-wrapped {rewrapped} data keys under {current}; {failed} failed.")
        if failed:
            raise CommandError(f"{failed} data keys could not be re-wrapped; rerun to retry.")
