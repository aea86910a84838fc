"""
The Task interface: a dataset seen as a list of conversations, with range-like views, mixtures and
sequences of tasks; the bases of the hub datasets' tasks and of the multiple-choice ones (with their
prompt format); and the one place that decides where a dataset's rows come from (the Hugging Face hub,
or the copy committed under data/tasks/ when offline or, loudly, when the hub cannot be reached).

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]} plus
optional task-specific keys ("letters", "subject", "entry_point", "test").
"""

import gzip
import json
import operator
import os
import random
import zlib

import numpy as np

from nanochat.common import REPO_DATA_DIR, BadFileError, SetupError, offline_mode, one_line_error, print0
from nanochat.data_source import (announce_committed_copy, announce_fallback, decide_on_rank0,
                                  fetch_unless_unreachable)

TASK_DATA_DIR = os.path.join(REPO_DATA_DIR, "tasks")

# The fixed seed of every dataset shuffle and of the mixture order (reference value)
SHUFFLE_SEED = 42


class Task:
    """
    A lazily indexed list of conversations. Subclasses implement num_examples() and
    get_example(physical_index); evaluation tasks also set eval_type (a class attribute) and evaluate().
    The view (start, stop, step) selects the physical indices range(start, stop, step).
    """

    def __init__(self, start=0, stop=None, step=1):
        if start < 0:
            raise ValueError(f"{type(self).__name__}: start must be >= 0, got {start}")
        if stop is not None and stop < start:
            raise ValueError(f"{type(self).__name__}: stop ({stop}) must be >= start ({start})")
        if step < 1:
            raise ValueError(f"{type(self).__name__}: step must be >= 1, got {step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def eval_type(self):
        """'categorical' (compare the answer letters' logits) or 'generative' (sample, then evaluate())."""
        raise NotImplementedError(f"{type(self).__name__} is a training-only task: it has no eval_type")

    def num_examples(self):
        raise NotImplementedError

    def get_example(self, index):
        raise NotImplementedError

    def evaluate(self, conversation, assistant_response):
        raise NotImplementedError(f"{type(self).__name__} is a training-only task: it has no evaluate()")

    def reward(self, conversation, assistant_response):
        """
        The RL reward: evaluate() as a float. One function for both, so RL optimises exactly what the
        eval reports; a task does not override it.
        """
        return float(self.evaluate(conversation, assistant_response))

    def __len__(self):
        n = self.num_examples()
        stop = n if self.stop is None else self.stop
        if stop > n:
            stop = self._clamp_stop(n)
        return len(range(self.start, stop, self.step))

    def _clamp_stop(self, n):
        """
        A view that asks for more rows than the data has: an error, except on the committed copy (offline
        or unreachable hub), which is often a subset; there the view shrinks to the data, and says so once.
        """
        what = f"{type(self).__name__}(start={self.start}, stop={self.stop}, step={self.step})"
        if not isinstance(getattr(self, "ds", None), CommittedRows):
            raise ValueError(f"{what} asks for rows up to {self.stop}, but the split has only {n}: "
                             f"lower `stop` to at most {n}")
        if not getattr(self, "_clamp_announced", False):
            self._clamp_announced = True
            announce_fallback(f"{what} asks for rows up to {self.stop}; the committed copy has {n}, so the "
                              f"view is cut to {n} rows and the numbers differ from a run on the full split")
        return n

    def __getitem__(self, index):
        index = operator.index(index)  # ints only (numpy ints too); a slice raises TypeError
        n = len(self)
        position = index + n if index < 0 else index
        if not 0 <= position < n:
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {n}")
        return self.get_example(self.start + position * self.step)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class TaskSequence(Task):
    """Tasks concatenated in list order (a curriculum): all of the first task, then the second, ..."""

    kind = "sequence"  # for the out-of-range message

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(task_idx, local_idx) for task_idx, task in enumerate(self.tasks)
                          for local_idx in range(len(task))]

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        if not 0 <= index < len(self.index_map):
            raise IndexError(f"Index {index} out of range for {self.kind} with {len(self.index_map)} "
                             f"conversations")
        task_idx, local_idx = self.index_map[index]
        return self.tasks[task_idx][local_idx]


class TaskMixture(TaskSequence):
    """
    Several tasks interleaved in one fixed shuffled order: every example of every task exactly once per
    pass, the same order in every process. List a task twice to see it twice as often.
    """

    kind = "mixture"

    def __init__(self, tasks, **kwargs):
        super().__init__(tasks, **kwargs)
        random.Random(SHUFFLE_SEED).shuffle(self.index_map)


def render_mc(question, letters, choices):
    """
    The multiple-choice prompt. Each letter comes after its choice ("- Paris=A"): small models bind a
    label to its content better this way. There is no space after "=", so the prompt contains the very
    token ("A", not " A") that the assistant answers with.
    """
    if len(letters) != len(choices):
        raise ValueError(f"render_mc: {len(letters)} letters for {len(choices)} choices")
    query = f"Multiple Choice question: {question}\n"
    query += "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    query += "\nRespond only with the letter of the correct answer."
    return query


def check_messages(messages, where, allow_system):
    """
    Raise ValueError (naming `where` and the message index) unless `messages` is an optional system
    message (when allowed) followed by at least 2 messages alternating user, assistant, ... with str content.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty JSON array of messages, "
                         f"got {type(messages).__name__}")
    first = 1 if allow_system and isinstance(messages[0], dict) and messages[0].get("role") == "system" else 0
    if len(messages) - first < 2:
        raise ValueError(f"{where}: a conversation needs at least 2 messages after any system message, "
                         f"got {len(messages) - first}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {i} must be an object, got {type(message).__name__}")
        expected = "system" if i < first else ("user" if (i - first) % 2 == 0 else "assistant")
        if message.get("role") != expected:
            raise ValueError(f"{where}: message {i} has role {message.get('role')!r}, expected {expected!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} content must be a str, "
                             f"got {type(message.get('content')).__name__}")


def check_one_of(what, value, allowed):
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


def single_turn(user, assistant, **extra):
    """The conversation of one user message and the assistant's answer, plus task-specific keys."""
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages, **extra}


class HubTask(Task):
    """
    One split of a Hugging Face dataset, one conversation per row (load_rows says where the rows come
    from). Subclasses name the dataset, its subsets and splits, and turn a row into a conversation.
    """

    name = hf_path = None
    committed_dir = None  # the copy under data/tasks/: <committed_dir>/[<subset>/]<split>.jsonl.gz
    subsets, splits = (None,), ()
    missing_hints = {}  # split -> what to do instead when it is unavailable

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        check_one_of(f"{self.name} subset", subset, self.subsets)
        check_one_of(f"{self.name} split", split, self.splits)
        self.subset, self.split = subset, split
        local_file = (None if self.committed_dir is None
                      else "/".join(filter(None, (self.committed_dir, subset, f"{split}.jsonl.gz"))))
        self.ds = load_rows(self.name, self.hf_path, subset, split, local_file,
                            missing_hint=self.missing_hints.get(split, ""))

    def num_examples(self):
        return len(self.ds)


class MultipleChoiceTask(HubTask):
    """Examples are single_turn(render_mc(...), gold letter, letters=...): answers are one of the letters."""

    eval_type = "categorical"

    def evaluate(self, conversation, assistant_response):
        """True if the predicted letter is the gold one. The categorical eval only ever passes a letter."""
        letters = conversation["letters"]
        if assistant_response not in letters:
            raise ValueError(f"{self.name} answer {assistant_response!r} is not one of {letters}")
        return assistant_response == conversation["messages"][-1]["content"]


# -----------------------------------------------------------------------------
# Where rows come from: the hub when online, the committed copy under data/tasks/ otherwise

def open_text(path):
    """Open a UTF-8 text file for reading, gunzipping transparently when the name ends in .gz."""
    return (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8")


def display_path(path):
    """path relative to the repo root when it lies inside the repo (data/tasks/...), else unchanged."""
    repo_root = os.path.dirname(REPO_DATA_DIR)
    relative = os.path.relpath(os.path.abspath(path), repo_root)
    return path if relative.startswith("..") else relative


def read_json_lines(path, fix):
    """(line number, object) for each non-blank line of a (gzipped) JSON-lines file; damage is a ValueError
    (BadFileError) naming the file, the line and `fix`."""
    rows, line_number = [], 0
    try:
        with open_text(path) as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    rows.append((line_number, json.loads(line)))
    except json.JSONDecodeError as e:
        raise BadFileError(f"{display_path(path)}:{line_number}: not valid JSON ({one_line_error(e)}). "
                           f"{fix}") from e
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:  # a truncated or garbled gzip stream
        raise BadFileError(f"{display_path(path)} is truncated or corrupt after line {line_number} "
                           f"({one_line_error(e)}). {fix}") from e
    return rows


class CommittedRows(list):
    """Rows read from the committed copy under data/tasks/ (often a subset of the hub split)."""


def _hub_rows(hf_path, hf_subset, split):
    from datasets import load_dataset  # heavy import, needed only here
    return load_dataset(hf_path, hf_subset, split=split).shuffle(seed=SHUFFLE_SEED)


def load_rows(name, hf_path, hf_subset, split, local_file, missing_hint=""):
    """
    The rows (dicts in the hub dataset's schema) of one dataset split, in the order of
    datasets.load_dataset(hf_path, hf_subset, split=split).shuffle(seed=42), which is what is returned
    online. Offline (NANOCHAT_OFFLINE=1), or loudly when the hub cannot be reached, the rows come from
    data/tasks/<local_file> (gzipped JSON lines in the same schema) shuffled with the same permutation,
    numpy default_rng(42), so a complete committed split is in the hub's order. Under torch.distributed
    rank 0 makes that choice for every rank. Prints one line naming the source. local_file=None means
    there is no committed copy, so offline is an error.
    """
    label = f"{name} {hf_subset}/{split}" if hf_subset else f"{name} {split}"
    loaded = []  # rank 0's hub rows: the other ranks load their own (from the cache rank 0 filled)

    def choose():  # 'hub', or why the committed copy stands in (offline, unreachable); other failures raise
        rows, why = fetch_unless_unreachable(f"{label}: loading {hf_path} from the Hugging Face hub",
                                             lambda: _hub_rows(hf_path, hf_subset, split))
        loaded.append(rows)
        return why or "hub"
    reason = decide_on_rank0(choose)
    if reason == "hub":
        try:
            rows = loaded[0] if loaded else _hub_rows(hf_path, hf_subset, split)
        except Exception as e:  # rank 0 loaded it: this rank must not silently switch to the committed copy
            raise SetupError(f"{label}: rank 0 loaded {hf_path} from the hub, but this rank could not "
                             f"({one_line_error(e)})") from e
        print0(f"{label}: {len(rows):,} rows from the Hugging Face hub ({hf_path})")
        return rows
    path = None if local_file is None else os.path.join(TASK_DATA_DIR, local_file)
    if path is None or not os.path.exists(path):
        where = ("it has no committed offline copy" if path is None
                 else f"there is no committed offline copy at {display_path(path)}")
        message = f"{label} ({hf_path}) is unavailable: {reason}, and {where}. {missing_hint}"
        raise SetupError(message.strip())
    rows = [row for _, row in read_json_lines(path, f"Fix: restore the committed copy with "
                                                    f"`git checkout -- {display_path(path)}`")]
    # what datasets' Dataset.shuffle(seed) does: a numpy Generator permutation of the row indices
    permutation = np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))
    rows = CommittedRows(rows[i] for i in permutation)
    message = f"{label}: {len(rows):,} rows from the committed offline subset {display_path(path)} ({reason})"
    announce_committed_copy(message if offline_mode() else
                            f"{message}; results are not comparable with runs on {hf_path}")
    return rows
