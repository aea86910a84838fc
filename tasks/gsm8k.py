"""
GSM8K: grade-school math word problems with worked answers.
https://huggingface.co/datasets/openai/gsm8k

The answers carry calculator annotations and end with the final number, e.g.
    "... makes 12/60 = $<<12/60=0.2>>0.2 per minute ... #### 10"
Each <<expr=result>> becomes a python tool call and its output, which is how the model learns to call
the calculator: at inference the engine evaluates <|python_start|>expr<|python_end|> and forces the
result in. Scoring compares the strings after "#### " exactly (also used by SpellingBee): "10.0" is not "10".
"""

import re

from tasks.common import HubTask, single_turn

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALCULATOR_RE = re.compile(r"(<<[^>]+>>)")  # capturing, so re.split keeps the annotations


def extract_answer(completion):
    """The number after the first '#### ' (four hashes, one space), commas removed; None without one."""
    match = ANSWER_RE.search(completion)
    return None if match is None else match.group(1).replace(",", "")  # the group holds no whitespace


def answer_to_parts(answer):
    """
    Assistant parts for a GSM8K answer: text pieces (empty ones included) alternate with a python part
    and a python_output part per <<expr=result>> annotation, split at the last "=".
    """
    parts = []
    for i, piece in enumerate(CALCULATOR_RE.split(answer)):
        if i % 2 == 0:  # re.split puts the captured annotations at the odd positions
            parts.append({"type": "text", "text": piece})
            continue
        inner = piece[2:-2]
        expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
        parts.append({"type": "python", "text": expr})
        parts.append({"type": "python_output", "text": result})
    return parts


def score_final_answer(conversation, assistant_response):
    """
    1 if the string after the response's '#### ' (commas removed) equals the gold answer's (last text part)
    exactly, else 0: the leaderboard's GSM8K numbers are exact string matches, so "10.0" for 10 is wrong.
    """
    if not isinstance(assistant_response, str):
        raise TypeError(f"assistant_response must be a str, got {type(assistant_response).__name__}")
    gold = conversation["messages"][-1]
    if gold["role"] != "assistant" or not isinstance(gold["content"], list):
        raise ValueError("the last message must be the assistant's, with a list of parts as content")
    reference = extract_answer(gold["content"][-1]["text"])
    predicted = extract_answer(assistant_response)
    return int(reference is not None and predicted == reference)


class GSM8K(HubTask):

    name, hf_path, committed_dir = "GSM8K", "openai/gsm8k", "gsm8k"
    subsets, splits = ("main", "socratic"), ("train", "test")
    eval_type = "generative"

    def get_example(self, index):
        row = self.ds[index]
        return single_turn(row["question"], answer_to_parts(row["answer"]))

    def evaluate(self, conversation, assistant_response):
        return score_final_answer(conversation, assistant_response)
