"""
Chat text, one path for the terminal chat (scripts/chat_cli.py) and the server (nanochat/server.py): a
conversation fitted into the model's context (tokenizer.fit_chat_prompt), and a reply's token ids turned
into text as they stream (ReplyText, over tokenizer.StreamDecoder).
"""

from nanochat.tokenizer import StreamDecoder, fit_chat_prompt, prompt_budget


class ReplyText:
    """
    Token ids in, text deltas out, decoded by a StreamDecoder (whole characters; tool calls as their literal
    names). Text that could be the start of a stop string is held back until it is known not to be one;
    `stopped` turns True at the first stop string, which is cut from the text.
    """

    def __init__(self, tokenizer, stops=()):
        self.stops = list(stops)
        self.decoder = StreamDecoder(tokenizer)
        self.held = ""  # decoded, not yet released
        self.text = ""  # released
        self.stopped = False

    def add(self, token_id):
        return self._release(self.decoder.add(token_id), final=False)

    def finish(self):
        """The rest, at the end of the reply (an incomplete character becomes U+FFFD)."""
        return self._release(self.decoder.finish(), final=True)

    def _release(self, decoded, final):
        if self.stopped:  # nothing after the stop string is shown
            return ""
        self.held += decoded
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.held = self.held[:min(found)], ""
        else:
            keep = 0 if final else self._stop_prefix_len()
            out, self.held = self.held[:len(self.held) - keep], self.held[len(self.held) - keep:]
        self.text += out
        return out

    def _stop_prefix_len(self):
        """Length of the longest tail of the held text that some stop string starts with."""
        for n in range(min(len(self.held), max(map(len, self.stops), default=0)), 0, -1):
            if any(s.startswith(self.held[-n:]) for s in self.stops):
                return n
        return 0


class Conversation:
    """
    A chat's exchanges so far, each (user text, reply tokens ending in <|assistant_end|>): the replies stay
    the model's own tokens. prompt() fits them and a new message into the context, leaving room for a
    max_tokens reply (prompt_budget); the oldest exchanges that no longer fit are forgotten.
    """

    def __init__(self, tokenizer, context_len, max_tokens, system=""):
        self.tokenizer, self.system = tokenizer, system
        self.budget = prompt_budget(context_len, max_tokens)
        self.exchanges = []

    def prompt(self, user_text):
        """(the prompt for the reply to user_text, how many of the oldest exchanges were forgotten)"""
        turns = []
        for text, reply in self.exchanges:
            turns += [("user", text), ("assistant", reply[:-1])]  # the reply without its <|assistant_end|>
        turns.append(("user", user_text))
        prompt, dropped = fit_chat_prompt(self.tokenizer, turns, self.budget, self.system)
        forgotten = (dropped + 1) // 2  # an exchange whose question no longer fits is forgotten
        del self.exchanges[:forgotten]
        return prompt, forgotten

    def add(self, user_text, reply):
        self.exchanges.append((user_text, reply))


def stream_reply(engine, prompt, on_text, **sampling):
    """
    Generate the reply to prompt with engine.generate(**sampling), handing its text to on_text as it becomes
    whole (ReplyText; the terminal token is not shown). Returns the reply tokens, always ending in
    <|assistant_end|> (appended when max_tokens cut the reply).
    """
    tokenizer = engine.tokenizer
    assistant_end = tokenizer.encode_special("<|assistant_end|>")
    text = ReplyText(tokenizer)
    reply = []
    for column, _ in engine.generate(prompt, num_samples=1, **sampling):
        if column[0] in (assistant_end, tokenizer.get_bos_token_id()):
            break
        reply.append(column[0])
        on_text(text.add(column[0]))
    on_text(text.finish())
    return reply + [assistant_end]
