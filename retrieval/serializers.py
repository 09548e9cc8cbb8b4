"""Request validation and response bodies of the retrieval API.

Field names and response shapes follow the `gateco` SDK (version 1.13.0),
which is the wire contract.
"""

import re

from rest_framework import serializers

from gateco.errors import ValidationFailed

from .ingest import (
    MAX_CHUNK_CHARACTERS,
    MAX_PRE_EMBEDDED_CHUNKS,
    MAX_VECTOR_DIMENSIONS,
    MIN_CHUNK_CHARACTERS,
)
from .lookups import as_uuid
from .models import (
    Classification,
    Effect,
    Policy,
    PrincipalStatus,
    Resource,
    Sensitivity,
)
from .policy import RELATION_NAME_PATTERN, PolicyDefinitionError, validate_policy
from .search import validate_search_mode

MAX_PER_PAGE = 100
MAX_LIST_ITEMS = 100
MAX_BATCH_RECORDS = 100
MAX_TOP_K = 100
MAX_SIMULATED_RESOURCE_IDS = 100
ATTRIBUTE_KEY = re.compile(r"[A-Za-z0-9_-]{1,100}")


def names_field(**kwargs):
    """Return a field for up to MAX_LIST_ITEMS non-empty strings, such as roles."""
    return serializers.ListField(
        child=serializers.CharField(max_length=200),
        max_length=MAX_LIST_ITEMS,
        **kwargs,
    )


def validate_attributes(value):
    if not isinstance(value, dict):
        raise serializers.ValidationError("attributes must be an object.")
    for key in value:
        if not ATTRIBUTE_KEY.fullmatch(key):
            raise serializers.ValidationError(
                f"attribute name {key!r} is invalid; use 1 to 100 letters, digits, "
                "_ or -, so policies can name it as principal.<name>."
            )
    return value


class PageSerializer(serializers.Serializer):
    page = serializers.IntegerField(min_value=1, default=1)
    per_page = serializers.IntegerField(min_value=1, max_value=MAX_PER_PAGE, default=20)


def paginate(items, page, per_page):
    """Return `(page items, meta)` in the SDK's `meta.pagination` shape."""
    total = len(items) if isinstance(items, list) else items.count()
    start = (page - 1) * per_page
    meta = {
        "pagination": {
            "page": page,
            "per_page": per_page,
            "total": total,
            "total_pages": max(1, -(-total // per_page)),
        }
    }
    return list(items[start : start + per_page]), meta


def timestamp(value):
    return value.isoformat() if value else None


# --- principals ------------------------------------------------------------------


class PrincipalListSerializer(PageSerializer):
    status = serializers.ChoiceField(
        choices=[*PrincipalStatus.values, "all"], default=PrincipalStatus.ACTIVE
    )
    search = serializers.CharField(max_length=200, required=False)
    group = serializers.CharField(max_length=200, required=False)


class PrincipalCreateSerializer(serializers.Serializer):
    email = serializers.EmailField(max_length=254)
    display_name = serializers.CharField(
        max_length=200, required=False, allow_blank=True
    )
    groups = names_field(required=False)
    roles = names_field(required=False)
    attributes = serializers.JSONField(required=False)
    provider_subject = serializers.CharField(max_length=200, required=False)

    def validate_attributes(self, value):
        return validate_attributes(value)


class PrincipalUpdateSerializer(serializers.Serializer):
    display_name = serializers.CharField(
        max_length=200, required=False, allow_blank=True
    )
    groups = names_field(required=False)
    roles = names_field(required=False)
    attributes = serializers.JSONField(required=False)
    status = serializers.ChoiceField(choices=PrincipalStatus.values, required=False)

    def validate_attributes(self, value):
        return validate_attributes(value)


class PrincipalResolveSerializer(serializers.Serializer):
    email = serializers.EmailField(max_length=254, required=False)
    provider_subject = serializers.CharField(max_length=200, required=False)
    identity_provider_id = serializers.CharField(max_length=200, required=False)

    def validate(self, attrs):
        if not attrs.get("email") and not attrs.get("provider_subject"):
            raise serializers.ValidationError(
                "Send email, provider_subject or both to resolve a principal."
            )
        return attrs


def principal_body(principal):
    return {
        "id": str(principal.id),
        # Every principal here lives in the built-in local directory.
        "identity_provider_id": None,
        "identity_provider_name": None,
        "identity_provider_type": "local",
        "external_id": principal.external_id,
        "provider_subject": principal.external_id,
        "display_name": principal.display_name,
        "email": principal.email,
        "groups": principal.groups,
        "roles": principal.roles,
        "attributes": principal.attributes,
        "status": principal.status,
        "last_seen": None,
        "created_at": timestamp(principal.created_at),
        "updated_at": timestamp(principal.updated_at),
    }


# --- policies --------------------------------------------------------------------


class PolicySerializer(serializers.Serializer):
    """A policy to create, or with `partial=True`, the fields to change."""

    name = serializers.CharField(max_length=200)
    type = serializers.ChoiceField(choices=Policy.Type.values)
    effect = serializers.ChoiceField(choices=Effect.values)
    description = serializers.CharField(required=False, allow_blank=True)
    resource_selectors = serializers.JSONField(required=False)
    rules = serializers.JSONField(required=False)

    def validate(self, attrs):
        instance = self.context.get("policy")
        effect = attrs.get("effect", instance.effect if instance else None)
        rules = attrs.get("rules", instance.rules if instance else [])
        selectors = attrs.get(
            "resource_selectors", instance.resource_selectors if instance else []
        )
        if selectors is None:
            selectors = attrs["resource_selectors"] = []
        try:
            validate_policy(rules, selectors, effect)
        except PolicyDefinitionError as error:
            raise serializers.ValidationError({error.field: str(error)}) from None
        return attrs


def rule_body(rule, policy):
    """Return a stored rule with its effective effect and priority filled in."""
    return {
        **rule,
        "effect": rule.get("effect", policy.effect),
        "priority": rule.get("priority", 0),
    }


def policy_body(policy):
    rules = policy.rules if isinstance(policy.rules, list) else []
    return {
        "id": str(policy.id),
        "name": policy.name,
        "description": policy.description,
        "type": policy.type,
        "status": policy.status,
        "effect": policy.effect,
        "resource_selectors": policy.resource_selectors,
        "version": policy.version,
        "rules": [rule_body(rule, policy) for rule in rules if isinstance(rule, dict)],
        "created_by": policy.created_by or None,
        "created_at": timestamp(policy.created_at),
        "updated_at": timestamp(policy.updated_at),
    }


# --- relationships ---------------------------------------------------------------


class RelationshipCreateSerializer(serializers.Serializer):
    subject_principal_id = serializers.CharField(max_length=200)
    relation_name = serializers.CharField(max_length=100)
    object_resource_id = serializers.UUIDField()

    def validate_relation_name(self, value):
        if not RELATION_NAME_PATTERN.fullmatch(value):
            raise serializers.ValidationError(
                f"relation_name {value!r} is invalid; use letters, digits, _ : or -, "
                "so policies can name it as relation.<name>."
            )
        return value


class RelationshipListSerializer(PageSerializer):
    subject_id = serializers.CharField(max_length=200, required=False)
    relation = serializers.CharField(max_length=100, required=False)
    object_id = serializers.UUIDField(required=False)


def relationship_body(relationship):
    return {
        "id": str(relationship.id),
        "subject_principal_id": str(relationship.subject_id),
        "relation_name": relationship.relation_name,
        "object_resource_id": str(relationship.object_id),
        "created_at": timestamp(relationship.created_at),
    }


# --- ingestion -------------------------------------------------------------------


class PreEmbeddedChunkSerializer(serializers.Serializer):
    text = serializers.CharField(trim_whitespace=False)
    vector = serializers.ListField(
        child=serializers.FloatField(), min_length=1, max_length=MAX_VECTOR_DIMENSIONS
    )
    metadata = serializers.DictField(required=False, allow_null=True)

    def validate_metadata(self, value):
        # Chunks have no metadata of their own; the resource's metadata is
        # where it belongs.
        if value:
            raise serializers.ValidationError(
                "chunk metadata is not stored; put it in the document's metadata."
            )
        return value


class ChunkingSerializer(serializers.Serializer):
    # split_into_chunks cuts paragraphs, then sentences, then words.
    strategy = serializers.ChoiceField(choices=["recursive"], required=False)
    chunk_size = serializers.IntegerField(
        min_value=MIN_CHUNK_CHARACTERS, max_value=MAX_CHUNK_CHARACTERS, required=False
    )
    chunk_overlap = serializers.IntegerField(min_value=0, max_value=0, required=False)

    def to_internal_value(self, data):
        unknown = set(data) - set(self.fields) if isinstance(data, dict) else set()
        if unknown:
            raise serializers.ValidationError(
                f"unknown chunking options {sorted(unknown)}; use strategy "
                "('recursive'), chunk_size (characters) and chunk_overlap (0)."
            )
        return super().to_internal_value(data)


def reject_embedding_override(value):
    if value:
        raise serializers.ValidationError(
            "embedding overrides are not supported; chunks are embedded with the "
            "organization's own key and the server's model, or sent as "
            "pre_embedded_chunks."
        )
    return value


class IngestRecordSerializer(serializers.Serializer):
    """One document: the body of POST /api/v1/ingest without connector_id."""

    external_resource_id = serializers.CharField(
        max_length=Resource._meta.get_field("external_id").max_length
    )
    text = serializers.CharField(
        required=False, allow_blank=True, trim_whitespace=False
    )
    title = serializers.CharField(
        max_length=Resource._meta.get_field("title").max_length,
        required=False,
        allow_blank=True,
    )
    classification = serializers.ChoiceField(
        choices=Classification.values, default=Classification.INTERNAL
    )
    sensitivity = serializers.ChoiceField(
        choices=Sensitivity.values, default=Sensitivity.LOW
    )
    domain = serializers.CharField(
        max_length=Resource._meta.get_field("domain").max_length,
        required=False,
        allow_blank=True,
    )
    labels = serializers.ListField(
        child=serializers.CharField(max_length=64),
        max_length=MAX_LIST_ITEMS,
        required=False,
    )
    metadata = serializers.DictField(required=False)
    owner_principal_id = serializers.CharField(max_length=200, required=False)
    pre_embedded_chunks = PreEmbeddedChunkSerializer(
        many=True, required=False, max_length=MAX_PRE_EMBEDDED_CHUNKS
    )
    idempotency_key = serializers.CharField(max_length=255, required=False)
    chunking = ChunkingSerializer(required=False)
    embedding = serializers.DictField(required=False)

    def validate_embedding(self, value):
        return reject_embedding_override(value)

    def validate(self, attrs):
        has_text = bool(attrs.get("text", "").strip())
        if has_text == ("pre_embedded_chunks" in attrs):
            raise serializers.ValidationError(
                "Send either text or pre_embedded_chunks."
            )
        return attrs


class IngestDocumentSerializer(IngestRecordSerializer):
    connector_id = serializers.CharField(max_length=200)


class IngestBatchSerializer(serializers.Serializer):
    connector_id = serializers.CharField(max_length=200)
    records = serializers.ListField(
        child=serializers.DictField(), min_length=1, max_length=MAX_BATCH_RECORDS
    )
    idempotency_key = serializers.CharField(max_length=255, required=False)
    chunking = ChunkingSerializer(required=False)
    embedding = serializers.DictField(required=False)

    def validate_embedding(self, value):
        return reject_embedding_override(value)


class DeleteResourceSerializer(serializers.Serializer):
    connector_id = serializers.CharField(max_length=200)


def ingested_body(ingested):
    resource = ingested.resource
    return {
        "status": "ingested",
        "created": ingested.created,
        "resource_id": str(resource.id),
        "external_resource_id": resource.external_id,
        "chunk_count": len(ingested.chunk_ids),
        "vector_ids": [str(chunk_id) for chunk_id in ingested.chunk_ids],
    }


# --- retrievals ------------------------------------------------------------------


class RetrievalExecuteSerializer(serializers.Serializer):
    principal_id = serializers.CharField(max_length=200)
    connector_id = serializers.CharField(max_length=200)
    query = serializers.CharField(max_length=2000, required=False, allow_blank=True)
    query_vector = serializers.ListField(
        child=serializers.FloatField(),
        min_length=1,
        max_length=MAX_VECTOR_DIMENSIONS,
        required=False,
    )
    top_k = serializers.IntegerField(min_value=1, max_value=MAX_TOP_K, default=10)
    search_mode = serializers.CharField(max_length=20, required=False)
    alpha = serializers.FloatField(min_value=0.0, max_value=1.0, required=False)
    filters = serializers.DictField(required=False)
    include_unresolved = serializers.BooleanField(required=False)
    pattern_type = serializers.CharField(max_length=20, required=False)
    case_sensitive = serializers.BooleanField(required=False)

    def validate_filters(self, value):
        # NOTE: metadata filters are not applied yet, so a non-empty filter is
        # rejected rather than silently ignored.
        if value:
            raise serializers.ValidationError("filters are not supported yet.")
        return value

    def validate_include_unresolved(self, value):
        if value:
            raise serializers.ValidationError(
                "include_unresolved is not supported: a chunk whose resource "
                "metadata cannot be resolved is always denied."
            )
        return value

    def validate(self, attrs):
        # Without a mode, a bare query_vector means vector search.
        only_vector = "query_vector" in attrs and not attrs.get("query")
        mode = attrs.setdefault("search_mode", "vector" if only_vector else "keyword")
        try:
            validate_search_mode(mode)
        except ValidationFailed as error:
            raise serializers.ValidationError({"search_mode": error.message}) from None
        for name in ("pattern_type", "case_sensitive"):
            if name in attrs:
                raise serializers.ValidationError(
                    {
                        name: f"{name} applies only to grep search, which this server "
                        "does not support."
                    }
                )
        query = attrs.get("query", "").strip()
        if mode in ("keyword", "hybrid") and not query:
            raise serializers.ValidationError(
                {"query": f"{mode} search needs a non-empty query."}
            )
        if mode == "vector" and not query and "query_vector" not in attrs:
            raise serializers.ValidationError(
                {"query": "vector search needs a query or a query_vector."}
            )
        if mode == "keyword" and "query_vector" in attrs:
            message = "query_vector applies only to vector or hybrid search."
            raise serializers.ValidationError({"query_vector": message})
        if mode != "hybrid" and "alpha" in attrs:
            raise serializers.ValidationError(
                {"alpha": "alpha applies only to hybrid search."}
            )
        return attrs


def chunk_metadata(resource, chunk, granted):
    """Return a result's metadata: everything when granted, levels only when denied."""
    metadata = {
        "classification": resource.classification,
        "sensitivity": resource.sensitivity,
    }
    if granted:
        metadata.update(
            title=resource.title,
            domain=resource.domain,
            labels=resource.labels,
            position=chunk.position,
            resource_metadata=resource.metadata,
        )
    return metadata


def filter_result_body(scored, granted):
    """Return one FilterResult; a denied chunk's text is never included."""
    chunk, resource = scored.chunk, scored.chunk.resource
    return {
        "vector_id": str(chunk.id),
        "chunk_id": str(chunk.id),
        "score": round(float(scored.score), 6),
        "text": chunk.text if granted else None,
        "resource_id": str(resource.id),
        "external_resource_id": resource.external_id,
        "resource_mode": "registered",
        "granted": granted,
        "policy_decision": "allowed" if granted else "denied",
        "denial_reason": None if granted else scored.reason,
        "matched_policy_id": scored.policy_id,
        "metadata": chunk_metadata(resource, chunk, granted),
    }


def retrieval_body(result, principal, connector, query, actor_type):
    """Return the SDK's SecuredRetrieval body for one executed retrieval."""
    record = result.record
    allowed_ids = {id(scored) for scored in result.allowed}
    results = [
        filter_result_body(scored, id(scored) in allowed_ids)
        for scored in result.evaluated
    ]
    if result.decision == "error_deny":
        denial_reasons = [result.error_code]
    else:
        denial_reasons = sorted({scored.reason for scored in result.denied})
    return {
        "id": str(record.id),
        "retrieval_id": str(record.id),
        "outcome": result.outcome,
        "decision": result.decision,
        "query": query,
        "principal_id": str(principal.id),
        "connector_id": str(connector.id),
        "organization_id": str(record.organization_id),
        "search_mode": result.search_mode,
        "matched_chunks": result.candidates,
        "allowed_chunks": len(result.allowed),
        "denied_chunks": len(result.denied),
        "results": results,
        "denial_reasons": denial_reasons,
        "policy_trace": result.trace,
        "diagnostics": {
            "candidates_fetched": result.candidates,
            "refill_rounds": result.refill_rounds,
            "search_mode": result.search_mode,
            "latency_ms": result.latency_ms,
            "policies_evaluated": result.policies_evaluated,
            "error_code": result.error_code or None,
            "reason": result.error or None,
        },
        "latency_ms": result.latency_ms,
        "created_at": timestamp(record.created_at),
        "actor_type": actor_type,
        "subject_verified": False,
        "warnings": [],
    }


# --- simulator -------------------------------------------------------------------


class SimulationSerializer(serializers.Serializer):
    principal_id = serializers.CharField(max_length=200)
    query = serializers.CharField(max_length=2000, required=False, allow_blank=True)
    connector_id = serializers.CharField(max_length=200, required=False)
    resource_ids = serializers.ListField(
        child=serializers.CharField(max_length=200),
        min_length=1,
        max_length=MAX_SIMULATED_RESOURCE_IDS,
        required=False,
    )

    def validate_resource_ids(self, value):
        for resource_id in value:
            if as_uuid(resource_id) is None:
                raise serializers.ValidationError(
                    f"resource id {resource_id!r} is not a UUID."
                )
        return value
