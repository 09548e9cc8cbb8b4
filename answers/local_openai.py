"""Local stand-in for the OpenAI HTTP API, for tests and offline demos.

The server implements the part of the OpenAI REST protocol that Gateco calls through
the official ``openai`` client: ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/embeddings``. Chat content and embeddings are deterministic. A chat
completion copies the sentences of Gateco's context chunks that share the most words
with the question, and an embedding hashes the words of the input into signed buckets.

The ``/_control/`` endpoints have no authentication, so bind the server to a loopback
address only. They inject failures (401, 429, 500, slow responses), reject API keys by
suffix and return the request record. The record and the log contain only the last
four characters of each API key.

Run ``python -m answers.local_openai --host 127.0.0.1 --port 8765`` and pass
``base_url="http://127.0.0.1:8765/v1"`` to ``openai.OpenAI``.
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import http.server
import ipaddress
import json
import logging
import math
import re
import signal
import socketserver
import struct
import threading
import time
import urllib.parse

logger = logging.getLogger(__name__)

MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
EMBEDDING_DIMENSIONS = 256
MAX_BODY_BYTES = 10 * 1024 * 1024
FAILURE_MODES = ("401", "429", "quota", "500", "slow")
RETRY_AFTER_SECONDS = 7
MAX_ANSWER_SENTENCES = 3
ABSTENTION = "The provided context does not contain the answer."
STOPWORDS = frozenset(
    """
    what which who whom whose how does did the and for our are can with about from
    this that these those there here when where why will would should could have has
    had was were been being into your you they them their its not but any all also
    than then some such only just very much many more most may might must shall
    """.split()
)

WORD_RE = re.compile(r"[a-z0-9]+")
SENTENCE_BREAK_RE = re.compile(r"(?<=[.!?])\s+|\n")
# Copied chunk text may contain "[7]", which would read as a citation of chunk 7.
CITATION_MARKER_RE = re.compile(r"\[\s*\d+\s*\]")
QUESTION_RE = re.compile(r"^Question:[ \t]*(.*)$", re.MULTILINE)
CONTEXT_RE = re.compile(r"^Context:[ \t]*$", re.MULTILINE)
CHUNK_RE = re.compile(r'<chunk index="(\d+)">(.*?)</chunk>', re.DOTALL)


class ApiError(ValueError):
    """Error that the server sends as an OpenAI-shaped JSON error response."""

    def __init__(self, status, message, error_type="invalid_request_error", **extra):
        super().__init__(message)
        self.status, self.error_type = status, error_type
        self.param, self.code = extra.get("param"), extra.get("code")
        self.headers = extra.get("headers", {})

    def body(self) -> dict:
        fields = {"message": str(self), "type": self.error_type}
        return {"error": {**fields, "param": self.param, "code": self.code}}


def invalid_key_error(message: str) -> ApiError:
    return ApiError(401, message, code="invalid_api_key")


def key_last_four(key: str) -> str:
    """Return the last four characters of an API key, or "****" for a short key.

    The last four characters of a key shorter than 8 would reveal most of it.
    """
    return key[-4:] if len(key) >= 8 else "****"


def word_forms(word: str) -> set[str]:
    """Return the word and each form left after removing one -ing/-ed/-es/-s suffix.

    Two words match when their form sets overlap, so "rates" matches "rate" and "taxes"
    matches "tax". A suffix is removed only if 3 or more characters remain.
    """
    forms = {word}
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            forms.add(word[: -len(suffix)])
    return forms


def question_terms(question: str) -> list[set[str]]:
    """Return the form sets of the question's distinct content words."""
    terms = {}
    for word in WORD_RE.findall(question.lower()):
        if len(word) >= 3 and word not in STOPWORDS:
            forms = word_forms(word)
            # Keyed by the shortest form, so "refund" and "refunds" are one term.
            terms.setdefault(min(forms, key=lambda form: (len(form), form)), forms)
    return list(terms.values())


def score_sentence(sentence: str, terms: list[set[str]]) -> int:
    sentence_forms = set()
    for word in WORD_RE.findall(sentence.lower()):
        sentence_forms |= word_forms(word)
    return sum(1 for forms in terms if forms & sentence_forms)


def split_sentences(text: str) -> list[str]:
    pieces = SENTENCE_BREAK_RE.split(CITATION_MARKER_RE.sub(" ", text))
    sentences = [" ".join(piece.split()) for piece in pieces]
    return [sentence for sentence in sentences if sentence]


def parse_prompt(text: str) -> tuple[str, list[tuple[int, str]]] | None:
    """Parse Gateco's user message into the question and (index, text) chunks.

    Returns None when no line starts with "Question:". Chunks count only after the
    "Context:" line, so a question that contains a chunk tag adds no chunk.
    """
    question_match = QUESTION_RE.search(text)
    if question_match is None:
        return None
    context_match = CONTEXT_RE.search(text, question_match.end())
    if context_match is None:
        return question_match.group(1), []
    matches = CHUNK_RE.finditer(text, context_match.end())
    return question_match.group(1), [(int(m.group(1)), m.group(2)) for m in matches]


def answer_prompt(text: str) -> dict:
    """Build the {"answer", "citations"} object for a Gateco user message.

    The answer contains up to 3 sentences that contain a question term, highest score
    first, ties by chunk order and then sentence order. Each sentence is followed by
    its chunk's marker, such as " [2]". Without such a sentence, "answer" is
    ABSTENTION and "citations" is empty.
    """
    parsed = parse_prompt(text)
    if parsed is None:
        return {"answer": ABSTENTION, "citations": []}
    question, chunks = parsed
    terms = question_terms(question)
    candidates = []
    for chunk_order, (index, chunk_text) in enumerate(chunks):
        for sentence_order, sentence in enumerate(split_sentences(chunk_text)):
            score = score_sentence(sentence, terms)
            if score >= 1:
                candidates.append(
                    (-score, chunk_order, sentence_order, sentence, index)
                )
    if not candidates:
        return {"answer": ABSTENTION, "citations": []}
    picked = sorted(candidates)[:MAX_ANSWER_SENTENCES]
    answer = " ".join(f"{sentence} [{index}]" for *_, sentence, index in picked)
    return {"answer": answer, "citations": sorted({index for *_, index in picked})}


def message_text(message: dict) -> str:
    """Return a message's text, joining the text parts of a multi-part content list."""
    content = message.get("content")
    if isinstance(content, list):
        parts = [part.get("text") for part in content if isinstance(part, dict)]
        return " ".join(part for part in parts if isinstance(part, str))
    return content if isinstance(content, str) else ""


def add_hashed_token(vector: list[float], token: str) -> None:
    digest = hashlib.sha256(token.encode("utf-8")).digest()
    bucket = int.from_bytes(digest[:4], "big") % len(vector)
    vector[bucket] += 1.0 if digest[4] & 1 else -1.0


def embed_text(text: str) -> list[float]:
    """Return a unit vector of EMBEDDING_DIMENSIONS signed, hashed word counts."""
    vector = [0.0] * EMBEDDING_DIMENSIONS
    for word in WORD_RE.findall(text.lower()):
        add_hashed_token(vector, word)
    norm = math.sqrt(sum(value * value for value in vector))
    if norm == 0.0:
        # Text without words, or whose word signs cancel out, still gets a unit
        # vector, because callers divide by the norm for cosine similarity.
        add_hashed_token(vector, text)
        norm = 1.0
    return [value / norm for value in vector]


def invalid_field(name: str, expected: str) -> ApiError:
    message = f"Missing or invalid '{name}': expected {expected}."
    return ApiError(400, message, param=name)


def require(body: dict, name: str, is_valid, expected: str):
    value = body.get(name)
    if not is_valid(value):
        raise invalid_field(name, expected)
    return value


def is_text(value) -> bool:
    return isinstance(value, str) and value != ""


def is_message_list(value) -> bool:
    if not isinstance(value, list) or not value:
        return False
    return all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in value)


def is_text_list(value) -> bool:
    return isinstance(value, list) and value != [] and all(map(is_text, value))


def list_models(body: None) -> dict:
    models = [
        {"id": model_id, "object": "model", "created": 0, "owned_by": "local"}
        for model_id in MODEL_IDS
    ]
    return {"object": "list", "data": models}


def create_chat_completion(body: dict) -> dict:
    model = require(body, "model", is_text, "a non-empty string")
    expected = "a non-empty list of objects with a 'role'"
    messages = require(body, "messages", is_message_list, expected)
    require(body, "stream", lambda value: not value, "false (streaming is unsupported)")
    # The content is JSON for any response_format, because Gateco parses it as JSON.
    user_messages = [message for message in messages if message["role"] == "user"]
    prompt = message_text(user_messages[-1]) if user_messages else ""
    content = json.dumps(answer_prompt(prompt))
    prompt_tokens = sum(len(message_text(message).split()) for message in messages)
    completion_tokens = len(content.split())
    request_digest = hashlib.sha256(json.dumps([model, messages]).encode("utf-8"))
    message = {"role": "assistant", "content": content, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {
        "id": "chatcmpl-local-" + request_digest.hexdigest()[:24],
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {**usage, "total_tokens": prompt_tokens + completion_tokens},
    }


def create_embeddings(body: dict) -> dict:
    model = require(body, "model", is_text, "a non-empty string")
    texts = body.get("input")
    texts = [texts] if isinstance(texts, str) else texts
    expected = "a non-empty string or list of them (token arrays are unsupported)"
    require({"input": texts}, "input", is_text_list, expected)
    formats = (None, "float", "base64")
    encoding = require(body, "encoding_format", formats.__contains__, str(formats))
    dimensions = (None, EMBEDDING_DIMENSIONS)
    require(body, "dimensions", dimensions.__contains__, str(EMBEDDING_DIMENSIONS))
    data = []
    for index, text in enumerate(texts):
        vector = embed_text(text)
        if encoding == "base64":
            # openai 3.60.0 decodes base64 as float32 in native byte order (array "f"),
            # which is little-endian on x86 and ARM hosts.
            packed = struct.pack(f"<{len(vector)}f", *vector)
            vector = base64.b64encode(packed).decode("ascii")
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(len(text.split()) for text in texts)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": model, "usage": usage}


API_ROUTES = {
    "/v1/models": ("GET", list_models),
    "/v1/chat/completions": ("POST", create_chat_completion),
    "/v1/embeddings": ("POST", create_embeddings),
}
CONTROL_ROUTES = {
    "/_control/failure": "POST",
    "/_control/reject-keys": "POST",
    "/_control/reset": "POST",
    "/_control/requests": "GET",
}
INJECTED = "(failure injected by the local OpenAI server)"


def check_method(expected: str | None, method: str, path: str) -> None:
    if expected is None:
        known_paths = ", ".join([*API_ROUTES, *CONTROL_ROUTES])
        message = f"Invalid URL ({method} {path}). Known paths: {known_paths}."
        raise ApiError(404, message, code="unknown_url")
    if method != expected:
        message = f"Method {method} is not allowed on {path}. Use {expected}."
        raise ApiError(405, message, code="method_not_allowed")


def injected_failure(mode: str) -> ApiError:
    if mode == "401":
        return invalid_key_error(f"Incorrect API key provided {INJECTED}.")
    if mode == "429":
        message = f"Rate limit reached for requests {INJECTED}."
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        code = "rate_limit_exceeded"
        return ApiError(429, message, "requests", code=code, headers=headers)
    if mode == "quota":
        # OpenAI returns 429 with this code when the account has no credit left.
        message = f"You exceeded your current quota {INJECTED}."
        return ApiError(429, message, "insufficient_quota", code="insufficient_quota")
    message = f"The server had an error while processing your request {INJECTED}."
    return ApiError(500, message, "server_error")


class RequestHandler(http.server.BaseHTTPRequestHandler):
    server_version = "LocalOpenAI/1.0"
    # Seconds that a stalled client may hold a worker thread in a socket read or write.
    timeout = 30

    def handle_any_method(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        # A request still running when reset() is called belongs to the state
        # before it: it neither takes a scripted reply nor adds to the record.
        self.generation = self.server.owner._generation
        self.record = {"method": self.command, "path": path, "key_last4": None}
        self.record.update(model=None, messages=None, time=time.time())
        try:
            status, body, headers = 200, self.dispatch(path), {}
        except ApiError as error:
            status, body, headers = error.status, error.body(), error.headers
        except Exception:
            logger.exception(
                "Unexpected error while handling %s %s", self.command, path
            )
            message = "The local OpenAI server failed. See its log."
            error = ApiError(500, message, "server_error")
            status, body, headers = 500, error.body(), {}
        # Record and log before sending, so a client that has its response finds both.
        # The log omits the query string in case a client put a secret there.
        if path.startswith("/v1/"):
            self.server.owner._append_record(
                {**self.record, "status": status}, self.generation
            )
        last_four = self.record["key_last4"]
        key_text = f"...{last_four}" if last_four else "-"
        logger.info("%s %s %d key=%s", self.command, path, status, key_text)
        self.send_json(status, body, headers)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any_method

    def dispatch(self, path: str) -> dict:
        owner = self.server.owner
        if path.startswith("/_control/"):
            check_method(CONTROL_ROUTES.get(path), self.command, path)
            return owner._handle_control(path, self.read_json_or_none())
        if not path.startswith("/v1/"):
            check_method(None, self.command, path)
        key = self.bearer_key()
        if key is None:
            raise invalid_key_error(
                "You didn't provide an API key. Send it in an Authorization header "
                "using Bearer auth (Authorization: Bearer YOUR_KEY)."
            )
        self.record["key_last4"] = key_last_four(key)
        if owner._is_rejected(key):
            last_four = self.record["key_last4"]
            raise invalid_key_error(f"Incorrect API key provided: ...{last_four}.")
        method, endpoint = API_ROUTES.get(path, (None, None))
        check_method(method, self.command, path)
        body = self.read_json_or_none()
        if body is not None:
            self.record["model"] = body.get("model")
            if path == "/v1/chat/completions":
                self.record["messages"] = body.get("messages")
        scripted = None
        if path == "/v1/chat/completions":
            scripted = owner._next_scripted_reply(self.generation)
        owner._apply_failure()
        response = endpoint(body)
        if scripted is not None:
            response["choices"][0]["message"]["content"] = scripted
        return response

    def bearer_key(self) -> str | None:
        scheme, _, key = self.headers.get("Authorization", "").partition(" ")
        key = key.strip()
        return key if scheme.lower() == "bearer" and key else None

    def read_json_or_none(self) -> dict | None:
        """Parse the JSON object body of a POST request, or return None for others.

        An empty body parses as {}, so a bare POST /_control/reset works.
        """
        if self.command != "POST":
            return None
        raw_length = self.headers.get("Content-Length", "0")
        if not re.fullmatch(r"[0-9]+", raw_length):
            raise ApiError(400, f"Invalid Content-Length header {raw_length!r}.")
        length = int(raw_length)
        if length > MAX_BODY_BYTES:
            message = f"Request body of {length} bytes exceeds {MAX_BODY_BYTES} bytes."
            raise ApiError(413, message)
        raw_body = self.rfile.read(length)
        if not raw_body.strip():
            return {}
        try:
            body = json.loads(raw_body)
        except (ValueError, RecursionError) as error:
            # ValueError covers JSONDecodeError and UnicodeDecodeError. Deeply nested
            # arrays raise RecursionError.
            message = f"We could not parse the JSON body of your request: {error}."
            raise ApiError(400, message) from None
        if not isinstance(body, dict):
            raise ApiError(400, "Invalid request body: expected a JSON object.")
        return body

    def send_json(self, status: int, body: dict, headers: dict) -> None:
        payload = json.dumps(body).encode("utf-8")
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError) as error:
            # Expected when the client timed out, for example in "slow" mode.
            logger.info("Client closed the connection before the response: %s", error)

    def log_request(self, code="-", size="-") -> None:
        """Skip the default access log, because handle_any_method logs each request."""

    def log_message(self, format: str, *args) -> None:
        # Only protocol errors reach here, such as an unparsable request line.
        logger.warning("HTTP error from %s: %s", self.client_address[0], format % args)


class OwnedHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that gives its handlers the LocalOpenAIServer as owner."""

    def __init__(self, address: tuple[str, int], owner: LocalOpenAIServer):
        self.owner = owner
        super().__init__(address, RequestHandler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind calls socket.getfqdn(), a reverse DNS lookup that may
        # query a remote resolver. Nothing here uses the name it finds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LocalOpenAIServer:
    """OpenAI-compatible HTTP server on a daemon thread, with failure injection.

    The constructor binds the socket, so base_url is known before start(). The public
    methods are thread-safe and share state with the /_control/ endpoints.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        if not is_loopback(host):
            logger.warning(
                "Listening on %s lets other hosts reach /_control/, which has no "
                "authentication. Use 127.0.0.1 unless that is intended.",
                host,
            )
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.reset()
        self._httpd = OwnedHTTPServer((host, port), self)

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    @property
    def requests(self) -> list[dict]:
        """Copies of the recorded /v1 requests, oldest first."""
        with self._lock:
            return copy.deepcopy(self._records)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("LocalOpenAIServer.start() was already called.")
        # A short poll interval keeps stop() fast, because shutdown() waits for a poll.
        serve = {"poll_interval": 0.05}
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs=serve, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket. Calling it again does nothing.

        Requests waiting in a failure delay stop waiting and respond at once.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> LocalOpenAIServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def set_failure(self, mode, times=None, delay_seconds=0.0) -> None:
        """Make the next `times` /v1 requests fail in `mode`, or all until reset().

        Modes: "401", "429" (with Retry-After: 7), "quota" (429 insufficient_quota),
        "500", and "slow", which responds
        normally. Every mode first waits `delay_seconds`. Requests that fail before
        this step do not count: a missing or rejected key, an unknown URL or method, or
        a body that is not a JSON object. Raises ApiError, a ValueError, for an invalid
        argument.
        """
        if mode not in FAILURE_MODES:
            raise invalid_field("mode", "one of " + ", ".join(FAILURE_MODES))
        if times is not None and (type(times) is not int or times < 1):
            raise invalid_field("times", "a positive integer or null")
        is_number = type(delay_seconds) in (int, float)
        if not is_number or not 0 <= delay_seconds < math.inf:
            raise invalid_field("delay_seconds", "a finite number >= 0")
        with self._lock:
            self._failure = (mode, times, float(delay_seconds))

    def reject_key_suffixes(self, suffixes) -> None:
        """Reject keys that end in any of `suffixes` with 401, replacing the old set."""
        is_list = isinstance(suffixes, (list, tuple, set, frozenset))
        if not is_list or not all(map(is_text, suffixes)):
            raise invalid_field("suffixes", "a list of non-empty strings")
        with self._lock:
            self._rejected_suffixes = frozenset(suffixes)

    def script_replies(self, *contents) -> None:
        """Use `contents` as the assistant content of the next chat completions.

        Lets a test send replies the extractive answerer never writes, such as
        a citation of a chunk that was not supplied.
        """
        if not all(map(is_text, contents)):
            raise invalid_field("contents", "non-empty strings")
        with self._lock:
            self._scripted_replies.extend(contents)

    def _next_scripted_reply(self, generation: int) -> str | None:
        with self._lock:
            if generation != self._generation or not self._scripted_replies:
                return None
            return self._scripted_replies.pop(0)

    def reset(self) -> None:
        """Clear the injected failure, the rejected key suffixes, scripted replies
        and the record."""
        with self._lock:
            self._generation = getattr(self, "_generation", 0) + 1
            self._scripted_replies: list[str] = []
            self._records: list[dict] = []
            self._rejected_suffixes: frozenset[str] = frozenset()
            self._failure: tuple[str, int | None, float] | None = None

    def _handle_control(self, path: str, body: dict | None) -> dict:
        if path == "/_control/requests":
            return {"requests": self.requests}
        if path == "/_control/failure":
            delay_seconds = body.get("delay_seconds", 0.0)
            self.set_failure(body.get("mode"), body.get("times"), delay_seconds)
        elif path == "/_control/reject-keys":
            self.reject_key_suffixes(body.get("suffixes"))
        else:
            self.reset()
        return {"status": "ok"}

    def _append_record(self, record: dict, generation: int) -> None:
        with self._lock:
            if generation == self._generation:
                self._records.append(record)

    def _is_rejected(self, key: str) -> bool:
        with self._lock:
            return any(key.endswith(suffix) for suffix in self._rejected_suffixes)

    def _apply_failure(self) -> None:
        """Use up one injected failure: wait its delay, then raise unless "slow"."""
        with self._lock:
            if self._failure is None:
                return
            mode, times, delay_seconds = self._failure
            if times is not None:
                self._failure = (mode, times - 1, delay_seconds) if times > 1 else None
        if delay_seconds > 0:
            self._stopping.wait(delay_seconds)
        if mode != "slow":
            raise injected_failure(mode)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m answers.local_openai",
        description="Serve a deterministic local stand-in for the OpenAI HTTP API.",
    )
    host_help = (
        "IP address to listen on (default: 127.0.0.1). Keep it a loopback address, "
        "because the /_control/ endpoints have no authentication."
    )
    parser.add_argument("--host", default="127.0.0.1", help=host_help)
    port_help = "TCP port to listen on, or 0 for a free port (default: 8765)"
    parser.add_argument("--port", type=int, default=8765, help=port_help)
    args = parser.parse_args(argv)
    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=logging.INFO, format=log_format)
    try:
        server = LocalOpenAIServer(args.host, args.port)
    except OSError as error:
        logger.error(
            "Cannot listen on %s:%d: %s. Choose another --host or --port.",
            args.host,
            args.port,
            error,
        )
        return 1
    stop_requested = threading.Event()

    def request_stop(signal_number: int, frame) -> None:
        logger.info("Received %s, stopping", signal.Signals(signal_number).name)
        stop_requested.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    server.start()
    logger.info("Serving the local OpenAI API at %s", server.base_url)
    stop_requested.wait()
    server.stop()
    logger.info("Stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
