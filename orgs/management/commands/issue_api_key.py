from django.core.management.base import BaseCommand, CommandError

from orgs.models import ApiKey, Organization


class Command(BaseCommand):
    help = "Issue an API key for an organization and print it once."

    def add_arguments(self, parser):
        parser.add_argument("organization", help="Slug of the organization.")
        parser.add_argument("--name", default="api", help="A label for the key.")

    def handle(self, *args, **options):
        organization = Organization.objects.filter(slug=options["organization"]).first()
        if organization is None:
            raise CommandError(f"Organization {options['organization']!r} was not found.")
        api_key, raw_key = ApiKey.issue(organization, options["name"])
        self.stderr.write(
            f"Issued key {api_key.prefix}… for {organization.name}. It is shown only "
            "once; store it now."
        )
        self.stdout.write(raw_key)
