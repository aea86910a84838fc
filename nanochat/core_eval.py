"""
CORE: the in-context-learning benchmark of the DCLM paper (arXiv 2406.11794), 22 tasks scored with a base
model's next-token losses. Three task types:
- multiple_choice: one prompt per answer choice; the choice whose own tokens have the lowest mean loss wins.
- schema: one prompt per context option, all ending in the same continuation; the option under which the
  continuation has the lowest mean loss wins.
- language_modeling: correct iff greedy decoding reproduces the whole continuation.
Each task's accuracy is centered on its random baseline (0 = chance, 1 = perfect); CORE is their mean.

The data is the "eval bundle": core.yaml (the task list), eval_meta_data.csv (random baselines, in percent)
and eval_data/<category>/<task>.jsonl. ensure_eval_bundle() puts it at <base_dir>/eval_bundle: downloaded
once, or, offline or (loudly) when the download fails with a network error, extracted from the copy
committed at data/eval_bundle.zip. That copy lacks coqa; CORE is then computed over the tasks present, and
every printed, logged or reported value carries its task count (format_core_metric, core_metric_log_key).

Importing this module does no work.
"""

import csv
import json
import logging
import math
import os
import random
import tempfile
import time
import zipfile
import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from nanochat.common import (REPO_DATA_DIR, SetupError, atomic_open, download, get_base_dir, offline_mode,
                             print0, progress, progress_shown, rank_and_world)
from nanochat.data_source import announce_committed_copy, decide_on_rank0, fetch_unless_unreachable

logger = logging.getLogger(__name__)

EVAL_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
CORE_NUM_TASKS = 22  # the tasks of the full bundle; a CORE over fewer is labelled with its task count
BUNDLE_LAYOUT = "eval_bundle/{core.yaml, eval_meta_data.csv, eval_data/...}"


class EvalBundleError(SetupError):
    """The eval bundle is missing, malformed, or could not be obtained."""


class ScoredSpanError(ValueError, AssertionError):
    """
    An example whose scored tokens cannot be located: the LM prompt without the continuation is not a token
    prefix of the prompt with it, the continuation is empty, or it does not fit in the model's context.
    evaluate_example counts such an example as wrong. Also an AssertionError, because these conditions
    were asserts and existing callers may catch that type.
    """


# -----------------------------------------------------------------------------
# The eval bundle: reading and validating

def load_core_tasks(bundle_dir):
    """
    The tasks of core.yaml in config order, each {label, dataset_uri, num_fewshot, task_type,
    continuation_delimiter}. Only the first num_fewshot entry is used; the delimiter defaults to one space.
    """
    path = os.path.join(bundle_dir, "core.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise EvalBundleError(f"Cannot read {path}: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("icl_tasks"), list):
        raise EvalBundleError(f"{path} has no `icl_tasks` list")
    tasks = []
    for i, entry in enumerate(config["icl_tasks"]):
        try:
            task = {
                "label": str(entry["label"]),
                "dataset_uri": str(entry["dataset_uri"]),
                "num_fewshot": int(entry["num_fewshot"][0]),
                "task_type": str(entry["icl_task_type"]),
                "continuation_delimiter": str(entry.get("continuation_delimiter", " ")),
            }
        except (KeyError, TypeError, IndexError, ValueError) as e:
            raise EvalBundleError(f"{path}: icl_tasks entry {i} is malformed "
                                  f"({type(e).__name__}: {e})") from e
        if task["task_type"] not in TASK_TYPES:
            raise EvalBundleError(f"{path}: task {task['label']} has unsupported icl_task_type "
                                  f"{task['task_type']!r}")
        tasks.append(task)
    return tasks


def load_random_baselines(bundle_dir):
    """{Eval Task: Random baseline} from eval_meta_data.csv, in percent; rows without a number left out."""
    path = os.path.join(bundle_dir, "eval_meta_data.csv")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"Eval Task", "Random baseline"} - set(reader.fieldnames or [])
            if missing:
                raise EvalBundleError(f"{path} lacks the column(s) {', '.join(sorted(missing))}")
            rows = list(reader)
    except (OSError, csv.Error, UnicodeDecodeError) as e:
        raise EvalBundleError(f"Cannot read {path}: {e}") from e
    baselines = {}
    for row in rows:
        try:
            baselines[row["Eval Task"]] = float(row["Random baseline"])
        except (TypeError, ValueError):
            pass
    return baselines


def task_data_path(bundle_dir, task):
    return os.path.join(bundle_dir, "eval_data", task["dataset_uri"])


def validate_eval_bundle(bundle_dir):
    """
    Check that core.yaml parses into tasks and that eval_meta_data.csv has a baseline for each of them
    (EvalBundleError otherwise). Returns the labels whose jsonl file is missing: those tasks get skipped,
    loudly, rather than failing the whole evaluation.
    """
    tasks = load_core_tasks(bundle_dir)
    baselines = load_random_baselines(bundle_dir)
    no_baseline = [t["label"] for t in tasks if t["label"] not in baselines]
    if no_baseline:
        raise EvalBundleError(f"{os.path.join(bundle_dir, 'eval_meta_data.csv')} has no Random baseline "
                              f"for: {', '.join(no_baseline)}")
    return [t["label"] for t in tasks if not os.path.isfile(task_data_path(bundle_dir, t))]


# -----------------------------------------------------------------------------
# The eval bundle: placing and obtaining

def place_eval_bundle(zip_path):
    """
    Extract zip_path into a temp dir under the base dir, validate its eval_bundle/ folder, then rename it to
    <base_dir>/eval_bundle (replacing what was there). A failure leaves no partial directory behind.
    """
    base_dir = get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    with tempfile.TemporaryDirectory(prefix=".eval_bundle.", dir=base_dir) as tmp:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                zf.extractall(tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise EvalBundleError(f"Cannot extract {zip_path}: {e}") from e
        extracted = os.path.join(tmp, "eval_bundle")
        if not os.path.isdir(extracted):
            raise EvalBundleError(f"{zip_path} has no top-level eval_bundle/ folder")
        validate_eval_bundle(extracted)
        if os.path.lexists(bundle_dir):
            os.rename(bundle_dir, os.path.join(tmp, "replaced"))  # deleted with tmp
        os.rename(extracted, bundle_dir)
    print0(f"Placed eval_bundle directory at {bundle_dir}")
    return bundle_dir


_completion_tried = set()  # incomplete bundles already sent to the download once in this process


def _ensure_eval_bundle_here():
    from filelock import FileLock
    base_dir = get_base_dir()
    bundle_dir = os.path.join(base_dir, "eval_bundle")
    zip_path = os.path.join(base_dir, "eval_bundle.zip")
    with FileLock(os.path.join(base_dir, "eval_bundle.lock")):  # concurrent processes place it once
        missing, why = None, f"no bundle at {bundle_dir}"  # missing stays None unless the bundle is usable
        if os.path.isdir(bundle_dir):
            try:
                missing = validate_eval_bundle(bundle_dir)
            except EvalBundleError as e:
                why = f"{bundle_dir} is broken ({e})"
        usable = missing is not None
        if usable:
            if not missing or offline_mode() or os.path.exists(zip_path) or bundle_dir in _completion_tried:
                return bundle_dir
            _completion_tried.add(bundle_dir)
            why = f"{bundle_dir} lacks {', '.join(missing)}"
        # placed from the zip (downloaded unless one that places is there, even offline); offline or
        # unreachable, the committed copy may stand in, any other failure raises
        _, error = fetch_unless_unreachable(
            f"Downloading the CORE eval bundle {EVAL_BUNDLE_URL}",
            lambda: download(EVAL_BUNDLE_URL, zip_path, validate=place_eval_bundle),
            EvalBundleError, fetch_offline=True)
        if error is None:
            print0(f"Eval bundle: placed {zip_path}, from {EVAL_BUNDLE_URL} ({why})")
            return bundle_dir
        why = f"{why}; not downloaded: {error}"
        if usable:
            announce_committed_copy(f"Eval bundle: keeping the incomplete {bundle_dir}: CORE will cover "
                                    f"fewer than {CORE_NUM_TASKS} tasks ({why})")
            return bundle_dir
        committed = os.path.join(REPO_DATA_DIR, "eval_bundle.zip")
        try:
            place_eval_bundle(committed)
        except EvalBundleError as e:
            raise EvalBundleError(
                f"Cannot obtain the CORE eval bundle ({why}; the committed copy is unusable: {e}). Download "
                f"{EVAL_BUNDLE_URL} and unzip it so that the files are laid out as "
                f"{os.path.join(base_dir, BUNDLE_LAYOUT)}.") from e
        lacks = ", ".join(validate_eval_bundle(bundle_dir)) or "no task"
        announce_committed_copy(f"Eval bundle: using the committed offline copy {committed}, which lacks "
                                f"{lacks}: CORE computed on it is labelled with its task count ({why})")
        return bundle_dir


def ensure_eval_bundle():
    """
    The path of a valid <base_dir>/eval_bundle, obtained in this order: the existing directory; the zip a
    previous download left; a download of EVAL_BUNDLE_URL (not when NANOCHAT_OFFLINE is set); the committed
    data/eval_bundle.zip, only offline or (loudly) when the download failed with a network error. Any other
    download failure raises EvalBundleError. An existing bundle that lacks task files is completed from the
    download once per process if it can be, else kept. Under torch.distributed rank 0 obtains the bundle
    and the other ranks use what it chose (call on every rank).
    """
    def obtain():
        bundle_dir = _ensure_eval_bundle_here()
        return bundle_dir, validate_eval_bundle(bundle_dir)
    bundle_dir, missing = decide_on_rank0(obtain)
    if not os.path.isdir(bundle_dir):
        # a rank on another node, whose base dir is not rank 0's: it obtains its own copy, which must hold
        # the same tasks, or the ranks would evaluate different CORE task sets
        bundle_dir, local_missing = obtain()
        if local_missing != missing:
            raise EvalBundleError(f"{bundle_dir} lacks {local_missing or 'no task'}, but rank 0's bundle "
                                  f"lacks {missing or 'no task'}: place the same bundle on every node")
    return bundle_dir


# -----------------------------------------------------------------------------
# Prompt rendering. d = continuation delimiter; every few-shot block ends with a blank line.

def render_prompts_mc(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per choice: the shots (query, d, gold choice), then the item's query, d, the choice."""
    d = continuation_delimiter
    shots = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot_examples or [])
    return [f"{shots}{item['query']}{d}{choice}" for choice in item["choices"]]


def render_prompts_schema(item, continuation_delimiter, fewshot_examples=None):
    """One prompt per context option: the shots (gold option, d, continuation), then option, d,
    continuation."""
    d = continuation_delimiter
    shots = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n"
                    for ex in fewshot_examples or [])
    return [f"{shots}{option}{d}{item['continuation']}" for option in item["context_options"]]


def render_prompts_lm(item, continuation_delimiter, fewshot_examples=None):
    """
    [prompt_without, prompt_with] the continuation. prompt_without is stripped: a trailing space (from the
    delimiter) would merge into the continuation's first token and break the token-prefix property.
    """
    d = continuation_delimiter
    shots = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot_examples or [])
    prompt = f"{shots}{item['context'].strip()}{d}"
    return [prompt.strip(), prompt + item["continuation"]]


# -----------------------------------------------------------------------------
# Tokenisation and batching. Every row starts with BOS; (start, end) bound the scored tokens of a row.

def find_common_length(token_sequences, direction="left"):
    """Length of the prefix ('left') or suffix ('right') shared by all sequences (at most the shortest)."""
    if direction not in ("left", "right"):
        raise ValueError(f"direction must be 'left' or 'right', got {direction!r}")
    min_len = min(len(seq) for seq in token_sequences)
    for i in range(min_len):
        pos = i if direction == "left" else -1 - i
        if any(seq[pos] != token_sequences[0][pos] for seq in token_sequences):
            return i
    return min_len


def stack_sequences(tokens, pad_token_id):
    """(N, max_len) int64 tensor of the rows, right-padded with pad_token_id."""
    rows = [torch.tensor(row, dtype=torch.long) for row in tokens]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_token_id)


def batch_sequences_mc(tokenizer, prompts):
    """Score each choice from the end of the prefix shared by all rows (shared answer tokens unscored)."""
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    answer_start = find_common_length(tokens, direction="left")
    return tokens, [answer_start] * len(tokens), [len(row) for row in tokens]


def batch_sequences_schema(tokenizer, prompts):
    """Score the continuation: the suffix shared by all rows."""
    tokens = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    suffix_length = find_common_length(tokens, direction="right")
    end_indices = [len(row) for row in tokens]
    return tokens, [end - suffix_length for end in end_indices], end_indices


def batch_sequences_lm(tokenizer, prompts):
    """The single row with the continuation; it is scored from where the prompt without it ends."""
    without, with_ = tokenizer(prompts, prepend=tokenizer.get_bos_token_id())
    start, end = len(without), len(with_)
    if start >= end:
        raise ScoredSpanError("the continuation adds no tokens to the prompt")
    if with_[:start] != without:
        raise ScoredSpanError("prompt without is supposed to be a prefix of prompt with (token level)")
    return [with_], [start], [end]


# task type -> (prompts of an item, rows and scored spans of those prompts)
TASK_TYPES = {
    "multiple_choice": (render_prompts_mc, batch_sequences_mc),
    "schema": (render_prompts_schema, batch_sequences_schema),
    "language_modeling": (render_prompts_lm, batch_sequences_lm),
}


def crop_to_context(tokens, start_indices, end_indices, max_len):
    """
    Keep the last max_len tokens of longer rows (the scored tokens are at the end) and shift start/end by the
    number dropped. ScoredSpanError if the scored tokens would lose their preceding context token.
    """
    if max_len is None:
        return tokens, start_indices, end_indices
    rows, starts, ends = [], [], []
    for row, start, end in zip(tokens, start_indices, end_indices):
        n_crop = max(0, len(row) - max_len)
        if n_crop > 0 and start - n_crop < 1:
            raise ScoredSpanError(f"the scored tokens do not fit in the model's context of {max_len} tokens")
        rows.append(row[n_crop:])
        starts.append(start - n_crop)
        ends.append(end - n_crop)
    return rows, starts, ends


# -----------------------------------------------------------------------------
# Scoring

@torch.no_grad()
def forward_model(model, input_ids):
    """(losses, predictions), both (B, T): the loss of predicting token t+1 at position t (NaN at the end)."""
    B, T = input_ids.shape
    logits = model(input_ids).float()
    targets = torch.roll(input_ids, shifts=-1, dims=1)
    losses = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T), reduction="none").view(B, T)
    losses[:, -1] = float("nan")  # the rolled-in target there is the row's first token, not a real next token
    return losses, logits.argmax(dim=-1)


def choice_scores(losses, start_indices, end_indices):
    """
    Mean loss over each row's scored tokens (predicted at positions start-1 .. end-2). A row with no scored
    tokens, e.g. a choice that is a token prefix of another choice, scores +inf: nothing distinguishes it, so
    it never wins unless every row is like it (then the first row does, as on any tie).
    """
    scores = []
    for i, (start, end) in enumerate(zip(start_indices, end_indices)):
        start = max(start, 1)  # BOS at position 0 is never predicted
        scores.append(losses[i, start - 1:end - 1].mean().item() if end > start else math.inf)
    return scores


def sample_fewshot_indices(idx, num_examples, num_fewshot):
    """The few-shot example indices for item idx: reproducible per idx, never idx itself, in sample order."""
    if num_fewshot <= 0:
        return []
    rng = random.Random(1234 + idx)  # seed scheme of the reference, so the same shots are drawn
    candidates = [i for i in range(num_examples) if i != idx]
    # a task truncated below the shot count (a small --max-per-task) uses all the other examples
    return rng.sample(candidates, min(num_fewshot, len(candidates)))


_warned = set()  # (task, problem) pairs already warned about: one warning per task, not per example


def _warn_once(task, idx, error):
    message = f"{task} example {idx} counted as wrong: {error}"
    if (task, str(error)) in _warned:
        logger.debug(message)
        return
    _warned.add((task, str(error)))
    logger.warning(f"{message} (further examples with this problem are logged at debug level)")


def evaluate_example(idx, model, tokenizer, data, device, task_meta):
    """Whether the model gets data[idx] right.
    task_meta: {task_type, num_fewshot, continuation_delimiter, dataset_uri}."""
    item = data[idx]
    task_type = task_meta["task_type"]
    fewshot = [data[i] for i in sample_fewshot_indices(idx, len(data), task_meta["num_fewshot"])]
    if task_type not in TASK_TYPES:
        raise ValueError(f"Unsupported task type: {task_type}")
    render, batch = TASK_TYPES[task_type]
    try:
        tokens, starts, ends = batch(tokenizer, render(item, task_meta["continuation_delimiter"], fewshot))
        # only a model that declares a context (the HF wrapper: GPT-2's 1024 positions) is cropped to it; a
        # native GPT's rotary table reaches far past its training sequence_len, and cropping would change
        # the prompt that CORE scores
        tokens, starts, ends = crop_to_context(tokens, starts, ends, getattr(model, "max_seq_len", None))
    except ScoredSpanError as e:
        _warn_once(task_meta.get("dataset_uri", "CORE task"), idx, e)
        return False
    input_ids = stack_sequences(tokens, tokenizer.get_bos_token_id()).to(device)
    losses, predictions = forward_model(model, input_ids)
    if task_type == "language_modeling":
        start, end = starts[0], ends[0]
        return torch.equal(predictions[0, start - 1:end - 1], input_ids[0, start:end])  # greedy exact match
    scores = choice_scores(losses, starts, ends)
    return scores.index(min(scores)) == item["gold"]


def evaluate_task(model, tokenizer, data, device, task_meta, desc=None):
    """Accuracy in [0, 1] over data. Under torch.distributed rank r takes examples r, r+W, ... and the
    results are summed."""
    if not data:
        raise ValueError(f"No examples to evaluate for {task_meta.get('dataset_uri', 'this task')}")
    rank, world = rank_and_world()
    correct = torch.zeros(len(data), dtype=torch.float32, device=device)
    for idx in progress(range(rank, len(data), world), desc=desc, unit="example"):
        correct[idx] = float(evaluate_example(idx, model, tokenizer, data, device, task_meta))
    if world > 1:
        dist.barrier()
        dist.all_reduce(correct, op=dist.ReduceOp.SUM)
    return correct.mean().item()


# -----------------------------------------------------------------------------
# The CORE metric

_task_data_cache = {}  # file identity -> shuffled examples; base_train evaluates CORE many times per run


def bundle_fix(bundle_dir):
    """The fix for a damaged or emptied placed bundle: a missing one is placed again."""
    return (f"Fix: delete {bundle_dir} and run again, which places the bundle afresh (from eval_bundle.zip "
            f"beside it, a download, or the committed copy)")


def _read_jsonl(path, bundle_dir):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise EvalBundleError(f"{path}:{line_no} is not valid JSON: {e}. "
                                          f"{bundle_fix(bundle_dir)}") from e
    return rows


def load_task_data(bundle_dir, dataset_uri, max_per_task=-1):
    """
    The task's examples shuffled with random.Random(1337) (the reference's seed), then the first max_per_task
    (all if <= 0). Cached per file, so tasks sharing a file (hellaswag, hellaswag_zeroshot) share one copy.
    """
    path = os.path.join(bundle_dir, "eval_data", dataset_uri)
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _task_data_cache:
        rows = _read_jsonl(path, bundle_dir)
        random.Random(1337).shuffle(rows)
        _task_data_cache[key] = rows
    rows = _task_data_cache[key]
    return rows[:max_per_task] if max_per_task > 0 else list(rows)


def centered_accuracy(accuracy, baseline):
    """0 at chance (baseline, a fraction), 1 at perfect, negative below: CORE's and ChatCORE's scale."""
    return (accuracy - baseline) / (1.0 - baseline)


def evaluate_core(model, tokenizer, device, max_per_task=-1):
    """
    Evaluate every CORE task of the bundle in config order. Returns {results: {label: accuracy},
    centered_results: {label: centered}, core_metric: mean centered, missing_tasks: [labels skipped]}.
    """
    bundle_dir = ensure_eval_bundle()
    tasks = load_core_tasks(bundle_dir)
    baselines = load_random_baselines(bundle_dir)
    results, centered_results, missing = {}, {}, []
    for task_num, task in enumerate(tasks, 1):
        label = task["label"]
        if not os.path.isfile(task_data_path(bundle_dir, task)):
            print0(f"Skipping {label}: eval_data/{task['dataset_uri']} is missing from the bundle")
            missing.append(label)
            continue
        heading = f"Evaluating: {label} ({task['num_fewshot']}-shot, type: {task['task_type']})... "
        bar_shown = progress_shown()  # a bar would draw over a heading printed now: it goes with the result
        if not bar_shown:
            print0(heading, end="", flush=True)
        t0 = time.time()
        data = load_task_data(bundle_dir, task["dataset_uri"], max_per_task)
        desc = f"CORE {task_num}/{len(tasks)} {label}"
        accuracy = evaluate_task(model, tokenizer, data, device, task, desc)
        results[label] = accuracy
        centered_results[label] = centered_accuracy(accuracy, 0.01 * baselines[label])  # percent
        print0((heading if bar_shown else "") + f"accuracy: {accuracy:.4f} | centered: "
               f"{centered_results[label]:.4f} | time: {time.time() - t0:.2f}s")
    if not results:
        raise EvalBundleError(f"None of the {len(tasks)} CORE task files exist under {bundle_dir}/eval_data. "
                              f"{bundle_fix(bundle_dir)}")
    core_metric = sum(centered_results.values()) / len(centered_results)
    core = {"results": results, "centered_results": centered_results, "core_metric": core_metric,
            "missing_tasks": missing}
    if note := core_task_note(core):
        print0(f"CORE metric {note}: not directly comparable with a full CORE; the complete "
               f"bundle is {EVAL_BUNDLE_URL}")
    return core


# -----------------------------------------------------------------------------
# Labelling a CORE value wherever it is printed, logged or reported

def core_task_note(core):
    """
    '' for a CORE over all CORE_NUM_TASKS tasks, else what it covers, e.g. '(21 of 22 tasks, missing coqa)':
    a CORE over fewer tasks is a different number and must never pass for the full one. No ':' in it, so
    the report's summary, which reads a value up to the next ':', keeps it whole.
    """
    n = len(core["results"])
    if n >= CORE_NUM_TASKS and not core["missing_tasks"]:
        return ""
    missing = f", missing {', '.join(core['missing_tasks'])}" if core["missing_tasks"] else ""
    return f"({n} of {CORE_NUM_TASKS} tasks{missing})"


def format_core_metric(core):
    """The CORE value as printed and reported: '0.2565', or '0.2431 (21 of 22 tasks, missing coqa)'."""
    note = core_task_note(core)
    return f"{core['core_metric']:.4f}" + (f" {note}" if note else "")


def core_metric_log_key(core):
    """The metrics-log (wandb) key: 'core_metric', or e.g. 'core_metric_21of22_tasks' when incomplete."""
    incomplete = core_task_note(core)
    return f"core_metric_{len(core['results'])}of{CORE_NUM_TASKS}_tasks" if incomplete else "core_metric"


# -----------------------------------------------------------------------------
# Samples: a quick look at what the base model says (base_eval, and base_train's greedy ones in training)

SAMPLE_PROMPTS = [
    "The capital of France is",
    "The chemical symbol of gold is",
    "If yesterday was Friday, then tomorrow will be",
    "The opposite of hot is",
    "The planets of the solar system are:",
    "My favorite color is",
    "If 5*x + 3 = 13, then x is",
]


def greedy_samples(model, tokenizer, prompts=SAMPLE_PROMPTS, max_tokens=16):
    """The decoded greedy completion (prompt included) of each prompt, one at a time."""
    from nanochat.engine import Engine
    engine = Engine(model, tokenizer)
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, prepend=tokenizer.get_bos_token_id())
        results, _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0)
        samples.append(tokenizer.decode(results[0]))
    return samples


def unconditioned_samples(model, tokenizer):
    """Eight decoded samples of what the model writes from a lone BOS (temperature 1, 128 tokens at most)."""
    from nanochat.engine import Engine
    bos = [tokenizer.get_bos_token_id()]
    results, _ = Engine(model, tokenizer).generate_batch(bos, num_samples=8, max_tokens=128, temperature=1.0)
    return [tokenizer.decode(tokens) for tokens in results]


# -----------------------------------------------------------------------------
# base_eval's outputs: the CORE csv and the "Base model evaluation" report section

def format_core_csv(core):
    """Header, one line per task, then the CORE line; fields joined by ', ' and padded to 35, 10, 10."""
    rows = [("Task", "Accuracy", "Centered")]
    rows += [(label, f"{accuracy:.6f}", f"{core['centered_results'][label]:.6f}")
             for label, accuracy in core["results"].items()]
    note = core_task_note(core)  # a CORE over fewer than the 22 tasks says so in its row name
    rows.append((f"CORE {note}" if note else "CORE", "", f"{core['core_metric']:.6f}"))
    return "".join(f"{task:<35}, {accuracy:<10}, {centered:<10}\n" for task, accuracy, centered in rows)


def write_core_csv(slug, core):
    """<base_dir>/base_eval/<slug>.csv, written atomically; returns its path."""
    path = os.path.join(get_base_dir(), "base_eval", f"{slug}.csv")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_open(path) as f:
        f.write(format_core_csv(core))
    return path


def base_eval_report_items(name, core, bpb, samples, unconditioned):
    """The items of the "Base model evaluation" report section."""
    summary = {"model": name}
    if core is not None:
        # a CORE over fewer than the 22 tasks is reported with its task count beside the value
        summary["CORE metric"] = format_core_metric(core) if core_task_note(core) else core["core_metric"]
    if bpb:
        summary["train bpb"], summary["val bpb"] = bpb["train"], bpb["val"]
    items = [summary]
    if core is not None:
        items.append(core["centered_results"])
    items.extend({f"sample {i}": text} for i, text in enumerate(samples))
    items.extend({f"unconditioned {i}": text} for i, text in enumerate(unconditioned))
    return items
