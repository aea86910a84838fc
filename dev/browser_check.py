"""
Headless-Chromium check of the chat page served by a running server: load the page, set the temperature with
the /temperature slash command, type a message, press Enter, and wait until a streamed assistant answer has
arrived (non-empty text in the assistant bubble, no error box, generation finished).

    python -m scripts.chat_web --device-type cpu &       # or any server with the same endpoints
    python -m dev.browser_check --url http://127.0.0.1:8000
    python -m dev.browser_check --url http://127.0.0.1:8000 --screenshot /tmp/chat.png

Exit status 0 when the answer arrived, 1 otherwise (the reason goes to stderr). Chromium is driven over the
DevTools protocol through --remote-debugging-pipe (JSON messages ended by a NUL byte on the browser's fds 3
and 4), so nothing beyond the standard library is needed, only a Chromium binary: the Debian package
chromium-headless-shell (or chromium). The page is read through the DOM of nanochat/ui.html: the ids
chat-input, send-button, temperature-input and the classes message, user, assistant, console, unanswered,
error-message and body.generating.
"""

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

# Binary names of the Debian packages chromium-headless-shell and chromium, then of other distributions.
CHROMIUM_NAMES = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome-stable",
                  "google-chrome", "headless_shell")
POLL_INTERVAL_S = 0.1
PAGE_LOAD_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 30.0  # one DevTools round trip; only a wedged browser takes this long
# Chromium reads DevTools commands on its fd 3 and writes replies on fd 4. This launcher moves the two pipe
# ends there and execs the browser (a preexec_fn could do the same, but is unsafe in a process that runs
# threads, such as a test that also serves the page).
FD_LAUNCHER = ("import os, sys; src_in, src_out = int(sys.argv[1]), int(sys.argv[2]); os.dup2(src_in, 3); "
               "os.dup2(src_out, 4); os.close(src_in); os.close(src_out); "
               "os.execv(sys.argv[3], sys.argv[3:])")
ENTER_KEY = {"key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "nativeVirtualKeyCode": 13}

# What the check needs to know about the page, read in one round trip.
PAGE_STATE_JS = """(() => {
  if (document.readyState !== 'complete' || !document.getElementById('chat-container')) return {ready: false};
  const bubbles = [...document.querySelectorAll('#chat-container .message')];
  const last = (role) => bubbles.filter((b) => b.classList.contains(role)).pop() || null;
  const text = (b) => (b ? b.querySelector('.message-content').textContent : null);
  const assistant = last('assistant');
  const error = document.querySelector('#chat-container .error-message');
  return {
    ready: true,
    generating: document.body.classList.contains('generating'),
    sendEnabled: !document.getElementById('send-button').disabled,
    temperature: document.getElementById('temperature-input').value,
    user: text(last('user')),
    console: text(last('console')),
    assistant: text(assistant),
    unanswered: !!assistant && assistant.classList.contains('unanswered'),
    error: error ? error.textContent : null,
  };
})()"""


class CheckFailed(RuntimeError):
    """The page did not behave; the message says how."""


def find_chromium(explicit=None):
    """Path of the Chromium binary to use: the explicit one if given, else the first known name on PATH."""
    if explicit:
        return shutil.which(explicit)
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class DevToolsPipe:
    """A Chromium process and its DevTools connection over --remote-debugging-pipe."""

    def __init__(self, chromium, user_data_dir, stderr):
        to_browser_read, self._to_browser = os.pipe()
        self._from_browser, from_browser_write = os.pipe()
        # The child's ends go above 3 and 4 first, so that moving one into place cannot overwrite the other.
        child_in = fcntl.fcntl(to_browser_read, fcntl.F_DUPFD_CLOEXEC, 10)
        child_out = fcntl.fcntl(from_browser_write, fcntl.F_DUPFD_CLOEXEC, 10)
        os.close(to_browser_read)
        os.close(from_browser_write)
        command = [chromium, "--headless", "--remote-debugging-pipe", f"--user-data-dir={user_data_dir}",
                   "--no-first-run", "--no-default-browser-check", "--disable-gpu", "--disable-extensions",
                   "--disable-dev-shm-usage", "--window-size=1100,800"]
        if os.geteuid() == 0:
            # Chromium refuses to start as root with its sandbox on (containers, CI)
            command.append("--no-sandbox")
        launcher = [sys.executable, "-I", "-S", "-c", FD_LAUNCHER, str(child_in), str(child_out)]
        self.process = subprocess.Popen(launcher + command + ["about:blank"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=stderr,
                                        pass_fds=(child_in, child_out))
        os.close(child_in)
        os.close(child_out)
        self._buffer = b""
        self._last_id = 0
        self.events = []  # every event that arrived while waiting for a reply, in order

    def call(self, method, params=None, session_id=None, timeout=COMMAND_TIMEOUT_S):
        """Send one command and return its result; events read meanwhile are kept in self.events."""
        self._last_id += 1
        message = {"id": self._last_id, "method": method, "params": params or {}}
        if session_id:
            message["sessionId"] = session_id
        data = json.dumps(message).encode() + b"\0"
        try:
            while data:
                data = data[os.write(self._to_browser, data):]
        except BrokenPipeError as e:
            raise CheckFailed(f"chromium exited (status {self.process.poll()}) before {method}") from e
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read_message(deadline, method)
            if reply.get("id") != self._last_id:
                self.events.append(reply)
            elif "error" in reply:
                raise CheckFailed(f"DevTools {method} failed: {reply['error'].get('message')}")
            else:
                return reply.get("result", {})

    def _read_message(self, deadline, method):
        while b"\0" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CheckFailed(f"chromium did not answer {method} in time")
            ready, _, _ = select.select([self._from_browser], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise CheckFailed(f"chromium exited (status {self.process.poll()}) during {method}")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def close(self):
        try:
            if self.process.poll() is None:
                self.call("Browser.close", timeout=5)
        except (CheckFailed, OSError):
            pass  # the browser is killed below anyway
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)


class Page:
    """One tab, attached with a flat session so that its commands travel over the browser pipe."""

    def __init__(self, browser):
        self.browser = browser
        target_id = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        attached = browser.call("Target.attachToTarget", {"targetId": target_id, "flatten": True})
        self.session_id = attached["sessionId"]
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method, params=None):
        return self.browser.call(method, params, session_id=self.session_id)

    def evaluate(self, expression):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in result:
            raise CheckFailed(f"evaluating {expression[:60]!r} threw: "
                              f"{describe_exception(result['exceptionDetails'])}")
        return result["result"].get("value")

    def state(self):
        self.raise_page_exceptions()
        return self.evaluate(PAGE_STATE_JS)

    def raise_page_exceptions(self):
        for event in self.browser.events:
            if event.get("method") == "Runtime.exceptionThrown" and event.get("sessionId") == self.session_id:
                raise CheckFailed("the page threw: "
                                  f"{describe_exception(event['params']['exceptionDetails'])}")

    def wait_for(self, condition, timeout, what, allow_error=False):
        """Poll the page state until condition(state) holds; fail with `what` and the last state otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.state()
            if state.get("error") and not allow_error:
                raise CheckFailed(f"the page shows an error while waiting for {what}: {state['error']!r}")
            if condition(state):
                return state
            if time.monotonic() > deadline:
                raise CheckFailed(f"timed out after {timeout:.0f} s waiting for {what}; page state: {state}")
            time.sleep(POLL_INTERVAL_S)

    def type_and_enter(self, text):
        """Type into the chat input the way a person would: focus, insert the text, press Enter."""
        self.evaluate("document.getElementById('chat-input').focus()")
        self.call("Input.insertText", {"text": text})
        self.press_enter()

    def press_enter(self):
        self.call("Input.dispatchKeyEvent", {"type": "keyDown", "text": "\r", **ENTER_KEY})
        self.call("Input.dispatchKeyEvent", {"type": "keyUp", **ENTER_KEY})

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))


def describe_exception(details):
    exception = details.get("exception") or {}
    return exception.get("description") or details.get("text", "unknown exception")


def check_server(url):
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=10) as response:
            json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise CheckFailed(f"server not reachable at {url}/health: {e}") from e


def drive_page(page, url, message, temperature, timeout):
    """The scripted session; returns the final answer and the seconds to its first text and to its end."""
    page.call("Page.navigate", {"url": f"{url}/"})
    page.wait_for(lambda s: s["ready"], PAGE_LOAD_TIMEOUT_S, "the page to load")

    expected = f"Temperature set to {temperature:g}"
    page.type_and_enter(f"/temperature {temperature:g}")
    state = page.wait_for(lambda s: s["console"] is not None, PAGE_LOAD_TIMEOUT_S, "the /temperature reply")
    if state["console"] != expected or float(state["temperature"]) != temperature:
        raise CheckFailed(f"/temperature {temperature:g}: console says {state['console']!r}, control shows "
                          f"{state['temperature']!r}")

    start = time.monotonic()
    page.type_and_enter(message)
    page.wait_for(lambda s: s["user"] == message, PAGE_LOAD_TIMEOUT_S, "the user message to appear")
    page.wait_for(lambda s: s["assistant"] or not s["generating"], timeout, "the first streamed text")
    first_text_s = time.monotonic() - start
    remaining = max(timeout - first_text_s, 1.0)
    state = page.wait_for(lambda s: not s["generating"], remaining, "the answer to finish")
    if state["unanswered"] or not state["assistant"]:
        raise CheckFailed(f"no answer was stored: the assistant bubble reads {state['assistant']!r}")
    if state["sendEnabled"]:
        raise CheckFailed("the send button is enabled although the input is empty")
    return {"answer": state["assistant"], "first_text_s": first_text_s, "done_s": time.monotonic() - start}


def run_check(url, message="Hello! Who are you?", temperature=0.5, timeout=120.0, chromium=None,
              screenshot=None):
    """Run the whole check in a fresh headless browser; returns drive_page's result or raises CheckFailed."""
    binary = find_chromium(chromium)
    if binary is None:
        wanted = chromium or " / ".join(CHROMIUM_NAMES)
        raise CheckFailed(f"chromium not found ({wanted}); install the Debian package "
                          "chromium-headless-shell (or chromium), or pass --chromium PATH")
    url = url.rstrip("/")
    check_server(url)
    with tempfile.TemporaryDirectory(prefix="nanochat-browser-check-") as tmp:
        stderr_path = os.path.join(tmp, "chromium.log")
        with open(stderr_path, "wb") as stderr:
            browser = DevToolsPipe(binary, os.path.join(tmp, "profile"), stderr)
        try:
            page = Page(browser)
            try:
                return drive_page(page, url, message, temperature, timeout)
            finally:
                if screenshot and browser.process.poll() is None:
                    page.screenshot(screenshot)
        except CheckFailed as e:
            if browser.process.poll() is not None:
                with open(stderr_path, errors="replace") as f:
                    log_tail = f.read()[-2000:]
                raise CheckFailed(f"{e}\nchromium log (tail):\n{log_tail}") from e
            raise
        finally:
            browser.close()


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Check the chat page in headless Chromium against a running server")
    p.add_argument("--url", type=str, default="http://127.0.0.1:8000", help="base URL of the running server")
    p.add_argument("--message", type=str, default="Hello! Who are you?", help="the message to send")
    p.add_argument("--temperature", type=float, default=0.5, help="set with /temperature before sending")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the whole answer")
    p.add_argument("--chromium", type=str, default=None,
                   help="Chromium binary (default: first found on PATH)")
    p.add_argument("--screenshot", type=str, default=None, help="write a PNG of the page at the end here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        result = run_check(args.url, args.message, args.temperature, args.timeout, args.chromium,
                           args.screenshot)
    except CheckFailed as e:
        print(f"FAIL: {e}", file=sys.stderr)
        return 1
    print(f"OK: streamed answer of {len(result['answer'])} characters, first text after "
          f"{result['first_text_s']:.1f} s, finished after {result['done_s']:.1f} s: "
          f"{result['answer'][:200]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
