"""
SmolTalk: general multi-turn conversations, for training (and validation loss) only.
https://huggingface.co/datasets/HuggingFaceTB/smol-smoltalk

There is no committed offline copy (~460K conversations); offline, SmolTalk raises and the committed
chat data (tasks.customjson.COMMITTED_IDENTITY_PATH, COMMITTED_DOLLY_PATH) is the substitute.
"""

from tasks.common import HubTask, check_messages, display_path
from tasks.customjson import COMMITTED_DOLLY_PATH, COMMITTED_IDENTITY_PATH

OFFLINE_HINT = ("Offline (NANOCHAT_OFFLINE=1 makes chat_sft do so), train on the committed chat "
                "conversations instead: CustomJSON(COMMITTED_IDENTITY_PATH) and "
                "CustomJSON(COMMITTED_DOLLY_PATH) from tasks.customjson "
                f"({display_path(COMMITTED_IDENTITY_PATH)}, "
                f"{display_path(COMMITTED_DOLLY_PATH)}).")


class SmolTalk(HubTask):

    name, hf_path = "SmolTalk", "HuggingFaceTB/smol-smoltalk"
    splits = ("train", "test")
    missing_hints = dict.fromkeys(splits, OFFLINE_HINT)

    def __init__(self, split, **kwargs):
        super().__init__(None, split, **kwargs)

    def get_example(self, index):
        messages = self.ds[index]["messages"]
        # the optional system message stays: render_conversation merges it into the first user message
        check_messages(messages, f"SmolTalk {self.split} row {index}", allow_system=True)
        return {"messages": messages}
