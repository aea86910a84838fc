"""base_eval: CLI validation and failure exits, and its library half: the CORE csv and report items
(core_eval), the HF helpers and bpb (loss_eval)."""
import math
import os
import sys
import types

import pytest
import torch

from nanochat import common, core_eval, hf_export, loss_eval
from nanochat.tokenizer import HuggingFaceTokenizer, compute_token_bytes
from nanochat.core_eval import base_eval_report_items as report_items
from scripts import base_eval

from conftest import exits_with_error, point_base_dir_at, tiny_gpt


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    return point_base_dir_at(monkeypatch, tmp_path / "base")


def test_defaults():
    args = base_eval.parse_args([])
    assert args.eval == "core,bpb,sample" and args.modes == {"core", "bpb", "sample"}
    assert (args.hf_path, args.model_tag, args.step) == (None, None, None)
    assert args.max_per_task == -1 and args.device_batch_size == 32
    assert args.split_tokens == 20_971_520 and args.device_type == ""
    assert base_eval.parse_args(["--eval", "bpb, core"]).modes == {"bpb", "core"}


@pytest.mark.parametrize("value,bad", [("core,foo", "'foo'"), ("samples", "'samples'"), ("core,", "''")])
def test_invalid_eval_modes_are_a_usage_error(value, bad, capsys):
    with pytest.raises(SystemExit) as info:
        base_eval.parse_args(["--eval", value])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"Invalid eval modes: {bad}" in err and "Valid modes: core, bpb, sample" in err


CORE = {"results": {"hellaswag_zeroshot": 0.3125, "boolq": 0.5},
        "centered_results": {"hellaswag_zeroshot": 0.0833333333, "boolq": -0.3157894737},
        "core_metric": -0.1162280702, "missing_tasks": []}


def test_core_csv_format(base_dir):
    expected = (
        "Task                               , Accuracy  , Centered  \n"
        "hellaswag_zeroshot                 , 0.312500  , 0.083333  \n"
        "boolq                              , 0.500000  , -0.315789 \n"
        "CORE (2 of 22 tasks)               ,           , -0.116228 \n"  # fewer than 22: said in the name
    )
    assert core_eval.format_core_csv(CORE) == expected
    path = core_eval.write_core_csv("base_model_000123", CORE)
    assert path == str(base_dir / "base_eval" / "base_model_000123.csv")
    assert open(path).read() == expected
    assert os.listdir(base_dir / "base_eval") == ["base_model_000123.csv"]
    partial = core_eval.format_core_csv(dict(CORE, missing_tasks=["coqa"]))
    assert partial.splitlines()[-1] == "CORE (2 of 22 tasks, missing coqa) ,           , -0.116228 "
    full = dict(CORE, results={f"t{i}": 0.5 for i in range(22)}, centered_results={f"t{i}": 0.0 for i in range(22)})
    assert core_eval.format_core_csv(full).splitlines()[-1] == "CORE                               ,           , -0.116228 "


def test_report_items(tmp_path):
    items = report_items("base_model (step 5)", CORE, {"train": 1.5, "val": 1.25}, ["s0", "s1"], ["u0"])
    assert items[0] == {"model": "base_model (step 5)", "CORE metric": f"{CORE['core_metric']:.4f} (2 of 22 tasks)",
                        "train bpb": 1.5, "val bpb": 1.25}
    assert list(items[0]) == ["model", "CORE metric", "train bpb", "val bpb"]
    assert items[1] == CORE["centered_results"]
    assert items[2:] == [{"sample 0": "s0"}, {"sample 1": "s1"}, {"unconditioned 0": "u0"}]
    partial = dict(CORE, missing_tasks=["coqa"])
    assert report_items("m", partial, {}, [], []) == [
        {"model": "m", "CORE metric": f"{CORE['core_metric']:.4f} (2 of 22 tasks, missing coqa)"},
        CORE["centered_results"]]
    # the report's summary table reads the CORE value back from the section text, task count included
    from nanochat.report import Report, extract
    path = Report(str(tmp_path)).log("Base model evaluation", report_items("m", partial, {}, [], []))
    assert extract(open(path).read(), ["CORE"])["CORE"] == f"{CORE['core_metric']:.4f} (2 of 22 tasks, missing coqa)"
    full = dict(CORE, results={f"t{i}": 0.5 for i in range(22)})
    assert report_items("m", full, {}, [], [])[0] == {"model": "m", "CORE metric": CORE["core_metric"]}
    path = Report(str(tmp_path)).log("Base model evaluation", report_items("m", full, {}, [], []))
    assert extract(open(path).read(), ["CORE"])["CORE"] == f"{CORE['core_metric']:.4f}"
    bpb_only = report_items("m", None, {"train": 2.0, "val": 3.0}, [], [])
    assert bpb_only == [{"model": "m", "train bpb": 2.0, "val bpb": 3.0}]


def test_bpb_steps(capsys):
    assert loss_eval.bpb_steps(1024, 128) == (1024, 8)
    assert capsys.readouterr().out == ""
    assert loss_eval.bpb_steps(1000, 128) == (896, 7)
    assert "Adjusted split_tokens to 896 (must be divisible by 128)" in capsys.readouterr().out
    with pytest.raises(common.SetupError, match="less than one batch"):
        loss_eval.bpb_steps(100, 128)


def test_model_wrapper_matches_the_gpt_call_signature():
    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))

    class FakeCausalLM(torch.nn.Module):  # what a HF model returns: an output object with .logits
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            return types.SimpleNamespace(logits=logits)

    wrapper = hf_export.ModelWrapper(FakeCausalLM(), max_seq_len=1024)
    ids = torch.zeros(2, 5, dtype=torch.long)
    assert torch.equal(wrapper(ids), logits)
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    targets[0, :2] = -1
    per_token = wrapper(ids, targets, loss_reduction="none")
    log_probs = torch.log_softmax(logits, dim=-1)
    for b in range(2):
        for t in range(5):
            expected = 0.0 if targets[b, t] < 0 else -log_probs[b, t, targets[b, t]].item()
            assert per_token[b * 5 + t].item() == pytest.approx(expected, abs=1e-5)
    assert wrapper(ids, targets).item() == pytest.approx(per_token.sum().item() / 8, abs=1e-5)
    assert wrapper.max_seq_len == 1024 and wrapper.get_device() == torch.device("cpu")


def test_hf_token_bytes_are_decoded_lengths_with_specials_at_zero():
    corpus = ["the quick brown fox jumps over the lazy dog; café naïve über " * 4] * 40
    tokenizer = HuggingFaceTokenizer.train_from_iterator(iter(corpus), 400)
    token_bytes = hf_export.get_hf_token_bytes(tokenizer)
    assert token_bytes.dtype == torch.int64 and token_bytes.shape == (tokenizer.get_vocab_size(),)
    # the reference decodes with the tokenizers library's default (skip_special_tokens=True): a special
    # token (GPT-2's <|endoftext|>, which starts every packed document) is "", 0 bytes, out of bpb
    for name in tokenizer.get_special_tokens():
        assert token_bytes[tokenizer.encode_special(name)].item() == 0, name
    # whole-text tokens count their bytes
    for word in (" quick", " brown", "the"):
        ids = tokenizer.encode(word)
        assert len(ids) == 1 and token_bytes[ids[0]].item() == len(word.encode("utf-8"))
    # the unseen "∑" is three single-byte tokens; each decodes alone to U+FFFD, 3 bytes
    ids = tokenizer.encode("∑")
    assert len(ids) == 3 and token_bytes[ids].tolist() == [3, 3, 3]


def test_hf_path_without_transformers_exits_with_a_clear_message(base_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` raise ImportError
    with pytest.raises(common.SetupError, match="needs the `transformers` package"):
        hf_export.load_hf_model("openai-community/gpt2", "cpu")
    with exits_with_error(capsys, r"^base_eval: error: --hf-path needs the `transformers` package"):
        base_eval.main(["--hf-path", "openai-community/gpt2", "--eval", "bpb", "--device-type", "cpu"])


def test_a_missing_checkpoint_is_named_before_the_eval_bundle_is_obtained(base_dir, capsys):
    with exits_with_error(capsys, r"^base_eval: error: No checkpoints found in .*base_checkpoints\. Fix: "
                                  r"train one first \(`python -m scripts\.base_train`\)"):
        base_eval.main(["--eval", "core", "--device-type", "cpu"])
    assert not os.path.exists(base_dir / "eval_bundle") and not os.path.exists(base_dir / "eval_bundle.zip")


def test_missing_bundle_exits_non_zero_before_loading_a_model(base_dir, tmp_path, monkeypatch, capsys):
    from conftest import write_tiny_checkpoint
    write_tiny_checkpoint(base_dir, "base", step=1)  # found, then the bundle is missing
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(core_eval, "REPO_DATA_DIR", str(empty))
    from nanochat import checkpoint_manager
    monkeypatch.setattr(checkpoint_manager, "load_model", lambda *a, **k: pytest.fail("the model must not load"))
    with pytest.raises(SystemExit) as info:
        base_eval.main(["--eval", "core", "--device-type", "cpu"])
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 1 and message.startswith("base_eval: error: Cannot obtain the CORE eval bundle")
    assert core_eval.EVAL_BUNDLE_URL in message
    assert "eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/...}" in message


def test_bpb_on_the_committed_sample_with_a_tiny_model(base_dir, tiny_tokenizer, capsys):
    from nanochat import dataset
    dataset.install_sample()
    tokenizer = tiny_tokenizer
    model = tiny_gpt(vocab_size=tokenizer.get_vocab_size(), n_layer=1).eval()
    bpb = loss_eval.run_bpb(model, tokenizer, compute_token_bytes(tokenizer), torch.device("cpu"),
                            device_batch_size=2, sequence_len=32, split_tokens=150, world_size=1)
    assert set(bpb) == {"train", "val"} and all(math.isfinite(v) and v > 0 for v in bpb.values())
    printed = capsys.readouterr().out
    assert "Adjusted split_tokens to 128 (must be divisible by 64)" in printed
    assert f"train bpb: {bpb['train']:.6f}" in printed and f"val bpb: {bpb['val']:.6f}" in printed


def test_base_eval_labels_a_core_over_the_21_committed_tasks(tiny_base_dir, tiny_tokenizer, capsys):
    from conftest import write_tiny_checkpoint
    torch.save(compute_token_bytes(tiny_tokenizer), tiny_base_dir / "tokenizer" / "token_bytes.pt")
    write_tiny_checkpoint(tiny_base_dir, "base", step=7, sequence_len=1024)
    core = base_eval.main(["--eval", "core", "--max-per-task", "1", "--device-type", "cpu"])
    label = f"{core['core_metric']:.4f} (21 of 22 tasks, missing coqa)"
    out = capsys.readouterr().out
    assert "Evaluating model: base_model (step 7)" in out and f"\nCORE metric: {label}\n" in out
    assert os.path.exists(tiny_base_dir / "base_eval" / "base_model_000007.csv")
    report = open(os.path.join(tiny_base_dir, "report", "base-model-evaluation.md")).read()
    assert f"- CORE metric: {label}\n" in report
    # a bar per task, drawn from the centered results the section lists
    assert "![base-model-core-tasks](base-model-core-tasks.png)" in report
    assert os.path.exists(tiny_base_dir / "report" / "base-model-core-tasks.png")


def test_sample_mode_prints_and_reports_greedy_and_unconditioned(tiny_base_dir, tiny_tokenizer, capsys):
    from conftest import write_tiny_checkpoint
    torch.save(compute_token_bytes(tiny_tokenizer), tiny_base_dir / "tokenizer" / "token_bytes.pt")
    write_tiny_checkpoint(tiny_base_dir, "base", step=3)
    assert base_eval.main(["--eval", "sample", "--device-type", "cpu"]) is None  # no CORE ran
    out = capsys.readouterr().out
    assert "=" * 80 + "\nModel Samples\n" + "=" * 80 + "\n\nConditioned samples:\n" + "-" * 80 in out
    assert "\nUnconditioned samples:\n" + "-" * 80 in out
    report = (tiny_base_dir / "report" / "base-model-evaluation.md").read_text()
    for i, prompt in enumerate(core_eval.SAMPLE_PROMPTS):
        assert f"- sample {i}: <|bos|>{prompt}" in report
    assert [f"- unconditioned {i}: <|bos|>" in report for i in range(9)] == [True] * 8 + [False]
