"""
scripts/chat_eval.py: categorical and generative evaluation, ChatCORE, the CLI and its report section.
Scripted models (logits decided by a rule over the prompt) make the expected accuracies known by
construction; a tiny random GPT checks batching/padding and runs the CLI end to end, offline.
"""

import contextlib
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from nanochat import chat_core
from nanochat.engine import Engine
from nanochat.report import extract
from scripts import chat_eval
from tasks.common import Task, render_mc
from tasks.gsm8k import GSM8K
from tasks.humaneval import HumanEval
from tasks.spellingbee import SpellingBee

from conftest import TerminalIO, tiny_gpt, write_tiny_checkpoint


@pytest.fixture
def tokenizer(chat_tokenizer):
    """The session's chat tokenizer (GSM8K and identity text): letters are single tokens, "éè" is not."""
    return chat_tokenizer


@pytest.fixture(autouse=True)
def offline_base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path / "base"))
    monkeypatch.setenv("NANOCHAT_OFFLINE", "1")
    return tmp_path / "base"


# -----------------------------------------------------------------------------
# Scripted models: just enough of a GPT for the evaluators and the Engine

class ScriptedModel:
    """Logits from a rule (subclasses); advances a KV cache the way the attention layers would."""

    def __init__(self, vocab_size):
        self.vocab_size = vocab_size
        self.config = SimpleNamespace(n_layer=1, n_head=1, n_kv_head=1, n_embd=8, sequence_len=4096)
        self.batches = []  # every ids tensor seen

    def get_device(self):
        return torch.device("cpu")

    def __call__(self, ids, kv_cache=None):
        return self.forward(ids, kv_cache=kv_cache)


class LetterModel(ScriptedModel):
    """
    At each row's last <|assistant_start|> (the end of its prompt) the logit of `at_answer[prompt]` is 10;
    at every other position (padding included) the logit of `elsewhere[prompt]` is 50. Token 0, which is no
    letter, gets 100 everywhere: the evaluator must compare letters only.
    """

    def __init__(self, tokenizer, at_answer, elsewhere=None):
        super().__init__(tokenizer.get_vocab_size())
        self.tokenizer, self.at_answer, self.elsewhere = tokenizer, at_answer, elsewhere or {}
        self.assistant_start = tokenizer.encode_special("<|assistant_start|>")
        self.prompts = []  # every row's prompt, in order

    def letter_id(self, letter):
        return self.tokenizer.encode(letter)[0]

    def forward(self, ids, kv_cache=None):
        self.batches.append(ids)
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, :, 0] = 100.0
        for b in range(B):
            end = max(t for t in range(T) if ids[b, t] == self.assistant_start)
            prompt = tuple(ids[b, :end + 1].tolist())
            self.prompts.append(prompt)
            if prompt in self.elsewhere:
                logits[b, :, self.letter_id(self.elsewhere[prompt])] = 50.0
                logits[b, end, self.letter_id(self.elsewhere[prompt])] = 0.0
            if self.at_answer.get(prompt) is not None:
                logits[b, end, self.letter_id(self.at_answer[prompt])] = 10.0
        return logits


class AnswerModel(ScriptedModel):
    """Replies to each known prompt with its scripted tokens, then <|assistant_end|>; records the prompts."""

    def __init__(self, tokenizer, replies):
        super().__init__(tokenizer.get_vocab_size())
        self.replies = replies  # prompt tuple -> reply token ids
        self.assistant_end = tokenizer.encode_special("<|assistant_end|>")
        self.prompts = []

    def forward(self, ids, kv_cache=None):
        self.batches.append(ids)
        B, T = ids.shape
        if T > 1:  # the Engine's prefill
            self.prompts.append(tuple(ids[0].tolist()))
            self.script = self.replies[self.prompts[-1]] + [self.assistant_end]
        step = kv_cache.get_pos() + T - len(self.prompts[-1])  # index in the script of the token to predict
        kv_cache.advance(T)
        logits = torch.zeros(B, T, self.vocab_size)
        logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 100.0
        return logits


class TinyMC(Task):
    """Hand-written multiple-choice questions of different lengths and letter sets."""
    QUESTIONS = [
        ("What is 1+1?", ["A", "B", "C", "D"], ["1", "2", "3", "4"], "B"),
        ("Which planet is the largest planet in the solar system by mass and by volume?",
         ["A", "B", "C", "D"], ["Mars", "Venus", "Jupiter", "Earth"], "C"),
        ("Pick one.", ["1", "2", "3"], ["x", "y", "z"], "1"),
        ("Water boils at sea level at how many degrees Celsius?", ["A", "B", "C", "D", "E"],
         ["0", "50", "90", "100", "120"], "D"),
        ("Which is a fruit?", ["A", "B", "C", "D"], ["apple", "stone", "chair", "cloud"], "A"),
        ("The opposite of hot is", ["A", "B", "C", "D"], ["warm", "cold", "big", "red"], "B"),
        ("2*3 =", ["A", "B", "C", "D"], ["5", "6", "7", "8"], "B"),
    ]

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.QUESTIONS)

    def get_example(self, index):
        question, letters, choices, gold = self.QUESTIONS[index]
        messages = [{"role": "user", "content": render_mc(question, letters, choices)},
                    {"role": "assistant", "content": gold}]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, assistant_response):
        return assistant_response == conversation["messages"][-1]["content"]


def gold_and_wrong(tokenizer, task, n):
    """prompt tuple -> gold letter, and prompt tuple -> some other letter of the same problem."""
    gold, wrong = {}, {}
    for i in range(n):
        conversation = task[i]
        prompt = tuple(tokenizer.render_for_completion(conversation))
        gold[prompt] = conversation["messages"][-1]["content"]
        wrong[prompt] = next(letter for letter in conversation["letters"] if letter != gold[prompt])
    return gold, wrong


def final_answer(conversation):
    """The gold number after '####' in the last part of a GSM8K/SpellingBee answer."""
    return conversation["messages"][-1]["content"][-1]["text"].split("####")[-1].strip()


# -----------------------------------------------------------------------------
# Categorical

def test_categorical_reads_the_last_prompt_position_and_only_letters(tokenizer, capsys):
    task = TinyMC()
    gold, wrong = gold_and_wrong(tokenizer, task, len(task))
    right_model = LetterModel(tokenizer, at_answer=gold, elsewhere=wrong)
    assert chat_core.run_categorical_eval(task, tokenizer, right_model, batch_size=3) == 1.0
    assert "Final: 7/7 (100.00%)" in capsys.readouterr().out
    assert any(len({int(t) for t in batch[:, -1]}) > 1 for batch in right_model.batches)  # padding happened
    wrong_model = LetterModel(tokenizer, at_answer=wrong, elsewhere=gold)
    assert chat_core.run_categorical_eval(task, tokenizer, wrong_model, batch_size=3) == 0.0


def test_categorical_ties_go_to_the_first_letter(tokenizer):
    task = TinyMC()
    no_preference = LetterModel(tokenizer, at_answer={})  # all letters 0 at the answer position
    expected = sum(q[3] == q[1][0] for q in TinyMC.QUESTIONS) / len(TinyMC.QUESTIONS)  # 2 of 7 golds are first
    assert chat_core.run_categorical_eval(task, tokenizer, no_preference, batch_size=4) == pytest.approx(expected)


def test_categorical_batches_and_max_problems(tokenizer):
    task = TinyMC()
    gold, _ = gold_and_wrong(tokenizer, task, len(task))
    model = LetterModel(tokenizer, at_answer=gold)
    assert chat_core.run_categorical_eval(task, tokenizer, model, batch_size=2, max_problems=5) == 1.0
    assert [batch.shape[0] for batch in model.batches] == [2, 2, 1]
    model.batches.clear()  # a limit above the task's size takes the whole task
    assert chat_core.run_categorical_eval(task, tokenizer, model, batch_size=4, max_problems=100) == 1.0
    assert [batch.shape[0] for batch in model.batches] == [4, 3]


def test_chat_eval_draws_progress_bars_on_a_terminal(tokenizer, monkeypatch, capsys):
    monkeypatch.delenv("NANOCHAT_QUIET", raising=False)
    task = TinyMC()
    gold, _ = gold_and_wrong(tokenizer, task, len(task))
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        assert chat_core.run_categorical_eval(task, tokenizer, LetterModel(tokenizer, at_answer=gold), 2) == 1.0
    assert re.search(r"0/4 \[00:00<\?, \?batch/s\]", terminal.getvalue()), terminal.getvalue()
    task = GSM8K(subset="main", split="test")
    prompts = [tuple(tokenizer.render_for_completion(task[i])) for i in range(3)]
    right = {p: tokenizer.encode(f"#### {final_answer(task[i])}") for i, p in enumerate(prompts)}
    model = AnswerModel(tokenizer, right)
    capsys.readouterr()
    with contextlib.redirect_stderr(TerminalIO()) as terminal:
        assert chat_core.run_generative_eval(task, tokenizer, model, Engine(model, tokenizer), 1, 16, 0.0, 50,
                                             max_problems=3) == 1.0
    assert re.search(r"0/3 \[00:00<\?, \?problem/s, 3/3 \(100.00%\)\]", terminal.getvalue()), terminal.getvalue()
    out = capsys.readouterr().out
    assert "Rank 0 |" not in out and "Final: 3/3 (100.00%)" in out  # the bar shows what that line showed


def test_multi_token_letter_is_a_clear_error(tokenizer):
    conversation = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "éè"}],
                    "letters": ["éè", "B"]}
    with pytest.raises(ValueError, match="one token per letter"):
        chat_core.predict_letters(LetterModel(tokenizer, {}), tokenizer, [conversation])


def test_padding_does_not_change_predictions_on_a_real_model(tokenizer):
    model = tiny_gpt(sequence_len=512, vocab_size=tokenizer.get_vocab_size())
    torch.nn.init.normal_(model.lm_head.weight, std=1.0)  # the init is near zero: make the letters differ
    model.eval()
    conversations = [TinyMC()[i] for i in range(len(TinyMC.QUESTIONS))]
    tracked = []  # chat_sft evaluates with autograd on: the eval's forward must not build a graph
    model.register_forward_hook(lambda module, args, logits: tracked.append(logits.requires_grad))
    batched = chat_core.predict_letters(model, tokenizer, conversations)
    assert tracked == [False]
    for conversation, predicted in zip(conversations, batched):  # one unpadded prompt at a time
        prompt = tokenizer.render_for_completion(conversation)
        with torch.no_grad():
            last = model(torch.tensor([prompt]))[0, -1]
        letter_ids = [tokenizer.encode(letter)[0] for letter in conversation["letters"]]
        assert predicted == conversation["letters"][int(torch.argmax(last[letter_ids]))]
    assert len(set(batched)) > 1  # the model is not trivially constant


def test_arc_through_the_registry_with_max_problems(tokenizer):
    arc = chat_core.TASKS["ARC-Easy"]()
    gold, wrong = gold_and_wrong(tokenizer, arc, 6)
    model = LetterModel(tokenizer, at_answer=gold, elsewhere=wrong)
    assert chat_core.run_chat_eval("ARC-Easy", model, tokenizer, None, batch_size=4, max_problems=6) == 1.0
    assert sum(batch.shape[0] for batch in model.batches) == 6


# -----------------------------------------------------------------------------
# Generative

@pytest.mark.parametrize("task_name, make_task", [
    ("GSM8K", lambda: GSM8K(subset="main", split="test")),
    ("SpellingBee", lambda: SpellingBee(size=256, split="test")),
])
def test_generative_scores_scripted_answers(tokenizer, task_name, make_task, capsys):
    task = make_task()
    prompts = [tuple(tokenizer.render_for_completion(task[i])) for i in range(3)]
    right = {p: tokenizer.encode(f"Let me see.\n#### {final_answer(task[i])}") for i, p in enumerate(prompts)}
    model = AnswerModel(tokenizer, right)
    accuracy = chat_core.run_chat_eval(task_name, model, tokenizer, Engine(model, tokenizer), max_problems=3)
    assert accuracy == 1.0
    assert model.prompts == prompts  # exactly the first 3 problems, in order
    out = capsys.readouterr().out
    assert "Rank 0 | 3/3 (100.00%)" in out and "Final: 3/3 (100.00%)" in out and "=" * 50 in out
    wrong = {p: tokenizer.encode("I do not know. #### none") for p in prompts}
    model = AnswerModel(tokenizer, wrong)
    assert chat_core.run_chat_eval(task_name, model, tokenizer, Engine(model, tokenizer), max_problems=3) == 0.0


def test_humaneval_canonical_solutions_pass(tokenizer):
    task = HumanEval()
    replies = {tuple(tokenizer.render_for_completion(task[i])): tokenizer.encode(task[i]["messages"][-1]["content"])
               for i in range(2)}
    model = AnswerModel(tokenizer, replies)
    engine = Engine(model, tokenizer)
    assert chat_core.run_chat_eval("HumanEval", model, tokenizer, engine, max_new_tokens=4096, max_problems=2) == 1.0


def test_greedy_pass_at_k_generates_one_sample(tokenizer):
    task = GSM8K(subset="main", split="test")
    prompt = tuple(tokenizer.render_for_completion(task[0]))
    model = AnswerModel(tokenizer, {prompt: tokenizer.encode(f"#### {final_answer(task[0])}")})
    engine = Engine(model, tokenizer)
    assert chat_core.run_generative_eval(task, tokenizer, model, engine, num_samples=4, max_new_tokens=16,
                                         temperature=0.0, top_k=50, max_problems=1) == 1.0
    assert all(batch.shape[0] == 1 for batch in model.batches)


class BranchModel(ScriptedModel):
    """First token: "Y" or "N" with equal odds; each row then writes the right answer after a "Y" and a wrong
    one after an "N". So with several samples some rows pass and some fail."""

    def __init__(self, tokenizer, gold):
        super().__init__(tokenizer.get_vocab_size())
        self.yes, self.no = tokenizer.encode("Y")[0], tokenizer.encode("N")[0]
        self.scripts = {self.yes: tokenizer.encode(f"#### {gold}"), self.no: tokenizer.encode("#### none")}
        self.end = tokenizer.encode_special("<|assistant_end|>")

    def forward(self, ids, kv_cache=None):
        B, T = ids.shape
        logits = torch.full((B, T, self.vocab_size), -100.0)
        if T > 1:  # prefill: the coin flip
            self.prompt_len = T
            logits[:, -1, [self.yes, self.no]] = 0.0
        else:
            step = kv_cache.get_pos() + 1 - self.prompt_len  # >= 1: position in [branch, *script, end]
            if step == 1:
                self.branches = ids[:, 0].tolist()
            for b, branch in enumerate(self.branches):
                script = self.scripts[branch] + [self.end]
                logits[b, -1, script[min(step - 1, len(script) - 1)]] = 100.0
        kv_cache.advance(T)
        return logits


def test_pass_at_k_passes_if_any_sample_passes(tokenizer):
    task = GSM8K(subset="main", split="test")
    model = BranchModel(tokenizer, final_answer(task[0]))
    engine = Engine(model, tokenizer)
    accuracy = chat_core.run_generative_eval(task, tokenizer, model, engine, num_samples=8, max_new_tokens=32,
                                             temperature=1.0, top_k=50, max_problems=1)
    assert sorted(set(model.branches)) == sorted([model.yes, model.no])  # some samples right, some wrong
    assert accuracy == 1.0


def test_generative_eval_samples_with_the_given_top_k(tokenizer):
    # the scripted token leads every other token by only 3 logits: at temperature 1 it is sampled with
    # top_k=1, and almost never without a top-k
    task = GSM8K(subset="main", split="test")
    prompts = [tuple(tokenizer.render_for_completion(task[i])) for i in range(2)]
    right = {p: tokenizer.encode(f"#### {final_answer(task[i])}") for i, p in enumerate(prompts)}
    model = AnswerModel(tokenizer, right)
    scripted = model.forward
    model.forward = lambda ids, kv_cache=None: scripted(ids, kv_cache).clamp(max=3.0)
    assert chat_core.run_generative_eval(task, tokenizer, model, Engine(model, tokenizer), 1, 16, 1.0, 1,
                                         max_problems=2) == 1.0


def test_ranks_stride_over_problems_and_batches(tokenizer, monkeypatch):
    monkeypatch.setattr(chat_core, "rank_and_world", lambda: (1, 2))
    task = GSM8K(subset="main", split="test")
    prompts = [tuple(tokenizer.render_for_completion(task[i])) for i in range(5)]
    model = AnswerModel(tokenizer, {p: tokenizer.encode("#### 0") for p in prompts})
    chat_core.run_generative_eval(task, tokenizer, model, Engine(model, tokenizer), 1, 8, 0.0, 50, max_problems=5)
    assert model.prompts == [prompts[1], prompts[3]]
    mc = TinyMC()
    gold, _ = gold_and_wrong(tokenizer, mc, len(mc))
    letter_model = LetterModel(tokenizer, at_answer=gold)
    chat_core.run_categorical_eval(mc, tokenizer, letter_model, batch_size=2)  # batches 0-3; rank 1: 1 and 3
    assert letter_model.prompts == [tuple(tokenizer.render_for_completion(mc[i])) for i in (2, 3, 6)]


def test_counts_are_summed_over_the_process_group(tokenizer, tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        task = TinyMC()
        gold, _ = gold_and_wrong(tokenizer, task, len(task))
        assert chat_core.run_categorical_eval(task, tokenizer, LetterModel(tokenizer, gold), batch_size=2) == 1.0
    finally:
        dist.destroy_process_group()


def test_run_chat_eval_rejects_bad_names_and_limits(tokenizer):
    with pytest.raises(KeyError, match="Unknown task"):
        chat_core.run_chat_eval("NotATask", None, tokenizer, None)
    with pytest.raises(ValueError, match="max_problems"):
        chat_core.run_chat_eval("GSM8K", None, tokenizer, None, max_problems=0)
    with pytest.raises(ValueError, match="batch_size and num_samples must be >= 1, got 1 and 0"):
        chat_core.run_chat_eval("GSM8K", None, tokenizer, None, num_samples=0)


class RankedMC(TinyMC):
    @property
    def eval_type(self):
        return "ranking"


def test_a_task_of_an_unsupported_eval_type_is_an_error(tokenizer, monkeypatch):
    monkeypatch.setitem(chat_core.TASKS, "RankedMC", RankedMC)
    with pytest.raises(ValueError, match="Unsupported task evaluation type: ranking"):
        chat_core.run_chat_eval("RankedMC", None, tokenizer, None)


class EmptyMC(TinyMC):
    QUESTIONS = []


def test_an_empty_task_is_an_error_not_a_division_by_zero(tokenizer):
    with pytest.raises(ValueError, match=r"no problems were evaluated \(empty task"):
        chat_core.run_categorical_eval(EmptyMC(), tokenizer, LetterModel(tokenizer, {}), batch_size=2)


# -----------------------------------------------------------------------------
# ChatCORE

def test_chatcore_by_hand():
    results = {"ARC-Easy": 0.5, "ARC-Challenge": 0.25, "MMLU": 1.0, "GSM8K": 0.1, "HumanEval": 0.0, "SpellingBee": 0.6}
    # centered: (0.5-0.25)/0.75 = 1/3, 0, 1, 0.1, 0, 0.6
    assert chat_core.chatcore(results) == pytest.approx((1 / 3 + 0 + 1 + 0.1 + 0 + 0.6) / 6)
    categorical = {name: results[name] for name in chat_core.CATEGORICAL_TASKS}
    assert chat_core.chatcore(categorical) == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert chat_core.chatcore({"MMLU": 0.25, "GSM8K": 0.0}) == 0.0  # chance level is 0
    with pytest.raises(ValueError, match="chatcore needs at least one task result"):
        chat_core.chatcore({})


def test_run_chatcore_takes_each_task_limit_and_restores_train_mode(monkeypatch, capsys):
    calls = []

    def fake_run_chat_eval(task, model, tokenizer, engine, max_problems=None, batch_size=1):
        calls.append((task, max_problems, batch_size, model.training))
        return 0.5
    monkeypatch.setattr(chat_core, "run_chat_eval", fake_run_chat_eval)
    monkeypatch.setattr("nanochat.engine.Engine", lambda model, tokenizer: None)
    model = torch.nn.Linear(1, 1)
    accuracies = chat_core.run_chatcore(model, None, batch_size=3, max_cat=-1, max_sample=7)
    assert accuracies == dict.fromkeys(chat_core.TASKS, 0.5) and model.training
    assert calls == [(task, None if task in chat_core.CATEGORICAL_TASKS else 7, 3, False)
                     for task in chat_core.TASKS]
    out = capsys.readouterr().out
    assert out.splitlines() == [f"  {task}: 50.00%" for task in chat_core.TASKS]  # chat_sft's lines


# -----------------------------------------------------------------------------
# CLI

def save_tiny_sft_checkpoint(base_dir, tokenizer):
    tokenizer.save(str(base_dir / "tokenizer"))
    write_tiny_checkpoint(base_dir, "sft", vocab_size=tokenizer.get_vocab_size())


def test_cli_all_tasks_writes_report_with_chatcore(tokenizer, offline_base_dir, capsys):
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    results = chat_eval.main(["-i", "sft", "-x", "2", "-m", "4", "-b", "2", "--device-type", "cpu"])
    assert list(results) == ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"]
    out = capsys.readouterr().out
    for name, accuracy in results.items():
        assert f"{name} accuracy: {100 * accuracy:.2f}%" in out
    report = (offline_base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert report.startswith("## Chat evaluation sft\n")
    metrics = extract(report, list(results) + ["ChatCORE"])  # what the report summary reads
    assert {name: float(metrics[name]) for name in results} == pytest.approx(results, abs=5e-5)
    centered = [(results[n] - base) / (1 - base) for n, base in
                [("ARC-Easy", .25), ("ARC-Challenge", .25), ("MMLU", .25), ("GSM8K", 0), ("HumanEval", 0),
                 ("SpellingBee", 0)]]
    assert float(metrics["ChatCORE"]) == pytest.approx(sum(centered) / 6, abs=5e-5)
    assert re.search(r"ChatCORE metric: -?\d\.\d{4}", out)


def test_cli_subset_of_tasks_reports_no_chatcore(tokenizer, offline_base_dir):
    save_tiny_sft_checkpoint(offline_base_dir, tokenizer)
    results = chat_eval.main(["-i", "sft", "-a", "GSM8K|ARC-Easy", "-x", "1", "-m", "2", "--device-type", "cpu"])
    assert list(results) == ["GSM8K", "ARC-Easy"]
    report = (offline_base_dir / "report" / "chat-evaluation-sft.md").read_text()
    assert "ChatCORE" not in report
    assert float(extract(report, "GSM8K")["GSM8K"]) == pytest.approx(results["GSM8K"], abs=5e-5)


def test_cli_missing_checkpoint_exits_with_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        chat_eval.main(["-i", "sft", "-a", "GSM8K", "--device-type", "cpu"])
    assert e.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("chat_eval: error:") and "chatsft_checkpoints" in err and "\n" not in err


@pytest.mark.parametrize("argv", [["-i", "sft", "-a", "GSM8K|Nope"], ["-i", "sft", "-x", "0"], ["-a", "GSM8K"],
                                  ["-i", "sft", "-t", "-1"], ["-i", "nope"]])
def test_cli_bad_flags_are_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        chat_eval.parse_args(argv)
    assert e.value.code == 2
