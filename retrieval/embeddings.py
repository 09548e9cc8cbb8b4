"""Turn text into vectors with OpenAI's embeddings API and the organization's
own key.

The platform's shared key is never used here, because it pays only for the
fallback syntheses of paid tiers. Embedding a whole corpus with it would bill
the platform for an organization's documents.
"""

import logging

import numpy as np
import openai
from django.conf import settings
from django.views.decorators.debug import sensitive_variables

from keyvault.vault import SecretUnavailable, get_llm_api_key

from .search_errors import SearchUnavailable

logger = logging.getLogger(__name__)

# The API accepts up to 2,048 inputs and 300,000 tokens per request (the
# docstring of embeddings.create in openai 3.60.0). 100 chunks of at most
# 8,000 characters stay below both, at an estimated 4 characters per token.
EMBEDDING_BATCH_SIZE = 100
ADD_KEY_HINT = "Add a key under Organization Settings → API Keys → LLM API Key."


def embed_query(organization, text):
    """Return the embedding of `text`, made with the organization's own key.

    Raises SearchUnavailable with code EMBEDDING_KEY_MISSING when the
    organization has no key, KEY_UNAVAILABLE when it cannot be decrypted and
    EMBEDDING_FAILED when the API call fails.
    """
    api_key = _organization_key(organization)
    if api_key is None:
        raise SearchUnavailable(
            "EMBEDDING_KEY_MISSING",
            "Vector search needs a query_vector, or an LLM API key to embed the "
            f"query with. Send query_vector, or use keyword search. {ADD_KEY_HINT}",
        )
    return _create_embeddings(organization, api_key, [text])[0]


def embed_texts(organization, texts):
    """Return one embedding per text, or None when the organization has no key.

    Sends one request per EMBEDDING_BATCH_SIZE texts. Raises ValueError for an
    empty text, which the API rejects, and SearchUnavailable like embed_query
    for a key that cannot be decrypted or a failed call.
    """
    texts = list(texts)
    if any(not isinstance(text, str) or not text.strip() for text in texts):
        raise ValueError("Every text to embed must be a non-empty string.")
    api_key = _organization_key(organization)
    if api_key is None:
        return None
    vectors = []
    for start in range(0, len(texts), EMBEDDING_BATCH_SIZE):
        batch = texts[start : start + EMBEDDING_BATCH_SIZE]
        vectors.extend(_create_embeddings(organization, api_key, batch))
    return vectors


def to_bytes(vector):
    """Return `vector` as little-endian float32 bytes, the Chunk.embedding format."""
    return np.asarray(vector, dtype="<f4").tobytes()


def _organization_key(organization):
    try:
        return get_llm_api_key(organization)
    except SecretUnavailable as error:
        logger.error("%s", error)
        raise SearchUnavailable(
            "KEY_UNAVAILABLE",
            "Your organization's LLM API key could not be decrypted right now, so "
            "nothing could be embedded. Retry later; if it persists, re-enter the "
            "key in Organization Settings.",
            status_code=503,
        ) from None


@sensitive_variables("api_key")
def _create_embeddings(organization, api_key, texts):
    """Make one embeddings request and return the vectors in input order."""
    dimensions = settings.GATECO_EMBEDDING_DIMENSIONS
    options = {"dimensions": dimensions} if dimensions else {}
    client = openai.OpenAI(
        api_key=api_key.reveal(),
        base_url=settings.OPENAI_BASE_URL,
        timeout=settings.GATECO_LLM_TIMEOUT_SECONDS,
        max_retries=0,
    )
    try:
        response = client.embeddings.create(
            model=settings.GATECO_EMBEDDING_MODEL, input=texts, **options
        )
    except openai.APIError as error:
        # The upstream message can quote part of the key, so only the error
        # type and status go into the log and the exception.
        status = getattr(error, "status_code", None)
        logger.warning(
            "Embeddings request for organization %s failed: %s (HTTP status %s)",
            organization.pk,
            type(error).__name__,
            status,
        )
        raise SearchUnavailable(
            "EMBEDDING_FAILED", _failure_message(error), status_code=502
        ) from None
    finally:
        client.close()

    vectors = _vectors_in_input_order(response, len(texts))
    if vectors is None:
        logger.warning(
            "Embeddings response for organization %s had the wrong shape",
            organization.pk,
        )
        raise SearchUnavailable(
            "EMBEDDING_FAILED",
            "The embeddings API returned a response of the wrong shape. Retry later.",
            status_code=502,
        )
    return vectors


def _vectors_in_input_order(response, expected_count):
    """Return the response's vectors ordered by `index`, or None if malformed.

    Malformed means another count than `expected_count`, a missing or
    repeated index, vectors of different lengths or a value that is not a
    finite number.
    """
    items = sorted(response.data, key=lambda item: item.index)
    if [item.index for item in items] != list(range(expected_count)):
        return None
    vectors = [list(item.embedding) for item in items]
    try:
        matrix = np.asarray(vectors, dtype=np.float64)
    except (TypeError, ValueError):
        # Raised for vectors of different lengths and for non-numbers.
        return None
    if matrix.ndim != 2 or matrix.shape[1] == 0 or not np.isfinite(matrix).all():
        return None
    return vectors


def _failure_message(error):
    if isinstance(error, openai.AuthenticationError | openai.PermissionDeniedError):
        return (
            "OpenAI rejected your organization's API key while embedding. Replace "
            "it under Organization Settings → API Keys → LLM API Key."
        )
    if isinstance(error, openai.RateLimitError):
        return "OpenAI is rate-limiting your organization's key; retry later."
    if isinstance(error, openai.APITimeoutError):
        return "The embeddings API did not answer in time; retry later."
    if isinstance(error, openai.APIConnectionError):
        return "The embeddings API could not be reached; retry later."
    return "The embeddings API failed to answer; retry later."
