"""The chat completion behind a Grounded Answer: prompt, call and citations.

The model sees only the allowed chunks, numbered from 1, and is asked for a
JSON object `{"answer": "... [1] ...", "citations": [1]}`. Markers that name
no supplied chunk are dropped before anything reaches the client.
"""

import json
import logging
import re
from dataclasses import dataclass, field

import openai
from django.conf import settings
from django.views.decorators.debug import sensitive_variables

from gateco.errors import ApiError

logger = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You answer questions using only the numbered context chunks you are given. "
    "Reply with a JSON object with two keys: \"answer\", the answer text, where "
    "every sentence ends with markers such as [1] naming the chunks it came "
    "from, and \"citations\", the list of chunk numbers you used. If the chunks "
    "do not contain the answer, say so in \"answer\" and return an empty "
    "\"citations\" list. Never use knowledge from outside the chunks."
)
MARKER = re.compile(r"\[(\d+)\]")


class LlmError(ApiError):
    """An upstream LLM failure, mapped to a stable Gateco code."""


class LlmKeyInvalid(LlmError):
    status_code = 422
    code = "LLM_KEY_INVALID"
    default_message = (
        "OpenAI rejected your organization's API key. Replace it under Organization "
        "Settings → API Keys → LLM API Key."
    )


class LlmFallbackUnavailable(LlmError):
    status_code = 503
    code = "LLM_FALLBACK_UNAVAILABLE"
    default_message = (
        "The shared synthesis key is unavailable right now; no credit was used. "
        "Add your own key under Organization Settings → API Keys → LLM API Key."
    )


class LlmFallbackQuotaExhausted(LlmError):
    status_code = 503
    code = "LLM_FALLBACK_QUOTA_EXHAUSTED"
    default_message = (
        "The shared synthesis key is out of upstream quota; no credit was used. "
        "Add your own key under Organization Settings → API Keys → LLM API Key."
    )


class LlmKeyQuotaExhausted(LlmError):
    status_code = 422
    code = "LLM_KEY_QUOTA_EXHAUSTED"
    default_message = (
        "OpenAI reports that your organization's API key has no quota left. Check "
        "the billing of that OpenAI account, or replace the key under Organization "
        "Settings → API Keys → LLM API Key."
    )


class LlmRateLimited(LlmError):
    status_code = 429
    code = "LLM_RATE_LIMITED"
    default_message = "OpenAI is rate-limiting this key; retry after the given delay."


class LlmTimeout(LlmError):
    status_code = 504
    code = "LLM_TIMEOUT"
    default_message = "OpenAI did not respond in time; no credit was used. Retry later."


class LlmUpstreamError(LlmError):
    status_code = 502
    code = "LLM_UPSTREAM_ERROR"
    default_message = "OpenAI returned an error; no credit was used. Retry later."


@dataclass
class Completion:
    answer: str
    cited_numbers: list = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


def build_messages(query, chunks):
    """Return the chat messages for `query` over `chunks`, numbered from 1."""
    parts = [f"Question: {' '.join(query.split())}", "", "Context:"]
    for number, chunk in enumerate(chunks, start=1):
        text = chunk.text.replace("</chunk>", "</ chunk>")
        parts.append(f'<chunk index="{number}">\n{text}\n</chunk>')
    return [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "\n".join(parts)},
    ]


def complete(api_key, messages, key_source):
    """Make one chat completion and return the parsed Completion.

    Raises an LlmError subclass for every upstream failure. The key travels
    only in the Authorization header and never appears in a log or message.
    """
    client = openai.OpenAI(
        api_key=api_key.reveal(),
        base_url=settings.OPENAI_BASE_URL,
        timeout=settings.GATECO_LLM_TIMEOUT_SECONDS,
        max_retries=0,
    )
    try:
        response = client.chat.completions.create(
            model=settings.GATECO_ANSWER_MODEL,
            messages=messages,
            response_format={"type": "json_object"},
            temperature=0,
        )
    except openai.APIError as error:
        raise _map_error(error, key_source) from None
    finally:
        client.close()

    try:
        content = response.choices[0].message.content or ""
    except (IndexError, AttributeError, TypeError):
        logger.warning("Chat completion returned no choices (key source %s)", key_source)
        raise LlmUpstreamError("OpenAI returned no choices; no credit was used. Retry later.") from None
    answer, numbers = parse_content(content)
    usage = response.usage
    return Completion(
        answer=answer,
        cited_numbers=numbers,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
    )


class KeyCheck:
    VALID = "valid"
    INVALID = "invalid"
    UNVERIFIED = "unverified"


@sensitive_variables("api_key")
def check_api_key(api_key):
    """Check a new key with OpenAI's model list, which is not billed.

    Returns KeyCheck.INVALID only when OpenAI rejects the key (401 or 403);
    a timeout, a network error or any other failure is UNVERIFIED, because
    it tells nothing about the key. The key goes in the Authorization header.
    """
    client = openai.OpenAI(
        api_key=api_key,
        base_url=settings.OPENAI_BASE_URL,
        timeout=settings.GATECO_KEY_CHECK_TIMEOUT_SECONDS,
        max_retries=0,
    )
    try:
        client.models.list()
    except (openai.AuthenticationError, openai.PermissionDeniedError):
        return KeyCheck.INVALID
    except openai.APIError as error:
        logger.warning("Could not check an OpenAI key: %s", type(error).__name__)
        return KeyCheck.UNVERIFIED
    finally:
        client.close()
    return KeyCheck.VALID


def parse_content(content):
    """Return `(answer, cited_numbers)` from the model's reply.

    A reply that is not the JSON object asked for is read as plain text with
    inline markers. The numbers are not yet checked against the chunks.
    """
    try:
        data = json.loads(content)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("answer"), str):
        answer = data["answer"]
        listed = data.get("citations")
        listed = listed if isinstance(listed, list) else []
    else:
        answer, listed = content, []

    numbers = []
    for value in [int(marker) for marker in MARKER.findall(answer)] + listed:
        if isinstance(value, int) and not isinstance(value, bool) and value not in numbers:
            numbers.append(value)
    return answer.strip(), numbers


def keep_valid_markers(answer, valid_numbers):
    """Remove markers that name no supplied chunk from the answer text."""

    def replace(match):
        return match.group(0) if int(match.group(1)) in valid_numbers else ""

    return re.sub(r" {2,}", " ", MARKER.sub(replace, answer)).strip()


def _map_error(error, key_source):
    status = getattr(error, "status_code", None)
    logger.warning(
        "Chat completion failed: %s (status %s, key source %s)",
        type(error).__name__,
        status,
        key_source,
    )
    if isinstance(error, openai.APITimeoutError):
        return LlmTimeout()
    if isinstance(error, (openai.AuthenticationError, openai.PermissionDeniedError)):
        if key_source == "organization":
            return LlmKeyInvalid()
        return LlmFallbackUnavailable()
    if isinstance(error, openai.RateLimitError):
        if error.code == "insufficient_quota":
            if key_source == "fallback":
                return LlmFallbackQuotaExhausted()
            return LlmKeyQuotaExhausted()
        retry_after = error.response.headers.get("retry-after", "10")
        return LlmRateLimited(headers={"Retry-After": retry_after})
    return LlmUpstreamError()
