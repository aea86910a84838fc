"""
nanochat/ui.html and nanochat/logo.svg: static checks (self-contained, the exact strings of the spec, one script and
one style, same-origin API), the event-stream parser run under node on streams cut at every byte, and, when a
Chromium binary is installed, the real page in headless Chromium against a small in-process server that streams
its answer in awkward pieces.
"""

import base64
import json
import re
import shutil
import subprocess
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dev import browser_check
from dev.browser_check import DevToolsPipe, Page, find_chromium, run_check

NANOCHAT_DIR = Path(__file__).resolve().parent.parent / "nanochat"
UI_PATH = NANOCHAT_DIR / "ui.html"
LOGO_PATH = NANOCHAT_DIR / "logo.svg"
PARSER_START = "// ---- event-stream parsing"
PARSER_END = "// ---- end of event-stream parsing ----"
VOID_ELEMENTS = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

# Tokens chosen to straddle chunk boundaries: multi-byte UTF-8 (2, 3 and 4 bytes), a newline, quotes and text that
# looks like event-stream framing.
TOKENS = ["Hello", ", w\u00f6rld", " \U0001f642", "\nsecond line", ' says "data: x"', " \u65e5\u672c"]
ANSWER = "".join(TOKENS)
NO_CHROMIUM = "no Chromium binary on PATH (Debian package chromium-headless-shell)"


class PageStructure(HTMLParser):
    """Tag counts, attributes, script/style text and nesting problems of an HTML document."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.open_tags, self.problems, self.elements = [], [], []
        self.counts = Counter()
        self.text = {"script": "", "style": "", "title": ""}
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.counts[tag] += 1
        self.elements.append((tag, dict(attrs)))
        if tag not in VOID_ELEMENTS:
            self.open_tags.append(tag)

    def handle_startendtag(self, tag, attrs):  # <path .../> inside the inline SVG icons
        self.counts[tag] += 1
        self.elements.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if not self.open_tags or self.open_tags[-1] != tag:
            innermost = self.open_tags[-1] if self.open_tags else "nothing"
            self.problems.append(f"</{tag}> at line {self.getpos()[0]} while <{innermost}> is open")
        else:
            self.open_tags.pop()

    def handle_data(self, data):
        if self.open_tags and self.open_tags[-1] in self.text:
            self.text[self.open_tags[-1]] += data

    def element(self, element_id):
        return next(attrs for tag, attrs in self.elements if attrs.get("id") == element_id)


@pytest.fixture(scope="module")
def page_html():
    return UI_PATH.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def structure(page_html):
    return PageStructure(page_html)


# ---- static checks ----

def test_page_is_well_formed_with_one_script_and_one_style(structure):
    assert structure.problems == []
    assert structure.open_tags == []
    assert structure.counts["script"] == 1 and structure.counts["style"] == 1
    assert all("src" not in attrs for tag, attrs in structure.elements if tag == "script")
    assert structure.text["title"] == "NanoChat"
    icon = next(attrs for tag, attrs in structure.elements if tag == "link" and attrs.get("rel") == "icon")
    assert icon["href"] == "/logo.svg"


def test_page_loads_nothing_from_elsewhere(page_html, structure):
    assert not re.search(r"https?://", page_html, re.IGNORECASE)
    links = [attrs[name] for tag, attrs in structure.elements for name in ("src", "href") if name in attrs]
    assert links, "expected at least the favicon link"
    for link in links:
        # same-origin absolute paths only; "//host/x" would be protocol-relative, i.e. another site
        assert link.startswith("/") and not link.startswith("//"), link
    assert "@import" not in structure.text["style"]
    assert "url(" not in structure.text["style"]
    fetch_targets = re.findall(r"fetch\(([^,)]+)", structure.text["script"])
    assert fetch_targets and all(t.startswith("`${API_URL}/") for t in fetch_targets), fetch_targets


def test_api_url_is_same_origin(structure):
    assert re.findall(r"\bAPI_URL\s*=\s*([^;\n]+)", structure.text["script"]) == ["''"]


def test_page_carries_the_spec_strings(page_html, structure):
    assert structure.element("chat-input")["placeholder"] == "Ask anything"
    assert structure.element("new-chat-button")["title"] == "New Conversation (Ctrl+Shift+N)"
    assert re.search(r"<h1>\s*nanochat\s*</h1>", page_html)
    script = structure.text["script"]
    for text in [
        "Engine not running. Please start engine.py first.",
        "Current temperature: ${currentTemperature}",
        "Temperature set to ${value}",
        "Invalid temperature. Must be between 0.0 and 2.0",
        "Current top-k: ${currentTopK}",
        "Top-k set to ${value}",
        "Invalid top-k. Must be between 1 and 200",
        "HTTP error! status: ${response.status}",
        "Error: ${errorMessage}",
        "Click to edit and restart from here",
        "Click to regenerate this response",
        "/chat/completions",
        "/health",
    ]:
        assert text in script, text
    help_lines = re.search(r"const HELP_TEXT = \[(.*?)\]\.join", script, re.DOTALL).group(1)
    for form in ["/temperature ", "/temperature <value>", "/topk ", "/topk <value>", "/clear ", "/help "]:
        assert f"'{form}" in help_lines, form
    for field in ["messages: history", "temperature: currentTemperature", "top_k: currentTopK", "max_tokens:"]:
        assert field in script, field


def test_message_text_is_never_parsed_as_html(structure):
    script = structure.text["script"]
    for sink in ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"]:
        assert sink not in script, sink
    assert "textContent" in script


def test_settings_controls_match_the_slash_command_ranges(structure):
    temperature = structure.element("temperature-input")
    top_k = structure.element("topk-input")
    fields = ("type", "min", "max", "value")
    assert [temperature[f] for f in fields] == ["number", "0", "2", "0.8"]
    assert [top_k[f] for f in fields] == ["number", "1", "200", "50"]
    script = structure.text["script"]
    assert "let currentTemperature = 0.8;" in script and "let currentTopK = 50;" in script


def test_logo_is_a_self_contained_svg():
    root = ET.parse(LOGO_PATH).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert len(root.get("viewBox").split()) == 4
    tags = {element.tag.split("}")[-1] for element in root.iter()}
    assert "script" not in tags and "image" not in tags and "foreignObject" not in tags
    for element in root.iter():
        for name, value in element.attrib.items():
            assert not (name.endswith("href") and not value.startswith("#")), (name, value)


# ---- the event-stream parser, run under node ----

def event_bytes(payload, newline="\n"):
    return f"data: {json.dumps(payload, ensure_ascii=False)}{newline}{newline}".encode()


def stream_events():
    return [{"token": token, "gpu": 0} for token in TOKENS] + [{"done": True}]


def run_parser_in_node(tmp_path, scenarios):
    """Feed each scenario (a list of byte chunks) to createEventStreamParser from ui.html; return the payloads."""
    script = PageStructure(UI_PATH.read_text(encoding="utf-8")).text["script"]
    parser_source = script[script.index(PARSER_START):script.index(PARSER_END)]
    harness = parser_source + """
const scenarios = JSON.parse(require('fs').readFileSync(0, 'utf8'));
const results = scenarios.map((chunks) => {
  const parser = createEventStreamParser();
  const payloads = [];
  for (const chunk of chunks) payloads.push(...parser.push(Uint8Array.from(Buffer.from(chunk, 'base64'))));
  payloads.push(...parser.finish());
  return payloads;
});
process.stdout.write(JSON.stringify(results));
"""
    harness_path = tmp_path / "parser_harness.js"
    harness_path.write_text(harness, encoding="utf-8")
    encoded = [[base64.b64encode(chunk).decode() for chunk in chunks] for chunks in scenarios]
    result = subprocess.run(["node", str(harness_path)], input=json.dumps(encoded), capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


needs_node = pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")


@needs_node
def test_parser_survives_any_chunk_boundary(tmp_path):
    expected = stream_events()
    stream = b"".join(event_bytes(event) for event in expected)
    scenarios = [[stream[:cut], stream[cut:]] for cut in range(len(stream) + 1)]
    scenarios.append([stream[i:i + 1] for i in range(len(stream))])
    crlf_stream = b"".join(event_bytes(event, "\r\n") for event in expected)
    scenarios.append([crlf_stream[i:i + 3] for i in range(0, len(crlf_stream), 3)])
    results = run_parser_in_node(tmp_path, scenarios)
    assert len(results) == len(scenarios)
    for index, payloads in enumerate(results):
        assert payloads == expected, f"scenario {index}"


@needs_node
def test_parser_skips_noise_and_keeps_an_unterminated_last_event(tmp_path):
    scenarios = [
        [b'data: {"token": "a"}\n\ndata: {broken\n\ndata: {"token": "b"}\n\n'],
        [b': keep-alive\n\nevent: message\ndata: {"token": "c"}\nid: 7\n\n'],
        [b'data:{"token":"d"}\n\n'],
        [b'data: {"token": "e"}\n\ndata: {"done": true}'],
        [b'data: {"token": "\xf0\x9f', b'\x99\x82"}\n', b"\n"],
    ]
    results = run_parser_in_node(tmp_path, scenarios)
    assert results == [
        [{"token": "a"}, {"token": "b"}],
        [{"token": "c"}],
        [{"token": "d"}],
        [{"token": "e"}, {"done": True}],
        [{"token": "\U0001f642"}],
    ]


# ---- the page in headless Chromium ----

class FakeChatHandler(BaseHTTPRequestHandler):
    """Serves the real page; /chat/completions streams ANSWER cut inside lines, JSON and UTF-8 characters."""

    def log_message(self, format, *args):
        pass

    def reply(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            self.reply(200, "text/html; charset=utf-8", UI_PATH.read_bytes())
        elif self.path == "/logo.svg":
            self.reply(200, "image/svg+xml", LOGO_PATH.read_bytes())
        elif self.path == "/health" and self.server.healthy:
            self.reply(200, "application/json", b'{"status": "ok", "ready": true}')
        else:
            self.reply(404 if self.path != "/health" else 503, "text/plain", b"no")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append(body)
        if self.server.failure is not None:
            status, detail = self.server.failure
            self.server.failure = None
            self.reply(status, "application/json", json.dumps({"detail": detail}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()  # HTTP/1.0 without a length: the body ends when the connection closes
        pieces = self.server.stream_pieces()
        if self.server.stream_error is not None:  # one token, then the error event of nanochat/server.py
            pieces = [event_bytes(stream_events()[0]), event_bytes({"error": self.server.stream_error})]
        try:
            for piece in pieces:
                self.wfile.write(piece)
                self.wfile.flush()
                time.sleep(self.server.piece_delay)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the page stopped reading (stop button, new conversation)


class FakeChatServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), FakeChatHandler)
        self.requests = []
        self.failure = None  # (status, detail) to answer the next /chat/completions with
        self.healthy = True
        self.stream_error = None  # an error event to end every stream with
        self.piece_delay = 0.005  # seconds between pieces, so that they reach the page as separate reads

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"

    @staticmethod
    def stream_pieces():
        stream = b"".join(event_bytes(event) for event in stream_events())
        emoji_at = stream.index("\U0001f642".encode())
        cuts = sorted(set(range(0, len(stream), 13)) | {emoji_at + 2, stream.index(b"\n\n") + 1})
        return [stream[a:b] for a, b in zip(cuts, cuts[1:] + [len(stream)])]


@pytest.fixture
def fake_server():
    server = FakeChatServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def test_browser_check_reports_missing_chromium(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert browser_check.main(["--url", "http://127.0.0.1:9"]) == 1
    assert "chromium not found" in capsys.readouterr().err


@pytest.mark.skipif(find_chromium() is None, reason=NO_CHROMIUM)
def test_browser_check_sees_the_streamed_answer(fake_server):
    result = run_check(fake_server.url, message="Hi there", temperature=0.5, timeout=30)
    assert result["answer"] == ANSWER
    assert fake_server.requests == [
        {"messages": [{"role": "user", "content": "Hi there"}], "temperature": 0.5, "top_k": 50, "max_tokens": 512}
    ]


BUBBLE_ROLES_JS = """[...document.querySelectorAll('#chat-container .message')].map(
  (b) => ['user', 'assistant', 'console'].find((role) => b.classList.contains(role)))"""


@pytest.fixture
def page(fake_server, tmp_path):
    """The chat page loaded from fake_server in a fresh headless Chromium."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip(NO_CHROMIUM)
    with open(tmp_path / "chromium.log", "wb") as log:
        browser = DevToolsPipe(chromium, tmp_path / "profile", log)
    try:
        page = Page(browser)
        page.call("Page.navigate", {"url": f"{fake_server.url}/"})
        page.wait_for(lambda s: s["ready"], 30, "the page")
        yield page
    finally:
        browser.close()


def answered(count, server):
    """Page-state condition: the server saw `count` requests and the page is no longer generating."""
    return lambda s: len(server.requests) == count and not s["generating"]


def test_page_regenerate_error_and_edit_keep_messages_in_step(page, fake_server):
    page.type_and_enter("/help")
    assert "/topk <value>" in page.wait_for(lambda s: s["console"], 10, "/help")["console"]
    page.type_and_enter("first question")
    page.wait_for(answered(1, fake_server), 10, "the first answer")
    # the console bubble sits before the answer: regenerating must still cut `messages` at the answer
    page.evaluate("document.querySelector('.message.assistant').click()")
    assert page.wait_for(answered(2, fake_server), 10, "regeneration")["assistant"] == ANSWER
    assert fake_server.requests[1]["messages"] == [{"role": "user", "content": "first question"}]
    assert page.evaluate(BUBBLE_ROLES_JS) == ["console", "user", "assistant"]

    fake_server.failure = (400, "Message 2 is too long")
    page.type_and_enter("second question")
    state = page.wait_for(answered(3, fake_server), 10, "the error", allow_error=True)
    assert state["error"] == "Error: HTTP error! status: 400 (Message 2 is too long)"
    page.type_and_enter("third question")
    page.wait_for(answered(4, fake_server), 10, "the third answer", allow_error=True)
    first_turn = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": ANSWER}]
    assert fake_server.requests[3]["messages"] == first_turn + [
        {"role": "user", "content": "second question"}, {"role": "user", "content": "third question"}]

    # editing the second question drops it, the error bubble and everything after it
    page.evaluate("document.querySelectorAll('.message.user')[1].click()")
    assert page.evaluate(BUBBLE_ROLES_JS) == ["console", "user", "assistant"]
    assert page.evaluate("document.getElementById('chat-input').value") == "second question"
    page.press_enter()
    page.wait_for(answered(5, fake_server), 10, "the edited answer")
    assert fake_server.requests[4]["messages"] == first_turn + [{"role": "user", "content": "second question"}]


def test_page_stop_new_conversation_error_event_and_health_failure(page, fake_server):
    fake_server.piece_delay = 0.1  # a stream of about two seconds, long enough to interrupt
    page.type_and_enter("slow one")
    page.wait_for(lambda s: s["generating"] and s["assistant"], 10, "the first streamed text")
    page.evaluate("document.getElementById('stop-button').click()")
    partial = page.wait_for(lambda s: not s["generating"], 10, "the stop")["assistant"]
    assert partial and ANSWER.startswith(partial) and partial != ANSWER
    page.type_and_enter("go on")
    page.wait_for(lambda s: len(fake_server.requests) == 2 and s["generating"] and s["assistant"], 10,
                  "text of the second answer")
    assert fake_server.requests[1]["messages"][1] == {"role": "assistant", "content": partial}

    # a new conversation in mid-stream: the old stream must not write into the new, empty one
    page.evaluate("document.getElementById('new-chat-button').click()")
    assert page.evaluate(BUBBLE_ROLES_JS) == []
    time.sleep(0.5)
    assert page.evaluate(BUBBLE_ROLES_JS) == [] and not page.state()["generating"]
    fake_server.piece_delay = 0.0
    page.type_and_enter("fresh start")
    page.wait_for(answered(3, fake_server), 10, "a fresh answer")
    assert fake_server.requests[2]["messages"] == [{"role": "user", "content": "fresh start"}]

    fake_server.stream_error = "Generation failed on the server"
    page.type_and_enter("break, please")
    state = page.wait_for(answered(4, fake_server), 10, "the error event", allow_error=True)
    assert state["error"] == "Error: Generation failed on the server"

    fake_server.healthy = False
    page.call("Page.reload")
    state = page.wait_for(lambda s: s["ready"] and s["error"], 10, "the health failure", allow_error=True)
    assert state["error"] == "Engine not running. Please start engine.py first."


INPUT_HEIGHT_JS = "document.getElementById('chat-input').offsetHeight"


def test_page_input_grows_shift_enter_and_ctrl_shift_n(page, fake_server):
    one_line = page.evaluate(INPUT_HEIGHT_JS)
    page.type_and_enter("   ")
    assert not page.state()["sendEnabled"] and fake_server.requests == []  # blank input: nothing is sent
    page.evaluate("document.getElementById('chat-input').value = ''")
    page.call("Input.insertText", {"text": "line one"})
    shift_enter = {"modifiers": 8, **browser_check.ENTER_KEY}  # 8: the DevTools modifier bit for Shift
    page.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **shift_enter})
    page.call("Input.dispatchKeyEvent", {"type": "keyUp", **shift_enter})
    page.call("Input.insertText", {"text": "line two"})
    assert page.evaluate("document.getElementById('chat-input').value") == "line one\nline two"
    assert fake_server.requests == [] and page.evaluate(INPUT_HEIGHT_JS) > one_line
    page.call("Input.insertText", {"text": "\nmore" * 30})
    assert page.evaluate(INPUT_HEIGHT_JS) == 200  # the spec caps the textarea at 200 px
    page.press_enter()
    page.wait_for(answered(1, fake_server), 10, "the answer")
    assert fake_server.requests[0]["messages"][0]["content"].startswith("line one\nline two\nmore")
    assert page.evaluate(INPUT_HEIGHT_JS) == one_line

    n_key = {"key": "N", "code": "KeyN", "windowsVirtualKeyCode": 78, "modifiers": 2 | 8}  # Ctrl | Shift
    page.call("Input.dispatchKeyEvent", {"type": "keyDown", **n_key})
    page.call("Input.dispatchKeyEvent", {"type": "keyUp", **n_key})
    assert page.evaluate(BUBBLE_ROLES_JS) == []
