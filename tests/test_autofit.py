"""
--device-batch-size auto (nanochat/autofit.py). The search is the real one, running real forward and
backward passes of a tiny GPT; only the source of out-of-memory errors is injected, through
NANOCHAT_AUTOFIT_TOKEN_LIMIT (a try of more tokens than that raises torch.OutOfMemoryError).
"""
import argparse
import gc
import json
import os
import re
import socket

import pytest
import torch
import torch.distributed as dist

from conftest import exits_with_error, install_sample_base_dir, spawn_ranks, tiny_gpt, write_tiny_checkpoint
from nanochat import autofit

SEQ = 32


def tiny_model(vocab_size=64):
    return tiny_gpt(sequence_len=SEQ, vocab_size=vocab_size)


def test_batch_size_arg_takes_auto_or_a_positive_integer():
    assert autofit.batch_size_arg("auto") == "auto" and autofit.batch_size_arg("16") == 16
    for bad in ["0", "-4", "big", "1.5"]:
        with pytest.raises(argparse.ArgumentTypeError, match="positive integer or 'auto'"):
            autofit.batch_size_arg(bad)


def test_integers_are_kept_and_the_cpu_keeps_the_configured_batch(monkeypatch, capsys):
    monkeypatch.delenv(autofit.TOKEN_LIMIT_ENV, raising=False)
    model = tiny_model()
    assert autofit.device_batch_size(3, model, SEQ, 32, total_tokens=SEQ * 16) == 3
    assert capsys.readouterr().out == ""
    assert autofit.device_batch_size("auto", model, SEQ, 4, total_tokens=SEQ * 16) == 4
    assert "CPU does not report running out of memory" in capsys.readouterr().out


def test_picks_the_largest_power_of_two_that_fits_and_keeps_the_total_batch(monkeypatch, capsys):
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(5 * SEQ))  # 5 rows fit: 4 is the largest power of two
    batch = autofit.device_batch_size("auto", model, SEQ, 32, total_tokens=SEQ * 16)
    out = capsys.readouterr().out
    assert batch == 4
    assert ("16 ran out of memory; 8 ran out of memory; 4 fits" in out
            and "gradient accumulation 4 keeps the total batch 512 tokens" in out), out
    # the tries leave the model as they found it: same weights, no gradients
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())

    # from a small start the search doubles, up to the largest power of two that divides a step's rows
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(1000 * SEQ))
    assert autofit.device_batch_size("auto", model, SEQ, 1, total_tokens=SEQ * 12) == 4  # 8 does not divide
    out = capsys.readouterr().out
    assert "1 fits; 2 fits; 4 fits; no larger power of two divides the 12 rows" in out
    assert "gradient accumulation 3 keeps the total batch 384 tokens" in out


def test_evaluation_tries_forward_only_and_stops_at_max_rows(monkeypatch, capsys):
    model = tiny_model()
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(100 * SEQ))
    calls = []  # (rows, whether autograd recorded the forward)
    model.register_forward_hook(lambda module, inputs, output: calls.append((inputs[0].shape[0],
                                                                             output.requires_grad)))
    assert autofit.device_batch_size("auto", model, SEQ, 8, max_rows=200, backward=False) == 64
    assert calls == [(8, False), (16, False), (32, False), (64, False)]  # 128 never ran: over the limit
    assert "64 fits; 128 ran out of memory" in capsys.readouterr().out
    assert autofit.device_batch_size("auto", model, SEQ, 8, max_rows=16, backward=False) == 16
    assert "the search stops at 16 rows" in capsys.readouterr().out


def test_not_even_one_row_fits_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(SEQ - 1))
    with pytest.raises(autofit.OutOfMemory, match="not even one row of 32 tokens fits"):
        autofit.device_batch_size("auto", tiny_model(), SEQ, 8, total_tokens=SEQ * 8)


def test_a_resume_keeps_the_checkpoint_batch(monkeypatch, capsys):
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(1000 * SEQ))
    assert autofit.device_batch_size("auto", tiny_model(), SEQ, 32, total_tokens=SEQ * 64, saved=2) == 2
    assert "the checkpoint's" in capsys.readouterr().out


def test_running_out_of_memory_in_the_block_names_the_flag():
    with pytest.raises(autofit.OutOfMemory, match=r"lower --device-batch-size \(now 32\) or use "
                                                  r"--device-batch-size auto$"):
        with autofit.oom_advice("--device-batch-size", 32):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(autofit.OutOfMemory, match=r"lower -b \(now 8\) or use -b auto"):
        with autofit.oom_advice("-b", 8):
            raise RuntimeError("MPS backend out of memory")  # the plain-RuntimeError form
    with pytest.raises(ValueError, match="unrelated"):  # anything else passes through
        with autofit.oom_advice("-b", 8):
            raise ValueError("unrelated")


def test_an_error_other_than_out_of_memory_stops_the_search(monkeypatch):
    model = tiny_model()
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(1000 * SEQ))

    def broken_forward(module, inputs, output):  # a bug in the model, not a full device
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    model.register_forward_hook(broken_forward)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        autofit.device_batch_size("auto", model, SEQ, 8, total_tokens=SEQ * 8)


# -----------------------------------------------------------------------------
# Two ranks (gloo): each searches under its own limit, both take the smaller answer

def _rank_main(rank, port, limits, out_dir):
    os.environ.update(RANK=str(rank), OMP_NUM_THREADS="1")
    os.environ[autofit.TOKEN_LIMIT_ENV] = str(limits[rank])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        batch = autofit.device_batch_size("auto", tiny_model(), SEQ, 32, total_tokens=SEQ * 32)
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
            f.write(str(batch))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_the_smallest_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # 32 total rows per step, 16 per rank: rank 0 fits 8 rows, rank 1 only 2
    spawn_ranks(_rank_main, port, [8 * SEQ, 2 * SEQ], str(tmp_path))
    assert [(tmp_path / f"rank{r}").read_text() for r in range(2)] == ["2", "2"]


# -----------------------------------------------------------------------------
# base_train end to end on the committed sample

TRAIN_FLAGS = ["--device-type=cpu", "--depth=2", "--head-dim=64", "--max-seq-len=64",
               "--total-batch-size=256", "--eval-every=-1", "--core-metric-every=-1", "--sample-every=-1",
               "--window-pattern=L", "--warmup-steps=2", "--num-iterations=2", "--embedding-lr=3",
               "--matrix-lr=0.5"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, sample_tokenizer):
    with pytest.MonkeyPatch.context() as mpatch:
        yield install_sample_base_dir(mpatch, tmp_path_factory.mktemp("nanochat_autofit"), sample_tokenizer)


def train(argv, capsys):
    """base_train.main in this process; the GC policy and deterministic mode it sets are undone after."""
    from scripts import base_train
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        base_train.main(argv)
    finally:
        gc.enable()
        gc.unfreeze()
        torch.use_deterministic_algorithms(deterministic)
    return capsys.readouterr().out


def test_base_train_auto_trains_exactly_as_the_batch_it_picks(base_dir, monkeypatch, capsys):
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(2 * 64))  # two rows of 64 tokens fit
    out = train(TRAIN_FLAGS + ["--device-batch-size=auto", "--model-tag=auto"], capsys)
    assert re.search(r"Device batch size 2 \(auto, .*\): 4 ran out of memory; 2 fits; gradient accumulation "
                     r"2 keeps the total batch 256 tokens", out), out
    monkeypatch.delenv(autofit.TOKEN_LIMIT_ENV)
    train(TRAIN_FLAGS + ["--device-batch-size=2", "--model-tag=fixed"], capsys)
    ckpts = os.path.join(base_dir, "base_checkpoints")
    auto, fixed = (torch.load(os.path.join(ckpts, tag, "model_000002.pt")) for tag in ("auto", "fixed"))
    assert all(torch.equal(auto[k], fixed[k]) for k in fixed)  # the tries left no trace in the run
    meta = json.load(open(os.path.join(ckpts, "auto", "meta_000002.json")))
    assert meta["device_batch_size"] == 2 and meta["user_config"]["device_batch_size"] == "auto"


def test_running_out_of_memory_while_training_names_the_flag(base_dir, monkeypatch, capsys):
    from nanochat.gpt import GPT
    forward = GPT.forward

    def small_device_forward(self, idx, *args, **kwargs):  # the injected OOM: more than one row
        if idx.size(0) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", small_device_forward)
    with pytest.raises(autofit.OutOfMemory) as e:
        train(TRAIN_FLAGS + ["--device-batch-size=2", "--model-tag=oom"], capsys)
    assert str(e.value).endswith("lower --device-batch-size (now 2) or use --device-batch-size auto")
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError)


def test_a_total_batch_below_one_row_gets_the_geometry_error(base_dir, monkeypatch, capsys):
    # no row fits in a step's 32 tokens: there is nothing to search, and the batch check says why
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(1000 * 64))
    with exits_with_error(capsys, r"^base_train: error: total_batch_size \(32\) must be a positive multiple "
                                  r"of device_batch_size \* seq_len \* world_size = 32 \* 64 \* 1"):
        train(TRAIN_FLAGS + ["--device-batch-size=auto", "--total-batch-size=32", "--model-tag=tiny_total"],
              capsys)


# -----------------------------------------------------------------------------
# The other scripts' flags, end to end on tiny checkpoints (rows of 128 tokens, or 32 for base_eval)

@pytest.fixture
def chat_dir(tiny_base_dir, tiny_tokenizer, monkeypatch):
    """tiny_base_dir (vocab 300), its token_bytes.pt and no torch.compile."""
    from nanochat.tokenizer import compute_token_bytes
    monkeypatch.setenv("NANOCHAT_COMPILE", "0")
    torch.save(compute_token_bytes(tiny_tokenizer), tiny_base_dir / "tokenizer" / "token_bytes.pt")
    return tiny_base_dir


def undo_run_settings(main, argv):
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        return main(argv)
    finally:
        gc.enable()
        gc.unfreeze()
        torch.use_deterministic_algorithms(deterministic)


def test_chat_sft_auto(chat_dir, tiny_tokenizer, monkeypatch, capsys):
    from scripts import chat_sft
    write_tiny_checkpoint(chat_dir, "base", vocab_size=tiny_tokenizer.get_vocab_size())
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(2 * 64))
    undo_run_settings(chat_sft.main, ["--device-type=cpu", "--device-batch-size=auto", "--max-seq-len=64",
                                      "--total-batch-size=256", "--num-iterations=1", "--eval-tokens=256",
                                      "--chatcore-every=-1", "--load-optimizer=0"])
    out = capsys.readouterr().out
    assert "Device batch size 2 (auto, rows of 64 tokens, " in out and "accumulation 2 keeps" in out, out
    meta = json.load(open(chat_dir / "chatsft_checkpoints" / "d2" / "meta_000001.json"))
    assert meta["device_batch_size"] == 2 and meta["hyperparameters"]["device_batch_size"] == 2


def test_chat_rl_auto(chat_dir, tiny_tokenizer, monkeypatch, capsys):
    from scripts import chat_rl
    write_tiny_checkpoint(chat_dir, "sft", vocab_size=tiny_tokenizer.get_vocab_size())
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(3 * 128))
    undo_run_settings(chat_rl.main, ["--device-type=cpu", "--device-batch-size=auto", "--num-steps=1",
                                     "--num-samples=4", "--examples-per-step=1", "--max-new-tokens=4",
                                     "--eval-every=-1"])
    assert "Device batch size 2 (auto, rows of 128 tokens, " in capsys.readouterr().out
    meta = json.load(open(chat_dir / "chatrl_checkpoints" / "d2" / "meta_000001.json"))
    assert meta["device_batch_size"] == 2


def test_chat_eval_auto(chat_dir, tiny_tokenizer, monkeypatch, capsys):
    from scripts import chat_eval
    write_tiny_checkpoint(chat_dir, "sft", vocab_size=tiny_tokenizer.get_vocab_size())
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(5 * 128))
    chat_eval.main(["-i", "sft", "-a", "ARC-Easy", "-x", "2", "-b", "auto", "--device-type", "cpu"])
    assert "Device batch size 4 (auto, rows of 128 tokens, " in capsys.readouterr().out
    assert "- batch_size: 4" in (chat_dir / "report" / "chat-evaluation-sft.md").read_text()


def test_base_eval_auto(tiny_base_dir, tiny_tokenizer, monkeypatch, capsys):
    from nanochat.dataset import install_sample
    from nanochat.tokenizer import compute_token_bytes
    from scripts import base_eval
    install_sample()
    model = tiny_model(tiny_tokenizer.get_vocab_size())
    model.eval()
    loaded = (model, tiny_tokenizer, compute_token_bytes(tiny_tokenizer), SEQ, "tiny", "tiny")
    monkeypatch.setattr(base_eval, "load_nanochat_model", lambda *args: loaded)
    monkeypatch.setenv(autofit.TOKEN_LIMIT_ENV, str(5 * SEQ))
    base_eval.main(["--eval", "bpb", "--device-batch-size", "auto", "--split-tokens", str(16 * SEQ),
                    "--device-type", "cpu"])
    out = capsys.readouterr().out
    assert "Device batch size 4 (auto, rows of 32 tokens, " in out and "16 ran out of memory" in out, out
