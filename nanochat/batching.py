"""
Continuous batching for serving: many independent requests share one model on one device.

A BatchScheduler owns a fixed set of max_batch_size slots, i.e. the rows of one KVCache. Its decode
thread repeats one step:
1. end the slots whose request was cancelled;
2. admit queued requests into free slots: the prompt is prefilled at batch 1 (exactly as the Engine does),
   its cache copied into the slot's row, and the first token sampled from the prefill logits;
3. one batched forward over the rows up to the last busy slot (one token per row, each row at its own
   position, ragged rows attending in one masked call);
4. per slot: sample with the request's own params and torch.Generator, run the tool state machine
   (shared with the Engine), deliver a TokenEvent, free the slot when the request ends.
One device sync per step: the sampled ids (with each row's is-it-samplable flag); a request that asks for
log-probabilities adds its own.

The batch width follows the load, so a lone request costs what it costs on a 1-slot server. The price: on
CPU a matmul row's bits depend on the matrix shape, so a request's numbers depend on the batch around it.
fixed_width=True (chat_web --batch-invariant) decodes every slot (free ones on a dummy token) over the whole
cache capacity: a request's logits are then bit for bit the same whichever requests share the batch.

Event protocol, per request: zero or more TokenEvent(token_id, mask, None), then exactly one final event.
- "length": max_tokens reached; the final event carries the last token (token_id not None).
- "stop": <|assistant_end|>, BOS or one of stop_token_ids was produced; that token is not delivered:
  the final event is TokenEvent(None, 0, "stop").
- "cancelled" (cancel() or shutdown()) and "error" (the model raised, or this request's logits were not
  finite or could not be sampled): TokenEvent(None, 0, reason).
With params.logprobs = k, every event with a token carries its log-probability and the k likeliest tokens'
(token_logprobs); with params.echo_logprobs, request.prompt_logprobs holds the prompt's before its first
event.
Log-probabilities are the model's (log-softmax of its logits in fp32, floored at -9999 as OpenAI reports
impossible tokens), before temperature, top-k and top-p: what the model believes, whatever the sampling.

A request's numerical trouble stays that request's: temperatures below sampling.TEMPERATURE_EPSILON decode
greedily, top_p always keeps the top token, and a row whose logits are not finite (or whose sampling raises)
ends alone with "error" while the other rows go on exactly as they would have without it.
"""

import logging
import queue
import threading
import uuid
from collections import deque
from dataclasses import dataclass

import torch

from nanochat.engine import KVCache, RowState, ToolUse, prefill_prompt
from nanochat.sampling import is_greedy, sample_next_token

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """submit() found every slot taken and max_queue requests already waiting for one."""


@dataclass
class SamplingParams:
    max_tokens: int  # new tokens, forced tool tokens included (as in the Engine)
    temperature: float = 1.0
    top_k: int | None = None  # None or 0: off
    top_p: float | None = None  # None or 1.0: off (nucleus sampling)
    seed: int | None = None  # None: a random seed
    stop_token_ids: tuple = ()  # extra ids that end the request, besides <|assistant_end|> and BOS
    logprobs: int | None = None  # k >= 0: each token's log-probability and the k likeliest ones' (None: off)
    echo_logprobs: bool = False  # also the prompt's (with logprobs set), into request.prompt_logprobs


@dataclass
class TokenEvent:
    token_id: int | None  # None only on a final event that carries no token
    mask: int  # 1 sampled, 0 forced by the tool (and 0 on a final event without a token)
    finish_reason: str | None  # None while streaming, else "stop" | "length" | "cancelled" | "error"
    logprobs: tuple | None = None  # (log p of token_id, ((id, log p) of the k likeliest)) when asked for


def token_logprobs(logits, tokens, k):
    """For each row of logits (N, V) and its token (N,): (log p of the token, ((id, log p) of the k likeliest
    tokens, likeliest first)), as Python numbers."""
    logprobs = logits.float().log_softmax(dim=-1).clamp(min=-9999.0)
    chosen = logprobs.gather(1, tokens[:, None].long())[:, 0].tolist()
    top = logprobs.topk(k, dim=-1)
    return [(c, tuple(zip(ids, values))) for c, ids, values in zip(chosen, top.indices.tolist(),
                                                                     top.values.tolist())]


def check_params(params, prompt_len, sequence_len):
    """Raise ValueError naming the first bad field of a request."""
    if prompt_len == 0:
        raise ValueError("prompt_tokens is empty")
    if not isinstance(params.max_tokens, int) or params.max_tokens < 1:
        raise ValueError(f"max_tokens must be an int >= 1, got {params.max_tokens!r}")
    if prompt_len + params.max_tokens > sequence_len:
        raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                         f"model's context of {sequence_len} tokens")
    if not params.temperature >= 0.0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0, got {params.temperature!r}")
    if params.top_k is not None and (not isinstance(params.top_k, int) or params.top_k < 0):
        raise ValueError(f"top_k must be None or an int >= 0, got {params.top_k!r}")
    if params.top_p is not None and not 0.0 < params.top_p <= 1.0:
        raise ValueError(f"top_p must be None or in (0, 1], got {params.top_p!r}")
    if params.seed is not None and not isinstance(params.seed, int):
        raise ValueError(f"seed must be None or an int, got {params.seed!r}")
    if params.logprobs is not None and (not isinstance(params.logprobs, int) or params.logprobs < 0):
        raise ValueError(f"logprobs must be None or an int >= 0, got {params.logprobs!r}")
    if params.echo_logprobs and params.logprobs is None:
        raise ValueError("echo_logprobs needs logprobs (how many likeliest tokens to give with each)")


class GenerationRequest:
    """One submitted prompt. Events go to the on_event callback given to submit(), else into self.events."""

    def __init__(self, prompt_tokens, params, on_event, wake):
        self.id = uuid.uuid4().hex
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.events = queue.SimpleQueue() if on_event is None else None
        self.finish_reason = None  # set together with the final event
        self._on_event = on_event if on_event is not None else self.events.put
        self._cancelled = threading.Event()
        self._wake = wake  # nudges an idle scheduler so a cancelled queued request ends promptly
        # decode-thread state
        self.prompt_logprobs = None  # with params.echo_logprobs: None, then token_logprobs of tokens 1..
        self._row = None  # RowState: prompt + delivered tokens (the last is the next input), the tool state
        self._rng = None
        self._stop_ids = frozenset()

    def cancel(self):
        """Thread-safe. The request ends with a "cancelled" event at the scheduler's next step boundary."""
        self._cancelled.set()
        self._wake()

    @property
    def cancelled(self):
        return self._cancelled.is_set()


class BatchScheduler:
    """Continuous batching of GenerationRequests over one model (see the module docstring)."""

    def __init__(self, model, tokenizer, max_batch_size=8, max_queue=64, fixed_width=False):
        if max_batch_size < 1 or max_queue < 0:
            raise ValueError(f"need max_batch_size >= 1 and max_queue >= 0, "
                             f"got {max_batch_size}, {max_queue}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.fixed_width = fixed_width
        self.device = model.get_device()
        self.tools = ToolUse(tokenizer)
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue = deque()  # waiting requests, guarded by _lock
        self._stopping = False
        self._thread = None
        self._completed = 0
        self._tokens_generated = 0
        # decode-thread state: one request (or None) per slot; the cache keeps each row's position
        self._slots = [None] * max_batch_size
        # one cache row per slot, sized for the longest request submit() accepts
        cfg = model.config
        self._cache = KVCache.for_model(cfg, max_batch_size, cfg.sequence_len, self.device)
        self._cache.batch_invariant = fixed_width

    # ------------------------------------------------------------------
    # Public API (any thread)

    def start(self):
        """Start the background decode thread (a daemon)."""
        with self._lock:
            if self._stopping:
                raise RuntimeError("the scheduler was shut down")
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name="nanochat-batching", daemon=True)
            self._thread.start()

    def shutdown(self):
        """Stop and join the decode thread; every unfinished request gets a final "cancelled" event."""
        with self._lock:
            self._stopping = True
            self._wakeup.notify_all()
            thread = self._thread
        if thread is threading.current_thread():
            return  # called from on_event: the decode thread ends the requests itself once the step is over
        if thread is not None:
            thread.join()
        else:  # never started: only queued requests exist
            self._cancel_queued()

    def submit(self, prompt_tokens, params, on_event=None):
        """Queue a request. on_event(TokenEvent) is called from the decode thread (keep it quick)."""
        prompt_tokens = list(prompt_tokens)
        vocab_size = self.model.config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab_size for t in prompt_tokens):
            raise ValueError(f"prompt_tokens must be ints in [0, {vocab_size})")
        check_params(params, len(prompt_tokens), self.model.config.sequence_len)
        request = GenerationRequest(prompt_tokens, params, on_event, self._wake)
        with self._lock:
            if self._stopping:
                raise RuntimeError("the scheduler was shut down")
            # the waiting room is what is queued beyond the free slots: max_queue 0 takes free slots only. A
            # cancelled request, queued or decoding, leaves at the next step: it holds no place (a client that
            # retries gets one)
            queued = sum(not waiting.cancelled for waiting in self._queue)
            active = sum(not running.cancelled for running in self._slots if running is not None)
            if active + queued >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"all {self.max_batch_size} slots are taken and {queued} requests "
                                f"are queued (max_queue={self.max_queue})")
            self._queue.append(request)
            self._wakeup.notify_all()
        return request

    def stats(self):
        """Counts: completed = requests that received their final event, whatever the reason;
        tokens_generated = token events delivered (sampled and forced)."""
        with self._lock:
            return {"active": self._num_active(), "queued": len(self._queue),
                    "max_batch_size": self.max_batch_size,
                    "completed": self._completed, "tokens_generated": self._tokens_generated}

    def _num_active(self):
        """Requests holding a slot, cancelled ones too until the decode thread ends them (under _lock)."""
        return self.max_batch_size - self._slots.count(None)

    def _wake(self):
        with self._lock:
            self._wakeup.notify_all()

    # ------------------------------------------------------------------
    # Decode thread

    def _run(self):
        if self.device.type == "cuda":  # a new thread's current device is cuda:0, whatever this scheduler's
            torch.cuda.set_device(self.device)
        with torch.inference_mode():
            while self._wait_for_work():
                try:
                    self._step()
                except Exception:
                    logger.exception("batched decode step failed; ending the active requests")
                    self._end_active("error")
        self._end_active("cancelled")
        self._cancel_queued()

    def _wait_for_work(self):
        """Block until there is something to do. False once shutdown() was called."""
        with self._lock:
            while not self._stopping and self._num_active() == 0 and not self._queue:
                self._wakeup.wait()
            return not self._stopping

    def _step(self):
        for slot, request in enumerate(self._slots):
            if request is not None and request.cancelled:
                self._finish(slot, TokenEvent(None, 0, "cancelled"))
        for slot, request in self._admit():
            self._start(slot, request)
        busy = [slot for slot, request in enumerate(self._slots) if request is not None]
        if busy:
            self._decode(busy)

    def _admit(self):
        """Move queued requests into free slots (cancelled ones end here). Returns [(slot, request)]."""
        admitted = []
        with self._lock:
            # one read of each flag: a request cancelled meanwhile stays queued until the next step
            cancelled = [request for request in self._queue if request.cancelled]
            for request in cancelled:
                self._queue.remove(request)
            free = [slot for slot, request in enumerate(self._slots) if request is None]
            while free and self._queue:
                request = self._queue.popleft()
                slot = free.pop(0)
                self._slots[slot] = request
                admitted.append((slot, request))
        for request in cancelled:
            self._deliver_final(request, TokenEvent(None, 0, "cancelled"))
        return admitted

    def _start(self, slot, request):
        """Prefill the prompt into the slot's cache row and emit the first token."""
        try:
            params = request.params
            request._row = RowState(list(request.prompt_tokens))
            request._rng = torch.Generator(device=self.device)
            if params.seed is None:
                request._rng.seed()
            else:
                request._rng.manual_seed(params.seed)
            request._stop_ids = frozenset((*self.tools.terminal, *params.stop_token_ids))
            # prefilled at batch 1 as the Engine does (the same numbers), then copied into the slot's row
            logits, prompt_cache = prefill_prompt(self.model, request.prompt_tokens, self.device,
                                                  all_positions=params.echo_logprobs)
            if params.echo_logprobs:  # position t's logits give token t + 1's log-probability
                following = torch.tensor(request.prompt_tokens[1:], device=self.device)
                request.prompt_logprobs = [None] + token_logprobs(logits[0, :-1], following, params.logprobs)
                logits = logits[:, -1, :]
            self._cache.prefill(prompt_cache, row=slot)
        except Exception:
            logger.exception("prefill of request %s failed", request.id)
            self._finish(slot, TokenEvent(None, 0, "error"))
            return
        self._sample_and_accept(logits, [slot])

    def _decode(self, busy):
        """One forward over the rows up to the last busy slot (fixed_width: over every slot); free rows are
        fed a dummy token at position 0 and their results ignored. Requests take the lowest free slot, so
        the busy ones gather at the front and the width follows the load."""
        width = self.max_batch_size if self.fixed_width else busy[-1] + 1
        inputs, positions = [0] * width, [0] * width  # free rows: a dummy token at position 0
        for slot in busy:
            inputs[slot] = self._slots[slot]._row.current_tokens[-1]  # the last token delivered
            positions[slot] = self._cache.positions[slot]
        view = self._cache.rows(width)
        view.set_positions(positions)
        ids = torch.tensor(inputs, dtype=torch.long, device=self.device).unsqueeze(1)  # (width, 1)
        logits = self.model.forward(ids, kv_cache=view)[:, -1, :]  # (width, V)
        if view.prev_embedding is not None:  # the forward replaced the view's: keep it for the next step
            self._cache.prev_embedding[:width] = view.prev_embedding
        self._cache.positions[:width] = view.positions  # the forward advanced the view's
        self._sample_and_accept(logits[busy], busy)

    def _sample_and_accept(self, logits, slots):
        """Sample row i of logits for the request in slots[i] and deliver the tokens, with one device sync.
        A row that is not samplable (a NaN or +inf anywhere, or every logit -inf; -inf alone is how tokens
        are banned) or whose sampling raises ends its request with "error", alone."""
        samplable = torch.isfinite(logits.amax(dim=-1))  # amax propagates NaN
        logits = torch.where(samplable[:, None], logits, 0.0)  # a broken row draws garbage, dropped below
        greedy = logits.argmax(dim=-1, keepdim=True)  # one kernel for every greedy row
        picks, failed = [], {}
        for row, slot in enumerate(slots):
            request = self._slots[slot]
            if is_greedy(request.params.temperature):
                picks.append(greedy[row])
                continue
            p = request.params
            try:
                picks.append(sample_next_token(logits[row:row + 1], request._rng, p.temperature, p.top_k,
                                               p.top_p)[0])
            except Exception as e:  # this row's numbers; the other rows are unaffected
                failed[slot] = f"sampling raised {type(e).__name__}: {e}"
                picks.append(greedy[row])
        num_rows = len(picks)
        host = torch.cat([torch.cat(picks), samplable[:num_rows].long()]).tolist()  # the one sync
        for row, slot in enumerate(slots):
            if not host[num_rows + row]:
                failed[slot] = "its logits are NaN, +inf or all -inf"
            if slot in failed:
                logger.error("request %s ends with an error: %s", self._slots[slot].id, failed[slot])
                self._finish(slot, TokenEvent(None, 0, "error"))
            else:
                self._accept(slot, host[row], logits[row])

    def _accept(self, slot, sampled, logits):
        """Pass a sampled token through the tool state machine and deliver the result (with its
        log-probabilities under `logits` when the request asks for them: a forced tool token's too)."""
        request = self._slots[slot]
        token, mask = self.tools.emit(request._row, sampled)
        num_generated = len(request._row.current_tokens) - len(request.prompt_tokens)
        if token in request._stop_ids:
            self._finish(slot, TokenEvent(None, 0, "stop"))
            return
        k, logprobs = request.params.logprobs, None
        if k is not None:
            logprobs = token_logprobs(logits[None], torch.tensor([token], device=logits.device), k)[0]
        if num_generated >= request.params.max_tokens:
            self._finish(slot, TokenEvent(token, mask, "length", logprobs))
        else:
            self._deliver(request, TokenEvent(token, mask, None, logprobs))

    def _deliver(self, request, event):
        """Hand an event to the consumer. A consumer that raises is treated as gone: the request is
        cancelled."""
        if event.token_id is not None:
            with self._lock:
                self._tokens_generated += 1
        try:
            request._on_event(event)
        except Exception:
            logger.exception("on_event of request %s raised; cancelling it", request.id)
            request._cancelled.set()

    def _deliver_final(self, request, event):
        request.finish_reason = event.finish_reason
        with self._lock:
            self._completed += 1
        self._deliver(request, event)

    def _finish(self, slot, event):
        """Free the slot, then send the request's final event."""
        request = self._slots[slot]
        with self._lock:
            self._slots[slot] = None
        self._deliver_final(request, event)

    def _end_active(self, reason):
        for slot, request in enumerate(self._slots):
            if request is not None:
                self._finish(slot, TokenEvent(None, 0, reason))

    def _cancel_queued(self):
        with self._lock:
            pending = list(self._queue)
            self._queue.clear()
        for request in pending:
            self._deliver_final(request, TokenEvent(None, 0, "cancelled"))
