"""A real browser as the peer: headless Chromium, driven by Selenium.

The browser is the Debian one, ``/usr/bin/chromium`` with
``/usr/bin/chromedriver`` (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them), never one that Selenium would download: both
paths are given and Selenium Manager is told to stay offline. One browser
serves the whole module, with a fresh profile; each test opens its own tabs
and closes them. Every wait is bounded (``WAIT``).

Without Chromium, its driver or Selenium, these tests skip and say why,
unless ``GAMAN_SYNC_REQUIRE_PEERS=1`` (``.ci/run`` sets it): then they fail.

The chat test makes what the two tabs show side by side into a PNG; with
``GAMAN_SYNC_UPDATE_SCREENSHOT=1`` it becomes ``docs/chat.png``, the README's
screenshot (a test run otherwise leaves the checkout as it was: fonts and
antialiasing differ from machine to machine).
"""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import pytest

from examples import chat
from gaman_sync import define_block
from gaman_sync.testing import run_server

from .conftest import WAIT, Recorder

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "chat.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
REQUIRED = os.environ.get("GAMAN_SYNC_REQUIRE_PEERS") == "1"

pytestmark = pytest.mark.slow  # a real browser: seconds per test
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=720,560", "--force-device-scale-factor=1", "--hide-scrollbars"]

# A page of the servers' own origin, for scripts that open WebSockets.
BLANK = define_block("/", http=lambda request: (
    200, {"Content-Type": "text/html; charset=utf-8"},
    "<!doctype html><title>gaman_sync test</title><p>test page</p>"))


def missing() -> Optional[str]:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found (apt-get install {package})"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the module, with a fresh profile."""
    why = missing()
    if why is not None:
        if REQUIRED:
            pytest.fail(f"GAMAN_SYNC_REQUIRE_PEERS=1, but {why}")
        pytest.skip(why)
    # Selenium Manager downloads nothing: the browser and driver are given.
    os.environ["SE_OFFLINE"] = "true"
    os.environ["SE_AVOID_STATS"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(WAIT)
        driver.set_script_timeout(WAIT)
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def tabs(browser: Any) -> Iterator[Callable[[str], str]]:
    """``tabs(url)`` opens ``url`` in a new tab, makes it the current one and
    returns its handle; the tabs still open are closed after the test (the
    module's first tab stays, so that the browser does)."""
    first = browser.window_handles[0]
    opened: List[str] = []

    def open_tab(url: str) -> str:
        browser.switch_to.new_window("tab")
        opened.append(browser.current_window_handle)
        browser.get(url)
        return browser.current_window_handle

    yield open_tab
    for handle in opened:
        if handle in browser.window_handles:
            browser.switch_to.window(handle)
            browser.close()
    browser.switch_to.window(first)


def until(browser: Any, condition: Callable[[Any], Any], what: str) -> Any:
    """Wait (at most ``WAIT``) until ``condition(browser)`` is true; return it."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT, poll_frequency=0.05).until(condition, f"waiting {what}")


def members(browser: Any) -> List[str]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#members li'), li => li.textContent)")


def said(browser: Any) -> List[List[str]]:
    return browser.execute_script(
        "return Array.from(document.querySelectorAll('#messages li.message'),"
        " li => [li.querySelector('.from').textContent, li.querySelector('.text').textContent])")


def say(browser: Any, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    field = browser.find_element(By.ID, "text")
    until(browser, lambda b: field.is_enabled(), "for the message field")
    field.send_keys(text, Keys.ENTER)


def test_two_tabs_chat_and_see_who_is_in_the_room(browser, tabs, make_server, tmp_path):
    """examples/chat.py as a person uses it: two tabs open the page, each
    sees both in the room and both messages. What they show is a PNG (see
    the module's docstring)."""
    server = make_server(chat.block)
    page = f"http://127.0.0.1:{server.port}/"
    alice = tabs(page + "?name=Alice")
    until(browser, lambda b: members(b) == ["Alice"], "for Alice in the room")
    bob = tabs(page + "?name=Bob")
    until(browser, lambda b: members(b) == ["Alice", "Bob"], "for Bob to see both")
    browser.switch_to.window(alice)
    until(browser, lambda b: members(b) == ["Alice", "Bob"], "for Alice to see Bob come")
    say(browser, "Hi Bob! This page and its WebSocket come from one gaman_sync server.")
    browser.switch_to.window(bob)
    until(browser, lambda b: len(said(b)) == 1, "for Bob to read Alice")
    say(browser, "Hi Alice. Same port, same accept thread: GET / for the page, /chat to talk.")
    both = [["Alice", "Hi Bob! This page and its WebSocket come from one gaman_sync server."],
            ["Bob", "Hi Alice. Same port, same accept thread: GET / for the page, /chat to talk."]]
    shots = {}
    for name, tab in (("Alice", alice), ("Bob", bob)):
        browser.switch_to.window(tab)
        until(browser, lambda b: said(b) == both, f"for {name} to see both messages")
        assert browser.execute_script("return window.chat.me.name") == name
        browser.execute_script("document.activeElement.blur()")  # no blinking caret
        shots[name] = browser.get_screenshot_as_base64()
    target = SCREENSHOT if os.environ.get("GAMAN_SYNC_UPDATE_SCREENSHOT") == "1" \
        else tmp_path / "chat.png"
    save_side_by_side(browser, tabs, shots, target)
    assert target.read_bytes().startswith(b"\x89PNG")


def save_side_by_side(browser: Any, tabs: Callable[[str], str], shots: dict,
                      target: Path) -> None:
    """Two tabs' screenshots side by side, as ``target`` (if it changed)."""
    from selenium.webdriver.common.by import By

    tabs("about:blank")
    browser.execute_script("""
        const shots = arguments[0];
        document.body.style.cssText = 'margin:0;background:#d9dce3;font:13px sans-serif';
        const row = document.createElement('div');
        row.id = 'shot';
        row.style.cssText = 'display:inline-flex;gap:16px;padding:16px;background:#d9dce3';
        let n = 0;
        for (const [name, png] of Object.entries(shots)) {
          n += 1;
          const tab = document.createElement('figure');
          tab.style.cssText = 'margin:0;background:#fff;border-radius:8px;overflow:hidden;' +
                              'box-shadow:0 2px 8px rgba(0,0,0,.18)';
          const bar = document.createElement('figcaption');
          bar.textContent = 'Tab ' + n + ' \u2014 Chat \u00b7 gaman_sync \u2014 /?name=' + name;
          bar.style.cssText = 'padding:7px 12px;background:#eceef2;color:#444;' +
                              'border-bottom:1px solid #d0d4db';
          const img = document.createElement('img');
          img.src = 'data:image/png;base64,' + png;
          img.style.cssText = 'display:block';
          tab.append(bar, img);
          row.append(tab);
        }
        document.body.append(row);
    """, shots)
    until(browser, lambda b: b.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth)"),
        "for the screenshots to load")
    browser.set_window_size(1600, 800)
    try:
        png = browser.find_element(By.ID, "shot").screenshot_as_png
    finally:
        browser.set_window_size(720, 560)
    assert png.startswith(b"\x89PNG")
    target.parent.mkdir(exist_ok=True)
    if not target.exists() or target.read_bytes() != png:
        target.write_bytes(png)


def test_the_page_reconnects_with_backoff_when_the_server_restarts(browser, tabs):
    """The chat page retries after growing delays while the server is down,
    and is back in the room once a new server listens on the same port."""
    with run_server(chat.block) as server:
        port = server.port
        tabs(f"http://127.0.0.1:{port}/?name=Carol")
        until(browser, lambda b: members(b) == ["Carol"], "for Carol in the room")
    # The server shut down (1001): the page retries, each time waiting longer.
    until(browser, lambda b: len(b.execute_script("return window.chat.delays")) >= 3,
          "for three retries")
    delays = browser.execute_script("return window.chat.delays")
    assert delays[:3] == sorted(delays[:3]) and delays[0] < delays[1] < delays[2], delays
    assert 400 <= delays[0] <= 600, delays
    with run_server(chat.block, port=port):
        until(browser, lambda b: members(b) == ["Carol"], "for Carol back in the room")
        assert browser.execute_script("return window.chat.opens") == 2
    until(browser, lambda b: b.execute_script("return window.chat.socket === null"),
          "for the page to see the second shutdown")


ROUND_TRIP = """
const [url, sent, done] = arguments;
const bytes = Uint8Array.from(atob(sent), c => c.charCodeAt(0));
const ws = new WebSocket(url);
ws.binaryType = 'arraybuffer';
ws.onopen = () => ws.send(bytes.buffer);
ws.onmessage = (event) => {
  const back = new Uint8Array(event.data);
  let text = '';
  for (let i = 0; i < back.length; i += 8192) {
    text += String.fromCharCode.apply(null, back.subarray(i, i + 8192));
  }
  ws.close(1000, 'thanks');
  done({isBuffer: event.data instanceof ArrayBuffer, data: btoa(text)});
};
ws.onerror = () => done({error: 'onerror'});
"""


def test_a_binary_array_buffer_round_trips_byte_for_byte(browser, tabs, make_server):
    received = Recorder()

    def echo(ctx):
        def on_message(message):
            received.add("message", message)
            ctx.send(message)
        return {"on_message": on_message}

    server = make_server([BLANK, define_block("/echo", echo)])
    tabs(f"http://127.0.0.1:{server.port}/")
    payload = bytes(range(256)) * 64 + os.urandom(50_000) + b"\x00\xff"
    result = browser.execute_async_script(ROUND_TRIP, f"ws://127.0.0.1:{server.port}/echo",
                                          base64.b64encode(payload).decode())
    assert received.wait_kind("message")[0][1] == payload  # bytes, not str, on our side
    assert result["isBuffer"] is True
    assert base64.b64decode(result["data"]) == payload


def test_closing_a_tab_fires_on_close_with_1001(browser, tabs, make_server):
    seen = Recorder()

    def handler(ctx):
        return {"on_open": lambda: seen.add("open"),
                "on_close": lambda code, reason: seen.add("close", code, reason)}

    server = make_server([BLANK, define_block("/watch", handler)])
    tab = tabs(f"http://127.0.0.1:{server.port}/")
    browser.execute_script("window.ws = new WebSocket(arguments[0])",
                           f"ws://127.0.0.1:{server.port}/watch")
    seen.wait_kind("open")
    browser.switch_to.window(tab)
    browser.close()
    browser.switch_to.window(browser.window_handles[0])
    close = seen.wait_kind("close")[-1]
    assert close[1] == 1001, close  # Going Away


CLOSED_BY_SERVER = """
const [url, done] = arguments;
const ws = new WebSocket(url);
ws.onopen = () => ws.send('close, please');
ws.onclose = (event) => done({code: event.code, reason: event.reason, clean: event.wasClean});
"""


def test_the_browser_sees_our_close_code_and_reason(browser, tabs, make_server):
    closes = Recorder()
    reason = "done here: see you ✓"

    def handler(ctx):
        return {"on_message": lambda message: ctx.close(4321, reason),
                "on_close": lambda code, why: closes.add("close", code, why)}

    server = make_server([BLANK, define_block("/bye", handler)])
    tabs(f"http://127.0.0.1:{server.port}/")
    event = browser.execute_async_script(CLOSED_BY_SERVER, f"ws://127.0.0.1:{server.port}/bye")
    assert event == {"code": 4321, "reason": reason, "clean": True}
    assert closes.wait_kind("close")[0][1:] == (4321, reason)


OPEN_OR_FAIL = """
const [url, done] = arguments;
const ws = new WebSocket(url);
const seen = [];
ws.onopen = () => { seen.push('open'); ws.send('hello'); };
ws.onmessage = (event) => { seen.push('message:' + event.data); ws.close(); };
ws.onerror = () => seen.push('error');
ws.onclose = (event) => { seen.push('close:' + event.code); done(seen); };
"""


def test_a_foreign_origin_is_refused_by_an_allowlist(browser, tabs, make_server):
    """The page's origin is http://127.0.0.1:<port of the page's server>; a
    second server has a block that allows it and one that allows another
    origin only. The browser's WebSocket opens on the first and fails on
    the second (403: onerror, then onclose with 1006); the refused request
    never reaches the block."""
    pages = make_server(BLANK)
    origin = f"http://127.0.0.1:{pages.port}"
    seen = Recorder()

    def handler(ctx):
        seen.add("open", ctx.request.path, ctx.request.origin)
        return {"on_message": ctx.send}

    server = make_server([
        define_block("/allowed", handler, origins=[origin]),
        define_block("/denied", handler, origins=["https://elsewhere.example"]),
    ])
    tabs(origin + "/")
    base = f"ws://127.0.0.1:{server.port}"
    assert browser.execute_async_script(OPEN_OR_FAIL, base + "/denied") == ["error", "close:1006"]
    assert browser.execute_async_script(OPEN_OR_FAIL, base + "/allowed") == [
        "open", "message:hello", "close:1005"]
    assert seen.events == [("open", "/allowed", origin)]

