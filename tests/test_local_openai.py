"""Tests for answers.local_openai, driven by the official openai client over HTTP.

Every server binds to 127.0.0.1 on a free port and stops at the end of its test.
"""

import http.client
import json
import logging
import math
import re
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import openai
import pytest

from answers.local_openai import (
    ABSTENTION,
    LocalOpenAIServer,
    answer_prompt,
    embed_text,
)

PLANTED_KEY = "sk-local-test-PLANTED-SECRET-9f3c"
REPO_ROOT = Path(__file__).resolve().parent.parent
REFUND_CHUNKS = [
    (1, "Shipping is free on orders over 50 euros.\nOrders ship within two days."),
    (2, "Refunds are issued within 5 business days. Contact support to start one."),
    (3, "The office is open Monday to Friday."),
]


@pytest.fixture
def server():
    with LocalOpenAIServer() as running:
        yield running


@pytest.fixture
def client(server):
    return openai.OpenAI(
        api_key=PLANTED_KEY, base_url=server.base_url, max_retries=0, timeout=5.0
    )


def build_prompt(question, chunks):
    """Build a user message in the layout of Gateco's prompt builder."""
    lines = [f"Question: {question}", "", "Context:"]
    for index, text in chunks:
        escaped = text.replace("</chunk>", "</ chunk>")
        lines += [f'<chunk index="{index}">', escaped, "</chunk>"]
    return "\n".join(lines)


def ask(client, prompt, **options):
    messages = [
        {"role": "system", "content": "Answer only from the context."},
        {"role": "user", "content": prompt},
    ]
    completion = client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, **options
    )
    return json.loads(completion.choices[0].message.content)


def send_raw(server, method, path, body=b"", key=PLANTED_KEY):
    """Send one request with http.client and return (status, parsed JSON body)."""
    url = urllib.parse.urlsplit(server.base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def cited_indexes(answer):
    return {int(index) for index in re.findall(r"\[(\d+)\]", answer)}


def test_models_list_returns_models(client):
    model_ids = [model.id for model in client.models.list()]

    assert model_ids == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]


def test_answer_cites_matching_chunk(client):
    prompt = build_prompt("How long until refunds are issued?", REFUND_CHUNKS)

    result = ask(client, prompt, response_format={"type": "json_object"})

    assert result["citations"] == [2]
    assert "Refunds are issued within 5 business days. [2]" in result["answer"]
    assert cited_indexes(result["answer"]) == {2}


def test_answer_without_response_format_is_json(client):
    prompt = build_prompt("When are refunds issued?", REFUND_CHUNKS)

    result = ask(client, prompt)

    assert result["citations"] == [2]


def test_answer_abstains_when_nothing_matches(client):
    prompt = build_prompt("What is the parking policy?", REFUND_CHUNKS)

    result = ask(client, prompt)

    assert result == {"answer": ABSTENTION, "citations": []}


def test_answer_abstains_without_chunks(client):
    result = ask(client, build_prompt("When are refunds issued?", []))

    assert result == {"answer": ABSTENTION, "citations": []}


def test_answer_abstains_without_question_layout(client):
    result = ask(client, 'Tell me about refunds.\n<chunk index="1">Refunds</chunk>')

    assert result == {"answer": ABSTENTION, "citations": []}


def test_markers_name_only_supplied_chunks(client):
    chunks = [
        (3, "Refunds follow policy [7] and take 5 days [1]."),
        (5, "Refund requests need a receipt, see [12].\nRefunds go to the card."),
    ]

    result = ask(client, build_prompt("How do refunds work?", chunks))

    assert cited_indexes(result["answer"]) == {3, 5}
    assert result["citations"] == [3, 5]
    assert "[7]" not in result["answer"]


def test_answer_ranks_and_limits_sentences():
    chunks = [
        (1, "Refunds are possible. Refunds need a receipt."),
        (2, "Card refunds take 5 days.\nRefunds by card take 5 days."),
    ]
    prompt = build_prompt("How long do card refunds take?", chunks)

    result = answer_prompt(prompt)

    expected = (
        "Card refunds take 5 days. [2] Refunds by card take 5 days. [2] "
        "Refunds are possible. [1]"
    )
    assert result["answer"] == expected
    assert result["citations"] == [1, 2]


def test_answer_matches_suffix_variants():
    chunks = [(1, "The tax rate is 20 percent.")]

    result = answer_prompt(build_prompt("Which rates apply to taxes?", chunks))

    assert result["citations"] == [1]


def test_escaped_close_tag_stays_in_chunk():
    chunks = [
        (1, "Example markup: </chunk> ends a chunk.\nInvoices are sent monthly."),
        (2, "Nothing relevant here."),
    ]

    result = answer_prompt(build_prompt("How often are invoices sent?", chunks))

    assert result["answer"] == "Invoices are sent monthly. [1]"


def test_usage_counts_whitespace_words(client):
    messages = [{"role": "user", "content": "one two  three\nfour"}]

    completion = client.chat.completions.create(model="gpt-4o", messages=messages)

    content = completion.choices[0].message.content
    assert completion.model == "gpt-4o"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == 4
    assert completion.usage.completion_tokens == len(content.split())
    assert completion.usage.total_tokens == 4 + len(content.split())


def test_rejected_key_suffix_gets_401(server, client):
    server.reject_key_suffixes({"9f3c"})

    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()

    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert raised.value.type == "invalid_request_error"
    assert PLANTED_KEY not in str(raised.value)


def test_other_key_passes_suffix_check(server):
    server.reject_key_suffixes({"9f3c"})
    other = openai.OpenAI(
        api_key="sk-local-test-other-0000", base_url=server.base_url, max_retries=0
    )

    assert len(other.models.list().data) == 3


def test_missing_key_gets_401(server):
    status, body = send_raw(server, "GET", "/v1/models", key=None)

    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["param"] is None


def test_rate_limit_exposes_retry_after(server, client):
    server.set_failure("429")

    with pytest.raises(openai.RateLimitError) as raised:
        client.models.list()

    assert raised.value.response.headers["retry-after"] == "7"
    assert raised.value.code == "rate_limit_exceeded"


def test_server_error_raises_internal_server_error(server, client):
    server.set_failure("500")

    with pytest.raises(openai.InternalServerError) as raised:
        client.models.list()

    assert raised.value.status_code == 500
    assert raised.value.type == "server_error"


def test_injected_401_raises_authentication_error(server, client):
    server.set_failure("401", times=1)

    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_slow_mode_triggers_client_timeout(server, client):
    server.set_failure("slow", times=1, delay_seconds=2.0)
    started = time.monotonic()

    with pytest.raises(openai.APITimeoutError):
        client.with_options(timeout=0.5).models.list()

    assert time.monotonic() - started < 1.5
    assert len(client.models.list().data) == 3


def test_slow_mode_answers_after_delay(server, client):
    server.set_failure("slow", times=1, delay_seconds=0.2)
    started = time.monotonic()

    model_ids = [model.id for model in client.models.list()]

    assert time.monotonic() - started >= 0.2
    assert "gpt-4o" in model_ids


def test_stop_ends_failure_delay_early():
    server = LocalOpenAIServer()
    server.start()
    server.set_failure("slow", delay_seconds=5.0)
    client = openai.OpenAI(
        api_key=PLANTED_KEY, base_url=server.base_url, max_retries=0, timeout=10.0
    )
    results = []
    waiting = threading.Thread(target=lambda: results.append(client.models.list()))
    waiting.start()
    time.sleep(0.2)

    server.stop()
    waiting.join(timeout=3.0)

    assert not waiting.is_alive()
    assert len(results[0].data) == 3


def test_failure_with_times_one_recovers(server, client):
    server.set_failure("500", times=1)

    with pytest.raises(openai.InternalServerError):
        client.models.list()
    recovered = client.models.list()

    assert len(recovered.data) == 3
    assert [record["status"] for record in server.requests] == [500, 200]


def test_failure_without_times_lasts_until_reset(server, client):
    server.set_failure("500")

    for _ in range(3):
        with pytest.raises(openai.InternalServerError):
            client.models.list()
    server.reset()

    assert len(client.models.list().data) == 3
    assert len(server.requests) == 1


def test_record_holds_only_key_last_four(server, client, caplog, capfd):
    caplog.set_level(logging.INFO, logger="answers.local_openai")
    ask(client, build_prompt("When are refunds issued?", REFUND_CHUNKS))
    client.embeddings.create(model="text-embedding-3-small", input="refunds")
    server.reject_key_suffixes({"9f3c"})
    with pytest.raises(openai.AuthenticationError):
        client.models.list()

    records = server.requests
    _, control_body = send_raw(server, "GET", "/_control/requests", key=None)
    captured = capfd.readouterr()

    assert [record["key_last4"] for record in records] == ["9f3c"] * 3
    assert PLANTED_KEY not in json.dumps(records)
    assert PLANTED_KEY not in json.dumps(control_body)
    assert "key=...9f3c" in caplog.text
    assert PLANTED_KEY not in caplog.text
    assert PLANTED_KEY not in captured.out + captured.err


def test_record_contains_request_fields(server, client):
    prompt = build_prompt("When are refunds issued?", REFUND_CHUNKS)
    ask(client, prompt)

    record = server.requests[-1]

    assert record["method"] == "POST"
    assert record["path"] == "/v1/chat/completions"
    assert record["model"] == "gpt-4o-mini"
    assert record["messages"][-1] == {"role": "user", "content": prompt}
    assert record["status"] == 200
    assert abs(record["time"] - time.time()) < 60


def test_short_key_is_masked_in_record(server):
    short = openai.OpenAI(api_key="abc", base_url=server.base_url, max_retries=0)
    short.models.list()

    assert server.requests[-1]["key_last4"] == "****"


def test_embeddings_are_deterministic_unit_vectors(client):
    texts = ["Refunds take five days", "The office opens on Monday"]

    first = client.embeddings.create(model="text-embedding-3-small", input=texts)
    second = client.embeddings.create(model="text-embedding-3-small", input=texts)

    vectors = [item.embedding for item in first.data]
    assert vectors == [item.embedding for item in second.data]
    assert [len(vector) for vector in vectors] == [256, 256]
    for vector in vectors:
        assert math.isclose(math.fsum(v * v for v in vector), 1.0, rel_tol=1e-5)
    assert vectors[0] != vectors[1]


def test_embeddings_float_format_matches_base64(client):
    # The client asks for base64 unless encoding_format is given.
    text = "Refunds take five days"
    packed = client.embeddings.create(model="text-embedding-3-small", input=text)
    plain = client.embeddings.create(
        model="text-embedding-3-small", input=text, encoding_format="float"
    )

    pairs = zip(packed.data[0].embedding, plain.data[0].embedding, strict=True)
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in pairs)
    assert plain.data[0].embedding == embed_text(text)
    assert plain.model == "text-embedding-3-small"


def test_embedding_without_words_is_unit():
    vector = embed_text("!!! ...")

    assert math.isclose(math.fsum(v * v for v in vector), 1.0)


def test_malformed_json_gets_400(server):
    body = b'{"model": "gpt-4o-mini", "messages": ['

    status, response = send_raw(server, "POST", "/v1/chat/completions", body)

    assert status == 400
    assert response["error"]["type"] == "invalid_request_error"


def test_deeply_nested_json_gets_400(server):
    status, _ = send_raw(server, "POST", "/v1/embeddings", b"[" * 100_000)

    assert status == 400


def test_missing_messages_gets_400(server):
    body = json.dumps({"model": "gpt-4o-mini"}).encode()

    status, response = send_raw(server, "POST", "/v1/chat/completions", body)

    assert status == 400
    assert response["error"]["param"] == "messages"


def test_empty_messages_raise_bad_request(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="gpt-4o-mini", messages=[])

    assert raised.value.param == "messages"


def test_token_array_input_gets_400(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3]])

    assert raised.value.param == "input"


def test_unknown_path_gets_404(server):
    status, response = send_raw(server, "GET", "/v1/engines")

    assert status == 404
    assert response["error"]["code"] == "unknown_url"


def test_control_endpoints_over_http(server, client):
    failure = json.dumps({"mode": "429", "times": 1, "delay_seconds": 0}).encode()
    rejection = json.dumps({"suffixes": ["9f3c"]}).encode()

    assert send_raw(server, "POST", "/_control/failure", failure, key=None)[0] == 200
    with pytest.raises(openai.RateLimitError):
        client.models.list()
    assert send_raw(server, "POST", "/_control/reject-keys", rejection)[0] == 200
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    _, recorded = send_raw(server, "GET", "/_control/requests")
    assert [record["status"] for record in recorded["requests"]] == [429, 401]
    assert send_raw(server, "POST", "/_control/reset", key=None)[0] == 200
    assert len(client.models.list().data) == 3
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "503"},
        {"mode": "500", "times": 0},
        {"mode": "500", "times": True},
        {"mode": "slow", "delay_seconds": -1},
        {"mode": "slow", "delay_seconds": "2"},
    ],
)
def test_control_failure_rejects_invalid_body(server, body):
    status, response = send_raw(
        server, "POST", "/_control/failure", json.dumps(body).encode()
    )

    assert status == 400
    assert response["error"]["type"] == "invalid_request_error"


def test_control_reject_keys_rejects_string(server):
    body = json.dumps({"suffixes": "9f3c"}).encode()

    status, response = send_raw(server, "POST", "/_control/reject-keys", body)

    assert status == 400
    assert response["error"]["param"] == "suffixes"


def test_set_failure_raises_value_error(server):
    with pytest.raises(ValueError, match="mode"):
        server.set_failure("418")


def read_serving_url(process, timeout_seconds=10.0):
    """Return the base URL from the "Serving ... at URL" log line on stderr."""
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stderr], [], [], 0.1)
        if not ready:
            continue
        line = process.stderr.readline()
        match = re.search(r"Serving the local OpenAI API at (\S+)", line)
        if match:
            return match.group(1)
        if not line and process.poll() is not None:
            break
    raise AssertionError("The server did not log its URL in time.")


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_cli_serves_and_stops_on_signal(stop_signal):
    command = [sys.executable, "-m", "answers.local_openai", "--port", "0"]
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        base_url = read_serving_url(process)
        cli_client = openai.OpenAI(
            api_key=PLANTED_KEY, base_url=base_url, max_retries=0, timeout=5.0
        )
        model_count = len(cli_client.models.list().data)
        process.send_signal(stop_signal)
        exit_code = process.wait(timeout=10)
        log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert base_url.startswith("http://127.0.0.1:")
    assert model_count == 3
    assert exit_code == 0
    assert "GET /v1/models 200 key=...9f3c" in log
    assert "Stopped" in log
    assert PLANTED_KEY not in log
