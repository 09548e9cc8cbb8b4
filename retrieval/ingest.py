"""Load documents into the built-in connector and split them into chunks.

Ingest is idempotent on the external id: a document loaded again replaces
its resource's metadata and chunks. Every change to a connector's chunks
bumps its `index_version`, so cached rankings and vector indexes rebuild.
"""

import json
import math
import re
from dataclasses import dataclass, field

from django.core.exceptions import ValidationError
from django.db import transaction

from .embeddings import embed_texts, to_bytes
from .engines import bump_index_version
from .models import Chunk, Classification, Principal, Resource, Sensitivity

# About a paragraph or two: long enough to carry a fact with its context,
# short enough that several fit in one prompt.
CHUNK_TARGET_CHARACTERS = 800
MIN_CHUNK_CHARACTERS = 100
MAX_CHUNK_CHARACTERS = 8000
MAX_PRE_EMBEDDED_CHUNKS = 2000
MAX_VECTOR_DIMENSIONS = 8192
MAX_METADATA_BYTES = 16_384
LABEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


@dataclass
class PreEmbeddedChunk:
    text: str
    vector: list


@dataclass
class Document:
    external_id: str
    title: str
    text: str
    classification: str = Classification.INTERNAL
    labels: list = field(default_factory=list)
    # The owning principal's external id, or "" for none.
    owner: str = ""
    sensitivity: str = Sensitivity.LOW
    domain: str = ""
    metadata: dict = field(default_factory=dict)
    # Chunks the caller split and embedded; None to split `text` here.
    chunks: list | None = None
    # Target chunk length in characters; None for CHUNK_TARGET_CHARACTERS.
    chunk_size: int | None = None


@dataclass
class IngestedResource:
    resource: Resource
    chunk_ids: list
    created: bool


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
    name = document.external_id
    title_length = Resource._meta.get_field("title").max_length
    if not isinstance(document.title, str) or len(document.title) > title_length:
        raise ValidationError(
            f"{name}: title must be a string of at most {title_length} characters."
        )
    if document.classification not in Classification.values:
        raise ValidationError(
            f"{name}: classification {document.classification!r} is invalid; use "
            f"one of {', '.join(Classification.values)}."
        )
    if document.sensitivity not in Sensitivity.values:
        raise ValidationError(
            f"{name}: sensitivity {document.sensitivity!r} is invalid; use one of "
            f"{', '.join(Sensitivity.values)}."
        )
    domain_length = Resource._meta.get_field("domain").max_length
    if not isinstance(document.domain, str) or len(document.domain) > domain_length:
        raise ValidationError(
            f"{name}: domain must be a string of at most {domain_length} characters."
        )
    if not isinstance(document.labels, list):
        raise ValidationError(f"{name}: labels must be a list.")
    for label in document.labels:
        if not isinstance(label, str) or not LABEL_PATTERN.fullmatch(label):
            raise ValidationError(
                f"{name}: label {label!r} is invalid; use letters, digits and "
                "_ . : - (at most 64 characters)."
            )
    _validate_metadata(name, document.metadata)
    if (
        document.owner
        and not Principal.objects.filter(
            organization=organization, external_id=document.owner
        ).exists()
    ):
        raise ValidationError(
            f"{name}: owner {document.owner!r} is not a principal of this organization."
        )
    if document.chunk_size is not None and not (
        MIN_CHUNK_CHARACTERS <= document.chunk_size <= MAX_CHUNK_CHARACTERS
    ):
        raise ValidationError(
            f"{name}: chunk_size {document.chunk_size} is invalid; use "
            f"{MIN_CHUNK_CHARACTERS} to {MAX_CHUNK_CHARACTERS} characters."
        )
    if document.chunks is not None:
        _validate_pre_embedded(name, document.chunks)
    elif not isinstance(document.text, str) or not document.text.strip():
        raise ValidationError(f"{name}: the document is empty.")


def _validate_metadata(name, metadata):
    if not isinstance(metadata, dict):
        raise ValidationError(f"{name}: metadata must be an object.")
    try:
        size = len(json.dumps(metadata, allow_nan=False).encode())
    except (TypeError, ValueError):
        raise ValidationError(
            f"{name}: metadata must hold only JSON values (no NaN or infinity)."
        ) from None
    if size > MAX_METADATA_BYTES:
        raise ValidationError(
            f"{name}: metadata is {size} bytes as JSON; the maximum is "
            f"{MAX_METADATA_BYTES}."
        )


def _validate_pre_embedded(name, chunks):
    if not isinstance(chunks, list) or not 0 < len(chunks) <= MAX_PRE_EMBEDDED_CHUNKS:
        raise ValidationError(
            f"{name}: pre_embedded_chunks must be a list of 1 to "
            f"{MAX_PRE_EMBEDDED_CHUNKS} chunks."
        )
    dimensions = None
    for number, chunk in enumerate(chunks, start=1):
        if not isinstance(chunk.text, str) or not chunk.text.strip():
            raise ValidationError(f"{name}: pre-embedded chunk {number} has no text.")
        vector = chunk.vector
        if (
            not isinstance(vector, list)
            or not 0 < len(vector) <= MAX_VECTOR_DIMENSIONS
            or not all(_is_finite_number(value) for value in vector)
        ):
            raise ValidationError(
                f"{name}: pre-embedded chunk {number} needs a vector of 1 to "
                f"{MAX_VECTOR_DIMENSIONS} finite numbers."
            )
        if not any(vector):
            raise ValidationError(
                f"{name}: pre-embedded chunk {number} has a zero vector, which "
                "has no direction to search by."
            )
        if dimensions is not None and len(vector) != dimensions:
            raise ValidationError(
                f"{name}: pre-embedded chunk {number} has {len(vector)} dimensions "
                f"and chunk 1 has {dimensions}; give every chunk one length."
            )
        dimensions = len(vector)


def _is_finite_number(value):
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


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
    """Validate and write `documents` like load_documents; return their resources."""
    return [ingested.resource for ingested in load_documents(connector, documents)]


def load_documents(connector, documents):
    """Validate every document, then write them all, or nothing.

    Documents without pre-embedded chunks are split here and embedded with
    the organization's own key when it has one. Without a key their chunks
    stay unembedded, so only keyword search finds them. Returns one
    IngestedResource per document, in order.

    Raises ValidationError for an invalid document, and the embedding
    module's SearchUnavailable when the organization's key cannot be used;
    either way nothing is written.
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

    planned = [_plan_chunks(document) for document in documents]
    _embed_planned(organization, documents, planned)
    _check_dimensions(connector, documents, planned)

    owners = {
        principal.external_id: principal
        for principal in Principal.objects.filter(
            organization=organization,
            external_id__in={d.owner for d in documents if d.owner},
        )
    }
    ingested = []
    with transaction.atomic():
        for document, chunks in zip(documents, planned, strict=True):
            resource, created = Resource.objects.update_or_create(
                connector=connector,
                external_id=document.external_id,
                defaults={
                    "title": document.title,
                    "classification": document.classification,
                    "sensitivity": document.sensitivity,
                    "domain": document.domain,
                    "labels": document.labels,
                    "metadata": document.metadata,
                    "owner": owners.get(document.owner),
                },
            )
            resource.chunks.all().delete()
            rows = Chunk.objects.bulk_create(
                Chunk(resource=resource, position=position, text=text, embedding=blob)
                for position, (text, blob) in enumerate(chunks)
            )
            ingested.append(
                IngestedResource(resource, [row.id for row in rows], created)
            )
        bump_index_version(connector)
    return ingested


def _plan_chunks(document):
    """Return `[[text, embedding bytes]]` for one document, before embedding."""
    if document.chunks is not None:
        return [[chunk.text, to_bytes(chunk.vector)] for chunk in document.chunks]
    target = document.chunk_size or CHUNK_TARGET_CHARACTERS
    return [[text, b""] for text in split_into_chunks(document.text, target)]


def _embed_planned(organization, documents, planned):
    """Fill in the embeddings of chunks split here, if the organization has a key."""
    pending = [
        chunk
        for document, chunks in zip(documents, planned, strict=True)
        if document.chunks is None
        for chunk in chunks
    ]
    if not pending:
        return
    vectors = embed_texts(organization, [text for text, _ in pending])
    if vectors is None:
        return
    for chunk, vector in zip(pending, vectors, strict=True):
        chunk[1] = to_bytes(vector)


def _check_dimensions(connector, documents, planned):
    """Raise ValidationError if new embeddings differ in length from the connector's.

    Vector search ranks one length per connector, so a chunk of another
    length would never be found.
    """
    replaced = {document.external_id for document in documents}
    existing = (
        Chunk.objects.filter(resource__connector=connector)
        .exclude(embedding=b"")
        .exclude(resource__external_id__in=replaced)
        .values_list("embedding", flat=True)
        .first()
    )
    lengths = {len(blob) // 4 for chunks in planned for _, blob in chunks if blob}
    if existing is not None:
        lengths.add(len(existing) // 4)
    if len(lengths) > 1:
        raise ValidationError(
            f"These embeddings have {', '.join(str(n) for n in sorted(lengths))} "
            "dimensions, but one connector holds embeddings of one length; embed "
            "every chunk of this connector with the same model and length."
        )


def delete_resource(connector, external_id):
    """Delete the resource with this external id and its chunks.

    Returns `(resource id, chunks deleted)`, or None when there is no such
    resource.
    """
    with transaction.atomic():
        resource = (
            Resource.objects.select_for_update()
            .filter(connector=connector, external_id=external_id)
            .first()
        )
        if resource is None:
            return None
        resource_id = resource.id
        chunk_count = resource.chunks.count()
        resource.delete()
        bump_index_version(connector)
    return resource_id, chunk_count
