"""
Every damaged file a run reads ends in one last error line that names the file, the problem and
the fix: pretraining shards, checkpoint model / optimizer / meta files, tokenizer.pkl,
token_bytes.pt, the eval bundle zip, task data (JSON lines), and a server that cannot start
because of one of them. Each test writes the damaged file, runs the code that a script runs to
read it, and checks the last line of the traceback a user would see.
"""
import gzip
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat import core_eval, dataset
from nanochat.common import REPO_DATA_DIR
from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
from nanochat.tokenizer import get_token_bytes, get_tokenizer
from tasks import common as task_common
from tasks.customjson import CustomJSON

from conftest import TINY_VOCAB, raised_on_the_loader_thread, write_tiny_checkpoint

REPO_ROOT = os.path.dirname(REPO_DATA_DIR)
VOCAB = TINY_VOCAB


def last_line(excinfo):
    """The last line of the traceback Python prints for this exception (chained causes come first)."""
    return "".join(traceback.format_exception(excinfo.value)).rstrip().splitlines()[-1]


def assert_clear(line, path, fix):
    assert str(path) in line, line  # names the file
    assert fix in line, line  # says what to do about it


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def save_tiny_checkpoint(base, source="base", step=5):
    empty_optimizer = {"state": {}, "param_groups": []}
    ckpt, _ = write_tiny_checkpoint(base, source, step, sequence_len=32, optimizer_state=empty_optimizer)
    return Path(ckpt)


# -----------------------------------------------------------------------------
# Pretraining shards

def install_shards(base):
    data_dir = base / dataset.DATA_DIRNAME
    shutil.copytree(os.path.join(REPO_DATA_DIR, "pretrain_sample"), data_dir,
                    ignore=shutil.ignore_patterns("*.md"))
    train_shard = sorted(data_dir.glob("shard_*.parquet"))[0]
    return train_shard


def test_garbage_shard(tiny_base_dir):
    shard = install_shards(tiny_base_dir)
    shard.write_bytes(b"PAR1" + os.urandom(200) + b"PAR1")
    with pytest.raises(dataset.CorruptShardError) as info:
        next(dataset.parquets_iter_batched("train"))
    assert_clear(last_line(info), shard, "python -m nanochat.dataset")


@raised_on_the_loader_thread
def test_truncated_shard_in_the_training_loader(tiny_base_dir, tiny_tokenizer):
    shard = install_shards(tiny_base_dir)
    truncate(shard)
    loader = tokenizing_distributed_data_loader_bos_bestfit(tiny_tokenizer, 1, 32, "train", device="cpu")
    with pytest.raises(dataset.CorruptShardError) as info:
        next(loader)
    assert_clear(last_line(info), shard, "python -m nanochat.dataset")


# -----------------------------------------------------------------------------
# Checkpoints

def test_truncated_model_file(tiny_base_dir):
    ckpt = save_tiny_checkpoint(tiny_base_dir)
    truncate(ckpt / "model_000005.pt")
    with pytest.raises(RuntimeError) as info:
        cm.load_model("base", "cpu", "eval")
    assert_clear(last_line(info), ckpt / "model_000005.pt", f"Fix: delete {ckpt / 'meta_000005.json'}")


def test_truncated_optimizer_shard(tiny_base_dir):
    ckpt = save_tiny_checkpoint(tiny_base_dir)
    truncate(ckpt / "optim_000005_rank0.pt")
    with pytest.raises(RuntimeError) as info:
        cm.load_checkpoint(str(ckpt), 5, "cpu", load_optimizer=True)
    assert_clear(last_line(info), ckpt / "optim_000005_rank0.pt", "Fix: delete")


def test_truncated_meta_file(tiny_base_dir):
    ckpt = save_tiny_checkpoint(tiny_base_dir)
    truncate(ckpt / "meta_000005.json")
    with pytest.raises(ValueError) as info:
        cm.load_model("base", "cpu", "eval")
    assert_clear(last_line(info), ckpt / "meta_000005.json", "so that the previous complete step is used")


def test_meta_file_without_model_config(tiny_base_dir):
    ckpt = save_tiny_checkpoint(tiny_base_dir)
    (ckpt / "meta_000005.json").write_text(json.dumps(["not", "an", "object"]))
    with pytest.raises(ValueError) as info:
        cm.load_model("base", "cpu", "eval")
    assert_clear(last_line(info), ckpt / "meta_000005.json", "Fix: delete")
    (ckpt / "meta_000005.json").write_text(json.dumps({"step": 5}))
    with pytest.raises(ValueError) as info:
        cm.load_model("base", "cpu", "eval")
    assert_clear(last_line(info), ckpt / "meta_000005.json", "Fix: delete")


# -----------------------------------------------------------------------------
# Tokenizer files

@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_bad_tokenizer_pkl(tiny_base_dir, damage):
    path = tiny_base_dir / "tokenizer" / "tokenizer.pkl"
    if damage == "truncated":
        truncate(path)
    else:
        path.write_bytes(os.urandom(64))
    with pytest.raises(ValueError) as info:
        get_tokenizer()
    assert_clear(last_line(info), path, "python -m scripts.tok_train")


def test_tokenizer_pkl_holding_something_else(tiny_base_dir):
    path = tiny_base_dir / "tokenizer" / "tokenizer.pkl"
    torch.save({"not": "a tokenizer"}, path)  # a valid pickle of the wrong thing
    with pytest.raises(ValueError) as info:
        get_tokenizer()
    assert_clear(last_line(info), path, "python -m scripts.tok_train")


def test_bad_token_bytes(tiny_base_dir, tiny_tokenizer):
    path = tiny_base_dir / "tokenizer" / "token_bytes.pt"
    path.write_bytes(b"PK\x03\x04 not a torch file")
    with pytest.raises(ValueError) as info:
        get_token_bytes()
    line = last_line(info)
    assert_clear(line, path, "compute_token_bytes")
    assert "weights_only" not in line  # torch's advice to unpickle anything is not the fix for a damaged file
    # the fix in the message works: run it, then the table loads and matches the tokenizer
    command = line.split("`")[1]
    assert command.startswith("python -c ")
    code = command[len("python -c "):].strip('"')
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, env=dict(os.environ))
    assert get_token_bytes().shape == (VOCAB,)


# -----------------------------------------------------------------------------
# Eval bundle and task data

def test_corrupt_eval_bundle_zip(tiny_base_dir, tmp_path, monkeypatch):
    os.makedirs(tiny_base_dir, exist_ok=True)
    downloaded = tiny_base_dir / "eval_bundle.zip"
    downloaded.write_bytes(b"PK\x03\x04" + os.urandom(100))
    committed_dir = tmp_path / "repo_data"
    committed_dir.mkdir()
    (committed_dir / "eval_bundle.zip").write_bytes(b"PK\x03\x04" + os.urandom(100))
    monkeypatch.setattr(core_eval, "REPO_DATA_DIR", str(committed_dir))
    with pytest.raises(core_eval.EvalBundleError) as info:
        core_eval.ensure_eval_bundle()
    line = last_line(info)
    fix = f"Download {core_eval.EVAL_BUNDLE_URL} and unzip it"
    assert_clear(line, committed_dir / "eval_bundle.zip", fix)
    assert str(downloaded) in line


def test_corrupt_committed_task_data(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    monkeypatch.setattr(task_common, "TASK_DATA_DIR", str(tmp_path))
    path = tmp_path / "gsm8k" / "main" / "test.jsonl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(b'{"question": "1+1?", "answer": "#### 2"}\n{"question": "2+2?", "ans'))
    with pytest.raises(ValueError) as info:
        task_common.load_rows("GSM8K", "openai/gsm8k", "main", "test", "gsm8k/main/test.jsonl.gz")
    assert_clear(last_line(info), f"{path}:2", "Fix: restore the committed copy with `git checkout --")
    path.write_bytes(path.read_bytes()[:-12])  # a truncated gzip stream
    with pytest.raises(ValueError) as info:
        task_common.load_rows("GSM8K", "openai/gsm8k", "main", "test", "gsm8k/main/test.jsonl.gz")
    assert_clear(last_line(info), path, "Fix: restore the committed copy")


def test_bad_line_in_custom_conversations(tmp_path):
    path = tmp_path / "identity_conversations.jsonl"
    path.write_text('[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]\n'
                    '[{"role": "user", "content": "who are you?"}, {"role": "assistant"\n')
    with pytest.raises(ValueError) as info:
        CustomJSON(filepath=str(path))
    assert_clear(last_line(info), f"{path}:2", "Fix: correct or delete that line")


# -----------------------------------------------------------------------------
# A server that cannot start says why on its last line

def test_chat_web_startup_failure_ends_with_its_cause(tiny_base_dir):
    save_tiny_checkpoint(tiny_base_dir, source="sft")
    pkl = tiny_base_dir / "tokenizer" / "tokenizer.pkl"
    truncate(pkl)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "scripts.chat_web", "--device-type", "cpu",
                             "--host", "127.0.0.1", "--port", "0"],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    last = result.stderr.rstrip().splitlines()[-1]
    assert last.startswith("chat_web: error: Tokenizer file"), result.stderr[-3000:]
    assert_clear(last, pkl, "python -m scripts.tok_train")
