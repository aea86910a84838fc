import gzip
import json
import os
import random
import sys
import types

import numpy as np
import pytest

from nanochat.common import REPO_DATA_DIR
from nanochat.engine import use_calculator
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, TaskSequence, load_rows, render_mc
from tasks.customjson import COMMITTED_DOLLY_PATH, COMMITTED_IDENTITY_PATH, CustomJSON
from tasks.gsm8k import GSM8K, answer_to_parts, extract_answer
from tasks.humaneval import HumanEval, extract_imports, extract_program
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk
from tasks.spellingbee import TEST_RANDOM_SEED_OFFSET, USER_MSG_TEMPLATES, SimpleSpelling, SpellingBee

TASK_DATA = os.path.join(REPO_DATA_DIR, "tasks")
# substrings the calculator refuses (spec chat.md 1.1), some of which occur inside ordinary words
CALCULATOR_BLACKLIST = ("__", "import", "exec", "eval", "compile", "open", "file", "input", "raw_input",
                        "globals", "locals", "vars", "dir", "getattr", "setattr", "delattr", "hasattr")


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))


@pytest.fixture
def tok(chat_tokenizer):
    """The session's chat tokenizer (GSM8K and identity text)."""
    return chat_tokenizer


def read_committed(relpath):
    """A committed file's rows in file order, read independently of tasks.common."""
    with gzip.open(os.path.join(TASK_DATA, relpath), "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class ToyTask(Task):
    def __init__(self, n, tag="t", **kwargs):
        super().__init__(**kwargs)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, index):
        return {"i": index, "tag": self.tag}


# -----------------------------------------------------------------------------
# Task views, mixtures, sequences

def test_a_task_without_its_methods_says_so():
    class TrainingOnly(Task):
        pass
    task = TrainingOnly()
    for call in (lambda: len(task), lambda: task.get_example(0)):
        with pytest.raises(NotImplementedError):
            call()
    with pytest.raises(NotImplementedError, match="TrainingOnly is a training-only task: it has no eval_"):
        task.eval_type
    with pytest.raises(NotImplementedError, match="TrainingOnly is a training-only task: it has no evalu"):
        task.evaluate({"messages": []}, "answer")


def test_task_slicing():
    full = ToyTask(10)
    assert len(full) == 10 and full[0]["i"] == 0 and full[9]["i"] == 9
    view = ToyTask(10, start=5, stop=10)
    assert len(view) == 5 and view[0]["i"] == 5
    stepped = ToyTask(10, start=0, stop=10, step=3)
    assert len(stepped) == 4 and [stepped[k]["i"] for k in range(4)] == [0, 3, 6, 9]
    assert [ex["i"] for ex in ToyTask(10, start=2, step=4)] == list(range(2, 10, 4))


def test_task_bounds_negative_indices_and_iteration():
    view = ToyTask(10, start=2, stop=8)
    assert view[-1]["i"] == 7 and view[np.int64(1)]["i"] == 3
    for bad in (6, -7):
        with pytest.raises(IndexError):
            view[bad]
    with pytest.raises(TypeError):
        view[0:2]
    assert [ex["i"] for ex in view] == [2, 3, 4, 5, 6, 7]  # iteration stops at the end of the view
    with pytest.raises(ValueError, match=r"ToyTask\(start=0, stop=100, step=1\).*only 3: lower `stop`"):
        len(ToyTask(3, stop=100))  # an undersized split is an error, not a silent clamp
    assert len(ToyTask(10, start=5, stop=5)) == 0 and list(ToyTask(10, start=5, stop=5)) == []  # empty: fine
    for kwargs in ({"start": -1}, {"start": 5, "stop": 4}, {"step": 0}):
        with pytest.raises(ValueError):
            ToyTask(10, **kwargs)


def test_mixture_covers_every_example_once_in_a_fixed_interleaved_order():
    mixture = TaskMixture([ToyTask(3, "a"), ToyTask(5, "b")])
    order = [(ex["tag"], ex["i"]) for ex in mixture]
    assert len(mixture) == 8 and sorted(order) == [("a", i) for i in range(3)] + [("b", i) for i in range(5)]
    assert order != [("a", 0), ("a", 1), ("a", 2)] + [("b", i) for i in range(5)]
    assert order == [(ex["tag"], ex["i"]) for ex in TaskMixture([ToyTask(3, "a"), ToyTask(5, "b")])]
    # the reference order: the (task, index) list in task order, shuffled by random.Random(42)
    expected = [(0, i) for i in range(3)] + [(1, i) for i in range(5)]
    random.Random(42).shuffle(expected)
    assert order == [("ab"[t], i) for t, i in expected]
    with pytest.raises(IndexError, match="out of range for mixture with 8 conversations"):
        mixture.get_example(8)


def test_mixture_oversampling_and_slicing_on_top():
    task = ToyTask(4, "a")
    twice = TaskMixture([task, task])
    assert len(twice) == 8 and sorted(ex["i"] for ex in twice) == [0, 0, 1, 1, 2, 2, 3, 3]
    mixture = TaskMixture([ToyTask(3, "a"), ToyTask(5, "b")])
    view = TaskMixture([ToyTask(3, "a"), ToyTask(5, "b")], start=2, step=2)
    assert [view[k] for k in range(len(view))] == [mixture[k] for k in range(2, 8, 2)]
    sliced = TaskMixture([ToyTask(10, "a", start=5)])  # sub-task views are respected
    assert sorted(ex["i"] for ex in sliced) == [5, 6, 7, 8, 9]


def test_sequence_concatenates_in_order():
    sequence = TaskSequence([ToyTask(2, "a"), ToyTask(3, "b", start=1)])
    assert [(ex["tag"], ex["i"]) for ex in sequence] == [("a", 0), ("a", 1), ("b", 1), ("b", 2)]
    with pytest.raises(IndexError):
        sequence.get_example(4)


def test_render_mc_exact_format():
    expected = ("Multiple Choice question: What is 1+1?\n"
                "- 1=A\n"
                "- 2=B\n"
                "\n"
                "Respond only with the letter of the correct answer.")
    assert render_mc("What is 1+1?", ["A", "B"], ["1", "2"]) == expected
    prompt = render_mc("What is 1+1?", ("A", "B"), ("1", "2"))
    assert "=A\n" in prompt and "=B\n" in prompt
    with pytest.raises(ValueError):
        render_mc("q", ["A", "B"], ["1"])


# -----------------------------------------------------------------------------
# Data source: the committed copy offline, the hub online

def test_offline_source_line_and_hub_order(capsys):
    task = GSM8K("main", "test")
    assert "GSM8K main/test: 1,319 rows from the committed offline subset data/tasks/gsm8k/main/test.jsonl.gz " \
           "(offline)" in capsys.readouterr().out
    # the committed file in the datasets' shuffle order: numpy default_rng(42).permutation
    rows = read_committed("gsm8k/main/test.jsonl.gz")
    permutation = np.random.default_rng(42).permutation(len(rows))
    for k in (0, 1, 700, 1318):
        assert task[k]["messages"][0]["content"] == rows[permutation[k]]["question"]


class FakeDataset:
    def __init__(self, rows):
        self.rows, self.seed = rows, None

    def shuffle(self, seed):
        self.seed = seed
        return self

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def fake_hub(monkeypatch, rows):
    """Stand in for the `datasets` package (the hub, not the code under test); records each call."""
    calls = []

    def load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        if rows is None:
            raise ConnectionError("no network")
        return FakeDataset(rows)

    monkeypatch.delenv("NANOCHAT_OFFLINE", raising=False)  # a test may stand in for the hub twice
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return calls


SMOLTALK_ROW = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                             {"role": "assistant", "content": "Hello"}]}
ARC_ROW = {"id": "x", "question": "Q?", "choices": {"text": ["a", "b", "c"], "label": ["1", "2", "3"]},
           "answerKey": "2"}


@pytest.mark.parametrize("make, call, row", [
    (lambda: GSM8K("main", "train"), ("openai/gsm8k", "main", "train"), {"question": "q", "answer": "#### 1"}),
    (lambda: ARC("ARC-Challenge", "validation"), ("allenai/ai2_arc", "ARC-Challenge", "validation"), ARC_ROW),
    (lambda: MMLU("all", "auxiliary_train"), ("cais/mmlu", "all", "auxiliary_train"),
     {"question": "q", "subject": "", "choices": ["a", "b", "c", "d"], "answer": 3}),
    (lambda: HumanEval(), ("openai/openai_humaneval", None, "test"),
     {"prompt": "def f():\n", "canonical_solution": "    return 1\n", "entry_point": "f", "test": ""}),
    (lambda: SmolTalk("test"), ("HuggingFaceTB/smol-smoltalk", None, "test"), SMOLTALK_ROW),
])
def test_online_loads_the_reference_hub_dataset(monkeypatch, capsys, tok, make, call, row):
    calls = fake_hub(monkeypatch, [row])
    task = make()
    assert calls == [call] and task.ds.seed == 42 and len(task) == 1
    assert f"1 rows from the Hugging Face hub ({call[0]})" in capsys.readouterr().out
    ids, mask = tok.render_conversation(task[0])
    assert sum(mask) > 0


def test_hub_failure_falls_back_to_the_committed_copy(monkeypatch, capsys):
    calls = fake_hub(monkeypatch, None)
    task = ARC("ARC-Easy", "test")
    assert calls == [("allenai/ai2_arc", "ARC-Easy", "test")] and len(task) == 2376
    out = capsys.readouterr().out
    assert "offline subset data/tasks/arc/ARC-Easy/test.jsonl.gz (unreachable: ConnectionError" in out
    with pytest.raises(RuntimeError, match="no committed offline copy"):
        load_rows("GSM8K", "openai/gsm8k", "socratic", "test", "gsm8k/socratic/test.jsonl.gz")


def test_hub_non_network_failure_propagates_instead_of_using_the_committed_copy(monkeypatch):
    def load_dataset(path, name=None, split=None):
        raise ValueError("Unknown split 'tset'")
    monkeypatch.delenv("NANOCHAT_OFFLINE")
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(RuntimeError, match=r"ARC ARC-Easy/test: loading allenai/ai2_arc .*ValueError: Unknown "
                                           r"split.*not a network error.*NANOCHAT_OFFLINE=1"):
        ARC("ARC-Easy", "test")


def test_unreachable_hub_uses_the_committed_copy_loudly(monkeypatch, capsys):
    fake_hub(monkeypatch, None)  # raises ConnectionError
    GSM8K("main", "train")
    out = capsys.readouterr().out
    assert "WARNING: GSM8K main/train: 2,000 rows from the committed offline subset" in out
    assert "not comparable with runs on openai/gsm8k" in out


def test_undersized_view_is_an_error_on_hub_rows_and_a_loud_clamp_on_the_committed_copy(monkeypatch, capsys):
    fake_hub(monkeypatch, [{"question": "q", "answer": "#### 1"}] * 3)
    with pytest.raises(ValueError, match=r"GSM8K\(start=0, stop=5, step=1\) asks for rows up to 5.*only 3"):
        len(GSM8K("main", "test", stop=5))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    task = GSM8K("main", "train", stop=5000)
    capsys.readouterr()
    assert len(task) == 2000 and len(task) == 2000
    out = capsys.readouterr().out
    assert out.count("WARNING: GSM8K(start=0, stop=5000, step=1) asks for rows up to 5000; the committed copy "
                     "has 2000") == 1


def test_spellingbee_word_list_network_failure_is_loud_other_failures_raise(monkeypatch, capsys):
    import urllib.error
    import tasks.spellingbee as sb
    monkeypatch.delenv("NANOCHAT_OFFLINE")

    def unreachable(url, filename, **kwargs):
        raise RuntimeError("Failed to download") from urllib.error.URLError(OSError(-2, "Name or service not known"))
    monkeypatch.setattr(sb, "download_file_with_lock", unreachable)
    assert len(sb.load_words()) == 370099
    assert "WARNING: Word list: 370,099 words from the committed offline copy" in capsys.readouterr().out

    def disk_full(url, filename, **kwargs):
        raise RuntimeError("Failed to download") from OSError(28, "No space left on device")
    monkeypatch.setattr(sb, "download_file_with_lock", disk_full)
    with pytest.raises(RuntimeError, match="not a network error.*NANOCHAT_OFFLINE=1"):
        sb.load_words()


def test_offline_smoltalk_and_missing_splits_raise_clear_errors():
    with pytest.raises(RuntimeError, match="HuggingFaceTB/smol-smoltalk.*offline.*CustomJSON"):
        SmolTalk("train")
    with pytest.raises(RuntimeError, match="auxiliary_train"):
        MMLU("all", "auxiliary_train")
    with pytest.raises(RuntimeError, match="ARC-Challenge/validation"):
        ARC("ARC-Challenge", "validation")
    for make in (lambda: ARC("ARC-Medium", "test"), lambda: MMLU("auxiliary_train", "train"),
                 lambda: GSM8K("main", "dev"), lambda: SmolTalk("validation"), lambda: SpellingBee(split="val")):
        with pytest.raises(ValueError):
            make()


# -----------------------------------------------------------------------------
# Every task renders through the tokenizer with supervised tokens

EVERY_TASK = {
    "ARC-Easy": lambda: ARC("ARC-Easy", "test"),
    "ARC-Challenge": lambda: ARC("ARC-Challenge", "train"),
    "MMLU": lambda: MMLU("all", "test"),
    "MMLU-dev": lambda: MMLU("all", "dev"),
    "GSM8K": lambda: GSM8K("main", "train"),
    "HumanEval": lambda: HumanEval(),
    "SpellingBee": lambda: SpellingBee(size=50),
    "SimpleSpelling": lambda: SimpleSpelling(size=50, split="test"),
    "identity": lambda: CustomJSON(COMMITTED_IDENTITY_PATH),
    "dolly": lambda: CustomJSON(COMMITTED_DOLLY_PATH),
}


@pytest.mark.parametrize("name", list(EVERY_TASK))
def test_examples_render_with_supervised_tokens(tok, name):
    task = EVERY_TASK[name]()
    assert len(task) > 0
    assistant_start = tok.encode_special("<|assistant_start|>")
    for k in sorted({0, 1, len(task) // 2, len(task) - 1}):
        conversation = task[k]
        ids, mask = tok.render_conversation(conversation, max_tokens=100_000)
        assert ids[0] == tok.get_bos_token_id() and len(ids) == len(mask) and sum(mask) > 0
        assert tok.encode_special("<|assistant_end|>") in ids
        prompt = tok.render_for_completion(conversation)
        assert prompt[-1] == assistant_start and len(prompt) < len(ids)


def test_mixture_of_real_tasks_returns_the_underlying_examples():
    gsm, bee = GSM8K("main", "test", stop=5), SpellingBee(size=3)
    mixture = TaskMixture([gsm, bee, bee])
    examples = [json.dumps(ex, sort_keys=True) for ex in mixture]
    expected = [json.dumps(ex, sort_keys=True) for ex in list(gsm) + list(bee) * 2]
    assert len(mixture) == 11 and sorted(examples) == sorted(expected)


# -----------------------------------------------------------------------------
# Multiple choice

def test_arc_examples_and_evaluate():
    task = ARC("ARC-Easy", "test")
    rows = {row["id"]: row for row in read_committed("arc/ARC-Easy/test.jsonl.gz")}
    conversation = task[0]
    gold = conversation["messages"][1]["content"]
    row = next(r for r in rows.values() if r["question"] in conversation["messages"][0]["content"])
    assert gold == row["answerKey"] and conversation["letters"] == row["choices"]["label"]
    assert task.eval_type == "categorical"
    assert task.evaluate(conversation, gold) is True
    wrong = next(letter for letter in conversation["letters"] if letter != gold)
    assert task.evaluate(conversation, wrong) is False
    with pytest.raises(ValueError):
        task.evaluate(conversation, "Z")
    # some ARC questions are labelled 1-4 instead of A-D: the letters follow the row
    numeric = [ex for ex in task if ex["letters"][0] == "1"]
    assert numeric and all("=1\n" in ex["messages"][0]["content"] for ex in numeric)


def test_hub_rows_of_arc_and_mmlu_that_break_their_format_name_the_row(monkeypatch):
    fake_hub(monkeypatch, [dict(ARC_ROW, answerKey="E")])
    with pytest.raises(ValueError, match=r"ARC ARC-Easy/test row x: answer 'E' is not one of the labels"):
        ARC("ARC-Easy", "test")[0]
    fake_hub(monkeypatch, [{"question": "q", "subject": "", "choices": ["a", "b", "c"], "answer": 0}])
    with pytest.raises(ValueError, match="MMLU auxiliary_train row 0: expected 4 choices, got 3"):
        MMLU("all", "auxiliary_train")[0]
    fake_hub(monkeypatch, [{"question": "q", "subject": "", "choices": ["a", "b", "c", "d"], "answer": k}
                           for k in range(4)])
    assert [ex["messages"][1]["content"] for ex in MMLU("all", "auxiliary_train")] == ["A", "B", "C", "D"]


def test_mmlu_examples_and_evaluate():
    task = MMLU("all", "test")
    assert len(task) == 14042 and len(MMLU.groups) == 57 and list(MMLU.groups) == sorted(MMLU.groups)
    assert {task[k]["subject"] for k in range(0, len(task), 7)} == set(MMLU.groups)
    conversation = task[3]
    gold = conversation["messages"][1]["content"]
    assert gold in "ABCD" and conversation["letters"] == ("A", "B", "C", "D")
    assert conversation["messages"][0]["content"].count("=") >= 4
    assert task.evaluate(conversation, gold) is True
    assert task.evaluate(conversation, "A" if gold != "A" else "B") is False
    with pytest.raises(ValueError):
        task.evaluate(conversation, "E")


# -----------------------------------------------------------------------------
# GSM8K

def test_extract_answer():
    assert extract_answer("so #### 1,234") == "1234"
    assert extract_answer("#### -5 apples") == "-5"
    assert extract_answer("#### 3.5\n#### 4") == "3.5"
    assert extract_answer("the answer is 5") is None
    assert extract_answer("####5") is None


def test_calculator_annotations_become_tool_parts():
    answer = "He earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n#### 10"
    assert answer_to_parts(answer) == [
        {"type": "text", "text": "He earns 12/60 = $"},
        {"type": "python", "text": "12/60"},
        {"type": "python_output", "text": "0.2"},
        {"type": "text", "text": "0.2 per minute.\n#### 10"},
    ]
    # split at the last "=", no "=" gives an empty output, empty text pieces are kept
    assert answer_to_parts("<<a=b=3>><<7>>") == [
        {"type": "text", "text": ""}, {"type": "python", "text": "a=b"}, {"type": "python_output", "text": "3"},
        {"type": "text", "text": ""}, {"type": "python", "text": "7"}, {"type": "python_output", "text": ""},
        {"type": "text", "text": ""},
    ]


def test_gsm8k_real_rows_round_trip_and_masks(tok):
    task = GSM8K("main", "test")
    raw = {row["question"]: row["answer"] for row in read_committed("gsm8k/main/test.jsonl.gz")}
    python_start, output_start = tok.encode_special("<|python_start|>"), tok.encode_special("<|output_start|>")
    for k in range(0, len(task), 97):
        question, parts = task[k]["messages"][0]["content"], task[k]["messages"][1]["content"]
        rebuilt = ""
        for i, part in enumerate(parts):
            if part["type"] == "python":
                assert parts[i + 1]["type"] == "python_output"
                rebuilt += f"<<{part['text']}={parts[i + 1]['text']}>>"
            elif part["type"] == "text":
                rebuilt += part["text"]
        assert rebuilt == raw[question] and "<<" not in "".join(p["text"] for p in parts if p["type"] == "text")
        assert parts[-1]["type"] == "text" and "#### " in parts[-1]["text"]
        ids, mask = tok.render_conversation(task[k], max_tokens=100_000)
        if any(p["type"] == "python" for p in parts):  # tool calls are trained, tool outputs are not
            assert mask[ids.index(python_start)] == 1 and mask[ids.index(output_start)] == 0


def test_gsm8k_evaluate_and_reward():
    task = GSM8K("main", "test")
    conversation = task[0]
    gold = extract_answer(conversation["messages"][1]["content"][-1]["text"])
    assert task.eval_type == "generative"
    assert task.evaluate(conversation, f"blah\n#### {gold}") == 1
    assert task.evaluate(conversation, f"#### {gold}.0") == 0  # exact string match: "10.0" is not "10"
    assert task.evaluate(conversation, f"#### {int(gold):,}") == 1  # commas are removed before comparing
    assert task.evaluate(conversation, f"#### {int(gold) + 1}") == 0
    assert task.evaluate(conversation, gold) == 0  # no marker
    assert task.reward(conversation, f"#### {gold}") == 1.0 and isinstance(task.reward(conversation, ""), float)


def test_gsm8k_scoring_refuses_token_ids_and_a_gold_answer_that_is_no_part_list():
    conversation = {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": [{"type": "text", "text": "#### 10"}]}]}
    task = GSM8K("main", "test")
    with pytest.raises(TypeError, match="assistant_response must be a str, got list"):
        task.evaluate(conversation, [35, 10])  # the completion's token ids instead of its decoded text
    conversation["messages"][-1]["content"] = "#### 10"
    with pytest.raises(ValueError, match="the last message must be the assistant's, with a list of parts"):
        task.evaluate(conversation, "#### 10")


def test_gsm8k_scoring_compares_the_extracted_strings_exactly():
    conversation = {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": [{"type": "text", "text": "so #### 10"}]}]}
    task = GSM8K("main", "test")
    responses = ("10", "10.0", "010", "1,0", "10.")
    assert [task.evaluate(conversation, f"#### {r}") for r in responses] == [1, 0, 0, 1, 0]
    conversation["messages"][-1]["content"][-1]["text"] = "no final answer"  # a damaged gold: nothing passes
    assert task.evaluate(conversation, "no final answer either") == 0


@pytest.mark.parametrize("make_task", [lambda: GSM8K("main", "train"), lambda: SpellingBee(size=5)])
def test_rl_reward_is_the_eval_as_a_float(make_task):
    task = make_task()
    assert type(task).reward is Task.reward  # no task-specific reward that could drift from evaluate()
    for k in range(3):
        conversation = task[k]
        gold = extract_answer(conversation["messages"][-1]["content"][-1]["text"])
        for response in (f"#### {gold}", f"#### {gold}.0", f"#### {int(gold) + 1}", "", gold):
            reward = task.reward(conversation, response)
            assert type(reward) is float and reward == float(task.evaluate(conversation, response))
        assert task.reward(conversation, f"#### {gold}.0") == 0.0


# -----------------------------------------------------------------------------
# SpellingBee / SimpleSpelling

def test_spellingbee_is_a_pure_function_of_split_and_index():
    train, test, again = SpellingBee(size=20), SpellingBee(size=20, split="test"), SpellingBee(size=20)
    assert [train[k] for k in range(20)] == [again[k] for k in range(20)]
    assert train[5] == train.get_example(5) and train[5] != train[6]
    # the test split is the train seeds shifted by TEST_RANDOM_SEED_OFFSET
    assert test[3] == train.get_example(TEST_RANDOM_SEED_OFFSET + 3)
    assert sum(test[k] == train[k] for k in range(20)) == 0
    assert len(USER_MSG_TEMPLATES) == 51
    assert all("{letter}" in t and "{word}" in t for t in USER_MSG_TEMPLATES)


@pytest.mark.parametrize("split, offset", [("train", 0), ("test", 10_000_000)])  # the reference's offset
def test_spelling_examples_follow_the_reference_draw_order(split, offset):
    # one random.Random(seed) per example, drawn in this order: word, letter (90% from the word), template,
    # lower-case (30%), letter quote, word quote, "?" (50%); SimpleSpelling draws a word from its list
    # shuffled once with random.Random(42)
    bee, simple = SpellingBee(size=60, split=split), SimpleSpelling(size=60, split=split)
    shuffled = list(bee.words)
    random.Random(42).shuffle(shuffled)
    for i in range(60):
        rng = random.Random(offset + i)
        word = rng.choice(bee.words)
        letter = rng.choice(word) if rng.random() < 0.9 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        template = rng.choice(USER_MSG_TEMPLATES)
        template = template.lower() if rng.random() < 0.3 else template
        letter_quote, word_quote = rng.choice(["", "'", '"']), rng.choice(["", "'", '"'])
        user = template.format(letter=letter_quote + letter + letter_quote, word=word_quote + word + word_quote)
        user += "?" if rng.random() < 0.5 else ""
        user_msg, assistant = bee[i]["messages"]
        assert user_msg["content"] == user and assistant["content"][2]["text"] == f"'{word}'.count('{letter}')"
        simple_word = random.Random(offset + i).choice(shuffled)
        assert simple[i]["messages"][0]["content"] == f"Spell the word: {simple_word}"


def test_spellingbee_tool_call_format(tok):
    task = SpellingBee(size=40)
    output_start = tok.encode_special("<|output_start|>")
    for conversation in task:
        parts = conversation["messages"][1]["content"]
        assert [p["type"] for p in parts] == ["text", "text", "python", "python_output", "text"]
        word, letter = parts[2]["text"][1:-2].split("'.count('")
        count = word.count(letter)
        assert parts[2]["text"] == f"'{word}'.count('{letter}')" and parts[3]["text"] == str(count)
        assert eval(parts[2]["text"], {"__builtins__": {}}, {}) == count
        # what the engine's calculator returns at inference (None only for its blacklisted substrings)
        result = use_calculator(parts[2]["text"])
        assert result == count or (result is None and any(s in word for s in CALCULATOR_BLACKLIST))
        assert f"{word}:{','.join(word)}" in parts[0]["text"] and parts[0]["text"].endswith(f"This gives us {count}.")
        assert parts[0]["text"].count("hit!") == count
        walk = parts[0]["text"].split(f"occurrences of '{letter}':\n")[1].splitlines()[:len(word)]
        assert [line.split(" ")[0] for line in walk] == [f"{i}:{c}" for i, c in enumerate(word, 1)]
        assert parts[4]["text"].endswith(f"My final answer is:\n\n#### {count}")
        assert word in conversation["messages"][0]["content"]
        assert task.evaluate(conversation, parts[4]["text"]) == 1
        assert task.evaluate(conversation, f"#### {count + 1}") == 0
        ids, mask = tok.render_conversation(conversation, max_tokens=100_000)
        assert mask[ids.index(output_start)] == 0


def test_spellingbee_preview_renders_the_tool_parts_inline(monkeypatch, capsys):
    from tasks import spellingbee
    monkeypatch.setattr(sys, "argv", ["spellingbee", "--num-examples", "2", "--split", "test"])
    spellingbee.main()
    out = capsys.readouterr().out
    shown = [SpellingBee(size=2, split="test")[i]["messages"][1]["content"] for i in range(2)]
    for parts in shown:
        assert f"<<{parts[2]['text']}={parts[3]['text']}>>" in out and parts[4]["text"] in out
    assert out.count("=" * 100) == 2


def test_simplespelling_format_and_determinism():
    task, again = SimpleSpelling(size=30), SimpleSpelling(size=30)
    assert [task[k] for k in range(30)] == [again[k] for k in range(30)]
    for conversation in task:
        user, assistant = (m["content"] for m in conversation["messages"])
        word = user.removeprefix("Spell the word: ")
        assert user.startswith("Spell the word: ") and assistant == f"{word}:{','.join(word)}"
        assert task.evaluate(conversation, assistant + "\n") == 1 and task.evaluate(conversation, word) == 0
    # a different word order from SpellingBee's
    bee = SpellingBee(size=30)
    assert task.words != bee.words and sorted(task.words[:1000]) != sorted(bee.words[:1000])


# -----------------------------------------------------------------------------
# CustomJSON and SmolTalk

def test_customjson_reads_plain_and_gzipped_files(tmp_path):
    lines = [json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]),
             "", json.dumps([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                             {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}])]
    plain = tmp_path / "c.jsonl"
    plain.write_text("\n".join(lines) + "\n", encoding="utf-8")
    packed = tmp_path / "c.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as f:
        f.write("\n".join(lines))
    for path in (plain, packed):
        task = CustomJSON(str(path))
        assert len(task) == 2 and task[1]["messages"][2]["content"] == "c"
    assert len(CustomJSON(COMMITTED_IDENTITY_PATH)) == 1000


@pytest.mark.parametrize("line, problem", [
    ('{"role": "user", "content": "Hi"}', "JSON array"),
    ('[{"role": "user", "content": "Hi"}]', "at least 2"),
    ('[{"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Yo"}]', "message 0 has role"),
    ('[{"role": "user", "content": "Hi"}, {"role": "user", "content": "Yo"}]', "message 1 has role"),
    ('[{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]',
     "message 0 has role"),
    ('[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": ["x"]}]', "message 1 content"),
    ('[{"role": "user", "content": "Hi"', "not valid JSON"),
    ('["Hi", "Hello"]', "message 0 must be an object"),
])
def test_customjson_validation_errors_name_the_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    good = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: .*{problem}"):
        CustomJSON(str(path))


def test_customjson_checks_its_first_line_too(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('[{"role": "user", "content": "Hi"}]\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:1: .*at least 2"):
        CustomJSON(str(path))


def test_customjson_truncated_gzip_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "conversations.jsonl.gz"
    line = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    path.write_bytes(gzip.compress(((line + "\n") * 50).encode())[:-20])
    with pytest.raises(ValueError, match=f"{path} is truncated or corrupt after line .*Fix: correct"):
        CustomJSON(str(path))


def test_customjson_missing_file_is_an_error_with_a_hint(tmp_path):
    missing = str(tmp_path / "identity_conversations.jsonl")
    with pytest.raises(FileNotFoundError) as error:
        CustomJSON(missing)
    assert f"curl -L -o {missing} https://karpathy-public" in str(error.value)
    assert "data/tasks/chat/identity_conversations.jsonl.gz" in str(error.value)


def test_smoltalk_validates_rows(monkeypatch):
    fake_hub(monkeypatch, [SMOLTALK_ROW, {"messages": [{"role": "user", "content": "only one"}]}])
    task = SmolTalk("train")
    assert task[0]["messages"][0]["role"] == "system"  # kept: render_conversation merges it
    with pytest.raises(ValueError, match="SmolTalk train row 1"):
        task[1]


# -----------------------------------------------------------------------------
# HumanEval

def test_humaneval_extraction():
    stub = "from typing import List\nimport math\n\n# helper\ndef f(x):\n    import os\n"
    assert extract_imports(stub) == "from typing import List\nimport math"
    assert extract_program("Here:\n```python\ndef f():\n    return 1\n```\nand ```\nx\n```") == "def f():\n    return 1"
    assert extract_program("```\ndef g(): pass\n```") == "def g(): pass"
    assert extract_program("  def h(): pass \n") == "def h(): pass"


def test_humaneval_evaluate_runs_the_tests_in_the_sandbox():
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    rows = {row["entry_point"]: row for row in read_committed("humaneval/test.jsonl.gz")}
    conversation = task[0]
    row = rows[conversation["entry_point"]]
    assert conversation["test"] == row["test"]
    solution = conversation["messages"][1]["content"]
    assert solution == row["prompt"] + "\n" + row["canonical_solution"]
    assert task.evaluate(conversation, f"```python\n{solution}\n```") is True
    wrong = row["prompt"] + "    return None\n"
    assert task.evaluate(conversation, wrong) is False
    # a reply that leaves out the stub's imports still runs with them
    typed = next(ex for ex in task if ex["messages"][0]["content"].startswith("from typing import List\n"))
    without_import = typed["messages"][1]["content"].replace("from typing import List\n", "", 1)
    assert "List[" in without_import and task.evaluate(typed, without_import) is True
