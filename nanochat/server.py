"""
The chat server: a FastAPI app that serves the chat UI, the reference's streaming API and an
OpenAI-compatible API over one continuous-batching scheduler per device. scripts/chat_web.py is its
command line; create_app(ServerConfig(...)) builds the app, and serve_in_thread runs it in-process (tests,
benchmarks). Request schemas and their validation are in nanochat/api_schemas.py.

Endpoints:
    GET  /                     the chat UI (nanochat/ui.html)
    GET  /logo.svg             its logo
    POST /chat/completions     the reference's stream: data: {"token": ..., "gpu": ...} ...
                               data: {"done": true}
    GET  /health, /stats       readiness and load; a "worker" is one device with its scheduler
    GET  /v1/models            the one model served, as "nanochat-<source>-<tag>"
    POST /v1/chat/completions  OpenAI chat completions, streaming (SSE chunks, then [DONE]) or not
    POST /v1/completions       OpenAI's text completions (a prompt continued, for base models), as above

With --api-key KEY (or NANOCHAT_API_KEY), /v1/*, /chat/completions and /stats need `Authorization: Bearer KEY`
(401 otherwise, code invalid_api_key on /v1); the page, its logo and /health stay open. The page cannot send
the key, so it cannot chat with such a server: a key is for a server exposed as an API.

A request is validated and rendered to tokens here, submitted to the least-loaded device's scheduler
(nanochat/batching.py) and its tokens streamed back through an asyncio queue as they arrive. A client that
goes away has its request cancelled, which frees its slot.

/v1 choices: omitted sampling parameters take the server's defaults (-t, -k, -m), not OpenAI's; `top_k`
is accepted as an extension; `stop` strings end a choice at their first occurrence and are cut from its
text; each of `n` choices is its own request with seed `seed + i`; a prompt that leaves no room in the
model's context is a 400 (code context_length_exceeded) and `max_tokens` is capped to the room left.
Log-probabilities (chat's `logprobs`/`top_logprobs`, the completions' `logprobs` and `echo`) are the model's,
before temperature, top-k and top-p (nanochat/batching.py); they cover the tokens of the text returned (a
stop string's are cut with it), and a stream sends each token's with the first chunk that shows its text.
A /v1/completions `prompt` is text (BOS is put in front, as in pretraining) or a list of token ids (sent as
they are), or a batch of either: prompt i's n choices are choices i * n ... i * n + n - 1, as OpenAI numbers
them. The reply ends at max_tokens, a stop string, BOS or <|assistant_end|>.
Errors are {"error": {"message", "type", "param", "code"}}: 400 invalid_request_error (also for bad JSON
and schema errors, which FastAPI would answer with 422), 404 model_not_found, 429 queue_full, 503.

Bounded requests, on both APIs: http_protocol's time limit on headers and BoundedBody's on bodies (408) and
their size (413), the size limits of nanochat/api_schemas.py, and --max-queue requests waiting per device
beyond its free slots (429 beyond). Every error, the ones for malformed input (HTTP included) too, is a JSON
body (input echoed in it made JSON-safe); errors before a request's path is known are {"detail": ...}.
"""

import asyncio
import functools
import hmac
import json
import logging
import math
import os
import random
import re
import socket
import threading
import time
import uuid
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import nanochat
from nanochat.api_schemas import (SAMPLING_LIMITS, APIError, ChatRequest, OpenAIChatRequest,
                                  OpenAICompletionRequest, completion_prompts, openai_stops,
                                  openai_turns, requested_logprobs, validate_chat_request)
from nanochat.batching import BatchScheduler, QueueFull, SamplingParams
from nanochat.chat_text import ReplyText
from nanochat.checkpoint_manager import find_largest_model, get_checkpoints_dir, load_model
from nanochat.common import BadSettingError, autodetect_device_type
from nanochat.tokenizer import StreamDecoder, fit_chat_prompt, prompt_budget, render_chat_prompt

logger = logging.getLogger(__name__)

UI_DIR = os.path.dirname(os.path.abspath(nanochat.__file__))  # ui.html and logo.svg live in the package


@dataclass
class ServerConfig:
    """What scripts/chat_web.py's flags set; the defaults are the flags' defaults."""
    num_gpus: int = 1  # one scheduler per GPU (cuda only)
    source: str = "sft"  # checkpoint family
    temperature: float = 0.8  # defaults for requests that leave them out
    top_k: int = 50  # 0 = no filtering
    max_tokens: int = 512
    model_tag: str | None = None  # None: the largest model
    step: int | None = None  # None: the last
    port: int = 8000
    device_type: str = ""  # empty: autodetect
    host: str = "0.0.0.0"
    max_batch_size: int = 8  # sequences decoded together per device
    batch_invariant: bool = False  # decode every slot: a reply's bits do not depend on its neighbours
    max_queue: int = 64  # requests waiting per device beyond its free slots, before 429
    max_body_bytes: int = 1 << 20  # 1 MiB: the largest valid conversation (32000 characters) fits many times
    body_timeout: float = 30.0  # seconds to receive a request's headers, and again its whole body
    log_conversations: bool = False  # every conversation in full, as the reference did
    api_key: str | None = None  # required as `Authorization: Bearer KEY` on the API; None: NANOCHAT_API_KEY

    def __post_init__(self):
        """ValueError naming the flag of the first value out of range."""
        for name, (low, high) in SAMPLING_LIMITS.items():  # the defaults obey the requests' limits
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"--{name.replace('_', '-')} must be in [{low}, {high}], "
                                 f"got {getattr(self, name)}")
        if self.num_gpus < 1 or self.max_batch_size < 1 or self.max_queue < 0:
            raise ValueError("--num-gpus and --max-batch-size must be >= 1, --max-queue >= 0")
        if self.max_body_bytes < 1 or not self.body_timeout > 0:
            raise ValueError(f"--max-body-bytes must be >= 1 and --body-timeout > 0, "
                             f"got {self.max_body_bytes}, {self.body_timeout}")
        if self.num_gpus > 1 and self.device_type not in ("", "cuda"):
            raise ValueError(f"--num-gpus {self.num_gpus} needs CUDA, got --device-type {self.device_type}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in [0, 65535], got {self.port}")


def check_listening_address(host, port):
    """BadSettingError when host:port cannot be listened on (a port in use, an address not this machine's),
    found before the model loads rather than after it, in uvicorn's log. Bound as uvicorn binds
    (SO_REUSEADDR)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise BadSettingError(f"cannot listen on {host}:{port} ({e.strerror or e}). Fix: pass another --port "
                              f"(or --host), or stop what is listening there") from None


# -----------------------------------------------------------------------------
# Workers: one scheduler per device

@dataclass
class Worker:
    """One device with its model replica behind a continuous-batching scheduler."""
    gpu_id: int
    device: torch.device
    scheduler: BatchScheduler
    tokenizer: object
    context_len: int  # the model's sequence_len: prompt + reply must fit in it

    def num_requests(self):
        stats = self.scheduler.stats()
        return stats["active"] + stats["queued"]


def worker_devices(device_type, num_gpus):
    if device_type != "cuda":
        if num_gpus > 1:
            raise BadSettingError(f"--num-gpus {num_gpus} needs CUDA, but the device type is {device_type}; "
                                  f"serve on one device with -n 1")
        return [torch.device(device_type)]
    if torch.cuda.device_count() == 0:
        raise BadSettingError("--device-type cuda, but no CUDA device is visible here. Fix: pass "
                              "--device-type cpu, or leave it out to use the best device there is")
    if num_gpus > torch.cuda.device_count():
        raise BadSettingError(f"--num-gpus {num_gpus} but only {torch.cuda.device_count()} CUDA devices "
                              f"are visible; pass -n {torch.cuda.device_count()} or fewer")
    return [torch.device("cuda", i) for i in range(num_gpus)]


@dataclass
class WorkerPool:
    """The workers of the server: one batching scheduler per device, requests routed to the least loaded."""
    workers: list
    model_id: str  # "nanochat-<source>-<tag>", the name /v1 clients use

    @classmethod
    def load(cls, config):
        """Load the checkpoint on every device and start a scheduler for each."""
        devices = worker_devices(config.device_type or autodetect_device_type(), config.num_gpus)
        # resolve the tag once, so every device loads the same checkpoint
        tag = config.model_tag or find_largest_model(get_checkpoints_dir(config.source))
        print(f"Initializing worker pool with {len(devices)} GPUs...")
        pool = cls([], f"nanochat-{config.source}-{tag}")
        try:
            for gpu_id, device in enumerate(devices):
                print(f"Loading model on {f'GPU {gpu_id}' if device.type == 'cuda' else device}...")
                model, tokenizer, _ = load_model(config.source, device, phase="eval", model_tag=tag,
                                                 step=config.step)
                scheduler = BatchScheduler(model, tokenizer, max_batch_size=config.max_batch_size,
                                           max_queue=config.max_queue, fixed_width=config.batch_invariant)
                scheduler.start()
                pool.workers.append(Worker(gpu_id, device, scheduler, tokenizer, model.config.sequence_len))
        except BaseException:
            pool.shutdown()  # the schedulers already started
            raise
        print(f"All {len(pool.workers)} workers initialized!")
        return pool

    def least_loaded(self):
        return min(self.workers, key=Worker.num_requests)

    def shutdown(self):
        for worker in self.workers:
            worker.scheduler.shutdown()


# -----------------------------------------------------------------------------
# Errors

def json_safe(value):
    """value (made of JSON types: the error bodies below, jsonable_encoder's output) with what JSON cannot
    carry made printable: NaN and infinities (echoed input such as max_tokens=NaN) become strings, lone
    surrogates ("\\ud800") their escaped text."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value  # None, bool, int, finite float


class SafeJSONResponse(JSONResponse):
    """A JSONResponse that cannot fail to encode (see json_safe): an error about bad input must not itself
    become a 500."""

    def render(self, content):
        return super().render(json_safe(content))


def error_response(path, status, message, headers=None, **openai_fields):
    """The error body each API uses: OpenAI's {"error": {message, type, param, code}} on /v1 (openai_fields
    set the last three), {"detail": message} on the reference endpoints. 429 and 503 say when to retry."""
    if status in (429, 503):
        headers = {"Retry-After": "1", **(headers or {})}
    body = {"detail": message}
    if path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": None,
                          **openai_fields}}
    return SafeJSONResponse(body, status_code=status, headers=headers)


async def on_api_error(request, exc):
    return error_response(request.url.path, exc.status, exc.message, param=exc.param, code=exc.code,
                          type=exc.type)


def error_param(loc):
    """pydantic's ("body", "messages", 0, "role") as OpenAI's "messages[0].role". A union member's label
    ("str" in ("body", "stop", "str")) is not part of the name."""
    param = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part):
            break
        param += f"[{part}]" if isinstance(part, int) else (f".{part}" if param else str(part))
    return param or None


async def on_validation_error(request, exc):
    # the reference endpoint keeps FastAPI's 422 body, made JSON-safe: the input it echoes may be NaN or
    # hold a lone surrogate, which FastAPI's own handler fails to encode (a plain-text 500)
    path = request.url.path
    if not path.startswith("/v1/"):
        return SafeJSONResponse({"detail": jsonable_encoder(exc.errors())}, status_code=422)
    # /v1 answers 400 like OpenAI
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return error_response(path, 400, f"The request body is not valid JSON: {reason}")
    param = error_param(error["loc"])
    return error_response(path, 400, f"Invalid request: {param or 'body'}: {error['msg']}", param=param)


async def on_unexpected_error(request, exc):
    # a bug, not the client's fault: still a JSON body that says so (the traceback goes to the log)
    return error_response(request.url.path, 500, "Internal server error", type="server_error")


async def on_http_error(request, exc):  # unknown paths and methods, a missing UI file
    return error_response(request.url.path, exc.status_code, exc.detail, headers=exc.headers)


def required_api_key(config):
    """The key clients must send; None: no key needed."""
    return config.api_key or os.environ.get("NANOCHAT_API_KEY") or None


def is_protected_path(path):
    return path.startswith("/v1/") or path in ("/chat/completions", "/stats")


class RequireApiKey:
    """
    ASGI middleware: the API routes (is_protected_path) answer 401 unless the request carries
    `Authorization: Bearer <key>`. It runs before the body is read, so a client without the key cannot make
    the server buffer a body. The key is compared in constant time.
    """

    def __init__(self, app, key):
        self.app, self.key = app, key.encode("utf-8")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not is_protected_path(scope["path"]):
            return await self.app(scope, receive, send)
        scheme, _, sent = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(sent.strip(), self.key):
            return await self.app(scope, receive, send)
        message = ("Incorrect API key provided" if scheme else "No API key provided") + \
            ": send the server's key (--api-key) as the header `Authorization: Bearer <key>`"
        response = error_response(scope["path"], 401, message, headers={"WWW-Authenticate": "Bearer"},
                                  code="invalid_api_key")
        await response(scope, receive, send)


class BoundedBody:
    """
    ASGI middleware: an HTTP request's body is read whole before the app sees it, at most max_bytes (413
    beyond, from Content-Length when it is declared) and within timeout seconds (408). Either error closes
    the connection, so the rest of an oversized or half-sent body is never read.
    """

    def __init__(self, app, max_bytes, timeout):
        self.app, self.max_bytes, self.timeout = app, max_bytes, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"").decode("latin-1")
        try:
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise OverflowError(declared)  # refused before any of it is read
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except TimeoutError:
            message = f"The request body was not received within {self.timeout:g} seconds (--body-timeout)"
            return await self._reject(scope, receive, send, 408, message, "request_timeout")
        except OverflowError as size:
            message = (f"The request body ({size} bytes) is larger than this server's limit of "
                       f"{self.max_bytes} bytes (--max-body-bytes)")
            return await self._reject(scope, receive, send, 413, message, "request_too_large")
        if body is None:
            return  # the client went away: nobody to answer
        unread = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():  # the body once, then the real channel (disconnect detection)
            return unread.pop() if unread else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive):
        """The body; None when the client disconnected; OverflowError once it grows past max_bytes."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise OverflowError(f"more than {self.max_bytes}")
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    async def _reject(scope, receive, send, status, message, code):
        response = error_response(scope["path"], status, message, headers={"Connection": "close"}, code=code)
        await response(scope, receive, send)


def closing_reply(status, detail):
    """The raw bytes of a JSON error reply, for a connection closed before a request was read whole."""
    body = json.dumps({"detail": detail}).encode()
    return (b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n"
            b"\r\n%s" % (status.encode(), len(body), body))


def http_protocol(config):
    """
    uvicorn's h11 protocol with a time limit on request headers: a request's headers must arrive within
    config.body_timeout seconds of the connection opening or of the request's first byte, else 408 and the
    connection is closed. uvicorn itself waits for ever, so a client that never finishes its headers holds a
    connection, a file descriptor, and enough such clients lock everyone out. Malformed HTTP gets its 400
    as JSON too (uvicorn's is plain text).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
    timed_out = closing_reply("408 Request Timeout", f"The request headers were not received within "
                                                     f"{config.body_timeout:g} seconds (--body-timeout)")

    class HeaderTimeLimit(H11Protocol):
        timer = None  # set while headers are awaited

        def connection_made(self, transport):
            super().connection_made(transport)
            self.watch_headers()

        def data_received(self, data):
            super().data_received(data)
            self.watch_headers()

        def connection_lost(self, exc):
            self.watch_headers(closing=True)
            super().connection_lost(exc)

        def awaiting_headers(self):
            return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

        def watch_headers(self, closing=False):
            if self.awaiting_headers() and not closing:
                if self.timer is None:
                    self.timer = self.loop.call_later(config.body_timeout, self.headers_timed_out)
            elif self.timer is not None:
                self.timer.cancel()
                self.timer = None

        def headers_timed_out(self):
            self.timer = None
            if self.awaiting_headers():
                self.transport.write(timed_out)
                self.transport.close()

        def send_400_response(self, msg):  # uvicorn's answer to what h11 cannot parse
            self.transport.write(closing_reply("400 Bad Request", msg))
            self.transport.close()

    return HeaderTimeLimit


# -----------------------------------------------------------------------------
# Generation: scheduler events -> text

@dataclass
class Choice:
    """One reply being generated: its text (after the echoed prompt, when asked for), its token count, the
    log-probabilities (when asked for) and why it ended."""
    text: ReplyText
    tokens: int = 0
    finish_reason: str | None = None
    # per token so far: (token id, log p, ((id, log p), ...) the likeliest, the characters before its own)
    logprobs: list | None = None
    echo: int | None = None  # the prompt comes first, less its first `echo` tokens (the BOS put before text)
    echoed: str = ""  # the prompt's text, once shown
    reported: int = 0  # how many of logprobs a stream has sent

    def apply(self, event, request):
        """Take one scheduler event of the choice's request, still running; returns the text it releases."""
        delta = self.show_prompt(request) if self.echo is not None else ""
        if event.token_id is not None:
            self.tokens += 1
            delta += self.text.add(event.token_id)
            if event.logprobs is not None:
                offset = len(self.echoed) + self.text.decoder.token_start
                self.logprobs.append((event.token_id, *event.logprobs, offset))
        if self.text.stopped:
            self.finish_reason = "stop"
        elif event.finish_reason is not None:
            delta += self.text.finish()
            self.finish_reason = event.finish_reason
        return delta

    def show_prompt(self, request):
        """The echoed prompt's text (its log-probabilities into logprobs), once, at the request's first event:
        the scheduler has set its prompt_logprobs by then. The first token has none (nothing precedes it).
        Decoded token by token, so that each token's offset counts the whole characters before it."""
        prompt = request.prompt_tokens[self.echo:]
        decoder, pieces, offsets = StreamDecoder(self.text.decoder.tokenizer), [], []
        for token in prompt:
            pieces.append(decoder.add(token))
            offsets.append(decoder.token_start)
        if self.logprobs is not None and request.prompt_logprobs is not None:
            self.logprobs += [(token, *(entry or (None, None)), offset) for token, entry, offset
                              in zip(prompt, request.prompt_logprobs[self.echo:], offsets)]
        self.echo, self.echoed = None, "".join(pieces) + decoder.finish()
        return self.echoed

    def shown_logprobs(self, start=0):
        """The log-probabilities of the text shown so far (a token's once its first character is), from entry
        `start` on, as OpenAI reports those of the returned text only: at the end all of them, less those of
        a stop string and after it (their text is cut). None when none were asked for."""
        if self.logprobs is None or (self.finish_reason is not None and not self.text.stopped):
            return None if self.logprobs is None else self.logprobs[start:]
        shown, end = len(self.echoed) + len(self.text.text), start
        while end < len(self.logprobs) and self.logprobs[end][-1] < shown:  # offsets only grow
            end += 1
        return self.logprobs[start:end]

    def unreported_logprobs(self):
        """The shown log-probabilities a stream has not sent yet (None when none were asked for): a scan from
        the last one sent, so a long stream's chunks cost what they add, not what came before."""
        new = self.shown_logprobs(self.reported)
        self.reported += len(new or ())
        return new


def token_text(tokenizer, token_id):
    """A token's text; one that is not whole UTF-8 reads U+FFFD (chat's logprobs also give its bytes)."""
    return tokenizer.decode_single_token_bytes(token_id).decode("utf-8", errors="replace")


def format_logprobs(tokenizer, entries, chat):
    """OpenAI's `logprobs` of a choice (or of a chunk's tokens): chat's content list (each token's text,
    log-probability, UTF-8 bytes and likeliest tokens), or the completions' parallel lists, whose text_offset
    is where each token starts in the choice's text: the whole characters decoded before it (a token inside a
    character starts where that character does)."""
    def entry(token_id, logprob):
        raw = tokenizer.decode_single_token_bytes(token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    def by_text(top, chosen):
        """The likeliest tokens, then the chosen one, as OpenAI always gives it (up to logprobs + 1 tokens).
        Tokens that read the same (U+FFFD) share a key: the likeliest, first in top, keeps it."""
        found = {}
        for token_id, logprob in (*top, chosen):
            found.setdefault(token_text(tokenizer, token_id), logprob)
        return found

    if chat:
        return {"content": [{**entry(token, logprob), "top_logprobs": [entry(*pair) for pair in top]}
                            for token, logprob, top, _ in entries], "refusal": None}
    return {"tokens": [token_text(tokenizer, token) for token, _, _, _ in entries],
            "token_logprobs": [logprob for _, logprob, _, _ in entries],
            "top_logprobs": [None if top is None else by_text(top, (token, logprob))
                             for token, logprob, top, _ in entries],
            "text_offset": [offset for _, _, _, offset in entries]}


@dataclass
class Generation:
    """The scheduler requests behind one HTTP request (one per choice, one worker); events share one queue."""
    worker: Worker
    prompt_tokens: int
    choices: list
    requests: list = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))
    started: float = field(default_factory=time.perf_counter)

    def completion_tokens(self):
        return sum(choice.tokens for choice in self.choices)

    def usage(self):
        completion = self.completion_tokens()
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def cancel(self):
        for request in self.requests:
            request.cancel()

    async def deltas(self):
        """(choice index, text delta) as events arrive, until every choice has ended; cancels what still
        runs if the consumer stops early (a client that went away): consume it in contextlib.aclosing, so
        that happens when the consumer stops, not when the garbage collector finalises the generator."""
        running = set(range(len(self.choices)))
        try:
            while running:
                index, event = await self.events.get()
                if index not in running:  # e.g. the "cancelled" that follows a stop string
                    continue
                choice = self.choices[index]
                delta = choice.apply(event, self.requests[index])
                if choice.finish_reason is not None:
                    running.discard(index)
                    self.requests[index].cancel()  # frees the slot now when a stop string ended the reply
                yield index, delta
        finally:
            self.cancel()


def sampling_params(body, config, max_tokens):
    """SamplingParams for each choice, one per entry of max_tokens, choice i seeded seed + i (n, seed and
    top_p are OpenAI's; the reference's requests have one choice and a random seed). Omitted values take the
    server's defaults."""
    temperature = body.temperature if body.temperature is not None else config.temperature
    top_k = body.top_k if body.top_k is not None else config.top_k  # the sampler takes 0 (top_p 1) as off
    top_p = getattr(body, "top_p", None)
    seed = getattr(body, "seed", None)
    seed = seed if seed is not None else random.randint(0, 2**31 - 1)
    logprobs = requested_logprobs(body)
    echo_logprobs = bool(getattr(body, "echo", None)) and logprobs is not None
    return [SamplingParams(max_tokens=limit, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=(seed + i) % 2**63, logprobs=logprobs, echo_logprobs=echo_logprobs)
            for i, limit in enumerate(max_tokens)]


def echo_from(body):
    """None (no echo), or how many of the prompt's first tokens the echo leaves out: the echo is the prompt
    as sent, so without the BOS put before a text prompt."""
    if not getattr(body, "echo", None):
        return None
    return int(isinstance(body.prompt[0] if isinstance(body.prompt, list) else body.prompt, str))


def start_generation(request, worker, prompts, body, max_tokens=None, stops=()):
    """
    Submit the rendered prompts to the worker's scheduler, one request per choice: each prompt is continued
    by the body's n choices (choice i * n + j continues prompt i, as OpenAI numbers them), with max_tokens
    (None: the server's default) capped to the room its prompt leaves in the context. APIError when a prompt
    leaves no room or the scheduler cannot take the requests.
    """
    text_completion = isinstance(body, OpenAICompletionRequest)
    prompt_param, id_prefix = ("prompt", "cmpl") if text_completion else ("messages", "chatcmpl")
    for i, prompt in enumerate(prompts):
        if len(prompt) >= worker.context_len:
            named = "prompt takes" if text_completion else "messages take"
            named = f"prompt[{i}] takes" if len(prompts) > 1 else named
            raise APIError(400, f"This model's maximum context length is {worker.context_len} tokens, but "
                                f"the {named} {len(prompt)} tokens", prompt_param,
                           code="context_length_exceeded")
    config = request.app.state.config
    n = getattr(body, "n", None) or 1
    jobs = [prompt for prompt in prompts for _ in range(n)]
    limit = max_tokens or config.max_tokens
    params_list = sampling_params(body, config, [min(limit, worker.context_len - len(p)) for p in jobs])
    capacity = worker.scheduler.max_batch_size + worker.scheduler.max_queue
    if len(jobs) > capacity:  # a 429 would have the client retry what can never be served
        param = "n" if len(prompts) == 1 else "prompt"
        raise APIError(400, f"Invalid value for '{param}': {len(jobs)} choices are more than this server "
                            f"can hold at once ({capacity}: --max-batch-size + --max-queue)", param)
    loop = asyncio.get_running_loop()
    choices = [Choice(ReplyText(worker.tokenizer, stops), logprobs=None if p.logprobs is None else [],
                      echo=echo_from(body)) for p in params_list]
    generation = Generation(worker, sum(map(len, prompts)), choices, id=f"{id_prefix}-{uuid.uuid4().hex}")

    def forward_to_loop(index, event):  # runs on the scheduler thread
        try:
            loop.call_soon_threadsafe(generation.events.put_nowait, (index, event))
        except RuntimeError:  # the event loop is closed: the server is going down
            pass

    try:
        for index, (prompt, params) in enumerate(zip(jobs, params_list)):
            on_event = functools.partial(forward_to_loop, index)
            generation.requests.append(worker.scheduler.submit(prompt, params, on_event=on_event))
    except Exception as e:
        generation.cancel()  # the choices already submitted must not run on with nobody reading them
        if not isinstance(e, QueueFull):
            raise  # a bug: the request schemas and the room check exclude submit's ValueErrors (a JSON 500)
        raise APIError(429, "The server is busy: its request queue is full. Retry shortly.",
                       code="queue_full", type="rate_limit_error")
    return generation


def get_pool(request, model_id=None):
    """The pool (503 while the server loads or stops), once model_id (None: any) is the one served (404)."""
    pool = request.app.state.pool
    if pool is None:
        raise APIError(503, "The server is not ready (loading or shutting down)", code="unavailable",
                       type="server_error")
    if model_id is not None and model_id != pool.model_id:
        raise APIError(404, f"The model '{model_id}' does not exist (this server has '{pool.model_id}')",
                       "model", code="model_not_found")
    return pool


def sse(payload):
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A server-sent event stream that always closes its generator, so a client that went away cancels its
    generation at once rather than whenever the abandoned generator is garbage collected."""
    media_type = "text/event-stream"

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def log_generation(generation, num_messages):
    reasons = ",".join(str(choice.finish_reason) for choice in generation.choices)
    logger.info(f"{generation.id} gpu {generation.worker.gpu_id}: {num_messages} messages, "
                f"{generation.prompt_tokens} prompt tokens -> {generation.completion_tokens()} tokens "
                f"({reasons}) in {time.perf_counter() - generation.started:.2f}s")


# -----------------------------------------------------------------------------
# The reference endpoints

def read_ui_file(name):
    path = os.path.join(UI_DIR, name)
    if not os.path.exists(path):
        raise HTTPException(status_code=404, detail=f"{name} is missing from the nanochat package ({path})")
    with open(path, "rb") as f:
        return f.read()


async def root():
    html = read_ui_file("ui.html").decode("utf-8")
    # the reference points the page at this server (same origin), whatever API_URL it was saved with
    html = re.sub(r"const API_URL = [^;\n]*;", "const API_URL = '';", html, count=1)
    return HTMLResponse(html)


async def logo():
    return Response(read_ui_file("logo.svg"), media_type="image/svg+xml")


def serving_workers(request):
    """The workers (none while the server loads or stops) and how many of them have a free slot."""
    pool = request.app.state.pool
    workers = pool.workers if pool is not None else []
    return workers, sum(worker.num_requests() < worker.scheduler.max_batch_size for worker in workers)


async def health(request: Request):
    workers, available = serving_workers(request)
    loads = [worker.scheduler.stats() for worker in workers]
    return {"status": "ok", "ready": bool(workers), "num_gpus": len(workers), "available_workers": available,
            "active": sum(s["active"] for s in loads), "queued": sum(s["queued"] for s in loads)}


async def stats(request: Request):
    workers, available = serving_workers(request)
    return {"total_workers": len(workers), "available_workers": available,
            "busy_workers": len(workers) - available,
            "workers": [{"gpu_id": w.gpu_id, "device": str(w.device), **w.scheduler.stats()}
                        for w in workers]}


async def chat_completions(body: ChatRequest, request: Request):
    """The reference's streaming endpoint, used by the UI."""
    validate_chat_request(body)
    config = request.app.state.config
    worker = get_pool(request).least_loaded()
    if config.log_conversations:
        conversation = "".join(f"\n[{m.role.upper()}]: {m.content}" for m in body.messages)
        logger.info("=" * 20 + conversation + "\n" + "-" * 20)
    # long conversations lose their oldest turns
    budget = prompt_budget(worker.context_len, body.max_tokens or config.max_tokens)
    prompt, _ = fit_chat_prompt(worker.tokenizer, [(m.role, m.content) for m in body.messages], budget)
    generation = start_generation(request, worker, [prompt], body, body.max_tokens)
    return EventStream(reference_stream(generation, len(body.messages), config.log_conversations))


async def reference_stream(generation, num_messages, log_conversation):
    """data: {"token": <text>, "gpu": <id>} per piece of text, then data: {"done": true}."""
    gpu_id = generation.worker.gpu_id
    try:
        async with aclosing(generation.deltas()) as deltas:
            async for _, delta in deltas:
                if delta:
                    yield sse({"token": delta, "gpu": gpu_id})
        if generation.choices[0].finish_reason == "error":
            yield sse({"error": "Generation failed on the server"})  # the client learns why the stream ended
        yield sse({"done": True})
    finally:
        log_generation(generation, num_messages)
        if log_conversation:
            logger.info(f"[ASSISTANT] (GPU {gpu_id}): {generation.choices[0].text.text}\n" + "=" * 20)


# -----------------------------------------------------------------------------
# The OpenAI endpoints

def model_card(pool):
    return {"id": pool.model_id, "object": "model", "created": 0, "owned_by": "nanochat"}


async def list_models(request: Request):
    return {"object": "list", "data": [model_card(get_pool(request))]}


async def retrieve_model(model_id: str, request: Request):
    return model_card(get_pool(request, model_id))


async def openai_chat_completions(body: OpenAIChatRequest, request: Request):
    return await openai_reply(request, body)


async def openai_completions(body: OpenAICompletionRequest, request: Request):
    return await openai_reply(request, body)


async def openai_reply(request, body):
    """Both OpenAI endpoints: a chat completion (the body has messages) or a text completion (the prompt
    continued: text as a base model reads it, BOS first, or token ids as sent), streamed as SSE chunks or
    answered whole."""
    pool = get_pool(request, body.model)
    worker = pool.least_loaded()
    chat = isinstance(body, OpenAIChatRequest)
    if chat:
        prompts = [render_chat_prompt(worker.tokenizer, *openai_turns(body.messages))]
    else:
        prompts = completion_prompts(worker.tokenizer, body.prompt)
    max_tokens = (body.max_completion_tokens if chat else None) or body.max_tokens
    generation = start_generation(request, worker, prompts, body, max_tokens, openai_stops(body))
    num_messages = len(body.messages) if chat else 1
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return EventStream(openai_stream(generation, pool.model_id, usage, num_messages, chat))
    await collect(generation, request)
    log_generation(generation, num_messages)
    if any(choice.finish_reason == "error" for choice in generation.choices):
        raise APIError(500, "Generation failed on the server", type="server_error")
    choices = []
    for index, choice in enumerate(generation.choices):
        text = choice.echoed + choice.text.text
        reply = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        entries = choice.shown_logprobs()
        logprobs = None if entries is None else format_logprobs(worker.tokenizer, entries, chat)
        choices.append({"index": index, **reply, "logprobs": logprobs, "finish_reason": choice.finish_reason})
    return {"id": generation.id, "object": "chat.completion" if chat else "text_completion",
            "created": generation.created, "model": pool.model_id, "choices": choices,
            "usage": generation.usage()}


async def collect(generation, request):
    """Run a non-streaming generation to its end; cancel it if the client goes away meanwhile."""
    async def cancel_on_disconnect():
        while not await request.is_disconnected():
            await asyncio.sleep(0.25)  # polling: there is no event to wait on before the response starts
        generation.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        async with aclosing(generation.deltas()) as deltas:
            async for index, _ in deltas:
                if generation.choices[index].finish_reason == "error":
                    break  # the reply is a 500 now: closing deltas stops the other choices
    finally:
        watcher.cancel()


async def openai_stream(generation, model_id, include_usage, num_messages, chat):
    """chat.completion.chunk events: a role chunk per choice, content deltas, a finish chunk per choice,
    the usage chunk when asked for, then [DONE]. A text completion (chat False) has text_completion events,
    with no role chunk and {"text": delta} in place of {"delta": {"content": delta}}."""
    def chunk(choices, usage=None):
        payload = {"id": generation.id, "object": "chat.completion.chunk" if chat else "text_completion",
                   "created": generation.created, "model": model_id, "choices": choices}
        return sse({**payload, "usage": usage} if include_usage else payload)

    def choice(index, text, finish_reason):
        new, logprobs = generation.choices[index].unreported_logprobs(), None
        if new is not None and (text or new):  # a chunk with text has its (maybe empty) logprobs
            logprobs = format_logprobs(generation.worker.tokenizer, new, chat)
        shown = {"delta": {"content": text} if text else {}} if chat else {"text": text or ""}
        return {"index": index, **shown, "logprobs": logprobs, "finish_reason": finish_reason}

    try:
        for index in range(len(generation.choices) if chat else 0):
            role = {"role": "assistant", "content": ""}
            yield chunk([{"index": index, "delta": role, "logprobs": None, "finish_reason": None}])
        async with aclosing(generation.deltas()) as deltas:
            async for index, delta in deltas:
                finish_reason = generation.choices[index].finish_reason
                if finish_reason == "error":
                    yield sse({"error": {"message": "Generation failed on the server", "type": "server_error",
                                         "param": None, "code": None}})
                    return
                if delta:
                    yield chunk([choice(index, delta, None)])
                if finish_reason is not None:
                    yield chunk([choice(index, None, finish_reason)])
        if include_usage:
            yield chunk([], usage=generation.usage())
        yield "data: [DONE]\n\n"
    finally:
        log_generation(generation, num_messages)


# -----------------------------------------------------------------------------
# The application

# Every status a route answers besides 200, for the OpenAPI document (/openapi.json): clients and fuzzers
# generated from it check each response's status and content type against it
ERRORS = {400: "The request is invalid; the body says which field and why",
          401: "The server has an --api-key and the request did not send it",
          404: "No such model, or a file of the page is missing", 408: "The body took over --body-timeout",
          413: "The body is over --max-body-bytes", 422: "The body does not fit the schema",
          429: "The request queue is full; retry after Retry-After seconds",
          500: "The generation failed", 503: "The server is loading or stopping; retry after Retry-After"}


def responses(*statuses, body=None):
    """OpenAPI responses: each status in `statuses` with a JSON error body, and 200 as `body` (a media
    type; JSON by default)."""
    documented = {status: {"description": ERRORS[status], "content": {"application/json": {}}}
                  for status in statuses}
    if body is not None:
        documented[200] = {"description": "Successful Response", "content": {body: {}}}
    return documented


OPENAI_GENERATION = responses(400, 401, 404, 408, 413, 429, 500, 503, body="text/event-stream")  # or JSON
ROUTES = [("GET", "/", root, responses(404)),
          ("GET", "/logo.svg", logo, responses(404, body="image/svg+xml")),
          ("GET", "/health", health, {}), ("GET", "/stats", stats, responses(401)),
          ("POST", "/chat/completions", chat_completions,
           responses(400, 401, 408, 413, 422, 429, 503, body="text/event-stream")),
          ("GET", "/v1/models", list_models, responses(401, 503)),
          ("GET", "/v1/models/{model_id:path}", retrieve_model, responses(401, 404, 503)),
          ("POST", "/v1/chat/completions", openai_chat_completions, OPENAI_GENERATION),
          ("POST", "/v1/completions", openai_completions, OPENAI_GENERATION)]


@asynccontextmanager
async def lifespan(app):
    config = app.state.config
    print("Loading nanochat models across GPUs...")
    try:
        app.state.pool = WorkerPool.load(config)
    except Exception as e:
        app.state.startup_error = e  # uvicorn logs it, then ends with its own line: main() repeats it last
        raise
    print(f"Server ready at http://localhost:{config.port}")
    try:
        yield
    finally:
        stop_serving(app)


def stop_serving(app):
    """New requests get 503; the ones in flight end now with "cancelled" (a stream gets its last event)."""
    pool, app.state.pool = app.state.pool, None
    if pool is not None:
        pool.shutdown()


def create_app(config):
    """The FastAPI app for a ServerConfig; models load when it starts (lifespan), not here."""
    app = FastAPI(title="nanochat", lifespan=lifespan, exception_handlers={
        APIError: on_api_error, RequestValidationError: on_validation_error,
        StarletteHTTPException: on_http_error, Exception: on_unexpected_error})
    app.state.config, app.state.pool, app.state.startup_error = config, None, None
    app.add_middleware(BoundedBody, max_bytes=config.max_body_bytes, timeout=config.body_timeout)
    api_key = required_api_key(config)
    if api_key is not None:  # outside BoundedBody: a request without the key is refused before its body
        app.add_middleware(RequireApiKey, key=api_key)
    # added last, so outermost: the errors above carry CORS headers too. No cookies are used, so no
    # credentials (browsers refuse credentials with origin *); the API key is a header, not a credential
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])
    for method, path, endpoint, documented in ROUTES:
        app.add_api_route(path, endpoint, methods=[method], responses=documented,
                          response_class=HTMLResponse if path == "/" else JSONResponse)
    return app


# Seconds uvicorn's shutdown waits for open connections before it cancels their tasks. Unbounded by default:
# a client that stops reading a stream (its socket buffers full) or sends its body slowly would hold the
# process up. The replies in flight end at the start of the shutdown, so well-behaved clients are done by then
SHUTDOWN_GRACE = 3


def uvicorn_server(app, **settings):
    """A uvicorn.Server for app (uvicorn.Config settings) that stops serving when its shutdown starts (a
    signal, should_exit): uvicorn waits for open connections to close (at most SHUTDOWN_GRACE) before the
    lifespan shutdown, so a long reply would otherwise keep the server up until its last token."""
    import uvicorn

    class StopServingFirst(uvicorn.Server):
        async def shutdown(self, sockets=None):
            stop_serving(app)  # joins the decode threads, whose events never wait on this loop
            await super().shutdown(sockets)

    return StopServingFirst(uvicorn.Config(app, http=http_protocol(app.state.config),
                                           timeout_graceful_shutdown=SHUTDOWN_GRACE, **settings))


def serve_in_thread(app, host="127.0.0.1", port=0, timeout=120):
    """
    Run app with uvicorn in a daemon thread (tests, benchmarks); returns (server, thread, port) once it is
    ready. port 0 picks a free one. Stop it with `server.should_exit = True; thread.join()`.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    app.state.config.port = sock.getsockname()[1]  # for the start-up message
    server = uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(timeout=10)
            sock.close()  # the port is free again for a retry
            raise RuntimeError("The server did not start (see the log above for the reason)")
        time.sleep(0.05)
    return server, thread, sock.getsockname()[1]

