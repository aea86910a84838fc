"""
ARC (AI2 Reasoning Challenge): grade-school science multiple-choice questions.
https://huggingface.co/datasets/allenai/ai2_arc
"""

from tasks.common import Task, load_rows, render_mc

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = ("train", "validation", "test")


class ARC(Task):
    """One question per example; the assistant answers with the choice's label (usually A-D, sometimes 1-4)."""

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset not in SUBSETS:
            raise ValueError(f"ARC subset must be one of {SUBSETS}, got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"ARC split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_rows("ARC", "allenai/ai2_arc", subset, split, f"arc/{subset}/{split}.jsonl.gz")

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        letters = list(row["choices"]["label"])  # 3 to 5 labels; "A".."E" or "1".."5"
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC {self.subset}/{self.split} row {row.get('id')}: answer {answer!r} "
                             f"is not one of the labels {letters}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], letters, row["choices"]["text"])},
            {"role": "assistant", "content": answer},
        ]
        return {"messages": messages, "letters": letters}

    def evaluate(self, conversation, assistant_response):
        """True if the predicted label is the gold one. The categorical eval only ever passes a label."""
        if assistant_response not in conversation["letters"]:
            raise ValueError(f"ARC answer {assistant_response!r} is not one of {conversation['letters']}")
        return assistant_response == conversation["messages"][-1]["content"]
