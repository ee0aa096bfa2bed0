"""The dashboard in a real browser: headless Debian Chromium (Playwright) against `streamlit run app.py`.

Opens every page on the planted synthetic atlas, follows a search result, a radial-graph link and a click on a
graph node, checks the URL, the content and the back button, and saves one screenshot per page to
$METASAE_SCREENSHOT_DIR (default: a temp folder). Skips when /usr/bin/chromium is missing
(`apt-get install -y chromium` as root; scripts/setup.sh does it).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from metasae.browser import CHROMIUM, CHROMIUM_ARGS, start_streamlit, stop

# README screenshots come from the bundled atlas (scripts/screenshots.py); test runs keep theirs out of the tree.
SHOTS = Path(os.environ.get("METASAE_SCREENSHOT_DIR") or Path(tempfile.gettempdir()) / "metasae-screenshots")
TIMEOUT_MS = 90_000  # a 2-core machine busy with other work can be slow to draw a page the first time

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium "
                                                     "(apt-get install -y chromium, as root; scripts/setup.sh)"),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`streamlit run app.py` on a planted synthetic atlas; yields its base URL."""
    from metasae.synthetic_atlas import make_synthetic_atlas

    atlas = make_synthetic_atlas(tmp_path_factory.mktemp("browser") / "planted")
    try:
        # only the planted atlas (no bundled one beside it): links and addresses carry no ?atlas=
        proc, base = start_streamlit(atlas, tmp_path_factory.mktemp("logs") / "streamlit.log",
                                     extra_env={"METASAE_BUNDLED": str(tmp_path_factory.mktemp("no-bundled"))})
    except RuntimeError as e:
        pytest.fail(str(e))
    try:
        yield base
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def page(server: str):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(TIMEOUT_MS)
        yield pg
        browser.close()


def main_text(page) -> str:
    return page.locator("[data-testid='stMain']").inner_text()


def wait_quiet(page, charts: int = 0) -> None:
    """Wait until Streamlit has finished the run (no running indicator) and `charts` plotly charts are drawn."""
    if charts:
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot .main-svg').length >= {charts}")
    page.wait_for_function("!document.querySelector('[data-testid=stStatusWidget] [data-testid=stStatusWidgetRunningIcon]')"
                           " && !document.querySelector('[data-testid=stSpinner]')")
    page.wait_for_timeout(800)


def shot(page, name: str) -> None:
    """A full-height screenshot: Streamlit scrolls inside its main container, so grow the viewport to fit it."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("Math.max(...[...document.querySelectorAll("
                           "'[data-testid=stMain], [data-testid=stAppViewContainer]')].map(e => e.scrollHeight))")
    page.set_viewport_size({"width": 1400, "height": min(max(int(height) + 40, 900), 7000)})
    page.wait_for_timeout(1200)  # plotly charts re-lay out to the new size
    path = SHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": 1400, "height": 1000})
    # 256 colours are plenty for a UI and make the committed PNGs ~3x smaller
    from PIL import Image

    with Image.open(path) as im:
        small = im.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def open_page(page, base: str, path: str, expect: str, charts: int = 0) -> str:
    page.goto(base + path)
    page.get_by_text(expect, exact=False).first.wait_for()
    wait_quiet(page, charts)
    text = main_text(page)
    assert "Traceback" not in text and "Error" not in text.split("\n")[0]
    return text


def test_overview(page, server):
    text = open_page(page, server, "/", "The ladder", charts=4)
    assert "Are SAE latents canonical units?" in text and "Latents are not atomic" in text
    shot(page, "overview")


def test_latent_page_and_radial_graph_link(page, server):
    text = open_page(page, server, "/latent?width=128&latent=7", "Albert Einstein physicist", charts=3)
    assert "Latent 128/7" in text and "Meta-decomposition" in text and "science" in text
    shot(page, "latent")
    # follow a member-latent link of the radial graph (under its nodes): another latent opens, URL follows
    link = page.locator("[data-testid='stPageLink'] a[href*='latent?width=']").filter(
        has_not_text="Albert Einstein").first
    href = link.get_attribute("href")
    m = re.search(r"width=(\d+)&latent=(\d+)", href)
    assert m, href
    link.click()
    page.wait_for_url(re.compile(rf"latent\?width={m[1]}&latent={m[2]}$"))
    page.get_by_text(f"Latent {m[1]}/{m[2]}").first.wait_for()
    wait_quiet(page)
    # the back button returns to the Einstein latent
    page.go_back()
    page.wait_for_url(re.compile(r"latent\?width=128&latent=7$"))
    page.get_by_text("Latent 128/7").first.wait_for()
    wait_quiet(page, charts=3)
    # a click on a node of the plotly graph itself: the meta-latent diamonds are the trace with 4 points
    radial = page.locator(".js-plotly-plot").nth(2)
    radial.scroll_into_view_if_needed()
    # a busy machine may still be drawing the graph's points after the rerun
    page.wait_for_function("[...(document.querySelectorAll('.js-plotly-plot')[2]?.querySelectorAll("
                           "'.scatterlayer .trace') ?? [])].some(t => t.querySelectorAll('.points path').length === 4)",
                           timeout=TIMEOUT_MS)
    traces = radial.locator(".scatterlayer .trace")
    metas = next(t for t in (traces.nth(i) for i in range(traces.count())) if t.locator(".points path").count() == 4)
    metas.locator(".points path").first.click(force=True)
    page.wait_for_url(re.compile(r"/meta_latent\?meta=3$"))
    page.get_by_text("Meta-latent 3").first.wait_for()


def test_meta_latent_page(page, server):
    text = open_page(page, server, "/meta_latent?meta=3", "Member latents, strongest first", charts=3)
    assert "Meta-latent 3" in text and "science" in text
    shot(page, "meta_latent")


def test_search_link_to_latent(page, server):
    text = open_page(page, server, "/search?q=physic", "of 2")
    assert "physics and physicists" in text
    shot(page, "search")
    page.locator("[data-testid='stPageLink'] a", has_text="Albert Einstein physicist").first.click()
    page.wait_for_url(re.compile(r"/latent\?width=128&latent=7$"))
    page.get_by_text("Albert Einstein physicist").first.wait_for()
    assert "Latent 128/7" in main_text(page)


def test_search_typing_updates_url(page, server):
    open_page(page, server, "/search", "Type a word")
    box = page.get_by_label("Text: labels, top tokens")
    box.fill("curie")
    box.press("Enter")
    page.wait_for_url(re.compile(r"q=curie"))
    page.locator("[data-testid='stPageLink'] a", has_text="Marie Curie chemist").first.wait_for()


def test_stitching_page(page, server):
    text = open_page(page, server, "/stitching?pair=64-128", "Latents of width 128", charts=4)
    assert "Novel latents" in text
    # the form below the table can arrive a moment after the charts on a busy machine
    page.get_by_text("Run a fresh evaluation").first.wait_for(timeout=TIMEOUT_MS)
    shot(page, "stitching")


def test_live_page(page, server):
    text = open_page(page, server, "/live?width=128&latent=7", "the meta-SAE gives", charts=1)
    assert "Albert Einstein physicist" in text
    shot(page, "live")


def test_bad_url_shows_a_message(page, server):
    text = open_page(page, server, "/latent?width=999&latent=1", "is not in this atlas")
    assert "Width 999 is not in this atlas (widths: 64, 128, 256)" in text
    text = open_page(page, server, "/search?q=%27%3B%20DROP%20TABLE%20latents%3B%20--", "No latent matches")
    assert "Traceback" not in text


def test_too_deep_address_opens_its_page(page, server):
    """Issue 11.4: `/latent/extra/path` used to load a blank tab forever (assets fell back to index.html)."""
    text = open_page(page, server, "/latent/extra/path?width=128&latent=7", "Albert Einstein physicist", charts=3)
    assert "Latent 128/7" in text
    assert re.search(r"/latent\?width=128&latent=7$", page.url), page.url


def _at(page, pattern: str, text: str) -> None:
    """Wait until the address bar matches ``pattern`` and the page shows ``text``."""
    page.wait_for_url(re.compile(pattern))
    page.get_by_text(text).first.wait_for()
    wait_quiet(page)


def test_back_and_forward_walk_the_users_own_history_across_pages(page, server):
    """Issue 11.3: latent -> meta-latent link -> search link -> Back, Back, Forward land on the views the user saw."""
    open_page(page, server, "/latent?width=128&latent=7", "Albert Einstein physicist", charts=3)
    page.locator("[data-testid='stPageLink'] a", has_text="meta-latent 3 · science").first.click()
    _at(page, r"/meta_latent\?meta=3$", "Meta-latent 3")
    open_page(page, server, "/search?q=curie", "Marie Curie chemist")
    page.locator("[data-testid='stPageLink'] a", has_text="Marie Curie chemist").first.click()
    _at(page, r"/latent\?width=256&latent=42$", "Latent 256/42")
    page.go_back()
    _at(page, r"/search\?q=curie$", "Marie Curie chemist")
    assert "Latents 1–" in main_text(page)
    page.go_back()
    _at(page, r"/meta_latent\?meta=3$", "Meta-latent 3")
    page.go_back()
    _at(page, r"/latent\?width=128&latent=7$", "Latent 128/7")
    page.go_forward()
    _at(page, r"/meta_latent\?meta=3$", "Meta-latent 3")
    assert "Latent 128/7" not in main_text(page)


def test_sidebar_link_keeps_the_selection(page, server):
    """Issue 11.3: the sidebar's Latent link returns to the latent the user was looking at, not latent 0."""
    open_page(page, server, "/latent?width=256&latent=42", "Marie Curie chemist", charts=3)
    page.locator("[data-testid='stSidebarNav'] a", has_text="Search").first.click()
    _at(page, r"/search", "Search latents")
    page.locator("[data-testid='stSidebarNav'] a", has_text="Latent").first.click()
    _at(page, r"/latent\?width=256&latent=42$", "Latent 256/42")


def test_long_text_says_what_was_cut(page, server):
    """Issue 11.4: a paste over the limit is cut with a message naming the limit."""
    open_page(page, server, "/live?src=row&width=128&latent=7", "the meta-SAE gives", charts=1)
    box = page.get_by_label("Text (up to 4,000 characters)")
    box.fill("Einstein " * 600)  # 5,400 characters: a browser box with maxlength would refuse the paste
    box.press("Control+Enter")
    page.get_by_text("The text has 5,400 characters; the limit is 4,000").first.wait_for()
    assert len(box.input_value()) == 4000
