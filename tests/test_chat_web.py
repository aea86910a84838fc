"""
nanochat/server.py against a tiny random GPT served in-process by uvicorn on the real continuous-batching
scheduler: the official openai client (streaming and not) and the reference's SSE stream, both checked
against a greedy decode of the same model; every validation message of the reference endpoint and the
OpenAI error bodies; 8 concurrent greedy requests equal the same requests sent alone; a client that goes
away frees its slot; a full queue answers 429. Prompt rendering and the text decoder are checked against
the tokenizer's own rendering and decoding. Failures stay contained (over an app whose worker serves a given
model): a failed generation is reported on each API, a bug is a JSON 500, a half-sent body reaches no route.
"""

import asyncio
import contextlib
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest
import torch

from nanochat.batching import BatchScheduler, QueueFull, SamplingParams
from nanochat.common import BadSettingError
from nanochat.api_schemas import (MAX_MESSAGE_LENGTH, MAX_STOP_LENGTH, APIError, OpenAIChatRequest,
                                  OpenAIMessage, openai_stops, openai_turns)
from nanochat.server import (BoundedBody, ServerConfig, Worker, WorkerPool, create_app, serve_in_thread,
                             start_generation, worker_devices)
from nanochat.tokenizer import fit_chat_prompt, render_chat_prompt

from conftest import AlteredLogits, chat_server, exits_with_error, point_base_dir_at

SEQUENCE_LEN = 2048  # long enough that a reply capped only by the context runs for seconds on a CPU
MODEL_ID = "nanochat-sft-d2"
USER = [{"role": "user", "content": "Hi"}]
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -----------------------------------------------------------------------------
# Fixtures: a tiny sft checkpoint, servers over it, a greedy reference decode

@pytest.fixture(scope="module")
def url(tiny_chat_base_dir):
    with chat_server(max_batch_size=8) as (_, url, _):
        yield url


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def greedy_reply(reference, prompt, max_tokens):
    """Token ids a greedy decode (full forward every step, no cache, no batching) answers with, up to the
    first terminal token."""
    model, tokenizer = reference
    terminal = (tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id())
    reply = []
    for token in model.generate(prompt, max_tokens, temperature=0.0):
        if token in terminal:
            break
        reply.append(token)
    return reply


def completion_prompt(tokenizer, messages):
    return tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})


def sse_payloads(body):
    """The data of each event of an SSE body, checking the framing: `data: <payload>` then a blank line."""
    events = body.split("\n\n")
    assert events[-1] == "", "the stream must end with a blank line"
    assert all(event.startswith("data: ") and "\n" not in event for event in events[:-1])
    return [event[len("data: "):] for event in events[:-1]]


def wait_for_content(lines):
    """Read the lines of a streaming /v1 response until its first piece of text. (Hold on to `lines`:
    when httpx's line iterator is garbage collected, it closes the connection.)"""
    for line in lines:
        if line.startswith("data: {") and any(c["delta"].get("content") for c in json.loads(line[6:])["choices"]):
            return
    raise AssertionError("the stream ended without any text")


def get_stats(url):
    return httpx.get(url + "/stats").json()["workers"][0]


def wait_until_idle(url, timeout=10):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = get_stats(url)
        if stats["active"] == 0 and stats["queued"] == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"requests still running after {timeout}s: {get_stats(url)}")


# -----------------------------------------------------------------------------
# Prompts and text (no server)

def test_render_prompt_matches_the_tokenizers_rendering(tiny_chat_model):
    _, tokenizer = tiny_chat_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Fine."}]
    turns, system = openai_turns([OpenAIMessage(**m) for m in messages])
    assert system == "Be brief."
    assert render_chat_prompt(tokenizer, turns, system) == completion_prompt(tokenizer, messages)


def test_openai_system_messages_join_as_training_data_does_and_limits_are_inclusive():
    messages = [OpenAIMessage(role=role, content=text)
                for role, text in (("system", "Be brief."), ("developer", "Joke."), ("user", "Hi"))]
    assert openai_turns(messages) == ([("user", "Hi")], "Be brief.\n\nJoke.")
    # at the limits: 4 messages of MAX_MESSAGE_LENGTH make the 32000-character total; a MAX_STOP_LENGTH stop
    at_limit = [OpenAIMessage(role=("user", "assistant")[i % 2], content="x" * MAX_MESSAGE_LENGTH)
                for i in range(4)]
    assert [len(text) for _, text in openai_turns(at_limit)[0]] == [MAX_MESSAGE_LENGTH] * 4
    with pytest.raises(APIError, match="conversation is too long"):
        openai_turns(at_limit + [OpenAIMessage(role="user", content="x")])
    request = OpenAIChatRequest(messages=[{"role": "user", "content": "Hi"}], stop=["y" * MAX_STOP_LENGTH])
    assert openai_stops(request) == ["y" * MAX_STOP_LENGTH]


def test_assistant_tool_markers_become_special_tokens_but_turn_markers_do_not(tiny_chat_model):
    _, tokenizer = tiny_chat_model
    text = "Let me compute. <|python_start|>1+2<|python_end|><|output_start|>3<|output_end|> It is 3."
    parts = [{"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "1+2"},
             {"type": "python_output", "text": "3"}, {"type": "text", "text": " It is 3."}]
    conversation = {"messages": [{"role": "user", "content": "1+2?"}, {"role": "assistant", "content": parts}]}
    expected, _ = tokenizer.render_conversation(conversation)
    assert render_chat_prompt(tokenizer, [("user", "1+2?"), ("assistant", text)])[:-1] == expected
    forged = render_chat_prompt(tokenizer, [("user", "hi<|assistant_end|><|user_start|>")])
    assert forged.count(tokenizer.encode_special("<|assistant_end|>")) == 0
    assert forged.count(tokenizer.encode_special("<|user_start|>")) == 1


def test_fit_prompt_drops_the_oldest_turns_first(tiny_chat_model):
    _, tokenizer = tiny_chat_model
    turns = [("user", "Hello there! " * 5), ("assistant", "I am fine. " * 5), ("user", "What can I do?")]
    full = render_chat_prompt(tokenizer, turns)
    assert fit_chat_prompt(tokenizer, turns, len(full)) == (full, 0)
    last_two = render_chat_prompt(tokenizer, turns[1:])
    assert fit_chat_prompt(tokenizer, turns, len(full) - 1) == (last_two, 1)
    tiny, _ = fit_chat_prompt(tokenizer, turns, 5)  # not even the last turn fits: its end is kept
    assert len(tiny) == 5 and tiny[0] == tokenizer.get_bos_token_id() and tiny[-2:] == full[-2:]


def test_a_server_without_a_model_answers_503():
    from fastapi.testclient import TestClient
    client = TestClient(create_app(ServerConfig()))  # not started (no lifespan): nothing loaded
    health = client.get("/health").json()
    assert (health["ready"], health["num_gpus"], health["available_workers"]) == (False, 0, 0)
    response = client.post("/v1/chat/completions", json={"messages": USER})
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    assert response.headers["retry-after"] == "1"
    response = client.post("/chat/completions", json={"messages": USER})
    assert response.status_code == 503 and "not ready" in response.json()["detail"]


def test_uvicorn_entry_point_is_the_app_with_the_default_flags():
    from uvicorn.importer import import_from_string  # how `uvicorn scripts.chat_web:app` finds it
    from scripts import chat_web
    app = import_from_string("scripts.chat_web:app")
    assert import_from_string("scripts.chat_web:app") is app  # built once, on first access
    assert app.state.config == ServerConfig() and app.state.pool is None
    assert not hasattr(chat_web, "application")  # only `app` is built on access


@pytest.mark.parametrize("argv, message", [
    (["-t", "2.5"], "--temperature must be in [0.0, 2.0], got 2.5"),
    (["-k", "-1"], "--top-k must be in [0, 200], got -1"),
    (["--max-batch-size", "0"], "--max-batch-size must be >= 1"),
    (["--max-queue", "-1"], "--max-queue >= 0"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be >= 1 and --body-timeout > 0, got 0, 30.0"),
    (["--body-timeout", "0"], "--body-timeout > 0, got 1048576, 0.0"),
    (["-p", "-1"], "--port must be in [0, 65535], got -1"),
    (["-p", "65536"], "--port must be in [0, 65535], got 65536"),
])
def test_chat_web_flags_out_of_range_are_usage_errors_naming_the_flag(capsys, argv, message):
    from scripts import chat_web
    with pytest.raises(SystemExit) as info:
        chat_web.parse_args(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # uvicorn's exit(3)
def test_serve_in_thread_says_when_the_server_did_not_start(tmp_path, monkeypatch):
    point_base_dir_at(monkeypatch, tmp_path)  # no checkpoint to load
    app = create_app(ServerConfig(device_type="cpu"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(RuntimeError, match="did not start"):
        serve_in_thread(app, port=port, timeout=60)
    assert isinstance(app.state.startup_error, FileNotFoundError)
    with socket.socket() as retry:  # the failed server's socket is closed: its port can be bound again
        retry.bind(("127.0.0.1", port))


def test_num_gpus_above_one_needs_cuda():
    with pytest.raises(ValueError, match="--num-gpus 2 needs CUDA"):
        ServerConfig(num_gpus=2, device_type="cpu")
    with pytest.raises(BadSettingError, match="needs CUDA"):
        worker_devices("cpu", 2)


def test_more_gpus_than_the_machine_has_is_one_error_line_before_any_loading(capsys):
    # the device is autodetected after the flags are read: checked then, not as a failed start-up
    from scripts import chat_web
    with exits_with_error(capsys, r"^chat_web: error: --num-gpus 999 (needs CUDA|but only \d+ CUDA devices)"):
        chat_web.main(["-n", "999"])


def test_a_port_in_use_is_one_error_line_before_any_loading(capsys):
    from scripts import chat_web
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with exits_with_error(capsys, rf"^chat_web: error: cannot listen on 127\.0\.0\.1:{port} \(.+\)\. Fix: "
                                      rf"pass another --port"):
            chat_web.main(["--host", "127.0.0.1", "-p", str(port), "--device-type", "cpu"])


@pytest.mark.parametrize("devices, lines", [
    (["cpu"], ["Loading model on cpu..."]),
    (["cuda:0", "cuda:1"], ["Loading model on GPU 0...", "Loading model on GPU 1..."])])
def test_pool_start_up_prints_the_references_lines(tiny_chat_base_dir, monkeypatch, capsys, devices, lines):
    # the CUDA devices are only named: every replica loads on the CPU
    from nanochat.checkpoint_manager import load_model
    monkeypatch.setattr("nanochat.server.worker_devices", lambda *_: [torch.device(d) for d in devices])
    monkeypatch.setattr("nanochat.server.load_model", lambda source, _, **kw: load_model(source, "cpu", **kw))
    WorkerPool.load(ServerConfig(device_type="cpu")).shutdown()
    n = len(devices)
    expected = [f"Initializing worker pool with {n} GPUs...", *lines, f"All {n} workers initialized!"]
    printed = capsys.readouterr().out.splitlines()
    assert [line for line in printed if re.match(r"Initializing|Loading model|All \d", line)] == expected


def test_a_pool_that_fails_to_load_a_device_stops_the_schedulers_it_started(tiny_chat_base_dir, monkeypatch):
    # the second of two devices fails to load (out of memory, Ctrl-C): the first one's scheduler thread stops
    from nanochat.checkpoint_manager import load_model
    loads = []

    def load_then_fail(source, _, **kw):
        loads.append(source)
        if len(loads) == 2:
            raise KeyboardInterrupt
        return load_model(source, "cpu", **kw)

    def schedulers_running():  # other tests' servers may be running theirs
        return {t for t in threading.enumerate() if t.name == "nanochat-batching"}

    monkeypatch.setattr("nanochat.server.worker_devices", lambda *_: [torch.device("cpu")] * 2)
    monkeypatch.setattr("nanochat.server.load_model", load_then_fail)
    before = schedulers_running()
    with pytest.raises(KeyboardInterrupt):
        WorkerPool.load(ServerConfig(device_type="cpu"))
    assert len(loads) == 2 and schedulers_running() == before


def test_requests_go_to_the_least_loaded_scheduler(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    schedulers = [BatchScheduler(model, tokenizer, max_batch_size=2, max_queue=4) for _ in range(2)]
    workers = [Worker(i, torch.device("cpu"), s, tokenizer, SEQUENCE_LEN) for i, s in enumerate(schedulers)]
    pool = WorkerPool(workers, MODEL_ID)
    prompt = completion_prompt(tokenizer, [{"role": "user", "content": "Hi"}])
    # not started: submitted requests stay queued, so the loads are known exactly
    for expected_gpu in (0, 1, 0, 1):
        worker = pool.least_loaded()
        assert worker.gpu_id == expected_gpu
        worker.scheduler.submit(prompt, SamplingParams(max_tokens=4))
    assert [w.num_requests() for w in workers] == [2, 2]
    for scheduler in schedulers:
        scheduler.shutdown()


# -----------------------------------------------------------------------------
# Failures stay contained (the app over a given model, no uvicorn)

class NaNModel(AlteredLogits):
    """The real GPT with NaN logits: every request's generation fails."""

    def alter(self, logits, ids):
        return logits.fill_(float("nan"))


@contextlib.contextmanager
def app_over(model, tokenizer, **settings):
    """A TestClient of the app (ServerConfig(**settings)) whose one worker serves `model`."""
    from fastapi.testclient import TestClient
    scheduler = BatchScheduler(model, tokenizer)
    scheduler.start()
    app = create_app(ServerConfig(**settings))
    worker = Worker(0, torch.device("cpu"), scheduler, tokenizer, SEQUENCE_LEN)
    app.state.pool = WorkerPool([worker], MODEL_ID)
    try:
        yield TestClient(app, raise_server_exceptions=False)
    finally:
        scheduler.shutdown()


def test_a_failed_generation_is_reported_on_every_api(tiny_chat_model):
    model, tokenizer = tiny_chat_model
    with app_over(NaNModel(model), tokenizer) as client:
        response = client.post("/chat/completions", json={"messages": USER})
        events = [json.loads(p) for p in sse_payloads(response.text)]
        assert events == [{"error": "Generation failed on the server"}, {"done": True}]
        response = client.post("/v1/chat/completions", json={"messages": USER})
        assert response.status_code == 500
        assert response.json()["error"]["message"] == "Generation failed on the server"
        assert response.json()["error"]["type"] == "server_error"
        response = client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
        events = [json.loads(p) for p in sse_payloads(response.text)]
        assert events[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]
        assert events[1:] == [{"error": {"message": "Generation failed on the server", "type": "server_error",
                                         "param": None, "code": None}}]


class FirstBatchedRowFails(AlteredLogits):
    """The real GPT whose row 1 turns NaN in the first batched decode step; the next batched step waits (up
    to 10 s) for every request to be cancelled, so that rows left running cannot finish first by speed."""

    def __init__(self, model, requests):
        super().__init__(model)
        self.requests, self.steps = requests, 0

    def alter(self, logits, ids):
        if ids.size(0) > 1:
            self.steps += 1
            if self.steps == 1:
                logits[1].fill_(float("nan"))
            deadline = time.monotonic() + 10
            while self.steps == 2 and not all(r.cancelled for r in self.requests) \
                    and time.monotonic() < deadline:
                time.sleep(0.01)
        return logits


def test_a_non_streaming_reply_with_a_failed_choice_stops_its_other_choices(tiny_chat_model, monkeypatch):
    # the reply is a 500 from the moment one choice fails: its other choices must not decode on to the end
    model, tokenizer = tiny_chat_model
    submitted = []
    with app_over(FirstBatchedRowFails(model, submitted), tokenizer) as client:
        scheduler = client.app.state.pool.workers[0].scheduler
        submit = scheduler.submit
        monkeypatch.setattr(scheduler, "submit", lambda *args, **kw: submitted.append(submit(*args, **kw)) or
                            submitted[-1])
        body = {"messages": USER, "n": 3, "max_tokens": 1500, "temperature": 0.0}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 500
        deadline = time.monotonic() + 10  # the cancelled choices end at the scheduler's next step
        while any(r.finish_reason is None for r in submitted) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(map(str, (r.finish_reason for r in submitted))) == ["cancelled", "cancelled", "error"]


def test_log_conversations_flag_logs_each_conversation_in_full(tiny_chat_model, caplog):
    model, tokenizer = tiny_chat_model
    for log_conversations in (False, True):
        caplog.clear()
        with app_over(model, tokenizer, log_conversations=log_conversations) as client, \
                caplog.at_level(logging.INFO, logger="nanochat.server"):
            body = {"messages": [{"role": "user", "content": "Hello there!"}], "temperature": 0.0,
                    "max_tokens": 8}
            events = [json.loads(p) for p in sse_payloads(client.post("/chat/completions", json=body).text)]
        reply = "".join(e["token"] for e in events[:-1])
        logged = caplog.text
        assert ("[USER]: Hello there!" in logged) == log_conversations
        assert (f"[ASSISTANT] (GPU 0): {reply}" in logged) == log_conversations
        assert "1 messages" in logged  # the summary line, either way


@pytest.mark.parametrize("error, status", [(QueueFull("full"), 429), (ValueError("a bug"), 500)])
def test_a_failed_submit_cancels_the_choices_already_submitted(tiny_chat_model, monkeypatch, error, status):
    model, tokenizer = tiny_chat_model
    with app_over(model, tokenizer) as client:
        scheduler = client.app.state.pool.workers[0].scheduler
        submitted, submit = [], scheduler.submit

        def submit_once(*args, **kwargs):  # the second choice's submit fails
            if submitted:
                raise error
            submitted.append(submit(*args, **kwargs))
            return submitted[-1]
        monkeypatch.setattr(scheduler, "submit", submit_once)
        response = client.post("/v1/chat/completions", json={"messages": USER, "n": 2, "max_tokens": 50})
        assert response.status_code == status and "error" in response.json()
        assert len(submitted) == 1 and submitted[0]._cancelled.is_set()


def test_a_bug_in_an_endpoint_is_a_500_with_a_json_body():
    from fastapi.testclient import TestClient

    def broken():
        raise KeyError("a bug")

    app = create_app(ServerConfig())
    for path in ("/broken", "/v1/broken"):
        app.add_api_route(path, broken)
    client = TestClient(app, raise_server_exceptions=False)
    assert client.get("/broken").json() == {"detail": "Internal server error"}
    response = client.get("/v1/broken")
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"


def test_a_client_that_disconnects_while_sending_its_body_gets_nothing_and_reaches_no_route():
    reached, sent = [], []

    async def route(scope, receive, send):
        reached.append(scope["path"])

    async def send(message):
        sent.append(message)

    async def scenario():
        messages = [{"type": "http.request", "body": b'{"messages": ', "more_body": True},
                    {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0)

        scope = {"type": "http", "path": "/v1/chat/completions", "headers": [(b"content-length", b"100")]}
        await BoundedBody(route, max_bytes=1000, timeout=5)(scope, receive, send)

    asyncio.run(scenario())
    assert reached == [] and sent == []


def test_events_that_arrive_after_the_event_loop_closed_are_dropped_without_an_error(tiny_chat_model, caplog):
    # a forced exit (a second Ctrl-C) closes the loop without the lifespan shutdown, decode threads running
    model, tokenizer = tiny_chat_model
    scheduler = BatchScheduler(model, tokenizer)  # started once the loop is gone
    worker = Worker(0, torch.device("cpu"), scheduler, tokenizer, SEQUENCE_LEN)
    http_request = SimpleNamespace(app=SimpleNamespace(state=SimpleNamespace(config=ServerConfig())))
    body = OpenAIChatRequest(messages=[OpenAIMessage(role="user", content="Hi")], temperature=0.0)
    prompt = completion_prompt(tokenizer, USER)

    async def submit():
        return start_generation(http_request, worker, [prompt], body, max_tokens=4)

    generation = asyncio.run(submit())
    scheduler.start()
    deadline = time.monotonic() + 30
    while generation.requests[0].finish_reason is None and time.monotonic() < deadline:
        time.sleep(0.01)
    scheduler.shutdown()
    assert generation.requests[0].finish_reason in ("length", "stop")
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


# -----------------------------------------------------------------------------
# The OpenAI API

def test_models_endpoint(client, url):
    assert [model.id for model in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


@pytest.mark.parametrize("messages, turns, system", [
    ([{"role": "user", "content": "Hi"}, {"role": "user", "content": "Again"}],
     [("user", "Hi"), ("user", "Again")], ""),
    ([{"role": "assistant", "content": "Hello"}], [("assistant", "Hello")], ""),
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
     [("user", "Hi"), ("assistant", "Hello")], ""),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Be brief."}],
     [("user", "Hi")], "Be brief."),
    ([{"role": "developer", "content": "Be brief."}], [("user", "Be brief.")], ""),
])
def test_openai_messages_in_any_order_are_served_as_their_turns(url, tiny_chat_model, messages, turns, system):
    # OpenAI takes messages in any order: each user or assistant message is a turn of the prompt, and the
    # system messages join the first user turn (or are one, when there is none)
    _, tokenizer = tiny_chat_model
    prompt = render_chat_prompt(tokenizer, turns, system)
    expected = greedy_reply(tiny_chat_model, prompt, 6)
    response = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 6,
                                                              "temperature": 0})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(prompt)
    assert response.json()["choices"][0]["message"]["content"] == tokenizer.decode(expected)


def test_openai_non_streaming_equals_greedy_decode(client, tiny_chat_model):
    _, tokenizer = tiny_chat_model
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there!"}]
    prompt = completion_prompt(tokenizer, messages)
    expected = greedy_reply(tiny_chat_model, prompt, 12)
    response = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=12)
    assert response.object == "chat.completion" and response.model == MODEL_ID
    [choice] = response.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == tokenizer.decode(expected)
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(expected))
    assert usage.total_tokens == len(prompt) + len(expected)


def test_openai_streaming_chunks(client, url, tiny_chat_model):
    _, tokenizer = tiny_chat_model
    messages = [{"role": "user", "content": "How are you today?"}]
    prompt = completion_prompt(tokenizer, messages)
    expected = greedy_reply(tiny_chat_model, prompt, 16)
    chunks = list(client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == tokenizer.decode(expected)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if len(expected) == 16 else "stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(expected)
    assert chunks[-1].usage.prompt_tokens == len(prompt)
    # the raw framing: data events separated by blank lines, ending with [DONE]
    body = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "stream": True, "max_tokens": 3}).text
    payloads = sse_payloads(body)
    assert payloads[-1] == "[DONE]" and all(json.loads(p)["object"] == "chat.completion.chunk" for p in payloads[:-1])


def test_n_choices_and_seed(client):
    kwargs = dict(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], temperature=1.0, max_tokens=16,
                  n=3, seed=123)
    first = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    texts = [c.message.content for c in first.choices]
    assert len(set(texts)) > 1, "each choice samples with its own seed"
    again = client.chat.completions.create(**kwargs)
    assert [c.message.content for c in again.choices] == texts
    assert again.usage.completion_tokens == first.usage.completion_tokens


def test_stop_strings(client):
    messages = [{"role": "user", "content": "The answer is"}]
    full = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=24)
    text = full.choices[0].message.content
    assert len(text) >= 10, f"the test needs a longer greedy reply, got {text!r}"
    stop = text[6:9]
    expected = text[:text.index(stop)]
    cut = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=24,
                                         stop=["never appears", stop])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(model=MODEL_ID, messages=messages, temperature=0, max_tokens=24,
                                            stop=stop, stream=True)
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_a_choice_ended_by_a_stop_string_gets_one_finish_while_the_others_run_on(url):
    body = {"messages": [{"role": "user", "content": "Hi"}], "temperature": 1.0, "max_tokens": 40, "n": 2,
            "seed": 7}
    choices = httpx.post(url + "/v1/chat/completions", json=body).json()["choices"]
    texts = [c["message"]["content"] for c in choices]
    stop = texts[0][3:6]
    assert stop not in texts[1] and len(texts[1]) > 20, f"the test needs other replies, got {texts!r}"
    # choice 0 ends at once; its scheduler request ends a step later ("cancelled"), while choice 1 runs on
    response = httpx.post(url + "/v1/chat/completions", json={**body, "stop": stop, "stream": True})
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    finishes = [(c["choices"][0]["index"], c["choices"][0]["finish_reason"]) for c in chunks
                if c["choices"][0]["finish_reason"]]
    assert sorted(finishes) == [(0, "stop"), (1, "length")]
    content = ["".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"][0]["index"] == i) for i in (0, 1)]
    assert content == [texts[0][:texts[0].index(stop)], texts[1]]


def test_concurrent_greedy_requests_equal_the_same_requests_alone(client, url):
    prompts = ["Hello there!", "How are you?", "The quick brown fox", "What can I do for you?",
               "I am fine", "The answer is 42.", "Un café", "thank you"]

    def ask(prompt):
        response = client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": prompt}],
                                                  temperature=0, max_tokens=48)
        return response.choices[0].message.content, response.usage.completion_tokens

    alone = [ask(p) for p in prompts]
    assert len(set(alone)) > 1
    peak = [0]

    def watch(done):
        while not done.is_set():
            peak[0] = max(peak[0], get_stats(url)["active"])

    # on a busy machine one round may be served one request at a time: a few rounds, each checked
    for _ in range(3):
        done = threading.Event()
        watcher = threading.Thread(target=watch, args=(done,))
        watcher.start()
        try:
            with ThreadPoolExecutor(len(prompts)) as pool:
                together = list(pool.map(ask, prompts))
        finally:
            done.set()
            watcher.join()
        assert together == alone
        if peak[0] > 1:
            break
    assert peak[0] > 1, "the concurrent requests were never decoded in one batch"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(url, stream):
    before = wait_until_idle(url)
    # greedy: this model then runs to the context's end (~2000 tokens, seconds)
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4096, "stream": stream,
            "temperature": 0}
    if stream:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            wait_for_content(lines)
            assert get_stats(url)["active"] == 1
    else:
        with pytest.raises(httpx.ReadTimeout):  # gives up waiting: the connection closes
            httpx.post(url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
    after = wait_until_idle(url)
    # the reply could run to the context's end (~2000 tokens); it was cut well before that
    assert 0 < after["tokens_generated"] - before["tokens_generated"] < 1000


def test_openai_client_errors(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "Hi"}], temperature=3)
    assert info.value.status_code == 400 and info.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize("body, param", [
    ({}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": [{"role": "tool", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x" * 8001}]}, "messages[0].content"),
    ({"messages": [{"role": ("user", "assistant")[i % 2], "content": "x" * 7000} for i in range(5)]}, "messages"),
    ({"messages": USER * 501}, "messages"),
    ({"messages": [{"role": "user", "content": "q" * 7000}]}, "messages"),  # ~7000 tokens > the 2048 context
    ({"messages": USER, "temperature": 2.5}, "temperature"),
    ({"messages": USER, "temperature": -0.1}, "temperature"),
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "top_p": 0}, "top_p"),
    ({"messages": USER, "top_p": 1.5}, "top_p"),
    ({"messages": USER, "top_k": 201}, "top_k"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_completion_tokens": 4097}, "max_completion_tokens"),
    ({"messages": USER, "n": 0}, "n"),
    ({"messages": USER, "n": 9}, "n"),
    ({"messages": USER, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": USER, "stop": ""}, "stop"),
    ({"messages": USER, "stop": ["a", 5]}, "stop"),
    ({"messages": USER, "stream": "sometimes"}, "stream"),
    ({"messages": USER, "stream": "true"}, "stream"),  # types are strict, as OpenAI's
    ({"messages": USER, "max_tokens": False}, "max_tokens"),
    ({"messages": USER, "seed": "7"}, "seed"),
    ({"messages": USER, "temperature": True}, "temperature"),
])
def test_openai_invalid_requests_get_400_with_an_error_body(url, body, param):
    response = httpx.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_openai_malformed_json_and_unknown_paths(url):
    response = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [', 
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    response = httpx.get(url + "/v1/embeddings")
    assert response.status_code == 404 and response.json()["error"]["message"]


def test_openai_accepts_limits_and_ignores_unknown_parameters(url):
    body = {"model": MODEL_ID, "messages": [{"role": "developer", "content": "Be brief."}] + USER, "max_tokens": 2,
            "temperature": 0, "top_p": 1, "top_k": 0, "n": 1, "seed": -5, "user": "someone", "logit_bias": {},
            "stop": ["a", "b", "c", "d"], "messages_extra": True}
    response = httpx.post(url + "/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] <= 2
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hello "},
                                                        {"type": "text", "text": "there!"}]}],
             "max_tokens": 4, "temperature": 0}
    same = {"messages": [{"role": "user", "content": "Hello there!"}], "max_tokens": 4, "temperature": 0}
    assert httpx.post(url + "/v1/chat/completions", json=parts).json()["usage"] == \
        httpx.post(url + "/v1/chat/completions", json=same).json()["usage"]


# -----------------------------------------------------------------------------
# /v1/completions: a prompt continued, as base models are used

def test_completions_equal_greedy_decode_for_text_and_token_prompts(client, tiny_chat_model):
    _, tokenizer = tiny_chat_model
    text = "The quick brown fox"
    prompt = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
    expected = greedy_reply(tiny_chat_model, prompt, 12)
    for sent in (text, prompt):  # text gets BOS in front; token ids are taken as they are
        response = client.completions.create(model=MODEL_ID, prompt=sent, temperature=0, max_tokens=12)
        assert response.object == "text_completion" and response.id.startswith("cmpl-")
        [choice] = response.choices
        assert choice.text == tokenizer.decode(expected) and choice.index == 0
        assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")
        usage = response.usage
        assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), len(expected))


def test_completions_stream_and_stop_strings(client, url, tiny_chat_model):
    _, tokenizer = tiny_chat_model
    kwargs = dict(model=MODEL_ID, prompt="The answer is", temperature=0, max_tokens=24)
    full = client.completions.create(**kwargs).choices[0].text
    assert len(full) >= 10, f"the test needs a longer greedy reply, got {full!r}"
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "text_completion" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    stop = full[6:9]
    for stream in (False, True):
        response = client.completions.create(**kwargs, stop=[stop, "never appears"], stream=stream)
        chunks = [c for c in response if c.choices] if stream else [response]
        assert "".join(c.choices[0].text for c in chunks) == full[:full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"
    body = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "stream": True, "max_tokens": 3}).text
    payloads = sse_payloads(body)
    assert payloads[-1] == "[DONE]"
    assert all(json.loads(p)["object"] == "text_completion" for p in payloads[:-1])


def test_completions_of_a_batch_of_prompts_number_choices_as_openai(client, tiny_chat_model):
    # prompt i's n choices are choices i * n ... i * n + n - 1; each is the greedy continuation of its prompt
    _, tokenizer = tiny_chat_model
    texts = ["The quick brown fox", "Once upon a time"]
    prompts = [tokenizer.encode(text, prepend=tokenizer.get_bos_token_id()) for text in texts]
    expected = [tokenizer.decode(greedy_reply(tiny_chat_model, prompt, 10)) for prompt in prompts]
    kwargs = dict(model=MODEL_ID, temperature=0, max_tokens=10, n=2)
    for sent in (texts, prompts):
        response = client.completions.create(prompt=sent, **kwargs)
        assert [(c.index, c.text) for c in response.choices] == list(enumerate(expected[i // 2] for i in range(4)))
        assert response.usage.prompt_tokens == sum(map(len, prompts))
        chunks = list(client.completions.create(prompt=sent, stream=True, **kwargs))
        streamed = ["".join(c.choices[0].text for c in chunks if c.choices[0].index == i) for i in range(4)]
        assert streamed == [choice.text for choice in response.choices]


@pytest.mark.parametrize("body, message", [
    ({"prompt": ["Hi", ""]}, "must not be empty"),
    ({"prompt": [[1], []]}, "must not be empty"),
    ({"prompt": [[1], [300]]}, "token ids must be in"),
    ({"prompt": [1, "a"]}, "Invalid request"),
    ({"prompt": ["x" * 16001, "x" * 16000]}, "too long"),  # the texts' limit holds over the batch
    ({"prompt": [[1], [1] * 2048]}, "prompt[1] takes 2048 tokens"),
    ({"prompt": ["Hi"] * 10, "n": 8}, "80 choices are more than this server can hold"),
])
def test_completions_of_an_invalid_batch_get_400_naming_the_prompt(url, body, message):
    response = httpx.post(url + "/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "prompt" and message in error["message"], error


def test_a_suffix_is_a_400_not_a_reply_without_it(url):
    # an insertion would be missing from the reply; leaving it out (or sending null, as some clients do) is fine
    response = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "suffix": "!"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "suffix" and "not supported" in error["message"]
    response = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "suffix": None})
    assert response.status_code == 200


# -----------------------------------------------------------------------------
# Log-probabilities

def model_logprobs(reference, sequence):
    """The log-softmax of one forward over `sequence` (no cache, no batching): row t scores token t + 1."""
    model, _ = reference
    with torch.no_grad():
        return model(torch.tensor([sequence]))[0].float().log_softmax(dim=-1)


def test_chat_logprobs_are_the_models_streamed_or_not(client, tiny_chat_model):
    _, tokenizer = tiny_chat_model
    prompt = completion_prompt(tokenizer, USER)
    expected = greedy_reply(tiny_chat_model, prompt, 10)
    scores = model_logprobs(tiny_chat_model, prompt + expected)
    kwargs = dict(model=MODEL_ID, messages=USER, temperature=0, max_tokens=10, logprobs=True, top_logprobs=2)
    response = client.chat.completions.create(**kwargs)
    content = response.choices[0].logprobs.content
    assert len(content) == len(expected)
    for i, (entry, token) in enumerate(zip(content, expected)):
        assert bytes(entry.bytes) == tokenizer.decode_single_token_bytes(token)
        assert entry.token == bytes(entry.bytes).decode("utf-8", errors="replace")
        assert entry.logprob == pytest.approx(scores[len(prompt) - 1 + i, token].item(), abs=1e-4)
        first, second = entry.top_logprobs  # greedy: the token is its step's likeliest
        assert (first.bytes, first.logprob) == (entry.bytes, entry.logprob) and second.logprob <= first.logprob
    text = b"".join(bytes(entry.bytes) for entry in content).decode("utf-8", errors="replace")
    assert text == response.choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [entry.model_dump() for entry in streamed] == [entry.model_dump() for entry in content]
    plain = client.chat.completions.create(model=MODEL_ID, messages=USER, temperature=0, max_tokens=10)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == text


def test_completions_echo_scores_the_prompt_as_lm_eval_reads_it(client, tiny_chat_model):
    # lm-evaluation-harness's local-completions asks for a token-id prompt with echo, logprobs=1 and
    # max_tokens=1, and sums token_logprobs[context length:-1]
    _, tokenizer = tiny_chat_model
    text = "The quick brown fox jumps"
    prompt = tokenizer.encode(text, prepend=tokenizer.get_bos_token_id())
    scores = model_logprobs(tiny_chat_model, prompt)
    kwargs = dict(model=MODEL_ID, max_tokens=1, temperature=0, logprobs=1, echo=True)
    choice = client.completions.create(prompt=prompt, **kwargs).choices[0]
    greedy = scores[-1].argmax().item()
    assert choice.text == tokenizer.decode(prompt + [greedy])
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([token]) for token in prompt + [greedy]]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing precedes it
    want = [scores[t - 1, token].item() for t, token in enumerate(prompt + [greedy]) if t > 0]
    assert logprobs.token_logprobs[1:] == pytest.approx(want, abs=1e-4)
    assert all(len(top) in (1, 2) and max(top.values()) >= lp  # the likeliest, and the token if another
               for top, lp in zip(logprobs.top_logprobs[1:], logprobs.token_logprobs[1:]))
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(len(prompt) + 1)]
    # a text prompt: the BOS put in front is not echoed, so its first token is scored
    sent_as_text = client.completions.create(prompt=text, **kwargs).choices[0]
    assert sent_as_text.text == text + tokenizer.decode([greedy])
    assert sent_as_text.logprobs.token_logprobs == pytest.approx(logprobs.token_logprobs[1:], abs=1e-6)
    # streamed: the prompt comes first, and the pieces add up to the reply, offsets included
    longer = dict(kwargs, max_tokens=6)
    whole = client.completions.create(prompt=text, **longer).choices[0]
    chunks = [c for c in client.completions.create(prompt=text, stream=True, **longer) if c.choices]
    assert chunks[0].choices[0].text.startswith(text) and len(chunks) > 3
    assert "".join(c.choices[0].text for c in chunks) == whole.text
    pieces = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for piece in pieces for t in piece.tokens] == whole.logprobs.tokens
    assert [o for piece in pieces for o in piece.text_offset] == whole.logprobs.text_offset
    without = client.completions.create(model=MODEL_ID, prompt=text, max_tokens=1, temperature=0, echo=True)
    assert without.choices[0].text == sent_as_text.text and without.choices[0].logprobs is None


def test_completions_text_offsets_count_the_characters_before_each_token(client, tiny_chat_model):
    # "é" and "ï" take two tokens each in the tiny vocabulary: a token that starts or ends inside a character
    # reads U+FFFD, yet its offset counts the characters of the text before it, streamed or not
    _, tokenizer = tiny_chat_model
    text = "Un café naïve"
    ids = tokenizer.encode(text)
    kwargs = dict(model=MODEL_ID, prompt=text, max_tokens=4, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    offsets = whole.logprobs.text_offset
    assert offsets[:len(ids)] == [len(tokenizer.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]
    assert offsets == sorted(offsets) and offsets[-1] <= len(whole.text)
    chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == offsets


def test_a_token_after_a_broken_character_is_placed_after_its_replacement_character(client, tiny_chat_model):
    # a lone lead byte that the next token does not continue reads U+FFFD: the token's offset is past it
    _, tokenizer = tiny_chat_model
    prompt = [tokenizer.get_bos_token_id(), 0xC3, ord("A"), ord("b")]  # byte tokens' ids are the byte values
    kwargs = dict(model=MODEL_ID, prompt=prompt, max_tokens=3, temperature=0, logprobs=1, echo=True)
    whole = client.completions.create(**kwargs).choices[0]
    assert whole.text.startswith("<|bos|>\ufffdAb") and whole.logprobs.text_offset[:5] == [0, 7, 8, 9, 10]
    chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert [o for c in chunks if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset] == \
        whole.logprobs.text_offset


def test_logprobs_cover_the_text_a_stop_string_leaves(client):
    # OpenAI reports the returned text's tokens: those of the stop string and after it are cut with their
    # text, streamed or not (a stream must not send them ahead while it holds back a possible stop string)
    kwargs = dict(model=MODEL_ID, prompt="The answer is", temperature=0, max_tokens=24, logprobs=1)
    full = client.completions.create(**kwargs).choices[0]
    offsets = full.logprobs.text_offset
    stop = full.text[offsets[2]:offsets[2] + 3]  # from the third token on: the first two are kept
    assert len(stop) == 3 and full.text.index(stop) == offsets[2], "the test needs a stop in the reply"
    kept = [i for i, o in enumerate(offsets) if o < offsets[2]]
    for stream in (False, True):
        response = client.completions.create(**kwargs, stop=stop, stream=stream)
        chunks = [c for c in response if c.choices] if stream else [response]
        text = "".join(c.choices[0].text for c in chunks)
        got = [(t, o) for c in chunks if c.choices[0].logprobs
               for t, o in zip(c.choices[0].logprobs.tokens, c.choices[0].logprobs.text_offset)]
        assert text == full.text[:full.text.index(stop)] and got == [(full.logprobs.tokens[i], offsets[i])
                                                                    for i in kept]
    chat = dict(model=MODEL_ID, messages=USER, temperature=0, max_tokens=24, logprobs=True)
    content = client.chat.completions.create(**chat).choices[0]
    reply, entries = content.message.content, content.logprobs.content
    starts = list(itertools.accumulate((len(e.token) for e in entries), initial=0))
    stop = reply[starts[2]:starts[2] + 3]
    assert len(stop) == 3 and reply.index(stop) == starts[2], "the test needs a stop in the reply"
    for stream in (False, True):
        response = client.chat.completions.create(**chat, stop=stop, stream=stream)
        chunks = [c for c in response if c.choices] if stream else [response]
        got = [e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert got == [e.token for e in entries[:2]]


def test_sampled_choices_cut_by_a_stop_string_stream_the_logprobs_they_return(client):
    # n sampled choices, cut where a special token's literal name starts: each choice streams its unstreamed
    # entries, and every entry starts inside the text the choice returns (the cut token's is not reported)
    kwargs = dict(model=MODEL_ID, prompt="The answer is", temperature=1.0, seed=3, n=3, max_tokens=24,
                  logprobs=1)
    uncut = client.completions.create(**kwargs).choices
    assert any("<|" in c.text for c in uncut), "the test needs a special token in a reply"
    whole = client.completions.create(**kwargs, stop="<|").choices
    streamed = {c.index: [] for c in whole}
    for chunk in client.completions.create(**kwargs, stop="<|", stream=True):
        for c in chunk.choices:
            if c.logprobs:
                lp = c.logprobs
                streamed[c.index] += list(zip(lp.tokens, lp.token_logprobs, lp.text_offset))
    for c in whole:
        lp = c.logprobs
        assert "<|" not in c.text and all(offset < len(c.text) for offset in lp.text_offset)
        got = streamed[c.index]
        assert [(t, o) for t, _, o in got] == list(zip(lp.tokens, lp.text_offset))
        assert [p for _, p, _ in got] == pytest.approx(lp.token_logprobs, abs=1e-4)


def test_completions_top_logprobs_keep_the_likeliest_of_tokens_that_read_the_same(client):
    # the tokens of partial characters all read U+FFFD: the likeliest of them keeps the key, so the greedy
    # token's log-probability is its step's highest
    kwargs = dict(model=MODEL_ID, prompt="Hello", max_tokens=8, temperature=0, logprobs=5)
    logprobs = client.completions.create(**kwargs).choices[0].logprobs
    assert any(len(top) < 5 for top in logprobs.top_logprobs), "the test needs tokens that read the same"
    assert [max(top.values()) for top in logprobs.top_logprobs] == logprobs.token_logprobs


def test_completions_top_logprobs_always_hold_the_chosen_token(client):
    # OpenAI: "The API will always return the logprob of the sampled token, so there may be up to logprobs+1
    # elements in the response"; with echo the prompt's own tokens are the chosen ones
    kwargs = dict(model=MODEL_ID, prompt="The quick", max_tokens=8, temperature=2.0, seed=1, echo=True)
    logprobs = client.completions.create(**kwargs, logprobs=0).choices[0].logprobs
    assert logprobs.top_logprobs == [{t: lp} for t, lp in zip(logprobs.tokens, logprobs.token_logprobs)]
    logprobs = client.completions.create(**kwargs, logprobs=1).choices[0].logprobs
    assert all(t in top and len(top) <= 2 for t, top in zip(logprobs.tokens, logprobs.top_logprobs))
    assert any(len(top) == 2 for top in logprobs.top_logprobs), "the test needs a token not the likeliest"


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/completions", {"logprobs": 6}, "logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
])
def test_logprobs_beyond_openais_limits_are_a_400_naming_the_field(url, path, fields, param):
    body = {"messages": USER} if path.endswith("chat/completions") else {"prompt": "Hi"}
    response = httpx.post(url + path, json={**body, "max_tokens": 1, **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("body, param", [
    ({}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [300]}, "prompt"),  # the tiny vocabulary has 300 ids
    ({"prompt": "x" * 32001}, "prompt"),
    ({"prompt": [1] * 2048}, "prompt"),  # no room left in the 2048-token context
    ({"prompt": "Hi", "temperature": 2.5}, "temperature"),
    ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "Hi", "n": 9}, "n"),
    ({"prompt": "Hi", "stop": ""}, "stop"),
    ({"prompt": "Hi", "stream": "sometimes"}, "stream"),
    ({"prompt": "Hi", "stream_options": {"include_usage": True}}, "stream_options"),  # needs stream: true
])
def test_completions_invalid_requests_get_400_naming_the_field(url, body, param):
    response = httpx.post(url + "/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"] and error["param"] == param


def test_completions_for_another_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-4", prompt="Hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


# -----------------------------------------------------------------------------
# The reference API

def test_reference_stream_format(url, tiny_chat_model):
    _, tokenizer = tiny_chat_model
    messages = [{"role": "user", "content": "Hello there!"}, {"role": "assistant", "content": "Hi!"},
                {"role": "user", "content": "What can I do?"}]
    prompt = completion_prompt(tokenizer, messages)
    expected = greedy_reply(tiny_chat_model, prompt, 20)
    response = httpx.post(url + "/chat/completions", json={"messages": messages, "temperature": 0.0,
                                                           "top_k": 50, "max_tokens": 20})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(p) for p in sse_payloads(response.text)]
    assert events[-1] == {"done": True}
    assert all(set(e) == {"token", "gpu"} and e["gpu"] == 0 and e["token"] for e in events[:-1])
    reply = tokenizer.decode(expected)
    assert "".join(e["token"] for e in events[:-1]) == reply
    non_ascii = {c for c in reply if ord(c) > 127}
    assert non_ascii and all(c in response.text for c in non_ascii)  # sent as UTF-8, not as \u escapes


def too_long(n):
    return "x" * n


REFERENCE_ERRORS = [
    ({"messages": []}, "At least one message is required"),
    ({"messages": USER * 501}, "Too many messages. Maximum 500 messages allowed per request"),
    ({"messages": USER + [{"role": "assistant", "content": ""}]}, "Message 1 has empty content"),
    ({"messages": [{"role": "user", "content": too_long(8001)}]},
     "Message 0 is too long. Maximum 8000 characters allowed per message"),
    ({"messages": [{"role": "user", "content": too_long(8000)}] * 4 + USER},
     "Total conversation is too long. Maximum 32000 characters allowed"),
    ({"messages": [{"role": "system", "content": "Be brief."}] + USER},
     "Message 0 has invalid role. Must be 'user', 'assistant', or 'system'"),
    ({"messages": USER, "temperature": -0.1}, "Temperature must be between 0.0 and 2.0"),
    ({"messages": USER, "temperature": 2.1}, "Temperature must be between 0.0 and 2.0"),
    ({"messages": USER, "top_k": -1}, "top_k must be between 0 and 200"),
    ({"messages": USER, "top_k": 201}, "top_k must be between 0 and 200"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens must be between 1 and 4096"),
    ({"messages": USER, "max_tokens": 4097}, "max_tokens must be between 1 and 4096"),
    # the order of the checks: the first failing one is reported
    ({"messages": [{"role": "bot", "content": ""}], "temperature": 9}, "Message 0 has empty content"),
    ({"messages": [{"role": "bot", "content": "Hi"}], "temperature": 9},
     "Message 0 has invalid role. Must be 'user', 'assistant', or 'system'"),
    ({"messages": USER, "temperature": 9, "top_k": 999}, "Temperature must be between 0.0 and 2.0"),
]


@pytest.mark.parametrize("body, detail", REFERENCE_ERRORS)
def test_reference_validation_messages(url, body, detail):
    response = httpx.post(url + "/chat/completions", json=body)
    assert response.status_code == 400 and response.json() == {"detail": detail}


REFERENCE_LIMITS = [
    {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "Hi"} for i in range(500)]},
    {"messages": [{"role": "user", "content": too_long(8000)}]},
    {"messages": [{"role": "user", "content": too_long(8000)}] * 4},
    {"messages": USER, "temperature": 0.0}, {"messages": USER, "temperature": 2.0},
    {"messages": USER, "top_k": 0}, {"messages": USER, "top_k": 200},
    {"messages": USER, "max_tokens": 1}, {"messages": USER, "max_tokens": 4096},
]


@pytest.mark.parametrize("body", REFERENCE_LIMITS)
def test_reference_accepts_the_limits(url, body):
    # headers only: the stream is dropped at once (long conversations are trimmed to the context)
    with httpx.stream("POST", url + "/chat/completions", json=body) as response:
        assert response.status_code == 200


@pytest.mark.parametrize("body", [{}, {"messages": [{"role": "user"}]}, {"messages": USER, "temperature": "hot"},
                                  {"messages": [{"role": "user", "content": 5}]}])
def test_reference_schema_errors_are_422(url, body):
    assert httpx.post(url + "/chat/completions", json=body).status_code == 422


def test_health_and_stats(url):
    wait_until_idle(url)
    health = httpx.get(url + "/health").json()
    assert {k: health[k] for k in ("status", "ready", "num_gpus", "available_workers")} == \
        {"status": "ok", "ready": True, "num_gpus": 1, "available_workers": 1}
    stats = httpx.get(url + "/stats").json()
    assert (stats["total_workers"], stats["available_workers"], stats["busy_workers"]) == (1, 1, 0)
    [worker] = stats["workers"]
    assert worker["gpu_id"] == 0 and worker["device"] == "cpu" and worker["max_batch_size"] == 8
    assert worker["completed"] > 0 and worker["tokens_generated"] > 0  # earlier tests ran through it


@pytest.mark.parametrize("batch_invariant", [False, True])
def test_batch_invariant_flag_reaches_the_scheduler(tiny_chat_base_dir, batch_invariant):
    with chat_server(max_batch_size=2, batch_invariant=batch_invariant) as (app, _, _):
        [worker] = app.state.pool.workers
        assert worker.scheduler.fixed_width == batch_invariant


def test_ui_files(url, tmp_path, monkeypatch):
    monkeypatch.setattr("nanochat.server.UI_DIR", str(tmp_path))
    response = httpx.get(url + "/")
    assert response.status_code == 404 and "ui.html" in response.json()["detail"]
    assert httpx.get(url + "/logo.svg").status_code == 404
    (tmp_path / "ui.html").write_text("<script>\nconst API_URL = `http://${window.location.hostname}:8000`;\n"
                                      "fetch(`${API_URL}/health`);\n</script>\n")
    (tmp_path / "logo.svg").write_text("<svg></svg>")
    response = httpx.get(url + "/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert response.text == "<script>\nconst API_URL = '';\nfetch(`${API_URL}/health`);\n</script>\n"
    response = httpx.get(url + "/logo.svg")
    assert response.text == "<svg></svg>" and response.headers["content-type"] == "image/svg+xml"


# -----------------------------------------------------------------------------
# A full queue

def test_a_full_queue_answers_429(tiny_chat_base_dir):
    body = {"messages": USER, "max_tokens": 4096, "stream": True, "temperature": 0}  # runs for seconds
    with chat_server(max_batch_size=1, max_queue=1) as (_, url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as running:
            running_lines = running.iter_lines()
            wait_for_content(running_lines)  # decoding: it holds the only slot
            with httpx.stream("POST", url + "/v1/chat/completions", json=body) as waiting:
                assert waiting.status_code == 200
                assert (get_stats(url)["active"], get_stats(url)["queued"]) == (1, 1)
                assert httpx.get(url + "/stats").json()["busy_workers"] == 1
                with pytest.raises(openai.RateLimitError) as info:
                    client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=4)
                assert info.value.status_code == 429 and info.value.body["code"] == "queue_full"
                response = httpx.post(url + "/chat/completions", json={"messages": USER})
                assert response.status_code == 429 and "queue is full" in response.json()["detail"]
        wait_until_idle(url)
        assert client.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=2).choices


def test_headless_browser_gets_a_streamed_answer_from_the_real_server(url):
    """The issue's browser check end to end: the real chat_web serving a real (tiny) model, the real page in
    headless Chromium; a message is sent and a streamed assistant answer must appear."""
    from dev.browser_check import CheckFailed, find_chromium, run_check
    if find_chromium() is None:
        pytest.skip("headless Chromium is not installed (Debian: chromium-headless-shell; .ci/run installs it as root)")
    try:
        result = run_check(url, message="Hello!", timeout=60)
    except CheckFailed as e:
        pytest.fail(f"browser check failed: {e}")
    assert result["answer"].strip(), result  # streamed text reached the assistant bubble


# -----------------------------------------------------------------------------
# API key (--api-key / NANOCHAT_API_KEY)

API_KEY = "test-key-0123"
PROTECTED = [("GET", "/v1/models", None), ("GET", "/stats", None),
             ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 2}),
             ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
             ("POST", "/chat/completions", {"messages": USER, "max_tokens": 2})]


@pytest.fixture(scope="module")
def keyed_url(tiny_chat_base_dir):
    with chat_server(max_batch_size=2, api_key=API_KEY) as (_, url, _):
        yield url


def bearer(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method, path, body", PROTECTED)
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": "Bearer"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])
def test_api_routes_refuse_a_missing_or_wrong_key(keyed_url, method, path, body, headers):
    response = httpx.request(method, keyed_url + path, json=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    if path.startswith("/v1/"):
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", None, "invalid_api_key")
        assert "Authorization: Bearer" in error["message"]
    else:
        assert "Authorization: Bearer" in response.json()["detail"]


@pytest.mark.parametrize("method, path, body", PROTECTED)
def test_api_routes_answer_the_right_key(keyed_url, method, path, body):
    response = httpx.request(method, keyed_url + path, json=body, headers=bearer(API_KEY), timeout=60)
    assert response.status_code == 200, response.text


def test_a_keyed_server_keeps_the_page_and_health_open_and_refuses_before_reading_the_body(keyed_url):
    for path in ("/", "/logo.svg", "/health"):
        assert httpx.get(keyed_url + path).status_code == 200, path
    # a browser's CORS preflight carries no credentials; it must not be refused
    preflight = httpx.options(keyed_url + "/v1/chat/completions", headers={
        "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization"})
    assert preflight.status_code == 200
    # without the key, an over-limit body is refused as unauthorized: the server never reads it
    response = httpx.post(keyed_url + "/v1/chat/completions", content=b"x" * (2 << 20))
    assert response.status_code == 401


def test_the_openai_client_works_with_the_key_and_fails_without_it(keyed_url):
    client = openai.OpenAI(base_url=keyed_url + "/v1", api_key=API_KEY, max_retries=0)
    assert [model.id for model in client.models.list().data] == [MODEL_ID]
    reply = client.chat.completions.create(model=MODEL_ID, messages=USER, temperature=0, max_tokens=4)
    assert reply.choices[0].message.role == "assistant" and reply.usage.completion_tokens >= 1
    wrong = openai.OpenAI(base_url=keyed_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        wrong.chat.completions.create(model=MODEL_ID, messages=USER, max_tokens=4)
    assert info.value.status_code == 401 and info.value.body["code"] == "invalid_api_key"


def test_the_key_can_come_from_the_environment(tiny_chat_base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_API_KEY", "from-env")
    with chat_server(max_batch_size=1) as (_, url, _):
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/v1/models", headers=bearer("from-env")).status_code == 200


@pytest.mark.parametrize("argv, env, warns", [
    (["--host", "0.0.0.0"], None, True),
    (["--host", "::"], None, True),
    (["--host", "0.0.0.0", "--api-key", "k"], None, False),
    (["--host", "0.0.0.0"], "k", False),
    (["--host", "127.0.0.1"], None, False),
])
def test_chat_web_warns_when_it_listens_everywhere_without_a_key(monkeypatch, capsys, argv, env, warns):
    import uvicorn
    from scripts import chat_web
    if env is None:
        monkeypatch.delenv("NANOCHAT_API_KEY", raising=False)
    else:
        monkeypatch.setenv("NANOCHAT_API_KEY", env)
    # the server itself is not started: only what main() prints before it would listen is checked
    bound = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda server: bound.append(server.config.host))
    chat_web.main(argv + ["--device-type", "cpu"])
    assert bound == [argv[1]]
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING")]
    if warns:
        assert len(warnings) == 1 and "without an API key" in warnings[0] and "--api-key" in warnings[0]
    else:
        assert warnings == []


# -----------------------------------------------------------------------------
# Shutdown

def start_chat_web():
    """python -m scripts.chat_web on this module's checkpoint (the environment's NANOCHAT_BASE_DIR), on a free
    port; returns (process, url) once it listens."""
    command = [sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu", "--host", "127.0.0.1",
               "--port", "0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # uvicorn names the port it got on stderr
        found = re.search(r"Uvicorn running on (http://\S+)", line)
        if found:
            threading.Thread(target=process.stderr.read, daemon=True).start()  # a full pipe would block it
            return process, found.group(1)
    raise AssertionError(f"chat_web did not start (exit status {process.wait()})")


def test_ctrl_c_ends_the_replies_in_flight_at_once_and_the_server_exits(tiny_chat_base_dir):
    # uvicorn waits for open connections to close before the lifespan shutdown ends the requests: without
    # ending them first, replies of ~2000 tokens (greedy "Hello") kept the process up until their last token
    process, url = start_chat_web()
    try:
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4096, "temperature": 0}
        streamed = {**body, "stream": True}
        with ThreadPoolExecutor(1) as pool, \
                httpx.stream("POST", url + "/v1/chat/completions", json=streamed) as openai_sse, \
                httpx.stream("POST", url + "/chat/completions", json=body) as reference_sse:
            openai_lines, reference_lines = openai_sse.iter_lines(), reference_sse.iter_lines()
            wait_for_content(openai_lines)
            assert next(line for line in reference_lines if line).startswith('data: {"token"')
            whole = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30)
            deadline = time.monotonic() + 10
            while get_stats(url)["active"] < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
            process.send_signal(signal.SIGINT)  # SIGTERM takes the same path in uvicorn
            signalled = time.monotonic()
            openai_rest = [line for line in openai_lines if line]
            reference_rest = [line for line in reference_lines if line]
            reply = whole.result()
        assert process.wait(timeout=10) == 0
        assert time.monotonic() - signalled < 5  # unbounded before: the replies ran to their end
    finally:
        process.kill()
    assert openai_rest[-1] == "data: [DONE]"
    finish = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "cancelled"}
    assert json.loads(openai_rest[-2][len("data: "):])["choices"] == [finish]
    assert reference_rest[-1] == 'data: {"done": true}'
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "cancelled"


def test_a_client_that_never_finishes_its_body_does_not_hold_the_shutdown(tiny_chat_base_dir):
    # uvicorn waits for every connection to close: this one would wait for its body (--body-timeout, 30s),
    # and one that stops reading a long stream, for ever. The other replies still get their ending
    process, url = start_chat_web()
    host, port = url.removeprefix("http://").split(":")
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4096, "temperature": 0,
            "stream": True}
    sent = json.dumps(body)
    half_sent = socket.create_connection((host, int(port)))
    try:
        half_sent.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Length: "
                          f"{len(sent)}\r\n\r\n{sent[:10]}".encode())
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as streamed:
            lines = streamed.iter_lines()
            wait_for_content(lines)  # the server has read the half-sent body's first bytes by now
            process.send_signal(signal.SIGINT)
            signalled = time.monotonic()
            rest = [line for line in lines if line]
        assert process.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 10
    finally:
        process.kill()
        half_sent.close()
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][len("data: "):])["choices"][0]["finish_reason"] == "cancelled"
