"""Every script's command line, frozen: the full set of flags (with their short aliases) and their
defaults, so a refactor cannot silently add, drop or change one. Where the reference has the flag
(the flag tables of shared/spec/pipeline.md and chat.md), the default must also equal the reference's.

A deliberate change to a flag updates PINNED here in the same commit."""

import argparse
import importlib
import re
import shutil

import pytest

from conftest import exits_with_error

REQUIRED = "<required>"

# every flag of every `python -m scripts.X`: "short, long" -> default (REQUIRED for required=True)
PINNED = {
    "base_train": {
        "--run": "dummy", "--device-type": "", "--fp8": False, "--fp8-recipe": "tensorwise", "--depth": 20,
        "--aspect-ratio": 64, "--head-dim": 128, "--max-seq-len": 2048, "--window-pattern": "SSSL",
        "--mup-base-width": 0, "--l3-after-layers": "", "--l3-n-emb": 0, "--l3-d-up": 0, "--l3-k-max": 32,
        "--l3-lzw-tokens": 10000000, "--num-iterations": -1, "--target-flops": -1.0,
        "--target-param-data-ratio": 12, "--device-batch-size": 32, "--total-batch-size": -1,
        "--embedding-lr": 0.3, "--unembedding-lr": 0.008, "--weight-decay": 0.28, "--matrix-lr": 0.02,
        "--scalar-lr": 0.5, "--warmup-steps": 40, "--warmdown-ratio": 0.65, "--final-lr-frac": 0.05,
        "--resume-from-step": -1, "--eval-every": 250, "--eval-tokens": 41943040,
        "--core-metric-every": 2000, "--core-metric-max-per-task": 500, "--sample-every": 2000,
        "--save-every": -1, "--model-tag": None,
    },
    "base_eval": {
        "--eval": "core,bpb,sample", "--hf-path": None, "--model-tag": None, "--step": None,
        "--max-per-task": -1, "--device-batch-size": 32, "--split-tokens": 20971520, "--device-type": "",
    },
    "chat_sft": {
        "--run": "dummy", "--device-type": "", "--model-tag": None, "--model-step": None,
        "--load-optimizer": 1, "--num-iterations": -1, "--max-seq-len": None, "--device-batch-size": None,
        "--total-batch-size": None, "--embedding-lr": None, "--unembedding-lr": None, "--matrix-lr": None,
        "--init-lr-frac": 0.8, "--warmup-ratio": 0.0, "--warmdown-ratio": 0.5, "--final-lr-frac": 0.0,
        "--eval-every": 200, "--eval-tokens": 20971520, "--chatcore-every": 200, "--chatcore-max-cat": -1,
        "--chatcore-max-sample": 24, "--mmlu-epochs": 3, "--gsm8k-epochs": 4, "--resume-from-step": -1,
        "--save-every": -1,
    },
    "chat_rl": {
        "--run": "dummy", "--device-type": "", "--model-tag": None, "--model-step": None, "--num-epochs": 1,
        "--num-steps": -1, "--device-batch-size": 8, "--examples-per-step": 16, "--num-samples": 16,
        "--max-new-tokens": 256, "--temperature": 1.0, "--top-k": 50, "--embedding-lr": 0.2,
        "--unembedding-lr": 0.004, "--matrix-lr": 0.02, "--weight-decay": 0.0, "--init-lr-frac": 0.05,
        "--eval-every": 60, "--eval-examples": 400, "--save-every": 60, "--resume-from-step": -1,
    },
    "chat_eval": {
        "-i, --source": REQUIRED, "-a, --task-name": None, "-t, --temperature": 0.0,
        "-m, --max-new-tokens": 512, "-n, --num-samples": 1, "-k, --top-k": 50, "-b, --batch-size": 8,
        "-g, --model-tag": None, "-s, --step": None, "-x, --max-problems": None, "--device-type": "",
    },
    "chat_cli": {
        "-i, --source": "sft", "-g, --model-tag": None, "-s, --step": None, "-p, --prompt": "",
        "-t, --temperature": 0.6, "-k, --top-k": 50, "--device-type": "", "--max-tokens": 256, "--seed": 42,
        "--system": "",
    },
    "chat_web": {
        "-n, --num-gpus": 1, "-i, --source": "sft", "-t, --temperature": 0.8, "-k, --top-k": 50,
        "-m, --max-tokens": 512, "-g, --model-tag": None, "-s, --step": None, "-p, --port": 8000,
        "--device-type": "", "--host": "0.0.0.0", "--max-batch-size": 8, "--batch-invariant": False,
        "--max-queue": 64,
        "--max-body-bytes": 1048576, "--body-timeout": 30.0, "--log-conversations": False, "--api-key": None,
    },
    "tok_train": {
        "--max-chars": 2000000000, "--doc-cap": 10000, "--vocab-size": 32768,
    },
    "tok_eval": {
    },
    "infer_bench": {
        "-i, --source": "base", "-g, --model-tag": None, "-s, --step": None, "--prompt-tokens": [512],
        "--decode-tokens": 128, "--batch-sizes": [1, 8, 32], "-t, --trials": 3, "--device-type": "",
    },
    "export_hf": {
        "-i, --source": REQUIRED, "-g, --model-tag": None, "-s, --step": None, "-o, --output": REQUIRED,
    },
}

# the reference's flags and defaults, as its flag tables give them; flags it lacks are not listed
REFERENCE = {
    "base_train": {
        "--run": "dummy", "--device-type": "", "--fp8": False, "--fp8-recipe": "tensorwise", "--depth": 20,
        "--aspect-ratio": 64, "--head-dim": 128, "--max-seq-len": 2048, "--window-pattern": "SSSL",
        "--num-iterations": -1, "--target-flops": -1.0, "--target-param-data-ratio": 12,
        "--device-batch-size": 32, "--total-batch-size": -1, "--embedding-lr": 0.3, "--unembedding-lr": 0.008,
        "--weight-decay": 0.28, "--matrix-lr": 0.02, "--scalar-lr": 0.5, "--warmup-steps": 40,
        "--warmdown-ratio": 0.65, "--final-lr-frac": 0.05, "--resume-from-step": -1, "--eval-every": 250,
        "--eval-tokens": 80 * 524288, "--core-metric-every": 2000, "--core-metric-max-per-task": 500,
        "--sample-every": 2000, "--save-every": -1, "--model-tag": None,
    },
    "base_eval": {
        "--eval": "core,bpb,sample", "--hf-path": None, "--model-tag": None, "--step": None,
        "--max-per-task": -1, "--device-batch-size": 32, "--split-tokens": 40 * 524288, "--device-type": "",
    },
    "chat_sft": {
        "--run": "dummy", "--device-type": "", "--model-tag": None, "--model-step": None,
        "--load-optimizer": 1, "--num-iterations": -1, "--max-seq-len": None, "--device-batch-size": None,
        "--total-batch-size": None,
        "--embedding-lr": None, "--unembedding-lr": None, "--matrix-lr": None, "--init-lr-frac": 0.8,
        "--warmup-ratio": 0.0, "--warmdown-ratio": 0.5, "--final-lr-frac": 0.0, "--eval-every": 200,
        "--eval-tokens": 40 * 524288, "--chatcore-every": 200, "--chatcore-max-cat": -1,
        "--chatcore-max-sample": 24, "--mmlu-epochs": 3, "--gsm8k-epochs": 4,
    },
    "chat_rl": {
        "--run": "dummy", "--device-type": "", "--model-tag": None, "--model-step": None, "--num-epochs": 1,
        "--device-batch-size": 8, "--examples-per-step": 16, "--num-samples": 16, "--max-new-tokens": 256,
        "--temperature": 1.0, "--top-k": 50, "--embedding-lr": 0.2, "--unembedding-lr": 0.004,
        "--matrix-lr": 0.02, "--weight-decay": 0.0, "--init-lr-frac": 0.05, "--eval-every": 60,
        "--eval-examples": 400, "--save-every": 60,
    },
    "chat_eval": {
        "-i, --source": REQUIRED, "-a, --task-name": None, "-t, --temperature": 0.0,
        "-m, --max-new-tokens": 512, "-n, --num-samples": 1, "-k, --top-k": 50, "-b, --batch-size": 8,
        "-g, --model-tag": None, "-s, --step": None, "-x, --max-problems": None, "--device-type": "",
    },
    "chat_cli": {
        "-i, --source": "sft", "-g, --model-tag": None, "-s, --step": None, "-p, --prompt": "",
        "-t, --temperature": 0.6, "-k, --top-k": 50, "--device-type": "",
    },
    "chat_web": {
        "-n, --num-gpus": 1, "-i, --source": "sft", "-t, --temperature": 0.8, "-k, --top-k": 50,
        "-m, --max-tokens": 512, "-g, --model-tag": None, "-s, --step": None, "-p, --port": 8000,
        "--device-type": "", "--host": "0.0.0.0",
    },
    "tok_train": {"--max-chars": 2_000_000_000, "--doc-cap": 10_000, "--vocab-size": 32768},
    "tok_eval": {},
    "infer_bench": {},  # 9822cc7 has no such script (upstream added it later with these flag names)
    "export_hf": {},  # not in the reference
}


def script_flags(script):
    """The flags of scripts/<script>.py from its build_parser(), without running the script."""
    parser = importlib.import_module(f"scripts.{script}").build_parser()
    assert isinstance(parser, argparse.ArgumentParser)
    return {", ".join(action.option_strings): REQUIRED if action.required else action.default
            for action in parser._actions if not isinstance(action, argparse._HelpAction)}


def test_every_script_is_pinned():
    scripts = {"base_train", "base_eval", "chat_sft", "chat_rl", "chat_eval", "chat_cli", "chat_web",
               "tok_train", "tok_eval", "infer_bench", "export_hf"}
    assert set(PINNED) == set(REFERENCE) == scripts


@pytest.mark.parametrize("script", sorted(PINNED))
def test_flags_and_defaults_are_frozen(script):
    flags = script_flags(script)
    assert list(flags) == list(PINNED[script]), f"scripts/{script}.py: flags added, dropped or reordered"
    for flag, default in PINNED[script].items():
        assert flags[flag] == default and type(flags[flag]) is type(default), \
            f"scripts/{script}.py {flag}: default {flags[flag]!r}, pinned {default!r}"


@pytest.mark.parametrize("script", sorted(REFERENCE))
def test_defaults_match_the_reference_where_it_has_the_flag(script):
    flags = script_flags(script)
    for flag, default in REFERENCE[script].items():
        assert flag in flags, f"scripts/{script}.py lacks the reference's {flag}"
        assert flags[flag] == default, f"scripts/{script}.py {flag}: {flags[flag]!r}, reference {default!r}"


# the batch-size flags that take `auto` (nanochat/autofit.py) besides a positive integer
AUTO_BATCH_FLAGS = {"base_train": "--device-batch-size", "base_eval": "--device-batch-size",
                    "chat_sft": "--device-batch-size", "chat_rl": "--device-batch-size",
                    "chat_eval": "--batch-size"}


@pytest.mark.parametrize("script", sorted(AUTO_BATCH_FLAGS))
def test_batch_size_flags_take_auto_or_a_positive_integer(script, capsys):
    module = importlib.import_module(f"scripts.{script}")
    flag, required = AUTO_BATCH_FLAGS[script], ["-i", "sft"] if script == "chat_eval" else []
    dest = flag.lstrip("-").replace("-", "_")
    assert getattr(module.parse_args(required + [flag, "auto"]), dest) == "auto"
    assert getattr(module.parse_args(required + [flag, "4"]), dest) == 4
    with pytest.raises(SystemExit):
        module.parse_args(required + [flag, "0"])
    assert "must be a positive integer or 'auto'" in capsys.readouterr().err


# a stage run before the one it builds on: (argv, the command its last line must tell the user to run)
BEFORE_ITS_PREREQUISITE = {
    "base_train": (["--depth", "2", "--num-iterations", "1"], "python -m scripts.tok_train"),
    "base_eval": (["--eval", "bpb"], "python -m scripts.base_train"),
    "infer_bench": ([], "python -m scripts.base_train"),
    "chat_sft": (["--num-iterations", "1"], "python -m scripts.base_train"),
    "chat_rl": (["--num-steps", "1"], "python -m scripts.chat_sft"),
    "chat_eval": (["-i", "sft", "-a", "GSM8K"], "python -m scripts.chat_sft"),
    "chat_cli": (["-p", "hi"], "python -m scripts.chat_sft"),
}


@pytest.mark.parametrize("script", sorted(BEFORE_ITS_PREREQUISITE))
def test_a_stage_run_too_early_ends_with_one_line_naming_the_stage_before_it(script, tiny_base_dir, capsys):
    argv, command = BEFORE_ITS_PREREQUISITE[script]
    if script == "base_train":
        shutil.rmtree(tiny_base_dir / "tokenizer")
    with exits_with_error(capsys, f"^{script}: error: .*`{re.escape(command)}`"):
        importlib.import_module(f"scripts.{script}").main(argv + ["--device-type", "cpu"])


@pytest.mark.parametrize("script", sorted(BEFORE_ITS_PREREQUISITE) + ["chat_web"])
def test_a_device_this_pytorch_cannot_use_ends_with_one_line_saying_what_to_pass(script, tiny_base_dir, capsys,
                                                                                 monkeypatch):
    # a command copied from a GPU machine onto a laptop: --device-type cuda where torch sees no CUDA device
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 0)
    argv = BEFORE_ITS_PREREQUISITE.get(script, ([],))[0]
    with exits_with_error(capsys, f"^{script}: error: .*CUDA.*Fix: .*leave"):
        importlib.import_module(f"scripts.{script}").main(argv + ["--device-type", "cuda"])
