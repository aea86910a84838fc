"""
The run recipes in runs/: shell syntax, the shared base_train log parser on a log written from the
spec's line formats (pipeline.md §7.2-§7.9), and the sweep scripts' glue end to end with a stand-in
torchrun that prints such a log (no torch, no GPU, no network).
"""
import os

import importlib.util
import json
import re
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("speedrun.sh", "miniseries.sh", "scaling_laws.sh")
PARSER = REPO / "runs" / "parse_train_log.py"

# The d24 reference architecture (pipeline.md §7.3): value embeddings on 12 of 24 layers, vocab 32768,
# width 1536. Total 1,384,122,122 and scaling params 729,810,624 are the spec's table values.
D24_PARAMS = {"wte": 32768 * 1536, "value_embeds": 12 * 32768 * 1536, "lm_head": 32768 * 1536,
              "transformer_matrices": 729_810_624 - 32768 * 1536, "scalars": 24 + 24 + 24 + 1 + 1}
D24_PARAMS["total"] = sum(D24_PARAMS.values())
assert D24_PARAMS["total"] == 1_384_122_122


def load_parser():
    spec = importlib.util.spec_from_file_location("parse_train_log", PARSER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_log(n_embd=1536, params=D24_PARAMS, iterations=5568, batch=1_048_576,
                  horizon="Calculated number of iterations from target data:param ratio",
                  val_bpbs=(3.2, 0.81234, 0.71854), core=0.2626, extra_params=()):
    """A base_train stdout in the printed formats of the spec; the last val bpb and CORE are final."""
    config = dict(sequence_len=2048, vocab_size=32768, n_layer=24, n_head=n_embd // 128,
                  n_kv_head=n_embd // 128, n_embd=n_embd, window_pattern="SSSL")
    lines = ["Autodetected device type: cuda",
             "GPU: NVIDIA H100 80GB HBM3 | Peak FLOPS (BF16): 9.89e+14",
             "COMPUTE_DTYPE: torch.bfloat16 (auto-detected: CUDA SM 90 (bf16 supported))",
             f"Vocab size: {32768:,}",
             "Model config:\n" + json.dumps(config, indent=2),
             "Parameter counts:"]
    lines += [f"{key:24s}: {value:,}" for key, value in list(params.items())[:-1] + list(extra_params)]
    lines += [f"{'total':24s}: {params['total'] + sum(v for _, v in extra_params):,}",
              f"Estimated FLOPs per token: {4.775e9:e}",
              f"Auto-computed optimal batch size: {batch:,} tokens",
              f"{horizon}: {iterations:,}",
              f"Total number of training tokens: {iterations * batch:,}",
              f"Tokens / micro-batch / rank: 16 x 2048 = {16 * 2048:,}",
              f"Tokens / micro-batch: {16 * 2048 * 8:,}",
              f"Total batch size {batch:,} => gradient accumulation steps: 4"]
    for i, bpb in enumerate(val_bpbs):
        step = i * iterations // max(len(val_bpbs) - 1, 1)
        lines.append(f"step {step:05d}/{iterations:05d} ({100 * step / iterations:.2f}%) | loss: 3.123456 | "
                     f"lrm: 1.00 | dt: 1234.56ms | tok/sec: {850_000:,} | bf16_mfu: 55.10 | epoch: 1 pq: 0 rg: 3 | "
                     f"total time: 1.00m")
        lines.append(f"Step {step:05d} | Validation bpb: {bpb:.6f}")
    if core is not None:
        lines.append(f"Step {iterations:05d} | CORE metric: {core:.4f}")
    lines += ["Peak memory usage: 70123.45MiB", "Total training time: 99.00m",
              f"Minimum validation bpb: {min(val_bpbs):.6f}"]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Static checks

@pytest.mark.parametrize("name", SCRIPTS)
def test_shell_syntax(name):
    result = subprocess.run(["bash", "-n", str(REPO / "runs" / name)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_use_our_flags_and_honour_base_dir(name):
    text = (REPO / "runs" / name).read_text()
    assert 'NANOCHAT_BASE_DIR="${NANOCHAT_BASE_DIR:-$HOME/.cache/nanochat}"' in text
    assert "export OMP_NUM_THREADS=1" in text
    assert "download.pytorch.org" not in text  # torch comes from PyPI
    assert "Number of parameters" not in text and "scaling:" not in text  # long gone from the log (weak spot 12)


# every `python -m <our module>` and `torchrun ... -m <our module> -- ...` in runs/*.sh, with its argv
COMMAND = re.compile(r"\b(python3?|torchrun)\b.*\s-m\s+(scripts|nanochat)\.")
SHELL_OPERATORS = {"|", "||", "&&", ";", "&", "then", "do"}


def run_commands(text):
    """[(line number, launcher argv, module, module argv)] of the module commands in a shell script.
    Continued lines are joined; a word starting with # ends the line (a comment, as in bash); the
    command ends at a pipe, list operator or redirection. Shell expansions stay in the words as written."""
    commands, pending, first = [], "", 0
    for number, line in enumerate(text.split("\n"), 1):
        if line.endswith("\\"):
            pending, first = pending + line[:-1] + " ", first or number
            continue
        line, number, pending, first = pending + line, first or number, "", 0
        if line.lstrip().startswith("#") or not COMMAND.search(line):
            continue
        lexer = shlex.shlex(line, posix=True)
        lexer.whitespace_split, lexer.commenters = True, ""
        words = []
        for word in lexer:
            if word.startswith("#") or word in SHELL_OPERATORS or re.match(r"\d*>", word):
                break
            words.append(word)
        start = next(i for i, word in enumerate(words) if word in ("python", "python3", "torchrun"))
        m = words.index("-m", start)
        argv = words[m + 2:]
        if words[start] == "torchrun" and argv[:1] == ["--"]:
            argv = argv[1:]  # torchrun drops the `--` before the script's own arguments
        commands.append((number, words[start:m + 2], words[m + 1], argv))
    return commands


def example_value(action):
    """A value the flag's type accepts, for a value the shell fills in ($DEPTH, "${WANDB_RUN}_d${d}")."""
    if action is not None and action.default is not None and not isinstance(action.default, (bool, list)):
        return str(action.default)
    return action.choices[0] if action is not None and action.choices else "1"


def parse_with(parser, argv, prog):
    """parser.parse_args(argv) with whole flag names only (no abbreviations) and shell expansions
    replaced by example values; a flag it lacks or a value it refuses fails the test with argparse's line."""
    parser.prog, parser.allow_abbrev = prog, False
    actions, concrete = parser._option_string_actions, []
    for i, word in enumerate(argv):
        flag, eq, _ = word.partition("=")
        if "$" in word and eq:
            word = f"{flag}={example_value(actions.get(flag))}"
        elif "$" in word:
            word = example_value(actions.get(argv[i - 1]))
        concrete.append(word)
    try:
        return parser.parse_args(concrete)
    except SystemExit:
        pytest.fail(f"{parser.prog} refuses {shlex.join(argv)}")


RUN_COMMANDS = [(f"{name}:{number}", launcher, module, argv)
                for name in sorted(p.name for p in (REPO / "runs").glob("*.sh"))
                for number, launcher, module, argv in run_commands((REPO / "runs" / name).read_text())]


@pytest.mark.parametrize("where, launcher, module, argv", RUN_COMMANDS, ids=[c[0] for c in RUN_COMMANDS])
def test_run_scripts_pass_only_flags_their_modules_accept(where, launcher, module, argv, monkeypatch, capsys):
    # only runcpu.sh runs in the tests; a renamed flag would otherwise stop an 8xH100 run minutes in
    if launcher[0] == "torchrun":
        from torch.distributed.run import get_args_parser
        parse_with(get_args_parser(), launcher[1:] + argv, f"{where}: torchrun")
    m = importlib.import_module(module)
    if module == "nanochat.report":  # its parser lives in main(): run main with the report stubbed out
        calls = []
        monkeypatch.setattr(m, "get_report", lambda: SimpleNamespace(reset=lambda: calls.append("reset"),
                                                                     generate=lambda: calls.append("gen")))
        try:
            m.main(argv)
        except SystemExit:
            pytest.fail(f"{where}: {module} refuses {shlex.join(argv)}: {capsys.readouterr().err}")
        assert len(calls) == 1
    else:
        parse_with(m.build_parser(), argv, f"{where}: {module}")


def test_every_stage_of_the_run_scripts_is_checked():
    found = {(where.split(":")[0], module) for where, _, module, _ in RUN_COMMANDS}
    stages = {"scripts.tok_train", "scripts.tok_eval", "scripts.base_train", "scripts.base_eval",
              "scripts.chat_sft", "scripts.chat_eval", "nanochat.dataset", "nanochat.report"}
    assert {module for name, module in found if name == "speedrun.sh"} == stages
    assert {module for name, module in found if name == "runcpu.sh"} == stages | {"scripts.chat_cli"}
    assert {("miniseries.sh", "scripts.base_train"), ("scaling_laws.sh", "scripts.base_train")} <= found
    # continued lines are read to their end
    speedrun = {module: argv for where, _, module, argv in RUN_COMMANDS if where.startswith("speedrun")}
    assert speedrun["scripts.base_train"][-2:] == ["--fp8", "--run=$WANDB_RUN"]


def test_a_misspelt_or_unknown_flag_fails_the_check():
    script = 'echo\ntorchrun --standalone -m scripts.base_train -- \\\n  --depth="$d" --targt-flops=1 | tee x'
    [(number, launcher, module, argv)] = run_commands(script)
    assert number == 2 and launcher == ["torchrun", "--standalone", "-m", "scripts.base_train"]
    assert module == "scripts.base_train" and argv == ["--depth=$d", "--targt-flops=1"]
    parser = importlib.import_module(module).build_parser()
    with pytest.raises(pytest.fail.Exception, match="targt-flops"):
        parse_with(parser, argv, "base_train")
    with pytest.raises(pytest.fail.Exception, match="--target-fl "):  # an abbreviation is not a flag's name
        parse_with(parser, ["--target-fl", "1"], "base_train")


def quick_start_calls(tmp_path, **env):
    """runcpu.sh run with stand-ins for uv and python (which records its arguments): {module: argv}."""
    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    shutil.copytree(REPO / "runs", repo / "runs")
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "activate").write_text("")
    bin_dir.mkdir()
    for name, body in {"uv": "exit 0", "python": f'printf "%q " "$@" >> "{tmp_path}/calls"; echo >> '
                                                 f'"{tmp_path}/calls"'}.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", NANOCHAT_BASE_DIR=str(tmp_path / "base"),
               OMP_NUM_THREADS="1", **env)
    result = subprocess.run(["bash", "runs/runcpu.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = [shlex.split(line) for line in (tmp_path / "calls").read_text().splitlines()]
    return {argv[1]: argv[2:] for argv in calls if argv[:1] == ["-m"]}


def test_the_quick_start_evaluates_and_finetunes_the_steps_it_just_trained(tmp_path):
    # each stage reads its flags with its own parser; a base dir holding a longer earlier run (larger
    # steps) must not be what base_eval, chat_sft, chat_eval and chat_cli load
    calls = quick_start_calls(tmp_path, BASE_STEPS="7", SFT_STEPS="3")
    args = {}
    for name, argv in calls.items():
        if name.startswith("scripts."):
            m = importlib.import_module(name)
            args[name] = m.parse_args(argv) if hasattr(m, "parse_args") else m.build_parser().parse_args(argv)
    assert args["scripts.base_train"].num_iterations == 7 == args["scripts.base_eval"].step
    assert args["scripts.chat_sft"].model_step == 7 and args["scripts.chat_sft"].num_iterations == 3
    assert args["scripts.chat_eval"].step == 3 == args["scripts.chat_cli"].step


# -----------------------------------------------------------------------------
# The log parser

def test_parser_reads_the_speedrun_log():
    fields = load_parser().parse_train_log(synthetic_log())
    assert fields["model_dim"] == 1536
    assert fields["params_wte"] == 50_331_648 and fields["params_value_embeds"] == 603_979_776
    assert fields["params_transformer"] == 679_478_976 and fields["params_scalars"] == 74
    assert fields["num_params"] == fields["params_total"] == 1_384_122_122
    assert fields["num_scaling_params"] == 729_810_624
    assert fields["num_iterations"] == 5568 and fields["total_batch_size"] == 1_048_576
    assert fields["tokens_trained"] == 5568 * 1_048_576  # from the printed batch, not a hard-coded 524288
    assert fields["param_data_ratio"] == 8.0  # the speedrun's --target-param-data-ratio=8
    assert fields["val_bpb"] == 0.71854 and fields["core_score"] == 0.2626  # last, not minimum


@pytest.mark.parametrize("horizon", ["Using user-provided number of iterations",
                                     "Calculated number of iterations from target FLOPs"])
def test_parser_reads_every_horizon_line(horizon):
    fields = load_parser().parse_train_log(synthetic_log(n_embd=1664, iterations=12_345, batch=524_288,
                                                         horizon=horizon))
    assert fields["num_iterations"] == 12_345 and fields["tokens_trained"] == 12_345 * 524_288
    assert fields["model_dim"] == 1664


def test_parser_tolerates_l3_lines_and_missing_core():
    fields = load_parser().parse_train_log(synthetic_log(core=None, extra_params=[("l3_embeds", 1000)]))
    assert fields["params_l3_embeds"] == 1000 and fields["params_total"] == D24_PARAMS["total"] + 1000
    assert fields["core_score"] is None


def test_parser_cli_csv_row_and_failures(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(synthetic_log(core=None))
    columns = "model_dim,num_iterations,tokens_trained,val_bpb,core_score"
    result = subprocess.run([sys.executable, str(PARSER), str(log), f"--columns={columns}"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"1536,5568,{5568 * 1_048_576},0.71854,\n"
    assert "core_score" in result.stderr  # missing CORE: warned about and left empty
    log.write_text("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\n")
    result = subprocess.run([sys.executable, str(PARSER), str(log)], capture_output=True, text=True)
    assert result.returncode == 1 and "num_iterations" in result.stderr


# -----------------------------------------------------------------------------
# The sweep scripts with a stand-in torchrun

def sweep_sandbox(tmp_path, failing_depth):
    """A repo copy holding only runs/, a bin dir with a fake torchrun and python, and a base dir."""
    repo = tmp_path / "repo"
    shutil.copytree(REPO / "runs", repo / "runs")
    logs = tmp_path / "logs"
    logs.mkdir()
    for depth in range(10, 27, 2):
        width = -(-depth * 64 // 128) * 128
        (logs / f"d{depth}.log").write_text(synthetic_log(n_embd=width, iterations=100 * depth, batch=524_288))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "torchrun": f"""#!/bin/bash
echo "$*" >> "{tmp_path}/torchrun_calls"
for arg in "$@"; do case "$arg" in --depth=*) depth="${{arg#--depth=}}";; esac; done
[ "$depth" = "{failing_depth}" ] && {{ echo "CUDA out of memory"; exit 1; }}
cat "{logs}/d$depth.log"
""",
        "python": f'#!/bin/sh\nexec "{sys.executable}" "$@"\n',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "SERIES_NAME", "WANDB_RUN", "LABEL")}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", NANOCHAT_BASE_DIR=str(tmp_path / "base"),
               SKIP_SETUP="1", NPROC_PER_NODE="2")
    return repo, env


def read_csv(path):
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    return header, [dict(zip(header, line.split(","))) for line in lines[1:]]


def test_miniseries_records_one_row_per_depth(tmp_path):
    repo, env = sweep_sandbox(tmp_path, failing_depth=14)
    result = subprocess.run(["bash", "runs/miniseries.sh", "testseries"], cwd=repo, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 1 and "Failed: d14" in result.stdout  # the others still ran
    header, rows = read_csv(tmp_path / "base" / "testseries_miniseries_results" / "results.csv")
    assert header == ["depth", "model_dim", "num_params", "num_scaling_params", "num_iterations",
                      "tokens_trained", "param_data_ratio", "val_bpb", "core_score", "train_time_sec"]
    assert [r["depth"] for r in rows] == ["12", "16", "18", "20", "22", "24", "26"]
    d26 = rows[-1]
    assert d26["model_dim"] == "1664" and d26["num_iterations"] == "2600"
    assert d26["tokens_trained"] == str(2600 * 524_288) and d26["val_bpb"] == "0.71854"
    assert d26["core_score"] == "0.2626" and d26["num_scaling_params"] == "729810624"
    calls = (tmp_path / "torchrun_calls").read_text().splitlines()
    assert "--nproc_per_node=2 -m scripts.base_train -- --depth=20 --run=testseries_miniseries_d20 " \
           "--model-tag=testseries_miniseries_d20" in calls[4]
    assert calls[4].endswith("--device-batch-size=16") and calls[0].endswith("--device-batch-size=32")


def test_scaling_laws_records_and_resumes(tmp_path):
    repo, env = sweep_sandbox(tmp_path, failing_depth=None)
    env["LABEL"] = "test"
    result = subprocess.run(["bash", "runs/scaling_laws.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    results = tmp_path / "base" / "scaling_laws_results_test" / "results.csv"
    header, rows = read_csv(results)
    assert header[:3] == ["flops_budget", "depth", "model_dim"] and header[-1] == "train_time_sec"
    assert [(r["flops_budget"], r["depth"]) for r in rows][:7] == [
        ("1e18", "10"), ("1e18", "12"), ("1e18", "14"), ("1e18", "16"), ("1e18", "18"), ("1e18", "20"),
        ("2.15e18", "10")]
    assert len(rows) == 24 and rows[0]["model_dim"] == "640" and rows[0]["params_scalars"] == "74"
    assert "--target-flops=2.15e18 --target-param-data-ratio=-1" in (tmp_path / "torchrun_calls").read_text()

    # a re-run skips every (budget, depth) pair already recorded
    (tmp_path / "torchrun_calls").unlink()
    result = subprocess.run(["bash", "runs/scaling_laws.sh"], cwd=repo, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and not (tmp_path / "torchrun_calls").exists()
    assert len(read_csv(results)[1]) == 24
