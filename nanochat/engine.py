"""
Inference: the calculator tool, the KV cache and its prompt prefill, and the Engine that streams batched
generation with tool use (its sampler is nanochat.sampling's, shared with GPT.generate and the scheduler).

The Engine works purely on token-id lists. It knows the tokenizer only for the tool state machine:
the model writes `<|python_start|> expr <|python_end|>`, the engine evaluates expr with the
calculator and forces `<|output_start|> result <|output_end|>` into that row (mask 0: not sampled).
"""

import ast
import copy
import signal
import string
import threading
import warnings
from collections import deque
from contextlib import contextmanager

import torch

from nanochat import common  # COMPUTE_DTYPE is read at call time: deciding it may query CUDA
from nanochat.sampling import sample_next_token

# -----------------------------------------------------------------------------
# Calculator tool

MATH_CHARS = set("0123456789*+-/.() ")
STRING_CHARS = set(string.ascii_letters + string.digits + "'\"()._ ")
# substring blacklist of the reference (it has false positives: "directory" contains "dir"), kept because
# chat.md §1.1 makes its outcomes a contract ('directory'.count('d') is None)
BLOCKED_SUBSTRINGS = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
                      "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")
# zero-argument str methods whose output is at most a small multiple of their input's length
BOUNDED_STR_METHODS = {"lower", "upper", "casefold", "swapcase", "title", "capitalize",
                       "strip", "lstrip", "rstrip"}


@contextmanager
def timeout(duration, formula):
    """Raise inside the body after `duration` seconds. Uses SIGALRM, so it works on the main thread only.
    The previous SIGALRM handler is put back afterwards, so a caller's own alarm keeps working."""
    def on_alarm(signum, frame):
        raise Exception(f"'{formula}': timed out after {duration} seconds")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, duration)  # setitimer: fractional seconds allowed
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL if previous is None else previous)


def _eval_no_builtins(formula):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)  # e.g. "'a' 'b'" literals next to each other
        return eval(formula, {"__builtins__": {}}, {})


def _bounded_kind(node):
    """'num' or 'str' if evaluating node costs at most about its own size, else None.
    Allowed: int/float/str literals, unary +-, + - * / // on numbers, and _bounded_call_kind's calls.
    Excluded: ** (huge results), any str arithmetic ('a' * 10**9), names, other calls."""
    if isinstance(node, ast.Constant):
        if isinstance(node.value, str):
            return "str"
        return "num" if isinstance(node.value, (int, float)) else None
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        return "num" if _bounded_kind(node.operand) == "num" else None
    arithmetic = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)
    if isinstance(node, ast.BinOp) and isinstance(node.op, arithmetic):
        return "num" if _bounded_kind(node.left) == _bounded_kind(node.right) == "num" else None
    if isinstance(node, ast.Call):
        return _bounded_call_kind(node)
    return None


def _bounded_call_kind(call):
    """'num' for str.count(str), 'str' for a BOUNDED_STR_METHODS call, both on a bounded str; else None."""
    func = call.func
    if not isinstance(func, ast.Attribute) or call.keywords or _bounded_kind(func.value) != "str":
        return None
    arg_kinds = [_bounded_kind(arg) for arg in call.args]
    if func.attr == "count" and arg_kinds == ["str"]:
        return "num"
    if func.attr in BOUNDED_STR_METHODS and not arg_kinds:
        return "str"
    return None


def is_bounded_expression(formula):
    """True if formula parses to an expression whose evaluation cannot hang (see _bounded_kind)."""
    try:
        # eval ignores leading spaces and tabs, ast.parse calls them an indent: a model's " 48/2" must
        # get the same answer here (the server's worker threads) as on the main thread (the CLI)
        return _bounded_kind(ast.parse(formula.lstrip(" \t"), mode="eval").body) is not None
    except Exception:  # SyntaxError, ValueError (null bytes), RecursionError (absurdly deep trees)
        return False


def eval_with_timeout(formula, max_time=3):
    """eval(formula) without builtins; None on any error or after max_time seconds.

    SIGALRM is available on the main thread only, and the web server generates in worker threads. Off the main
    thread, or without SIGALRM, there is no way to interrupt eval, so only expressions that cannot hang are
    evaluated (is_bounded_expression: plain arithmetic without **, and str.count on string literals, which
    covers every calculator call that use_calculator lets through in practice); anything else returns None.
    """
    try:
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM"):
            with timeout(max_time, formula):
                return _eval_no_builtins(formula)
        if is_bounded_expression(formula):
            return _eval_no_builtins(formula)
        return None
    except Exception:  # syntax error, ZeroDivisionError, NameError, the timeout, ...
        return None


def use_calculator(expr):
    """Evaluate a tool call: arithmetic (no **), or str.count on literals. Returns int | float | None."""
    expr = expr.replace(",", "")  # "1,000" -> "1000" (also inside string literals, as the reference)
    if all(c in MATH_CHARS for c in expr):
        return None if "**" in expr else eval_with_timeout(expr)  # ** can build billions of digits
    if not all(c in STRING_CHARS for c in expr) or ".count(" not in expr:
        return None
    if any(bad in expr.lower() for bad in BLOCKED_SUBSTRINGS):
        return None
    return eval_with_timeout(expr)


# -----------------------------------------------------------------------------
# KV cache


class KVCache:
    """
    Fixed-capacity key/value cache in the FA3 layout: per layer (B, T_max, H_kv, D).
    The attention kernel writes new keys/values in place at [pos, pos + T_new); the model's last
    layer then calls advance(T_new). prev_embedding carries the smear feature across calls.
    Capacity never grows: the Engine sizes it up front (prompt + max_tokens) and never decodes past it;
    the SDPA fallback raises on an overflowing write (FA3 does not check).
    Rows may sit at different positions (continuous batching, nanochat.batching): the model and the
    attention kernels honour each row's cache_seqlens; get_pos() then reports row 0.
    Positions live twice: cache_seqlens on the device (for FA3) and `positions`, a host list read without a
    device sync; change them through reset, advance, prefill or set_positions only, so the two stay equal.
    batch_invariant: the SDPA fallback attends over the whole capacity, so that a row's numbers do not depend
    on the other rows' positions (slower: for reproducible serving).
    """

    def __init__(self, batch_size, num_heads, seq_len, head_dim, num_layers, device, dtype):
        self.batch_size = batch_size
        self.max_seq_len = seq_len
        self.n_layers = num_layers
        self.n_heads = num_heads
        self.head_dim = head_dim
        shape = (num_layers, batch_size, seq_len, num_heads, head_dim)
        self.k_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.v_cache = torch.zeros(shape, device=device, dtype=dtype)
        self.cache_seqlens = torch.zeros(batch_size, dtype=torch.int32, device=device)  # FA3 wants int32
        self.positions = [0] * batch_size
        self.prev_embedding = None  # (B, 1, n_embd), last pre-smear embedding seen
        self.batch_invariant = False

    def reset(self):
        self.set_positions([0] * self.batch_size)
        self.prev_embedding = None

    def get_pos(self):
        return self.positions[0]

    def position_range(self):
        """(lowest, highest) row position, host ints; equal when the rows decode in lockstep."""
        return min(self.positions), max(self.positions)

    def set_positions(self, positions):
        self.positions = list(positions)
        self.cache_seqlens.copy_(torch.tensor(self.positions, dtype=torch.int32))

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens
        self.positions = [pos + num_tokens for pos in self.positions]

    def rows(self, n):
        """A cache over rows [0, n) that shares this one's storage (decode only the busy rows). Its
        prev_embedding is replaced by the forward: copy it back with self.prev_embedding[:n] = view's."""
        view = copy.copy(self)
        view.batch_size = n
        view.k_cache, view.v_cache = self.k_cache[:, :n], self.v_cache[:, :n]
        view.cache_seqlens, view.positions = self.cache_seqlens[:n], self.positions[:n]
        if self.prev_embedding is not None:
            view.prev_embedding = self.prev_embedding[:n]
        return view

    @classmethod
    def for_model(cls, config, batch_size, seq_len, device, dtype=None):
        """A cache shaped for a GPT config; dtype None means the compute dtype, read now (deciding it may
        query CUDA), which is the activations' dtype: FA3 needs the cache to match it."""
        return cls(batch_size=batch_size, num_heads=config.n_kv_head, seq_len=seq_len,
                   head_dim=config.n_embd // config.n_head, num_layers=config.n_layer, device=device,
                   dtype=common.COMPUTE_DTYPE if dtype is None else dtype)

    def prefill(self, other, row=None):
        """Copy another cache's contents into this one: into every row of this empty cache (row=None; a
        batch-1 source broadcasts, one of as many rows copies row by row), or into row `row` only from a
        batch-1 source, the other rows keeping theirs (continuous batching)."""
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim)
        assert self.max_seq_len >= other.max_seq_len
        assert row is not None or self.get_pos() == 0, "Cannot prefill a non-empty KV cache"
        pos = other.get_pos()
        rows = slice(None) if row is None else slice(row, row + 1)
        self.k_cache[:, rows, :pos] = other.k_cache[:, :, :pos]  # a batch-1 source broadcasts over the rows
        self.v_cache[:, rows, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens[rows] = pos
        self.positions[rows] = [pos] * len(self.positions[rows])
        source = other.prev_embedding
        if source is not None:  # a duck-typed model may not smear
            if self.prev_embedding is None:
                self.prev_embedding = source.new_zeros((self.batch_size, *source.shape[1:]))
            self.prev_embedding[rows] = source


def decode_step_cost(model, batch, context):
    """(FLOPs, bytes read) of one decode step of `batch` rows with `context` cached positions each."""
    cfg = model.config
    head_dim = cfg.n_embd // cfg.n_head
    attended = [min(window, context) for window, _ in model.window_sizes]
    matmul_weights = sum(p.numel() for p in model._matrix_params()) + model.lm_head.weight.numel()
    flops = batch * (2 * matmul_weights + sum(4 * cfg.n_head * head_dim * c for c in attended))
    tables = model._embedding_tables()
    table_ids = {id(t) for t in tables}
    weight_bytes = sum(p.nbytes for p in model.parameters() if id(p) not in table_ids)
    row_bytes = batch * sum(t.nbytes // t.shape[0] for t in tables)
    kv_bytes = batch * 2 * cfg.n_kv_head * head_dim * common.COMPUTE_DTYPE.itemsize * sum(attended)
    return flops, weight_bytes + row_bytes + kv_bytes


class NeverStopping:
    """The tokenizer with <|assistant_end|> and BOS hidden from the Engine, so no row ever finishes: an Engine
    over it decodes exactly max_tokens (the benchmarks time fixed-length runs)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode_special(self, name):
        return -1 if name == "<|assistant_end|>" else self.tokenizer.encode_special(name)

    def get_bos_token_id(self):
        return -1

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def prefill_prompt(model, tokens, device, all_positions=False):
    """Run a prompt once at batch 1 in a cache of its own length. Returns the last position's logits (1, V)
    (all_positions: every position's, (1, T, V)) and that cache, to be copied into a decode cache with
    KVCache.prefill. The Engine and the scheduler both prefill through here, so a prompt gives them
    bit-identical numbers."""
    cache = KVCache.for_model(model.config, 1, len(tokens), device)
    ids = torch.tensor([tokens], dtype=torch.long, device=device)
    logits = model.forward(ids, kv_cache=cache)
    return (logits if all_positions else logits[:, -1, :]), cache


# -----------------------------------------------------------------------------
# Per-row state


class RowState:
    """One sample's decoding state: its tokens so far and where it is in the tool state machine."""

    def __init__(self, current_tokens=None):
        self.current_tokens = current_tokens or []  # the prompt, then every emitted token
        self.forced_tokens = deque()  # tool output waiting to be injected, one per step
        self.in_python_block = False  # between <|python_start|> and <|python_end|>
        self.python_expr_tokens = []  # the tool call being written
        self.completed = False  # emitted <|assistant_end|> or BOS


class ToolUse:
    """The per-row token state machine: completion and calculator calls. Shared by the Engine and the
    continuous-batching scheduler (nanochat.batching), so tool use behaves the same in both. It asks the
    tokenizer for exactly these special ids (the unit-test tokenizer knows no others)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        special = tokenizer.encode_special
        self.python_start, self.python_end = special("<|python_start|>"), special("<|python_end|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")
        self.terminal = (special("<|assistant_end|>"), tokenizer.get_bos_token_id())

    def output(self, expr_tokens):
        """Tokens answering a finished call (<|output_start|> result <|output_end|>), or [] if it failed."""
        result = use_calculator(self.tokenizer.decode(expr_tokens))
        if result is None:
            return []
        try:
            text = str(result)
        except ValueError:  # an int beyond Python's str() digit limit: treat like a failed call
            return []
        return [self.output_start, *self.tokenizer.encode(text), self.output_end]

    def emit(self, row, sampled):
        """Row's next (token, mask): a pending forced token (mask 0) wins over the sampled one (mask 1).
        Then update the row's completion and tool state with that token."""
        if row.forced_tokens:
            token, mask = row.forced_tokens.popleft(), 0
        else:
            token, mask = sampled, 1
        row.current_tokens.append(token)
        if token in self.terminal:
            row.completed = True
        if token == self.python_start:  # a second start inside a block restarts the expression
            row.in_python_block = True
            row.python_expr_tokens = []
        elif token == self.python_end and row.in_python_block:
            row.in_python_block = False
            if row.python_expr_tokens:
                row.forced_tokens.extend(self.output(row.python_expr_tokens))
            row.python_expr_tokens = []
        elif row.in_python_block:
            row.python_expr_tokens.append(token)
        return token, mask


# -----------------------------------------------------------------------------
# Engine


class Engine:
    """Batched streaming generation with the calculator tool. Duck-typed: the model needs config
    (n_layer, n_head, n_kv_head, n_embd, sequence_len), get_device() and forward(ids, kv_cache=...);
    the tokenizer needs encode_special, get_bos_token_id, encode and decode."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _num_steps(self, prompt_len, max_tokens):
        """How many tokens to generate. max_tokens=None means: until the sequence fills the model's context
        (a cache is never written past its capacity, where writes would be lost)."""
        if max_tokens is None:
            room = self.model.config.sequence_len - prompt_len
            if room <= 0:
                raise ValueError(f"prompt of {prompt_len} tokens leaves no room in the model's context of "
                                 f"{self.model.config.sequence_len} tokens; pass max_tokens explicitly")
            return room
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 or None, got {max_tokens}")
        return max_tokens

    @torch.inference_mode()
    def generate(self, tokens, num_samples=1, max_tokens=None, temperature=1.0, top_k=None, seed=42):
        """Stream one (token_column, token_masks) pair per step: lists of length num_samples with each
        row's next token and 1 if it was sampled, 0 if the tool forced it. Rows that finished keep getting
        (meaningless) tokens until every row has finished or max_tokens steps were yielded."""
        assert isinstance(tokens, list) and tokens and isinstance(tokens[0], int), "expecting list of ints"
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        device = self.model.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)
        tools = ToolUse(self.tokenizer)
        num_steps = self._num_steps(len(tokens), max_tokens)
        if num_steps == 0:
            return
        # the prompt runs once at batch 1; its cache is copied into every row of the decode cache
        logits, prompt_cache = prefill_prompt(self.model, tokens, device)
        logits = logits.expand(num_samples, -1)
        cache = KVCache.for_model(self.model.config, num_samples, len(tokens) + num_steps, device)
        cache.prefill(prompt_cache)
        rows = [RowState(tokens.copy()) for _ in range(num_samples)]
        for step in range(num_steps):
            # every row draws its own token, also at step 0 where all rows share the prefill logits
            sampled = sample_next_token(logits, rng, temperature, top_k)[:, 0].tolist()
            column, masks = zip(*(tools.emit(row, s) for row, s in zip(rows, sampled)))
            yield list(column), list(masks)
            if step == num_steps - 1 or all(row.completed for row in rows):
                return  # stop before feeding the column: its logits would never be used
            ids = torch.tensor(column, dtype=torch.long, device=device).unsqueeze(1)  # (num_samples, 1)
            logits = self.model.forward(ids, kv_cache=cache)[:, -1, :]

    def generate_batch(self, tokens, num_samples=1, keep_terminal=False, **kwargs):
        """Generate to the end (kwargs go to generate). Returns the tuple (results, masks): per row the
        prompt plus its generated tokens without the terminal <|assistant_end|>/BOS, and the matching
        masks (0 for the prompt and for tool output, 1 for sampled tokens). keep_terminal (RL trains on
        it) keeps the terminal token with its mask and returns (results, masks, finished), finished[i]
        saying whether row i ended so (False: cut by max_tokens)."""
        terminal = ToolUse(self.tokenizer).terminal
        results = [tokens.copy() for _ in range(num_samples)]
        masks = [[0] * len(tokens) for _ in range(num_samples)]
        completed = [False] * num_samples
        for column, column_masks in self.generate(tokens, num_samples, **kwargs):
            for i, (token, mask) in enumerate(zip(column, column_masks)):
                if completed[i]:
                    continue
                completed[i] = token in terminal
                if keep_terminal or not completed[i]:
                    results[i].append(token)
                    masks[i].append(mask)
        return (results, masks, completed) if keep_terminal else (results, masks)


# -----------------------------------------------------------------------------
# Self-check (`python -m nanochat.engine`): the KV-cache path against the naive full forward

def self_check(model, tokenizer, prompt="The chemical formula of water is", max_tokens=64):
    """Stream and time greedy decoding of `prompt` by GPT.generate and by the Engine, and compare them:
    a KV-cache bug shows as a first mismatch. Compared over the Engine's tokens (it stops at a terminal
    token, GPT.generate does not). Returns whether they match. Also run by `dev.bench_engine --check`."""
    import time
    tokens = [tokenizer.get_bos_token_id()] + tokenizer.encode(prompt)
    engine_tokens = (column[0] for column, _ in Engine(model, tokenizer).generate(
        tokens, num_samples=1, max_tokens=max_tokens, temperature=0.0))
    sync = torch.cuda.synchronize if model.get_device().type == "cuda" else (lambda: None)
    outputs = {}
    for name, stream in (("Reference", model.generate(tokens, max_tokens, temperature=0.0)),
                         ("Engine", engine_tokens)):
        sync()
        t0 = time.time()
        outputs[name] = []
        for token in stream:
            outputs[name].append(token)
            print(tokenizer.decode([token]), end="", flush=True)
        sync()
        print(f"\n{name} time: {time.time() - t0:.2f}s")
    reference, engine = outputs["Reference"], outputs["Engine"]
    mismatch = next((i for i, (a, b) in enumerate(zip(reference, engine)) if a != b), None)
    if mismatch is not None:
        print(f"Mismatch at token {mismatch}: reference {reference[mismatch]}, engine {engine[mismatch]}")
    match = mismatch is None
    print(f"Match: {match}")
    return match


@common.exit_on_setup_error("engine")
def main():
    from nanochat.checkpoint_manager import load_model
    device = common.compute_init(common.autodetect_device_type())[-1]
    model, tokenizer, _ = load_model("base", device, phase="eval")
    return 0 if self_check(model, tokenizer) else 1


if __name__ == "__main__":
    raise SystemExit(main())
