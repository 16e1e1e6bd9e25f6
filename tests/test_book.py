"""The built book as a reader sees it: links that resolve, and pages checked in headless Chromium.

The HTML comes from $ALIGNLIB_BOOK_HTML, else ./_build/html, else a one-off build into a tmp dir.
The link check needs no browser; the `browser` tests skip when no Chromium is installed.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

from browser import Chromium, find_chromium

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT = 1300, 900
MIN_TEXT = 200  # characters of article text below which a page counts as blank
SCREENSHOTS = {"book/intro": "intro.png", "book/findings": "findings.png",
               "notebooks/02_patching": "02_patching.png"}


def toc_pages() -> list[str]:
    """Every page in _toc.yml (root first), as a path without extension: 'book/intro'."""
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    pages = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                pages.append(node["file"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [str(Path(p).with_suffix("")) for p in pages]


PAGES = toc_pages()


@pytest.fixture(scope="session")
def html_dir(tmp_path_factory) -> Path:
    """The built book's HTML folder; builds it once per session when none is given or found."""
    if os.environ.get("ALIGNLIB_BOOK_HTML"):
        path = Path(os.environ["ALIGNLIB_BOOK_HTML"])
        assert (path / "index.html").is_file(), f"ALIGNLIB_BOOK_HTML={path} has no index.html"
        return path
    if (REPO / "_build" / "html" / "index.html").is_file():
        return REPO / "_build" / "html"
    out = tmp_path_factory.mktemp("book")
    exe = Path(sys.executable).with_name("jupyter-book")
    cmd = [str(exe if exe.exists() else shutil.which("jupyter-book") or exe),
           "build", str(REPO), "--path-output", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, f"book build failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return out / "_build" / "html"


# ---------------------------------------------------------------- links (no browser)

class _Links(HTMLParser):
    """Collects the ids/names a page defines and the href/src URLs it points at."""

    def __init__(self):
        super().__init__()
        self.ids, self.urls = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.ids.update(v for k, v in attrs.items() if k == "id" or (k == "name" and tag == "a"))
        self.urls += [v for k, v in attrs.items() if k in ("href", "src") and v]
        refresh = re.search(r"url=(\S+)", attrs.get("content") or "", re.I)
        if tag == "meta" and (attrs.get("http-equiv") or "").lower() == "refresh" and refresh:
            self.urls.append(refresh.group(1).strip("'\""))


@functools.lru_cache(maxsize=None)
def _parse(path: Path) -> _Links:
    links = _Links()
    links.feed(path.read_text(encoding="utf-8", errors="replace"))
    return links


def test_toc_pages_built(html_dir):
    """Every page in _toc.yml must be in the book (only_build_toc_files hides a typo otherwise)."""
    missing = [p for p in PAGES if not (html_dir / f"{p}.html").is_file()]
    assert not missing, f"pages in _toc.yml with no HTML in {html_dir}: {missing}"


def test_internal_links_resolve(html_dir):
    """Every internal href/src points at a file that exists, and every #fragment at an id there."""
    pages = [p for p in html_dir.rglob("*.html") if "_static" not in p.relative_to(html_dir).parts]
    broken = []
    for page in sorted(pages):
        for url in _parse(page).urls:
            parts = urlsplit(url)
            if parts.scheme or parts.netloc or url.startswith("//"):
                continue  # http(s), mailto, data:, javascript: ... are not the book's files
            target = (page.parent / unquote(parts.path)).resolve() if parts.path else page
            if target.is_dir():
                target = target / "index.html"
            where = f"{page.relative_to(html_dir)}: {url}"
            if not target.is_file():
                broken.append(f"{where} (no file)")
            elif parts.fragment and target.suffix == ".html" \
                    and unquote(parts.fragment) not in _parse(target).ids:
                broken.append(f"{where} (no id {parts.fragment!r})")
    broken = list(dict.fromkeys(broken))  # a page repeats its links (menus, in-page toc)
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken)


# ---------------------------------------------------------------- browser

# Run once per page; returns what the tests below check, so each page is loaded only once.
PAGE_REPORT_JS = r"""
(() => {
  const article = document.querySelector('article.bd-article') || document.querySelector('main');
  const box = article.getBoundingClientRect();
  const cells = [...article.querySelectorAll('div.cell')];
  const wide = new Set();
  const overflows = [];
  for (const el of article.querySelectorAll(
      'div.cell_input pre, div.cell_output pre, .highlight pre, table')) {
    // content wider than the room it has (so it scrolls or is clipped), or past the article's edge
    const r = el.getBoundingClientRect();
    const table = el.tagName === 'TABLE';  // a table grows its own box: compare with its parent's
    const need = table ? Math.round(r.width) : el.scrollWidth;
    const room = table ? el.parentElement.clientWidth : el.clientWidth;
    if (need <= room + 1 && r.right <= box.right + 1) continue;
    if ([...wide].some(w => w.contains(el) || el.contains(w))) continue;
    wide.add(el);
    const cell = el.closest('div.cell');
    const lines = el.innerText.replaceAll('\t', ' | ').split('\n').filter(l => l.trim());
    const longest = lines.reduce((a, b) => (b.length > a.length ? b : a), '');
    const part = el.closest('div.cell_output') ? 'output' : 'input';
    overflows.push({
      where: cell ? `cell ${cells.indexOf(cell) + 1} ${part}` : (table ? 'table' : 'code block'),
      need, room, first: (lines[0] || '').slice(0, 100), longest: longest.slice(0, 140)});
  }
  const table = article.querySelector('table');
  return {
    text: article.innerText.trim().length,
    badImages: [...article.querySelectorAll('img')]
        .filter(i => !i.complete || i.naturalWidth === 0).map(i => i.getAttribute('src')),
    overflows,
    firstTableRows: table ? table.querySelectorAll('tbody tr').length : null,
  };
})()
"""


@pytest.fixture(scope="session")
def browser():
    """One headless Chromium for the session; skips (not fails) where none is installed."""
    exe = find_chromium()
    if not exe:
        pytest.skip("no Chromium found: install it with `apt-get install chromium` "
                    "(or point $CHROMIUM at a Chromium/Chrome binary)")
    with Chromium(exe, WIDTH, HEIGHT) as b:
        yield b


@pytest.fixture(scope="session")
def reports(browser, html_dir) -> dict[str, dict]:
    """Each toc page loaded once in a 1300x900 window: its report, plus the chosen screenshots."""
    shots = html_dir.parent / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    out = {}
    for page in PAGES:
        browser.goto((html_dir / f"{page}.html").resolve().as_uri())
        out[page] = browser.eval(PAGE_REPORT_JS)
        if page in SCREENSHOTS:
            browser.screenshot(shots / SCREENSHOTS[page])
    return out


@pytest.mark.browser
def test_pages_not_blank(reports):
    """A page that failed to render (or lost its content) shows an empty article."""
    blank = {p: r["text"] for p, r in reports.items() if r["text"] < MIN_TEXT}
    assert not blank, f"pages whose article has under {MIN_TEXT} characters of text: {blank}"


@pytest.mark.browser
def test_images_loaded(reports):
    """A figure that fails to load shows as a broken icon: naturalWidth stays 0."""
    bad = {p: r["badImages"] for p, r in reports.items() if r["badImages"]}
    assert not bad, f"images that did not load: {bad}"


@pytest.mark.browser
def test_no_code_cell_overflows_horizontally(reports):
    """On a 1300-px window no code, output or table may be wider than its box (no sideways scroll)."""
    lines = [f"{p}.html, {o['where']}: {o['need']}px in {o['room']}px; "
             f"first line: {o['first']!r}; widest line: {o['longest']!r}"
             for p, r in reports.items() for o in r["overflows"]]
    per_page = {p: len(r["overflows"]) for p, r in reports.items() if r["overflows"]}
    assert not lines, (f"{len(lines)} elements overflow horizontally at {WIDTH}px, per page "
                       f"{per_page}:\n" + "\n".join(lines))


def _md_table_rows(md: Path) -> int:
    """Body rows of the first markdown table: its '|' lines less the header and separator."""
    block = []
    for line in md.read_text().splitlines():
        if line.lstrip().startswith("|"):
            block.append(line)
        elif block:
            break
    return max(len(block) - 2, 0)


@pytest.mark.browser
def test_findings_table_has_row_per_claim(reports):
    """Each claim in findings.md's table must reach the reader (a broken glue row can vanish)."""
    expected = _md_table_rows(REPO / "book" / "findings.md")
    assert expected > 0, "book/findings.md has no markdown table"
    rows = reports["book/findings"]["firstTableRows"]
    assert rows is not None and rows >= expected, \
        f"findings table shows {rows} rows; book/findings.md has {expected} claims"


@pytest.mark.browser
def test_screenshots_saved(reports, html_dir):
    """Screenshots for a person to look at: _build/screenshots/ beside the html (git-ignored)."""
    for name in SCREENSHOTS.values():
        png = html_dir.parent / "screenshots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert png.stat().st_size > 10_000, f"{png} looks empty"
