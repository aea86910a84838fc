"""
scripts/chat_sft.py and its pieces in nanochat/chat_train.py, on CPU, offline: the conversation packer
(whole conversations, BOS-aligned rows, targets exactly on the assistant's tokens, padding, truncation
to the row, exact resume from its state), the small pure pieces (progress, inheritance, ChatCORE; the
optimizer's warm start is tested in test_training.py), and real SFT runs of a depth-2 model: checkpoint,
meta and report, then a resume from the middle checkpoint that reproduces the uninterrupted run bit for bit.
"""
import gc
import json
import os
import re
import shutil
import signal
import socket
import sys
import types

import pytest
import torch

from nanochat import chat_core, chat_train, common, dataloader, training
from nanochat.checkpoint_manager import save_checkpoint
from nanochat.tokenizer import compute_token_bytes
from scripts import chat_sft

from conftest import point_base_dir_at, sigterm_on_first_call, tiny_gpt

SEQ_LEN = 128


def base_optimizer_state(model):
    """A pretraining-like optimizer shard: one step on a small batch so the buffers are non-zero."""
    optimizer = model.setup_optimizer(weight_decay=0.28)
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(x, x).backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    return optimizer.state_dict()


def write_sft_base_dir(root, tok):
    """`root` holding `tok` (with its token_bytes.pt) and a depth-2 base checkpoint base_checkpoints/d2 at
    step 10, its optimizer shard non-zero and its meta carrying the pretraining settings SFT inherits."""
    tok.save(os.path.join(root, "tokenizer"))
    torch.save(compute_token_bytes(tok), os.path.join(root, "tokenizer", "token_bytes.pt"))
    model = tiny_gpt(sequence_len=SEQ_LEN, vocab_size=tok.get_vocab_size(), n_embd=128)
    optim_state = base_optimizer_state(model)
    meta = {"step": 10, "val_bpb": 3.0, "model_config": vars(model.config).copy(),
            "user_config": {"embedding_lr": 0.3, "unembedding_lr": 0.02, "matrix_lr": 0.05},
            "device_batch_size": 2, "max_seq_len": SEQ_LEN, "total_batch_size": 2 * 2 * SEQ_LEN}
    save_checkpoint(os.path.join(root, "base_checkpoints", "d2"), 10, model.state_dict(), optim_state, meta)
    return root


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, chat_tokenizer):
    """NANOCHAT_BASE_DIR with the chat tokenizer (vocab 512) and that base checkpoint."""
    root = tmp_path_factory.mktemp("nanochat_sft")
    mp = pytest.MonkeyPatch()
    point_base_dir_at(mp, root, NANOCHAT_COMPILE="0")
    write_sft_base_dir(root, chat_tokenizer)
    yield root
    mp.undo()


@pytest.fixture(scope="module")
def tokenizer(base_dir):
    from nanochat.tokenizer import get_tokenizer
    return get_tokenizer()


def conversation(k, assistant_parts=False):
    """Distinct conversations of growing length; some with tool parts (python output is not supervised)."""
    answer = " ".join(["ok"] * k)
    content = ([{"type": "text", "text": answer}, {"type": "python", "text": f"{k}*2"},
                {"type": "python_output", "text": str(2 * k)}, {"type": "text", "text": f" so {2 * k}"}]
               if assistant_parts else answer)
    return {"messages": [{"role": "user", "content": f"question {k}"}, {"role": "assistant", "content": content}]}


# -----------------------------------------------------------------------------
# The packer

def split_at_bos(row, bos):
    starts = [i for i, t in enumerate(row) if t == bos] + [len(row)]
    return [(a, b) for a, b in zip(starts, starts[1:])]


def test_packer_rows_hold_whole_conversations_with_their_masks(tokenizer):
    dataset = [conversation(k, assistant_parts=k % 3 == 0) for k in range(1, 16)]
    dataset.append(conversation(400))  # longer than a row: truncated to the row (checked below)
    rendered = {tuple(tokenizer.render_conversation(c, max_tokens=10_000)[0]): i for i, c in enumerate(dataset)}
    masks = {i: tokenizer.render_conversation(c, max_tokens=10_000)[1] for i, c in enumerate(dataset)}
    bos = tokenizer.get_bos_token_id()
    packer = dataloader.ConversationPacker(dataset, tokenizer, batch_size=4, seq_len=64, buffer_size=8, label="t1")
    seen, padded_rows = [], 0
    for _ in range(6):
        rows, row_masks = packer.next_rows()
        for row, mask in zip(rows, row_masks):
            assert len(row) == len(mask) == 65 and row[0] == bos
            for a, b in split_at_bos(row, bos):
                if b - a == 1 and mask[a] == 0 and all(t == bos for t in row[a:]):
                    padded_rows += a == b - 1 and b == len(row)
                    continue  # padding: one BOS per position up to the end of the row
                if (a, b) == (0, len(row)) and tuple(row) not in rendered:  # the long one, alone in its row
                    long_ids, long_mask = tokenizer.render_conversation(dataset[15], max_tokens=65)
                    assert row == long_ids and mask == long_mask
                    seen.append(15)
                    continue
                index = rendered.get(tuple(row[a:b]))
                assert index is not None, "a packed segment is not a whole rendered conversation"
                assert mask[a:b] == masks[index]
                seen.append(index)
    assert max(len(ids) for ids in rendered if rendered[ids] < 15) <= 65  # all but the last one fit
    assert set(seen) == set(range(16))  # six batches cover the first pass and more, the long one included
    assert packer.truncated >= 1
    assert padded_rows > 0


def reference_bestfit_rows(rendered, num_rows, capacity, rank, world_size, buffer_size):
    """The reference's packing, written from its description: refill the buffer (rank, rank + W, ..., wrapping)
    before each pick, take the longest buffered conversation that fits (the first of equals), else pad."""
    buffer, cursor, rows = [], rank, []
    for _ in range(num_rows):
        row, mask = [], []
        while len(row) < capacity:
            while len(buffer) < buffer_size:
                buffer.append(rendered[cursor])
                cursor = (cursor + world_size) % len(rendered)
            room = capacity - len(row)
            best = None
            for i, (ids, _) in enumerate(buffer):
                if len(ids) <= room and (best is None or len(ids) > len(buffer[best][0])):
                    best = i
            if best is None:
                row, mask = row + [PAD] * room, mask + [0] * room
                break
            ids, conv_mask = buffer.pop(best)
            row, mask = row + ids, mask + conv_mask
        rows.append((row, mask))
    return rows


PAD = "pad"


@pytest.mark.parametrize("rank, world_size", [(0, 1), (1, 2)])
def test_packer_picks_rows_like_the_reference_best_fit(tokenizer, rank, world_size):
    # lengths that tie and that leave gaps only some conversations fit, over more than one pass of the data
    dataset = [conversation(k % 7 + 1, assistant_parts=k % 4 == 0) for k in range(23)]
    for k, c in enumerate(dataset):  # distinct conversations of equal length: the tie rule shows
        c["messages"][0]["content"] = f"question {'abcdefghijklmnopqrstuvwxyz'[k]}"
    rendered = [tokenizer.render_conversation(c) for c in dataset]
    lengths = [len(ids) for ids, _ in rendered]
    assert len(set(lengths)) < len(set(map(tuple, (ids for ids, _ in rendered)))) == len(dataset)
    packer = dataloader.ConversationPacker(dataset, tokenizer, batch_size=3, seq_len=40, rank=rank,
                                           world_size=world_size, buffer_size=5, label="t8")
    got = [pair for _ in range(6) for pair in zip(*packer.next_rows())]
    expected = reference_bestfit_rows(rendered, 18, 41, rank, world_size, 5)
    bos = tokenizer.get_bos_token_id()
    assert got == [([bos if t == PAD else t for t in row], mask) for row, mask in expected]


def test_batch_targets_are_ignored_exactly_where_the_mask_is_zero(tokenizer):
    dataset = [conversation(k, assistant_parts=True) for k in range(1, 20)]
    packer = dataloader.ConversationPacker(dataset, tokenizer, batch_size=3, seq_len=48, buffer_size=5, label="t2")
    rows, masks = packer.next_rows()
    inputs, targets = dataloader.rows_to_batch(rows, masks)
    assert inputs.dtype == torch.int32 and targets.dtype == torch.int64
    assert inputs.shape == targets.shape == (3, 48)
    ids, mask = torch.tensor(rows), torch.tensor(masks)
    assert torch.equal(inputs.long(), ids[:, :-1])
    supervised = mask[:, 1:] == 1
    assert torch.equal(targets[supervised], ids[:, 1:][supervised])
    assert (targets[~supervised] == -1).all()
    # the supervised tokens are the assistant's: <|assistant_end|> is a target, <|user_start|> never
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    user_start = tokenizer.encode_special("<|user_start|>")
    assert (targets == assistant_end).any() and not (targets == user_start).any()


def test_packer_state_dict_resumes_the_same_batches(tokenizer):
    dataset = [conversation(k) for k in range(1, 30)]
    make = lambda: dataloader.ConversationPacker(dataset, tokenizer, batch_size=2, seq_len=40, buffer_size=6, label="t3")
    straight = make()
    for _ in range(5):
        straight.next_batch()
    state = json.loads(json.dumps(straight.state_dict()))  # it must survive the meta JSON
    expected = [straight.next_batch() for _ in range(8)]  # crosses an epoch boundary
    assert straight.epoch > state["epoch"]
    resumed = make()
    resumed.load_state_dict(state)
    for (x0, y0), (x1, y1) in zip(expected, (resumed.next_batch() for _ in range(8))):
        assert torch.equal(x0, x1) and torch.equal(y0, y1)
    assert resumed.state_dict() == straight.state_dict()


def test_prefetched_batches_keep_the_state_that_resumes_at_the_batch_in_hand(tokenizer):
    dataset = [conversation(k) for k in range(1, 12)]
    make = lambda: dataloader.ConversationPacker(dataset, tokenizer, batch_size=2, seq_len=40, buffer_size=4,
                                                 label="t9")
    batches = dataloader.PrefetchedBatches(make(), len(dataset), horizon_batches=-1)
    for _ in range(2):  # before the first step (a checkpoint may come before any), then after one
        resumed = make()
        resumed.load_state_dict(batches.trained_state)
        x, y = resumed.next_batch()
        assert torch.equal(x, batches.current[0]) and torch.equal(y, batches.current[1])
        batches.advance()


def test_ranks_fetch_disjoint_strides_and_count_consumed(tokenizer):
    dataset = [conversation(k) for k in range(1, 21)]
    fetched = {}
    for rank in (0, 1):
        packer = dataloader.ConversationPacker(dataset, tokenizer, batch_size=1, seq_len=200, rank=rank, world_size=2,
                                             buffer_size=4, label="t4")
        packer.next_rows()
        fetched[rank] = {index for index, _, _ in packer.buffer}
        placed = (packer.consumed - rank) // 2
        assert placed >= 1 and packer.consumed == rank + 2 * placed
    assert all(i % 2 == 0 for i in fetched[0]) and all(i % 2 == 1 for i in fetched[1])


def test_epochs_count_every_pass_over_the_data_even_with_more_ranks_than_rows(tokenizer):
    dataset = [conversation(k) for k in range(1, 4)]
    for world_size in (2, 8):  # 8 ranks over 3 rows: each fetch steps 8 rows ahead, over 2 or 3 epochs
        packer = dataloader.ConversationPacker(dataset, tokenizer, batch_size=1, seq_len=200,
                                               world_size=world_size, buffer_size=4, label="t7")
        packer._refill()
        assert packer.epoch == 1 + 4 * world_size // 3 and packer.cursor == 4 * world_size % 3


def test_conversations_longer_than_a_row_are_truncated_to_it_and_trained_on(tokenizer):
    # the reference renders with render_conversation's max_tokens and trains on what is left
    dataset = [conversation(300 + k) for k in range(3)]
    packer = dataloader.ConversationPacker(dataset, tokenizer, batch_size=3, seq_len=63, buffer_size=2,
                                         label="t5")
    rows, masks = packer.next_rows()
    for k, (row, mask) in enumerate(zip(rows, masks)):
        expected_ids, expected_mask = tokenizer.render_conversation(dataset[k], max_tokens=64)
        assert (row, mask) == (expected_ids, expected_mask) and len(row) == 64
        assert sum(mask) > 0  # the answer's first tokens are supervised
    assert packer.consumed == 3 and packer.truncated == 3 + len(packer.buffer)  # every fetch was cut
    _, targets = dataloader.rows_to_batch(rows, masks)
    assert (targets >= 0).sum() == sum(sum(m[1:]) for m in masks)
    exact = conversation(5)  # rendered exactly one row long: it fits whole, nothing is cut
    ids = tokenizer.render_conversation(exact)[0]
    packer = dataloader.ConversationPacker([exact], tokenizer, batch_size=1, seq_len=len(ids) - 1, label="t5")
    assert packer.next_rows()[0][0] == ids and packer.truncated == 0


@pytest.mark.parametrize("label, used", [("train", "trained on"), ("val", "evaluated")])
def test_the_truncation_note_says_what_the_split_is_used_for(tokenizer, monkeypatch, capsys, label, used):
    monkeypatch.setattr(dataloader, "_TRUNCATION_NOTICES", set())  # the note is printed once per process
    packer = dataloader.ConversationPacker([conversation(300)], tokenizer, batch_size=1, seq_len=63,
                                           buffer_size=1, label=label)
    packer.next_rows()
    assert f"Note: truncating {label} conversations longer than 64 tokens (e.g. #0) to fit a row; " \
           f"they are {used} as truncated" in capsys.readouterr().out


def test_long_rows_truncate_like_the_references_2048_token_render(tokenizer):
    dataset = [conversation(3000)]
    packer = dataloader.ConversationPacker(dataset, tokenizer, batch_size=1, seq_len=3000, buffer_size=1,
                                         label="t6")
    rows, _ = packer.next_rows()
    assert rows[0][:2048] == tokenizer.render_conversation(dataset[0])[0]  # render's default max_tokens: 2048
    assert set(rows[0][2048:]) == {tokenizer.get_bos_token_id()}  # the rest of the row is padding


def test_progress_is_clamped_and_ends_the_run():
    assert dataloader.sft_progress(consumed=0, dataset_size=10, batches=3, horizon_batches=8) == (3 / 8, False)
    assert dataloader.sft_progress(consumed=0, dataset_size=10, batches=8, horizon_batches=8) == (1.0, True)
    assert dataloader.sft_progress(consumed=5, dataset_size=10, batches=99, horizon_batches=-1) == (0.5, False)
    assert dataloader.sft_progress(consumed=13, dataset_size=10, batches=99, horizon_batches=-1) == (1.0, True)


# -----------------------------------------------------------------------------
# Small pure pieces

def test_inherit_hyperparameters_prints_the_reference_lines(capsys):
    args = chat_sft.parse_args(["--max-seq-len=256", "--device-batch-size=4", "--matrix-lr=0.05"])
    meta = {"max_seq_len": 1024, "device_batch_size": 4, "user_config": {"embedding_lr": 0.5, "matrix_lr": 0.05}}
    hp = chat_train.inherit_hyperparameters(args, meta)
    out = capsys.readouterr().out
    assert hp == {"max_seq_len": 256, "device_batch_size": 4, "total_batch_size": 524288, "embedding_lr": 0.5,
                  "unembedding_lr": 0.004, "matrix_lr": 0.05}
    assert "NOTE: --max-seq-len=256 overrides pretrained value of 1024" in out
    assert "Using device_batch_size=4" in out and "Using matrix_lr=0.05" in out
    assert "Inherited total_batch_size=524288 from pretrained checkpoint" in out
    assert "Inherited embedding_lr=0.5 from pretrained checkpoint" in out


def test_chatcore_metrics_by_hand():
    accuracies = {"ARC-Easy": 0.625, "ARC-Challenge": 0.25, "MMLU": 0.4, "GSM8K": 0.1, "HumanEval": 0.0,
                  "SpellingBee": 0.5}
    chatcore, chatcore_cat = chat_core.chatcore_metrics(accuracies)
    # centered: 0.5, 0, 0.2 (categorical), 0.1, 0, 0.5
    assert chatcore_cat == pytest.approx(0.7 / 3)
    assert chatcore == pytest.approx(1.3 / 6)


@pytest.mark.parametrize("argv", [["--num-iterations=0"], ["--warmdown-ratio=1.5"], ["--max-seq-len=0"],
                                  ["--warmup-ratio=0.6", "--warmdown-ratio=0.6"], ["--init-lr-frac=0"],
                                  ["--mmlu-epochs=-1"], ["--gsm8k-epochs=-2"], ["--chatcore-max-cat=0"],
                                  ["--chatcore-max-sample=0"]])
def test_bad_flags_are_rejected(argv, capsys):
    with pytest.raises(SystemExit) as e:
        chat_sft.parse_args(argv)
    assert e.value.code == 2


# -----------------------------------------------------------------------------
# Real runs

RUN_FLAGS = ["--device-type=cpu", "--model-tag=d2", "--num-iterations=4", "--eval-every=2", "--eval-tokens=256",
             "--chatcore-every=-1", "--save-every=2"]


def run_main(argv, capsys):
    """chat_sft.main in this process; the GC policy and deterministic mode it sets are undone afterwards."""
    deterministic = (torch.are_deterministic_algorithms_enabled(),
                     torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        chat_sft.main(argv)
    finally:
        gc.enable()
        gc.unfreeze()
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    return capsys.readouterr().out


def step_losses(out):
    return {int(m.group(1)): m.group(2) for m in re.finditer(r"^step (\d+) \(.*?\) \| loss: ([\d.]+)", out, re.M)}


def test_sft_run_then_exact_resume_from_the_middle_checkpoint(base_dir, capsys):
    out = run_main(RUN_FLAGS, capsys)
    ckpt = os.path.join(base_dir, "chatsft_checkpoints", "d2")
    assert sorted(os.listdir(ckpt)) == ["meta_000002.json", "meta_000004.json", "model_000002.pt",
                                        "model_000004.pt", "optim_000002_rank0.pt", "optim_000004_rank0.pt"]
    assert "Inherited max_seq_len=128 from pretrained checkpoint" in out
    assert "gradient accumulation steps: 2" in out
    assert "Loaded optimizer state from pretrained checkpoint" in out
    assert len(re.findall(r"^Step \d{5} \| Validation bpb: ", out, re.M)) == 3  # steps 0, 2, 4
    assert sorted(step_losses(out)) == [1, 2, 3, 4]
    last = re.findall(r"^step 00004 \((.*?)%\) .*? lrm: ([\d.-]+)", out, re.M)
    assert last == [("100.00", "0.00")]  # the schedule ends at final_lr_frac, never below
    with open(os.path.join(ckpt, "meta_000004.json")) as f:
        meta = json.load(f)
    assert meta["step"] == 4 and meta["user_config"]["num_iterations"] == 4
    assert {"val_bpb", "model_config", "user_config", "loop_state"} <= set(meta)
    assert meta["max_seq_len"] == SEQ_LEN and len(meta["loop_state"]["loader_states"]) == 1
    report = open(os.path.join(base_dir, "report", "sft.md")).read()
    assert "Number of iterations: 4" in report
    # the report plots the run's curves, which the checkpoint keeps for a resumed run's plot
    assert "![curves curve](chat-sft-curves.png)" in report
    assert os.path.exists(os.path.join(base_dir, "report", "chat-sft-curves.png"))
    curve = meta["loop_state"]["curve"]
    assert curve["steps"] == [0, 1, 2, 3, 4]
    assert [s for s, v in zip(curve["steps"], curve["val bpb"]) if v is not None] == [0, 2, 4]
    assert [s for s, v in zip(curve["steps"], curve["train loss"]) if v is not None] == [0, 1, 2, 3]
    losses = [v for v in curve["train loss"] if v is not None]
    assert all(0 < v < 20 for v in losses)
    # the raw loss of each step; the printed one is the reference's EMA, logged after its step counter
    # moved on to 1, 2, ..., so debiased by 1 - 0.9^(2, 3, ...)
    ema = 0.0
    for done, loss in enumerate(losses, 1):
        ema = 0.9 * ema + 0.1 * loss
        assert step_losses(out)[done] == f"{ema / (1 - 0.9 ** (done + 1)):.6f}"
    from nanochat.checkpoint_manager import load_model
    model, _, _ = load_model("sft", torch.device("cpu"), phase="eval", model_tag="d2")
    final = torch.load(os.path.join(ckpt, "model_000004.pt"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())
    base = torch.load(os.path.join(base_dir, "base_checkpoints", "d2", "model_000010.pt"))
    assert any(not torch.equal(base[k], final[k]) for k in final)  # training moved the weights

    resumed = run_main(RUN_FLAGS + ["--resume-from-step=2"], capsys)
    assert sorted(step_losses(resumed)) == [3, 4]
    assert all(step_losses(resumed)[s] == step_losses(out)[s] for s in (3, 4))
    again = torch.load(os.path.join(ckpt, "model_000004.pt"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    with open(os.path.join(ckpt, "meta_000004.json")) as f:
        assert json.load(f)["loop_state"]["curve"] == curve  # the resumed run's plot is the same plot


def test_sft_run_with_fully_masked_micro_batches_stays_finite(base_dir, capsys, monkeypatch):
    # prompts longer than a row: truncated, they leave rows with no supervised token, and the packer puts
    # them first (largest fit), so the first step has only fully masked micro-batches
    long_prompt = {"messages": [{"role": "user", "content": " ".join(["question"] * 400)},
                                {"role": "assistant", "content": "ok"}]}
    dataset = [long_prompt] * 8 + [conversation(k) for k in range(1, 40)]
    monkeypatch.setattr(chat_train, "train_mixture", lambda *args: dataset)
    flags = ["--device-type=cpu", "--model-tag=d2", "--num-iterations=3", "--eval-every=-1",
             "--eval-tokens=256", "--chatcore-every=-1", "--load-optimizer=0"]
    out = run_main(flags, capsys)
    assert "Step 00000: no supervised token in the whole batch; the weights are not updated" in out
    losses = step_losses(out)
    assert sorted(losses) == [1, 2, 3] and all(float(v) == float(v) for v in losses.values())  # no NaN
    final = torch.load(os.path.join(base_dir, "chatsft_checkpoints", "d2", "model_000003.pt"))
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())


def fake_wandb(calls):
    """A stand-in for the wandb package (a dependency) that records the kwargs of every init."""
    def init(**kwargs):
        calls.append(kwargs)
        return types.SimpleNamespace(id=kwargs.get("id") or f"run{len(calls)}", log=lambda *a, **k: None,
                                     finish=lambda: None)
    module = types.ModuleType("wandb")
    module.init = init
    return module


def test_sft_resume_continues_the_same_wandb_run(base_dir, capsys, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", fake_wandb(calls))
    flags = ["--device-type=cpu", "--model-tag=d2", "--num-iterations=2", "--eval-every=-1", "--eval-tokens=256",
             "--chatcore-every=-1", "--save-every=1", "--run=sftrun"]
    run_main(flags, capsys)
    assert calls[0]["name"] == "sftrun" and "id" not in calls[0]
    with open(os.path.join(base_dir, "chatsft_checkpoints", "d2", "meta_000001.json")) as f:
        assert json.load(f)["wandb_run_id"] == "run1"
    run_main(flags + ["--resume-from-step=1"], capsys)
    assert calls[1]["id"] == "run1" and calls[1]["resume"] in ("allow", "must")


def test_sigterm_saves_after_the_step_and_the_resume_matches_an_uninterrupted_run(base_dir, capsys,
                                                                                   monkeypatch):
    ckpt = os.path.join(base_dir, "chatsft_checkpoints", "d2")
    flags = RUN_FLAGS + ["--eval-every=-1", "--save-every=-1"]
    try:
        run_main(flags, capsys)
        straight = torch.load(os.path.join(ckpt, "model_000004.pt"))
        shutil.rmtree(ckpt)
        sigterm_on_first_call(monkeypatch, training, "apply_schedule")  # during the first step
        with pytest.raises(SystemExit) as e:
            run_main(flags, capsys)
        assert e.value.code == 128 + signal.SIGTERM
        out = capsys.readouterr().out
        assert "resume with --resume-from-step=1" in out and sorted(step_losses(out)) == [1]
        assert sorted(os.listdir(ckpt)) == ["meta_000001.json", "model_000001.pt", "optim_000001_rank0.pt"]
        resumed = run_main(flags + ["--resume-from-step=1"], capsys)
        assert sorted(step_losses(resumed)) == [2, 3, 4]
        again = torch.load(os.path.join(ckpt, "model_000004.pt"))
        assert all(torch.equal(straight[k], again[k]) for k in straight)
    finally:
        shutil.rmtree(ckpt, ignore_errors=True)  # the other runs of this module expect their files only


def test_chatcore_every_prints_and_logs_the_six_tasks(base_dir, capsys, monkeypatch):
    logged = []
    run = types.SimpleNamespace(id="r", log=logged.append, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    flags = ["--device-type=cpu", "--model-tag=d2", "--num-iterations=1", "--eval-every=-1",
             "--eval-tokens=256", "--chatcore-every=1", "--chatcore-max-cat=1", "--chatcore-max-sample=1",
             "--run=chatcore"]
    try:
        out = run_main(flags, capsys)
    finally:
        shutil.rmtree(os.path.join(base_dir, "chatsft_checkpoints", "d2"), ignore_errors=True)
    # each task on its own line, as the reference's SFT prints it
    assert re.findall(r"^  (\S+): \d+\.\d\d%$", out, re.M) == list(chat_core.TASKS)
    printed = re.findall(r"^Step 00001 \| ChatCORE: (-?[\d.]+) \| ChatCORE_cat: (-?[\d.]+)$", out, re.M)
    assert len(printed) == 1, out[-3000:]
    entry = [e for e in logged if "chatcore_metric" in e]
    assert len(entry) == 1 and entry[0]["step"] == 1
    assert (f"{entry[0]['chatcore_metric']:.4f}", f"{entry[0]['chatcore_cat']:.4f}") == printed[0]
    assert sorted(k for k in entry[0] if k.startswith("chatcore/")) == sorted(
        f"chatcore/{task}" for task in chat_core.TASKS)
    assert entry[0]["total_training_flops"] > 0  # one step done


def test_wandb_entries_carry_the_reference_keys_and_flops(base_dir, capsys, monkeypatch):
    # total_training_flops counts the optimizer steps done before the entry: the val entry before step s
    # counts s, the train entry printed as step s (after it) counts s - 1, as the reference computes it
    logged = []
    run = types.SimpleNamespace(id="r", log=logged.append, finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kwargs: run))
    flags = ["--device-type=cpu", "--model-tag=d2", "--num-iterations=11", "--eval-every=5",
             "--eval-tokens=256", "--chatcore-every=-1", "--save-every=-1", "--run=keys"]
    try:
        run_main(flags, capsys)
    finally:
        shutil.rmtree(os.path.join(base_dir, "chatsft_checkpoints", "d2"), ignore_errors=True)
    val = {e["step"]: e for e in logged if "val/bpb" in e}
    train = {e["step"]: e for e in logged if "train/loss" in e}
    assert sorted(val) == [0, 5, 10, 11] and sorted(train) == [10]  # the last step's val entry too
    keys = {"step", "total_training_flops", "total_training_time", "val/bpb"}
    assert all(set(e) == keys for e in val.values())
    per_step = val[5]["total_training_flops"] / 5
    assert per_step > 0
    assert [val[s]["total_training_flops"] for s in (0, 10, 11)] == [0, 10 * per_step, 11 * per_step]
    assert train[10]["total_training_flops"] == 9 * per_step


def test_an_online_run_without_the_network_says_how_to_train_offline(tmp_path, monkeypatch):
    point_base_dir_at(monkeypatch, tmp_path / "base")
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    with socket.socket() as s:  # a loopback port nobody listens on: the connection is refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from tasks import customjson
    monkeypatch.setattr(customjson, "IDENTITY_CONVERSATIONS_URL", f"http://127.0.0.1:{port}/identity.jsonl")
    monkeypatch.setattr(common.time, "sleep", lambda seconds: None)  # the retries' back-off
    with pytest.raises(common.DownloadError) as info:
        chat_train.train_mixture(mmlu_epochs=3, gsm8k_epochs=4)
    message = str(info.value)
    assert "network error after 5 attempts" in message and "identity.jsonl" in message
    assert "Or set NANOCHAT_OFFLINE=1 to train on the smaller committed mixture" in message


class RecordedTask:
    """Stands in for a dataset task: remembers how it was constructed, holds two examples."""

    def __init__(self, name, *args, **kwargs):
        self.made = (name, args, kwargs)

    def __len__(self):
        return 2


def test_online_mixtures_are_the_references_tasks_in_order(monkeypatch):
    # the mixture's shuffle runs over the (task, index) list in task order: the order is part of the data
    from tasks import customjson, gsm8k, mmlu, smoltalk, spellingbee
    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)
    for module, name in ((smoltalk, "SmolTalk"), (customjson, "CustomJSON"), (mmlu, "MMLU"), (gsm8k, "GSM8K"),
                         (spellingbee, "SimpleSpelling"), (spellingbee, "SpellingBee")):
        monkeypatch.setattr(module, name, lambda *a, name=name, **k: RecordedTask(name, *a, **k))
    monkeypatch.setattr(chat_train, "download_file_with_lock", lambda url, filename: f"/base/{filename}")
    made = [task.made for task in chat_train.train_mixture(mmlu_epochs=3, gsm8k_epochs=4).tasks]
    identity = ("CustomJSON", ("/base/identity_conversations.jsonl",), {})
    assert made == [("SmolTalk", (), {"split": "train"}), identity, identity,
                    *[("MMLU", (), {"subset": "all", "split": "auxiliary_train"})] * 3,
                    *[("GSM8K", (), {"subset": "main", "split": "train"})] * 4,
                    ("SimpleSpelling", (), {"size": 200000, "split": "train"}),
                    ("SpellingBee", (), {"size": 80000, "split": "train"})]
    assert [task.made for task in chat_train.val_mixture().tasks] == [
        ("SmolTalk", (), {"split": "test"}), ("MMLU", (), {"subset": "all", "split": "test", "stop": 5200}),
        ("GSM8K", (), {"subset": "main", "split": "test", "stop": 420})]
