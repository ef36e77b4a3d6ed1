"""Headless Chromium for trial tests, driven without blocking the reactor.

Why a thread of its own: Playwright's sync API blocks, so it must not run on
the reactor thread, and its objects (Playwright, Browser, Page) may only be
used from the thread that created them.  Each `BrowserSession` therefore owns
one plain `threading.Thread` that creates the browser, runs every job given to
`BrowserSession.call` in order, and closes the browser again; results come
back to the reactor with ``reactor.callFromThread``.  A Twisted thread pool
would not promise that every job lands on the same thread, and the async API
would need an asyncio loop in a thread anyway, with more glue for no gain.

A blocked thread cannot be interrupted, so every wait inside a job is bounded
by Playwright's own timeouts, counted from a per-job deadline
(`BrowserTab.remaining_ms`).  A wait that gives up raises `BrowserWaitFailed`
(an AssertionError, so trial reports a FAIL) naming what it saw, the page's
console and a screenshot.

What the helpers rely on in Debian's noVNC 1.3 ``vnc_lite.html``: it reads the
query parameters ``host``, ``port``, ``path`` (default ``websockify``),
``password``, ``view_only`` and ``scale`` (values are URI-decoded, so a path
with its own query must be percent-encoded), and writes its state into
``#status``: ``Loading`` -> ``Connecting`` -> ``Connected to <desktop name>``
(QEMU: ``Connected to QEMU``, or ``Connected to QEMU (<name>)`` with
``-name``), or ``Disconnected`` (clean close) or ``Something went wrong,
connection is closed``.  The framebuffer is the one canvas inside
``#screen``; QEMU without a display device draws a 640x480 black screen that
reads "This VM has no graphic display device.".
"""

from __future__ import annotations

import importlib.util
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.trial import unittest

from tests.peers import require_executable, require_peer

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext, Page, Playwright

T = TypeVar("T")

CHROMIUM = "chromium"
CHROMIUM_HINT = "apt-get install -y --no-install-recommends chromium"
PLAYWRIGHT_HINT = "pip install playwright (never `playwright install`: Debian's chromium is used)"
# Playwright adds --headless itself; these are the flags that work as root here.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

LAUNCH_TIMEOUT = 30.0
CLOSE_TIMEOUT = 15.0
POLL_MS = 50

NOVNC_DIR = "/usr/share/novnc"
NOVNC_STATUS = "#status"
NOVNC_CANVAS = "#screen canvas"
NOVNC_PENDING = ("Loading", "Connecting")
NOVNC_CLOSED = ("Disconnected", "Something went wrong, connection is closed")

# (selector) => pixel statistics of a 2D canvas, or null while it has no size.
# "nonblank" counts pixels whose colour differs from the top-left one (the
# background), so nonblank > 0 means the canvas is not one uniform colour.
CANVAS_PIXELS_JS = """
(selector) => {
  const canvas = document.querySelector(selector);
  if (!canvas || !canvas.width || !canvas.height) return null;
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  const colors = new Set();
  let nonblank = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) nonblank++;
    if (colors.size < 256) colors.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
  return {width: canvas.width, height: canvas.height, nonblank: nonblank, colors: colors.size};
}
"""
# (selector) => the statistics once the canvas shows something, else null.
CANVAS_IS_NOT_BLANK_JS = f"""
(selector) => {{
  const stats = ({CANVAS_PIXELS_JS.strip()})(selector);
  return stats && stats.nonblank > 0 ? stats : null;
}}
"""
# ([selector, texts]) => true once the element's text contains one of texts.
TEXT_CONTAINS_JS = """
([selector, texts]) => {
  const element = document.querySelector(selector);
  return !!element && texts.some((text) => element.textContent.includes(text));
}
"""


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


class BrowserWaitFailed(AssertionError):
    """A page never reached the expected state; the message says what it showed."""


@dataclass(frozen=True)
class BrowserResult:
    """What `open_novnc` saw once noVNC was connected and drawing."""

    status_text: str
    screenshot_path: str
    nonblank_pixels: int
    canvas_width: int
    canvas_height: int
    console_messages: list[str]
    distinct_colors: int = 0


@dataclass
class BrowserTab:
    """The page as a job in the browser thread sees it.  Browser thread only."""

    page: Page
    artifacts: str
    console_messages: list[str] = field(default_factory=list)
    deadline: float = 0.0
    timeout: float = 0.0

    def remaining_ms(self) -> float:
        """Milliseconds left before the current job's deadline (never 0: that
        would mean "no timeout" to Playwright)."""
        return max((self.deadline - time.monotonic()) * 1000, 1.0)

    def text(self, selector: str) -> str | None:
        """The element's textContent now, or None if there is no such element."""
        found: str | None = self.page.evaluate(
            "(s) => { const e = document.querySelector(s); return e ? e.textContent : null; }",
            selector,
        )
        return found

    def screenshot(self, name: str) -> str:
        """Save the viewport as <artifacts>/<name>.png and return the path."""
        path = os.path.join(self.artifacts, f"{name}.png")
        self.page.screenshot(path=path, timeout=max(self.remaining_ms(), 5000))
        return path


class _BrowserThread:
    """One thread that runs submitted jobs in order (see the module docstring)."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Deferred[Any]] | None]
        self._jobs = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._ended: Deferred[None] = Deferred()
        self._stopping = False
        self._thread.start()

    def submit(self, job: Callable[[], T]) -> Deferred[T]:
        if self._stopping:
            return defer.fail(RuntimeError("the browser thread is stopping"))
        result: Deferred[T] = Deferred()
        self._jobs.put((job, result))
        return result

    def stop(self, timeout: float) -> Deferred[None]:
        """Let queued jobs finish, end the thread, fire once it has ended."""
        assert not self._stopping, "stop() is called once"
        self._stopping = True
        self._jobs.put(None)
        # The thread fires _ended as its last act, so join() returns at once.
        return self._ended.addTimeout(timeout, _reactor()).addCallback(
            lambda _: self._thread.join()
        )

    def _run(self) -> None:
        reactor = _reactor()
        try:
            while (item := self._jobs.get()) is not None:
                job, result = item
                try:
                    value = job()
                except BaseException:
                    reactor.callFromThread(_deliver, result, Failure())
                else:
                    reactor.callFromThread(_deliver, result, value)
        finally:
            reactor.callFromThread(_deliver, self._ended, None)


def _deliver(result: Deferred[Any], outcome: Any) -> None:
    # A reactor-side timeout may have cancelled the Deferred already.
    if result.called:
        return
    if isinstance(outcome, Failure):
        result.errback(outcome)
    else:
        result.callback(outcome)


class BrowserSession:
    """One headless Chromium with one page, owned by its own thread.

    Methods return Deferreds and may be called from the reactor thread; the
    ``_thd_`` methods run in the browser thread only.
    """

    def __init__(self, executable: str, artifacts: str) -> None:
        self._executable = executable
        self._artifacts = artifacts
        self._thread = _BrowserThread(f"browser-{os.path.basename(artifacts)}")
        self._playwright: Playwright | None = None
        self._browser: Browser | None = None
        self._context: BrowserContext | None = None
        self._tab: BrowserTab | None = None
        self._closed = False

    def start(self) -> Deferred[None]:
        """Start Playwright, launch Chromium, open an empty page."""
        return self._thread.submit(self._thd_start)

    def call(
        self, fn: Callable[[BrowserTab], T], *, timeout: float = 20.0, url: str | None = None
    ) -> Deferred[T]:
        """Run fn(tab) in the browser thread (after loading url, if given); its
        waits share one deadline of `timeout` seconds.  Any error comes back as
        BrowserWaitFailed with the page's console and a screenshot."""
        return self._thread.submit(lambda: self._thd_call(fn, timeout, url))

    def close(self) -> Deferred[None]:
        """Close the browser and end the thread; fire once both are done."""
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        try:
            await self._thread.submit(self._thd_shutdown).addTimeout(CLOSE_TIMEOUT, _reactor())
        finally:
            await self._thread.stop(CLOSE_TIMEOUT)

    def _thd_start(self) -> None:
        from playwright.sync_api import sync_playwright

        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(
            executable_path=self._executable,
            headless=True,
            args=CHROMIUM_ARGS,
            timeout=LAUNCH_TIMEOUT * 1000,
        )
        # A new context is a fresh profile: no cache, cookies or storage.
        self._context = self._browser.new_context()
        page = self._context.new_page()
        tab = BrowserTab(page, self._artifacts)
        log = tab.console_messages.append
        page.on("console", lambda message: log(f"console.{message.type}: {message.text}"))
        page.on("pageerror", lambda error: log(f"pageerror: {error}"))
        page.on("requestfailed", lambda request: log(f"requestfailed: {request.url}"))
        page.on("response", lambda response: _log_http_error(response, log))
        page.on("websocket", lambda ws: _watch_websocket(ws, log))
        self._tab = tab

    def _thd_call(self, fn: Callable[[BrowserTab], T], timeout: float, url: str | None) -> T:
        tab = self._tab
        assert tab is not None, "the browser did not start"
        tab.deadline = time.monotonic() + timeout
        tab.timeout = timeout
        tab.page.set_default_timeout(timeout * 1000)
        try:
            if url is not None:
                tab.page.goto(url, timeout=tab.remaining_ms())
            return fn(tab)
        except Exception as error:
            raise BrowserWaitFailed(_describe_failure(tab, error)) from error

    def _thd_shutdown(self) -> None:
        try:
            if self._browser is not None:
                self._browser.close()
        finally:
            if self._playwright is not None:
                self._playwright.stop()


def _watch_websocket(ws: Any, log: Callable[[str], None]) -> None:
    log(f"websocket: open {ws.url}")
    ws.on("socketerror", lambda error: log(f"websocket: error {error}"))
    ws.on("close", lambda _ws: log(f"websocket: closed {ws.url}"))


def _log_http_error(response: Any, log: Callable[[str], None]) -> None:
    if response.status >= 400:
        log(f"http {response.status}: {response.url}")


def _describe_failure(tab: BrowserTab, error: Exception) -> str:
    lines = str(error).strip().splitlines() or [type(error).__name__]
    try:
        url = tab.page.url
        shot = tab.screenshot("failure")
    except Exception as screenshot_error:
        url, shot = "?", f"(none: {screenshot_error})"
    console = "\n".join(f"  {line}" for line in tab.console_messages) or "  (none)"
    return "\n".join([*lines[:8], f"page: {url}", f"screenshot: {shot}", f"page log:\n{console}"])


def require_browser(testcase: unittest.SynchronousTestCase) -> str:
    """Chromium's path, after checking Playwright imports; skip, or fail in CI."""
    executable = require_executable(testcase, CHROMIUM, CHROMIUM_HINT)
    available = importlib.util.find_spec("playwright") is not None
    require_peer(testcase, "playwright", available, PLAYWRIGHT_HINT)
    return executable


def launch_browser(testcase: unittest.TestCase) -> Deferred[BrowserSession]:
    """A started BrowserSession whose close is a cleanup of the test."""
    executable = require_browser(testcase)
    artifacts = os.path.abspath(testcase.mktemp())
    os.makedirs(artifacts)
    session = BrowserSession(executable, artifacts)
    testcase.addCleanup(session.close)
    return session.start().addCallback(lambda _: session)


def open_page(
    testcase: unittest.TestCase,
    url: str,
    wait_for: Callable[[BrowserTab], T],
    *,
    timeout: float = 20.0,
) -> Deferred[T]:
    """Launch a browser, load url, fire with wait_for(tab) run in the browser
    thread within `timeout` seconds; the browser closes at cleanup."""

    async def visit() -> T:
        session = await launch_browser(testcase)
        return await session.call(wait_for, timeout=timeout, url=url)

    return Deferred.fromCoroutine(visit())


def wait_for_text(tab: BrowserTab, selector: str, texts: Sequence[str]) -> str:
    """Wait until the element's text contains one of texts; return its text."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        tab.page.wait_for_function(
            TEXT_CONTAINS_JS,
            arg=[selector, list(texts)],
            polling=POLL_MS,
            timeout=tab.remaining_ms(),
        )
    except PlaywrightTimeout:
        raise PlaywrightTimeout(
            f"{selector} is {tab.text(selector)!r} after {tab.timeout}s, "
            f"never containing any of {list(texts)!r}"
        ) from None
    return tab.text(selector) or ""


def wait_for_canvas(tab: BrowserTab, selector: str) -> dict[str, int]:
    """Wait until the canvas is not one uniform colour; return CANVAS_PIXELS_JS's statistics."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        handle = tab.page.wait_for_function(
            CANVAS_IS_NOT_BLANK_JS, arg=selector, polling=POLL_MS * 4, timeout=tab.remaining_ms()
        )
    except PlaywrightTimeout:
        stats = tab.page.evaluate(CANVAS_PIXELS_JS, selector)
        raise PlaywrightTimeout(f"{selector} still blank after {tab.timeout}s: {stats}") from None
    stats: dict[str, int] = handle.json_value()
    return stats


def novnc_url(web: str, host: str, port: int, path: str = "websockify", **extra: str) -> str:
    """vnc_lite.html on the web root `web` (``http://h:p``), pointed at ws://host:port/path."""
    query = urlencode({"host": host, "port": str(port), "path": path, **extra}, quote_via=quote)
    return f"{web}/vnc_lite.html?{query}"


def wait_for_novnc(tab: BrowserTab, until_status: str = "Connected") -> BrowserResult:
    """In the browser thread: wait for noVNC's status and a drawn canvas, then
    take the screenshot ``novnc.png``.  Fails at once if noVNC reports a
    closed connection instead of until_status."""
    status = wait_for_text(tab, NOVNC_STATUS, [until_status, *NOVNC_CLOSED])
    if until_status not in status:
        raise AssertionError(f"noVNC status is {status!r}, not {until_status!r}")
    stats = wait_for_canvas(tab, NOVNC_CANVAS)
    return BrowserResult(
        status_text=tab.text(NOVNC_STATUS) or "",
        screenshot_path=tab.screenshot("novnc"),
        nonblank_pixels=stats["nonblank"],
        canvas_width=stats["width"],
        canvas_height=stats["height"],
        console_messages=list(tab.console_messages),
        distinct_colors=stats["colors"],
    )


def open_novnc(
    testcase: unittest.TestCase, url: str, *, until_status: str = "Connected", timeout: float = 20
) -> Deferred[BrowserResult]:
    """Open noVNC's vnc_lite.html at url; fire once #status contains
    until_status and the canvas shows something, with a screenshot."""
    return open_page(testcase, url, lambda tab: wait_for_novnc(tab, until_status), timeout=timeout)


def wait_for_novnc_settled(tab: BrowserTab) -> str:
    """In the browser thread: wait until #status leaves Loading/Connecting; return it."""
    tab.page.wait_for_function(
        "([s, pending]) => { const e = document.querySelector(s);"
        " return !!e && !pending.includes(e.textContent); }",
        arg=[NOVNC_STATUS, list(NOVNC_PENDING)],
        polling=POLL_MS,
        timeout=tab.remaining_ms(),
    )
    return tab.text(NOVNC_STATUS) or ""
