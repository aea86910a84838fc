"""
The Task interface: a dataset seen as a list of conversations, with range-like views, mixtures and
sequences of tasks, the multiple-choice prompt format, and the one place that decides where a
dataset's rows come from (the Hugging Face hub, or the copy committed under data/tasks/ when offline).

A conversation is {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]} plus
optional task-specific keys ("letters", "subject", "entry_point", "test").
"""

import gzip
import json
import math
import operator
import os
import random

import numpy as np

from nanochat.common import REPO_DATA_DIR, offline_mode, print0

TASK_DATA_DIR = os.path.join(REPO_DATA_DIR, "tasks")

# The fixed seed of every dataset shuffle and of the mixture order (reference value)
SHUFFLE_SEED = 42


class Task:
    """
    A lazily indexed list of conversations. Subclasses implement num_examples() and
    get_example(physical_index), and evaluation tasks also eval_type and evaluate().
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
        # stop is clamped to the data, so a view sized for the full dataset (e.g. stop=5200) stays in
        # range on a smaller offline copy
        n = self.num_examples()
        stop = n if self.stop is None else min(self.stop, n)
        return max(0, math.ceil((stop - self.start) / self.step))

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


class TaskMixture(Task):
    """
    Several tasks interleaved in one fixed shuffled order: every example of every task exactly once per
    pass, the same order in every process. List a task twice to see it twice as often.
    """

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.index_map = [(task_idx, local_idx) for task_idx, task in enumerate(self.tasks)
                          for local_idx in range(len(task))]
        random.Random(SHUFFLE_SEED).shuffle(self.index_map)

    def num_examples(self):
        return len(self.index_map)

    def get_example(self, index):
        if not 0 <= index < len(self.index_map):
            raise IndexError(f"Index {index} out of range for mixture with {len(self.index_map)} conversations")
        task_idx, local_idx = self.index_map[index]
        return self.tasks[task_idx][local_idx]


class TaskSequence(Task):
    """Tasks concatenated in list order (a curriculum): all of the first task, then the second, ..."""

    def __init__(self, tasks, **kwargs):
        super().__init__(**kwargs)
        self.tasks = list(tasks)
        self.lengths = [len(task) for task in self.tasks]

    def num_examples(self):
        return sum(self.lengths)

    def get_example(self, index):
        if not 0 <= index < self.num_examples():
            raise IndexError(f"Index {index} out of range for sequence with {self.num_examples()} conversations")
        for task, length in zip(self.tasks, self.lengths):
            if index < length:
                return task[index]
            index -= length


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
        raise ValueError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{where}: message {i} must be an object, got {type(message).__name__}")
    first = 1 if allow_system and messages[0].get("role") == "system" else 0
    if len(messages) - first < 2:
        raise ValueError(f"{where}: a conversation needs at least 2 messages after any system message, "
                         f"got {len(messages) - first}")
    for i, message in enumerate(messages):
        expected = "system" if i < first else ("user" if (i - first) % 2 == 0 else "assistant")
        if message.get("role") != expected:
            raise ValueError(f"{where}: message {i} has role {message.get('role')!r}, expected {expected!r}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} content must be a str, "
                             f"got {type(message.get('content')).__name__}")


# -----------------------------------------------------------------------------
# Where rows come from: the hub when online, the committed copy under data/tasks/ otherwise

def open_text(path):
    """Open a UTF-8 text file for reading, gunzipping transparently when the name ends in .gz."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def display_path(path):
    """path relative to the repo root when it lies inside the repo (data/tasks/...), else unchanged."""
    repo_root = os.path.dirname(REPO_DATA_DIR)
    relative = os.path.relpath(os.path.abspath(path), repo_root)
    return path if relative.startswith("..") else relative


def load_rows(name, hf_path, hf_subset, split, local_file, missing_hint=""):
    """
    The rows (dicts in the hub dataset's schema) of one dataset split, in the order of
    datasets.load_dataset(hf_path, hf_subset, split=split).shuffle(seed=42), which is what is returned
    online. Offline (NANOCHAT_OFFLINE=1), or when the hub load fails for any reason, the rows come from
    data/tasks/<local_file> (gzipped JSON lines in the same schema) shuffled with the same permutation,
    numpy default_rng(42), so a complete committed split is in the hub's order. Prints one line naming
    the source. local_file=None means there is no committed copy, so offline is an error.
    """
    label = f"{name} {hf_subset}/{split}" if hf_subset else f"{name} {split}"
    if offline_mode():
        reason = "offline"
    else:
        try:
            from datasets import load_dataset  # heavy import, needed only here
            rows = load_dataset(hf_path, hf_subset, split=split).shuffle(seed=SHUFFLE_SEED)
            print0(f"{label}: {len(rows):,} rows from the Hugging Face hub ({hf_path})")
            return rows
        except Exception as e:  # no network, no cache, hub outage: all mean "use the committed copy"
            message = (str(e).strip().splitlines() or [""])[0][:200]
            reason = f"hub load failed: {type(e).__name__}: {message}; NANOCHAT_OFFLINE=1 skips the hub"
    path = None if local_file is None else os.path.join(TASK_DATA_DIR, local_file)
    if path is None or not os.path.exists(path):
        where = ("it has no committed offline copy" if path is None
                 else f"there is no committed offline copy at {display_path(path)}")
        raise RuntimeError(f"{label} ({hf_path}) is unavailable: {reason}, and {where}. {missing_hint}".strip())
    with open_text(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    # what datasets' Dataset.shuffle(seed) does: a numpy Generator permutation of the row indices
    permutation = np.random.default_rng(SHUFFLE_SEED).permutation(len(rows))
    rows = [rows[i] for i in permutation]
    print0(f"{label}: {len(rows):,} rows from the committed offline subset {display_path(path)} ({reason})")
    return rows
