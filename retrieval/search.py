"""Policy-filtered retrieval over the built-in connector.

Candidates are ranked by keyword relevance, then walked in rank order through
the policy engine until `top_k` are allowed or the candidates run out, so an
allowed chunk is never lost behind denied ones that ranked higher.
"""

import logging
import math
import re
import time
from dataclasses import dataclass, field

from django.db.models import Q

from .models import Chunk, Policy, PolicyStatus, Retrieval
from .policy import PolicyEvaluationError, decide

logger = logging.getLogger(__name__)

SEARCH_MODES = ("keyword",)
STOPWORDS = frozenset(
    "a an and are as at be but by can do does for from had has have how i in is it "
    "its me my of on or our should so that the their them there these they this to "
    "us was we what when where which who why will with you your".split()
)
# BM25 parameters, the usual defaults from Robertson and Zaragoza (2009).
BM25_K1 = 1.2
BM25_B = 0.75


def query_terms(text):
    words = re.findall(r"[a-z0-9]+", text.lower())
    return sorted({word for word in words if len(word) > 1 and word not in STOPWORDS})


@dataclass
class ScoredChunk:
    chunk: Chunk
    score: float
    reason: str = ""
    policy_id: str | None = None


@dataclass
class RetrievalResult:
    record: Retrieval
    allowed: list = field(default_factory=list)
    denied: list = field(default_factory=list)
    candidates: int = 0
    decision: str = "allowed"
    error: str = ""
    latency_ms: int = 0
    policies_evaluated: int = 0


def keyword_candidates(connector, query):
    """Return every chunk of `connector` that contains a query term, ranked.

    NOTE: matching runs as LIKE queries and scoring in Python, which is fine
    for thousands of chunks but not for a large corpus; a full-text index
    (FTS5 on SQLite, tsvector on PostgreSQL) is the next step.
    """
    terms = query_terms(query)
    if not terms:
        return []
    matches = Q()
    for term in terms:
        matches |= Q(text__icontains=term)
    chunks = list(
        Chunk.objects.filter(resource__connector=connector)
        .filter(matches)
        .select_related("resource", "resource__owner")
    )
    if not chunks:
        return []

    tokenized = [re.findall(r"[a-z0-9]+", chunk.text.lower()) for chunk in chunks]
    average_length = sum(len(tokens) for tokens in tokenized) / len(tokenized)
    total_chunks = Chunk.objects.filter(resource__connector=connector).count()
    document_frequency = {
        term: sum(1 for tokens in tokenized if term in tokens) for term in terms
    }

    scored = []
    for chunk, tokens in zip(chunks, tokenized):
        score = 0.0
        for term in terms:
            frequency = tokens.count(term)
            if not frequency:
                continue
            idf = math.log(
                1
                + (total_chunks - document_frequency[term] + 0.5)
                / (document_frequency[term] + 0.5)
            )
            norm = BM25_K1 * (1 - BM25_B + BM25_B * len(tokens) / average_length)
            score += idf * frequency * (BM25_K1 + 1) / (frequency + norm)
        if score > 0:
            scored.append(ScoredChunk(chunk, round(score, 4)))
    scored.sort(key=lambda item: (-item.score, str(item.chunk.resource_id), item.chunk.position))
    return scored


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


def execute_retrieval(organization, principal, connector, query, top_k, search_mode):
    """Search `connector` for `principal` and keep only what policy allows."""
    started = time.perf_counter()
    candidates = keyword_candidates(connector, query)
    policies = list(
        Policy.objects.filter(organization=organization, status=PolicyStatus.ACTIVE)
    )
    result = RetrievalResult(
        record=None, candidates=len(candidates), policies_evaluated=len(policies)
    )

    decisions = {}
    try:
        _require_same_organization(organization, principal, connector)
        for candidate in candidates:
            if len(result.allowed) >= top_k:
                break
            resource = candidate.chunk.resource
            if resource.pk not in decisions:
                decisions[resource.pk] = decide(policies, principal, resource)
            decision = decisions[resource.pk]
            candidate.reason = decision.reason
            candidate.policy_id = decision.policy_id
            if decision.allowed:
                result.allowed.append(candidate)
            else:
                result.denied.append(candidate)
    except PolicyEvaluationError as error:
        logger.warning(
            "Policy evaluation failed for principal %s in organization %s: %s",
            principal.pk,
            organization.pk,
            error,
        )
        result.allowed, result.denied = [], candidates
        result.decision, result.error = "error_deny", str(error)

    if result.decision != "error_deny":
        result.decision = "allowed" if result.allowed else "denied"
    result.latency_ms = int((time.perf_counter() - started) * 1000)
    result.record = Retrieval.objects.create(
        organization=organization,
        principal=principal,
        connector=connector,
        query=query,
        search_mode=search_mode,
        candidates=len(candidates),
        allowed_chunks=len(result.allowed),
        denied_chunks=len(result.denied),
        decision=result.decision,
    )
    return result
