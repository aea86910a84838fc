"""
Robustness of serving against a tiny random GPT, on the real continuous-batching scheduler and the real
server app (nanochat/server.py) served in-process by uvicorn on loopback:
1. one request's trouble stays that request's: tiny temperatures and top_p decode greedily; a row whose
   logits turn NaN or whose sampling raises, a prefill that raises, end that request alone with "error", and
   a consumer (on_event) that raises has its request cancelled, while the rows beside get exactly their
   tokens alone;
2. malformed input (lone surrogates, NaN, -Infinity) is a 4xx with a JSON body on both APIs, never a 500;
3. bounded requests: body size (413), time to send headers or a body (408, connection closed), field sizes, and
   --max-queue 0 serving free slots;
plus a schemathesis fuzz run asserting no 5xx and only the statuses and content types /openapi.json lists,
and 64 concurrent streaming clients asserting no lost stream.
The fuzz and load figures are printed (pytest -s shows them).
"""

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest

from nanochat.batching import BatchScheduler, QueueFull, SamplingParams
from nanochat.api_schemas import MAX_CHOICES, MAX_MESSAGE_LENGTH, MAX_STOP_LENGTH
from nanochat.server import ServerConfig

from conftest import AlteredLogits, chat_server

SEQUENCE_LEN = 64  # short replies: the fuzz and load tests send many requests
USER = [{"role": "user", "content": "Hi"}]
TIMEOUT = 30  # seconds; a hung scheduler or server fails the test instead of blocking it


@pytest.fixture(scope="module")
def server(tiny_chat_base_dir):
    """(url, port) of a server with the default flags, except a short time to send a body."""
    with chat_server(body_timeout=1) as (_, url, port):
        yield url, port


# -----------------------------------------------------------------------------
# 1. A request's numerical trouble stays that request's

def prompt_of(tokenizer, text):
    return tokenizer.render_for_completion({"messages": [{"role": "user", "content": text},
                                                         {"role": "assistant", "content": ""}]})


def run_batch(model, tokenizer, jobs, max_batch_size=8, consumers=None):
    """Submit every (prompt, params) before the scheduler starts (so request i takes slot i and keeps it:
    fixed width, which also makes "bit for bit, whatever the neighbours" hold), then collect each request's
    (tokens, finish_reason); None for a request i whose events go to the callback consumers[i]."""
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=max_batch_size, fixed_width=True)
    consumers = consumers or {}
    try:
        requests = [scheduler.submit(prompt, params, on_event=consumers.get(i))
                    for i, (prompt, params) in enumerate(jobs)]
        scheduler.start()
        results = []
        for request in requests:
            if request.events is None:
                results.append(None)
                continue
            tokens = []
            while True:
                event = request.events.get(timeout=TIMEOUT)
                if event.token_id is not None:
                    tokens.append(event.token_id)
                if event.finish_reason is not None:
                    results.append((tokens, event.finish_reason))
                    break
        return results
    finally:
        scheduler.shutdown()


def normal_jobs(tokenizer):
    """Four ordinary seeded requests: top-k, plain, nucleus and greedy sampling."""
    texts = ["Hello there!", "How are you today?", "The answer is", "I am fine"]
    settings = [(0.8, 50, None, 1), (1.0, None, None, 2), (1.0, None, 0.9, 3), (0.0, None, None, 4)]
    return [(prompt_of(tokenizer, text), SamplingParams(max_tokens=20, temperature=temperature, top_k=top_k,
                                                        top_p=top_p, seed=seed))
            for text, (temperature, top_k, top_p, seed) in zip(texts, settings)]


def test_tiny_temperatures_and_top_p_are_greedy_and_leave_other_rows_alone(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    normal = normal_jobs(tokenizer)
    alone = [run_batch(model, tokenizer, [job])[0] for job in normal]
    prompt = prompt_of(tokenizer, "Thank you")
    greedy = run_batch(model, tokenizer, [(prompt, SamplingParams(max_tokens=20, temperature=0.0))])[0]
    tiny = [SamplingParams(max_tokens=20, temperature=t, seed=5) for t in (1e-39, 2e-39, 1e-40, 5e-324)]
    tiny.append(SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-300, seed=5))  # only the top token
    batch = run_batch(model, tokenizer, normal[:2] + [(prompt, p) for p in tiny] + normal[2:])
    assert batch[:2] + batch[-2:] == alone  # bit for bit: same tokens, same finish
    assert batch[2:-2] == [greedy] * len(tiny)
    assert greedy[1] != "error"


class NaNRow(AlteredLogits):
    """The real GPT, except that one batch row's logits turn NaN in batched forwards (the decode step):
    a stand-in for any numerical accident in one request's row."""

    def __init__(self, model, row):
        super().__init__(model)
        self.row = row

    def alter(self, logits, ids):
        if ids.size(0) > 1:
            self.tamper(logits[self.row])
        return logits

    def tamper(self, row_logits):
        row_logits.fill_(float("nan"))


class HugeRow(NaNRow):
    """One row's logits finite but huge, as a model without a logit softcap may give: divided by a small
    temperature they overflow to inf, and sampling raises (the row still passes the is-it-finite check)."""

    def tamper(self, row_logits):
        row_logits.mul_(1e37)


class FailingPrefill(AlteredLogits):
    """The real GPT, except that the prefill of one prompt raises: a stand-in for any error in one
    request's own forward (e.g. running out of memory on a long prompt)."""

    def __init__(self, model, prompt):
        super().__init__(model)
        self.prompt = prompt

    def forward(self, ids, kv_cache=None):
        if ids.size(0) == 1 and ids[0].tolist() == self.prompt:
            raise RuntimeError("simulated failure in this prompt's prefill")
        return self.model.forward(ids, kv_cache=kv_cache)


@pytest.mark.parametrize("altered_row", [NaNRow, HugeRow])
def test_a_row_whose_logits_or_sampling_fail_ends_alone_and_the_others_continue_bit_for_bit(tiny_chat_model,
                                                                                           altered_row):
    model, tokenizer = tiny_chat_model
    jobs = normal_jobs(tokenizer)
    jobs[1] = (jobs[1][0], SamplingParams(max_tokens=20, temperature=0.01, seed=2))  # sampled, not greedy
    alone = [run_batch(model, tokenizer, [job])[0] for job in jobs]
    batch = run_batch(altered_row(model, row=1), tokenizer, jobs)
    tokens, reason = batch[1]
    assert reason == "error" and len(tokens) <= 1  # the prefill (batch 1) token, then the failed step
    assert batch[:1] + batch[2:] == alone[:1] + alone[2:]


def test_a_prefill_that_raises_ends_its_request_alone_and_the_others_continue_bit_for_bit(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    jobs = normal_jobs(tokenizer)
    alone = [run_batch(model, tokenizer, [job])[0] for job in jobs]
    batch = run_batch(FailingPrefill(model, prompt=jobs[2][0]), tokenizer, jobs)
    assert batch[2] == ([], "error")
    assert batch[:2] + batch[3:] == alone[:2] + alone[3:]


def test_a_consumer_that_raises_is_cancelled_alone_and_the_others_continue_bit_for_bit(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    jobs = normal_jobs(tokenizer)
    alone = [run_batch(model, tokenizer, [job])[0] for job in jobs]
    assert len(alone[1][0]) > 3  # it would go on after the consumer breaks
    received, ended = [], threading.Event()

    def consumer_that_breaks(event):  # e.g. writing to a client that went away
        received.append(event)
        if event.finish_reason is not None:
            ended.set()
        if len(received) == 3:
            raise ConnectionError("the client went away")

    batch = run_batch(model, tokenizer, jobs, consumers={1: consumer_that_breaks})
    assert ended.wait(TIMEOUT)
    assert [e.token_id for e in received[:3]] == alone[1][0][:3]
    assert [e.finish_reason for e in received] == [None, None, None, "cancelled"]
    assert batch[:1] + batch[2:] == alone[:1] + alone[2:]


def test_max_queue_zero_takes_free_slots_only(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    # not started: the submitted requests keep their slots
    scheduler = BatchScheduler(model, tokenizer, max_batch_size=2, max_queue=0)
    prompt = prompt_of(tokenizer, "Hi")
    scheduler.submit(prompt, SamplingParams(max_tokens=2))
    scheduler.submit(prompt, SamplingParams(max_tokens=2))
    with pytest.raises(QueueFull):
        scheduler.submit(prompt, SamplingParams(max_tokens=2))
    scheduler.shutdown()


def test_server_with_max_queue_zero_serves_a_request_into_a_free_slot(tiny_chat_base_dir):
    with chat_server(max_batch_size=1, max_queue=0) as (_, url, _):
        response = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                              json={"messages": USER, "max_tokens": 3})
        assert response.status_code == 200, response.text
        response = httpx.post(url + "/chat/completions", timeout=TIMEOUT,
                              json={"messages": USER, "max_tokens": 3})
        assert response.status_code == 200 and response.text.endswith('data: {"done": true}\n\n')


def test_tiny_temperature_and_top_p_over_http_are_answered(server):
    url, _ = server
    for extra in ({"temperature": 1e-39}, {"temperature": 5e-324}, {"top_p": 1e-300, "temperature": 1.0}):
        response = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                              json={"messages": USER, "max_tokens": 4, **extra})
        assert response.status_code == 200, (extra, response.text)
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


# -----------------------------------------------------------------------------
# 2. Malformed input is a 4xx with a JSON body

MALFORMED = ['{"messages":"\\ud800"}',
             '{"messages":[{"role":"user","content":"hi"}],"max_tokens":NaN}',
             '{"messages":[{"role":"user","content":"hi"}],"max_tokens":-Infinity}',
             '{"messages":[{"role":"user","content":"\\ud800"}]}',
             '{"messages":[{"role":"user","content":"hi"}],"temperature":NaN}',
             '{"messages":[{"role":"\\ud800","content":"hi"}]}']
MALFORMED_V1 = ['{"messages":[{"role":"user","content":"hi"}],"stop":"\\udfff"}',  # the reference has no stop
                '{"model":"\\ud800","messages":[{"role":"user","content":"hi"}]}']  # nor model


MALFORMED_COMPLETIONS = ['{"prompt":"\\ud800"}', '{"prompt":["\\ud800"]}', '{"prompt":[1e400]}', '{"prompt":[true]}',
                         '{"prompt":[1.5]}', '{"prompt":[99999999999999999999999]}', '{"prompt":{"a":1}}',
                         '{"prompt":"hi","max_tokens":NaN}', '{"prompt":"hi","stop":"\\udfff"}', '[]', '"hi"']


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions", "/v1/completions"])
def test_malformed_input_is_a_4xx_with_a_json_body(server, path):
    url, _ = server
    bodies = {"/chat/completions": MALFORMED, "/v1/chat/completions": MALFORMED + MALFORMED_V1,
              "/v1/completions": MALFORMED + MALFORMED_COMPLETIONS}
    for raw in bodies[path]:
        response = httpx.post(url + path, content=raw.encode(), headers={"content-type": "application/json"},
                              timeout=TIMEOUT)
        assert 400 <= response.status_code < 500, (raw, response.status_code, response.text)
        body = response.json()
        assert ("error" in body) if path.startswith("/v1/") else ("detail" in body), (raw, body)


# -----------------------------------------------------------------------------
# 3. Bounded requests

def test_a_body_over_the_default_limit_is_413_with_a_json_body(server):
    url, _ = server
    assert ServerConfig().max_body_bytes == 1 << 20
    big = json.dumps({"messages": USER, "stop": "x" * (1 << 20)}).encode()
    for path in ("/chat/completions", "/v1/chat/completions"):
        response = httpx.post(url + path, content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413 and "--max-body-bytes" in response.text
        assert ("error" in response.json()) if path.startswith("/v1/") else ("detail" in response.json())

        def chunks():  # no Content-Length: counted as it arrives
            for i in range(0, len(big), 65536):
                yield big[i:i + 65536]
        response = httpx.post(url + path, content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and "--max-body-bytes" in response.text


def test_max_body_bytes_flag(tiny_chat_base_dir):
    with chat_server(max_body_bytes=100) as (_, url, _):
        body = {"messages": USER, "max_tokens": 2}
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 200
        body["messages"] = [{"role": "user", "content": "x" * 100}]
        assert httpx.post(url + "/v1/chat/completions", json=body).status_code == 413


def test_a_half_sent_body_is_answered_408_and_closed(server):
    _, port = server  # --body-timeout 1
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"messages\": [")
        started, received = time.monotonic(), b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            received += chunk
        assert time.monotonic() - started < 5
    assert received.startswith(b"HTTP/1.1 408") and b"--body-timeout" in received


def read_until_closed(sock):
    """(everything the server sent until it closed the connection, seconds that took)."""
    started, received = time.monotonic(), b""
    while chunk := sock.recv(65536):
        received += chunk
    return received, time.monotonic() - started


@pytest.mark.parametrize("sent", [b"", b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half the headers"])
def test_a_connection_without_whole_headers_is_answered_408_and_closed(server, sent):
    _, port = server  # --body-timeout 1
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        received, seconds = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408") and seconds < 5
    assert "--body-timeout" in json.loads(received.split(b"\r\n\r\n", 1)[1])["detail"]


@pytest.mark.parametrize("sent", [b"NOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 100_000],
                         ids=["garbage", "endless header"])
def test_malformed_http_is_answered_400_with_a_json_body_and_closed(server, sent):
    _, port = server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        received, _ = read_until_closed(sock)
    head, body = received.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 400") and b"content-type: application/json" in head
    assert json.loads(body)["detail"]


def test_headers_are_timed_per_request_and_slow_whole_ones_are_served(server):
    _, port = server
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for piece in (request[:10], request[10:20], request[20:]):  # 0.6 s in all: within the limit
            time.sleep(0.2)
            sock.sendall(piece)
        response = b""
        while not response.endswith(b"}"):  # the whole JSON response
            response += sock.recv(65536)
        assert response.startswith(b"HTTP/1.1 200")
        time.sleep(0.6)  # 1.2 s since the connection opened: the limit counts from the next request's start
        sock.sendall(request[:20])  # which never finishes its headers
        received, seconds = read_until_closed(sock)
    assert received.startswith(b"HTTP/1.1 408") and 0.5 < seconds < 5


def test_field_sizes_are_limited(server):
    url, _ = server
    cases = [({"stop": "x" * 10_000}, "stop"),
             ({"stop": "x" * (MAX_STOP_LENGTH + 1)}, "stop"),
             ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
             ({"n": MAX_CHOICES + 1}, "n"),
             ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_LENGTH + 1)}]},
              "messages[0].content"),
             ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}] * 250
               + USER}, "messages")]
    for extra, param in cases:
        response = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2, **extra})
        assert response.status_code == 400, (param, response.text)
        assert response.json()["error"]["param"] == param
    response = httpx.post(url + "/chat/completions", json={"messages": USER * 501})
    assert response.status_code == 400 and "Too many messages" in response.json()["detail"]


# -----------------------------------------------------------------------------
# Fuzzing (schemathesis) and load (64 concurrent streams)

FUZZ_EXAMPLES = 300  # schema-driven requests, valid and invalid; about 20 s on one CPU core


def test_schemathesis_fuzz_gets_no_5xx_and_only_documented_answers(server):
    import schemathesis  # the dev group (uv sync --group dev)
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
    from schemathesis.generation.modes import GenerationMode
    from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

    url, _ = server
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    cases = st.one_of(schema.as_strategy(GenerationMode.POSITIVE),
                      schema.as_strategy(GenerationMode.NEGATIVE))
    statuses = []

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(case=cases)
    def fuzz(case):
        response = case.call(base_url=url, timeout=TIMEOUT)
        statuses.append(response.status_code)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        # each status and content type is one /openapi.json lists for the route
        case.validate_response(response, checks=[status_code_conformance, content_type_conformance])

    fuzz()
    errors = sum(status >= 500 for status in statuses)
    print(f"\nfuzz: {len(statuses)} requests, {errors} x 5xx, statuses {sorted(set(statuses))}")
    assert len(statuses) >= FUZZ_EXAMPLES // 2 and errors == 0


CLIENTS, STREAMS_PER_CLIENT = 64, 2


async def stream_once(client, url, index):
    """One streaming request, alternating the two APIs; True when it ran to its end marker."""
    if index % 2:
        body = {"messages": USER, "max_tokens": 6, "stream": True, "temperature": 0.8}
        path, last = "/v1/chat/completions", "data: [DONE]"
    else:
        body = {"messages": USER, "max_tokens": 6}
        path, last = "/chat/completions", 'data: {"done": true}'
    async with client.stream("POST", url + path, json=body) as response:
        if response.status_code != 200:
            return False
        lines = [line async for line in response.aiter_lines() if line]
    return bool(lines) and lines[-1] == last


def test_64_concurrent_streaming_clients_lose_no_stream(server):
    url, _ = server

    async def client_loop(client, c):
        return [await stream_once(client, url, c * STREAMS_PER_CLIENT + s) for s in range(STREAMS_PER_CLIENT)]

    async def main():
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(timeout=TIMEOUT * 2, limits=limits) as client:
            return await asyncio.gather(*(client_loop(client, c) for c in range(CLIENTS)))

    started = time.monotonic()
    results = [ok for per_client in asyncio.run(main()) for ok in per_client]
    lost = results.count(False)
    elapsed = time.monotonic() - started
    print(f"\nload: {len(results)} streams at {CLIENTS} clients, {lost} lost, {elapsed:.1f}s")
    assert len(results) == CLIENTS * STREAMS_PER_CLIENT and lost == 0
    stats = httpx.get(url + "/stats").json()["workers"][0]
    assert stats["active"] == 0 and stats["queued"] == 0
