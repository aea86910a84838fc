"""
Checkpoints: save and load model weights, per-rank optimizer shards and JSON metadata; rebuild a GPT from
them; find the newest model tag and step. The layout is the reference's, so checkpoints move between the
two code bases either way:

    <base_dir>/{base,chatsft,chatrl}_checkpoints/<model_tag>/     (source "base", "sft", "rl")
        model_{step:06d}.pt             torch.save of the uncompiled model's state_dict (rank 0)
        optim_{step:06d}_rank{r}.pt     torch.save of rank r's optimizer state_dict (sharded)
        meta_{step:06d}.json            metadata, json indent=2, UTF-8 (rank 0)

Every file is written in full to <name>.tmp.<pid> first and renamed into place only when all of the step's
files are complete, the meta file last: a meta file marks a complete checkpoint, and a step being re-saved
loses its old meta only once the replacements are complete. The next save removes the temp files of killed
writers. model_config holds the muP / L3 keys only when that feature is on, so a plain model's meta is
exactly the reference's (its GPTConfig(**kwargs) accepts it). The meta keeps json's allow_nan: an infinite
min_val_bpb is written as `Infinity`, as the reference writes and reads it (strict JSON parsers reject it).
Loading ignores, with a warning, the model_config keys this GPTConfig does not know: a newer writer's meta
loads as long as its weights fit the model built without them.
"""

import dataclasses
import json
import logging
import os
import re
import shutil

import torch
import torch.distributed as dist

from nanochat.common import (BadFileError, MissingFileError, SetupError, _env_rank, get_base_dir,
                             is_ddp_initialized, one_line_error, rank_and_world)
from nanochat.flash_attention import decide_backend
from nanochat.gpt import GPT, GPTConfig, meta_model
from nanochat.tokenizer import get_tokenizer

logger = logging.getLogger(__name__)

# checkpoint source -> (its directory under the base dir, the command that writes it)
CHECKPOINT_SOURCES = {"base": ("base_checkpoints", "python -m scripts.base_train"),
                      "sft": ("chatsft_checkpoints", "python -m scripts.chat_sft"),
                      "rl": ("chatrl_checkpoints", "python -m scripts.chat_rl")}
CHECKPOINT_DIRS = {source: directory for source, (directory, _) in CHECKPOINT_SOURCES.items()}

# model_{step:06d}.pt: six digits, or more without a leading zero (not model_best.pt, not model_0000077.pt)
_MODEL_FILE_RE = re.compile(r"model_(\d{6}|[1-9]\d{6,})\.pt")
_DEPTH_TAG_RE = re.compile(r"d(\d+)")  # a tag that starts with d<depth>: d20, d24_jan29


class CheckpointValueError(BadFileError, AssertionError):
    """Bad input to build_model (phase, vocab mismatch). The reference asserted these, so its callers may
    catch AssertionError; new code should catch ValueError."""


def log0(message):
    if _env_rank() == 0:
        logger.info(message)


def get_checkpoints_dir(source):
    if source not in CHECKPOINT_DIRS:
        raise ValueError(f"Unknown checkpoint source {source!r}; expected one of {sorted(CHECKPOINT_DIRS)}")
    return os.path.join(get_base_dir(), CHECKPOINT_DIRS[source])


def _model_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"model_{step:06d}.pt")


def _meta_path(checkpoint_dir, step):
    return os.path.join(checkpoint_dir, f"meta_{step:06d}.json")


def _optim_path(checkpoint_dir, step, rank):
    return os.path.join(checkpoint_dir, f"optim_{step:06d}_rank{rank}.pt")


# -----------------------------------------------------------------------------
# Saving

def portable_model_config(model_config):
    """
    A copy of a model_config dict without the keys of features that are off: mup_base_width when
    it is 0, every l3_* key when l3_after_layers is empty. Such values configure nothing, so loading
    with GPTConfig's defaults gives the same model, and a plain model's config has exactly the
    reference's keys (sequence_len, vocab_size, n_layer, n_head, n_kv_head, n_embd, window_pattern).
    """
    config = dict(model_config)
    if not config.get("mup_base_width"):
        config.pop("mup_base_width", None)
    if not str(config.get("l3_after_layers", "")).strip():
        config = {k: v for k, v in config.items() if not k.startswith("l3_")}
    return config


def _pid_alive(pid):
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    return True


def _remove_stale_temp_files(checkpoint_dir, rank):
    """
    Remove the <name>.tmp.<pid> files that saves killed mid-write left behind; a temp file whose pid is alive
    belongs to a save in progress and is kept. Each rank looks only at the files it writes itself (rank 0:
    model and meta), so on several nodes no rank judges a pid of another machine.
    """
    own = rf"optim_\d+_rank{rank}\.pt" + (r"|model_\d+\.pt|meta_\d+\.json" if rank == 0 else "")
    for name in os.listdir(checkpoint_dir):
        m = re.fullmatch(rf"(?:{own})\.tmp\.(\d+)", name)
        path = os.path.join(checkpoint_dir, name)
        if m and not _pid_alive(int(m.group(1))) and _remove_if_exists(path):
            log0(f"Removed {path}, left by a killed save (process {m.group(1)} is gone)")


class CheckpointWriteError(SetupError, OSError):
    """A checkpoint file the disk refused (full, read-only, no permission); no part of it is left behind."""


def _write_temp(path, write):
    """write(f) into path's temp file, flushed to disk; returns the temp path (deleted on failure). A write
    the disk refuses ends in a CheckpointWriteError naming the file and the room left."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as e:
        # torch.save reports a short write as a RuntimeError from its zip writer (inline_container.cc)
        refused = isinstance(e, OSError) or (isinstance(e, RuntimeError) and "inline_container" in str(e))
        free = shutil.disk_usage(os.path.dirname(path)).free if refused else 0
        _remove_if_exists(tmp)
        if refused:
            raise CheckpointWriteError(
                f"Cannot write {path} ({one_line_error(e)}; {free / 2**20:,.1f} MiB free on its disk). Fix: "
                f"make room there, or set NANOCHAT_BASE_DIR to a disk with room, and run again; the steps "
                f"saved before are complete") from e
        raise
    return tmp


def _remove_if_exists(path):
    """Whether path was there to remove (another process may have removed it first)."""
    try:
        os.remove(path)
    except FileNotFoundError:
        return False
    return True


def save_checkpoint(checkpoint_dir, step, model_data, optimizer_data, meta_data, rank=0):
    """
    Rank 0 writes the model and meta files, every rank with optimizer_data its shard (in the order the
    module docstring gives). All ranks must call this when any passes optimizer_data while a process group
    is up (they meet at barriers); rank-0-only callers pass optimizer_data=None.
    """
    meta_data = dict(meta_data)
    if "model_config" in meta_data:
        meta_data["model_config"] = portable_model_config(meta_data["model_config"])
    meta_text = json.dumps(meta_data, indent=2)  # serialise first: a bad meta fails before any write
    meta_path, model_path = _meta_path(checkpoint_dir, step), _model_path(checkpoint_dir, step)
    optim_path = _optim_path(checkpoint_dir, step, rank)
    barrier = dist.barrier if optimizer_data is not None and is_ddp_initialized() else lambda: None
    staged = {}  # final path -> its complete temp file
    try:
        if rank == 0 or optimizer_data is not None:
            os.makedirs(checkpoint_dir, exist_ok=True)
            _remove_stale_temp_files(checkpoint_dir, rank)
        if rank == 0:
            staged[model_path] = _write_temp(model_path, lambda f: torch.save(model_data, f))
            staged[meta_path] = _write_temp(meta_path, lambda f: f.write(meta_text.encode("utf-8")))
        if optimizer_data is not None:
            staged[optim_path] = _write_temp(optim_path, lambda f: torch.save(optimizer_data, f))
        barrier()  # every rank's replacement is complete on disk
        if rank == 0:
            # a step being re-saved stops being complete only now, and until its new meta lands
            _remove_if_exists(meta_path)
            if optimizer_data is not None:
                _remove_larger_world_shards(checkpoint_dir, step)
            _commit(staged, model_path)
            log0(f"Saved model parameters to: {model_path}")
        barrier()  # no shard replaces an old one while the old meta still marks the step complete
        if optimizer_data is not None:
            _commit(staged, optim_path)
            logger.info(f"Saved optimizer state to: {optim_path}")
        barrier()
        if rank == 0:
            _commit(staged, meta_path)
            log0(f"Saved metadata to: {meta_path}")
    finally:
        for tmp in staged.values():  # only after a failure: the temps not yet renamed
            _remove_if_exists(tmp)


def _shard_ranks(checkpoint_dir, step):
    """The ranks whose optimizer shard of the step is in checkpoint_dir."""
    shard = re.compile(rf"optim_{step:06d}_rank(\d+)\.pt")
    return [int(m.group(1)) for m in map(shard.fullmatch, os.listdir(checkpoint_dir)) if m]


def _remove_larger_world_shards(checkpoint_dir, step):
    """Remove the step's optimizer shards of ranks beyond this world's, left by an earlier save of the step
    with more ranks: counted with this save's, they would refuse a resume with this world size (or feed a
    resume with the larger one another run's state)."""
    world_size = rank_and_world()[1]
    for rank in _shard_ranks(checkpoint_dir, step):
        if rank >= world_size:
            _remove_if_exists(_optim_path(checkpoint_dir, step, rank))


def _commit(staged, path):
    os.replace(staged[path], path)
    del staged[path]  # only once renamed: a failed rename still cleans up its temp file


# -----------------------------------------------------------------------------
# Loading

def _step_fix(path):
    """How to get past a damaged checkpoint file: load another step, or re-create this one."""
    checkpoint_dir, name = os.path.split(path)
    step = int(re.search(r"_(\d+)", name).group(1))
    if name.startswith("optim_"):  # the step's model is sound: hiding the step would lose it
        return (f"Fix: delete {path} (the model of step {step} is sound: fine-tuning from it then starts its "
                f"optimizer fresh, a resume needs another step), or copy the file again from where it came")
    return (f"Fix: delete {_meta_path(checkpoint_dir, step)} so that the previous complete step is used "
            f"(or pass another step), or copy the file again from where it came")


def _load_torch_file(path, device, what, missing_hint=""):
    if not os.path.exists(path):
        raise MissingFileError(f"Checkpoint {what} file not found: {path}{missing_hint}")
    try:
        return torch.load(path, map_location=device)
    except torch.OutOfMemoryError:
        raise
    except Exception as e:
        raise SetupError(f"Checkpoint {what} file {path} is truncated or corrupt ({one_line_error(e)}). "
                         f"{_step_fix(path)}.") from e


def _other_steps_fix(checkpoint_dir):
    steps = ", ".join(map(str, _complete_steps(checkpoint_dir))) or "none"
    return f"Fix: pass one of the complete steps there ({steps})"  # for a resume too (no step: start over)


def _load_meta(checkpoint_dir, step):
    path = _meta_path(checkpoint_dir, step)
    if not os.path.exists(path):
        raise MissingFileError(f"Checkpoint metadata not found: {path} (the meta file is written last, "
                               f"so step {step} is missing or incomplete). "
                               f"{_other_steps_fix(checkpoint_dir)}")
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadFileError(f"Checkpoint metadata {path} is not valid JSON, truncated or corrupt "
                           f"({one_line_error(e)}). {_step_fix(path)}.") from e
    if not isinstance(meta, dict):
        raise BadFileError(f"Checkpoint metadata {path} holds a JSON {type(meta).__name__}, not an object. "
                           f"{_step_fix(path)}.")
    return meta


def load_checkpoint(checkpoint_dir, step, device, load_optimizer=False, rank=0):
    """(model_data, optimizer_data or None, meta_data) of one step, tensors mapped to `device`."""
    meta_data = _load_meta(checkpoint_dir, step)  # first: it is the cheap completeness check
    model_data = _load_torch_file(_model_path(checkpoint_dir, step), device, "model",
                                  f" (step {step} has its meta only). {_other_steps_fix(checkpoint_dir)}")
    optimizer_data = None
    if load_optimizer:
        optimizer_data = _load_torch_file(_optim_path(checkpoint_dir, step, rank), device,
                                          f"optimizer (rank {rank})", " (shards are per rank: resume with "
                                          "the world size that saved them)")
    return model_data, optimizer_data, meta_data


# -----------------------------------------------------------------------------
# Rebuilding a model from a checkpoint

def _patch_missing_config_keys(model_config_kwargs):
    """Older metadata has no window_pattern: those models used full context in every layer."""
    if "window_pattern" not in model_config_kwargs:
        model_config_kwargs["window_pattern"] = "L"
        log0("Patching missing window_pattern in model config: 'L' (full context)")


def _noop_value(key, shape, model_data, embedding_dtype):
    """
    The value of a parameter an older checkpoint lacks that makes its feature an exact no-op in
    GPT.forward, or None when no such value exists. A gate is only free to choose when the thing
    it gates is zero: a zero smear_lambda scales the smear gate away, and zero value embeddings
    add nothing whatever their gate says.
    """
    if key == "resid_lambdas":
        return torch.ones(shape)  # x = 1 * x + x0_lambda * x0
    if key in ("x0_lambdas", "smear_lambda", "backout_lambda"):
        return torch.zeros(shape)  # removes the x0 skip, the smear term, the backout subtraction
    if re.fullmatch(r"value_embeds\.\d+\.weight", key):
        return torch.zeros(shape, dtype=embedding_dtype)  # v = v + gate * 0
    gated = None
    if key == "smear_gate.weight":
        gated = model_data.get("smear_lambda")
    elif m := re.fullmatch(r"transformer\.h\.(\d+)\.attn\.ve_gate\.weight", key):
        gated = model_data.get(f"value_embeds.{m.group(1)}.weight")
    if gated is not None and not gated.any():
        return torch.zeros(shape)
    return None


def _patch_missing_keys(model_data, model_config, model=None):
    """
    Adds, in place, the parameters an older checkpoint lacks, each with the value that turns its feature
    off exactly (_noop_value): resid_lambdas and x0_lambdas (as the reference), the smear/backout lambdas,
    value embeddings and their gates. `model`, a GPT of model_config (meta device is fine), gives the
    expected keys and shapes; built here if None. Keys with no no-op value stay missing for the strict load.
    """
    if model is None:
        with torch.device("meta"):
            model = GPT(model_config)
    expected = model.state_dict()
    device = next(iter(model_data.values())).device if model_data else torch.device("cpu")
    wte = model_data.get("transformer.wte.weight")  # the value embeddings take its dtype
    embedding_dtype = torch.float32 if wte is None else wte.dtype
    missing = sorted((k for k in expected if k not in model_data),
                     key=lambda k: k.endswith("gate.weight"))  # gates last: their rule reads what they gate
    for key in missing:
        value = _noop_value(key, expected[key].shape, model_data, embedding_dtype)
        if value is not None:
            model_data[key] = value.to(device)
            log0(f"Patching missing {key} in checkpoint with {value.flatten()[0].item():g}s of shape "
                 f"{tuple(value.shape)}, which turns its feature off")


def _check_state_keys(model_data, expected_keys, model_file, note=""):
    missing = sorted(set(expected_keys) - set(model_data))
    unexpected = sorted(set(model_data) - set(expected_keys))
    problems = []
    if missing:
        problems.append(f"missing keys {missing} (no value would make them an exact no-op)")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    if problems:
        raise BadFileError(f"Checkpoint {model_file} does not fit the model described by its metadata"
                           f"{note}: {'; '.join(problems)}. {_step_fix(model_file)}.")


# every reference meta has these (GPTConfig asdict); only window_pattern is missing from older ones
_REQUIRED_CONFIG_KEYS = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")


def _model_config_from_meta(meta_data, meta_file):
    """The GPTConfig of a meta and the model_config keys it ignored (unknown to this GPTConfig)."""
    fix = _step_fix(meta_file)
    if not isinstance(meta_data.get("model_config"), dict):
        raise BadFileError(f"Checkpoint metadata {meta_file} has no 'model_config' object. {fix}.")
    kwargs = dict(meta_data["model_config"])
    _patch_missing_config_keys(kwargs)
    defaults = dataclasses.asdict(GPTConfig())
    # a newer writer may add keys; the weights still have to fit the model built without them
    ignored = sorted(k for k in kwargs if k not in defaults)
    if ignored and _env_rank() == 0:
        logger.warning(f"Ignoring model_config keys {ignored} of {meta_file}: unknown to this GPTConfig")
    kwargs = {k: v for k, v in kwargs.items() if k in defaults}
    missing = [k for k in _REQUIRED_CONFIG_KEYS if k not in kwargs]
    if missing:
        # the file is otherwise sound (its user and loop state resume a run): repair it, do not drop it
        raise BadFileError(f"Checkpoint metadata {meta_file} has a model_config without {missing}. Fix: add "
                           f"them there with the values the model was trained with, or copy the file again")
    for key, value in kwargs.items():
        expected = type(defaults[key])  # exact type: json's true is no layer count, 4.0 no width
        if type(value) is not expected:
            raise BadFileError(f"Checkpoint metadata {meta_file} has model_config.{key} = "
                               f"{json.dumps(value)}, not {expected.__name__}. Fix: write it there as "
                               f"{expected.__name__} (like {json.dumps(defaults[key])}), or copy the file "
                               f"again")
    log0(f"Building model with config: {kwargs}")
    return GPTConfig(**kwargs), ignored


def build_model(checkpoint_dir, step, device, phase):
    """(model, tokenizer, meta_data) for one checkpoint step; phase 'train' or 'eval' sets the module mode."""
    if phase not in ("train", "eval"):
        raise CheckpointValueError(f"Invalid phase: {phase!r} (expected 'train' or 'eval')")
    device = torch.device(device)
    model_data, _, meta_data = load_checkpoint(checkpoint_dir, step, device, load_optimizer=False)
    model_file = _model_path(checkpoint_dir, step)
    # bf16 weights from a GPU run compute in fp32 on CPU/MPS; torch.compile'd modules prefix keys _orig_mod.
    to_fp32 = device.type in ("cpu", "mps")
    model_data = {k.removeprefix("_orig_mod."): v.float() if to_fp32 and v.dtype == torch.bfloat16 else v
                  for k, v in model_data.items()}

    meta_file = _meta_path(checkpoint_dir, step)
    config, ignored = _model_config_from_meta(meta_data, meta_file)
    tokenizer = get_tokenizer()  # checked before the (possibly large) model is built
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise CheckpointValueError(
            f"Tokenizer vocab size {tokenizer.get_vocab_size()} does not match model config vocab size "
            f"{config.vocab_size} (tokenizer: {os.path.join(get_base_dir(), 'tokenizer')}, checkpoint: "
            f"{meta_file}). Fix: put the tokenizer this checkpoint was trained with in that tokenizer "
            f"directory, or load a checkpoint trained with this tokenizer (another model tag or step)")
    model = meta_model(config, lambda why: BadFileError(
        f"Checkpoint metadata {meta_file} has a model_config no GPT can be built of ({why}). Fix: write "
        f"there the values the model was trained with, or copy the file again"))
    _patch_missing_keys(model_data, config, model)
    ignored_note = f" (ignored model_config keys {ignored} of {meta_file})" if ignored else ""
    _check_state_keys(model_data, model.state_dict().keys(), model_file, ignored_note)
    model.to_empty(device=device)
    model.init_weights()  # materialises the non-persistent rotary buffers
    try:
        model.load_state_dict(model_data, strict=True, assign=True)
    except RuntimeError as e:  # torch lists one "size mismatch for <key>: ..." line per tensor
        mismatches = "; ".join(line.strip() for line in str(e).splitlines() if "size mismatch" in line)
        raise SetupError(f"Checkpoint {model_file} does not fit the model described by its metadata: "
                         f"{mismatches or one_line_error(e)}. {_step_fix(model_file)}.") from e
    model.train(phase == "train")
    # every loader of a checkpoint (SFT, RL, eval, chat) picks FA3 or SDPA here: on this rank's device, at the
    # model's head dim, after compute_init (it may all-reduce), and before any compile
    decide_backend(device, config.n_embd // config.n_head)
    return model, tokenizer, meta_data


# -----------------------------------------------------------------------------
# Finding tags and steps

def _list_tags(checkpoints_dir):
    """The model tags (subdirectories) of a checkpoints dir, sorted; none when it does not exist."""
    names = sorted(os.listdir(checkpoints_dir)) if os.path.isdir(checkpoints_dir) else []
    return [name for name in names if os.path.isdir(os.path.join(checkpoints_dir, name))]


def find_largest_model(checkpoints_dir):
    """The model tag to load by default: the deepest d<N>-prefixed tag (d24_jan29 counts as 24; equal depths
    go to the most recently modified), else the most recently modified subdirectory."""
    tags = _list_tags(checkpoints_dir)
    if not tags:
        trainer = dict(CHECKPOINT_SOURCES.values()).get(os.path.basename(os.path.normpath(checkpoints_dir)),
                                                        "a training script")
        raise MissingFileError(f"No checkpoints found in {checkpoints_dir}. Fix: train one first "
                               f"(`{trainer}`), or point NANOCHAT_BASE_DIR at the directory that holds them")
    mtime = lambda tag: os.path.getmtime(os.path.join(checkpoints_dir, tag))
    depth_tags = [(int(m.group(1)), mtime(t), t) for t in tags if (m := _DEPTH_TAG_RE.match(t))]
    if depth_tags:
        return max(depth_tags)[2]
    return max(tags, key=mtime)


def _complete_steps(checkpoint_dir, log_incomplete=False):
    """The steps (sorted) with both model_{step:06d}.pt and meta_{step:06d}.json present."""
    names = os.listdir(checkpoint_dir) if os.path.isdir(checkpoint_dir) else []
    complete = []
    for m in filter(None, map(_MODEL_FILE_RE.fullmatch, names)):
        step = int(m.group(1))
        if os.path.exists(_meta_path(checkpoint_dir, step)):
            complete.append(step)
        elif log_incomplete:
            log0(f"Ignoring incomplete checkpoint step {step} in {checkpoint_dir} (no meta file)")
    return sorted(complete)


def find_last_step(checkpoint_dir):
    """The largest step (numeric) with both model_{step:06d}.pt and meta_{step:06d}.json present."""
    complete = _complete_steps(checkpoint_dir, log_incomplete=True)
    if not complete:
        raise MissingFileError(f"No complete checkpoints (model_<step>.pt with its meta_<step>.json) found "
                               f"in {checkpoint_dir}. Fix: copy a complete step there, or pass another "
                               f"model tag")
    return max(complete)


def _resolve_checkpoint(checkpoints_dir, model_tag, step):
    """(checkpoint_dir, step), guessing the tag and the step when they are None."""
    if model_tag is None:
        model_tag = find_largest_model(checkpoints_dir)
        log0(f"No model tag provided, guessing model tag: {model_tag}")
    checkpoint_dir = os.path.join(checkpoints_dir, model_tag)
    if not os.path.isdir(checkpoint_dir):
        tags = ", ".join(_list_tags(checkpoints_dir)) or "none yet"
        raise MissingFileError(f"Model tag {model_tag!r} not found: no directory {checkpoint_dir}. "
                               f"Fix: pass one of the tags there ({tags}), or no tag for the largest")
    if step is None:
        step = find_last_step(checkpoint_dir)
    return checkpoint_dir, step


def load_checkpoint_meta(source, model_tag=None, step=None):
    """(model_tag, step, meta) of a checkpoint, tag and step guessed as load_model guesses them; reads only
    the JSON."""
    checkpoint_dir, step = _resolve_checkpoint(get_checkpoints_dir(source), model_tag, step)
    return os.path.basename(checkpoint_dir), step, _load_meta(checkpoint_dir, step)


def load_model_from_dir(checkpoints_dir, device, phase, model_tag=None, step=None):
    checkpoint_dir, step = _resolve_checkpoint(checkpoints_dir, model_tag, step)
    log0(f"Loading model from {checkpoint_dir} with step {step}")
    return build_model(checkpoint_dir, step, device, phase)


def load_model(source, *args, **kwargs):
    """load_model_from_dir on the checkpoints of source (base, sft or rl) under the base dir."""
    return load_model_from_dir(get_checkpoints_dir(source), *args, **kwargs)


def optimizer_shard_count(source, model_tag=None, step=None):
    """How many ranks' optimizer shards a checkpoint holds: the world size that saved it (0: none saved)."""
    checkpoint_dir, step = _resolve_checkpoint(get_checkpoints_dir(source), model_tag, step)
    return len(_shard_ranks(checkpoint_dir, step))


def lost_optimizer_shards(source, model_tag, step):
    """The paths of the optimizer shards a checkpoint should hold and does not. The meta counts the ranks that
    saved it: base_train and chat_sft keep one loader state per rank, chat_rl its world size. Without this
    check a lost shard would read as a smaller world, and the advice would be to resume on fewer ranks with
    one rank's buffers."""
    checkpoint_dir, step = _resolve_checkpoint(get_checkpoints_dir(source), model_tag, step)
    meta = _load_meta(checkpoint_dir, step)
    loop = meta.get("loop_state") or {}
    per_rank = meta.get("dataloader_state_dicts") or loop.get("loader_states") or []
    paths = [_optim_path(checkpoint_dir, step, rank) for rank in range(loop.get("world_size", len(per_rank)))]
    return [path for path in paths if not os.path.exists(path)]


def load_optimizer_state(source, device, rank, model_tag=None, step=None):
    """This rank's optimizer shard of a checkpoint, or None (with a warning) when it has none."""
    checkpoint_dir, step = _resolve_checkpoint(get_checkpoints_dir(source), model_tag, step)
    optim_path = _optim_path(checkpoint_dir, step, rank)
    if not os.path.exists(optim_path):
        logger.warning(f"Optimizer checkpoint not found: {optim_path}")
        return None
    log0(f"Loading optimizer state from {optim_path}")
    return _load_torch_file(optim_path, device, f"optimizer (rank {rank})")
