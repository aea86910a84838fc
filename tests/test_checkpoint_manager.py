"""
nanochat/checkpoint_manager.py on CPU: file layout and JSON format, model rebuild (logits, dtypes,
patches for older checkpoints), step/tag discovery, clear errors, and crash-safe saving.
Expected values come from the spec (§6 of pipeline.md) or from the saved model's own forward.
"""
import dataclasses
import json
import logging
import math
import os
import re
import subprocess
import sys
import traceback

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPTConfig
from nanochat.l3 import allocation_to_bounds

from conftest import TINY_VOCAB, tiny_gpt

TOKENIZER_VOCAB = TINY_VOCAB
# the reference's GPTConfig fields, in order (pipeline.md "What this layer needs from the model layer")
REFERENCE_CONFIG_KEYS = ["sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd",
                         "window_pattern"]


@dataclasses.dataclass
class ReferenceGPTConfig:
    """The reference's GPTConfig: these fields only, so GPTConfig(**kwargs) rejects any other key."""
    sequence_len: int = 2048
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 6
    n_kv_head: int = 6
    n_embd: int = 768
    window_pattern: str = "SSSL"


def tiny_model(seed=0, **config):
    """conftest's tiny GPT with every parameter perturbed, so that each feature (smear, backout, value
    embeddings, zero-initialised projections) changes the logits."""
    return tiny_gpt(seed, perturb=0.1, **config).eval()


def sample_ids(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TOKENIZER_VOCAB, (2, 24), generator=g)


@torch.no_grad()
def logits_of(model, ids):
    return model(ids)


def user_sees(excinfo):
    """The last line of the traceback Python prints for this exception (chained causes come first)."""
    return "".join(traceback.format_exception(excinfo.value)).rstrip().splitlines()[-1]


def meta_for(model, step, **extra):
    return dict(step=step, model_config=dataclasses.asdict(model.config), **extra)


def write_like_reference(checkpoint_dir, step, model_data, meta_data):
    """How the reference writes a checkpoint: plain torch.save / json.dump, no temp files."""
    os.makedirs(checkpoint_dir, exist_ok=True)
    torch.save(model_data, os.path.join(checkpoint_dir, f"model_{step:06d}.pt"))
    with open(os.path.join(checkpoint_dir, f"meta_{step:06d}.json"), "w", encoding="utf-8") as f:
        json.dump(meta_data, f, indent=2)


def touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


# -----------------------------------------------------------------------------
# Saving and loading

def test_save_load_round_trip_file_names_and_json(tmp_path):
    ckpt = tmp_path / "d2"
    model = tiny_model()
    param = torch.nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones_like(param)
    opt.step()
    meta = meta_for(model, 5, val_bpb=None, user_config={"run": "café", "depth": 2},
                    loop_state={"min_val_bpb": float("inf"), "smooth_train_loss": 0.0, "total_training_time": 0})
    cm.save_checkpoint(str(ckpt), 5, model.state_dict(), opt.state_dict(), meta, rank=0)
    cm.save_checkpoint(str(ckpt), 5, model.state_dict(), {"rank": 1}, meta, rank=1)

    assert sorted(os.listdir(ckpt)) == ["meta_000005.json", "model_000005.pt",
                                        "optim_000005_rank0.pt", "optim_000005_rank1.pt"]
    text = (ckpt / "meta_000005.json").read_bytes().decode("utf-8")
    reference_meta = dict(meta, model_config={k: meta["model_config"][k] for k in REFERENCE_CONFIG_KEYS})
    assert text == json.dumps(reference_meta, indent=2)  # indent=2, json's defaults: the reference's bytes
    assert '"min_val_bpb": Infinity' in text  # allow_nan kept: the reference reads it back with json.load

    model_data, optim_data, meta_data = cm.load_checkpoint(str(ckpt), 5, "cpu", load_optimizer=True, rank=0)
    assert model_data.keys() == model.state_dict().keys()
    assert all(torch.equal(model_data[k], v) for k, v in model.state_dict().items())
    assert torch.equal(optim_data["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert math.isinf(meta_data["loop_state"]["min_val_bpb"]) and meta_data["user_config"]["run"] == "café"
    assert cm.load_checkpoint(str(ckpt), 5, "cpu", load_optimizer=True, rank=1)[1] == {"rank": 1}
    assert cm.load_checkpoint(str(ckpt), 5, "cpu")[1] is None


def test_rank_nonzero_writes_only_its_shard(tmp_path):
    cm.save_checkpoint(str(tmp_path / "c"), 7, {"w": torch.ones(2)}, {"s": 1}, {"step": 7}, rank=3)
    assert os.listdir(tmp_path / "c") == ["optim_000007_rank3.pt"]


def test_resaving_a_step_with_fewer_ranks_removes_the_larger_worlds_shards(tiny_base_dir):
    ckpt, model = str(tiny_base_dir / "base_checkpoints" / "d2"), tiny_model()
    for rank in (1, 2):  # shards of a 3-rank save of step 5 (their count is the world size a resume needs)
        cm.save_checkpoint(ckpt, 5, None, {"rank": rank}, {}, rank=rank)
    assert cm.optimizer_shard_count("base", "d2", 5) == 2
    cm.save_checkpoint(ckpt, 5, model.state_dict(), {"rank": 0}, meta_for(model, 5))  # this 1-rank world
    assert sorted(os.listdir(ckpt)) == ["meta_000005.json", "model_000005.pt", "optim_000005_rank0.pt"]
    assert cm.optimizer_shard_count("base", "d2", 5) == 1


def test_interrupted_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    ckpt = str(tmp_path / "d2")
    model = tiny_model()
    cm.save_checkpoint(ckpt, 1, model.state_dict(), {"step": 1}, meta_for(model, 1))
    real_save = torch.save

    def crash_on_optimizer(obj, f, *args, **kwargs):
        if "step" in obj:  # the optimizer dict: write a few bytes, then die mid-file
            f.write(b"PK\x03\x04 partial")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        cm.save_checkpoint(ckpt, 2, model.state_dict(), {"step": 2}, meta_for(model, 2))
    monkeypatch.undo()

    files = sorted(os.listdir(ckpt))
    assert "optim_000002_rank0.pt" not in files and "meta_000002.json" not in files
    assert not [f for f in files if ".tmp" in f]  # the temp file of the failed write is gone
    assert cm.find_last_step(ckpt) == 1
    model_data, _, _ = cm.load_checkpoint(ckpt, 1, "cpu", load_optimizer=True)
    assert torch.equal(model_data["lm_head.weight"], model.lm_head.weight)

    # a crash after the meta bytes are written but before they are renamed into place
    real_replace = os.replace

    def crash_on_meta(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("killed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_meta)
    with pytest.raises(OSError, match="killed"):
        cm.save_checkpoint(ckpt, 3, model.state_dict(), {"step": 3}, meta_for(model, 3))
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(ckpt, "meta_000003.json"))
    assert cm.find_last_step(ckpt) == 1

    # re-saving the newest step (a resume at the final step saves it again): a failure while the new
    # files are written leaves the old step complete, with its old contents
    monkeypatch.setattr(torch, "save", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        cm.save_checkpoint(ckpt, 1, tiny_model(seed=5).state_dict(), {"step": 1}, meta_for(model, 1))
    monkeypatch.undo()
    assert cm.find_last_step(ckpt) == 1
    model_data, optim_data, _ = cm.load_checkpoint(ckpt, 1, "cpu", load_optimizer=True)
    assert torch.equal(model_data["lm_head.weight"], model.lm_head.weight) and optim_data == {"step": 1}
    assert not [f for f in os.listdir(ckpt) if ".tmp" in f]
    # a failure once the new weights are in place: the old meta must not pass them off as the old step
    monkeypatch.setattr(os, "replace", crash_on_meta)
    with pytest.raises(OSError, match="killed"):
        cm.save_checkpoint(ckpt, 1, tiny_model(seed=5).state_dict(), {"step": 1}, meta_for(model, 1))
    monkeypatch.undo()
    assert not os.path.exists(os.path.join(ckpt, "meta_000001.json"))


# what a plain write raises on a full disk, and what torch.save raised on one (a 40 MB tmpfs)
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), RuntimeError(
    "[enforce fail at inline_container.cc:672] . unexpected pos 20975040 vs 20974992")])
def test_a_full_disk_ends_in_one_line_naming_the_file_and_the_fix(tmp_path, monkeypatch, failure):
    ckpt = str(tmp_path / "d2")
    model = tiny_model()
    cm.save_checkpoint(ckpt, 1, model.state_dict(), {"step": 1}, meta_for(model, 1))

    def fill_the_disk(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise failure

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(cm.CheckpointWriteError) as err:
        cm.save_checkpoint(ckpt, 2, model.state_dict(), {"step": 2}, meta_for(model, 2))
    monkeypatch.undo()
    message = str(err.value)
    assert isinstance(err.value, cm.SetupError) and isinstance(err.value, OSError)  # one line; an OSError
    assert re.fullmatch(rf"Cannot write {re.escape(ckpt)}/model_000002\.pt \({type(failure).__name__}: .*; "
                        rf"[\d.,]+ MiB free on its disk\)\. Fix: make room there, or set NANOCHAT_BASE_DIR.*",
                        message), message
    assert sorted(os.listdir(ckpt)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]


def test_a_failure_that_is_not_the_disk_keeps_its_own_error(tmp_path, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(torch, "save", lambda *args, **kwargs: (_ for _ in ()).throw(TypeError("a bug")))
    with pytest.raises(TypeError, match="a bug"):
        cm.save_checkpoint(str(tmp_path / "d2"), 1, model.state_dict(), {"step": 1}, meta_for(model, 1))
    assert os.listdir(tmp_path / "d2") == []


def test_corrupt_files_give_errors_naming_the_file(tmp_path):
    ckpt = tmp_path / "d2"
    model = tiny_model()
    cm.save_checkpoint(str(ckpt), 3, model.state_dict(), {"step": 3}, meta_for(model, 3))
    for name in ("model_000003.pt", "optim_000003_rank0.pt"):
        path = ckpt / name
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(RuntimeError, match=name):
            cm.load_checkpoint(str(ckpt), 3, "cpu", load_optimizer=True)
        path.write_bytes(data)
    meta = ckpt / "meta_000003.json"
    meta.write_text(meta.read_text()[:20])
    with pytest.raises(ValueError, match="meta_000003.json"):
        cm.load_checkpoint(str(ckpt), 3, "cpu")


def test_missing_files_give_clear_errors(tmp_path):
    ckpt = tmp_path / "d2"
    cm.save_checkpoint(str(ckpt), 4, {"w": torch.ones(2)}, {"s": 0}, {"step": 4})
    with pytest.raises(FileNotFoundError, match=r"rank 1.*optim_000004_rank1\.pt"):
        cm.load_checkpoint(str(ckpt), 4, "cpu", load_optimizer=True, rank=1)
    os.remove(ckpt / "model_000004.pt")
    with pytest.raises(FileNotFoundError, match="model_000004.pt"):
        cm.load_checkpoint(str(ckpt), 4, "cpu")
    with pytest.raises(FileNotFoundError, match="meta_000009.json"):
        cm.load_checkpoint(str(ckpt), 9, "cpu")


def test_the_fix_for_a_corrupt_optimizer_shard_keeps_its_sound_model(tiny_base_dir):
    model = tiny_model()
    ckpt = tiny_base_dir / "base_checkpoints" / "d2"
    cm.save_checkpoint(str(ckpt), 3, model.state_dict(), {"step": 3}, meta_for(model, 3))
    shard = ckpt / "optim_000003_rank0.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(RuntimeError) as info:
        cm.load_checkpoint(str(ckpt), 3, "cpu", load_optimizer=True)
    line = user_sees(info)
    assert f"Fix: delete {shard} (the model of step 3 is sound" in line and "meta_000003" not in line, line
    os.remove(shard)  # following the fix: the step still loads, now without optimizer state
    assert cm.load_optimizer_state("base", "cpu", 0) is None
    built, _, _ = cm.load_model("base", "cpu", "eval")
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


def test_a_step_that_is_not_there_lists_the_complete_ones(tmp_path):
    ckpt = tmp_path / "d2"
    for step in (4, 12):
        cm.save_checkpoint(str(ckpt), step, {"w": torch.ones(2)}, None, {"step": step})
    touch(ckpt / "model_000020.pt")  # no meta: not a step to offer
    (ckpt / "meta_000030.json").write_text(json.dumps({"step": 30}))  # no model: neither
    for step in (20, 30):
        with pytest.raises(FileNotFoundError) as info:
            cm.load_checkpoint(str(ckpt), step, "cpu")
        fix = "Fix: pass one of the complete steps there (4, 12)"
        assert user_sees(info).endswith(fix)


# -----------------------------------------------------------------------------
# Rebuilding models

def test_build_model_reproduces_the_saved_model(tiny_base_dir):
    model = tiny_model()
    ckpt = str(tiny_base_dir / "base_checkpoints" / "d2")
    cm.save_checkpoint(ckpt, 10, model.state_dict(), None, meta_for(model, 10))
    built, tok, meta = cm.build_model(ckpt, 10, torch.device("cpu"), phase="eval")
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))
    assert not built.training and meta["step"] == 10 and tok.get_vocab_size() == TOKENIZER_VOCAB
    assert cm.build_model(ckpt, 10, "cpu", phase="train")[0].training
    with pytest.raises(ValueError, match="phase"):
        cm.build_model(ckpt, 10, "cpu", phase="test")


def test_build_model_decides_the_attention_backend_on_its_device_at_its_head_dim(tiny_base_dir, monkeypatch):
    from nanochat import flash_attention as fa
    model = tiny_model()
    ckpt = str(tiny_base_dir / "base_checkpoints" / "d2")
    cm.save_checkpoint(ckpt, 10, model.state_dict(), None, meta_for(model, 10))
    seen = []
    real_status = fa._local_fa3_status
    monkeypatch.setattr(fa, "_backend", None)
    monkeypatch.setattr(fa, "_local_fa3_status", lambda device, head_dim: seen.append((device, head_dim))
                        or real_status(device, head_dim))
    cm.build_model(ckpt, 10, torch.device("cpu"), phase="eval")
    config = model.config
    assert seen == [(torch.device("cpu"), config.n_embd // config.n_head)]
    assert fa._backend is not None and fa._backend.train == "sdpa"


def test_build_model_converts_bf16_to_fp32_on_cpu(tiny_base_dir):
    model = tiny_model()
    bf16_state = {k: v.bfloat16() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    write_like_reference(str(tiny_base_dir / "ck"), 1, bf16_state, meta_for(model, 1))
    built, _, _ = cm.build_model(str(tiny_base_dir / "ck"), 1, "cpu", "eval")
    assert all(p.dtype == torch.float32 for p in built.parameters())
    with torch.no_grad():  # the expected model: the original with every weight rounded to bf16
        for p in model.parameters():
            p.copy_(p.bfloat16().float())
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


def test_build_model_strips_orig_mod_prefix(tiny_base_dir):
    model = tiny_model()
    compiled_state = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    write_like_reference(str(tiny_base_dir / "ck"), 2, compiled_state, meta_for(model, 2))
    built, _, _ = cm.build_model(str(tiny_base_dir / "ck"), 2, "cpu", "eval")
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


def test_old_checkpoint_patches_window_pattern_and_lambdas(tiny_base_dir, caplog):
    model = tiny_model()
    state = model.state_dict()
    del state["resid_lambdas"], state["x0_lambdas"]
    meta = meta_for(model, 1)
    del meta["model_config"]["window_pattern"]
    write_like_reference(str(tiny_base_dir / "ck"), 1, state, meta)
    caplog.set_level(logging.INFO, logger="nanochat.checkpoint_manager")
    built, _, _ = cm.build_model(str(tiny_base_dir / "ck"), 1, "cpu", "eval")
    assert built.config.window_pattern == "L"
    assert torch.equal(built.resid_lambdas, torch.ones(2)) and torch.equal(built.x0_lambdas, torch.zeros(2))
    with torch.no_grad():  # what the patch means: no per-layer scaling, no x0 skip
        model.resid_lambdas.fill_(1.0)
        model.x0_lambdas.fill_(0.0)
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))
    assert "window_pattern" in caplog.text and "resid_lambdas" in caplog.text and "x0_lambdas" in caplog.text


def test_patch_helpers_on_bare_inputs():
    kwargs = {"n_layer": 3}
    cm._patch_missing_config_keys(kwargs)
    assert kwargs["window_pattern"] == "L"
    data = {}
    cm._patch_missing_keys(data, tiny_gpt(n_layer=3).config)
    assert torch.equal(data["resid_lambdas"], torch.ones(3)) and torch.equal(data["x0_lambdas"], torch.zeros(3))
    kept = {"resid_lambdas": torch.full((3,), 0.5), "x0_lambdas": torch.full((3,), 0.25)}
    cm._patch_missing_keys(kept, tiny_gpt(n_layer=3).config)
    assert torch.equal(kept["resid_lambdas"], torch.full((3,), 0.5))


def test_missing_feature_parameters_are_patched_as_exact_noops(tiny_base_dir):
    model = tiny_model()  # 2 layers: layer 1 has a value embedding and its gate
    state = model.state_dict()
    for key in ("smear_lambda", "smear_gate.weight", "backout_lambda",
                "value_embeds.1.weight", "transformer.h.1.attn.ve_gate.weight"):
        del state[key]
    write_like_reference(str(tiny_base_dir / "ck"), 1, state, meta_for(model, 1))
    built, _, _ = cm.build_model(str(tiny_base_dir / "ck"), 1, "cpu", "eval")
    with torch.no_grad():  # the same model with those three features switched off by hand
        model.smear_lambda.zero_()
        model.backout_lambda.zero_()
        model.value_embeds["1"].weight.zero_()
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA; CPU twins: the bf16 and the no-op patch tests above")
def test_build_model_on_cuda_keeps_bf16_and_patches_on_the_device(tiny_base_dir):
    model = tiny_model()
    state = {k: v.cuda() for k, v in model.state_dict().items()}
    state["transformer.wte.weight"] = state["transformer.wte.weight"].bfloat16()  # as a GPU run stores it
    del state["backout_lambda"], state["value_embeds.1.weight"], state["transformer.h.1.attn.ve_gate.weight"]
    write_like_reference(str(tiny_base_dir / "ck"), 1, state, meta_for(model, 1))
    built, _, _ = cm.build_model(str(tiny_base_dir / "ck"), 1, torch.device("cuda"), "eval")
    assert all(t.device.type == "cuda" for t in built.state_dict().values())
    assert built.transformer.wte.weight.dtype == built.value_embeds["1"].weight.dtype == torch.bfloat16
    with torch.no_grad():
        model.backout_lambda.zero_()
        model.value_embeds["1"].weight.zero_()
        model.transformer.wte.weight.copy_(model.transformer.wte.weight.bfloat16().float())
    torch.testing.assert_close(logits_of(built, sample_ids().cuda()).cpu(), logits_of(model, sample_ids()),
                               atol=1e-4, rtol=1e-4)


def test_unpatchable_or_unexpected_keys_are_listed(tiny_base_dir):
    model = tiny_model()
    cases = [("transformer.h.1.attn.ve_gate.weight", None),  # its value embedding is nonzero: no no-op
             ("lm_head.weight", None),
             (None, "transformer.h.7.mlp.c_fc.weight")]
    for i, (drop, extra) in enumerate(cases):
        state = model.state_dict()
        if drop:
            del state[drop]
        if extra:
            state[extra] = torch.zeros(1)
        write_like_reference(str(tiny_base_dir / "ck"), i, state, meta_for(model, i))
        with pytest.raises(ValueError, match=rf"model_{i:06d}\.pt") as info:
            cm.build_model(str(tiny_base_dir / "ck"), i, "cpu", "eval")
        assert (drop or extra) in str(info.value)
        assert f"Fix: delete {tiny_base_dir / 'ck' / f'meta_{i:06d}.json'}" in str(info.value).splitlines()[-1]


def test_meta_of_a_newer_writer_with_unknown_keys_loads_with_equal_logits(tiny_base_dir, caplog):
    model = tiny_model()
    meta = {"step": 2, "model_config": {**{k: getattr(model.config, k) for k in REFERENCE_CONFIG_KEYS},
                                        "n_experts": 1}, "a_newer_top_level_key": {"x": 1}}
    write_like_reference(str(tiny_base_dir / "base_checkpoints" / "d2"), 2, model.state_dict(), meta)
    built, _, loaded = cm.load_model("base", "cpu", "eval")
    assert loaded == meta and built.config == model.config
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))
    assert "Ignoring model_config keys ['n_experts']" in caplog.text  # the user is told what was dropped


@pytest.mark.parametrize("key, value", [("n_layer", None), ("n_layer", "2"), ("n_embd", 64.0),
                                        ("n_head", True), ("window_pattern", 1), ("vocab_size", None)])
def test_meta_with_a_missing_or_mistyped_model_config_field_names_it_and_the_fix(tiny_base_dir, key, value):
    model = tiny_model()
    meta = meta_for(model, 2)
    if value is None:
        del meta["model_config"][key]  # GPTConfig's default would build another model
    else:
        meta["model_config"][key] = value
    write_like_reference(str(tiny_base_dir / "base_checkpoints" / "d2"), 2, model.state_dict(), meta)
    with pytest.raises(ValueError) as info:
        cm.load_model("base", "cpu", "eval")
    line = user_sees(info)
    meta_file = str(tiny_base_dir / "base_checkpoints" / "d2" / "meta_000002.json")
    assert meta_file in line and key in line, line
    # the rest of the meta (user and loop state) is sound: the fix repairs the field, it keeps the file
    assert re.search(rf"Fix: (add them there|write it there as {type(getattr(GPTConfig(), key)).__name__})",
                     line) and "delete" not in line, line


@pytest.mark.parametrize("key, value", [("n_head", 0), ("n_head", 3), ("n_layer", -1),
                                        ("window_pattern", "XYZ")])
def test_meta_with_a_model_config_no_gpt_can_be_built_of_names_it_and_the_fix(tiny_base_dir, key, value):
    model = tiny_model()
    meta = meta_for(model, 2)
    meta["model_config"][key] = value
    write_like_reference(str(tiny_base_dir / "base_checkpoints" / "d2"), 2, model.state_dict(), meta)
    with pytest.raises(ValueError) as info:
        cm.load_model("base", "cpu", "eval")
    line = user_sees(info)
    meta_file = tiny_base_dir / "base_checkpoints" / "d2" / "meta_000002.json"
    assert f"{meta_file} has a model_config no GPT can be built of" in line, line
    assert line.endswith("Fix: write there the values the model was trained with, or copy the file again")


def test_weights_of_another_shape_than_their_meta_name_the_model_file(tiny_base_dir):
    model = tiny_model()
    state = model.state_dict()
    state["lm_head.weight"] = state["lm_head.weight"][:, :32]  # the keys fit, the width does not
    cm.save_checkpoint(str(tiny_base_dir / "ck"), 3, state, None, meta_for(model, 3))
    with pytest.raises(RuntimeError) as info:
        cm.build_model(str(tiny_base_dir / "ck"), 3, "cpu", "eval")
    message = str(info.value)
    assert "\n" not in message  # one line: the file, the tensor that does not fit, the fix
    assert re.search(r"model_000003\.pt does not fit the model described by its metadata: size mismatch for "
                     r"lm_head\.weight: .*\. Fix: delete .*meta_000003\.json", message), message


def test_a_bad_dtype_setting_is_named_rather_than_the_checkpoint(tiny_base_dir, monkeypatch):
    # the dtype is decided when the model is first built: an unknown NANOCHAT_DTYPE is the setting's fault
    from nanochat import common
    model = tiny_model()
    cm.save_checkpoint(str(tiny_base_dir / "ck"), 1, model.state_dict(), None, meta_for(model, 1))
    monkeypatch.setenv("NANOCHAT_DTYPE", "fp16")
    monkeypatch.setattr(common, "_compute_dtype_cache", None)
    with pytest.raises(common.BadEnvironmentError, match="NANOCHAT_DTYPE='fp16' is not one of") as info:
        cm.build_model(str(tiny_base_dir / "ck"), 1, "cpu", "eval")
    assert "meta_000001.json" not in user_sees(info)


def test_vocab_mismatch_error(tiny_base_dir):
    model = tiny_model(vocab_size=320)
    cm.save_checkpoint(str(tiny_base_dir / "ck"), 1, model.state_dict(), None, meta_for(model, 1))
    with pytest.raises(ValueError, match="Tokenizer vocab size 300 does not match model config vocab size 320") as info:
        cm.build_model(str(tiny_base_dir / "ck"), 1, "cpu", "eval")
    assert isinstance(info.value, AssertionError)  # callers of the reference caught its assert
    line = user_sees(info)  # both files, and what to do about them
    assert str(tiny_base_dir / "tokenizer") in line and str(tiny_base_dir / "ck" / "meta_000001.json") in line
    assert "Fix: put the tokenizer this checkpoint was trained with in that tokenizer directory" in line


def test_l3_model_round_trips_with_its_bounds(tiny_base_dir):
    model = tiny_model(l3_after_layers="0", l3_n_emb=2 * TOKENIZER_VOCAB, l3_d_up=32, l3_k_max=3)
    alloc = [1 if t % 2 else 3 for t in range(TOKENIZER_VOCAB)]  # non-uniform: not the default
    model.l3_layers["0"].set_bounds(allocation_to_bounds(alloc))
    cm.save_checkpoint(str(tiny_base_dir / "ck"), 1, model.state_dict(), None, meta_for(model, 1))
    built, _, _ = cm.build_model(str(tiny_base_dir / "ck"), 1, "cpu", "eval")
    assert built.l3_layers["0"].allocation() == alloc
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


# -----------------------------------------------------------------------------
# Discovery

def test_find_last_step_is_numeric_and_skips_incomplete_and_foreign(tmp_path, caplog):
    for name in ("model_999999.pt", "meta_999999.json", "model_1000000.pt", "meta_1000000.json",
                 "model_2000000.pt",  # no meta: an interrupted save
                 "model_000010.pt", "model_best.pt", "model_1000001.pt.tmp.42", "meta_000042.json",
                 "model_0000077.pt", "meta_000077.json", "notes.txt"):
        touch(tmp_path / "ck" / name)
    caplog.set_level(logging.INFO, logger="nanochat.checkpoint_manager")
    assert cm.find_last_step(str(tmp_path / "ck")) == 1_000_000
    assert "2000000" in caplog.text
    touch(tmp_path / "empty" / "model_best.pt")
    with pytest.raises(FileNotFoundError, match="empty"):
        cm.find_last_step(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        cm.find_last_step(str(tmp_path / "nowhere"))


def test_find_largest_model_prefers_depth_then_mtime(tmp_path):
    root = tmp_path / "base_checkpoints"
    for tag in ("d8", "d24_jan29", "d12", "scaling_1e18_d26", "foo"):
        (root / tag).mkdir(parents=True)
    touch(root / "d99.txt")  # a file, not a tag
    assert cm.find_largest_model(str(root)) == "d24_jan29"  # numeric: 24 > 12 > 8
    (root / "d24").mkdir()
    os.utime(root / "d24", (1e9, 1e9))
    os.utime(root / "d24_jan29", (2e9, 2e9))
    assert cm.find_largest_model(str(root)) == "d24_jan29"  # equal depth: the newer one
    os.utime(root / "d24", (3e9, 3e9))
    assert cm.find_largest_model(str(root)) == "d24"  # the newer one, whatever the names' order

    other = tmp_path / "chatsft_checkpoints"
    for tag, mtime in (("alpha", 3e9), ("beta", 1e9), ("gamma", 2e9)):
        (other / tag).mkdir(parents=True)
        os.utime(other / tag, (mtime, mtime))
    assert cm.find_largest_model(str(other)) == "alpha"
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        cm.find_largest_model(str(tmp_path / "empty"))


def test_a_tag_naming_nothing_or_a_tag_without_complete_steps_lists_the_way_out(tiny_base_dir):
    model = tiny_model()
    root = tiny_base_dir / "chatsft_checkpoints"
    cm.save_checkpoint(str(root / "d2"), 3, model.state_dict(), None, meta_for(model, 3))
    with pytest.raises(FileNotFoundError) as info:
        cm.load_model("sft", "cpu", "eval", model_tag="d3")
    assert user_sees(info).endswith(f"Model tag 'd3' not found: no directory {root / 'd3'}. Fix: pass one of "
                                    f"the tags there (d2), or no tag for the largest")
    touch(root / "d5" / "model_000004.pt")  # an interrupted save: the model, no meta
    with pytest.raises(FileNotFoundError) as info:
        cm.load_model("sft", "cpu", "eval")
    assert user_sees(info).endswith(f"found in {root / 'd5'}. Fix: copy a complete step there, or pass "
                                    f"another model tag")
    with pytest.raises(FileNotFoundError) as info:
        cm.load_model("rl", "cpu", "eval")
    assert user_sees(info).endswith("Fix: train one first (`python -m scripts.chat_rl`), or point "
                                    "NANOCHAT_BASE_DIR at the directory that holds them")


def test_load_model_guesses_tag_and_step_under_base_dir(tiny_base_dir):
    root = tiny_base_dir / "base_checkpoints"
    small, late, early = tiny_model(n_layer=1), tiny_model(seed=2), tiny_model(seed=3)
    cm.save_checkpoint(str(root / "d1"), 50, small.state_dict(), None, meta_for(small, 50))
    cm.save_checkpoint(str(root / "d2"), 9, early.state_dict(), {"s": 9}, meta_for(early, 9))
    cm.save_checkpoint(str(root / "d2"), 10, late.state_dict(), {"s": 10}, meta_for(late, 10))
    model, _, meta = cm.load_model("base", torch.device("cpu"), phase="eval")
    assert meta["step"] == 10 and model.config.n_layer == 2
    assert torch.equal(logits_of(model, sample_ids()), logits_of(late, sample_ids()))
    _, _, meta = cm.load_model("base", "cpu", "eval", model_tag="d2", step=9)
    assert meta["step"] == 9

    assert cm.load_optimizer_state("base", "cpu", rank=0) == {"s": 10}
    assert cm.load_optimizer_state("base", "cpu", rank=1) is None
    assert cm.load_optimizer_state("base", "cpu", rank=0, model_tag="d1", step=50) is None
    with pytest.raises(FileNotFoundError, match="chatsft_checkpoints"):
        cm.load_model("sft", "cpu", "eval")
    with pytest.raises(ValueError, match="bogus"):
        cm.load_model("bogus", "cpu", "eval")


# -----------------------------------------------------------------------------
# Checkpoints move both ways between this code base and the reference

def test_plain_model_meta_has_exactly_the_reference_keys(tiny_base_dir):
    model = tiny_model()
    ckpt = tiny_base_dir / "base_checkpoints" / "d2"
    cm.save_checkpoint(str(ckpt), 3, model.state_dict(), None, meta_for(model, 3))
    model_config = json.loads((ckpt / "meta_000003.json").read_text())["model_config"]
    assert list(model_config) == REFERENCE_CONFIG_KEYS
    reference_config = ReferenceGPTConfig(**model_config)  # what the reference's build_model does with it
    expected = {k: getattr(model.config, k) for k in REFERENCE_CONFIG_KEYS}
    assert dataclasses.asdict(reference_config) == expected
    built, _, _ = cm.build_model(str(ckpt), 3, "cpu", "eval")
    assert built.config == model.config
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


@pytest.mark.parametrize("features", [
    dict(mup_base_width=32),
    dict(l3_after_layers="1", l3_n_emb=2 * TOKENIZER_VOCAB, l3_d_up=48, l3_k_max=4, l3_tie_kv=False),
    dict(mup_base_width=32, l3_after_layers="0", l3_n_emb=TOKENIZER_VOCAB),
])
def test_mup_and_l3_models_write_their_keys_and_round_trip(tiny_base_dir, features):
    model = tiny_model(**features)
    ckpt = tiny_base_dir / "base_checkpoints" / "d2"
    cm.save_checkpoint(str(ckpt), 1, model.state_dict(), None, meta_for(model, 1))
    model_config = json.loads((ckpt / "meta_000001.json").read_text())["model_config"]
    assert list(model_config)[:len(REFERENCE_CONFIG_KEYS)] == REFERENCE_CONFIG_KEYS
    assert features.items() <= model_config.items()
    assert ("mup_base_width" in model_config) == ("mup_base_width" in features)
    with pytest.raises(TypeError):  # the reference cannot build these models, and says so
        ReferenceGPTConfig(**model_config)
    built, _, _ = cm.build_model(str(ckpt), 1, "cpu", "eval")
    assert built.config == model.config
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


def test_reference_written_checkpoint_loads_with_equal_logits(tiny_base_dir):
    model = tiny_model()
    reference_meta = {"step": 7, "val_bpb": 1.25, "model_config": {k: getattr(model.config, k)
                                                                   for k in REFERENCE_CONFIG_KEYS},
                      "user_config": {"depth": 2}}
    ckpt = str(tiny_base_dir / "base_checkpoints" / "d2")
    write_like_reference(ckpt, 7, model.state_dict(), reference_meta)
    built, _, meta = cm.load_model("base", "cpu", "eval")
    assert meta == reference_meta and built.config == model.config
    assert built.config.mup_base_width == 0 and len(built.l3_layers) == 0
    assert torch.equal(logits_of(built, sample_ids()), logits_of(model, sample_ids()))


# -----------------------------------------------------------------------------
# Leftovers of killed saves

def _dead_pid():
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    ckpt = tmp_path / "d2"
    ckpt.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = _dead_pid()
        stale = [f"{name}.tmp.{dead}"
                 for name in ("model_000004.pt", "meta_000004.json", "optim_000004_rank0.pt")]
        kept = [f"model_000005.pt.tmp.{live.pid}",  # a save in progress in another process
                f"optim_000004_rank1.pt.tmp.{dead}",  # rank 1 cleans its own files, not rank 0
                f"notes.txt.tmp.{dead}", "model_000004.pt.tmp.abc"]  # not checkpoint temp files
        for name in stale + kept:
            (ckpt / name).write_bytes(b"partial")
        model = tiny_model()
        cm.save_checkpoint(str(ckpt), 6, model.state_dict(), {"step": 6}, meta_for(model, 6))
        assert sorted(os.listdir(ckpt)) == sorted(kept + ["meta_000006.json", "model_000006.pt",
                                                          "optim_000006_rank0.pt"])
        # rank 0's temp file: its pid may be another machine's, which only rank 0 can judge
        (ckpt / f"model_000007.pt.tmp.{dead}").write_bytes(b"partial")
        cm.save_checkpoint(str(ckpt), 6, None, {"step": 6}, {"step": 6}, rank=1)
        assert f"optim_000004_rank1.pt.tmp.{dead}" not in os.listdir(ckpt)
        assert f"model_000007.pt.tmp.{dead}" in os.listdir(ckpt)
        assert f"model_000005.pt.tmp.{live.pid}" in os.listdir(ckpt)
    finally:
        live.kill()
        live.wait()


def test_temp_file_of_another_users_process_is_kept(tmp_path, monkeypatch):
    # os.kill(pid, 0) on a process this user may not signal raises PermissionError: that writer is alive
    other = _dead_pid()
    real_kill = os.kill

    def kill(pid, sig):
        if pid == other:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)
    monkeypatch.setattr(cm.os, "kill", kill)
    ckpt = tmp_path / "d2"
    ckpt.mkdir()
    (ckpt / f"model_000007.pt.tmp.{other}").write_bytes(b"partial")
    model = tiny_model()
    cm.save_checkpoint(str(ckpt), 8, model.state_dict(), None, meta_for(model, 8))
    assert f"model_000007.pt.tmp.{other}" in os.listdir(ckpt)


KILLED_RESAVE = """
import os, sys, time, torch
from nanochat import checkpoint_manager as cm
real_save = torch.save
def hang_in_optimizer(obj, f, *args, **kwargs):
    if "hang" in obj:  # write part of the file, then wait to be killed
        f.write(b"PK partial")
        f.flush()
        print("writing", flush=True)
        time.sleep(120)
    return real_save(obj, f, *args, **kwargs)
torch.save = hang_in_optimizer
ckpt, step = sys.argv[1], int(sys.argv[2])
state = {"w": torch.full((3,), 2.0)}
cm.save_checkpoint(ckpt, step, state, {"hang": 1}, {"step": step, "model_config": {"n_layer": 9}})
"""


def test_kill_during_resave_of_the_final_step_keeps_it_and_its_temps_are_cleaned(tmp_path):
    ckpt = tmp_path / "d2"
    cm.save_checkpoint(str(ckpt), 1, {"w": torch.zeros(3)}, {"step": 0}, {"step": 0})
    cm.save_checkpoint(str(ckpt), 2, {"w": torch.ones(3)}, {"step": 2}, {"step": 2})
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(cm.__file__))))
    writer = subprocess.Popen([sys.executable, "-c", KILLED_RESAVE, str(ckpt), "2"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n", writer.stderr.read()
    finally:
        writer.kill()  # SIGKILL: no cleanup runs in the writer
        writer.wait()
    leftovers = [f for f in os.listdir(ckpt) if ".tmp." in f]
    assert leftovers  # the killed writer's temp files are on disk
    assert cm.find_last_step(str(ckpt)) == 2  # the step being re-saved is still complete...
    model_data, optim_data, meta = cm.load_checkpoint(str(ckpt), 2, "cpu", load_optimizer=True)
    assert torch.equal(model_data["w"], torch.ones(3)) and optim_data == {"step": 2} and meta == {"step": 2}

    cm.save_checkpoint(str(ckpt), 3, {"w": torch.ones(3)}, {"step": 3}, {"step": 3})  # the next save cleans
    assert not [f for f in os.listdir(ckpt) if ".tmp." in f]
