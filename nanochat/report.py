"""
Markdown report cards: every pipeline stage logs one section file into <base_dir>/report/, and
`python -m nanochat.report generate` stitches them, in pipeline order, into report.md with a summary
table and the total wall-clock time.

    python -m nanochat.report reset      # start of a run: clear old sections and their plots, write header.md
    python -m nanochat.report generate   # end of a run: write report.md (also copied to ./report.md)

Files in the report dir:
- header.md: environment facts (git, hardware, software, code size) plus "Run started: <ts>"
- <slug>.md: one per section, slug = section name lower-cased with spaces as dashes; a section is
  rewritten as a whole each time it is logged
- <name>.png: plots (curves, bar charts) embedded by their section file: Report.log_curve writes a section
  around one; curve_image and bar_chart_image return the markdown a section's items embed it with
- report.md: the stitched report
Every file is written atomically (a temp file renamed into place), so a crash mid-write never leaves a
truncated section behind and a concurrent `generate` never reads half a file.

Importing this module does no work; the report dir is created only when a Report is constructed.
"""

import argparse
import contextlib
import datetime
import math
import os
import platform
import re
import socket
import subprocess

import psutil
import torch

from nanochat.common import atomic_open, get_base_dir, get_dist_info

TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"

# Section files in report order (contractual). A name missing on disk is skipped with a warning.
EXPECTED_FILES = [
    "tokenizer-training.md",
    "tokenizer-evaluation.md",
    "base-model-training.md",
    "base-model-loss.md",  # written by Report.log_curve("Base model loss", ...)
    "base-model-evaluation.md",
    "chat-sft.md",
    "chat-evaluation-sft.md",
    "chat-rl.md",
    "chat-evaluation-rl.md",
]

# Other file names accepted in the slot of an expected file. chat_sft logs its section as "SFT", whose
# slug is sft.md; in the reference that name was missing from EXPECTED_FILES and the SFT section never
# reached report.md.
FILE_ALIASES = {"chat-sft.md": ["sft.md"]}

# Which metrics the summary table takes from which section file, and under which column.
SUMMARY_SOURCES = {
    "base-model-evaluation.md": ("base", ["CORE"]),
    "chat-evaluation-sft.md": ("sft", ["ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval",
                                       "ChatCORE"]),
    "chat-evaluation-rl.md": ("rl", ["GSM8K"]),
}

# Lambda-style on-demand price per GPU-hour (USD), matched as a substring of the first GPU's name.
GPU_HOURLY_RATES = {"H100": 3.00, "A100": 1.79, "V100": 0.55}
DEFAULT_GPU_HOURLY_RATE = 2.0

# Tracked files counted in the header's "Bloat" block.
BLOAT_EXTENSIONS = (".py", ".md", ".rs", ".html", ".toml", ".sh")


def _now():
    return datetime.datetime.now().strftime(TIMESTAMP_FORMAT)


def _write_text_atomic(path, text):
    with atomic_open(path, "w") as f:
        f.write(text)


def _read_text(path):
    """The file's text, or None (said) when it is not UTF-8 text: a damaged file costs its part of the
    report, not the whole report at the end of a run."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        print(f"Warning: {path} is not UTF-8 text ({e.reason} at byte {e.start}), skipping it. "
              f"Fix: run again the stage that writes it")
        return None


# -----------------------------------------------------------------------------
# Environment probes for the header

def run_command(cmd):
    """Run a shell command (5 s timeout). Stripped stdout if any, "" on a silent success, else None."""
    try:
        result = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=5)
    except Exception:
        return None
    out = result.stdout.strip()
    return out if out or result.returncode == 0 else None


def get_git_info():
    """Branch, short commit, dirty flag and the first line (max 80 chars) of the last commit message."""
    status = run_command("git status --porcelain")
    message = run_command("git log -1 --pretty=%B") or ""
    return {
        "commit": run_command("git rev-parse --short HEAD") or "unknown",
        "branch": run_command("git rev-parse --abbrev-ref HEAD") or "unknown",
        "dirty": bool(status),
        "message": message.split("\n")[0][:80],
    }


def get_gpu_info():
    """{"available": False} without CUDA, else count, per-device names, total memory (GB) and CUDA version."""
    if not torch.cuda.is_available():
        return {"available": False}
    count = torch.cuda.device_count()
    props = [torch.cuda.get_device_properties(i) for i in range(count)]
    return {
        "available": True,
        "count": count,
        "names": [p.name for p in props],
        "memory_gb": [p.total_memory / 1024**3 for p in props],
        "cuda_version": torch.version.cuda or "unknown",
    }


def get_system_info():
    """Host, OS, Python/torch versions, CPU and memory sizes, user, base dir and working dir."""
    return {
        "hostname": socket.gethostname(),
        "platform": platform.system(),
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "cpu_count": psutil.cpu_count(logical=False),
        "cpu_count_logical": psutil.cpu_count(logical=True),
        "memory_gb": psutil.virtual_memory().total / 1024**3,
        "user": os.environ.get("USER", "unknown"),
        "nanochat_base_dir": get_base_dir(),
        "working_dir": os.getcwd(),
    }


def estimate_cost(gpu_info, runtime_hours=None):
    """Hourly price of the GPUs in gpu_info (and the total for runtime_hours), or None without GPUs."""
    if not gpu_info.get("available"):
        return None
    first_name = gpu_info["names"][0] if gpu_info.get("names") else ""
    gpu_type = next((name for name in GPU_HOURLY_RATES if name in first_name), "unknown")
    hourly_rate = GPU_HOURLY_RATES.get(gpu_type, DEFAULT_GPU_HOURLY_RATE) * gpu_info["count"]
    return {
        "hourly_rate": hourly_rate,
        "gpu_type": gpu_type,
        "estimated_total": hourly_rate * runtime_hours if runtime_hours is not None else None,
    }


def get_bloat_info():
    """Size of the tracked source (git ls-files, in the cwd): characters, lines, files, uv.lock lines.
    Outside a git checkout the file counts are 0. Lines are counted like `wc -l` (newline characters)."""
    listing = run_command("git ls-files -z") or ""
    chars = lines = files = 0
    for path in listing.split("\0"):
        if not path.endswith(BLOAT_EXTENSIONS) or not os.path.isfile(path):
            continue  # deleted-but-tracked files and other extensions
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        chars, lines, files = chars + len(text), lines + text.count("\n"), files + 1
    uv_lock_lines = 0
    if os.path.isfile("uv.lock"):
        with open("uv.lock", encoding="utf-8", errors="replace") as f:
            uv_lock_lines = sum(1 for _ in f)
    return {"characters": chars, "lines": lines, "files": files, "tokens": chars // 4,
            "uv_lock_lines": uv_lock_lines}


def _hardware_lines(sys_info, gpu_info):
    out = [
        "### Hardware",
        f"- Platform: {sys_info['platform']}",
        f"- CPUs: {sys_info['cpu_count']} cores ({sys_info['cpu_count_logical']} logical)",
        f"- Memory: {sys_info['memory_gb']:.1f} GB",
    ]
    if gpu_info["available"]:
        names = ", ".join(dict.fromkeys(gpu_info["names"]))  # distinct names, first-seen order
        out += [
            f"- GPUs: {gpu_info['count']}x {names}",
            f"- GPU Memory: {sum(gpu_info['memory_gb']):.1f} GB total",
            f"- CUDA Version: {gpu_info['cuda_version']}",
            f"- Hourly Rate: ${estimate_cost(gpu_info)['hourly_rate']:.2f}/hour",
        ]
    else:
        out.append("- GPUs: None available")
    return out


def generate_header():
    """The environment part of header.md (git, hardware, software, bloat), ending with a blank line."""
    git, gpu_info, sys_info, bloat = get_git_info(), get_gpu_info(), get_system_info(), get_bloat_info()
    lines = [
        "# nanochat training report", "",
        f"Generated: {_now()}", "",
        "## Environment", "",
        "### Git Information",
        f"- Branch: {git['branch']}",
        f"- Commit: {git['commit']} {'(dirty)' if git['dirty'] else '(clean)'}",
        f"- Message: {git['message']}", "",
        *_hardware_lines(sys_info, gpu_info), "",
        "### Software",
        f"- Python: {sys_info['python_version']}",
        f"- PyTorch: {sys_info['torch_version']}", "",
        "### Bloat",
        f"- Characters: {bloat['characters']:,}",
        f"- Lines: {bloat['lines']:,}",
        f"- Files: {bloat['files']:,}",
        f"- Tokens (approx): {bloat['tokens']:,}",
        f"- Dependencies (uv.lock lines): {bloat['uv_lock_lines']:,}", "",
    ]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# Parsing helpers

def slugify(text):
    """Section name -> file stem: lower case, spaces as dashes ("Base model loss" -> "base-model-loss")."""
    return text.lower().replace(" ", "-")


def extract(section, keys):
    """For each line containing a key, the text between the line's first and second ':' (later lines win)."""
    keys = [keys] if isinstance(keys, str) else keys
    out = {}
    for line in section.split("\n"):
        for key in keys:
            if key in line and ":" in line:
                out[key] = line.split(":")[1].strip()
    return out


def extract_timestamp(content, prefix):
    """The datetime on the first line that starts with prefix and whose value (after the first ':') parses."""
    for line in content.split("\n"):
        if line.startswith(prefix) and ":" in line:
            with contextlib.suppress(ValueError):
                return datetime.datetime.strptime(line.split(":", 1)[1].strip(), TIMESTAMP_FORMAT)
    return None


def _format_value(v):
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
        return f"{v:,}"
    return str(v)


def _format_items(data):
    """Body of a section: strings verbatim, dicts as '- key: value' lines, falsy items skipped."""
    parts = []
    for item in data:
        if not item:
            continue
        if isinstance(item, dict):
            parts.extend(f"- {k}: {_format_value(v)}\n" for k, v in item.items())
        else:
            parts.append(str(item))
    return "".join(parts)


def _summary_table(metrics):
    """Metric x {BASE, SFT, RL} table; rows: CORE first, ChatCORE last, the rest alphabetical."""
    names = set().union(*(m.keys() for m in metrics.values()))
    rows = sorted(names, key=lambda n: (n == "ChatCORE", n != "CORE", n))
    widths = [15, 8, 8, 8]

    def row(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |\n"

    table = row(["Metric", "BASE", "SFT", "RL"])
    table += "|" + "|".join("-" * (w + 2) for w in widths) + "|\n"
    for name in rows:
        table += row([name] + [metrics[stage].get(name, "-") for stage in ("base", "sft", "rl")])
    return table


def _wall_clock_line(start_time, end_time):
    if start_time is None or end_time is None:
        return "Total wall clock time: unknown\n"
    seconds = (end_time - start_time).total_seconds()
    return f"Total wall clock time: {int(seconds // 3600)}h{int(seconds % 3600 // 60)}m\n"


_IMAGE_LINK = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")


def _absolute_image_links(markdown, report_dir):
    """Point image links that are relative to the report dir at their absolute paths, so the copy of
    report.md in another directory still shows the plots."""
    def fix(m):
        target = os.path.join(report_dir, m.group(2))  # an absolute link: join gives it back unchanged
        if not os.path.isfile(target):
            return m.group(0)
        return m.group(1) + os.path.abspath(target) + m.group(3)
    return _IMAGE_LINK.sub(fix, markdown)


# -----------------------------------------------------------------------------
# Plots: object-oriented matplotlib on the Agg canvas, so no pyplot, no global backend switch or figure
# registry, and nothing needs a display. Imported inside the functions: only plotting needs matplotlib.

def new_figure(height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(8, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def curve_figure(steps, series, axis_of, xlabel, title):
    """One panel per distinct axis label (axis_of: curve name -> label), stacked over a shared x axis."""
    labels = list(dict.fromkeys(axis_of[name] for name in series))
    fig = new_figure(4.5 if len(labels) <= 1 else 2.5 * len(labels) + 0.5)
    axes = fig.subplots(max(len(labels), 1), 1, sharex=True, squeeze=False)[:, 0]
    for name, values in series.items():
        # Missing points (None/nan, e.g. a val loss measured every N steps) are dropped rather than
        # plotted as gaps, so a sparse curve is still drawn as connected points.
        points = [(x, float(v)) for x, v in zip(steps, values) if v is not None and math.isfinite(v)]
        xs, ys = zip(*points) if points else ((), ())
        ax = axes[labels.index(axis_of[name])]
        ax.plot(xs, ys, label=name, marker="o" if len(points) <= 50 else None, markersize=3)
    for ax, label in zip(axes, labels):
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[-1].set_xlabel(xlabel)
    axes[0].set_title(title)
    fig.tight_layout()
    return fig


def bar_figure(values, xlabel, title):
    """Horizontal bars, the first label on top, with a line at 0."""
    fig = new_figure(max(2.5, 0.3 * len(values) + 1.2))
    ax = fig.add_subplot()
    labels = list(values)
    ax.barh(range(len(labels)), [values[label] for label in labels])
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def record_point(curve, step, values):
    """
    Set {series name: value} at `step` of curve ({"steps": [...], name: [...]}): at its last point when that
    is `step`, else at a new point. Every series keeps one value per step (None where it has none), and a
    resumed run, which evaluates its first step again, leaves the curve as the uninterrupted run's.
    """
    steps = curve.setdefault("steps", [])
    if not steps or steps[-1] != step:
        steps.append(step)
        for name, series in curve.items():
            if name != "steps":
                series.append(None)
    for name, value in values.items():
        curve.setdefault(name, [None] * len(steps))[-1] = value
    return curve


# -----------------------------------------------------------------------------
# Report

class Report:
    """Writes section files into report_dir (created here) and stitches them into report.md."""

    def __init__(self, report_dir):
        os.makedirs(report_dir, exist_ok=True)
        self.report_dir = report_dir

    def _path(self, name):
        return os.path.join(self.report_dir, name)

    def log(self, section, data):
        """(Over)write <slug>.md: '## section', a timestamp line, a blank line, then the formatted items."""
        path = self._path(f"{slugify(section)}.md")
        _write_text_atomic(path, f"## {section}\ntimestamp: {_now()}\n\n{_format_items(data)}\n")
        return path

    def log_curve(self, section, curve, ylabel="loss", xlabel="step", title=None):
        """
        Plot curve ({"steps": [...], name: [...]}, see record_point) into <slug>.png and (over)write <slug>.md
        so that it embeds the image and lists each series' last and minimum value. ylabel is one axis label
        for all series, or {series name: axis label with its unit}, e.g. {"val bpb": "val bpb (bits/byte)"}:
        series of one label share a panel, each label gets its own. None or nan marks a step where a series
        has no value. Returns the PNG path.
        """
        slug = slugify(section)
        image = self.curve_image(slug, curve, ylabel, xlabel, title or section)
        stats = {}
        for name, values in curve.items():
            if name == "steps":
                continue
            finite = [float(v) for v in values if v is not None and math.isfinite(v)]
            key = name if isinstance(ylabel, dict) else f"{name} {ylabel}"
            if finite:
                stats[f"{key} (last)"] = finite[-1]
                stats[f"{key} (min)"] = min(finite)
        self.log(section, [image, stats])
        return self._path(f"{slug}.png")

    def curve_image(self, name, curve, ylabel="loss", xlabel="step", title=None):
        """Write <name>.png of curve (as in log_curve) and return the markdown that embeds it, for a section's
        items ("" for a curve without steps)."""
        steps = list(curve.get("steps", []))
        series = {key: values for key, values in curve.items() if key != "steps"}
        if not steps:
            return ""
        for key, values in series.items():
            if len(values) != len(steps):
                raise ValueError(f"series {key!r} has {len(values)} values for {len(steps)} steps")
        axis_of = ylabel if isinstance(ylabel, dict) else dict.fromkeys(series, ylabel)
        figure = curve_figure(steps, series, axis_of, xlabel, title or name)
        return self._embed(name, figure, f"{ylabel if isinstance(ylabel, str) else 'curves'} curve")

    def bar_chart_image(self, name, values, xlabel, title):
        """Write <name>.png, one horizontal bar per {label: value}, and return the markdown embedding it."""
        # alt text is the name, not the title: the summary would read a "CORE..." title line as the value
        return self._embed(name, bar_figure(values, xlabel, title), name)

    def _embed(self, name, fig, alt):
        """Write <name>.png; returns the markdown that embeds it in a section."""
        with atomic_open(self._path(f"{name}.png"), "wb") as f:
            fig.savefig(f, format="png")
        return f"![{alt}]({name}.png)\n\n"

    def reset(self):
        """Delete the expected section files (and their aliases), the plots they embed, and report.md; write
        a fresh header.md. A plot goes only if a section links it: other files in the dir stay."""
        sections = EXPECTED_FILES + [alias for names in FILE_ALIASES.values() for alias in names]
        for name in sections + self._embedded_plots(sections) + ["report.md"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self._path(name))
        header_path = self._path("header.md")
        _write_text_atomic(header_path, generate_header() + f"Run started: {_now()}\n\n---\n\n")
        print(f"Reset report and wrote header to {header_path}")

    def _embedded_plots(self, sections):
        """The PNG names (in the report dir: plain relative links) that these section files embed."""
        paths = [self._path(name) for name in sections if os.path.isfile(self._path(name))]
        links = [m.group(2) for text in map(_read_text, paths) if text for m in _IMAGE_LINK.finditer(text)]
        return [link for link in links if link.endswith(".png") and os.path.basename(link) == link]

    def _read_header(self):
        """(header text, start time, bloat block); placeholders when header.md is missing."""
        path = self._path("header.md")
        if os.path.exists(path):
            header = _read_text(path)
        else:
            print(f"Warning: {path} does not exist. Did you forget to run `nanochat reset`?")
            header = None
        if header is None:
            return "", None, "[bloat data missing]"
        m = re.search(r"### Bloat\n(.*?)\n\n", header, re.DOTALL)
        return header, extract_timestamp(header, "Run started:"), m.group(1) if m else "[bloat data missing]"

    def _read_sections(self):
        """Concatenated section text, the last non-RL section timestamp, and the summary metrics."""
        body, end_time = "", None
        metrics = {stage: {} for stage, _ in SUMMARY_SOURCES.values()}
        for expected in EXPECTED_FILES:
            candidates = [expected, *FILE_ALIASES.get(expected, [])]
            present = [name for name in candidates if os.path.exists(self._path(name))]
            if not present:
                print(f"Warning: {self._path(expected)} does not exist, skipping")
                continue
            for name in present:
                content = _read_text(self._path(name))
                if content is None:
                    continue
                body += content + "\n"
                if "rl" not in name:  # the wall clock covers the pipeline up to SFT eval; RL is excluded
                    end_time = extract_timestamp(content, "timestamp:") or end_time
                if name in SUMMARY_SOURCES:
                    stage, keys = SUMMARY_SOURCES[name]
                    metrics[stage].update(extract(content, keys))
        return body, end_time, metrics

    def generate(self):
        """Write report.md (header, sections in EXPECTED_FILES order, summary), copy it to the cwd."""
        report_path = self._path("report.md")
        print(f"Generating report to {report_path}")
        header, start_time, bloat = self._read_header()
        body, end_time, metrics = self._read_sections()
        report = (f"{header}{body}## Summary\n\n{bloat}\n\n{_summary_table(metrics)}\n"
                  f"{_wall_clock_line(start_time, end_time)}")
        _write_text_atomic(report_path, report)
        print("Copying report.md to current directory for convenience")
        cwd_path = os.path.join(os.getcwd(), "report.md")
        if os.path.abspath(cwd_path) != os.path.abspath(report_path):
            _write_text_atomic(cwd_path, _absolute_image_links(report, self.report_dir))
        return report_path


class DummyReport:
    """Null report for non-zero ranks: writes nothing, and the image methods embed nothing."""

    def log(self, *args, **kwargs):
        pass

    log_curve = reset = generate = log

    def curve_image(self, *args, **kwargs):
        return ""

    bar_chart_image = curve_image


def get_report():
    """Report(<base_dir>/report) on rank 0, DummyReport elsewhere."""
    _, rank, _, _ = get_dist_info()
    return Report(os.path.join(get_base_dir(), "report")) if rank == 0 else DummyReport()


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate or reset the nanochat training report")
    parser.add_argument("command", nargs="?", default="generate", choices=["generate", "reset"],
                        help="generate: write report.md (default); "
                             "reset: clear sections and write the header")
    args = parser.parse_args(argv)
    getattr(get_report(), args.command)()


if __name__ == "__main__":
    main()
