import datetime
import os
import re
import struct
import subprocess
import sys
import types

import pytest
import torch

from nanochat import report as R

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TS_RE = re.compile(r"^timestamp: (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$", re.M)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A temp base dir and a separate temp cwd (not a git checkout); no DDP variables."""
    base, work = tmp_path / "base", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(base))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(work)
    return types.SimpleNamespace(base=base, work=work, report_dir=base / "report")


@pytest.fixture
def rep(env):
    return R.Report(str(env.report_dir))


def set_line(path, prefix, value):
    """Rewrite the first line starting with prefix to '<prefix> <value>' (to pin timestamps)."""
    text = open(path, encoding="utf-8").read()
    new, n = re.subn(rf"^{re.escape(prefix)}.*$", f"{prefix} {value}", text, count=1, flags=re.M)
    assert n == 1
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)


def no_temp_files(directory):
    return not [n for n in os.listdir(directory) if n.endswith(".tmp")]


# -----------------------------------------------------------------------------
# log

def test_constructor_creates_dir_and_slugify(env):
    assert not env.report_dir.exists()
    R.Report(str(env.report_dir))
    assert env.report_dir.is_dir()
    assert R.slugify("Base model training") == "base-model-training"
    assert R.slugify("Chat evaluation sft") == "chat-evaluation-sft"
    assert R.slugify("SFT") == "sft"


def test_log_formats_items(rep, env):
    before = datetime.datetime.now().replace(microsecond=0)
    path = rep.log("My Section", [
        {"lr": 0.123456, "neg": -2.5, "big": 1234567, "huge": 2**60 + 1, "edge": 10000, "small": 9999,
         "flag": True, "off": False, "none": None, "name": "d12"},
        "a verbatim string without newline",
        None, {}, "", 0,
        "second string\n",
        {"after": 3},
    ])
    after = datetime.datetime.now()
    assert path == str(env.report_dir / "my-section.md")
    text = open(path, encoding="utf-8").read()
    ts = TS_RE.search(text)
    assert ts and before <= datetime.datetime.strptime(ts.group(1), R.TIMESTAMP_FORMAT) <= after
    expected = (
        "## My Section\n"
        f"timestamp: {ts.group(1)}\n"
        "\n"
        "- lr: 0.1235\n"
        "- neg: -2.5000\n"
        "- big: 1,234,567\n"
        "- huge: 1,152,921,504,606,846,977\n"  # exact: no detour through a float
        "- edge: 10,000\n"
        "- small: 9999\n"
        "- flag: True\n"
        "- off: False\n"
        "- none: None\n"
        "- name: d12\n"
        "a verbatim string without newlinesecond string\n"
        "- after: 3\n"
        "\n"
    )
    assert text == expected


def test_log_overwrites_its_own_section(rep, env):
    rep.log("Stage", [{"first": 1}])
    rep.log("Other", [{"x": 1}])
    rep.log("Stage", [{"second": 2}])
    text = (env.report_dir / "stage.md").read_text()
    assert "- second: 2" in text and "first" not in text
    assert (env.report_dir / "other.md").read_text().count("- x: 1") == 1


def test_failed_log_keeps_previous_file_and_leaves_no_temp(rep, env):
    class Boom:
        def __str__(self):
            raise RuntimeError("cannot format")

    path = rep.log("Stage", [{"ok": 1}])
    old = open(path).read()
    with pytest.raises(RuntimeError):
        rep.log("Stage", [{"bad": Boom()}])
    assert open(path).read() == old
    assert no_temp_files(env.report_dir)


# -----------------------------------------------------------------------------
# parsing helpers

def test_extract():
    section = ("## Chat evaluation sft\ntimestamp: 2025-01-01 00:00:00\n\n"
               "- ARC-Easy: 0.5\n- MMLU: 0.3: extra\n- ARC-Easy: 0.7\nno colon ARC-Easy\n")
    assert R.extract(section, ["ARC-Easy", "MMLU", "GSM8K"]) == {"ARC-Easy": "0.7", "MMLU": "0.3"}
    assert R.extract(section, "MMLU") == {"MMLU": "0.3"}


def test_extract_timestamp():
    content = "Run started: not a date\nRun started: 2025-03-04 05:06:07\nRun started: 2026-01-01 00:00:00\n"
    assert R.extract_timestamp(content, "Run started:") == datetime.datetime(2025, 3, 4, 5, 6, 7)
    assert R.extract_timestamp(content, "timestamp:") is None


# -----------------------------------------------------------------------------
# generate

def test_generate_without_header_or_sections(rep, env, capsys):
    path = rep.generate()
    out = capsys.readouterr().out
    assert path == str(env.report_dir / "report.md")
    assert f"Generating report to {path}" in out
    assert "does not exist. Did you forget to run `nanochat reset`?" in out
    for name in R.EXPECTED_FILES:
        assert f"Warning: {env.report_dir / name} does not exist, skipping" in out
    text = open(path).read()
    assert text.startswith("## Summary\n\n[bloat data missing]\n\n"
                           "| Metric          | BASE     | SFT      | RL       |\n")
    assert "|-----------------|----------|----------|----------|\n" in text
    assert text.endswith("\nTotal wall clock time: unknown\n")


def test_generate_with_some_sections_missing(rep, env, capsys):
    rep.log("Tokenizer training", [{"vocab_size": 32768}])
    rep.log("Base model evaluation", [{"CORE": 0.25}])
    text = open(rep.generate()).read()
    out = capsys.readouterr().out
    assert "## Tokenizer training" in text and "- vocab_size: 32,768" in text
    assert text.index("## Tokenizer training") < text.index("## Base model evaluation") < text.index("## Summary")
    assert f"{env.report_dir / 'base-model-training.md'} does not exist, skipping" in out
    assert "tokenizer-training.md does not exist" not in out
    assert "| CORE            | 0.2500   | -        | -        |" in text


def test_a_damaged_section_or_header_is_skipped_with_a_warning_and_the_report_still_written(rep, env, capsys):
    rep.reset()
    rep.log("Tokenizer training", [{"vocab_size": 32768}])
    rep.log("Base model evaluation", [{"CORE": 0.25}])
    garbage = b"\x89\xb3\xff\x00binary garbage"
    (env.report_dir / "tokenizer-training.md").write_bytes(garbage)
    (env.report_dir / "header.md").write_bytes(garbage)
    text = open(rep.generate(), encoding="utf-8").read()
    out = capsys.readouterr().out
    for name in ("tokenizer-training.md", "header.md"):
        assert f"Warning: {env.report_dir / name} is not UTF-8 text" in out
    assert "vocab_size" not in text and "| CORE            | 0.2500   | -        | -        |" in text
    assert text.startswith("## Base model evaluation") and "[bloat data missing]" in text


def test_summary_table_order_and_values(rep):
    rep.log("Base model evaluation", [{"model": "d12", "CORE": 0.2219}])
    rep.log("Chat evaluation sft", [
        {"source": "sft", "max_new_tokens": 512},
        {"MMLU": 0.3, "ARC-Easy": 0.5, "HumanEval": 0.06, "GSM8K": 0.05, "ARC-Challenge": 0.4},
        {"ChatCORE metric": 0.25},
    ])
    rep.log("Chat evaluation rl", [{"source": "rl"}, {"GSM8K": 0.1}])
    text = open(rep.generate()).read()
    table = text[text.index("| Metric"):].split("\n\n")[0].splitlines()
    assert table[0] == "| Metric          | BASE     | SFT      | RL       |"
    assert table[1] == "|-----------------|----------|----------|----------|"
    assert [row.split("|")[1].strip() for row in table[2:]] == \
        ["CORE", "ARC-Challenge", "ARC-Easy", "GSM8K", "HumanEval", "MMLU", "ChatCORE"]
    rows = {row.split("|")[1].strip(): row for row in table[2:]}
    assert rows["CORE"] == "| CORE            | 0.2219   | -        | -        |"
    assert rows["GSM8K"] == "| GSM8K           | -        | 0.0500   | 0.1000   |"
    assert rows["ChatCORE"] == "| ChatCORE        | -        | 0.2500   | -        |"
    assert rows["HumanEval"] == "| HumanEval       | -        | 0.0600   | -        |"


def test_wall_clock_from_header_and_section_timestamps(rep, env, capsys):
    rep.reset()
    set_line(env.report_dir / "header.md", "Run started:", "2025-01-01 10:00:00")
    for section, ts in [("Tokenizer training", "2025-01-01 10:20:00"),
                        ("Chat evaluation sft", "2025-01-01 13:45:59"),
                        ("Base model training", "2025-01-01 13:00:00"),
                        ("Chat RL", "2025-01-02 09:00:00"),              # RL sections do not count
                        ("Chat evaluation rl", "2025-01-02 10:00:00")]:
        set_line(rep.log(section, [{"k": 1}]), "timestamp:", ts)
    text = open(rep.generate()).read()
    # end = the last non-RL section in report order (chat-evaluation-sft), not the latest timestamp
    assert text.endswith("\nTotal wall clock time: 3h45m\n")
    assert "\nRun started: 2025-01-01 10:00:00\n" in text


def test_generate_copies_report_to_cwd(rep, env, capsys):
    rep.reset()
    rep.log("Base model training", [{"step": 10}])
    path = rep.generate()
    assert "Copying report.md to current directory for convenience" in capsys.readouterr().out
    copy = env.work / "report.md"
    assert copy.read_text() == open(path).read()
    assert no_temp_files(env.report_dir) and no_temp_files(env.work)
    # the header (Bloat block) is carried into the summary
    bloat = re.search(r"### Bloat\n(.*?)\n\n", copy.read_text(), re.S).group(1)
    assert f"## Summary\n\n{bloat}\n\n| Metric" in copy.read_text()


def test_reset_removes_only_expected_files(rep, env, capsys):
    keep = ["notes.md", "base-model-loss.png", "custom-section.md"]
    drop = R.EXPECTED_FILES + ["sft.md", "report.md"]
    for name in keep + drop:
        (env.report_dir / name).write_text("old\n")
    rep.reset()
    header_path = env.report_dir / "header.md"
    assert f"Reset report and wrote header to {header_path}" in capsys.readouterr().out
    assert sorted(os.listdir(env.report_dir)) == sorted(keep + ["header.md"])
    header = header_path.read_text()
    assert header.startswith("# nanochat training report\n\nGenerated: ")
    assert header.endswith("\n\n---\n\n")
    started = R.extract_timestamp(header, "Run started:")
    assert started is not None and abs((datetime.datetime.now() - started).total_seconds()) < 120


def test_reset_removes_the_plots_its_sections_embed_and_no_other_file(rep, env):
    curve = {"steps": [0, 1], "train": [2.0, 1.0]}
    rep.log_curve("Base model loss", curve)
    rep.log("Chat RL", [rep.curve_image("chat-rl-curves", curve)])
    rep.log("Base model evaluation", [rep.bar_chart_image("base-model-core-tasks", {"a": 0.1}, "x", "CORE")])
    outside = env.base / "outside.png"  # linked by a section, but not in the report dir
    rep.log("SFT", [f"![a](../outside.png)\n\n![b]({outside})\n\n"])
    (env.report_dir / "custom-section.md").write_text("![mine](mine.png)\n")  # not a report section
    for name in ("mine.png", "notes.png", "../outside.png"):
        (env.report_dir / name).write_bytes(PNG_SIGNATURE)
    rep.reset()
    assert sorted(os.listdir(env.report_dir)) == ["custom-section.md", "header.md", "mine.png", "notes.png"]
    assert outside.exists()


def test_sft_section_reaches_report(rep):
    rep.log("Base model evaluation", [{"CORE": 0.2}])
    rep.log("SFT", [{"Number of iterations": 700, "Minimum validation bpb": 0.42}])
    rep.log("Chat evaluation sft", [{"GSM8K": 0.05}])
    text = open(rep.generate()).read()
    assert "## SFT\n" in text and "- Minimum validation bpb: 0.4200" in text
    assert text.index("## Base model evaluation") < text.index("## SFT\n") < text.index("## Chat evaluation sft")


# -----------------------------------------------------------------------------
# loss curve

def count_near(img, rgb, tol=0.04):
    return int((abs(img[..., :3] - torch.tensor(rgb)).max(dim=-1).values < tol).sum())


def test_log_curve_writes_png_and_embeds_it(rep, env):
    from matplotlib.image import imread

    steps = list(range(0, 200, 10))
    train = [4.0 * 0.9 ** (i / 10) for i in steps]
    val = [t + 0.1 if i % 50 == 0 else None for i, t in zip(steps, train)]  # sparse curve
    png = rep.log_curve("Base model loss", {"steps": steps, "train": train, "val": val})
    assert png == str(env.report_dir / "base-model-loss.png")
    data = open(png, "rb").read()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (800, 450)
    assert len(data) > 10_000
    img = torch.from_numpy(imread(png))
    assert img.shape[:2] == (450, 800)
    # both curves were drawn in matplotlib's first two default colours
    assert count_near(img, (0x1F / 255, 0x77 / 255, 0xB4 / 255)) > 200
    assert count_near(img, (0xFF / 255, 0x7F / 255, 0x0E / 255)) > 200  # more than the legend sample
    md = (env.report_dir / "base-model-loss.md").read_text()
    assert md.startswith("## Base model loss\ntimestamp: ")
    assert "![loss curve](base-model-loss.png)\n" in md
    assert f"- train loss (last): {train[-1]:.4f}" in md and f"- val loss (min): {min(v for v in val if v):.4f}" in md
    assert no_temp_files(env.report_dir)

    rep.log("Base model training", [{"x": 1}])
    rep.log("Base model evaluation", [{"CORE": 0.1}])
    text = open(rep.generate()).read()
    assert "![loss curve](base-model-loss.png)" in text
    order = [text.index(f"## Base model {s}") for s in ("training", "loss", "evaluation")]
    assert order == sorted(order)
    # the copy in the cwd links the image by absolute path, so it still renders there
    copy = (env.work / "report.md").read_text()
    assert f"![loss curve]({env.report_dir / 'base-model-loss.png'})" in copy


def test_log_curve_rejects_mismatched_lengths(rep, env):
    with pytest.raises(ValueError, match="val"):
        rep.log_curve("Base model loss", {"steps": [0, 1, 2], "train": [3.0, 2.0, 1.0], "val": [1.0]})
    assert not (env.report_dir / "base-model-loss.png").exists()


UNITS = {"train loss": "train loss (nats/token)", "val bpb": "val bpb (bits/byte)"}


def test_curve_figure_puts_each_unit_on_its_own_panel():
    series = {"train loss": [3.0, 2.5, None, 2.0], "val bpb": [1.2, None, float("nan"), 1.0]}
    fig = R.curve_figure([0, 1, 2, 3], series, UNITS, "step", "Base model loss")
    axes = fig.get_axes()
    assert [ax.get_ylabel() for ax in axes] == ["train loss (nats/token)", "val bpb (bits/byte)"]
    assert axes[-1].get_xlabel() == "step" and axes[0].get_title() == "Base model loss"
    [train], [val] = axes[0].get_lines(), axes[1].get_lines()
    assert (train.get_label(), val.get_label()) == ("train loss", "val bpb")
    assert [list(map(float, data)) for data in train.get_data()] == [[0, 1, 3], [3.0, 2.5, 2.0]]
    assert [list(map(float, data)) for data in val.get_data()] == [[0, 3], [1.2, 1.0]]
    one_axis = R.curve_figure([0, 1], {"a": [1, 2], "b": [2, 1]}, {"a": "loss", "b": "loss"}, "step", "t")
    assert len(one_axis.get_axes()) == 1 and len(one_axis.get_axes()[0].get_lines()) == 2


def test_log_curve_with_units_writes_a_panel_per_unit_and_names_the_stats_by_curve(rep, env):
    curve = {"steps": [0, 1, 2], "train loss": [3.0, 2.0, 2.5], "val bpb": [1.5, None, 1.2]}
    png = rep.log_curve("Base model loss", curve, UNITS)
    data = open(png, "rb").read()
    assert data[:8] == PNG_SIGNATURE and struct.unpack(">II", data[16:24]) == (800, 550)  # two panels high
    md = (env.report_dir / "base-model-loss.md").read_text()
    assert "![curves curve](base-model-loss.png)\n" in md
    assert "- train loss (last): 2.5000\n- train loss (min): 2.0000\n" in md
    assert "- val bpb (last): 1.2000\n- val bpb (min): 1.2000\n" in md


def test_record_point_keeps_every_series_aligned_with_the_steps():
    curve = {}
    R.record_point(curve, 0, {"val bpb": 1.5})
    R.record_point(curve, 0, {"train loss": 3.0})
    assert R.record_point(curve, 1, {"train loss": 2.0}) is curve
    assert curve == {"steps": [0, 1], "val bpb": [1.5, None], "train loss": [3.0, 2.0]}
    R.record_point(curve, 2, {"val bpb": 1.25})
    R.record_point(curve, 2, {"val bpb": 1.25})  # a resumed run evaluates its first step again
    assert curve == {"steps": [0, 1, 2], "val bpb": [1.5, None, 1.25], "train loss": [3.0, 2.0, None]}


def test_curve_image_embeds_its_png_and_draws_nothing_without_steps(rep, env):
    assert rep.curve_image("chat-sft-curves", {}) == ""
    assert not (env.report_dir / "chat-sft-curves.png").exists()
    curve = R.record_point(R.record_point({}, 0, {"train loss": 2.0}), 1, {"val bpb": 1.0})
    markdown = rep.curve_image("chat-sft-curves", curve, UNITS, title="SFT")
    assert markdown == "![curves curve](chat-sft-curves.png)\n\n"
    assert open(env.report_dir / "chat-sft-curves.png", "rb").read()[:8] == PNG_SIGNATURE
    with pytest.raises(ValueError, match="val bpb"):
        rep.curve_image("bad", {"steps": [0, 1], "val bpb": [1.0]})


def test_bar_chart_of_core_tasks_and_the_summary_still_reads_core(rep, env):
    centered = {"hellaswag": 0.3, "arc_easy": -0.1, "lambada": 0.05}
    fig = R.bar_figure(centered, "centered accuracy", "CORE, d20")
    [ax] = fig.get_axes()
    assert [bar.get_width() for bar in ax.patches] == pytest.approx([0.3, -0.1, 0.05])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["hellaswag", "arc_easy", "lambada"]
    assert ax.get_xlabel() == "centered accuracy" and ax.get_title() == "CORE, d20"
    chart = rep.bar_chart_image("base-model-core-tasks", centered, "centered accuracy", "CORE, d20")
    assert chart == "![base-model-core-tasks](base-model-core-tasks.png)\n\n"
    assert open(env.report_dir / "base-model-core-tasks.png", "rb").read()[:8] == PNG_SIGNATURE
    rep.log("Base model evaluation", [{"model": "d20", "CORE metric": 0.25}, centered, chart])
    text = open(rep.generate()).read()
    assert "![base-model-core-tasks](base-model-core-tasks.png)" in text
    assert re.search(r"^\| CORE +\| 0\.2500 ", text, re.M)


# -----------------------------------------------------------------------------
# entry points

def test_get_report_depends_on_rank(env, monkeypatch):
    r = R.get_report()
    assert isinstance(r, R.Report) and r.report_dir == os.path.join(str(env.base), "report")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert isinstance(R.get_report(), R.DummyReport)
    monkeypatch.setenv("RANK", "0")
    assert isinstance(R.get_report(), R.Report)


def test_dummy_report_is_noop(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    d = R.DummyReport()
    assert d.log("X", [{"a": 1}]) is None
    assert d.log_curve("Y", {"steps": [0], "a": [1.0]}) is None
    assert d.curve_image("y", {"steps": [0], "a": [1.0]}) == "" and d.bar_chart_image("y", {"a": 1}, "x", "t") == ""
    assert d.reset() is None and d.generate() is None
    assert os.listdir(tmp_path) == []


def test_cli(env, capsys):
    R.main(["reset"])
    assert (env.report_dir / "header.md").exists()
    R.main([])  # default: generate
    assert "Generating report to" in capsys.readouterr().out
    assert (env.work / "report.md").read_text().startswith("# nanochat training report")
    with pytest.raises(SystemExit):
        R.main(["bogus"])
    # one real `python -m` run, to check the module entry point
    (env.work / "report.md").unlink()
    child_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    child_env.update(PYTHONPATH=REPO_ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "nanochat.report", "generate"], cwd=env.work, env=child_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert f"Generating report to {env.report_dir / 'report.md'}" in proc.stdout
    assert (env.work / "report.md").exists()


# -----------------------------------------------------------------------------
# header and environment probes

def test_run_command():
    assert R.run_command("echo hi") == "hi"
    assert R.run_command("true") == ""
    assert R.run_command("exit 3") is None
    assert R.run_command("echo partial; exit 1") == "partial"


def test_a_probe_that_hangs_or_cannot_start_is_unknown_not_fatal(monkeypatch):
    def run(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"])  # e.g. nvidia-smi stuck on a dead GPU
    monkeypatch.setattr(R.subprocess, "run", run)
    assert R.run_command("nvidia-smi") is None


def test_the_copy_in_the_cwd_points_only_existing_relative_images_at_their_absolute_paths(tmp_path):
    (tmp_path / "loss.png").write_bytes(b"png")
    markdown = "![loss](loss.png) ![gone](missing.png) ![web](https://example.com/a.png)"
    assert R._absolute_image_links(markdown, str(tmp_path)) == (
        f"![loss]({tmp_path / 'loss.png'}) ![gone](missing.png) ![web](https://example.com/a.png)")


def test_header_outside_git_checkout(env):
    header = R.generate_header()
    lines = header.split("\n")
    assert lines[:2] == ["# nanochat training report", ""]
    assert lines[2].startswith("Generated: ")
    assert lines[3:7] == ["", "## Environment", "", "### Git Information"]
    assert lines[7:10] == ["- Branch: unknown", "- Commit: unknown (clean)", "- Message: "]
    assert "### Hardware\n- Platform: " in header and "logical)\n- Memory: " in header
    if not torch.cuda.is_available():
        assert "- GPUs: None available\n" in header and "Hourly Rate" not in header
    assert f"### Software\n- Python: {sys.version.split()[0]}\n- PyTorch: {torch.__version__}\n" in header
    assert header.endswith("### Bloat\n- Characters: 0\n- Lines: 0\n- Files: 0\n- Tokens (approx): 0\n"
                           "- Dependencies (uv.lock lines): 0\n\n")


def test_header_bloat_counts_tracked_sources(env):
    files = {"a.py": "x = 1\ny = 2\n", "docs/b.md": "# héllo\n", "c.txt": "not counted\n",
             "run.sh": "echo hi", "untracked.py": "zzz\n"}
    for name, text in files.items():
        (env.work / name).parent.mkdir(parents=True, exist_ok=True)
        (env.work / name).write_text(text, encoding="utf-8")
    (env.work / "uv.lock").write_text("l1\nl2\nl3\n")
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "init.defaultBranch=main"]
    subprocess.run(git + ["init", "-q"], cwd=env.work, check=True)
    subprocess.run(git + ["add", "a.py", "docs/b.md", "c.txt", "run.sh"], cwd=env.work, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "first line of message\n\nbody"], cwd=env.work, check=True)

    counted = [files[n] for n in ("a.py", "docs/b.md", "run.sh")]
    chars = sum(len(t) for t in counted)
    header = R.generate_header()
    assert "- Branch: main\n" in header
    assert re.search(r"- Commit: [0-9a-f]{4,} \(dirty\)\n", header)  # untracked.py and uv.lock are untracked
    assert "- Message: first line of message\n" in header
    assert (f"### Bloat\n- Characters: {chars:,}\n- Lines: {sum(t.count(chr(10)) for t in counted)}\n"
            f"- Files: 3\n- Tokens (approx): {chars // 4}\n- Dependencies (uv.lock lines): 3\n\n") in header


def test_gpu_info_and_header_with_simulated_gpus(env, monkeypatch):
    props = types.SimpleNamespace(name="NVIDIA H100 80GB HBM3", total_memory=80 * 1024**3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)
    info = R.get_gpu_info()
    assert info["available"] and info["count"] == 2 and info["names"] == [props.name] * 2
    assert info["memory_gb"] == [80.0, 80.0]
    header = R.generate_header()
    assert f"- GPUs: 2x {props.name}\n- GPU Memory: 160.0 GB total\n- CUDA Version: " in header
    assert "- Hourly Rate: $6.00/hour\n" in header


def test_estimate_cost():
    assert R.estimate_cost({"available": False}) is None
    h100 = {"available": True, "count": 8, "names": ["NVIDIA H100 80GB HBM3"] * 8}
    assert R.estimate_cost(h100) == {"hourly_rate": 24.0, "gpu_type": "H100", "estimated_total": None}
    assert R.estimate_cost(h100, runtime_hours=2.5)["estimated_total"] == pytest.approx(60.0)
    a100 = {"available": True, "count": 2, "names": ["NVIDIA A100-SXM4-80GB"] * 2}
    assert R.estimate_cost(a100)["hourly_rate"] == pytest.approx(3.58)
    other = {"available": True, "count": 1, "names": ["NVIDIA GeForce RTX 4090"]}
    assert R.estimate_cost(other)["hourly_rate"] == 2.0


def test_system_info_uses_base_dir_and_user(env, monkeypatch):
    monkeypatch.setenv("USER", "alice")
    info = R.get_system_info()
    assert info["nanochat_base_dir"] == str(env.base) and info["user"] == "alice"
    assert info["working_dir"] == str(env.work)
    assert info["cpu_count_logical"] >= 1 and info["memory_gb"] > 0
    monkeypatch.delenv("USER")
    assert R.get_system_info()["user"] == "unknown"
