"""
MMLU: multiple-choice questions over 57 subjects, from elementary mathematics to professional law.
https://huggingface.co/datasets/cais/mmlu
"""

from tasks.common import Task, load_rows, render_mc

SPLITS = ("auxiliary_train", "validation", "dev", "test")

# auxiliary_train (~160 MB) is not committed; say what to do instead
_MISSING_HINT = {
    "auxiliary_train": "MMLU auxiliary_train (99,842 questions from other benchmarks) is too large to commit. "
                       "Offline, leave it out of the training mixture, or use "
                       "MMLU(subset='all', split='validation') (1,531 rows) as a small stand-in.",
}


class MMLU(Task):
    """One question per example, always four choices A-D."""

    letters = ("A", "B", "C", "D")
    groups = (
        "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge",
        "college_biology", "college_chemistry", "college_computer_science", "college_mathematics",
        "college_medicine", "college_physics", "computer_security", "conceptual_physics", "econometrics",
        "electrical_engineering", "elementary_mathematics", "formal_logic", "global_facts",
        "high_school_biology", "high_school_chemistry", "high_school_computer_science",
        "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics",
        "high_school_physics", "high_school_psychology", "high_school_statistics", "high_school_us_history",
        "high_school_world_history", "human_aging", "human_sexuality", "international_law", "jurisprudence",
        "logical_fallacies", "machine_learning", "management", "marketing", "medical_genetics",
        "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition", "philosophy", "prehistory",
        "professional_accounting", "professional_law", "professional_medicine", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
        "world_religions",
    )

    def __init__(self, subset, split, **kwargs):
        super().__init__(**kwargs)
        if subset != "all":
            raise ValueError(f"MMLU subset must be 'all', got {subset!r}")
        if split not in SPLITS:
            raise ValueError(f"MMLU split must be one of {SPLITS}, got {split!r}")
        self.subset, self.split = subset, split
        self.ds = load_rows("MMLU", "cais/mmlu", subset, split, f"mmlu/{subset}/{split}.jsonl.gz",
                            missing_hint=_MISSING_HINT.get(split, ""))

    @property
    def eval_type(self):
        return "categorical"

    def num_examples(self):
        return len(self.ds)

    def get_example(self, index):
        row = self.ds[index]
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU {self.split} row {index}: expected 4 choices, got {len(row['choices'])}")
        messages = [
            {"role": "user", "content": render_mc(row["question"], self.letters, row["choices"])},
            {"role": "assistant", "content": self.letters[row["answer"]]},
        ]
        # subject: for grouping results; auxiliary_train rows come from other benchmarks and carry none
        return {"messages": messages, "subject": row["subject"], "letters": self.letters}

    def evaluate(self, conversation, assistant_response):
        """True if the predicted letter is the gold one. The categorical eval only ever passes A-D."""
        if assistant_response not in self.letters:
            raise ValueError(f"MMLU answer {assistant_response!r} is not one of {self.letters}")
        return assistant_response == conversation["messages"][-1]["content"]
