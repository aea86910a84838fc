"""
base_train (and chat_sft and chat_rl, below) with two processes for real: `torchrun --nproc_per_node=2` on
CPU (gloo) on the committed sample.
The checkpoint loads, a 2-rank resume ends bit for bit where the uninterrupted 2-rank run ends (each rank
restores its own dataloader state), and one process with the same total batch reaches about the same val
bpb (the ranks read different row groups, so only close, not equal; both are measured on one val set,
since a 2-rank evaluation also reads other val row groups than a 1-process one).
"""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import install_sample_base_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
FLAGS = ["--device-type=cpu", "--depth=2", "--head-dim=64", "--max-seq-len=64", "--device-batch-size=2",
         "--total-batch-size=512", "--eval-tokens=512", "--core-metric-every=-1", "--sample-every=-1",
         "--window-pattern=L", "--warmup-steps=2", "--embedding-lr=1", "--unembedding-lr=0.1",
         "--matrix-lr=0.1", f"--num-iterations={STEPS}", f"--eval-every={STEPS}", "--save-every=3"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, sample_tokenizer):
    with pytest.MonkeyPatch.context() as mp:
        yield install_sample_base_dir(mp, tmp_path_factory.mktemp("nanochat_mp"), sample_tokenizer)


def launch(base_dir, nproc, program, torchrun=True, **env):
    """Start `python [torchrun with nproc processes] program...` on base_dir, outside any torchrun environment
    of the test's own; stdout and stderr as one text stream."""
    env = dict(os.environ, NANOCHAT_BASE_DIR=str(base_dir), NANOCHAT_COMPILE="0", OMP_NUM_THREADS="1",
               PYTHONUNBUFFERED="1", **env)
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    command = [sys.executable, *(launcher if torchrun else []), *program]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def start(base_dir, nproc, extra):
    """Launch one base_train run (under torchrun when nproc > 1)."""
    return launch(base_dir, nproc, ["-m", "scripts.base_train", *FLAGS, *extra], torchrun=nproc > 1)


def finish(proc):
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-5000:]
    return out


def final_val_bpb(out):
    return float(re.findall(rf"^Step {STEPS:05d} \| Validation bpb: ([\d.]+)", out, re.M)[-1])


def same_val_bpb(tag):
    """val bpb of a final checkpoint on the first 16 val batches of one process (the same for every tag)."""
    from nanochat.checkpoint_manager import load_model
    from nanochat.dataloader import tokenizing_distributed_data_loader_bos_bestfit
    from nanochat.loss_eval import evaluate_bpb
    from nanochat.tokenizer import get_token_bytes
    model, tokenizer, _ = load_model("base", torch.device("cpu"), phase="eval", model_tag=tag, step=STEPS)
    loader = tokenizing_distributed_data_loader_bos_bestfit(tokenizer, 4, 64, "val", device="cpu")
    try:
        with torch.no_grad():
            return evaluate_bpb(model, loader, 16, get_token_bytes("cpu"))
    finally:
        loader.close()


def test_two_process_training_checkpoint_resume_and_one_process_agreement(base_dir):
    ckpt = os.path.join(base_dir, "base_checkpoints", "mp2")
    two = finish(start(base_dir, 2, ["--model-tag=mp2"]))
    straight = torch.load(os.path.join(ckpt, f"model_{STEPS:06d}.pt"))

    # (i) the checkpoint loads, and its meta holds every rank's loader state (rank 0's also on its own)
    from nanochat.checkpoint_manager import load_model
    model, _, meta = load_model("base", torch.device("cpu"), phase="eval", model_tag="mp2", step=3)
    states = meta["dataloader_state_dicts"]
    assert [(s["rank"], s["world_size"]) for s in states] == [(0, 2), (1, 2)]
    assert meta["dataloader_state_dict"] == states[0]
    assert states[0]["cursor"] != states[1]["cursor"]

    # (ii) resumed from step 3 on two ranks, the run ends exactly where the uninterrupted one ended;
    # (iii), one process with the same total batch (twice the accumulation), runs alongside
    resuming = start(base_dir, 2, ["--model-tag=mp2", "--resume-from-step=3"])
    single = start(base_dir, 1, ["--model-tag=mp1"])
    resumed, one = finish(resuming), finish(single)
    assert "approximate resume" not in resumed
    again = torch.load(os.path.join(ckpt, f"model_{STEPS:06d}.pt"))
    different = [k for k in straight if not torch.equal(straight[k], again[k])]
    assert not different, different
    assert final_val_bpb(resumed) == final_val_bpb(two)

    # (iii) the single process ends close to the two ranks
    bpb_one, bpb_two = same_val_bpb("mp1"), same_val_bpb("mp2")
    assert abs(bpb_one - bpb_two) / bpb_one < 0.05, (bpb_one, bpb_two)
    assert final_val_bpb(one) > 0
    with open(os.path.join(base_dir, "base_checkpoints", "mp1", f"meta_{STEPS:06d}.json")) as f:
        assert len(json.load(f)["dataloader_state_dicts"]) == 1
    print(f"final val bpb: 1 process {bpb_one:.6f}, 2 processes {bpb_two:.6f}")


# -----------------------------------------------------------------------------
# chat_sft: each rank packs its own conversations, so its packer state is saved and restored per rank

@pytest.fixture(scope="module")
def sft_base_dir(tmp_path_factory, chat_tokenizer):
    """test_chat_sft's base dir (chat tokenizer, depth-2 base checkpoint), for processes started offline."""
    from test_chat_sft import write_sft_base_dir
    return write_sft_base_dir(tmp_path_factory.mktemp("nanochat_mp_sft"), chat_tokenizer)


def start_sft(base_dir, extra, nproc=2):
    program = ["-m", "scripts.chat_sft", "--device-type=cpu", "--model-tag=d2", "--num-iterations=4",
               "--eval-every=2", "--eval-tokens=512", "--chatcore-every=-1", "--save-every=2", *extra]
    return launch(base_dir, nproc, program, NANOCHAT_OFFLINE="1")


def test_two_process_sft_resumes_exactly(sft_base_dir):
    ckpt = os.path.join(sft_base_dir, "chatsft_checkpoints", "d2")
    out = finish(start_sft(sft_base_dir, []))
    assert "gradient accumulation steps: 1" in out  # the total batch of 2 rows x 2 ranks
    # the base optimizer was saved by one process: its unsharded state cannot seed two ranks' shards
    assert "optimizer state was saved by 1 rank(s) and this run has 2; starting the optimizer fresh" in out
    straight = torch.load(os.path.join(ckpt, "model_000004.pt"))
    with open(os.path.join(ckpt, "meta_000002.json")) as f:
        states = json.load(f)["loop_state"]["loader_states"]
    assert len(states) == 2 and states[0] != states[1]  # each rank's own packer state

    resumed = finish(start_sft(sft_base_dir, ["--resume-from-step=2"]))
    again = torch.load(os.path.join(ckpt, "model_000004.pt"))
    different = [k for k in straight if not torch.equal(straight[k], again[k])]
    assert not different, different
    losses = lambda text: re.findall(r"^step 0000([34]) .*? loss: ([\d.]+)", text, re.M)
    assert losses(resumed) == losses(out) and len(losses(out)) == 2


# -----------------------------------------------------------------------------
# chat_rl: each rank rolls out its own questions, seeded by (step, question, sampling call)

# GSM8K's reward never fires on a random model (zero advantages, weights that never move): the driver
# gives test_chat_rl's length-parity reward, then runs the real script under torchrun
RL_DRIVER = """from tasks.gsm8k import GSM8K
GSM8K.reward = lambda self, conversation, response: float(len(response) % 2 == 0)
from scripts import chat_rl
chat_rl.main()
"""


@pytest.fixture(scope="module")
def rl_base_dir(tmp_path_factory, chat_tokenizer):
    from test_chat_rl import write_rl_base_dir
    root = write_rl_base_dir(tmp_path_factory.mktemp("nanochat_mp_rl"), chat_tokenizer)
    (root / "rl_driver.py").write_text(RL_DRIVER)
    return root


def start_rl(base_dir, extra, nproc=2):
    from test_chat_rl import RUN_FLAGS
    program = [str(base_dir / "rl_driver.py"), *RUN_FLAGS, "--examples-per-step=2", "--num-steps=3",
               "--eval-every=-1", *extra]
    return launch(base_dir, nproc, program, NANOCHAT_OFFLINE="1", PYTHONPATH=REPO)


def test_two_process_rl_resumes_exactly(rl_base_dir):
    from test_chat_rl import step_lines
    ckpt = os.path.join(rl_base_dir, "chatrl_checkpoints", "d2")
    out = finish(start_rl(rl_base_dir, []))
    assert sorted(f for f in os.listdir(ckpt) if f.startswith("optim_000001")) == [
        "optim_000001_rank0.pt", "optim_000001_rank1.pt"]
    with open(os.path.join(ckpt, "meta_000001.json")) as f:  # the ranks that saved a shard
        assert json.load(f)["loop_state"]["world_size"] == 2
    straight = torch.load(os.path.join(ckpt, "model_000003.pt"))
    sft = torch.load(os.path.join(rl_base_dir, "chatsft_checkpoints", "d2", "model_000003.pt"))
    assert any(not torch.equal(sft[k], straight[k]) for k in sft)  # the updates moved the weights

    resuming = start_rl(rl_base_dir, ["--resume-from-step=1"])
    # one rank cannot take over two ranks' questions and optimizer shards: refused, naming the fix (the
    # check every stage shares, training.check_world_size: test_training tests it in-process)
    one = start_rl(rl_base_dir, ["--resume-from-step=1"], nproc=1)
    resumed, (refused, _) = finish(resuming), one.communicate(timeout=180)
    again = torch.load(os.path.join(ckpt, "model_000003.pt"))
    different = [k for k in straight if not torch.equal(straight[k], again[k])]
    assert not different, different
    rewards = lambda text: re.findall(r"^Step [12]/3 \| Average reward: .*$", text, re.M)
    assert step_lines(resumed) == [line for line in step_lines(out) if line[0] != "0"]
    assert rewards(resumed) == rewards(out) and len(rewards(out)) == 2
    assert one.returncode != 0
    assert (f"chat_rl: error: --resume-from-step=1: {ckpt}/optim_000001_rank*.pt holds the optimizer shards "
            f"of 2 rank(s) and this run has 1; resume with the world size that saved it (torchrun "
            f"--nproc_per_node=2)") in refused, refused[-3000:]


def test_a_step_saved_again_by_fewer_ranks_keeps_only_their_shards(tmp_path):
    # a tag trained on 2 ranks, then again on 1: rank 1's old shard would make the step look saved by 2 ranks
    # (a 1-rank resume refused, a 2-rank one fed two runs' states)
    from nanochat.checkpoint_manager import save_checkpoint
    weights, shard = {"w": torch.ones(2)}, {"state": {}, "param_groups": []}
    for rank in (0, 1):  # what the 2 ranks write (no process group: each rank's files only)
        save_checkpoint(str(tmp_path), 1, weights, shard, {"step": 1}, rank=rank)
    assert len(os.listdir(tmp_path)) == 4
    save_checkpoint(str(tmp_path), 1, weights, shard, {"step": 1})  # one process saves step 1 again
    assert sorted(os.listdir(tmp_path)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
