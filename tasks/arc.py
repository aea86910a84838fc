"""
ARC (AI2 Reasoning Challenge): grade-school science multiple-choice questions.
https://huggingface.co/datasets/allenai/ai2_arc
"""

from tasks.common import MultipleChoiceTask, render_mc, single_turn


class ARC(MultipleChoiceTask):
    """One question per example; the assistant answers with the choice's label (A-D, sometimes 1-4)."""

    name, hf_path, committed_dir = "ARC", "allenai/ai2_arc", "arc"
    subsets, splits = ("ARC-Easy", "ARC-Challenge"), ("train", "validation", "test")

    def get_example(self, index):
        row = self.ds[index]
        letters = list(row["choices"]["label"])  # 3 to 5 labels; "A".."E" or "1".."5"
        answer = row["answerKey"]
        if answer not in letters:
            raise ValueError(f"ARC {self.subset}/{self.split} row {row.get('id')}: answer {answer!r} "
                             f"is not one of the labels {letters}")
        prompt = render_mc(row["question"], letters, row["choices"]["text"])
        return single_turn(prompt, answer, letters=letters)
