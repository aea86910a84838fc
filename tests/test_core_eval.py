"""nanochat/core_eval.py: prompts, batching, scoring, the CORE loop, and obtaining the eval bundle."""
import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import types
import zipfile

import pytest
import torch

from nanochat import core_eval as ce
from dev import eval_bundle_zip
from dev.eval_bundle_zip import write_eval_bundle_zip
from nanochat.common import REPO_DATA_DIR, exit_on_setup_error

from conftest import TerminalIO, exits_with_error, spawn_ranks, tiny_gpt

COMMITTED_ZIP = os.path.join(REPO_DATA_DIR, "eval_bundle.zip")


# -----------------------------------------------------------------------------
# Fixtures and stubs

class CharTokenizer:
    """One token per character (id = code point), BOS = 1000: token boundaries are obvious in expectations."""
    BOS = 1000
    vocab_size = 1001

    def __init__(self):
        self.calls = []

    def get_bos_token_id(self):
        return self.BOS

    def __call__(self, text, prepend=None):
        self.calls.append(text)
        head = [] if prepend is None else [prepend]
        encode = lambda s: head + [ord(c) for c in s]
        return encode(text) if isinstance(text, str) else [encode(t) for t in text]


class ConstantModel(torch.nn.Module):
    """Uniform logits: every row has the same mean loss, so MC/schema ties resolve to the first row."""

    def __init__(self, vocab_size, config=None):
        super().__init__()
        self.vocab_size = vocab_size
        self.inputs = []
        if config is not None:
            self.config = config

    def forward(self, idx):
        self.inputs.append(idx.clone())
        return torch.zeros(idx.size(0), idx.size(1), self.vocab_size)


class OracleModel(torch.nn.Module):
    """Knows the gold token rows: after any prefix of one it puts a large logit on the gold next token."""

    def __init__(self, gold_rows, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size
        self.next_token = {}
        for row in gold_rows:
            for t in range(len(row) - 1):
                self.next_token[tuple(row[:t + 1])] = row[t + 1]

    def forward(self, idx):
        logits = torch.zeros(idx.size(0), idx.size(1), self.vocab_size)
        for b, row in enumerate(idx.tolist()):
            for t in range(len(row)):
                nxt = self.next_token.get(tuple(row[:t + 1]))
                if nxt is not None:
                    logits[b, t, nxt] = 30.0
        return logits


def meta(task_type, num_fewshot=0, delimiter=" ", uri="x/test.jsonl"):
    return {"task_type": task_type, "num_fewshot": num_fewshot, "continuation_delimiter": delimiter, "dataset_uri": uri}


def read_zip_first_row(zip_path, member):
    with zipfile.ZipFile(zip_path) as zf:
        return json.loads(zf.read(f"eval_bundle/eval_data/{member}").decode("utf-8").splitlines()[0])


def write_mini_bundle(root, tasks, rows, baselines, skip=()):
    """A bundle dir: core.yaml for `tasks` (label, uri, shots, type[, delimiter]), the csv, and each uri's rows."""
    root.mkdir(parents=True, exist_ok=True)
    lines = ["icl_tasks:"]
    for label, uri, shots, task_type, *delim in tasks:
        lines += ["-", f"  label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {task_type}"]
        if delim:
            lines.append(f"  continuation_delimiter: {json.dumps(delim[0])}")
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    csv_lines = ["Eval Task,Task Category,Random baseline,Description"]
    csv_lines += [f"{label},cat,{b},\"a, quoted description\"" for label, b in baselines.items()]
    (root / "eval_meta_data.csv").write_text("\n".join(csv_lines) + "\n")
    for uri, items in rows.items():
        if uri in skip:
            continue
        path = root / "eval_data" / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return root


MC_ROWS = [{"query": f"q{i}:", "choices": ["aa", "bbb", "c"], "gold": g} for i, g in enumerate([0, 1, 0, 2, 0, 0])]
SCHEMA_ROWS = [{"context_options": ["xx", "yyy"], "continuation": f"end{i}", "gold": g}
               for i, g in enumerate([1, 0, 1, 1])]
LM_ROWS = [{"context": f"ctx{i}", "continuation": f"w{i}"} for i in range(5)]
MINI_TASKS = [("mc_task", "a/mc.jsonl", 0, "multiple_choice"),
              ("lm_task", "b/lm.jsonl", 1, "language_modeling", "\nAnswer: "),
              ("missing_task", "b/missing.jsonl", 0, "language_modeling"),
              ("schema_task", "a/schema.jsonl", 0, "schema")]
MINI_ROWS = {"a/mc.jsonl": MC_ROWS, "b/lm.jsonl": LM_ROWS, "a/schema.jsonl": SCHEMA_ROWS}
MINI_BASELINES = {"mc_task": 25, "lm_task": 0, "missing_task": 0, "schema_task": 50, "unused": 10}


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    base = tmp_path / "base"
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    monkeypatch.setattr(ce, "_completion_tried", set())
    return base


@pytest.fixture
def mini_zip(tmp_path):
    src = write_mini_bundle(tmp_path / "src" / "eval_bundle", MINI_TASKS, MINI_ROWS, MINI_BASELINES,
                            skip={"b/missing.jsonl"})
    return write_eval_bundle_zip(str(src), str(tmp_path / "mini.zip"))


@pytest.fixture
def full_mini_zip(tmp_path):
    rows = dict(MINI_ROWS, **{"b/missing.jsonl": LM_ROWS})
    src = write_mini_bundle(tmp_path / "full" / "eval_bundle", MINI_TASKS, rows, MINI_BASELINES)
    return write_eval_bundle_zip(str(src), str(tmp_path / "full.zip"))


@pytest.fixture(scope="module")
def committed_bundle(tmp_path_factory):
    """The committed zip placed into a fresh base dir, the way an offline run gets it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("NANOCHAT_BASE_DIR", str(tmp_path_factory.mktemp("committed_base")))
    mp.setenv("NANOCHAT_OFFLINE", "1")
    bundle_dir = ce.ensure_eval_bundle()
    mp.undo()
    return bundle_dir


# -----------------------------------------------------------------------------
# Prompt rendering

def test_render_mc_spec_examples():
    shots = [{"query": "Q1?", "choices": ["a1", "b1"], "gold": 1}, {"query": "Q2?", "choices": ["a2", "b2"], "gold": 0}]
    item = {"query": "Q?", "choices": ["x", "y"], "gold": 0}
    assert ce.render_prompts_mc(item, "\nAnswer: ", shots) == [
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ?\nAnswer: x",
        "Q1?\nAnswer: b1\n\nQ2?\nAnswer: a2\n\nQ?\nAnswer: y",
    ]
    assert ce.render_prompts_mc(item, " ") == ["Q? x", "Q? y"]
    assert ce.render_prompts_mc(item, " ", []) == ["Q? x", "Q? y"]


def test_render_schema():
    shots = [{"context_options": ["A1", "B1"], "continuation": "c1", "gold": 1}]
    item = {"context_options": ["A", "B"], "continuation": "c", "gold": 0}
    assert ce.render_prompts_schema(item, " ", shots) == ["B1 c1\n\nA c", "B1 c1\n\nB c"]
    assert ce.render_prompts_schema(item, " ") == ["A c", "B c"]


def test_render_lm_spec_example_and_shots():
    item = {"context": "ctx \n", "continuation": " word"}
    assert ce.render_prompts_lm(item, " ") == ["ctx", "ctx  word"]
    shots = [{"context": "  s1 \n", "continuation": "r1"}]
    assert ce.render_prompts_lm(item, "\nAnswer: ", shots) == ["s1\nAnswer: r1\n\nctx\nAnswer:",
                                                              "s1\nAnswer: r1\n\nctx\nAnswer:  word"]


def test_render_real_items_from_committed_zip():
    copa = read_zip_first_row(COMMITTED_ZIP, "commonsense_reasoning/copa.jsonl")
    assert ce.render_prompts_mc(copa, " ") == [
        "The man turned on the faucet, therefore the toilet filled with water.",
        "The man turned on the faucet, therefore water flowed from the spout.",
    ]
    wsc = read_zip_first_row(COMMITTED_ZIP, "language_understanding/winograd_wsc.jsonl")
    assert ce.render_prompts_schema(wsc, " ") == [
        "The city councilmen refused the demonstrators a permit because the city councilmen feared violence.",
        "The city councilmen refused the demonstrators a permit because the demonstrators feared violence.",
    ]
    jeopardy = read_zip_first_row(COMMITTED_ZIP, "world_knowledge/jeopardy_all.jsonl")
    clue = ("WORLD HISTORY: This Navy commander flew from a base at Little America to the South Pole & back "
            "Nov. 28-29, 1929\nAnswer:")
    assert ce.render_prompts_lm(jeopardy, "\nAnswer: ") == [clue, clue + " Admiral Richard Byrd"]


def test_render_real_mc_with_a_shot():
    with zipfile.ZipFile(COMMITTED_ZIP) as zf:
        lines = zf.read("eval_bundle/eval_data/world_knowledge/arc_easy.jsonl").decode().splitlines()
    item, shot = json.loads(lines[0]), json.loads(lines[1])
    prompts = ce.render_prompts_mc(item, "\nAnswer: ", [shot])
    assert prompts[0] == (
        "Question: Which piece of safety equipment is used to keep mold spores from entering the respiratory "
        "system?\nAnswer: breathing mask\n\n"
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\n"
        "Answer: Sunlight is the source of energy for nearly all ecosystems.")
    assert len(prompts) == 4 and prompts[3].endswith("\nAnswer: The producers in all ecosystems are plants.")


def test_lm_prefix_property_holds_for_every_bundled_lm_task(committed_bundle, sample_tokenizer):
    delimiters = set()
    for task in ce.load_core_tasks(committed_bundle):
        if task["task_type"] != "language_modeling" or not os.path.isfile(ce.task_data_path(committed_bundle, task)):
            continue
        delimiters.add(task["continuation_delimiter"])
        data = ce.load_task_data(committed_bundle, task["dataset_uri"], 25)
        for idx, item in enumerate(data):
            shots = [data[i] for i in ce.sample_fewshot_indices(idx, len(data), task["num_fewshot"])]
            prompts = ce.render_prompts_lm(item, task["continuation_delimiter"], shots)
            bos = sample_tokenizer.get_bos_token_id()
            without, with_ = (sample_tokenizer(p, prepend=bos) for p in prompts)
            assert len(without) < len(with_) and with_[:len(without)] == without, (task["label"], idx)
            rows, starts, ends = ce.batch_sequences_lm(sample_tokenizer, prompts)
            assert rows == [with_] and starts == [len(without)] and ends == [len(with_)]
    assert delimiters == {" ", "\nAnswer: "}


# -----------------------------------------------------------------------------
# Batching

def test_find_common_length():
    assert ce.find_common_length([[1, 2, 3], [1, 2, 4]], "left") == 2
    assert ce.find_common_length([[1, 2, 3], [1, 2, 4]], "right") == 0
    assert ce.find_common_length([[1, 2, 3], [9, 2, 3]], "right") == 2
    assert ce.find_common_length([[5, 6], [5, 6]], "left") == 2
    assert ce.find_common_length([[5, 6], [5, 6]], "right") == 2
    assert ce.find_common_length([[1, 2], [1, 2, 3]], "left") == 2  # capped at the shortest
    assert ce.find_common_length([[2, 3], [1, 2, 3]], "right") == 2
    assert ce.find_common_length([[1], [2], [1]], "left") == 0
    assert ce.find_common_length([[7, 1, 2], [8, 1, 2], [9, 0, 2]], "right") == 1
    with pytest.raises(ValueError):
        ce.find_common_length([[1]], "up")


def test_stack_sequences_right_pads():
    out = ce.stack_sequences([[1, 2, 3], [4]], pad_token_id=9)
    assert out.dtype == torch.long
    assert out.tolist() == [[1, 2, 3], [4, 9, 9]]


def test_batch_sequences_by_type():
    tok = CharTokenizer()
    B = CharTokenizer.BOS
    rows, starts, ends = ce.batch_sequences_mc(tok, ["ab x", "ab yz"])
    assert rows == [[B, 97, 98, 32, 120], [B, 97, 98, 32, 121, 122]]
    assert starts == [4, 4] and ends == [5, 6]
    rows, starts, ends = ce.batch_sequences_schema(tok, ["p c", "qq c"])
    assert ends == [4, 5] and starts == [2, 3]
    rows, starts, ends = ce.batch_sequences_lm(tok, ["ctx", "ctx  w"])
    assert rows == [[B, 99, 116, 120, 32, 32, 119]] and starts == [4] and ends == [7]


def test_batch_sequences_lm_rejects_non_prefix_and_empty_continuation():
    tok = CharTokenizer()
    with pytest.raises(ce.ScoredSpanError, match="prefix"):
        ce.batch_sequences_lm(tok, ["abc", "abd e"])
    with pytest.raises(ce.ScoredSpanError, match="no tokens"):
        ce.batch_sequences_lm(tok, ["abc", "abc"])
    # the reference asserted these conditions; callers expecting AssertionError still catch it
    assert issubclass(ce.ScoredSpanError, AssertionError) and issubclass(ce.ScoredSpanError, ValueError)


def test_crop_to_context_keeps_the_tail_and_shifts_the_span():
    row = list(range(20))
    assert ce.crop_to_context([row], [15], [20], 16) == ([list(range(4, 20))], [11], [16])
    assert ce.crop_to_context([row, row[:10]], [15, 5], [20, 10], 16) == (
        [list(range(4, 20)), row[:10]], [11, 5], [16, 10])
    assert ce.crop_to_context([row], [15], [20], None) == ([row], [15], [20])
    with pytest.raises(ce.ScoredSpanError, match="context of 16"):
        ce.crop_to_context([row], [4], [20], 16)  # the first scored token would lose its predecessor


# -----------------------------------------------------------------------------
# Scoring

def test_forward_model_losses_and_predictions():
    logits = torch.log_softmax(torch.randn(2, 4, 7, generator=torch.Generator().manual_seed(0)), dim=-1)

    class Fixed(torch.nn.Module):
        def forward(self, idx):
            return logits

    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 0, 1]])
    losses, preds = ce.forward_model(Fixed(), ids)
    assert losses.shape == (2, 4) and torch.isnan(losses[:, -1]).all()
    for b in range(2):
        for t in range(3):
            assert losses[b, t].item() == pytest.approx(-logits[b, t, ids[b, t + 1]].item(), abs=1e-5)
    assert preds.tolist() == logits.argmax(-1).tolist()


def test_choice_scores_empty_span_is_inf_and_never_nan():
    losses = torch.tensor([[1.0, 2.0, 3.0, float("nan")], [1.0, 2.0, 5.0, float("nan")]])
    assert ce.choice_scores(losses, [2, 1], [2, 4]) == [float("inf"), pytest.approx(8 / 3)]  # positions 0..2
    identical = ce.choice_scores(losses, [0, 0], [4, 4])  # identical schema rows: the whole row is the suffix
    assert all(s == s and s != float("inf") for s in identical)


def test_fewshot_indices_follow_the_seed_rule_and_exclude_idx():
    for idx in range(20):
        expected = random.Random(1234 + idx).sample([i for i in range(20) if i != idx], 10)
        got = ce.sample_fewshot_indices(idx, 20, 10)
        assert got == expected and idx not in got
        assert ce.sample_fewshot_indices(idx, 20, 10) == got
    assert ce.sample_fewshot_indices(3, 20, 0) == []
    assert sorted(ce.sample_fewshot_indices(0, 4, 10)) == [1, 2, 3]  # fewer candidates than shots: all of them


def test_evaluate_example_uses_the_sampled_shots():
    tok = CharTokenizer()
    data = [{"context": f"c{i}", "continuation": f"r{i}"} for i in range(6)]
    ce.evaluate_example(2, ConstantModel(tok.vocab_size), tok, data, "cpu", meta("language_modeling", 3))
    shots = random.Random(1234 + 2).sample([0, 1, 3, 4, 5], 3)
    expected_with = "".join(f"c{i} r{i}\n\n" for i in shots) + "c2 r2"
    assert tok.calls[-1][1] == expected_with


def _gold_rows(tok, items, task_type):
    bos = tok.get_bos_token_id()
    if task_type == "multiple_choice":
        return [tok(ce.render_prompts_mc(it, " ")[it["gold"]], prepend=bos) for it in items]
    if task_type == "schema":
        return [tok(ce.render_prompts_schema(it, " ")[it["gold"]], prepend=bos) for it in items]
    return [tok(ce.render_prompts_lm(it, " ")[1], prepend=bos) for it in items]


@pytest.mark.parametrize("task_type,items", [("multiple_choice", MC_ROWS), ("schema", SCHEMA_ROWS),
                                             ("language_modeling", LM_ROWS)])
def test_a_model_that_favours_gold_scores_one(task_type, items):
    tok = CharTokenizer()
    for item, gold_row in zip(items, _gold_rows(tok, items, task_type)):  # one oracle per item: no cross-talk
        model = OracleModel([gold_row], tok.vocab_size)
        assert ce.evaluate_task(model, tok, [item], "cpu", meta(task_type)) == 1.0


def test_a_constant_model_ties_resolve_to_the_first_choice():
    tok = CharTokenizer()
    model = ConstantModel(tok.vocab_size)
    # MC choices have different lengths, so only an exact tie rule gives index 0 every time
    assert ce.evaluate_task(model, tok, MC_ROWS, "cpu", meta("multiple_choice")) == pytest.approx(4 / 6)
    assert ce.evaluate_task(model, tok, SCHEMA_ROWS, "cpu", meta("schema")) == pytest.approx(1 / 4)
    assert ce.evaluate_task(model, tok, LM_ROWS, "cpu", meta("language_modeling")) == 0.0


def test_mc_choice_that_is_a_prefix_of_another_never_wins():
    tok = CharTokenizer()
    model = ConstantModel(tok.vocab_size)
    item = {"query": "q", "choices": ["ab", "ab cd"], "gold": 1}
    assert ce.evaluate_example(0, model, tok, [item], "cpu", meta("multiple_choice")) is True
    assert ce.evaluate_example(0, model, tok, [dict(item, gold=0)], "cpu", meta("multiple_choice")) is False


def test_non_prefix_lm_item_counts_as_wrong_with_a_warning(sample_tokenizer, caplog):
    tok = sample_tokenizer
    # " the" is one token of this tokenizer, " th" + "e" is not: the prompt without is not a token prefix
    bos = tok.get_bos_token_id()
    without, with_ = tok("x th", prepend=bos), tok("x the", prepend=bos)
    assert with_[:len(without)] != without
    item = {"context": "x th", "continuation": "e"}
    model = ConstantModel(tok.get_vocab_size())
    with caplog.at_level(logging.WARNING, logger="nanochat.core_eval"):
        task_meta = meta("language_modeling", delimiter="", uri="t/nonprefix.jsonl")
        ok = ce.evaluate_example(0, model, tok, [item], "cpu", task_meta)
    assert ok is False and model.inputs == []
    assert "t/nonprefix.jsonl example 0 counted as wrong" in caplog.text
    assert ce.evaluate_task(model, tok, [item, item], "cpu", meta("language_modeling", delimiter="")) == 0.0


def test_unknown_task_type_raises():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="Unsupported task type: ranking"):
        ce.evaluate_example(0, ConstantModel(tok.vocab_size), tok, [{"query": "q"}], "cpu", meta("ranking"))


def test_only_a_declared_max_seq_len_crops_a_native_model_sees_the_whole_example():
    tok = CharTokenizer()
    item = {"context": "a long context " * 4, "continuation": "end"}
    model = ConstantModel(tok.vocab_size, config=types.SimpleNamespace(sequence_len=16))
    ce.evaluate_example(0, model, tok, [item], "cpu", meta("language_modeling"))
    full_row = [tok.BOS] + [ord(c) for c in ("a long context " * 4).strip() + " end"]
    assert len(full_row) > 16
    assert model.inputs[-1].tolist() == [full_row]  # sequence_len is no limit: BOS and every token kept
    # a declared max_seq_len (the HF wrapper) crops to the last tokens; None means no limit
    model.max_seq_len = 8
    ce.evaluate_example(0, model, tok, [item], "cpu", meta("language_modeling"))
    assert model.inputs[-1].tolist() == [full_row[-8:]]
    model.max_seq_len = None
    ce.evaluate_example(0, model, tok, [item], "cpu", meta("language_modeling"))
    assert model.inputs[-1].tolist() == [full_row]


def test_base_model_samples_greedy_and_unconditioned(sample_tokenizer):
    tok = sample_tokenizer
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), n_layer=1).eval()
    greedy = ce.greedy_samples(model, tok, prompts=["The capital of France is"], max_tokens=4)
    assert len(greedy) == 1 and greedy[0].startswith("<|bos|>The capital of France is")
    unconditioned = ce.unconditioned_samples(model, tok)
    assert len(unconditioned) == 8 and all(text.startswith("<|bos|>") for text in unconditioned)
    assert len(set(unconditioned)) > 1  # temperature 1: the eight draws differ
    assert ce.unconditioned_samples(model, tok) == unconditioned  # the Engine's seeded draw


def test_real_gpt_is_fed_the_spec_token_ids_past_its_training_context(sample_tokenizer):
    """The ids of a 2-shot MC example longer than sequence_len: the spec's prompts, BOS first, BOS-padded."""
    tok = sample_tokenizer
    model = tiny_gpt(vocab_size=tok.get_vocab_size(), n_layer=1).eval()
    fed = []
    model.register_forward_pre_hook(lambda m, args: fed.append(args[0].tolist()))
    data = [{"query": f"Question {i}: why is the sky blue and the grass green?", "choices": ["light", "dark sky"],
             "gold": i % 2} for i in range(4)]
    idx, d = 2, "\nAnswer: "
    shots = random.Random(1234 + idx).sample([i for i in range(4) if i != idx], 2)
    prefix = "".join(f"{data[i]['query']}{d}{data[i]['choices'][data[i]['gold']]}\n\n" for i in shots)
    rows = [[tok.get_bos_token_id()] + tok.encode(f"{prefix}{data[idx]['query']}{d}{choice}")
            for choice in data[idx]["choices"]]
    width = max(len(row) for row in rows)
    expected = [row + [tok.get_bos_token_id()] * (width - len(row)) for row in rows]
    assert min(len(row) for row in rows) > 2 * 32
    ce.evaluate_example(idx, model, tok, data, "cpu", meta("multiple_choice", num_fewshot=2, delimiter=d))
    assert fed == [expected]


def test_evaluate_task_under_a_process_group(tmp_path):
    import torch.distributed as dist
    tok = CharTokenizer()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        acc = ce.evaluate_task(ConstantModel(tok.vocab_size), tok, MC_ROWS, "cpu", meta("multiple_choice"))
    finally:
        dist.destroy_process_group()
    assert acc == pytest.approx(4 / 6)


def test_evaluate_task_without_examples_names_the_task():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="No examples to evaluate for a/empty.jsonl"):
        ce.evaluate_task(ConstantModel(tok.vocab_size), tok, [], "cpu",
                         meta("multiple_choice", uri="a/empty.jsonl"))


# -----------------------------------------------------------------------------
# Task data and the CORE loop

def test_centered_accuracy():
    assert ce.centered_accuracy(0.25, 0.25) == pytest.approx(0.0)
    assert ce.centered_accuracy(1.0, 0.25) == pytest.approx(1.0)
    assert ce.centered_accuracy(0.5, 0) == pytest.approx(0.5)
    assert ce.centered_accuracy(0.5, 0.62) == pytest.approx(-0.12 / 0.38)


def test_task_data_is_shuffled_with_1337_then_truncated_and_cached(tmp_path, monkeypatch):
    rows = [{"context": f"c{i}", "continuation": str(i)} for i in range(30)]
    bundle = write_mini_bundle(tmp_path / "eval_bundle", [("t", "d/t.jsonl", 0, "language_modeling")],
                               {"d/t.jsonl": rows}, {"t": 0})
    expected = list(rows)
    random.Random(1337).shuffle(expected)
    reads = []
    real_read = ce._read_jsonl
    monkeypatch.setattr(ce, "_read_jsonl", lambda path, *rest: reads.append(path) or real_read(path, *rest))
    assert ce.load_task_data(str(bundle), "d/t.jsonl", 7) == expected[:7]
    assert ce.load_task_data(str(bundle), "d/t.jsonl", -1) == expected
    assert ce.load_task_data(str(bundle), "d/t.jsonl", 100) == expected
    ce.load_task_data(str(bundle), "d/t.jsonl", -1).clear()  # what a caller does to its copy stays its own
    assert ce.load_task_data(str(bundle), "d/t.jsonl", -1) == expected
    assert len(reads) == 1


def test_evaluate_core_on_a_mini_bundle(base_dir, mini_zip, monkeypatch, capsys):
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    tok = CharTokenizer()
    out = ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu")
    assert list(out) == ["results", "centered_results", "core_metric", "missing_tasks"]
    assert list(out["results"]) == ["mc_task", "lm_task", "schema_task"]  # config order
    assert out["results"] == {"mc_task": pytest.approx(4 / 6), "lm_task": 0.0, "schema_task": pytest.approx(0.25)}
    centered = {"mc_task": (4 / 6 - 0.25) / 0.75, "lm_task": 0.0, "schema_task": (0.25 - 0.5) / 0.5}
    assert out["centered_results"] == pytest.approx(centered)
    assert out["core_metric"] == pytest.approx(sum(centered.values()) / 3)
    assert out["missing_tasks"] == ["missing_task"]
    printed = capsys.readouterr().out
    assert ("Evaluating: mc_task (0-shot, type: multiple_choice)... "
            "accuracy: 0.6667 | centered: 0.5556 | time: ") in printed
    assert ("Evaluating: lm_task (1-shot, type: language_modeling)... "
            "accuracy: 0.0000 | centered: 0.0000 | time: ") in printed
    assert "Skipping missing_task: eval_data/b/missing.jsonl is missing from the bundle" in printed
    assert "CORE metric (3 of 22 tasks, missing missing_task): not directly comparable" in printed
    assert ce.format_core_metric(out) == f"{out['core_metric']:.4f} (3 of 22 tasks, missing missing_task)"
    assert ce.core_metric_log_key(out) == "core_metric_3of22_tasks"
    truncated = ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu", max_per_task=2)
    shuffled_mc = list(MC_ROWS)
    random.Random(1337).shuffle(shuffled_mc)
    assert truncated["results"]["mc_task"] == sum(it["gold"] == 0 for it in shuffled_mc[:2]) / 2


def test_a_task_file_line_that_is_not_json_names_the_file_and_line(tmp_path):
    bundle = write_mini_bundle(tmp_path / "eval_bundle", [("t", "d/t.jsonl", 0, "language_modeling")],
                               {"d/t.jsonl": LM_ROWS[:2]}, {"t": 0})
    with open(bundle / "eval_data" / "d" / "t.jsonl", "a") as f:
        f.write('{"context": "cut off\n')
    with pytest.raises(ce.EvalBundleError, match=r"d/t\.jsonl:3 is not valid JSON"):
        ce.load_task_data(str(bundle), "d/t.jsonl")


def test_a_damaged_task_file_names_a_fix_that_works(base_dir, mini_zip, monkeypatch):
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))  # offline: the "committed" copy
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    tok = CharTokenizer()
    expected = ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu")
    bundle_dir = str(base_dir / "eval_bundle")
    with open(os.path.join(bundle_dir, "eval_data", "b", "lm.jsonl"), "a") as f:
        f.write('{"context": "cut off\n')
    ce._task_data_cache.clear()
    with pytest.raises(ce.EvalBundleError, match=rf"lm\.jsonl:\d+ is not valid JSON: .*\. Fix: delete "
                                                  rf"{re.escape(bundle_dir)} and run again") as err:
        ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu")
    assert str(err.value).count("Fix:") == 1
    shutil.rmtree(bundle_dir)  # what the message says to do
    assert ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu") == expected


def test_core_without_any_task_file_raises_instead_of_a_metric_of_nothing(base_dir):
    write_mini_bundle(base_dir / "eval_bundle", MINI_TASKS, MINI_ROWS, MINI_BASELINES, skip=set(MINI_ROWS))
    tok = CharTokenizer()
    with pytest.raises(ce.EvalBundleError, match=rf"None of the 4 CORE task files exist under {base_dir}"):
        ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu")


def test_core_draws_a_bar_per_task_on_a_terminal_and_prints_the_same_lines(base_dir, mini_zip, monkeypatch,
                                                                         capsys):
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    tok = CharTokenizer()
    untimed = lambda printed: re.sub(r"time: [0-9.]+s", "time: Xs", printed)
    ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu")  # installs the bundle, which it announces
    capsys.readouterr()
    monkeypatch.setenv("NANOCHAT_QUIET", "1")
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu")
    quiet = untimed(capsys.readouterr().out)
    assert terminal.getvalue() == ""
    monkeypatch.delenv("NANOCHAT_QUIET")
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        ce.evaluate_core(ConstantModel(tok.vocab_size), tok, "cpu")
    assert untimed(capsys.readouterr().out) == quiet  # the bars go to stderr; stdout keeps its lines
    for bar in ("CORE 1/4 mc_task", "CORE 2/4 lm_task", "CORE 4/4 schema_task"):
        pattern = re.escape(bar) + r": +0%\|.*\| 0/\d+ \[00:00<\?, \?example/s\]"
        assert re.search(pattern, terminal.getvalue()), terminal.getvalue()


def test_core_value_is_labelled_with_its_task_count_unless_all_22_ran():
    full = {"results": {f"t{i}": 0.5 for i in range(22)}, "core_metric": 0.25678, "missing_tasks": []}
    assert ce.core_task_note(full) == "" and ce.format_core_metric(full) == "0.2568"
    assert ce.core_metric_log_key(full) == "core_metric"
    partial = {"results": {f"t{i}": 0.5 for i in range(21)}, "core_metric": 0.25678, "missing_tasks": ["coqa"]}
    assert ce.format_core_metric(partial) == "0.2568 (21 of 22 tasks, missing coqa)"
    assert ce.core_metric_log_key(partial) == "core_metric_21of22_tasks"


def test_committed_bundle_core_over_21_tasks(committed_bundle):
    assert ce.validate_eval_bundle(committed_bundle) == ["coqa"]
    tasks = ce.load_core_tasks(committed_bundle)
    assert len(tasks) == 22
    assert tasks[0]["label"] == "hellaswag_zeroshot" and tasks[-1]["label"] == "bigbench_language_identification"
    baselines = ce.load_random_baselines(committed_bundle)
    assert baselines["boolq"] == 62 and baselines["bigbench_language_identification"] == 9.1


# -----------------------------------------------------------------------------
# The committed zip

def test_committed_zip_is_deterministic_and_matches_the_recorded_checksums():
    with open(os.path.join(REPO_DATA_DIR, "eval_bundle.md"), encoding="utf-8") as f:
        recorded = dict(re.findall(r"^\| `(eval_bundle/[^`]+)` \| [\d,]+ \| `([0-9a-f]{64})` \|$", f.read(), re.M))
    assert len(recorded) == 22  # core.yaml, the csv, 20 task files (hellaswag serves two tasks)
    with zipfile.ZipFile(COMMITTED_ZIP) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names) and all(n.startswith("eval_bundle/") for n in names)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        files = {i.filename: hashlib.sha256(zf.read(i)).hexdigest() for i in infos if not i.is_dir()}
    assert files == recorded
    assert "eval_bundle/eval_data/reading_comprehension/coqa.jsonl" not in files


def test_write_eval_bundle_zip_is_reproducible(tmp_path):
    src = write_mini_bundle(tmp_path / "eval_bundle", MINI_TASKS, MINI_ROWS, MINI_BASELINES)
    a = write_eval_bundle_zip(str(src), str(tmp_path / "a.zip"))
    os.utime(src / "core.yaml", (0, 0))
    b = write_eval_bundle_zip(str(src), str(tmp_path / "b.zip"))
    assert open(a, "rb").read() == open(b, "rb").read()


def test_eval_bundle_zip_refuses_a_directory_without_core_yaml(tmp_path, capsys):
    write_mini_bundle(tmp_path / "eval_bundle", MINI_TASKS, MINI_ROWS, MINI_BASELINES)
    target = tmp_path / "eval_bundle.zip"
    target.write_bytes(b"the committed zip")
    for wrong in (tmp_path / "typo", tmp_path):  # a missing directory, the bundle's parent
        pattern = rf"^eval_bundle_zip: error: no core.yaml in {re.escape(str(wrong))}\. Fix"
        with exits_with_error(capsys, pattern):
            eval_bundle_zip.main([str(wrong), str(target)])
    assert target.read_bytes() == b"the committed zip"


# -----------------------------------------------------------------------------
# Validating and obtaining the bundle

def test_validate_reports_missing_files_and_rejects_broken_metadata(tmp_path):
    bundle = write_mini_bundle(tmp_path / "eval_bundle", MINI_TASKS, MINI_ROWS, MINI_BASELINES,
                               skip={"b/missing.jsonl"})
    assert ce.validate_eval_bundle(str(bundle)) == ["missing_task"]
    (bundle / "core.yaml").write_text("icl_tasks: [unclosed\n")
    with pytest.raises(ce.EvalBundleError, match="core.yaml"):
        ce.validate_eval_bundle(str(bundle))
    (bundle / "core.yaml").write_text("tasks: []\n")
    with pytest.raises(ce.EvalBundleError, match="icl_tasks"):
        ce.validate_eval_bundle(str(bundle))
    write_mini_bundle(bundle, MINI_TASKS, MINI_ROWS, MINI_BASELINES)
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Baseline\nmc_task,25\n")
    with pytest.raises(ce.EvalBundleError, match="Random baseline"):
        ce.validate_eval_bundle(str(bundle))
    (bundle / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc_task,25\n")
    with pytest.raises(ce.EvalBundleError, match="lm_task"):
        ce.validate_eval_bundle(str(bundle))
    os.remove(bundle / "eval_meta_data.csv")
    with pytest.raises(ce.EvalBundleError, match="eval_meta_data.csv"):
        ce.validate_eval_bundle(str(bundle))


def test_unsupported_task_type_and_a_baseline_that_is_no_number_name_the_file_and_task(tmp_path):
    tasks = [("mc_task", "a/mc.jsonl", 0, "multiple_choice"), ("gen_task", "a/gen.jsonl", 0, "generation")]
    bundle = write_mini_bundle(tmp_path / "eval_bundle", tasks, {}, {"mc_task": 25, "gen_task": 0})
    with pytest.raises(ce.EvalBundleError, match=r"core\.yaml: task gen_task has unsupported icl_task_type "
                                                 r"'generation'"):
        ce.validate_eval_bundle(str(bundle))
    write_mini_bundle(bundle, tasks[:1], {}, {"mc_task": "n/a", "unused": 10})
    with pytest.raises(ce.EvalBundleError, match=r"eval_meta_data\.csv has no Random baseline for: mc_task"):
        ce.validate_eval_bundle(str(bundle))


def test_place_eval_bundle(base_dir, mini_zip):
    bundle_dir = ce.place_eval_bundle(mini_zip)
    assert bundle_dir == str(base_dir / "eval_bundle")
    assert json.loads((base_dir / "eval_bundle/eval_data/a/mc.jsonl").read_text().splitlines()[0]) == MC_ROWS[0]
    assert sorted(os.listdir(base_dir)) == ["eval_bundle"]  # no temp dir left


def test_place_eval_bundle_failure_leaves_nothing(base_dir, tmp_path):
    base_dir.mkdir()
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    with pytest.raises(ce.EvalBundleError, match="Cannot extract"):
        ce.place_eval_bundle(str(corrupt))
    flat = tmp_path / "flat.zip"
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("core.yaml", "icl_tasks: []\n")
    with pytest.raises(ce.EvalBundleError, match="top-level eval_bundle"):
        ce.place_eval_bundle(str(flat))
    assert os.listdir(base_dir) == []


def test_offline_falls_back_to_the_committed_zip(base_dir, capsys):
    bundle_dir = ce.ensure_eval_bundle()
    assert bundle_dir == str(base_dir / "eval_bundle")
    printed = capsys.readouterr().out
    assert f"Eval bundle: using the committed offline copy {COMMITTED_ZIP}" in printed
    assert (f"(no bundle at {bundle_dir}; not downloaded: {bundle_dir}.zip is missing, and downloads are off "
            f"because NANOCHAT_OFFLINE is set: unset it, or put the file at {bundle_dir}.zip)") in printed
    assert ce.validate_eval_bundle(bundle_dir) == ["coqa"]
    assert ce.ensure_eval_bundle() == bundle_dir  # valid now: used as is, silently
    assert "Eval bundle:" not in capsys.readouterr().out


def test_offline_without_a_usable_committed_copy_ends_with_one_line_saying_what_to_do(base_dir, monkeypatch,
                                                                                      capsys):
    monkeypatch.setattr(ce, "REPO_DATA_DIR", str(base_dir / "nothing_here"))
    zip_path = base_dir / "eval_bundle.zip"
    why = (f"Cannot obtain the CORE eval bundle (no bundle at {base_dir / 'eval_bundle'}; not downloaded: "
           f"{zip_path} is missing, and downloads are off because NANOCHAT_OFFLINE is set: unset it, or put "
           f"the file at {zip_path}; the committed copy is unusable: ")
    with exits_with_error(capsys, f"^base_eval: error: {re.escape(why)}.*Download {ce.EVAL_BUNDLE_URL} and"):
        with exit_on_setup_error("base_eval"):
            ce.ensure_eval_bundle()


def test_half_extracted_dir_is_not_taken_as_valid(base_dir, mini_zip, monkeypatch, capsys):
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    (base_dir / "eval_bundle").mkdir(parents=True)
    (base_dir / "eval_bundle" / "core.yaml").write_text("icl_tasks:\n-\n  label: mc_task\n  dataset_uri: a/mc.js")
    bundle_dir = ce.ensure_eval_bundle()
    assert "is broken" in capsys.readouterr().out
    assert ce.validate_eval_bundle(bundle_dir) == ["missing_task"]


def test_existing_zip_without_dir_is_extracted_again(base_dir, mini_zip, monkeypatch, capsys):
    monkeypatch.setattr(ce, "REPO_DATA_DIR", str(base_dir / "nothing_here"))
    base_dir.mkdir()
    os.replace(mini_zip, base_dir / "eval_bundle.zip")
    assert ce.validate_eval_bundle(ce.ensure_eval_bundle()) == ["missing_task"]  # offline: no download needed
    assert f"Eval bundle: placed {base_dir / 'eval_bundle.zip'}" in capsys.readouterr().out


def test_corrupt_downloaded_zip_is_replaced_by_a_fresh_download(base_dir, full_mini_zip, monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    monkeypatch.setattr(ce, "EVAL_BUNDLE_URL", f"file://{full_mini_zip}")  # urllib reads file:// URLs: no network
    monkeypatch.setattr(ce, "REPO_DATA_DIR", str(base_dir / "nothing_here"))
    base_dir.mkdir()
    (base_dir / "eval_bundle.zip").write_bytes(b"truncated download")
    assert ce.validate_eval_bundle(ce.ensure_eval_bundle()) == []
    printed = capsys.readouterr().out
    assert f"Replacing {base_dir / 'eval_bundle.zip'}: EvalBundleError: Cannot extract" in printed
    assert f"Eval bundle: placed {base_dir / 'eval_bundle.zip'}, from file://{full_mini_zip}" in printed
    assert (base_dir / "eval_bundle.zip").read_bytes() == open(full_mini_zip, "rb").read()


def test_incomplete_bundle_is_completed_from_the_download_once(base_dir, mini_zip, full_mini_zip, monkeypatch):
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    assert ce.validate_eval_bundle(ce.ensure_eval_bundle()) == ["missing_task"]  # offline: the committed copy
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    monkeypatch.setattr(ce, "EVAL_BUNDLE_URL", f"file://{full_mini_zip}")
    assert ce.validate_eval_bundle(ce.ensure_eval_bundle()) == []


def _urlopen_raising(error):
    def urlopen(request, timeout=None):
        raise error
    return urlopen


def test_network_failure_uses_the_committed_zip_loudly(base_dir, mini_zip, monkeypatch, capsys):
    import socket
    import urllib.error
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    unreachable = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr("urllib.request.urlopen", _urlopen_raising(unreachable))
    monkeypatch.setattr("nanochat.common.time.sleep", lambda s: None)  # skip the retry backoff
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    assert ce.validate_eval_bundle(ce.ensure_eval_bundle()) == ["missing_task"]
    printed = capsys.readouterr().out
    assert "WARNING: Eval bundle: using the committed offline copy" in printed
    assert "lacks missing_task" in printed and "network error" in printed


def test_incomplete_bundle_is_kept_loudly_when_the_network_is_out_of_reach(base_dir, mini_zip, monkeypatch,
                                                                           capsys):
    import socket
    import urllib.error
    ce.place_eval_bundle(mini_zip)
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    unreachable = urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
    monkeypatch.setattr("urllib.request.urlopen", _urlopen_raising(unreachable))
    monkeypatch.setattr("nanochat.common.time.sleep", lambda s: None)
    assert ce.validate_eval_bundle(ce.ensure_eval_bundle()) == ["missing_task"]
    printed = capsys.readouterr().out
    kept = f"WARNING: Eval bundle: keeping the incomplete {base_dir / 'eval_bundle'}: CORE will cover fewer"
    assert kept in printed
    assert "lacks missing_task; not downloaded: unreachable" in printed


def test_a_node_without_rank_0s_base_dir_obtains_its_own_bundle_with_the_same_tasks(base_dir, mini_zip,
                                                                                   monkeypatch):
    ce.place_eval_bundle(mini_zip)
    elsewhere = str(base_dir / "on_another_node" / "eval_bundle")
    monkeypatch.setattr(ce, "decide_on_rank0", lambda obtain: (elsewhere, ["missing_task"]))
    assert ce.ensure_eval_bundle() == str(base_dir / "eval_bundle")
    monkeypatch.setattr(ce, "decide_on_rank0", lambda obtain: (elsewhere, []))
    with pytest.raises(ce.EvalBundleError, match=r"lacks \['missing_task'\], but rank 0's bundle lacks no "
                                                 r"task: place the same bundle on every node"):
        ce.ensure_eval_bundle()


@pytest.mark.parametrize("error", ["http_404", "disk_full"])
def test_non_network_download_failure_raises_instead_of_using_the_committed_zip(base_dir, mini_zip, monkeypatch,
                                                                                  error):
    import urllib.error
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    exc = (urllib.error.HTTPError(ce.EVAL_BUNDLE_URL, 404, "Not Found", {}, None) if error == "http_404"
           else OSError(28, "No space left on device"))
    monkeypatch.setattr("urllib.request.urlopen", _urlopen_raising(exc))
    monkeypatch.setattr("nanochat.common.time.sleep", lambda s: None)
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    with pytest.raises(ce.EvalBundleError, match="not a network error.*NANOCHAT_OFFLINE=1"):
        ce.ensure_eval_bundle()
    assert not (base_dir / "eval_bundle").exists()


def test_a_downloaded_zip_that_is_no_bundle_raises(base_dir, tmp_path, mini_zip, monkeypatch):
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"an html error page")
    monkeypatch.setattr(ce, "EVAL_BUNDLE_URL", f"file://{bad}")
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    with pytest.raises(ce.EvalBundleError, match="eval_bundle.zip downloaded from .*not valid.*run again"):
        ce.ensure_eval_bundle()
    assert not (base_dir / "eval_bundle").exists() and not (base_dir / "eval_bundle.zip").exists()


def test_failed_download_falls_back_to_the_committed_zip(base_dir, mini_zip, monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    monkeypatch.setattr(ce, "EVAL_BUNDLE_URL", f"file://{base_dir}/no/such.zip")
    monkeypatch.setattr("nanochat.common.time.sleep", lambda s: None)  # skip the retry backoff
    monkeypatch.setattr(ce, "REPO_DATA_DIR", os.path.dirname(mini_zip))
    os.rename(mini_zip, os.path.join(os.path.dirname(mini_zip), "eval_bundle.zip"))
    assert ce.validate_eval_bundle(ce.ensure_eval_bundle()) == ["missing_task"]
    printed = capsys.readouterr().out
    assert "not downloaded: unreachable: DownloadError: Failed to download" in printed
    assert "Eval bundle: using the committed offline copy" in printed
    assert not (base_dir / "eval_bundle.zip").exists()


def test_no_bundle_anywhere_raises_a_clear_error(base_dir, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(ce, "REPO_DATA_DIR", str(empty))
    with pytest.raises(RuntimeError) as info:
        ce.ensure_eval_bundle()
    message = str(info.value)
    assert ce.EVAL_BUNDLE_URL in message
    assert f"{base_dir}/eval_bundle/{{core.yaml, eval_meta_data.csv, eval_data/...}}" in message
    assert not (base_dir / "eval_bundle").exists()


def _bundle_rank_worker(rank, init_file, base, out_dir):
    import socket
    import urllib.error
    import urllib.request
    import torch.distributed as dist
    import nanochat.common

    def urlopen(url, timeout=None):
        if rank == 0:
            raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))
        raise KeyError("rank 1 must not download: rank 0 already chose the bundle")
    os.environ["NANOCHAT_BASE_DIR"] = base
    os.environ.pop("NANOCHAT_OFFLINE", None)
    urllib.request.urlopen = urlopen
    nanochat.common.time.sleep = lambda s: None
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        bundle_dir = ce.ensure_eval_bundle()
        result = {"dir": bundle_dir, "missing": ce.validate_eval_bundle(bundle_dir)}
        tok = CharTokenizer()  # each rank scores every other example; the sum is the whole task's
        result["mc_accuracy"] = ce.evaluate_task(ConstantModel(tok.vocab_size), tok, MC_ROWS, "cpu",
                                                 meta("multiple_choice"))
    except Exception as e:
        result = {"error": f"{type(e).__name__}: {e}"}
    dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def test_rank_zero_obtains_the_bundle_for_every_rank(tmp_path):
    base = str(tmp_path / "base")
    spawn_ranks(_bundle_rank_worker, str(tmp_path / "pg"), base, str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    accuracies = [result.pop("mc_accuracy") for result in results]
    assert results == [{"dir": os.path.join(base, "eval_bundle"), "missing": ["coqa"]}] * 2
    assert accuracies == [pytest.approx(4 / 6)] * 2  # the single-process accuracy of the same task
