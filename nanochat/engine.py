"""
Inference engine. For now: the KV cache that GPT.forward and the attention kernels write into.
"""

import torch


class KVCache:
    """
    Fixed-capacity key/value cache in the FA3 layout: per layer (B, T_max, H_kv, D).
    The attention kernel writes new keys/values in place at [pos, pos + T_new); the model's last
    layer then calls advance(T_new). prev_embedding carries the smear feature across calls.
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
        self.prev_embedding = None  # (B, 1, n_embd), last pre-smear embedding seen

    def reset(self):
        self.cache_seqlens.zero_()
        self.prev_embedding = None

    def get_pos(self):
        return int(self.cache_seqlens[0].item())

    def get_layer_cache(self, layer_idx):
        return self.k_cache[layer_idx], self.v_cache[layer_idx]

    def advance(self, num_tokens):
        self.cache_seqlens += num_tokens

    def prefill(self, other):
        """Copy a (typically batch-1) cache into this empty one, broadcasting over rows."""
        assert self.get_pos() == 0, "Cannot prefill a non-empty KV cache"
        assert (self.n_layers, self.n_heads, self.head_dim) == (other.n_layers, other.n_heads, other.head_dim)
        assert self.max_seq_len >= other.max_seq_len
        pos = other.get_pos()
        self.k_cache[:, :, :pos] = other.k_cache[:, :, :pos]
        self.v_cache[:, :, :pos] = other.v_cache[:, :, :pos]
        self.cache_seqlens.fill_(pos)
        if other.prev_embedding is not None:
            self.prev_embedding = other.prev_embedding.expand(self.batch_size, -1, -1).clone()
