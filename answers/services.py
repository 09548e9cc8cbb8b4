"""Grounded Answers: retrieve what the principal may read, then synthesize.

1. Run the policy-filtered retrieval. Nothing retrieved is
   `insufficient_context`; candidates that were all denied is `no_access`.
   Neither makes an LLM request.
2. Choose the key: the organization's own key if one is stored; otherwise,
   for a paid tier, one reserved fallback call on the shared key; otherwise a
   422 that still carries the allowed chunks.
3. Make one chat completion from the allowed chunks only. A failed upstream
   request gives the reserved fallback call back.
4. Keep only citation markers that name a supplied chunk, and write the audit
   row.
"""

import logging
import time
from dataclasses import dataclass

from django.conf import settings

from gateco.errors import ApiError
from keyvault.vault import SecretUnavailable, SecretValue, get_llm_api_key_with_version
from retrieval.search import execute_retrieval

from . import llm
from .models import AnswerAudit, KeySource

logger = logging.getLogger(__name__)

EXCERPT_LENGTH = 200
ADD_KEY_HINT = "Add a key under Organization Settings → API Keys → LLM API Key."


class KeyUnavailable(ApiError):
    status_code = 503
    code = "KEY_UNAVAILABLE"
    default_message = (
        "Your organization's LLM API key could not be decrypted right now. "
        "Retry later; if it persists, re-enter the key in Organization Settings."
    )


class LlmKeyNotConfigured(ApiError):
    status_code = 422
    code = "LLM_KEY_NOT_CONFIGURED"
    default_message = (
        "Answer synthesis on the free plan needs your own OpenAI API key. "
        + ADD_KEY_HINT
    )


class LlmCreditExhausted(ApiError):
    status_code = 422
    code = "LLM_CREDIT_EXHAUSTED"

    def __init__(self, limit, **kwargs):
        super().__init__(
            f"Your organization has used all {limit} fallback synthesis calls. "
            + ADD_KEY_HINT,
            **kwargs,
        )


def chunk_result(scored):
    """Describe one allowed chunk with its score, for error bodies."""
    chunk, resource = scored.chunk, scored.chunk.resource
    return {
        "vector_id": str(chunk.id),
        "chunk_id": str(chunk.id),
        "resource_id": str(resource.id),
        "external_resource_id": resource.external_id,
        "score": scored.score,
        "text": chunk.text,
        "granted": True,
        "policy_decision": "allowed",
        "matched_policy_id": scored.policy_id,
        "metadata": {
            "title": resource.title,
            "classification": resource.classification,
            "labels": resource.labels,
        },
    }


class AnswerRequest:
    def __init__(
        self,
        *,
        organization,
        principal,
        connector,
        query,
        top_k,
        search_mode,
        actor,
        alpha=None,
    ):
        self.organization = organization
        self.principal = principal
        self.connector = connector
        self.query = query
        self.top_k = top_k
        self.search_mode = search_mode
        self.alpha = alpha
        self.actor = actor
        self.started = time.perf_counter()


def execute_answer(request):
    """Return the answer body for `request`, or raise an ApiError.

    The retrieval it runs is a secured retrieval like any other: it is audited
    and counts toward the free tier's monthly retrievals.
    """
    retrieval = execute_retrieval(
        request.organization,
        request.principal,
        request.connector,
        request.query,
        request.top_k,
        request.search_mode,
        alpha=request.alpha,
        actor=request.actor,
    )
    body = _base_body(request, retrieval)
    audit = AnswerAudit(
        organization=request.organization,
        principal=request.principal,
        retrieval=retrieval.record,
        actor=request.actor,
    )

    if not retrieval.allowed:
        body["outcome"] = "no_access" if retrieval.candidates else "insufficient_context"
        if retrieval.decision == "error_deny":
            body["diagnostics"]["outcome_detail"] = f"error_deny: {retrieval.error}"
        return _finish(request, body, audit)

    try:
        choice = _choose_key(request.organization)
    except ApiError as error:
        _finish(request, body, audit, error=error)
        error.extra.update(body, results=[chunk_result(c) for c in retrieval.allowed])
        raise

    chunks = [scored.chunk for scored in retrieval.allowed]
    audit.key_source = body["key_source"] = choice.source
    audit.key_version = choice.version
    audit.model = body["model"] = settings.GATECO_ANSWER_MODEL
    synthesis_started = time.perf_counter()
    try:
        completion = llm.complete(
            choice.api_key, llm.build_messages(request.query, chunks), choice.source
        )
    except llm.LlmError as error:
        _finish(request, body, audit, error=error)
        if choice.reservation is not None:
            request.organization.release_fallback_call(choice.reservation, audit)
            body["fallback_calls_remaining"] = (
                request.organization.fallback_calls_remaining
            )
        error.extra.update(body, results=[chunk_result(c) for c in retrieval.allowed])
        raise
    except BaseException:
        # Anything else (a bug, a worker shutdown) still must not cost a call.
        if choice.reservation is not None:
            request.organization.release_fallback_call(choice.reservation)
        raise
    body["synthesis_latency_ms"] = _ms_since(synthesis_started)
    if choice.source == KeySource.ORGANIZATION:
        body["cap_reached"] = request.organization.count_own_key_use()
    audit.prompt_tokens = completion.prompt_tokens
    audit.completion_tokens = completion.completion_tokens

    _apply_completion(body, completion, retrieval.allowed)
    _finish(request, body, audit)
    if choice.reservation is not None:
        request.organization.commit_fallback_call(choice.reservation, audit)
    return body


@dataclass
class KeyChoice:
    api_key: SecretValue
    source: str
    version: int | None = None
    reservation: object = None


def _choose_key(organization):
    """Return the KeyChoice for one synthesis, or raise why no key can be used."""
    try:
        own_key, version = get_llm_api_key_with_version(organization)
    except SecretUnavailable as error:
        # Never fall back to the shared key here: the organization chose to
        # pay with its own key, and a decrypt failure must not bill us instead.
        logger.error("%s", error)
        raise KeyUnavailable() from None
    if own_key is not None:
        return KeyChoice(own_key, KeySource.ORGANIZATION, version=version)

    if not organization.is_paid:
        raise LlmKeyNotConfigured()
    if not settings.OPENAI_API_KEY:
        logger.error("OPENAI_API_KEY is not set, so no fallback call can be made")
        raise llm.LlmFallbackUnavailable()
    reservation = organization.reserve_fallback_call()
    if reservation is None:
        raise LlmCreditExhausted(organization.fallback_call_limit)
    return KeyChoice(
        SecretValue(settings.OPENAI_API_KEY), KeySource.FALLBACK, reservation=reservation
    )


def _apply_completion(body, completion, allowed):
    supplied = {number: scored for number, scored in enumerate(allowed, start=1)}
    cited = [number for number in completion.cited_numbers if number in supplied]
    body["answer"] = llm.keep_valid_markers(completion.answer, set(cited))
    body["citations"] = [
        {
            "index": number,
            "resource_id": str(supplied[number].chunk.resource_id),
            "vector_id": str(supplied[number].chunk.id),
            "text_excerpt": supplied[number].chunk.text[:EXCERPT_LENGTH],
            "score": supplied[number].score,
        }
        for number in cited
    ]
    body["outcome"] = "answered" if cited else "insufficient_context"
    body["chunks_used_final"] = len(cited)


def _base_body(request, retrieval):
    organization = request.organization
    return {
        "answer": None,
        "outcome": "",
        "is_partial": bool(retrieval.allowed and retrieval.denied),
        "citations": [],
        "retrieval_id": str(retrieval.record.id),
        "allowed_chunks": len(retrieval.allowed),
        "denied_chunks": len(retrieval.denied),
        "model": None,
        "retrieval_latency_ms": retrieval.latency_ms,
        "synthesis_latency_ms": None,
        "total_latency_ms": None,
        "chunks_available": len(retrieval.allowed),
        "chunks_used_initial": len(retrieval.allowed),
        "chunks_used_final": 0,
        "retry_used": False,
        "cap_reached": False,
        "key_source": None,
        "fallback_calls_remaining": organization.fallback_calls_remaining,
        "diagnostics": {
            "candidates_fetched": retrieval.candidates,
            "candidates_allowed": len(retrieval.allowed),
            "candidates_denied": len(retrieval.denied),
            "refill_rounds": retrieval.refill_rounds,
            "search_mode": retrieval.search_mode,
            "policies_evaluated": retrieval.policies_evaluated,
            "active_denial_reasons": sorted({c.reason for c in retrieval.denied if c.reason}),
            "outcome_detail": "",
        },
    }


def _finish(request, body, audit, error=None):
    body["total_latency_ms"] = _ms_since(request.started)
    body["fallback_calls_remaining"] = request.organization.fallback_calls_remaining
    audit.outcome = "error" if error else body["outcome"]
    audit.error_code = error.code if error else ""
    audit.latency_ms = body["total_latency_ms"]
    audit.save()
    logger.info(
        "Answer for organization %s: outcome %s, key source %s",
        request.organization.pk,
        audit.outcome if not error else error.code,
        audit.key_source or "none",
    )
    return body


def _ms_since(started):
    return int((time.perf_counter() - started) * 1000)
