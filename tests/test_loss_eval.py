import contextlib
import math
import re

import torch
import torch.nn.functional as F

from nanochat.loss_eval import bpb_steps, evaluate_bpb, run_bpb, split_bpb
from nanochat.tokenizer import compute_token_bytes

from conftest import TerminalIO, point_base_dir_at, tiny_gpt


class UniformModel:
    """Logits all equal: the loss of every real target is exactly ln V."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, x, y, loss_reduction="mean"):
        self.grad_enabled = torch.is_grad_enabled()
        logits = torch.zeros(*x.shape, self.vocab_size)
        return F.cross_entropy(logits.view(-1, self.vocab_size), y.view(-1), ignore_index=-1,
                               reduction=loss_reduction)


def test_uniform_model_bpb_by_hand():
    V = 8
    token_bytes = torch.tensor([1, 2, 3, 1, 4, 2, 0, 0])  # ids 6, 7 are specials
    y = torch.tensor([[0, 1, 6, -1], [4, 7, 2, 5]])
    x = torch.zeros_like(y)
    # counted targets: 0, 1, 4, 2, 5 -> bytes 1 + 2 + 4 + 3 + 2 = 12; five losses of ln 8 each
    expected = 5 * math.log(V) / (math.log(2) * 12)
    model = UniformModel(V)
    bpb = evaluate_bpb(model, [(x, y)], 1, token_bytes)
    assert math.isclose(bpb, expected, rel_tol=1e-6)  # the losses themselves are float32
    assert not model.grad_enabled  # a graph would hold every batch's activations to the end of the eval


def test_consumes_exactly_steps_batches():
    V = 4
    token_bytes = torch.ones(V, dtype=torch.long)
    y1 = torch.tensor([[0, 1]])
    y2 = torch.tensor([[2, -1]])
    seen = []

    def batches():
        for y in (y1, y2, y2):
            seen.append(y)
            yield torch.zeros_like(y), y
    bpb = evaluate_bpb(UniformModel(V), batches(), 2, token_bytes)
    assert len(seen) == 2
    assert math.isclose(bpb, 2.0, rel_tol=1e-6)  # ln 4 nats per 1-byte token = log2(4) bits per byte


def test_no_counted_bytes_gives_inf():
    token_bytes = torch.tensor([0, 0, 1])
    y = torch.tensor([[0, 1, -1]])
    assert evaluate_bpb(UniformModel(3), [(torch.zeros_like(y), y)], 1, token_bytes) == float("inf")


class ScriptedLossModel:
    """Per-token losses given batch by batch (float32, as a real model's)."""

    def __init__(self, losses):
        self.losses = iter(losses)

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, x, y, loss_reduction="mean"):
        return torch.tensor(next(self.losses), dtype=torch.float32)


def test_the_loss_sum_is_float64_so_late_losses_still_count():
    # a float32 sum stops growing by 1 nat at 2^24 nats (tens of millions of eval tokens reach that)
    token_bytes = torch.tensor([1])
    y = torch.tensor([[0]])
    bpb = evaluate_bpb(ScriptedLossModel([[2.0 ** 24], [1.0]]), [(y, y)] * 2, 2, token_bytes)
    assert math.isclose(bpb, (2 ** 24 + 1) / (math.log(2) * 2), rel_tol=1e-12)


def test_real_model_matches_manual_sum():
    V = 64
    model = tiny_gpt(vocab_size=V, sequence_len=16, n_layer=1)
    torch.nn.init.normal_(model.lm_head.weight, std=0.5)  # lm_head starts near zero: make the losses differ
    token_bytes = torch.randint(0, 4, (V,))
    batches = [(torch.randint(0, V, (2, 16)), torch.randint(-1, V, (2, 16))) for _ in range(3)]
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for x, y in batches:
            logits = model(x).view(-1, V).double()
            for logit_row, t in zip(logits, y.view(-1).tolist()):
                if t >= 0 and token_bytes[t] > 0:
                    nats += -torch.log_softmax(logit_row, -1)[t].item()
                    nbytes += int(token_bytes[t])
    bpb = evaluate_bpb(model, batches, 3, token_bytes)
    assert math.isclose(bpb, nats / (math.log(2) * nbytes), rel_tol=1e-5)


def test_a_terminal_gets_a_progress_bar_with_rate_and_eta_and_the_same_bpb(monkeypatch):
    V = 8
    token_bytes = torch.arange(1, V + 1)
    batches = [(torch.zeros(2, 4, dtype=torch.long), torch.randint(0, V, (2, 4))) for _ in range(3)]
    monkeypatch.delenv("NANOCHAT_QUIET", raising=False)
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        bpb = evaluate_bpb(UniformModel(V), batches, 3, token_bytes)
    drawn = terminal.getvalue()
    assert re.search(r"bpb: +0%\|.*\| 0/3 \[00:00<\?, \?batch/s\]", drawn), drawn  # count, ETA, rate
    monkeypatch.setenv("NANOCHAT_QUIET", "1")
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        assert evaluate_bpb(UniformModel(V), batches, 3, token_bytes) == bpb
    assert terminal.getvalue() == ""


def test_a_split_of_exactly_one_batch_is_one_step():
    assert bpb_steps(128, 128) == (128, 1)


def test_the_split_is_shared_by_the_ranks(tmp_path, monkeypatch, tiny_tokenizer, capsys):
    # split_tokens counts every rank's tokens: with 2 ranks of 2 x 32 tokens, 150 tokens are one step each
    from nanochat import dataset
    point_base_dir_at(monkeypatch, tmp_path)
    dataset.install_sample()
    model = tiny_gpt(vocab_size=tiny_tokenizer.get_vocab_size(), n_layer=1)
    token_bytes = compute_token_bytes(tiny_tokenizer)
    bpb = run_bpb(model, tiny_tokenizer, token_bytes, "cpu", 2, 32, split_tokens=150, world_size=2)
    assert "Adjusted split_tokens to 128 (must be divisible by 128)" in capsys.readouterr().out
    assert bpb["val"] == split_bpb(model, tiny_tokenizer, token_bytes, "val", 2, 32, 1, "cpu")
