"""
Write a checkpoint as a Hugging Face `transformers` model directory (scripts/export_hf):
config.json (auto_map to modeling_nanochat.py, a copy of nanochat/hf_modeling.py), model.safetensors (fp32,
nanochat's parameter names), tokenizer.json and tokenizer_config.json (the BPE as a `tokenizers` byte-level
BPE, the special tokens, the chat template), generation_config.json and a README.md model card.
The directory is built beside the target and renamed into place, so it appears whole or not at all.
The other direction too: any Hugging Face causal LM (an export included) loaded for base_eval --hf-path.
"""

import json
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from nanochat.common import (BadFileError, BadSettingError, MissingFileError, SetupError, one_line_error,
                             print0, progress)
from nanochat.tokenizer import SPECIAL_TOKENS

# Renders the ids of RustBPETokenizer.render_for_completion (messages without the final assistant reply,
# add_generation_prompt=True): a leading system message joins the first user message after "\n\n"
# and refuses, as it does, the conversations the model was never trained on
CHAT_TEMPLATE = (
    "{%- set offset = 1 if messages and messages[0].role == 'system' else 0 -%}"
    "{%- if messages|length <= offset or messages[offset].role != 'user' -%}"
    "{{- raise_exception('the conversation must start with a user message, after an optional system "
    "message') -}}{%- endif -%}"
    "{%- set ns = namespace(system='') -%}{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- set expected = 'system' if loop.index0 < offset "
    "else ['user', 'assistant'][(loop.index0 - offset) % 2] -%}"
    "{%- if m.role != expected -%}{{- raise_exception('message ' ~ loop.index0 ~ ' is from ' ~ m.role ~ "
    "' but should be from ' ~ expected ~ ': roles must alternate user, assistant, ... starting with user'"
    ") -}}"
    "{%- endif -%}"
    "{%- if m.role != 'assistant' and m.content is not string -%}"
    "{{- raise_exception('the content of message ' ~ loop.index0 ~ ' (' ~ m.role ~ ') must be a string') -}}"
    "{%- endif -%}"
    "{%- if m.role == 'system' -%}{%- set ns.system = m.content + '\n\n' -%}"
    "{%- elif m.role == 'user' -%}{{- '<|user_start|>' + ns.system + m.content + '<|user_end|>' -}}"
    "{%- set ns.system = '' -%}"
    "{%- else -%}{{- '<|assistant_start|>' -}}"
    "{%- if m.content is string -%}{{- m.content -}}{%- else -%}{%- for p in m.content -%}"
    "{%- if p.type == 'python' -%}{{- '<|python_start|>' + p.text + '<|python_end|>' -}}"
    "{%- elif p.type == 'python_output' -%}{{- '<|output_start|>' + p.text + '<|output_end|>' -}}"
    "{%- else -%}{{- p.text -}}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|assistant_end|>' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant_start|>' -}}{%- endif -%}"
)
MODEL_CARD = """---
library_name: transformers
tags: [nanochat]
---
# nanochat d{depth} ({source})

| | |
|---|---|
{table}

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=True)
```

The model takes no padding and has no KV cache: `generate()` re-runs the sequence each step. Unlike
nanochat's own tokenizer, this one reads special-token text (such as `<|assistant_end|>`) inside user text
as the special token.
"""
EXPORT_MODEL_TYPE = "nanochat_gpt"  # config.json's model_type: hf_modeling.NanochatConfig.model_type
CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "window_pattern",
               "mup_base_width")


def check_exportable(config):
    """A BadFileError naming the training flag of a feature modeling_nanochat.py does not implement."""
    if config.l3_after_layers.strip():
        raise BadFileError(f"this checkpoint has L3 layers (--l3-after-layers={config.l3_after_layers}), "
                           f"which the Hugging Face export does not implement; export a model trained "
                           f"without them")


def _byte_chars():
    """The byte-level alphabet of `tokenizers` (GPT-2's): printable Latin-1 bytes stand for themselves,
    the other bytes, in order, for the characters from U+0100 on."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    others = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(others)) for b in range(256)}


def _last_merge(token, ranks):
    """The two tokens whose merge makes `token`: its BPE parts when only lower ranks may merge."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], len(ranks)), i) for i in range(len(parts) - 1))
        if rank >= ranks[token]:
            raise BadFileError(f"token {token!r} is not reachable by BPE merges of lower rank")
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def hf_tokenizer(tokenizer):
    """A `tokenizers.Tokenizer` that encodes as our tiktoken-run BPE: merge order = rank order, and a
    piece that is a whole token is taken as it is (ignore_merges), as tiktoken does. With special tokens
    (transformers' default: `tokenizer(text)`, and what lm-eval's add_bos_token=True asks for) <|bos|> goes
    in front, as every pretraining document starts with it; chat templates write it themselves and are
    tokenized without special tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    enc, chars = tokenizer.enc, _byte_chars()
    special_ids = {tokenizer.encode_special(name): name for name in SPECIAL_TOKENS}
    try:
        ranks = {enc.decode_single_token_bytes(i): i for i in range(enc.n_vocab) if i not in special_ids}
    except KeyError as e:  # tiktoken's, for an id no token has
        raise BadFileError(f"token id {e.args[0]} has no token: the export needs ids 0..{enc.n_vocab - 1} "
                           f"without gaps; retrain the tokenizer with scripts.tok_train (no gaps)") from None
    text = lambda token: "".join(chars[b] for b in token)
    merges = [tuple(map(text, _last_merge(t, ranks))) for t in sorted(ranks, key=ranks.get) if len(t) > 1]
    hf = Tokenizer(BPE(vocab={text(t): i for t, i in ranks.items()}, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(enc._pat_str), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(special_ids[i], special=True, normalized=False)
                           for i in sorted(special_ids)])
    if any(hf.token_to_id(name) != i for i, name in special_ids.items()):
        raise BadFileError("special tokens must take the ids right after the BPE tokens to export them")
    hf.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B:1",
        special_tokens=[("<|bos|>", tokenizer.get_bos_token_id())])
    return hf


def export_token_bytes(hf_tokenizer, device="cpu"):
    """compute_token_bytes of an export's tokenizer (a HuggingFaceTokenizer): special tokens 0, the others
    their byte count, which is their length in the byte-level alphabet (one character per byte)."""
    specials = set(hf_tokenizer.get_special_tokens())
    counts = [0 if (token := hf_tokenizer.id_to_token(i)) in specials else len(token)
              for i in range(hf_tokenizer.get_vocab_size())]
    return torch.tensor(counts, dtype=torch.int32, device=device)


def model_card(meta, cfg, source, params):
    """The README.md of an export; cfg is the model's GPTConfig, not meta's model_config, which older
    checkpoints write without window_pattern (the loader fills it in)."""
    rows = [("Source", f"nanochat {source} checkpoint, step {meta['step']}"), ("Parameters", f"{params:,}"),
            ("Layers / width / heads (kv heads)", f"{cfg.n_layer} / {cfg.n_embd} / {cfg.n_head} "
                                                  f"({cfg.n_kv_head})"),
            ("Context / window pattern", f"{cfg.sequence_len} / {cfg.window_pattern}"),
            ("Vocabulary", f"{cfg.vocab_size:,}")]
    if source == "base" and meta.get("total_batch_size"):
        rows.append(("Training tokens", f"{meta['total_batch_size'] * meta['step']:,}"))
    scores = (("val_bpb", "Validation bpb"), ("core_metric", "CORE"), ("chatcore_metric", "ChatCORE"))
    rows += [(label, f"{meta[key]:.4f}") for key, label in scores if meta.get(key) is not None]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return MODEL_CARD.format(depth=cfg.n_layer, source=source, table=table)


def _write_json(path, obj):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)


def _write_files(out, model, tokenizer, meta, source):
    try:
        from safetensors.torch import save_file
    except ImportError as e:
        raise SetupError("the export needs the `safetensors` package: uv sync --extra hf") from e
    cfg, special = model.config, tokenizer.encode_special
    bos, eos = tokenizer.get_bos_token_id(), special("<|assistant_end|>")
    bar = progress(total=4, desc="export", unit="part")  # weights, modeling+config, tokenizer, model card
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    try:
        save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    except Exception as e:  # safetensors reports a full disk as its own SafetensorError ("I/O error: ...")
        if "I/O error" not in str(e):
            raise
        raise OSError(str(e)) from e
    bar.update()
    # copied, not imported: writing an export needs no transformers
    modeling = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_modeling.py")
    shutil.copyfile(modeling, os.path.join(out, "modeling_nanochat.py"))
    _write_json(os.path.join(out, "config.json"), {
        "architectures": ["NanochatForCausalLM"], "model_type": EXPORT_MODEL_TYPE, "torch_dtype": "float32",
        "auto_map": {"AutoConfig": "modeling_nanochat.NanochatConfig",
                     "AutoModelForCausalLM": "modeling_nanochat.NanochatForCausalLM"},
        **{key: getattr(cfg, key) for key in CONFIG_KEYS}, "bos_token_id": bos, "eos_token_id": eos})
    # safetensors creates its file 0600 whatever the umask: give it the mode of the files open() makes
    shutil.copymode(os.path.join(out, "config.json"), os.path.join(out, "model.safetensors"))
    # generation stops where the Engine stops: at the end of the reply or at a new document
    _write_json(os.path.join(out, "generation_config.json"), {
        "bos_token_id": bos, "eos_token_id": [eos, bos], "pad_token_id": bos, "do_sample": False})
    bar.update()
    hf_tokenizer(tokenizer).save(os.path.join(out, "tokenizer.json"))
    _write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>",
        "eos_token": "<|assistant_end|>", "pad_token": "<|bos|>", "model_max_length": cfg.sequence_len,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE})
    bar.update()
    with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(meta, cfg, source, sum(v.numel() for v in weights.values())))
    bar.update()
    bar.close()


def export(model, tokenizer, meta, source, output_dir):
    """Write the export of (model, tokenizer, meta) to output_dir, which must not exist or be empty."""
    check_exportable(model.config)
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise BadSettingError(f"{output_dir} already exists and is not an empty directory; remove it or "
                              f"choose another --output")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output_dir)}.", dir=parent)
    try:
        os.chmod(staging, 0o755)  # mkdtemp's 0700 would make the export private
        _write_files(staging, model, tokenizer, meta, source)
        os.replace(staging, output_dir)  # replaces an empty directory, refuses a non-empty one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output_dir


# -----------------------------------------------------------------------------
# HuggingFace causal LMs, evaluated like a nanochat GPT (base_eval --hf-path)

class ModelWrapper:
    """Gives a HuggingFace causal LM the call signature of nanochat's GPT."""

    def __init__(self, model, max_seq_len=None):
        self.model = model
        self.max_seq_len = max_seq_len  # core_eval crops prompts to it; None = no limit

    def __call__(self, input_ids, targets=None, loss_reduction="mean"):
        logits = self.model(input_ids).logits
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1),
                               ignore_index=-1, reduction=loss_reduction)

    def get_device(self):
        return next(self.model.parameters()).device


def get_hf_token_bytes(tokenizer, device="cpu"):
    """
    (vocab_size,) int64: the UTF-8 length of each token decoded on its own by the `tokenizers` library with
    its default skip_special_tokens=True, as the reference computes it: special tokens ("<|endoftext|>")
    decode to "" and count 0, so they drop out of bpb; a token holding part of a UTF-8 character counts as
    its replacement character (3).
    """
    vocab_size = tokenizer.get_vocab_size()
    counts = [len(tokenizer.tokenizer.decode([token_id]).encode("utf-8")) for token_id in range(vocab_size)]
    return torch.tensor(counts, dtype=torch.int64, device=device)


def load_hf_model(hf_path, device):
    """(model, tokenizer, token_bytes, sequence_len, name, slug) for a HuggingFace causal LM."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SetupError("--hf-path needs the `transformers` package: pip install transformers "
                         "(or `uv sync --extra hf`)") from e
    from nanochat.tokenizer import HuggingFaceTokenizer
    print0(f"Loading HuggingFace model from: {hf_path}")
    # a local directory, such as a scripts.export_hf export, runs the modeling code it ships with
    local = os.path.isdir(hf_path)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(hf_path, trust_remote_code=local).to(device).eval()
    except (OSError, ValueError) as e:  # no model in that directory, not on the hub, the hub unreachable
        raise MissingFileError(f"--hf-path {hf_path}: no model could be loaded from it "
                               f"({one_line_error(e)}). Fix: pass a directory written by `python -m "
                               f"scripts.export_hf`, or a model name on the Hugging Face hub (with the "
                               f"network)") from None
    ours = hf_model.config.model_type == EXPORT_MODEL_TYPE
    # GPT-2's position table has 1024 rows; our export, whatever its name, crops nothing, as our checkpoint
    max_seq_len = 1024 if "gpt2" in hf_path and not ours else None
    load_tokenizer = HuggingFaceTokenizer.from_directory if local else HuggingFaceTokenizer.from_pretrained
    tokenizer = load_tokenizer(hf_path)
    slug = hf_path.replace("/", "-")
    if ours:  # our bpb table and context
        sequence_len, token_bytes = hf_model.config.sequence_len, export_token_bytes(tokenizer, device)
    else:
        sequence_len, token_bytes = max_seq_len or 1024, get_hf_token_bytes(tokenizer, device)
    return ModelWrapper(hf_model, max_seq_len), tokenizer, token_bytes, sequence_len, hf_path, slug
