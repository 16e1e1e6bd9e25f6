"""A minimal headless-Chromium driver: the Chrome DevTools Protocol over a pipe, stdlib only.

Why not Selenium or Playwright: the book checks only need to load a page, run a bit of
JavaScript and take a screenshot. Chromium speaks CDP itself on file descriptors 3/4 when started
with --remote-debugging-pipe (the transport Puppeteer and Playwright use), so no pip package, no
chromedriver and no browser download are needed: only Debian's `chromium`.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """$CHROMIUM if set, else the first Chromium-like browser on PATH."""
    if os.environ.get("CHROMIUM"):
        return shutil.which(os.environ["CHROMIUM"])
    return next(filter(None, map(shutil.which, CANDIDATES)), None)


class BrowserError(RuntimeError):
    pass


class Chromium:
    """One headless browser with one tab, driven over CDP; use as a context manager."""

    def __init__(self, executable: str, width: int = 1300, height: int = 900, timeout: float = 60):
        self.width, self.height, self.timeout = width, height, timeout
        self._profile = tempfile.mkdtemp(prefix="book-chromium-")
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()

        def child_fds():  # the browser reads commands on fd 3 and writes replies on fd 4
            a, b = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome_r, from_chrome_w))
            os.dup2(a, 3)
            os.dup2(b, 4)

        args = [
            executable, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--remote-debugging-pipe", f"--user-data-dir={self._profile}", "--no-first-run",
            "--no-default-browser-check", "--hide-scrollbars", "--force-device-scale-factor=1",
            f"--window-size={width},{height}",
            # offline and reproducible: any http(s) host (CDN scripts, fonts) fails at once
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost",
            "about:blank",
        ]
        self.proc = subprocess.Popen(args, preexec_fn=child_fds, close_fds=False,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._id, self._buf, self._session = 0, b"", None
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self._viewport(height)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.send("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self._profile, ignore_errors=True)

    def send(self, method: str, session: bool = True, **params):
        """Send one CDP command (to the tab unless session=False) and return its result."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session and self._session:
            msg["sessionId"] = self._session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:  # replies and events are NUL-separated JSON; events are skipped
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise BrowserError(f"{method}: {reply['error']}")
                    return reply["result"]
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise BrowserError(f"{method}: no reply in {self.timeout}s")
            chunk = os.read(self._r, 1 << 20)
            if not chunk:
                raise BrowserError(f"{method}: the browser exited (code {self.proc.poll()})")
            self._buf += chunk

    def eval(self, expression: str):
        """Evaluate JavaScript in the page (promises are awaited) and return its JSON value."""
        res = self.send("Runtime.evaluate", expression=expression, awaitPromise=True,
                        returnByValue=True)
        if "exceptionDetails" in res:
            raise BrowserError(f"JavaScript error: {res['exceptionDetails']}")
        return res["result"].get("value")

    def goto(self, url: str):
        """Load a page and wait for its load event and web fonts, as a reader would see it."""
        nav = self.send("Page.navigate", url=url)
        if nav.get("errorText"):
            raise BrowserError(f"cannot load {url}: {nav['errorText']}")
        deadline = time.monotonic() + self.timeout
        while self.eval("document.readyState + ' ' + location.href") != f"complete {url}":
            if time.monotonic() > deadline:
                raise BrowserError(f"{url} did not finish loading in {self.timeout}s")
            time.sleep(0.05)
        self.eval("document.fonts.ready.then(() => true)")

    def screenshot(self, path, full_page: bool = True, max_height: int = 20000):
        """Save a PNG of the page: the whole scrollable height (capped) or just the viewport.

        A full page is shot by growing the viewport to the page's height (captureBeyondViewport
        with a clip shifts this theme's layout sideways), then putting the viewport back.
        """
        height = self.height
        if full_page:
            height = min(max(self.eval("document.documentElement.scrollHeight"), height), max_height)
        self._viewport(height)
        try:
            data = self.send("Page.captureScreenshot", format="png")["data"]
        finally:
            self._viewport(self.height)
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def _viewport(self, height: int):
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=height,
                  deviceScaleFactor=1, mobile=False)
