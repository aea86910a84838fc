"""
Conversations from a JSON-lines file: each non-blank line is a JSON array of messages
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, ...]
with at least 2 messages alternating user, assistant, ... (no system message) and str contents.
Files ending in .gz are read gunzipped.

Used for the identity conversations that teach the model who it is (<base_dir>/identity_conversations.jsonl,
downloaded by the run scripts). Committed copies of the identity conversations and of a small Dolly/HH
instruction sample, for offline runs, are COMMITTED_IDENTITY_PATH and COMMITTED_DOLLY_PATH.
"""

import os

from nanochat.common import MissingFileError, print0
from tasks.common import TASK_DATA_DIR, Task, check_messages, display_path, read_json_lines

IDENTITY_CONVERSATIONS_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/identity_conversations.jsonl"
COMMITTED_IDENTITY_PATH = os.path.join(TASK_DATA_DIR, "chat", "identity_conversations.jsonl.gz")
COMMITTED_DOLLY_PATH = os.path.join(TASK_DATA_DIR, "chat", "dolly_hhrlhf_train_small.jsonl.gz")


class CustomJSON(Task):
    """
    A missing file is an error: going on with zero conversations would let SFT silently run without its
    identity data.
    """

    def __init__(self, filepath, **kwargs):
        super().__init__(**kwargs)
        if not os.path.exists(filepath):
            raise MissingFileError(
                f"CustomJSON: conversations file not found: {filepath}. For the nanochat identity "
                f"conversations, download them with `curl -L -o {filepath} {IDENTITY_CONVERSATIONS_URL}` "
                f"(see karpathy/nanochat#139), or, offline, use the committed copy "
                f"{display_path(COMMITTED_IDENTITY_PATH)}")
        self.filepath = filepath
        lines = read_json_lines(filepath, "Fix: correct or delete that line")  # errors name the file and line
        for line_number, messages in lines:
            check_messages(messages, f"{filepath}:{line_number}", allow_system=False)
        self.conversations = [messages for _, messages in lines]
        print0(f"CustomJSON: {len(self.conversations):,} conversations from {display_path(filepath)}")

    def num_examples(self):
        return len(self.conversations)

    def get_example(self, index):
        return {"messages": self.conversations[index]}
