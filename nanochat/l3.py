"""
L3: Large Lookup Layers (Tseng & De Sa, arXiv 2601.21461), adapted to nanochat.

An L3 layer generalises the token-embedding table into the decoder stack. Token id t statically
owns a contiguous block of d_t learned embeddings, rows [bounds[t], bounds[t+1]) of a table. The
hidden state at a position attends over only its own token's block (static routing by id: no
router, no balancing loss), the aggregate is up-projected and normalised, and a mixing matrix maps
[up ; norm(x)] back to the residual width. GPT adds the result to the residual stream after
selected blocks: x = x + L3(x, idx).

The per-token allocation d_t comes from an LZ78-style dictionary scan of training data
(compute_lzw_allocation), turned into row bounds by allocation_to_bounds; the bounds are a
persistent buffer, so the allocation travels with checkpoints.

Imports: gpt builds L3 layers, so this module never imports nanochat.gpt; the casting Linear and the
norm they share live in nanochat.common.
"""

import operator

import torch
import torch.nn as nn

from nanochat.common import Linear, norm, print0

# most negative finite fp32 value: masks invalid slots before the softmax without producing the
# NaNs that -inf gives for a token whose allocation is empty
_MASK_VALUE = torch.finfo(torch.float32).min


# -----------------------------------------------------------------------------
# Allocation

def _as_long_tensor(values, what):
    """values (an integer tensor, or a possibly empty sequence of ints) as an int64 tensor on its device."""
    if isinstance(values, torch.Tensor):
        t = values.detach()
    else:
        values = list(values)
        t = torch.tensor(values) if values else torch.zeros(0, dtype=torch.long)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{what} must be integers, got dtype {t.dtype}")
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D, got shape {tuple(t.shape)}")
    return t.to(torch.long)


def compute_lzw_allocation(token_sequences, vocab_size, n_emb, k_max):
    """
    Number of L3 embeddings per token id (a list of vocab_size ints), from an LZ78/LZW-style scan.

    1. The dictionary starts with the vocab_size single-token phrases (count 0, in id order). Each
       sequence is scanned greedily: take the longest dictionary phrase P at the cursor; if a token
       follows it, count P, add P + (next,) with count 1 and continue after that extending token;
       at the end of the sequence just count P. (A trie makes each step O(1).)
    2. Phrases are sorted by count, descending and stable (ties keep insertion order: single tokens
       by id, then phrases in discovery order).
    3. Every token starts with 1 embedding; walking the sorted phrases, the phrase's last token gets
       one more (unless it is at k_max) until the total reaches n_emb.
    4. If the phrases run out first, the remainder goes round-robin over tokens by descending
       unigram count (ties by id), skipping tokens at k_max.

    Guarantees: every entry in [1, k_max]; sum == n_emb whenever vocab_size <= n_emb <=
    vocab_size * k_max. If n_emb > vocab_size * k_max the saturated allocation (all k_max) is
    returned with a warning. Raises ValueError for n_emb < vocab_size, k_max < 1, or ids outside
    [0, vocab_size). token_sequences is consumed once (a generator is fine).
    """
    V, n_emb, k_max = int(vocab_size), int(n_emb), int(k_max)
    if V < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if k_max < 1:
        raise ValueError(f"k_max must be >= 1, got {k_max}")
    if n_emb < V:
        raise ValueError(f"n_emb ({n_emb}) must be >= vocab_size ({V}): every token needs at least one "
                         f"embedding")
    counts, last, unigram = _scan_phrases(token_sequences, V)
    alloc = [1] * V
    # stable sort: phrases of equal count keep insertion order
    ranked = sorted(range(len(counts)), key=lambda k: -counts[k])
    total = _walk_ranked_phrases(alloc, V, ranked, last, n_emb, k_max)
    total = _round_robin_fill(alloc, total, unigram, n_emb, k_max)
    if total < n_emb:
        print0(f"Warning: L3 n_emb={n_emb} exceeds vocab_size * k_max = {V} * {k_max} = {V * k_max}; "
               f"using the saturated allocation ({total} embeddings, {k_max} per token)")
    return alloc


def _checked_ids(seq, V):
    """A token sequence (list, tuple, 1-D tensor or array) as a list of ints, each in [0, V)."""
    if isinstance(seq, torch.Tensor):
        ids = _as_long_tensor(seq, "token ids").tolist()
    else:
        try:  # operator.index rejects floats instead of truncating them; tolist() reads numpy arrays
            ids = [operator.index(t) for t in (seq.tolist() if hasattr(seq, "tolist") else seq)]
        except TypeError as e:
            raise ValueError(f"token ids must be integers: {e}") from None
    if ids:
        lo, hi = min(ids), max(ids)
        if lo < 0 or hi >= V:
            raise ValueError(f"token id {lo if lo < 0 else hi} outside [0, {V})")
    return ids


def _scan_phrases(token_sequences, V):
    """
    The LZ78 phrase dictionary of the sequences as a trie, built by a greedy longest-match scan of each
    one that counts phrases and adds new ones. Node id == insertion order; nodes 0..V-1 are the single
    tokens. Returns per node the phrase count and the phrase's last token, and per token its occurrences.
    """
    children = [dict() for _ in range(V)]  # per node: {next token id: node}
    counts, last, unigram = [0] * V, list(range(V)), [0] * V
    for seq in token_sequences:
        ids = _checked_ids(seq, V)
        for t in ids:
            unigram[t] += 1
        i, N = 0, len(ids)
        while i < N:
            node, j = ids[i], i + 1
            while j < N:  # extend the match as long as the dictionary has the longer phrase
                nxt = children[node].get(ids[j])
                if nxt is None:
                    break
                node, j = nxt, j + 1
            counts[node] += 1
            if j == N:
                break
            # new phrase = matched phrase + the next token, which is consumed
            children[node][ids[j]] = len(counts)
            children.append(dict())
            counts.append(1)
            last.append(ids[j])
            i = j + 1
    return counts, last, unigram


def _walk_ranked_phrases(alloc, total, ranked, last, n_emb, k_max):
    """One more embedding for the last token of each ranked phrase (tokens at k_max are skipped)
    until the total reaches n_emb. Updates alloc in place; returns the new total."""
    for k in ranked:
        if total >= n_emb:
            break
        t = last[k]
        if alloc[t] < k_max:
            alloc[t] += 1
            total += 1
    return total


def _round_robin_fill(alloc, total, unigram, n_emb, k_max):
    """Hand out the remainder one at a time, round-robin over tokens by descending unigram count
    (ties by id), skipping tokens at k_max, until the total reaches n_emb or every token is full."""
    by_freq = sorted(range(len(alloc)), key=lambda t: -unigram[t])
    while total < n_emb:
        open_tokens = [t for t in by_freq if alloc[t] < k_max]  # one round; nobody fills up mid-round
        if not open_tokens:
            break
        for t in open_tokens[:n_emb - total]:
            alloc[t] += 1
        total += min(len(open_tokens), n_emb - total)
    return total


def allocation_to_bounds(alloc):
    """
    Row bounds from a per-token allocation: int64 [0, a0, a0+a1, ..., sum(a)] of length len(alloc)+1.
    Token t owns table rows [bounds[t], bounds[t+1]).
    """
    a = _as_long_tensor(alloc, "allocation")
    if bool((a < 0).any()):
        raise ValueError("allocation entries must be non-negative")
    return torch.cat([a.new_zeros(1), torch.cumsum(a, dim=0)])


# -----------------------------------------------------------------------------
# The attention over each token's own embedding block

class _L3Attend(torch.autograd.Function):
    """
    agg[i] = sum_j w[i, j] * V[rows[i, j]], w[i] = valid[i] * softmax_j(mask(K[rows[i, j]] . xn[i]))

    Tokens are processed in chunks so that the gathered (tokens, k_max, n_embd) block never exceeds
    `chunk` tokens, and the backward re-gathers instead of keeping the gathered rows alive: the
    saved state is O(tokens * k_max), not O(tokens * k_max * n_embd). Mathematically identical to
    the plain autograd formulation (§6.4 steps 3-5). Table gradients are accumulated in an fp32
    buffer of the table's shape (exact sums across chunks even for bf16 tables), then cast back.
    """

    @staticmethod
    def forward(ctx, xn, key_table, value_table, rows, valid, chunk):
        tied = value_table is None
        N, C = xn.shape
        dt = xn.dtype
        aggs, ws = [], []
        for s in range(0, N, chunk):
            r, m, q = rows[s:s + chunk], valid[s:s + chunk], xn[s:s + chunk]
            kt = key_table[r].to(dt)  # (n, k, C)
            score = torch.bmm(kt, q.unsqueeze(-1)).squeeze(-1).float()  # (n, k), fp32 softmax
            score = score.masked_fill(~m, _MASK_VALUE)
            w = torch.softmax(score, dim=-1) * m  # empty allocation -> all-zero weights
            vt = kt if tied else value_table[r].to(dt)
            aggs.append(torch.bmm(w.to(dt).unsqueeze(1), vt).squeeze(1))
            ws.append(w)
        agg = torch.cat(aggs, dim=0) if len(aggs) != 1 else aggs[0]
        w_all = torch.cat(ws, dim=0) if len(ws) != 1 else ws[0]
        ctx.save_for_backward(xn, key_table, value_table, rows, w_all)
        ctx.tied = tied
        ctx.chunk = chunk
        return agg

    @staticmethod
    def backward(ctx, g_agg):
        xn, key_table, value_table, rows, w_all = ctx.saved_tensors
        tied, chunk = ctx.tied, ctx.chunk
        need_x, need_k = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_v = need_k if tied else ctx.needs_input_grad[2]
        N, C = xn.shape
        dt = xn.dtype
        g_agg = g_agg.to(dt)
        g_xn = torch.empty_like(xn) if need_x else None
        gk = torch.zeros(key_table.shape, dtype=torch.float32, device=key_table.device) if need_k else None
        gv = gk if tied else None  # tied: one table, whose value gradient accumulates after the key's
        if need_v and not tied:
            gv = torch.zeros(value_table.shape, dtype=torch.float32, device=value_table.device)
        for s in range(0, N, chunk):
            r, q, w, g = rows[s:s + chunk], xn[s:s + chunk], w_all[s:s + chunk], g_agg[s:s + chunk]
            flat = r.reshape(-1)
            kt = key_table[r].to(dt)
            vt = kt if tied else value_table[r].to(dt)
            g_w = torch.bmm(vt, g.unsqueeze(-1)).squeeze(-1).float()  # (n, k)
            # softmax backward restricted to valid slots (w == 0 elsewhere, and the masked scores
            # are constants): d score_j = w_j * (g_w_j - sum_i w_i g_w_i)
            g_score = w * (g_w - (w * g_w).sum(dim=-1, keepdim=True))
            g_score_d = g_score.to(dt)
            if need_x:
                g_xn[s:s + chunk] = torch.bmm(g_score_d.unsqueeze(1), kt).squeeze(1)
            if need_k:
                g_kt = g_score_d.unsqueeze(-1) * q.unsqueeze(1)  # (n, k, C)
                gk.index_add_(0, flat, g_kt.reshape(-1, C).float())
            if need_v:
                g_vt = w.to(dt).unsqueeze(-1) * g.unsqueeze(1)
                gv.index_add_(0, flat, g_vt.reshape(-1, C).float())
        gk = gk.to(key_table.dtype) if need_k else None
        gv = gv.to(value_table.dtype) if need_v and not tied else None
        return g_xn, gk, gv, None, None, None


# -----------------------------------------------------------------------------
# The layer

class L3Layer(nn.Module):
    """
    delta = w_mix([norm(w_up(sum_j w_j V_t[j])) ; xn]), w = softmax over token t's own block of
    K_t xn, xn = norm(x), t the token id at the position. Keys and values share one table when
    tie_kv (kv_weight), else k_weight / v_weight. Returns (B, T, n_embd) in x.dtype.

    bounds: persistent int64 buffer, (vocab_size+1,) when vocab_size > 0 (so a fresh model can load
    a checkpoint strictly), else a 1-element placeholder until set_bounds. k_max: the static gather
    width; fixed when given, else the largest allocation of the current bounds.
    """

    # tokens per chunk are chosen so that one gathered block holds at most this many elements
    gather_budget = 1 << 26

    def __init__(self, n_embd, n_emb, d_up, tie_kv=True, vocab_size=0, k_max=None):
        super().__init__()
        if n_embd < 1 or n_emb < 1 or d_up < 1:
            raise ValueError(f"n_embd, n_emb and d_up must be >= 1, got {n_embd}, {n_emb}, {d_up}")
        if vocab_size < 0:
            raise ValueError(f"vocab_size must be >= 0, got {vocab_size}")
        if k_max is not None and int(k_max) < 1:
            raise ValueError(f"k_max must be >= 1, got {k_max}")
        self.n_embd = int(n_embd)
        self.n_emb = int(n_emb)
        self.d_up = int(d_up)
        self.tie_kv = bool(tie_kv)
        self.vocab_size = int(vocab_size)
        self.k_max_fixed = k_max is not None
        self.k_max = int(k_max) if k_max is not None else 1
        if self.tie_kv:
            self.kv_weight = nn.Parameter(torch.empty(self.n_emb, self.n_embd))
        else:
            self.k_weight = nn.Parameter(torch.empty(self.n_emb, self.n_embd))
            self.v_weight = nn.Parameter(torch.empty(self.n_emb, self.n_embd))
        self.w_up = Linear(self.n_embd, self.d_up, bias=False)
        self.w_mix = Linear(self.d_up + self.n_embd, self.n_embd, bias=False)
        n_bounds = self.vocab_size + 1 if self.vocab_size > 0 else 1
        self.register_buffer("bounds", torch.zeros(n_bounds, dtype=torch.long), persistent=True)
        self.reset_parameters()

    def tables(self):
        return [self.kv_weight] if self.tie_kv else [self.k_weight, self.v_weight]

    def default_allocation(self):
        """Uniform: n_emb // V each, the first n_emb % V tokens one more (capped at a fixed k_max)."""
        V = self.vocab_size
        base, rem = divmod(self.n_emb, V)
        alloc = [base + (1 if t < rem else 0) for t in range(V)]
        if self.k_max_fixed:
            alloc = [min(a, self.k_max) for a in alloc]
        return alloc

    @torch.no_grad()
    def reset_parameters(self):
        """
        Tables and w_up ~ U(+-sqrt(3)/sqrt(n_embd)) (std 1/sqrt(n_embd): O(1) scores against a
        unit-RMS query), w_mix = 0 (the layer starts as the identity on the residual stream), and,
        when vocab_size > 0, the uniform default allocation. Draws from the global RNG in the order
        tables (kv, or k then v), w_up. A no-op on the meta device.
        """
        if self.w_up.weight.is_meta:
            return
        s = 3 ** 0.5 * self.n_embd ** -0.5
        for table in self.tables():
            table.uniform_(-s, s)
        self.w_up.weight.uniform_(-s, s)
        self.w_mix.weight.zero_()
        if self.vocab_size > 0:
            self.set_bounds(allocation_to_bounds(self.default_allocation()))

    # -- bounds ---------------------------------------------------------------

    def _check_bounds(self, b):
        """Validates a CPU int64 bounds tensor, then re-derives k_max from it (a fixed one must fit)."""
        if b.dim() != 1:  # a loaded checkpoint's buffer, which set_bounds has not seen
            raise ValueError(f"bounds must be 1-D, got shape {tuple(b.shape)}")
        if b.numel() < 2:
            raise ValueError("bounds needs at least 2 entries (one token)")
        if self.vocab_size > 0 and b.numel() != self.vocab_size + 1:
            raise ValueError(f"bounds must have vocab_size + 1 = {self.vocab_size + 1} entries, "
                             f"got {b.numel()}")
        if int(b[0]) != 0:
            raise ValueError(f"bounds[0] must be 0, got {int(b[0])}")
        alloc = b[1:] - b[:-1]
        if bool((alloc < 0).any()):
            raise ValueError("bounds must be non-decreasing")
        if int(b[-1]) > self.n_emb:
            raise ValueError(f"bounds[-1] = {int(b[-1])} exceeds n_emb = {self.n_emb}")
        max_alloc = int(alloc.max())
        if self.k_max_fixed and max_alloc > self.k_max:
            raise ValueError(f"an allocation of {max_alloc} exceeds k_max = {self.k_max}")
        if not self.k_max_fixed:
            self.k_max = max(1, max_alloc)

    def set_bounds(self, bounds):
        """
        Installs per-token row bounds (list or tensor, [0, ..., <= n_emb], non-decreasing). Copies in
        place when the shape matches (keeps buffer identity for compiled graphs), otherwise replaces
        the (persistent) buffer. Updates a derived k_max; with a fixed k_max every allocation must
        fit. Raises ValueError on invalid bounds. Setup-time only (reads values on the host).
        """
        b = _as_long_tensor(bounds, "bounds").cpu()
        self._check_bounds(b)
        device = self.w_up.weight.device
        if self.bounds.shape == b.shape:
            self.bounds.copy_(b.to(device))
        else:
            self.bounds = b.to(device).clone()  # still a registered, persistent buffer

    def allocation(self):
        """The current per-token allocation as a list of ints."""
        b = self.bounds.detach().cpu()
        return (b[1:] - b[:-1]).tolist()

    def _load_from_state_dict(self, state_dict, prefix, *args):
        loaded = state_dict.get(prefix + "bounds")
        if self.vocab_size == 0 and isinstance(loaded, torch.Tensor) and loaded.shape != self.bounds.shape:
            # the placeholder of a layer built without vocab_size takes the checkpoint's shape
            self.bounds = torch.zeros(loaded.shape, dtype=torch.long, device=self.bounds.device)
        super()._load_from_state_dict(state_dict, prefix, *args)
        # re-derive (or check against the fixed) k_max from the loaded bounds, unless still a placeholder
        b = self.bounds.detach().cpu()
        if self.vocab_size > 0 or b.numel() >= 2:
            self._check_bounds(b)

    # -- forward --------------------------------------------------------------

    def forward(self, x, token_ids):
        B, T, C = x.shape
        xn = norm(x)
        ids = token_ids.reshape(-1)
        start = self.bounds[ids]  # (N,)
        cnt = self.bounds[ids + 1] - start
        off = torch.arange(self.k_max, device=x.device)
        valid = off < cnt.unsqueeze(-1)  # (N, k_max)
        rows = torch.where(valid, start.unsqueeze(-1) + off, torch.zeros_like(off))  # invalid -> row 0
        chunk = max(1, self.gather_budget // (self.k_max * C))
        key_table, value_table = (self.kv_weight, None) if self.tie_kv else (self.k_weight, self.v_weight)
        agg = _L3Attend.apply(xn.reshape(-1, C), key_table, value_table, rows, valid, chunk)
        up = norm(self.w_up(agg.view(B, T, C)))
        return self.w_mix(torch.cat([up, xn], dim=-1))

    def extra_repr(self):
        return (f"n_embd={self.n_embd}, n_emb={self.n_emb}, d_up={self.d_up}, tie_kv={self.tie_kv}, "
                f"vocab_size={self.vocab_size}, k_max={self.k_max}{'' if self.k_max_fixed else ' (derived)'}")
