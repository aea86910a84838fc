"""
The nanochat GPT as a Hugging Face `transformers` model. scripts/export_hf copies this file into an export
as modeling_nanochat.py, so it imports only torch, transformers and the standard library, and repeats the
forward of nanochat/gpt.py (the export test holds the two to the same logits): rotary embeddings, QK-norm,
ReLU^2, value embeddings, smear, backout, sliding windows, GQA, logit soft-cap, muP output multiplier.
Parameter names are nanochat's, so a checkpoint's state_dict loads as it is.
There is no KV cache (the smear and the windows would need their own): generate() re-runs the whole
sequence each step, which is exact and fine for the short replies of small models.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput

SMEAR_CHANNELS, VE_GATE_CHANNELS, LOGIT_SOFTCAP, QK_SCALE, ROPE_BASE = 24, 12, 15.0, 1.2, 100000


class NanochatConfig(PretrainedConfig):
    model_type = "nanochat_gpt"  # not "nanochat": transformers 5 has a built-in model of that name
    attribute_map = {"num_hidden_layers": "n_layer", "hidden_size": "n_embd", "num_attention_heads": "n_head",
                     "num_key_value_heads": "n_kv_head", "max_position_embeddings": "sequence_len"}

    def __init__(self, sequence_len=2048, vocab_size=32768, n_layer=12, n_head=6, n_kv_head=6, n_embd=768,
                 window_pattern="SSSL", mup_base_width=0, **kwargs):
        self.sequence_len, self.vocab_size, self.n_layer = sequence_len, vocab_size, n_layer
        self.n_head, self.n_kv_head, self.n_embd = n_head, n_kv_head, n_embd
        self.window_pattern, self.mup_base_width = window_pattern, mup_base_width
        # lm_head and wte are separate tables; left at True, transformers 4.x ties them on loading
        super().__init__(**{"tie_word_embeddings": False, **kwargs})


def norm(x):
    return F.rms_norm(x, (x.size(-1),))


def has_ve(layer_idx, n_layer):
    return layer_idx % 2 == (n_layer - 1) % 2


def window_sizes(config):
    """Left window per layer: L = the full context, S = a quarter of it rounded up to 128; the last is L."""
    long_window = config.sequence_len
    short_window = -((-long_window) // 4 // 128) * 128
    pattern = config.window_pattern.upper()
    sizes = [long_window if pattern[i % len(pattern)] == "L" else short_window for i in range(config.n_layer)]
    return sizes[:-1] + [long_window]


def rotary(T, head_dim, dtype, device):
    channels = torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
    inv_freq = 1.0 / (ROPE_BASE ** (channels / head_dim))
    freqs = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos().to(dtype)[None, :, None, :], freqs.sin().to(dtype)[None, :, None, :]


def apply_rotary_emb(x, cos, sin):
    d = x.shape[3] // 2
    x1, x2 = x[..., :d], x[..., d:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=3)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        n, self.n_head, self.n_kv_head = config.n_embd, config.n_head, config.n_kv_head
        self.head_dim = n // config.n_head
        self.c_q = nn.Linear(n, self.n_head * self.head_dim, bias=False)
        self.c_k = nn.Linear(n, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = nn.Linear(n, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = nn.Linear(n, n, bias=False)
        ve = has_ve(layer_idx, config.n_layer)
        self.ve_gate = nn.Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if ve else None

    def forward(self, x, ve, cos_sin, window):
        B, T, C = x.size()
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim)
        if ve is not None:
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * ve.view(B, T, self.n_kv_head, self.head_dim)
        q, k = apply_rotary_emb(q, *cos_sin), apply_rotary_emb(k, *cos_sin)
        q, k = norm(q) * QK_SCALE, norm(k) * QK_SCALE
        # causal with a left window: query i sees keys i - window .. i
        pos = torch.arange(T, device=x.device)
        visible = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] <= window)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=visible, enable_gqa=self.n_head != self.n_kv_head)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x):
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attn = Attention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x, ve, cos_sin, window):
        x = x + self.attn(norm(x), ve, cos_sin, window)
        return x + self.mlp(norm(x))


class NanochatForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = NanochatConfig
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        V, n, L = config.vocab_size, config.n_embd, config.n_layer
        Vp = -(-V // 64) * 64  # the checkpoint's tables are padded to a multiple of 64 rows
        self.transformer = nn.ModuleDict({"wte": nn.Embedding(Vp, n),
                                          "h": nn.ModuleList([Block(config, i) for i in range(L)])})
        self.lm_head = nn.Linear(n, Vp, bias=False)
        self.resid_lambdas = nn.Parameter(torch.ones(L))
        self.x0_lambdas = nn.Parameter(torch.zeros(L))
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        kv_dim = config.n_kv_head * (n // config.n_head)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(Vp, kv_dim)
                                           for i in range(L) if has_ve(i, L)})
        self.windows = window_sizes(config)
        self.post_init()

    def _smear(self, x):
        """Each position mixes in the previous position's embedding, gated by its own."""
        # the gate on x[:, 1:] only, as nanochat computes it: a matmul's last bits depend on its shape
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[:, 1:, :SMEAR_CHANNELS]))
        return torch.cat([x[:, :1], x[:, 1:] + gate * x[:, :-1]], dim=1)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("attention_mask has padding, which nanochat models do not take: "
                             "pass rows of equal length")
        cfg, T = self.config, input_ids.size(1)
        x = norm(self.transformer.wte(input_ids).to(self.lm_head.weight.dtype))
        x = x0 = self._smear(x)
        cos_sin = rotary(T, cfg.n_embd // cfg.n_head, x.dtype, x.device)
        x_backout = None
        for i, block in enumerate(self.transformer.h):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            ve = self.value_embeds[str(i)](input_ids).to(x.dtype) if str(i) in self.value_embeds else None
            x = block(x, ve, cos_sin, self.windows[i])
            if i == cfg.n_layer // 2:
                x_backout = x
        logits = self.lm_head(norm(x - self.backout_lambda.to(x.dtype) * x_backout))
        if cfg.mup_base_width > 0:
            logits = logits * (cfg.mup_base_width / cfg.n_embd)
        logits = logits[..., :cfg.vocab_size].float()
        logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        loss = None
        if labels is not None:  # HF convention: labels are the inputs, shifted here
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": input_ids}  # no cache: the whole sequence every step
