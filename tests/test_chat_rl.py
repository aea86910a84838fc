"""
scripts/chat_rl.py and its pieces in nanochat/chat_train.py, on CPU, offline: the policy-gradient
arithmetic on hand examples (advantages, the token-normalised objective and its gradient,
padding/targets with a terminated and a cut sample, pass@k), rollouts that keep the terminating
<|assistant_end|> (Engine.generate_batch(keep_terminal=True), scripted model), the example schedule,
and real RL steps of a depth-2 model with an exact resume from the middle checkpoint.
"""
import contextlib
import io
import json
import os
import re
import shutil
import signal
import sys
from types import SimpleNamespace

import pytest
import torch

from nanochat.engine import Engine
from nanochat.tokenizer import compute_token_bytes
from nanochat import chat_train
from scripts import chat_rl

from conftest import (exits_with_error, point_base_dir_at, sigterm_on_first_call, spawn_ranks,
                      write_tiny_checkpoint)



@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, chat_tokenizer):
    """NANOCHAT_BASE_DIR with the chat tokenizer (vocab 512, GSM8K and identity text) and a depth-2, width-128
    SFT checkpoint at step 3."""
    root = tmp_path_factory.mktemp("nanochat_rl")
    mp = pytest.MonkeyPatch()
    point_base_dir_at(mp, root, NANOCHAT_COMPILE="0")
    yield write_rl_base_dir(root, chat_tokenizer)
    mp.undo()


def write_rl_base_dir(root, tok):
    """`root` holding `tok` (with its token_bytes.pt) and a depth-2, width-128 SFT checkpoint d2 at step 3."""
    tok.save(os.path.join(root, "tokenizer"))
    torch.save(compute_token_bytes(tok), os.path.join(root, "tokenizer", "token_bytes.pt"))
    write_tiny_checkpoint(root, "sft", step=3, vocab_size=512, sequence_len=128, n_embd=128)
    return root


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer()


# -----------------------------------------------------------------------------
# The arithmetic, by hand

def test_advantages_are_reward_minus_group_mean():
    adv = chat_train.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0]))
    assert torch.allclose(adv, torch.tensor([0.4, -0.6, -0.6, 0.4, 0.4]))
    assert adv.sum().abs() < 1e-6
    assert torch.equal(chat_train.group_advantages(torch.tensor([1.0, 1.0, 1.0])), torch.zeros(3))


def test_objective_is_token_normalised_and_ignores_invalid_targets():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -4.0, -9.0]], requires_grad=True)
    targets = torch.tensor([[5, 6, -1], [7, -1, -1]])  # 3 valid tokens
    advantages = torch.tensor([0.5, -0.5])
    objective = chat_train.policy_objective(logp, targets, advantages, num_passes=2, examples_per_rank=4)
    # (0.5 * (-1 - 2) + (-0.5) * (-0.5)) / (3 * 2 * 4)
    assert objective.item() == pytest.approx((-1.5 + 0.25) / 24)
    objective.backward()
    expected = torch.tensor([[0.5, 0.5, 0.0], [-0.5, 0.0, 0.0]]) / 24
    assert torch.allclose(logp.grad, expected)
    # identical rewards: zero advantages, zero gradient
    logp.grad = None
    chat_train.policy_objective(logp, targets, chat_train.group_advantages(torch.ones(2)), 1, 1).backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    # a pass with no valid target divides by 1, not 0
    none_valid = chat_train.policy_objective(logp, torch.full((2, 3), -1), advantages, 1, 1)
    assert none_valid.item() == 0.0


def test_rollout_tensors_train_the_terminator_and_never_the_padding():
    END = 9
    finished = [1, 2, 30, 31, END]  # prompt 1, 2; sampled 30 31; then the terminator it stopped with
    cut = [1, 2, 40, 41, 42, 43]  # cut by the token limit: no terminator
    forced = [1, 2, 50]
    masks = [[0, 0, 1, 1, 1], [0, 0, 1, 0, 1, 1], [0, 0, 1]]  # 41 was forced by the tool
    inputs, targets = chat_train.rollout_tensors([finished, cut, forced], masks, pad_id=END)
    assert inputs.tolist() == [[1, 2, 30, 31, END], [1, 2, 40, 41, 42], [1, 2, 50, END, END]]
    assert targets.tolist() == [[-1, 30, 31, END, -1], [-1, 40, -1, 42, 43], [-1, 50, -1, -1, -1]]


def test_pass_at_k_counts_by_hand():
    records = [{"idx": 0, "outcomes": [{"is_correct": 0}, {"is_correct": 1}, {"is_correct": 0}]},
               {"idx": 1, "outcomes": [{"is_correct": 1}, {"is_correct": 0}, {"is_correct": 0}]},
               {"idx": 2, "outcomes": [{"is_correct": 0}, {"is_correct": 0}, {"is_correct": 0}]},
               {"idx": 3, "outcomes": [{"is_correct": 0}, {"is_correct": 0}, {"is_correct": 1}]}]
    assert chat_train.pass_at_k_counts(records, 3) == [1, 2, 3]
    assert chat_train.pass_at_k_counts([], 2) == [0, 0]


def test_example_index_strides_by_rank_and_cycles():
    # 10 questions, 2 ranks, 3 per rank and step: rank 1 sees 1, 3, 5 | 7, 9, 1 | 3, ...
    seen = [chat_train.example_index(step, e, 3, 1, 2, 10) for step in range(3) for e in range(3)]
    assert seen == [1, 3, 5, 7, 9, 1, 3, 5, 7]
    assert [chat_train.example_index(s, 0, 1, 0, 1, 4) for s in range(6)] == [0, 1, 2, 3, 0, 1]


# -----------------------------------------------------------------------------
# Rollouts with a scripted model: the terminator is kept for finished samples only

class ScriptedModel:
    """Greedy-decodes `script` whatever the input: position t after the prompt gets logits peaked at script[t]."""

    def __init__(self, script, vocab_size, prompt_len):
        self.script, self.vocab_size, self.prompt_len = script, vocab_size, prompt_len
        self.config = SimpleNamespace(n_kv_head=1, n_head=1, n_embd=4, n_layer=1, sequence_len=64)

    def get_device(self):
        return torch.device("cpu")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        generated = kv_cache.get_pos() + T - self.prompt_len  # tokens generated before this position's output
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[min(generated, len(self.script) - 1)]] = 100.0
        return logits


def test_generate_batch_keeps_the_terminator_of_finished_samples_on_request(tokenizer):
    end = tokenizer.encode_special("<|assistant_end|>")
    prompt = [tokenizer.get_bos_token_id(), 100, 101]
    script = [200, 201, end, 202]
    engine = Engine(ScriptedModel(script, 512, len(prompt)), tokenizer)
    seqs, masks, finished = engine.generate_batch(prompt, 2, keep_terminal=True, max_tokens=8,
                                                  temperature=0.0)
    assert seqs == [prompt + [200, 201, end]] * 2 and masks == [[0, 0, 0, 1, 1, 1]] * 2
    assert finished == [True] * 2
    seqs, masks, finished = engine.generate_batch(prompt, 1, keep_terminal=True, max_tokens=2,
                                                  temperature=0.0)
    assert seqs == [prompt + [200, 201]] and finished == [False]
    # by default the terminator is dropped and the return value is (results, masks), as before
    default = engine.generate_batch(prompt, num_samples=1, max_tokens=8, temperature=0.0)
    assert default == ([prompt + [200, 201]], [[0, 0, 0, 1, 1]])


def test_rollout_sampling_calls_are_seeded_by_step_question_and_call(tokenizer):
    # the reference's seed, hash((step, example_idx, sampling_step)) & 0x7FFFFFFF: stable across runs since
    # ints hash to themselves; one generate_batch call per device batch of samples
    calls = []

    class RecordingEngine:  # stands in for the Engine: records the sampling calls and returns the prompt
        model = SimpleNamespace(eval=lambda: None)

        def generate_batch(self, prompt, num_samples, **kwargs):
            calls.append((num_samples, kwargs))
            return [list(prompt)] * num_samples, [[0] * len(prompt)] * num_samples, [False] * num_samples

    from tasks.gsm8k import GSM8K
    args = SimpleNamespace(num_samples=16, device_batch_size=8, max_new_tokens=64, temperature=0.7, top_k=5)
    task = GSM8K("main", "train")
    sequences, *_ = chat_train.rollout_example(RecordingEngine(), tokenizer, task, 5, 3, args, "cpu")
    sampling = dict(keep_terminal=True, max_tokens=64, temperature=0.7, top_k=5)
    assert calls == [(8, {**sampling, "seed": hash((3, 5, call)) & 0x7FFFFFFF}) for call in range(2)]
    assert len(sequences) == 16


@pytest.mark.parametrize("argv, message", [
    (["--num-samples=0"], "--num-samples must be positive, got 0"),
    (["--num-steps=0"], "--num-steps must be positive, or -1 for --num-epochs passes, got 0"),
    (["--temperature=-0.5"], "--temperature must be >= 0, got -0.5")])
def test_bad_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        chat_rl.parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


# -----------------------------------------------------------------------------
# Real runs

RUN_FLAGS = ["--device-type=cpu", "--model-tag=d2", "--num-steps=2", "--num-samples=3", "--device-batch-size=2",
             "--examples-per-step=1", "--max-new-tokens=8", "--temperature=1.0", "--top-k=0", "--save-every=1",
             "--matrix-lr=0.5", "--embedding-lr=2", "--unembedding-lr=0.5", "--init-lr-frac=1.0"]


def length_parity_reward(self, conversation, response):
    """A reward a random model can earn (GSM8K's never fires on noise): 1 for an even-length response."""
    return float(len(response) % 2 == 0)


def step_lines(out):
    return re.findall(r"^Step (\d+)/\d+ \| Example step \d+ \| Pass \d+ \| loss: (\S+) \| Average reward: (\S+)$",
                      out, re.M)


def test_rl_steps_save_checkpoints_and_resume_exactly(base_dir, capsys, monkeypatch):
    from tasks.gsm8k import GSM8K
    monkeypatch.setattr(GSM8K, "reward", length_parity_reward)
    chat_rl.main(RUN_FLAGS + ["--eval-every=2", "--eval-examples=1"])
    out = capsys.readouterr().out
    ckpt = os.path.join(base_dir, "chatrl_checkpoints", "d2")
    assert sorted(os.listdir(ckpt)) == ["meta_000001.json", "meta_000002.json", "model_000001.pt",
                                        "model_000002.pt", "optim_000001_rank0.pt", "optim_000002_rank0.pt"]
    assert re.findall(r"^Step (\d+) \| Pass@1: [\d.]+, Pass@2: [\d.]+$", out, re.M) == ["0", "2"]
    lines = step_lines(out)
    assert len(lines) == 4  # 2 steps x 1 example x 2 passes (3 samples: a pass of 2, then of 1)
    assert "Total sequences per step: 3" in out
    sft = torch.load(os.path.join(base_dir, "chatsft_checkpoints", "d2", "model_000003.pt"))
    final = torch.load(os.path.join(ckpt, "model_000002.pt"))
    assert any(not torch.equal(sft[k], final[k]) for k in final)  # the updates moved the weights
    with open(os.path.join(ckpt, "meta_000002.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 2 and meta["model_config"]["n_layer"] == 2
    report = open(os.path.join(base_dir, "report", "chat-rl.md")).read()
    assert "Chat RL" in report and "![curves curve](chat-rl-curves.png)" in report
    assert os.path.exists(os.path.join(base_dir, "report", "chat-rl-curves.png"))
    # the curve holds what the run printed: pass@1 at the evaluations (steps 0, 2), the reward of each step
    rewards = [float(r) for r in re.findall(r"^Step \d+/\d+ \| Average reward: (\S+) \|", out, re.M)]
    passes = [float(p) for p in re.findall(r"^Step \d+ \| Pass@1: ([\d.]+)", out, re.M)]
    curve = meta["loop_state"]["curve"]
    assert curve["steps"] == [0, 1, 2] and curve["mean reward"] == rewards + [None]
    assert [round(v, 4) if v is not None else v for v in curve["pass@1"]] == [passes[0], None, passes[1]]

    chat_rl.main(RUN_FLAGS + ["--eval-every=-1", "--resume-from-step=1"])
    resumed = capsys.readouterr().out
    assert step_lines(resumed) == [line for line in lines if line[0] == "1"]
    again = torch.load(os.path.join(ckpt, "model_000002.pt"))
    assert all(torch.equal(final[k], again[k]) for k in final)


@pytest.mark.parametrize("suffix, reward", [("", 1.0), (".0", 0.0)])
def test_rollout_reward_is_the_gsm8k_eval_exact_match(tokenizer, suffix, reward):
    from tasks.gsm8k import GSM8K, extract_answer
    task = GSM8K("main", "train")
    conversation = task[0]
    gold = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
    answer = f"So the answer is\n#### {gold}{suffix}"
    prompt = tokenizer.render_for_completion(conversation)
    end = tokenizer.encode_special("<|assistant_end|>")
    model = ScriptedModel(tokenizer.encode(answer) + [end], 512, len(prompt))
    model.eval = lambda: model  # rollout_example puts the policy in eval mode
    engine = Engine(model, tokenizer)
    args = SimpleNamespace(num_samples=2, device_batch_size=2, max_new_tokens=64, temperature=0.0, top_k=0)
    sequences, _, _, rewards, _ = chat_train.rollout_example(engine, tokenizer, task, 0, 0, args, "cpu")
    assert [tokenizer.decode(s[len(prompt):]) for s in sequences] == [answer + "<|assistant_end|>"] * 2
    assert rewards.tolist() == [reward] * 2 == [float(task.evaluate(conversation, answer))] * 2


def test_rl_resume_continues_the_same_wandb_run(base_dir, capsys, monkeypatch):
    from tasks.gsm8k import GSM8K
    monkeypatch.setattr(GSM8K, "reward", length_parity_reward)
    calls = []

    def init(**kwargs):  # stands in for wandb.init (a dependency): records what it was called with
        calls.append(kwargs)
        return SimpleNamespace(id=kwargs.get("id") or f"run{len(calls)}", log=lambda *a, **k: None,
                               finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=init))
    chat_rl.main(RUN_FLAGS + ["--eval-every=-1", "--run=rlrun"])
    assert calls[0]["name"] == "rlrun" and "id" not in calls[0]
    with open(os.path.join(base_dir, "chatrl_checkpoints", "d2", "meta_000001.json")) as f:
        assert json.load(f)["wandb_run_id"] == "run1"
    chat_rl.main(RUN_FLAGS + ["--eval-every=-1", "--run=rlrun", "--resume-from-step=1"])
    assert calls[1]["id"] == "run1" and calls[1]["resume"] in ("allow", "must")
    capsys.readouterr()


def test_an_epoch_shorter_than_one_step_is_refused(base_dir, capsys):
    # --num-steps -1: the steps come from the epochs, and no step fits in one
    with exits_with_error(capsys, r"^chat_rl: error: No steps to run: \d+ training questions, "
                                  r"--examples-per-step 100000, --num-epochs 1$"):
        chat_rl.main(RUN_FLAGS + ["--num-steps=-1", "--examples-per-step=100000"])


def test_sigterm_saves_after_the_step_and_the_resume_matches_an_uninterrupted_run(base_dir, capsys,
                                                                                   monkeypatch):
    from tasks.gsm8k import GSM8K
    ckpt = os.path.join(base_dir, "chatrl_checkpoints", "d2")
    flags = RUN_FLAGS + ["--num-steps=3", "--eval-every=-1", "--save-every=-1"]
    monkeypatch.setattr(GSM8K, "reward", length_parity_reward)
    try:
        chat_rl.main(flags)
        straight = torch.load(os.path.join(ckpt, "model_000003.pt"))
        shutil.rmtree(ckpt)
        sigterm_on_first_call(monkeypatch, GSM8K, "reward")  # during the first step's rollouts
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            chat_rl.main(flags)
        assert e.value.code == 128 + signal.SIGTERM
        out = capsys.readouterr().out
        assert "resume with --resume-from-step=1" in out and len(step_lines(out)) == 2  # step 0 finished
        assert sorted(os.listdir(ckpt)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
        chat_rl.main(flags + ["--resume-from-step=1"])
        again = torch.load(os.path.join(ckpt, "model_000003.pt"))
        assert all(torch.equal(straight[k], again[k]) for k in straight)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)  # the other runs of this module expect their files only


def _examples_per_step_worker(rank, port, out_dir):
    import torch.distributed as dist
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            chat_rl.main(["--device-type=cpu", "--examples-per-step=3"])
    except SystemExit as e:
        with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
            f.write(f"{e.code}: {stderr.getvalue().strip().splitlines()[-1]}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_questions_per_step_must_split_evenly_over_the_ranks(base_dir, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    spawn_ranks(_examples_per_step_worker, port, str(tmp_path))
    for rank in range(2):  # both ranks stop before loading anything, with the same message
        assert (tmp_path / f"rank{rank}").read_text() == (
            "1: chat_rl: error: --examples-per-step (3) must be a multiple of the world size (2)"), rank


def test_a_resume_past_the_horizon_is_refused_instead_of_running_forever(base_dir, capsys, monkeypatch):
    from tasks.gsm8k import GSM8K
    monkeypatch.setattr(GSM8K, "reward", length_parity_reward)
    chat_rl.main(RUN_FLAGS + ["--eval-every=-1"])  # saves step 2, the last
    # the loop ends at step == horizon: from step 2 with a horizon of 1 it would never end
    with exits_with_error(capsys, r"--resume-from-step=2 is past this run's horizon of 1 steps; "
                                  r"pass --num-steps \(or --num-epochs\) for at least 2 steps"):
        chat_rl.main(RUN_FLAGS + ["--eval-every=-1", "--num-steps=1", "--resume-from-step=2"])
    capsys.readouterr()
