"""Load documents into the built-in connector and split them into chunks."""

import re
from dataclasses import dataclass, field

from django.core.exceptions import ValidationError
from django.db import transaction

from .models import Chunk, Classification, Principal, Resource

# About a paragraph or two: long enough to carry a fact with its context,
# short enough that several fit in one prompt.
CHUNK_TARGET_CHARACTERS = 800
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


@dataclass
class Document:
    external_id: str
    title: str
    text: str
    classification: str = Classification.INTERNAL
    labels: list = field(default_factory=list)
    owner: str = ""


def validate_document(organization, document):
    """Raise ValidationError naming the first invalid field of `document`."""
    external_id_length = Resource._meta.get_field("external_id").max_length
    if (
        not isinstance(document.external_id, str)
        or not document.external_id.strip()
        or len(document.external_id) > external_id_length
    ):
        raise ValidationError(
            f"external_id {document.external_id!r} is invalid; use a non-empty "
            f"string of at most {external_id_length} characters."
        )
    title_length = Resource._meta.get_field("title").max_length
    if not isinstance(document.title, str) or len(document.title) > title_length:
        raise ValidationError(
            f"{document.external_id}: title must be a string of at most "
            f"{title_length} characters."
        )
    if document.classification not in Classification.values:
        raise ValidationError(
            f"{document.external_id}: classification {document.classification!r} is "
            f"invalid; use one of {', '.join(Classification.values)}."
        )
    if not isinstance(document.labels, list):
        raise ValidationError(f"{document.external_id}: labels must be a list.")
    for label in document.labels:
        if not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
            raise ValidationError(
                f"{document.external_id}: label {label!r} is invalid; use letters, "
                "digits and _ . : - (at most 64 characters)."
            )
    if document.owner and not Principal.objects.filter(
        organization=organization, external_id=document.owner
    ).exists():
        raise ValidationError(
            f"{document.external_id}: owner {document.owner!r} is not a principal "
            "of this organization."
        )
    if not document.text.strip():
        raise ValidationError(f"{document.external_id}: the document is empty.")


def split_into_chunks(text, target=CHUNK_TARGET_CHARACTERS):
    """Split `text` on paragraph breaks into chunks of about `target` characters.

    A paragraph longer than `target` is split on sentence ends, and a sentence
    longer than `target` on its last whitespace (space, tab or newline) within
    the target, so no chunk is over the target. Only a word longer than
    `target` is cut inside the word.
    """
    pieces = []
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if len(paragraph) <= target:
            pieces.append(paragraph)
            continue
        for sentence in re.split(r"(?<=[.!?])\s+", paragraph):
            while len(sentence) > target:
                # A whitespace at index `target` is a valid cut too, because the
                # piece before it is exactly `target` characters long.
                breaks = [
                    match.start()
                    for match in re.finditer(r"\s", sentence[: target + 1])
                ]
                cut = breaks[-1] if breaks and breaks[-1] > 0 else target
                pieces.append(sentence[:cut].strip())
                sentence = sentence[cut:].strip()
            if sentence:
                pieces.append(sentence)

    chunks, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) + 2 > target:
            chunks.append(current)
            current = piece
        else:
            current = f"{current}\n\n{piece}" if current else piece
    if current:
        chunks.append(current)
    return chunks


def ingest_documents(connector, documents):
    """Validate every document, then write them all, or nothing.

    Ingest is idempotent on the external id: a document loaded again replaces
    its metadata and chunks. Returns the list of resources written.
    """
    organization = connector.organization
    for document in documents:
        validate_document(organization, document)
    # Two documents with one external id would silently become one resource.
    seen = set()
    for document in documents:
        if document.external_id in seen:
            raise ValidationError(
                f"{document.external_id}: two documents have this external id; "
                "give each document its own."
            )
        seen.add(document.external_id)

    owners = {
        principal.external_id: principal
        for principal in Principal.objects.filter(
            organization=organization,
            external_id__in={d.owner for d in documents if d.owner},
        )
    }
    resources = []
    with transaction.atomic():
        for document in documents:
            resource, _ = Resource.objects.update_or_create(
                connector=connector,
                external_id=document.external_id,
                defaults={
                    "title": document.title,
                    "classification": document.classification,
                    "labels": document.labels,
                    "owner": owners.get(document.owner),
                },
            )
            resource.chunks.all().delete()
            Chunk.objects.bulk_create(
                Chunk(resource=resource, position=position, text=text)
                for position, text in enumerate(split_into_chunks(document.text))
            )
            resources.append(resource)
    return resources
