"""
MMLU: multiple-choice questions over 57 subjects, from elementary mathematics to professional law.
https://huggingface.co/datasets/cais/mmlu
"""

from tasks.common import MultipleChoiceTask, render_mc, single_turn


class MMLU(MultipleChoiceTask):
    """One question per example, always four choices A-D."""

    name, hf_path, committed_dir = "MMLU", "cais/mmlu", "mmlu"
    subsets, splits = ("all",), ("auxiliary_train", "validation", "dev", "test")
    # auxiliary_train (~160 MB) is not committed; say what to do instead
    missing_hints = {"auxiliary_train": "MMLU auxiliary_train (99,842 questions from other benchmarks) is "
                     "too large to commit. Offline, leave it out of the training mixture, or use "
                     "MMLU(subset='all', split='validation') (1,531 rows) as a small stand-in."}
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

    def get_example(self, index):
        row = self.ds[index]
        if len(row["choices"]) != 4:
            raise ValueError(f"MMLU {self.split} row {index}: expected 4 choices, got {len(row['choices'])}")
        # subject: for grouping results; auxiliary_train rows come from other benchmarks and carry none
        prompt = render_mc(row["question"], self.letters, row["choices"])
        return single_turn(prompt, self.letters[row["answer"]], subject=row["subject"], letters=self.letters)
