"""Policy-filtered retrieval: search, decide per resource, record, return.

Candidates come from the search engine in rank order and are walked through
the policy engine until `top_k` are allowed. When denials leave fewer than
`top_k`, up to MAX_REFILL_ROUNDS more windows of candidates are fetched, each
twice as large as the one before, so an allowed chunk is not lost behind
denied ones that ranked higher.

Every retrieval writes its Retrieval row and its AuditEvent in one
transaction before anything is returned, and counts toward the
organization's monthly usage (capped for the free tier).
"""

import datetime
import logging
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import F
from django.utils import timezone

from gateco.db import serialized_atomic
from gateco.errors import EntitlementRequired, ValidationFailed

from .engines import SEARCH_MODES, search_candidates
from .models import AuditEvent, Chunk, MonthlyUsage, Retrieval
from .policy import PolicyEvaluationError, PolicyEvaluator

logger = logging.getLogger(__name__)

# The first window contains FIRST_WINDOW_FACTOR x top_k candidates, and at
# least FIRST_WINDOW_MIN. Each refill round fetches a window twice as large.
FIRST_WINDOW_FACTOR = 3
FIRST_WINDOW_MIN = 10
MAX_REFILL_ROUNDS = 3
KEYWORD_PAGE_SIZE = 500
# The hybrid weight when a request gives none: vector and keyword ranks count
# equally.
DEFAULT_ALPHA = 0.5
# Secured retrievals per calendar month (UTC) on the free tier. Answers count
# too, because each one runs a retrieval.
FREE_TIER_MONTHLY_RETRIEVALS = 100


@dataclass
class ScoredChunk:
    chunk: Chunk
    score: float
    reason: str = ""
    policy_id: str | None = None


@dataclass
class RetrievalResult:
    record: Retrieval | None
    allowed: list = field(default_factory=list)
    denied: list = field(default_factory=list)
    candidates: int = 0
    decision: str = "allowed"
    error: str = ""
    error_code: str = ""
    latency_ms: int = 0
    policies_evaluated: int = 0
    refill_rounds: int = 0
    search_mode: str = "keyword"
    trace: list = field(default_factory=list)
    # Allowed and denied candidates in the order they were decided, which is
    # rank order. Empty after an error_deny.
    evaluated: list = field(default_factory=list)

    @property
    def outcome(self):
        """One word for the whole retrieval, as the API reports it."""
        if self.decision == "error_deny":
            return "error_deny"
        if not self.candidates:
            return "no_matches"
        if self.allowed and self.denied:
            return "partial"
        return "allowed" if self.allowed else "denied"


def keyword_candidates(connector, query):
    """Return every keyword match of `query` in `connector`, best first."""
    candidates, offset = [], 0
    while True:
        page = search_candidates(
            connector,
            query=query,
            search_mode="keyword",
            limit=KEYWORD_PAGE_SIZE,
            offset=offset,
        )
        candidates.extend(ScoredChunk(c.chunk, c.score) for c in page)
        if len(page) < KEYWORD_PAGE_SIZE:
            return candidates
        offset += KEYWORD_PAGE_SIZE


def _search_window(connector, request, limit, offset):
    """Return one window of ranked candidates as ScoredChunks."""
    page = search_candidates(
        connector,
        query=request.query,
        search_mode=request.search_mode,
        query_vector=request.query_vector,
        alpha=DEFAULT_ALPHA if request.alpha is None else request.alpha,
        limit=limit,
        offset=offset,
    )
    return [ScoredChunk(candidate.chunk, candidate.score) for candidate in page]


@dataclass
class SearchRequest:
    query: str
    search_mode: str = "keyword"
    query_vector: list | None = None
    alpha: float | None = None


def _require_same_organization(organization, principal, connector):
    """Raise PolicyEvaluationError if either belongs to another organization.

    `organization`'s policies must never decide on another organization's
    principals or documents, so such a retrieval is denied as a whole.
    """
    if principal.organization_id != organization.pk:
        raise PolicyEvaluationError(
            f"principal {principal.pk} belongs to another organization"
        )
    if connector.organization_id != organization.pk:
        raise PolicyEvaluationError(
            f"connector {connector.pk} belongs to another organization"
        )


def validate_search_mode(search_mode):
    """Raise ValidationFailed unless this server can run `search_mode`."""
    if search_mode in SEARCH_MODES:
        return
    if search_mode == "grep":
        raise ValidationFailed(
            "search_mode 'grep' is not supported by this server; use "
            f"{', '.join(SEARCH_MODES)}."
        )
    raise ValidationFailed(
        f"search_mode {search_mode!r} is invalid; use {', '.join(SEARCH_MODES)}."
    )


def execute_retrieval(
    organization,
    principal,
    connector,
    query,
    top_k,
    search_mode="keyword",
    *,
    query_vector=None,
    alpha=None,
    actor="",
):
    """Search `connector` for `principal` and keep only what policy allows.

    Raises ValidationFailed for a search mode this server cannot run,
    EntitlementRequired when the free tier's monthly retrievals are used up,
    and the search engine's SearchUnavailable when a search cannot run. A
    policy that cannot be evaluated never raises: the result then has
    decision "error_deny" and no allowed chunks.
    """
    started = time.perf_counter()
    validate_search_mode(search_mode)
    require_retrieval_quota(organization)
    request = SearchRequest(query or "", search_mode, query_vector, alpha)

    result = RetrievalResult(record=None, search_mode=search_mode)
    fetched = []
    try:
        window = max(top_k * FIRST_WINDOW_FACTOR, FIRST_WINDOW_MIN)
        first = _search_window(connector, request, window, 0)
        fetched = _unique(first, set())
        _require_same_organization(organization, principal, connector)
        evaluator = PolicyEvaluator.load(
            organization, principal, budget_ms=settings.GATECO_POLICY_TIME_BUDGET_MS
        )
        result.policies_evaluated = len(evaluator.policies)
        _walk(evaluator, connector, request, top_k, window, first, fetched, result)
        result.trace = evaluator.trace()
    except PolicyEvaluationError as error:
        logger.warning(
            "Policy evaluation failed for principal %s in organization %s, so the "
            "retrieval was denied: %s",
            principal.pk,
            organization.pk,
            error,
        )
        result.allowed, result.denied, result.evaluated = [], fetched, []
        for candidate in fetched:
            candidate.reason, candidate.policy_id = "policy_evaluation_error", None
        result.decision = "error_deny"
        result.error, result.error_code = str(error), error.code

    result.candidates = len(fetched)
    if result.decision != "error_deny":
        result.decision = "allowed" if result.allowed else "denied"
    result.latency_ms = int((time.perf_counter() - started) * 1000)
    _record(organization, principal, connector, request, result, actor)
    return result


def _unique(candidates, seen):
    """Return the candidates whose chunk is not in `seen`, adding them to it."""
    fresh = []
    for candidate in candidates:
        if candidate.chunk.pk not in seen:
            seen.add(candidate.chunk.pk)
            fresh.append(candidate)
    return fresh


def _walk(evaluator, connector, request, top_k, window, first, fetched, result):
    """Decide candidates in rank order, refilling until top_k are allowed.

    `first` is the first window as the engine returned it and `fetched` its
    unique candidates; refilled candidates are appended to `fetched`.
    """
    decisions = {}
    seen = {candidate.chunk.pk for candidate in fetched}
    batch, returned, offset = list(fetched), len(first), 0
    while True:
        for candidate in batch:
            if len(result.allowed) >= top_k:
                break
            resource = candidate.chunk.resource
            if resource.pk not in decisions:
                decisions[resource.pk] = evaluator.decide(resource)
            decision = decisions[resource.pk]
            candidate.reason = decision.reason
            candidate.policy_id = decision.policy_id
            result.evaluated.append(candidate)
            if decision.allowed:
                result.allowed.append(candidate)
            else:
                result.denied.append(candidate)

        # A window shorter than requested means the engine has no more.
        if (
            len(result.allowed) >= top_k
            or returned < window
            or result.refill_rounds >= MAX_REFILL_ROUNDS
        ):
            return
        offset += window
        window *= 2
        result.refill_rounds += 1
        raw = _search_window(connector, request, window, offset)
        returned = len(raw)
        batch = _unique(raw, seen)
        fetched.extend(batch)


def _record(organization, principal, connector, request, result, actor):
    """Count the retrieval and write its Retrieval row and AuditEvent together."""
    with serialized_atomic():
        consume_retrieval(organization)
        result.record = Retrieval.objects.create(
            organization=organization,
            principal=principal,
            connector=connector,
            query=request.query,
            search_mode=request.search_mode,
            candidates=result.candidates,
            allowed_chunks=len(result.allowed),
            denied_chunks=len(result.denied),
            decision=result.decision,
            reason=result.error,
            refill_rounds=result.refill_rounds,
            latency_ms=result.latency_ms,
            actor=actor,
        )
        AuditEvent.objects.create(
            organization=organization,
            event_type=(
                AuditEvent.Type.RETRIEVAL_ALLOWED
                if result.decision == "allowed"
                else AuditEvent.Type.RETRIEVAL_DENIED
            ),
            actor=actor,
            principal=principal,
            retrieval=result.record,
            decision=result.decision,
            details={
                "connector_id": str(connector.pk),
                "search_mode": request.search_mode,
                "outcome": result.outcome,
                "reason": result.error,
                "error_code": result.error_code,
                "candidates": result.candidates,
                "refill_rounds": result.refill_rounds,
                "policies_evaluated": result.policies_evaluated,
                "allowed_resource_ids": _resource_ids(result.allowed),
                "denied_resource_ids": _resource_ids(result.denied),
            },
        )


def _resource_ids(candidates):
    return sorted({str(candidate.chunk.resource_id) for candidate in candidates})


# --- monthly usage --------------------------------------------------------------


def current_month():
    """Return the first day of the current calendar month in UTC."""
    return timezone.now().astimezone(datetime.UTC).date().replace(day=1)


def require_retrieval_quota(organization):
    """Raise EntitlementRequired if a free-tier organization has none left.

    This read is only an early exit before any search runs; the conditional
    update in consume_retrieval is what enforces the limit.
    """
    if organization.is_paid:
        return
    used = (
        MonthlyUsage.objects.filter(organization=organization, month=current_month())
        .values_list("retrievals", flat=True)
        .first()
    )
    if used is not None and used >= FREE_TIER_MONTHLY_RETRIEVALS:
        raise _limit_reached()


def consume_retrieval(organization):
    """Count one retrieval this month, or raise EntitlementRequired.

    The free tier's limit is one conditional UPDATE, so concurrent requests
    on PostgreSQL cannot count past it.
    """
    month = current_month()
    MonthlyUsage.objects.bulk_create(
        [MonthlyUsage(organization=organization, month=month)], ignore_conflicts=True
    )
    usage = MonthlyUsage.objects.filter(organization=organization, month=month)
    if not organization.is_paid:
        usage = usage.filter(retrievals__lt=FREE_TIER_MONTHLY_RETRIEVALS)
    if not usage.update(retrievals=F("retrievals") + 1):
        raise _limit_reached()


def _limit_reached():
    return EntitlementRequired(
        f"The free plan includes {FREE_TIER_MONTHLY_RETRIEVALS} secured retrievals "
        "per calendar month (UTC), and this month's are used up. Upgrade to the "
        "team plan, or wait until the first of next month.",
        reason=EntitlementRequired.LIMIT,
        upgrade_to="team",
    )
