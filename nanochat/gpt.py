"""
The GPT model. Notable features, each with its reason:
- rotary embeddings (base 100000), no positional table
- QK-norm (weightless RMSNorm, then x1.2 on q and k: logit temperature 1.44x the unit-norm one)
- untied token embedding and lm_head; no learnable norm parameters anywhere
- ReLU^2 MLP
- value embeddings (ResFormer) on alternating layers, gated per head
- per-layer residual scalars (resid_lambdas) and skip-to-embedding scalars (x0_lambdas)
- smear: the current token mixes in the previous token's embedding (a cheap bigram)
- backout: the mid-network residual is partly subtracted before the head
- sliding-window attention by a pattern of S(hort)/L(ong) layers, GQA support
- logit soft-cap 15*tanh(x/15)
- optional muP (mup_base_width > 0) and L3 lookup layers (l3_after_layers)
Dtype policy: master weights are fp32; Linear casts them to the activation dtype (common.COMPUTE_DTYPE).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanochat import common  # common.COMPUTE_DTYPE is read at use time: deciding it may query CUDA
from nanochat.common import Linear, SetupError, is_ddp_initialized, norm, one_line_error, print0
from nanochat.flash_attention import flash_attn
from nanochat.l3 import L3Layer
from nanochat.optim import DistMuonAdamW, MuonAdamW
from nanochat.sampling import sample_next_token


@dataclass
class GPTConfig:
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6  # query heads
    n_kv_head: int = 6  # key/value heads (GQA)
    n_embd: int = 768
    # per-layer pattern tiled over depth: L = full context, S = quarter context (rounded up to 128);
    # the last layer is always L
    window_pattern: str = "SSSL"
    mup_base_width: int = 0  # 0 = standard parametrisation; >0 = muP relative to this width
    l3_after_layers: str = ""  # comma-separated block indices followed by an L3 layer
    l3_n_emb: int = 0
    l3_d_up: int = 0  # 0 means 4 * n_embd
    l3_k_max: int = 32
    l3_tie_kv: bool = True


def config_for_depth(depth, aspect_ratio=64, head_dim=128, sequence_len=2048, vocab_size=32768, **kwargs):
    """The depth dial: width = depth * aspect_ratio rounded up to a whole number of heads, no GQA."""
    n_embd = -(-depth * aspect_ratio // head_dim) * head_dim
    n_head = n_embd // head_dim
    return GPTConfig(sequence_len=sequence_len, vocab_size=vocab_size, n_layer=depth, n_head=n_head,
                     n_kv_head=n_head, n_embd=n_embd, **kwargs)


def meta_model(config, bad_config):
    """
    GPT(config) on the meta device (shapes, no storage). A config no GPT is built of raises, in place of
    GPT's own error, bad_config(that error on one line): GPT raises AssertionError (heads that do not divide
    the width, a window pattern not of S and L), ValueError (L3 settings), ZeroDivisionError (zero heads)
    and RuntimeError (a negative size) for those.
    """
    try:
        with torch.device("meta"):
            return GPT(config)
    except SetupError:  # a setting to fix (NANOCHAT_DTYPE, say), not the config: its own message stands
        raise
    except (AssertionError, ValueError, ArithmeticError, RuntimeError) as e:
        raise bad_config(one_line_error(e)) from e


SMEAR_CHANNELS = 24  # embedding channels read by the smear gate
VE_GATE_CHANNELS = 12  # channels read by each value-embedding gate
LOGIT_SOFTCAP = 15.0
QK_SCALE = 1.2


def has_ve(layer_idx, n_layer):
    """Value embeddings on alternating layers; the last layer always has one."""
    return layer_idx % 2 == (n_layer - 1) % 2


def apply_rotary_emb(x, cos, sin):
    assert x.ndim == 4  # (B, T, heads, D)
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    # rotation by -theta over halves; the sign is part of the checkpoint format
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=3)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        assert config.n_embd % config.n_head == 0
        assert config.n_kv_head <= config.n_head and config.n_head % config.n_kv_head == 0
        n, hd = config.n_embd, self.head_dim
        self.c_q = Linear(n, self.n_head * hd, bias=False)
        self.c_k = Linear(n, self.n_kv_head * hd, bias=False)
        self.c_v = Linear(n, self.n_kv_head * hd, bias=False)
        self.c_proj = Linear(n, n, bias=False)
        ve = has_ve(layer_idx, config.n_layer)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if ve else None

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            # ResFormer value residual, gated per kv head; gate in (0, 3), starts near 1.5
            ve = ve.view(B, T, self.n_kv_head, self.head_dim)
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, Hkv)
            v = v + gate.unsqueeze(-1) * ve
        q, k = apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        if kv_cache is None:
            y = flash_attn.flash_attn_func(q, k, v, causal=True, window_size=window_size)
        else:
            k_cache, v_cache = kv_cache.get_layer_cache(self.layer_idx)
            y = flash_attn.flash_attn_with_kvcache(q, k_cache, v_cache, k=k, v=v,
                                                   cache_seqlens=kv_cache.cache_seqlens,
                                                   causal=True, window_size=window_size,
                                                   seqlen_range=kv_cache.position_range(),
                                                   pad_to_capacity=kv_cache.batch_invariant)
            if self.layer_idx == kv_cache.n_layers - 1:
                kv_cache.advance(T)  # every layer saw the same cache_seqlens during this forward
        return self.c_proj(y.contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window_size, kv_cache):
        x = x + self.attn(norm(x), ve, cos_sin, window_size, kv_cache)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, config, pad_vocab_size_to=64):
        """Builds shapes only; init_weights() writes every value. Works under torch.device('meta')."""
        super().__init__()
        self.config = config
        # configs that would build and fail only at init_weights() or the first forward
        head_dim = config.n_embd // max(config.n_head, 1)
        assert min(config.n_layer, config.vocab_size, config.sequence_len) >= 1, \
            "n_layer, vocab_size and sequence_len must be at least 1"
        assert config.n_embd >= SMEAR_CHANNELS, f"n_embd must be at least {SMEAR_CHANNELS} (the smear gate)"
        assert head_dim % 2 == 0, f"the head dim n_embd / n_head must be even (rotary pairs), got {head_dim}"
        self.window_sizes = self._compute_window_sizes(config)
        # padded vocab: faster matmuls, and divisible by any power-of-two world size up to 64
        V, n, L = config.vocab_size, config.n_embd, config.n_layer
        Vp = -(-V // pad_vocab_size_to) * pad_vocab_size_to
        if Vp != V:
            print0(f"Padding vocab_size from {V} to {Vp} for efficiency")
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(Vp, n),
            "h": nn.ModuleList([Block(config, i) for i in range(L)]),
        })
        self.lm_head = Linear(n, Vp, bias=False)
        # registration order fixes named_parameters() order, hence optimizer groups and rank ownership
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(0.2 * torch.ones(1))
        kv_dim = config.n_kv_head * (n // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, kv_dim)
                                           for i in range(L) if has_ve(i, L)})
        self.l3_layers = nn.ModuleDict(self._build_l3_layers(config))
        self.rotary_seq_len = config.sequence_len * 10  # headroom for generation past the training length
        cos, sin = self._precompute_rotary_embeddings(self.rotary_seq_len, n // config.n_head)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    @staticmethod
    def _build_l3_layers(config):
        """An L3 layer after each block index in config.l3_after_layers (empty: L3 off), keyed by it."""
        try:
            layers = sorted({int(s) for s in config.l3_after_layers.split(",") if s.strip()})
        except ValueError:
            raise ValueError(f"l3_after_layers must be comma-separated integers, "
                             f"got {config.l3_after_layers!r}") from None
        for i in layers:
            if not 0 <= i < config.n_layer:
                raise ValueError(f"l3_after_layers index {i} out of range [0, {config.n_layer - 1}]")
        if layers and config.l3_n_emb < config.vocab_size:
            raise ValueError(f"l3_n_emb ({config.l3_n_emb}) must be >= vocab_size ({config.vocab_size})")
        d_up = config.l3_d_up if config.l3_d_up > 0 else 4 * config.n_embd
        return {str(i): L3Layer(config.n_embd, config.l3_n_emb, d_up, tie_kv=config.l3_tie_kv,
                                vocab_size=config.vocab_size, k_max=config.l3_k_max) for i in layers}

    @torch.no_grad()
    def init_weights(self):
        """
        Every initial value, in the reference's RNG draw order (bitwise reproducible from the RNG
        state at entry): wte N(0, 0.8); lm_head N(0, 0.001); q, k, v U(+-sqrt(3/n)) (std 1/sqrt(n));
        c_fc 0.4x that; both output projections 0, so every block starts as the identity.
        """
        cfg, n, L = self.config, self.config.n_embd, self.config.n_layer
        mup = cfg.mup_base_width
        s = 3 ** 0.5 * n ** -0.5
        torch.nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8)
        lm_std = 0.001 * (mup / n) ** 0.5 if mup > 0 else 0.001  # muP: output layer shrinks with width
        torch.nn.init.normal_(self.lm_head.weight, mean=0.0, std=lm_std)
        for block in self.transformer.h:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v):
                torch.nn.init.uniform_(lin.weight, -s, s)
            torch.nn.init.zeros_(block.attn.c_proj.weight)
            torch.nn.init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s)
            torch.nn.init.zeros_(block.mlp.c_proj.weight)
        for i in range(L):
            frac = i / max(L - 1, 1)
            self.resid_lambdas[i] = 1.15 - 0.10 * frac
            self.x0_lambdas[i] = 0.20 - 0.15 * frac
        self.smear_lambda.fill_(0.0)
        self.backout_lambda.fill_(0.2)
        torch.nn.init.uniform_(self.smear_gate.weight, 0.0, 0.02)
        ve_bound = 3 ** 0.5 * mup ** -0.5 if mup > 0 else s  # muP: input-like, constant in width
        for ve in self.value_embeds.values():
            torch.nn.init.uniform_(ve.weight, -ve_bound, ve_bound)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                torch.nn.init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02)
        for key in sorted(self.l3_layers, key=int):  # after all reference draws: non-L3 RNG use unchanged
            self.l3_layers[key].reset_parameters()
        self.cos, self.sin = self._precompute_rotary_embeddings(self.rotary_seq_len, n // cfg.n_head)
        if common.COMPUTE_DTYPE != torch.float16:
            # embedding tables in the compute dtype halve their memory; under fp16 they stay fp32
            # because GradScaler.unscale_ refuses fp16 gradients
            for emb in self._embedding_tables():
                emb.data = emb.data.to(common.COMPUTE_DTYPE)

    def _embedding_tables(self):
        tables = [self.transformer.wte.weight] + [ve.weight for ve in self.value_embeds.values()]
        return tables + self._l3_tables()

    def _l3_tables(self):
        return [table for layer in self.l3_layers.values() for table in layer.tables()]

    def _l3_matrices(self):
        return [p for layer in self.l3_layers.values() for p in (layer.w_up.weight, layer.w_mix.weight)]

    def _precompute_rotary_embeddings(self, seq_len, head_dim, base=100000, device=None):
        device = self.transformer.wte.weight.device if device is None else device
        channel_range = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
        inv_freq = 1.0 / (base ** (channel_range / head_dim))
        t = torch.arange(seq_len, dtype=torch.float32, device=device)
        freqs = torch.outer(t, inv_freq)
        cos, sin = freqs.cos().to(common.COMPUTE_DTYPE), freqs.sin().to(common.COMPUTE_DTYPE)
        return cos[None, :, None, :], sin[None, :, None, :]  # (1, seq_len, 1, head_dim/2)

    def _compute_window_sizes(self, config):
        pattern = config.window_pattern.upper()
        assert pattern and set(pattern) <= set("SL"), f"Invalid window_pattern: {pattern}. Use only S and L."
        T = config.sequence_len
        window = {"L": T, "S": -((-T) // 4 // 128) * 128}  # S: quarter context rounded up to 128 (2048: 512)
        sizes = [(window[pattern[i % len(pattern)]], 0) for i in range(config.n_layer - 1)]
        return sizes + [(T, 0)]  # the last layer is always long

    def get_device(self):
        return self.transformer.wte.weight.device

    def _matrix_params(self):
        """The Muon-trained matrices: every block parameter plus the L3 projections."""
        return list(self.transformer.h.parameters()) + self._l3_matrices()

    def estimate_flops(self):
        """
        Training FLOPs per token (forward + backward): 6 per matmul parameter (block matrices and
        lm_head; lookups and scalars are free) plus attention scores and values, 12 * H * D * window
        per layer with the window capped at sequence_len (PaLM convention, ignores causal halving).
        """
        cfg = self.config
        matmul_params = sum(p.numel() for p in self._matrix_params()) + self.lm_head.weight.numel()
        head_dim = cfg.n_embd // cfg.n_head
        T = cfg.sequence_len
        attn_flops = sum(12 * cfg.n_head * head_dim * min(w, T) for w, _ in self.window_sizes)
        flops = 6 * matmul_params + attn_flops
        if len(self.l3_layers) > 0:  # L3: score + aggregation over the average allocation, x3 for fwd+bwd
            flops += len(self.l3_layers) * 12 * (cfg.l3_n_emb / cfg.vocab_size) * cfg.n_embd
        return flops

    def num_scaling_params(self):
        count = lambda params: sum(p.numel() for p in params)
        counts = {
            "wte": count(self.transformer.wte.parameters()),
            "value_embeds": count(self.value_embeds.parameters()),
            "lm_head": count(self.lm_head.parameters()),
            "transformer_matrices": count(self.transformer.h.parameters()),
        }
        if len(self.l3_layers) > 0:  # only then, so the printed lines of non-L3 runs stay as they were
            counts["l3_embeds"] = count(self._l3_tables())
            counts["l3_matrices"] = count(self._l3_matrices())
        counts["scalars"] = count([self.resid_lambdas, self.x0_lambdas, self.smear_gate.weight,
                                   self.smear_lambda, self.backout_lambda])
        counts["total"] = sum(counts.values())
        assert counts["total"] == count(self.parameters()), "Parameter count mismatch"
        return counts

    def setup_optimizer(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                        scalar_lr=0.5, use_mup=None, base_width=None):
        """MuonAdamW (DistMuonAdamW when a process group is up) over the groups of param_groups()."""
        groups = self.param_groups(unembedding_lr, embedding_lr, matrix_lr, weight_decay, scalar_lr, use_mup,
                                   base_width)
        factory = DistMuonAdamW if is_ddp_initialized() else MuonAdamW
        optimizer = factory(groups)
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        return optimizer

    def _adamw_lr_scale(self, use_mup, base_width):
        cfg, n = self.config, self.config.n_embd
        if use_mup is None:
            use_mup = cfg.mup_base_width > 0
        if use_mup:
            if cfg.mup_base_width <= 0:
                raise ValueError("use_mup=True needs a model built with GPTConfig.mup_base_width > 0")
            if base_width is not None and base_width != cfg.mup_base_width:
                raise ValueError(f"base_width={base_width} does not match the model's "
                                 f"mup_base_width={cfg.mup_base_width}")
            b = cfg.mup_base_width
            scale = (b / 768) ** -0.5  # LRs are the base model's: constant in width
            print0(f"muP: base_width={b}, n_embd={n}, AdamW LR scale (b/768)^-0.5={scale:.6f}")
            return scale
        if cfg.mup_base_width > 0:
            print0("Warning: model uses muP (mup_base_width > 0) but the optimizer uses SP learning rates")
        scale = (n / 768) ** -0.5  # SP: AdamW LRs were tuned at width 768
        print0(f"Scaling the LR for the AdamW parameters ∝1/√({n}/768) = {scale:.6f}")
        return scale

    def param_groups(self, unembedding_lr=0.004, embedding_lr=0.2, matrix_lr=0.02, weight_decay=0.0,
                     scalar_lr=0.5, use_mup=None, base_width=None):
        """Every parameter in exactly one group; the group order is part of the optimizer's state_dict."""
        scale = self._adamw_lr_scale(use_mup, base_width)
        sp_scale = (self.config.n_embd / 768) ** -0.5

        def adamw(params, lr, betas, wd):
            return dict(kind="adamw", params=params, lr=lr, betas=betas, eps=1e-10, weight_decay=wd)
        groups = [
            adamw(list(self.lm_head.parameters()), unembedding_lr * scale, (0.8, 0.96), 0.01),
            adamw(list(self.transformer.wte.parameters()), embedding_lr * scale, (0.8, 0.995), 0.001),
            adamw(list(self.value_embeds.parameters()), embedding_lr * scale * 0.5, (0.8, 0.995), 0.01),
            adamw([self.resid_lambdas], scalar_lr * 0.01, (0.8, 0.95), 0.05),
            adamw([self.x0_lambdas], scalar_lr, (0.96, 0.95), 0.0),
            adamw([self.smear_gate.weight, self.smear_lambda, self.backout_lambda], 0.2, (0.8, 0.95), 0.0),
        ]
        if len(self.l3_layers) > 0:  # sparse per-token rows: AdamW like value embeddings, SP scale (even muP)
            groups.append(adamw(self._l3_tables(), embedding_lr * sp_scale * 0.5, (0.8, 0.995), 0.01))
        matrices = self._matrix_params()
        for shape in sorted({p.shape for p in matrices}):
            groups.append(dict(kind="muon", params=[p for p in matrices if p.shape == shape], lr=matrix_lr,
                               momentum=0.95, ns_steps=5, beta2=0.9, weight_decay=weight_decay))
        n_grouped = sum(len(g["params"]) for g in groups)
        assert n_grouped == len(list(self.parameters())), "every parameter must be in exactly one group"
        return groups

    def _smear(self, x, kv_cache):
        """Mix each position's normalised embedding with the previous one's, gated by the current token."""
        x_prev = None
        if kv_cache is not None:
            x_prev = kv_cache.prev_embedding
            kv_cache.prev_embedding = x[:, -1:, :]
        lam = self.smear_lambda.to(x.dtype)
        # gated only where it is used, on the reference's slices: a matmul's last bits depend on its shape
        gate = lambda xs: lam * torch.sigmoid(self.smear_gate(xs[..., :SMEAR_CHANNELS]))  # (B, t, 1)
        if x.size(1) > 1:
            mixed = x[:, 1:] + gate(x[:, 1:]) * x[:, :-1]
            # continuing a cached sequence: position 0 mixes with the cached embedding, so a chunked
            # prefill equals a single one (without it, each chunk boundary would change the output)
            first = x[:, :1] if x_prev is None else x[:, :1] + gate(x[:, :1]) * x_prev
            return torch.cat([first, mixed], dim=1)
        return x if x_prev is None else x + gate(x) * x_prev

    def _rotary_for(self, T, kv_cache):
        """(cos, sin) for the T new positions: sliced (1, T, 1, D/2) when every cache row is at the same
        position, else gathered per row (B, T, 1, D/2) for rows at different positions (continuous
        batching)."""
        low, high = (0, 0) if kv_cache is None else kv_cache.position_range()
        assert high + T <= self.cos.size(1), (
            f"Sequence length grew beyond the rotary embeddings cache: {high + T} > {self.cos.size(1)}")
        if low == high:
            return self.cos[:, low:low + T], self.sin[:, low:low + T]
        positions = kv_cache.cache_seqlens.long()[:, None] + torch.arange(T, device=self.cos.device)  # (B, T)
        return self.cos[0, positions], self.sin[0, positions]

    def forward(self, idx, targets=None, kv_cache=None, loss_reduction="mean"):
        B, T = idx.size()
        assert idx.device == self.cos.device, (
            f"Rotary embeddings and idx are on different devices: {idx.device} != {self.cos.device}")
        dtype = common.COMPUTE_DTYPE
        assert self.cos.dtype == dtype, f"Rotary embeddings must be in {dtype}, got {self.cos.dtype}"
        cos_sin = self._rotary_for(T, kv_cache)

        x = norm(self.transformer.wte(idx).to(dtype))
        x = self._smear(x, kv_cache)
        x0 = x
        backout_layer = self.config.n_layer // 2
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.window_sizes[i], kv_cache)
            if str(i) in self.l3_layers:
                x = x + self.l3_layers[str(i)](x, idx)
            if i == backout_layer:
                x_backout = x
        x = norm(x - self.backout_lambda.to(x.dtype) * x_backout)

        logits = self.lm_head(x)  # (B, T, Vp)
        if self.config.mup_base_width > 0:
            logits = logits * (self.config.mup_base_width / self.config.n_embd)  # muP output multiplier
        V = self.config.vocab_size
        logits = logits[..., :V].float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, V), targets.reshape(-1), ignore_index=-1,
                               reduction=loss_reduction)

    @torch.inference_mode()
    def generate(self, tokens, max_tokens, temperature=1.0, top_k=None, seed=42):
        """Naive batch-1 sampling, re-running the full forward each step (the Engine is the fast path).
        Same sampler and seeded generator as the Engine, so both draw the same tokens for the same seed."""
        assert isinstance(tokens, list)
        device = self.get_device()
        rng = torch.Generator(device=device).manual_seed(seed)  # unused when greedy, as in the Engine
        ids = torch.tensor([tokens], dtype=torch.long, device=device)
        for _ in range(max_tokens):
            logits = self.forward(ids)[:, -1, :]  # (1, V)
            next_id = sample_next_token(logits, rng, temperature, top_k)
            ids = torch.cat((ids, next_id), dim=1)
            yield next_id.item()
