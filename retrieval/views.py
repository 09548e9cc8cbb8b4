"""The retrieval API: principals, policies, relationships, ingestion,
secured retrievals and the access simulator, as the `gateco` SDK calls them.

Who may do what: API keys and signed-in owners and admins may do everything.
Members may read principals, policies and relationships, execute retrievals
and run the simulator, but every change they request (create, update,
delete, activate, archive, ingest) is rejected with 403. A row of another
organization returns 404, as a missing row does.
"""

import logging

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError, transaction
from django.db.models import Q
from rest_framework import status
from rest_framework.exceptions import ValidationError as DrfValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from gateco.errors import ApiError, EntitlementRequired, NotFound, ValidationFailed
from orgs.access import actor_label, organization_for_request
from orgs.authentication import ApiKeyUser
from orgs.models import Organization, Tier
from orgs.views import require_manager

from . import serializers as api
from .ingest import Document, PreEmbeddedChunk, delete_resource, load_documents
from .lookups import (
    as_uuid,
    find_connector,
    find_policy,
    find_principal,
    find_relationship,
    find_resource,
)
from .models import (
    Policy,
    PolicyStatus,
    Principal,
    PrincipalStatus,
    Relationship,
    Resource,
)
from .policy import PolicyEvaluationError, PolicyEvaluator
from .search import execute_retrieval

logger = logging.getLogger(__name__)

# Active principals per organization; tiers not listed have no limit.
PRINCIPAL_LIMITS = {Tier.FREE: 10, Tier.TEAM: 100}
NEXT_TIER = {Tier.FREE: Tier.TEAM, Tier.TEAM: Tier.GROWTH}
# Resources the simulator decides on when no resource_ids are given.
MAX_SIMULATED_RESOURCES = 1000
END_USER_TOKEN_HEADER = "X-End-User-Token"


class Conflict(ApiError):
    status_code = status.HTTP_409_CONFLICT
    code = "CONFLICT"
    default_message = "The request conflicts with an existing row."


def validated(serializer_class, data, **context):
    serializer = serializer_class(data=data, context=context)
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


def page_response(items, data, render):
    page_items, meta = api.paginate(items, data["page"], data["per_page"])
    return Response({"data": [render(item) for item in page_items], "meta": meta})


# --- principals ------------------------------------------------------------------


class PrincipalListView(APIView):
    """GET: a page of principals, active ones unless `status` selects others.
    POST: create a principal in the built-in local directory."""

    def get(self, request):
        organization = organization_for_request(request)
        data = validated(api.PrincipalListSerializer, request.query_params)
        principals = Principal.objects.filter(organization=organization).order_by(
            "created_at", "id"
        )
        if data["status"] != "all":
            principals = principals.filter(status=data["status"])
        if data.get("search"):
            principals = principals.filter(
                Q(display_name__icontains=data["search"])
                | Q(email__icontains=data["search"])
            )
        if data.get("group"):
            # NOTE: filtered in Python, because SQLite cannot search inside a
            # JSON list; fine for thousands of principals.
            principals = [p for p in principals if data["group"] in p.groups]
        return page_response(principals, data, api.principal_body)

    def post(self, request):
        organization = organization_for_request(request)
        require_manager(request)
        data = validated(api.PrincipalCreateSerializer, request.data)
        external_id = data.get("provider_subject") or data["email"]
        with transaction.atomic():
            _lock_organization(organization)
            _require_principal_slot(organization)
            if Principal.objects.filter(
                organization=organization, external_id=external_id
            ).exists():
                raise Conflict(
                    f"A principal with external id {external_id!r} already exists; "
                    "update it with PATCH /api/principals/<id> instead."
                )
            if Principal.objects.filter(
                organization=organization,
                email__iexact=data["email"],
                status=PrincipalStatus.ACTIVE,
            ).exists():
                raise Conflict(
                    f"An active principal with email {data['email']!r} already exists."
                )
            principal = Principal.objects.create(
                organization=organization,
                external_id=external_id,
                email=data["email"],
                display_name=data.get("display_name", ""),
                groups=data.get("groups", []),
                roles=data.get("roles", []),
                attributes=data.get("attributes", {}),
            )
        return Response(api.principal_body(principal), status=status.HTTP_201_CREATED)


def _lock_organization(organization):
    """Serialize principal changes of one organization, so limits hold."""
    Organization.objects.select_for_update().filter(pk=organization.pk).first()


def _require_principal_slot(organization):
    limit = PRINCIPAL_LIMITS.get(organization.tier)
    if limit is None:
        return
    active = Principal.objects.filter(
        organization=organization, status=PrincipalStatus.ACTIVE
    ).count()
    if active >= limit:
        raise EntitlementRequired(
            f"The {organization.tier} plan allows {limit} active principals, and "
            f"{active} are active. Deactivate one or upgrade.",
            reason=EntitlementRequired.LIMIT,
            upgrade_to=NEXT_TIER.get(organization.tier),
        )


class PrincipalDetailView(APIView):
    """GET, PATCH, or DELETE (deactivate) one principal, by id or external id."""

    def get(self, request, principal_id):
        organization = organization_for_request(request)
        return Response(api.principal_body(find_principal(organization, principal_id)))

    def patch(self, request, principal_id):
        organization = organization_for_request(request)
        require_manager(request)
        principal = find_principal(organization, principal_id)
        data = validated(api.PrincipalUpdateSerializer, request.data)
        with transaction.atomic():
            reactivating = (
                data.get("status") == PrincipalStatus.ACTIVE
                and principal.status != PrincipalStatus.ACTIVE
            )
            if reactivating:
                _lock_organization(organization)
                _require_principal_slot(organization)
            for name, value in data.items():
                setattr(principal, name, value)
            principal.save()
        return Response(api.principal_body(principal))

    def delete(self, request, principal_id):
        organization = organization_for_request(request)
        require_manager(request)
        principal = find_principal(organization, principal_id)
        # Never a hard delete: retrievals and audit events keep their principal,
        # and retrieval denies an inactive principal everything.
        principal.status = PrincipalStatus.INACTIVE
        principal.save(update_fields=["status", "updated_at"])
        return Response(status=status.HTTP_204_NO_CONTENT)


class PrincipalResolveView(APIView):
    """POST `email` and/or `provider_subject`: the matching principal, or 404.

    Both given must both match. Active principals are preferred, then the
    oldest. `identity_provider_id` names an identity provider, and only the
    local directory exists here, so any value returns 404.
    """

    def post(self, request):
        organization = organization_for_request(request)
        data = validated(api.PrincipalResolveSerializer, request.data)
        if data.get("identity_provider_id"):
            raise NotFound(
                f"Identity provider {data['identity_provider_id']!r} was not found; "
                "this server has only the local directory."
            )
        principals = Principal.objects.filter(organization=organization)
        if data.get("email"):
            principals = principals.filter(email__iexact=data["email"])
        if data.get("provider_subject"):
            principals = principals.filter(external_id=data["provider_subject"])
        principals = principals.order_by("created_at", "id")
        principal = (
            principals.filter(status=PrincipalStatus.ACTIVE).first()
            or principals.first()
        )
        if principal is None:
            raise NotFound("No principal of this organization matches.")
        return Response(api.principal_body(principal))


# --- policies --------------------------------------------------------------------


class PolicyListView(APIView):
    """GET: a page of policies, oldest first. POST: create a draft policy."""

    def get(self, request):
        organization = organization_for_request(request)
        data = validated(api.PageSerializer, request.query_params)
        policies = Policy.objects.filter(organization=organization).order_by(
            "created_at", "id"
        )
        return page_response(policies, data, api.policy_body)

    def post(self, request):
        organization = organization_for_request(request)
        require_manager(request)
        data = validated(api.PolicySerializer, request.data)
        try:
            with transaction.atomic():
                policy = Policy.objects.create(
                    organization=organization,
                    name=data["name"],
                    description=data.get("description", ""),
                    type=data["type"],
                    effect=data["effect"],
                    status=PolicyStatus.DRAFT,
                    resource_selectors=data.get("resource_selectors", []),
                    rules=data.get("rules", []),
                    created_by=actor_label(request),
                )
        except IntegrityError:
            raise _policy_name_taken(data["name"]) from None
        return Response(api.policy_body(policy), status=status.HTTP_201_CREATED)


def _policy_name_taken(name):
    return Conflict(f"A policy named {name!r} already exists; choose another name.")


class PolicyDetailView(APIView):
    """GET, PATCH or DELETE one policy. A change bumps its version."""

    def get(self, request, policy_id):
        organization = organization_for_request(request)
        return Response(api.policy_body(find_policy(organization, policy_id)))

    def patch(self, request, policy_id):
        organization = organization_for_request(request)
        require_manager(request)
        policy = find_policy(organization, policy_id)
        serializer = api.PolicySerializer(
            data=request.data, partial=True, context={"policy": policy}
        )
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        if data.get("type", policy.type) != policy.type:
            raise ValidationFailed("type cannot be changed; create a new policy.")
        changes = {
            name: value
            for name, value in data.items()
            if name != "type" and getattr(policy, name) != value
        }
        if changes:
            for name, value in changes.items():
                setattr(policy, name, value)
            policy.version += 1
            try:
                with transaction.atomic():
                    policy.save()
            except IntegrityError:
                raise _policy_name_taken(policy.name) from None
        return Response(api.policy_body(policy))

    def delete(self, request, policy_id):
        organization = organization_for_request(request)
        require_manager(request)
        find_policy(organization, policy_id).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


class PolicyActivateView(APIView):
    """POST: enforce a draft or archived policy from the next request on."""

    def post(self, request, policy_id):
        organization = organization_for_request(request)
        require_manager(request)
        policy = find_policy(organization, policy_id)
        try:
            policy.clean()
        except DjangoValidationError as error:
            raise ValidationFailed(
                f"The policy cannot be activated: {error.messages[0]}"
            ) from None
        policy.status = PolicyStatus.ACTIVE
        policy.save(update_fields=["status", "updated_at"])
        return Response(api.policy_body(policy))


class PolicyArchiveView(APIView):
    """POST: stop enforcing a policy; it stays readable and can be activated."""

    def post(self, request, policy_id):
        organization = organization_for_request(request)
        require_manager(request)
        policy = find_policy(organization, policy_id)
        policy.status = PolicyStatus.ARCHIVED
        policy.save(update_fields=["status", "updated_at"])
        return Response(api.policy_body(policy))


# --- relationships ---------------------------------------------------------------


class RelationshipListView(APIView):
    """GET: relationships, filtered by subject_id, relation and object_id.
    POST: create one. A relationship that already exists returns 409."""

    def get(self, request):
        organization = organization_for_request(request)
        data = validated(api.RelationshipListSerializer, request.query_params)
        relationships = Relationship.objects.filter(organization=organization)
        if data.get("subject_id"):
            subject = data["subject_id"]
            identifier = as_uuid(subject)
            matches = Q(subject__external_id=subject)
            if identifier is not None:
                matches |= Q(subject_id=identifier)
            relationships = relationships.filter(matches)
        if data.get("relation"):
            relationships = relationships.filter(relation_name=data["relation"])
        if data.get("object_id"):
            relationships = relationships.filter(object_id=data["object_id"])
        relationships = relationships.order_by("created_at", "id")
        return page_response(relationships, data, api.relationship_body)

    def post(self, request):
        organization = organization_for_request(request)
        require_manager(request)
        data = validated(api.RelationshipCreateSerializer, request.data)
        subject = find_principal(organization, data["subject_principal_id"])
        resource = find_resource(organization, data["object_resource_id"])
        existing = Relationship.objects.filter(
            subject=subject, relation_name=data["relation_name"], object=resource
        ).first()
        if existing is not None:
            raise Conflict(f"This relationship already exists with id {existing.id}.")
        try:
            with transaction.atomic():
                relationship = Relationship.objects.create(
                    organization=organization,
                    subject=subject,
                    relation_name=data["relation_name"],
                    object=resource,
                )
        except IntegrityError:
            raise Conflict("This relationship already exists.") from None
        return Response(
            api.relationship_body(relationship), status=status.HTTP_201_CREATED
        )


class RelationshipDetailView(APIView):
    """DELETE one relationship; it stops counting from the next request on."""

    def delete(self, request, relationship_id):
        organization = organization_for_request(request)
        require_manager(request)
        find_relationship(organization, relationship_id).delete()
        return Response(status=status.HTTP_204_NO_CONTENT)


# --- ingestion -------------------------------------------------------------------


def document_from_record(organization, data, chunking=None):
    """Return the Document for one validated record, or raise ValidationFailed."""
    owner = ""
    if data.get("owner_principal_id"):
        try:
            owner = find_principal(organization, data["owner_principal_id"]).external_id
        except NotFound:
            raise ValidationFailed(
                f"owner_principal_id {data['owner_principal_id']!r} is not a "
                "principal of this organization."
            ) from None
    pre_embedded = data.get("pre_embedded_chunks")
    chunking = data.get("chunking") or chunking or {}
    text = data.get("text", "")
    return Document(
        external_id=data["external_resource_id"],
        title=data.get("title") or _title_from(text, data["external_resource_id"]),
        text=text,
        classification=data["classification"],
        sensitivity=data["sensitivity"],
        domain=data.get("domain", ""),
        labels=data.get("labels", []),
        metadata=data.get("metadata", {}),
        owner=owner,
        chunks=(
            [PreEmbeddedChunk(c["text"], c["vector"]) for c in pre_embedded]
            if pre_embedded is not None
            else None
        ),
        chunk_size=chunking.get("chunk_size"),
    )


def _title_from(text, external_id):
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if line:
            return line[:200]
    return external_id[:200]


def _load(connector, documents):
    try:
        return load_documents(connector, documents)
    except DjangoValidationError as error:
        raise ValidationFailed(f"Nothing was written: {error.messages[0]}") from None


class IngestDocumentView(APIView):
    """POST one document: text to split (and embed with the organization's
    key, if it has one) or pre_embedded_chunks. Loading an external id again
    replaces that resource's metadata and chunks."""

    def post(self, request):
        organization = organization_for_request(request)
        require_manager(request)
        data = validated(api.IngestDocumentSerializer, request.data)
        connector = find_connector(organization, data["connector_id"])
        document = document_from_record(organization, data)
        (ingested,) = _load(connector, [document])
        return Response(api.ingested_body(ingested))


class IngestBatchView(APIView):
    """POST up to 100 records, all or nothing (team plan and above).

    Every record is validated before anything is written. If any is invalid,
    the response is 422 with each invalid record under `errors`, and nothing
    is written, so the corrected batch can simply be sent again.
    """

    def post(self, request):
        organization = organization_for_request(request)
        require_manager(request)
        if not organization.is_paid:
            raise EntitlementRequired(
                "Batch ingestion needs the team plan or above; ingest documents "
                "one at a time with POST /api/v1/ingest, or upgrade.",
                reason=EntitlementRequired.FEATURE,
                upgrade_to=Tier.TEAM,
            )
        data = validated(api.IngestBatchSerializer, request.data)
        connector = find_connector(organization, data["connector_id"])

        documents, errors = [], []
        for index, record in enumerate(data["records"]):
            try:
                fields = validated(api.IngestRecordSerializer, record)
                documents.append(
                    document_from_record(organization, fields, data.get("chunking"))
                )
            except ApiError as error:
                errors.append(_record_error(index, record, error.message))
            except DrfValidationError as error:
                errors.append(_record_error(index, record, _drf_message(error)))
        if errors:
            raise ValidationFailed(
                f"{len(errors)} of {len(data['records'])} records are invalid, so "
                f"nothing was written. First: record {errors[0]['index']}: "
                f"{errors[0]['message']}",
                extra={"errors": errors},
            )

        ingested = _load(connector, documents)
        return Response(
            {
                "status": "completed",
                "succeeded": len(ingested),
                "failed": 0,
                "results": [api.ingested_body(item) for item in ingested],
                "errors": [],
            }
        )


def _record_error(index, record, message):
    return {
        "index": index,
        "external_resource_id": record.get("external_resource_id"),
        "code": "VALIDATION_ERROR",
        "message": message,
    }


def _drf_message(error):
    detail = error.detail
    if isinstance(detail, dict):
        name, messages = next(iter(detail.items()))
        first = messages[0] if isinstance(messages, list) else messages
        if isinstance(first, dict):
            first = next(iter(first.values()))
        return str(first) if name == "non_field_errors" else f"{name}: {first}"
    return str(detail[0] if isinstance(detail, list) else detail)


class IngestResourceView(APIView):
    """DELETE `?connector_id=`: remove an ingested resource and its chunks."""

    def delete(self, request, external_resource_id):
        organization = organization_for_request(request)
        require_manager(request)
        data = validated(api.DeleteResourceSerializer, request.query_params)
        connector = find_connector(organization, data["connector_id"])
        deleted = delete_resource(connector, external_resource_id)
        if deleted is None:
            raise NotFound(
                f"Resource {external_resource_id!r} was not found in connector "
                f"{connector.name!r}."
            )
        resource_id, chunk_count = deleted
        return Response(
            {
                "status": "deleted",
                "resource_id": str(resource_id),
                "external_resource_id": external_resource_id,
                "chunks_deleted": chunk_count,
            }
        )


# --- retrievals and the simulator ------------------------------------------------


class ExecuteRetrievalView(APIView):
    """POST: search a connector for a principal and return what policy allows.

    Denied chunks are listed without their text. A policy that cannot be
    evaluated denies everything: the response is still 200, with outcome
    `error_deny` and the reason under `diagnostics`.
    """

    def post(self, request):
        organization = organization_for_request(request)
        data = validated(api.RetrievalExecuteSerializer, request.data)
        if request.headers.get(END_USER_TOKEN_HEADER):
            # Accepting a token that is never verified would let a caller
            # believe the subject was checked.
            raise ValidationFailed(
                f"{END_USER_TOKEN_HEADER} is not supported by this server, which "
                "cannot verify end-user tokens; send the request without it."
            )
        principal = find_principal(organization, data["principal_id"])
        connector = find_connector(organization, data["connector_id"])
        query = data.get("query", "")
        result = execute_retrieval(
            organization,
            principal,
            connector,
            query,
            data["top_k"],
            data["search_mode"],
            query_vector=data.get("query_vector"),
            alpha=data.get("alpha"),
            actor=actor_label(request),
        )
        actor_type = "api_key" if isinstance(request.user, ApiKeyUser) else "user"
        return Response(
            api.retrieval_body(result, principal, connector, query, actor_type)
        )


class SimulatorRunView(APIView):
    """POST: decide a principal's access to resources under the active
    policies, without searching, counting or auditing.

    The resources are `resource_ids`, else the connector's, else every
    resource of the organization (at most MAX_SIMULATED_RESOURCES, oldest
    first, with `truncated` set when there are more). `query` is accepted for
    the SDK's sake and not used. No time budget applies.
    """

    def post(self, request):
        organization = organization_for_request(request)
        data = validated(api.SimulationSerializer, request.data)
        principal = find_principal(organization, data["principal_id"])
        resources, truncated = self._resources(organization, data)

        body = {
            "principal_id": str(principal.id),
            "matched_resources": len(resources),
            "truncated": truncated,
        }
        try:
            evaluator = PolicyEvaluator.load(organization, principal)
            decided = [(resource, evaluator.decide(resource)) for resource in resources]
        except PolicyEvaluationError as error:
            body.update(
                outcome="error_deny",
                allowed=0,
                denied=len(resources),
                policy_trace=[],
                denial_reasons=[error.code],
                reason=str(error),
                results=[],
            )
            return Response(body)

        allowed = sum(1 for _, decision in decided if decision.allowed)
        denied = len(decided) - allowed
        if not decided:
            outcome = "no_resources"
        elif allowed and denied:
            outcome = "partial"
        else:
            outcome = "allowed" if allowed else "denied"
        body.update(
            outcome=outcome,
            allowed=allowed,
            denied=denied,
            policy_trace=evaluator.trace(),
            denial_reasons=sorted(
                {decision.reason for _, decision in decided if not decision.allowed}
            ),
            results=[
                {
                    "resource_id": str(resource.id),
                    "external_resource_id": resource.external_id,
                    "decision": "allowed" if decision.allowed else "denied",
                    "reason": decision.reason,
                    "matched_policy_id": decision.policy_id,
                }
                for resource, decision in decided
            ],
        )
        return Response(body)

    def _resources(self, organization, data):
        if data.get("resource_ids"):
            unique = dict.fromkeys(data["resource_ids"])
            return [find_resource(organization, value) for value in unique], False
        resources = Resource.objects.filter(
            connector__organization=organization
        ).select_related("owner")
        if data.get("connector_id"):
            connector = find_connector(organization, data["connector_id"])
            resources = resources.filter(connector=connector)
        resources = list(
            resources.order_by("created_at", "id")[: MAX_SIMULATED_RESOURCES + 1]
        )
        return resources[:MAX_SIMULATED_RESOURCES], len(
            resources
        ) > MAX_SIMULATED_RESOURCES
