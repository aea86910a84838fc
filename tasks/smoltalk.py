"""
SmolTalk: general multi-turn conversations, for training (and validation loss) only.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk

There is no committed offline copy (~460K conversations); offline, SmolTalk raises and the committed
chat data (tasks.customjson.COMMITTED_IDENTITY_PATH, COMMITTED_DOLLY_PATH) is the substitute.
"""

from tasks.common import Task, check_messages, display_path, load_rows
from tasks.customjson import COMMITTED_DOLLY_PATH, COMMITTED_IDENTITY_PATH

OFFLINE_HINT = ("Offline, train on the committed chat conversations instead: CustomJSON(COMMITTED_IDENTITY_PATH) "
                "and CustomJSON(COMMITTED_DOLLY_PATH) from tasks.customjson "
                f"({display_path(COMMITTED_IDENTITY_PATH)}, {display_path(COMMITTED_DOLLY_PATH)}).")


class SmolTalk(Task):

    def __init__(self, split, **kwargs):
        super().__init__(**kwargs)
        if split not in ("train", "test"):
            raise ValueError(f"SmolTalk split must be 'train' or 'test', got {split!r}")
        self.split = split
        self.ds = load_rows("SmolTalk", "HuggingFaceTB/smol-smoltalk", None, split, None, missing_hint=OFFLINE_HINT)
        self.length = len(self.ds)

    def num_examples(self):
        return self.length

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        # the optional system message stays: render_conversation merges it into the first user message
        check_messages(messages, f"SmolTalk {self.split} row {index}", allow_system=True)
        return {"messages": messages}
