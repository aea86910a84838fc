"""
HumanEval: 164 Python functions to write from their signature and docstring, graded by running the
dataset's unit tests against the model's code in the sandbox (nanochat.execution).
https://huggingface.co/datasets/openai/openai_humaneval

The prompt is the raw function stub with no instruction (as in the reference), so scores stay
comparable with it; only the first fenced code block of a reply is graded.
"""

import re

from tasks.common import HubTask, single_turn

# first ``` block, the opening fence optionally tagged "python"; the body is captured lazily
FENCED_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt):
    """The import lines at the top of a stub (the model's code may rely on them without repeating them)."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion):
    """The code of the first fenced block, else the whole completion (both stripped)."""
    match = FENCED_BLOCK_RE.search(completion)
    return (match.group(1) if match else completion).strip()


class HumanEval(HubTask):

    name, hf_path, committed_dir = "HumanEval", "openai/openai_humaneval", "humaneval"
    splits = ("test",)
    eval_type = "generative"

    def __init__(self, **kwargs):
        super().__init__(None, "test", **kwargs)

    def get_example(self, index):
        row = self.ds[index]
        return single_turn(row["prompt"], row["prompt"] + "\n" + row["canonical_solution"],
                           entry_point=row["entry_point"], test=row["test"])

    def evaluate(self, conversation, completion):
        """True if the completion's code passes the problem's tests (check(<entry_point>)) in the sandbox.
        check() is the program's last statement and execute_code succeeds only when the program ran to its
        end, so code that exits early (sys.exit(0), os._exit(0), an atexit handler) fails."""
        from nanochat.execution import execute_code  # the sandbox forks processes: load it only to grade
        imports = extract_imports(conversation["messages"][0]["content"])
        program = (imports + "\n\n" + extract_program(completion) + "\n\n"
                   + conversation["test"] + "\n" + f"check({conversation['entry_point']})")
        return execute_code(program).success
