"""
The chat server's request schemas and their validation: the reference endpoint's (ChatRequest, checked by
validate_chat_request with the reference's messages, HTTP 400) and OpenAI's (OpenAIChatRequest, checked by
openai_turns and openai_stops; OpenAICompletionRequest, by completion_prompts and openai_stops; both by
requested_logprobs; APIError carries the status and OpenAI's param and code). Limits are the reference's
abuse-prevention ones, on both APIs, plus OpenAI's for n, stop and log-probabilities.

The checks are code, so that each failure gets its own message (the reference's, on its endpoint); the
schema states the same limits (`limits`, `one_of`), so the OpenAPI document at /openapi.json says what a
request must be for the server to take it.
"""

from pydantic import BaseModel, Field, StrictBool, StrictFloat, StrictInt

# Abuse prevention: the reference's limits, on both APIs
MAX_MESSAGES_PER_REQUEST = 500
MAX_MESSAGE_LENGTH = 8000  # characters per message
MAX_TOTAL_CONVERSATION_LENGTH = 32000  # characters, summed over the messages
SAMPLING_LIMITS = {"temperature": (0.0, 2.0), "top_k": (0, 200), "max_tokens": (1, 4096)}  # top_k 0: off

# OpenAI API limits
MAX_CHOICES = 8  # n: every choice takes a batch slot, so far below OpenAI's 128
MAX_STOP_SEQUENCES = 4  # OpenAI's limit for `stop`
MAX_STOP_LENGTH = 256  # characters per stop string: each is searched for in the reply at every token
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # the completions' logprobs (the likeliest tokens given with each)


def limits(default=..., **json_schema):
    """A field whose JSON schema carries these keywords (minimum, maxLength, ...); the code checks them."""
    return Field(default, json_schema_extra=json_schema)


def sampling_range(name):
    low, high = SAMPLING_LIMITS[name]
    return limits(None, minimum=low, maximum=high)


def one_of(*values):
    return limits(enum=list(values))


class APIError(Exception):
    """A client-facing error: {"detail": message} on the reference endpoints, the OpenAI body on /v1."""

    def __init__(self, status, message, param=None, code=None, type="invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


# -----------------------------------------------------------------------------
# The reference API: request schema and validation

class ChatMessage(BaseModel):
    role: str = one_of("user", "assistant")
    content: str = limits(minLength=1, maxLength=MAX_MESSAGE_LENGTH)


class ChatRequest(BaseModel):
    messages: list[ChatMessage] = limits(minItems=1, maxItems=MAX_MESSAGES_PER_REQUEST)
    temperature: float | None = sampling_range("temperature")
    max_tokens: int | None = sampling_range("max_tokens")
    top_k: int | None = sampling_range("top_k")


def check_text(text, max_length, param, what):
    """APIError for `param` when the text is longer than max_length characters or is not valid Unicode, which
    the tokenizer cannot take: JSON's "\\ud800" escapes decode to lone surrogates."""
    if len(text) > max_length:
        raise APIError(400, f"{what} is too long: at most {max_length} characters", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"{what} is not valid Unicode text (it holds a lone surrogate): send UTF-8 text",
                       param) from None


def validate_chat_request(request):
    """The reference's checks, in its order and with its messages (HTTP 400)."""
    messages = request.messages
    if len(messages) == 0:
        raise APIError(400, "At least one message is required")
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise APIError(400, f"Too many messages. Maximum {MAX_MESSAGES_PER_REQUEST} messages allowed per "
                            f"request")
    for i, message in enumerate(messages):
        if not message.content:
            raise APIError(400, f"Message {i} has empty content")
        if len(message.content) > MAX_MESSAGE_LENGTH:
            raise APIError(400, f"Message {i} is too long. Maximum {MAX_MESSAGE_LENGTH} characters allowed "
                                f"per message")
    if sum(len(message.content) for message in messages) > MAX_TOTAL_CONVERSATION_LENGTH:
        raise APIError(400, f"Total conversation is too long. Maximum {MAX_TOTAL_CONVERSATION_LENGTH} "
                            f"characters allowed")
    for i, message in enumerate(messages):
        if message.role not in ("user", "assistant"):
            raise APIError(400, f"Message {i} has invalid role. Must be 'user', 'assistant', or 'system'")
    for name, label in (("temperature", "Temperature"), ("top_k", "top_k"), ("max_tokens", "max_tokens")):
        value, (low, high) = getattr(request, name), SAMPLING_LIMITS[name]
        if value is not None and not low <= value <= high:  # written so that NaN fails too
            raise APIError(400, f"{label} must be between {low} and {high}")
    for i, message in enumerate(messages):
        check_text(message.content, MAX_MESSAGE_LENGTH, None, f"Message {i}")  # its length passed above


# -----------------------------------------------------------------------------
# The OpenAI API: request schema and validation

def required(*names):
    """A model's json_schema_extra: the named fields are required and not null in its schema. They are
    optional in the model so that their absence gets the code's message rather than pydantic's."""
    def edit(schema):
        schema["required"] = [*schema.get("required", []), *names]
        for name in names:
            field = schema["properties"][name]
            field["anyOf"] = [branch for branch in field["anyOf"] if branch.get("type") != "null"]
            field.pop("default", None)
    return edit


class ContentPart(BaseModel, json_schema_extra=required("text")):
    type: str = one_of("text")
    text: str | None = None


class OpenAIMessage(BaseModel, json_schema_extra=required("content")):
    role: str = one_of("system", "developer", "user", "assistant")
    content: str | list[ContentPart] | None = limits(None, maxLength=MAX_MESSAGE_LENGTH)


class StreamOptions(BaseModel):
    include_usage: StrictBool | None = None


class OpenAISampling(BaseModel):
    """What both OpenAI endpoints take besides their prompt. Unknown fields (user, tools, ...) are
    ignored, as in every model here (pydantic's default); a field that would change the reply's shape
    (suffix) is declared, so that asking for it is a 400 rather than a reply without it. Types
    are strict, as OpenAI's: "max_tokens": false or "stream": "yes" is an error, not 0 or True."""
    model: str | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    temperature: StrictFloat | None = sampling_range("temperature")
    top_p: StrictFloat | None = limits(None, exclusiveMinimum=0, maximum=1)
    top_k: StrictInt | None = sampling_range("top_k")  # an extension: OpenAI has no top-k
    max_tokens: StrictInt | None = sampling_range("max_tokens")
    stop: str | list[str] | None = limits(None, minLength=1, maxLength=MAX_STOP_LENGTH,
                                          maxItems=MAX_STOP_SEQUENCES, items={"minLength": 1})
    n: StrictInt | None = limits(None, minimum=1, maximum=MAX_CHOICES)
    seed: StrictInt | None = None


class OpenAIChatRequest(OpenAISampling):
    messages: list[OpenAIMessage] = limits(minItems=1, maxItems=MAX_MESSAGES_PER_REQUEST)
    max_completion_tokens: StrictInt | None = sampling_range("max_tokens")  # OpenAI's newer name; wins
    logprobs: StrictBool | None = None
    top_logprobs: StrictInt | None = limits(None, minimum=0, maximum=MAX_TOP_LOGPROBS)  # needs logprobs


class OpenAICompletionRequest(OpenAISampling):
    # text (BOS goes in front) or token ids, as sent, or a batch of either; strict: true is no id
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] = limits(
        minLength=1, maxLength=MAX_TOTAL_CONVERSATION_LENGTH, minItems=1, items={"minimum": 0})
    logprobs: StrictInt | None = limits(None, minimum=0, maximum=MAX_COMPLETION_LOGPROBS)
    echo: StrictBool | None = None  # the prompt first in the reply (its log-probabilities too, if asked)
    suffix: str | None = limits(None, enum=[None])  # not supported: a 400 (openai_stops)


def message_text(message, i):
    """The text of an OpenAI message: a string, or its text parts concatenated."""
    if isinstance(message.content, str):
        return message.content
    if message.content is None:
        raise APIError(400, f"messages[{i}].content is required", f"messages[{i}].content")
    for j, part in enumerate(message.content):
        if part.type != "text":
            raise APIError(400, f"messages[{i}].content: only text parts are supported, "
                                f"got type {part.type!r}", f"messages[{i}].content")
        if part.text is None:
            param = f"messages[{i}].content[{j}].text"
            raise APIError(400, f"{param} is required: a text part is {{\"type\": \"text\", \"text\": ...}}",
                           param)
    return "".join(part.text for part in message.content)


def openai_turns(messages):
    """
    (turns, system) from OpenAI messages: the user and assistant messages as [(role, text)] in their order
    (any order, as OpenAI takes them; each becomes its own turn, as on the reference endpoint), and the
    system (or developer) messages joined, for fit_chat_prompt to merge into the first user message as
    training data does; without a user message the system text is the first turn. Limits as on the reference
    endpoint, in characters.
    """
    if not messages:
        raise APIError(400, "messages must contain at least one message", "messages")
    if len(messages) > MAX_MESSAGES_PER_REQUEST:
        raise APIError(400, f"Too many messages: at most {MAX_MESSAGES_PER_REQUEST} are allowed", "messages")
    system, turns, total_length = [], [], 0
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role {message.role!r} is not supported: "
                                f"use 'system', 'user' or 'assistant'", f"messages[{i}].role")
        text = message_text(message, i)
        check_text(text, MAX_MESSAGE_LENGTH, f"messages[{i}].content", f"messages[{i}]")
        total_length += len(text)
        if role == "system":
            system.append(text)
        else:
            turns.append((role, text))
    if total_length > MAX_TOTAL_CONVERSATION_LENGTH:
        raise APIError(400, f"The conversation is too long: at most {MAX_TOTAL_CONVERSATION_LENGTH} "
                            f"characters", "messages")
    if system and not any(role == "user" for role, _ in turns):
        return [("user", "\n\n".join(system)), *turns], ""
    return turns, "\n\n".join(system)


def completion_prompts(tokenizer, prompt):
    """The token ids of each /v1/completions prompt: one prompt (text, or token ids) or a batch of them (a
    list of texts, or of token-id lists). Text gets BOS in front, as base models were trained; ids are taken
    as they are. The texts' limit is the conversations' (MAX_TOTAL_CONVERSATION_LENGTH), over the batch."""
    batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
    if not prompt or not all(batch):
        raise APIError(400, "prompt must not be empty (nor any prompt of a batch)", "prompt")
    if isinstance(batch[0], str):
        check_text("".join(batch), MAX_TOTAL_CONVERSATION_LENGTH, "prompt", "prompt")
        return [tokenizer.encode(text, prepend=tokenizer.get_bos_token_id()) for text in batch]
    vocab_size = tokenizer.get_vocab_size()
    if not all(0 <= t < vocab_size for ids in batch for t in ids):
        raise APIError(400, f"prompt: token ids must be in [0, {vocab_size})", "prompt")
    return batch


def check_range(value, low, high, param, low_inclusive=True):
    if value is None:
        return
    above_low = low <= value if low_inclusive else low < value
    if not (above_low and value <= high):  # written so that NaN fails too
        interval = f"{'[' if low_inclusive else '('}{low}, {high}]"
        raise APIError(400, f"Invalid value for '{param}': {value} is not in {interval}", param)


def requested_logprobs(request):
    """How many likeliest tokens each token's log-probability comes with (None: no log-probabilities): chat's
    logprobs (true) and top_logprobs, or the completions' logprobs; APIError beyond OpenAI's limits."""
    if isinstance(request, OpenAIChatRequest):
        check_range(request.top_logprobs, 0, MAX_TOP_LOGPROBS, "top_logprobs")
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError(400, "Invalid value for 'top_logprobs': it needs 'logprobs': true", "top_logprobs")
        return (request.top_logprobs or 0) if request.logprobs else None
    if isinstance(request, OpenAICompletionRequest):
        check_range(request.logprobs, 0, MAX_COMPLETION_LOGPROBS, "logprobs")
        return request.logprobs
    return None  # the reference endpoint has none


def openai_stops(request):
    """The request's parameters checked (APIError for the first bad one); returns its stop strings."""
    for name, (low, high) in SAMPLING_LIMITS.items():
        check_range(getattr(request, name), low, high, name)
    check_range(getattr(request, "max_completion_tokens", None), *SAMPLING_LIMITS["max_tokens"],
                "max_completion_tokens")
    check_range(request.top_p, 0.0, 1.0, "top_p", low_inclusive=False)
    check_range(request.n, 1, MAX_CHOICES, "n")
    if request.stream_options is not None and not request.stream:  # OpenAI's 400 too
        raise APIError(400, "Invalid value for 'stream_options': it needs 'stream': true", "stream_options")
    if getattr(request, "suffix", None) is not None:  # on /v1/completions only
        raise APIError(400, "Invalid value for 'suffix': a suffix (insertion) is not supported by this "
                            "server (leave it out)", "suffix")
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise APIError(400, f"Invalid value for 'stop': at most {MAX_STOP_SEQUENCES} sequences", "stop")
    if any(not s for s in stops):
        raise APIError(400, "Invalid value for 'stop': empty strings are not allowed", "stop")
    for stop in stops:
        check_text(stop, MAX_STOP_LENGTH, "stop", "A stop string")
    return stops
