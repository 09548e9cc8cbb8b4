import json
from pathlib import Path

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from orgs.models import Organization
from retrieval.ingest import Document, ingest_documents
from retrieval.models import Classification, Connector
from retrieval.search_errors import SearchUnavailable

DOCUMENT_SUFFIXES = {".txt", ".md", ".markdown"}
SIDECAR_SUFFIX = ".meta.json"
SIDECAR_KEYS = {"title", "classification", "labels", "owner", "external_id"}


class Command(BaseCommand):
    help = (
        "Load the .txt and .md files under PATH into a built-in connector. "
        "Metadata comes from the options, or from a sidecar file NAME.meta.json "
        "beside a document, whose keys (title, classification, labels, owner, "
        "external_id) override the options for that document."
    )

    def add_arguments(self, parser):
        parser.add_argument("path", help="A folder of documents, or one document.")
        parser.add_argument(
            "--organization", required=True, help="Slug of the organization."
        )
        parser.add_argument(
            "--connector",
            default="documents",
            help="Name of the built-in connector; created if missing (default: documents).",
        )
        parser.add_argument(
            "--classification",
            default=Classification.INTERNAL,
            choices=Classification.values,
            help="Classification of documents without one in a sidecar (default: internal).",
        )
        parser.add_argument(
            "--label",
            action="append",
            default=[],
            dest="labels",
            help="A label for documents without labels in a sidecar; repeat for more.",
        )
        parser.add_argument(
            "--owner", default="", help="External id of the owning principal."
        )

    def handle(self, *args, **options):
        organization = Organization.objects.filter(slug=options["organization"]).first()
        if organization is None:
            raise CommandError(f"Organization {options['organization']!r} was not found.")

        root = Path(options["path"])
        files = self.find_documents(root)
        if not files:
            raise CommandError(f"No .txt or .md files were found under {root}.")
        documents = [self.read_document(root, path, options) for path in files]

        try:
            # One transaction, so a rejected document leaves no new connector.
            with transaction.atomic():
                connector, created = Connector.objects.get_or_create(
                    organization=organization, name=options["connector"]
                )
                resources = ingest_documents(connector, documents)
        except ValidationError as error:
            raise CommandError(f"Nothing was loaded: {error.messages[0]}") from None
        except SearchUnavailable as error:
            raise CommandError(f"Nothing was loaded: {error.message}") from None

        chunk_count = sum(resource.chunks.count() for resource in resources)
        if created:
            self.stdout.write(f"Created connector {connector.name} ({connector.id}).")
        self.stdout.write(
            self.style.SUCCESS(
                f"Loaded {len(resources)} documents ({chunk_count} chunks) into "
                f"connector {connector.name} ({connector.id})."
            )
        )

    def find_documents(self, root):
        if root.is_file():
            return [root]
        if not root.is_dir():
            raise CommandError(f"{root} is neither a file nor a folder.")
        return sorted(
            path
            for path in root.rglob("*")
            if path.is_file() and path.suffix.lower() in DOCUMENT_SUFFIXES
        )

    def read_document(self, root, path, options):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise CommandError(f"{path} is not UTF-8 text.") from None
        relative = path.name if root.is_file() else path.relative_to(root).as_posix()
        metadata = self.read_sidecar(path)
        return Document(
            external_id=metadata.get("external_id", relative),
            title=metadata.get("title") or self.title_from(text, path),
            text=text,
            classification=metadata.get("classification", options["classification"]),
            labels=metadata.get("labels", options["labels"]),
            owner=metadata.get("owner", options["owner"]),
        )

    def read_sidecar(self, path):
        sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
        if not sidecar.exists():
            return {}
        try:
            metadata = json.loads(sidecar.read_text(encoding="utf-8"))
        except ValueError as error:
            raise CommandError(f"{sidecar} is not valid JSON: {error}") from None
        if not isinstance(metadata, dict):
            raise CommandError(f"{sidecar} must contain a JSON object.")
        unknown = set(metadata) - SIDECAR_KEYS
        if unknown:
            raise CommandError(
                f"{sidecar} has unknown keys {sorted(unknown)}; allowed keys are "
                f"{sorted(SIDECAR_KEYS)}."
            )
        return metadata

    @staticmethod
    def title_from(text, path):
        for line in text.splitlines():
            line = line.strip().lstrip("#").strip()
            if line:
                return line[:200]
        return path.stem
