"""Headless Chromium drives the real page, served in-process as `clipsearch serve` does, with the demo model.

Chromium comes from Debian (`apt-get install -y chromium`), driven by the pip `playwright` package through
`executable_path`; Playwright's own browser download is never used. Outside CI a missing Chromium skips;
with CI=true or CLIPSEARCH_REQUIRE_BROWSER=1 it fails. Screenshots go to test-artifacts/; docs/screenshot.png
is written when it is missing or CLIPSEARCH_UPDATE_SCREENSHOT=1.
"""

from __future__ import annotations

import datetime
import io
import json
import math
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pytest
from PIL import Image

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - the browser fixture reports it
    expect = sync_playwright = None  # type: ignore[assignment]

from clipsearch.demo.catalogue import write_catalogue
from clipsearch.demo.shapes import render
from clipsearch.http.server import LocalServer, make_server
from clipsearch.index.embedded import EmbeddedIndex
from clipsearch.ingest import index_paths

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-quic",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000
# A Lambda behind API Gateway gets at most 6 MB per synchronous event, and a binary body travels in it as
# base64 ("Invocation payload (request and response): 6 MB each for synchronous", Lambda quotas).
LAMBDA_EVENT_BYTES = 6 * 1024 * 1024


def _required() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("CLIPSEARCH_REQUIRE_BROWSER") == "1"


def _unavailable(reason: str) -> None:
    if _required():
        pytest.fail(f"{reason} (required because CI=true or CLIPSEARCH_REQUIRE_BROWSER=1)")
    pytest.skip(reason)


def _chromium() -> str:
    if sync_playwright is None:
        _unavailable("the playwright Python package is not installed (pip install playwright)")
    for candidate in (
        os.environ.get("CLIPSEARCH_CHROMIUM"),
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        "/usr/bin/chromium",
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    _unavailable(
        "Chromium not found: install Debian's package (apt-get install -y chromium) "
        "or set CLIPSEARCH_CHROMIUM to a Chromium binary"
    )
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = _chromium()
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


# Three extras beside the catalogue, in colours the older tests never ask for: a picture whose file name
# holds a word no other title has, one taken in the summer of 2019 (its mtime: no EXIF), and an exact copy.
RARE_WORD = "zanzibar"
RARE_TITLE = "zanzibar lighthouse"
DATED_TITLE = "holiday orange circle"
DATED_AT = datetime.datetime(2019, 7, 15, 12, 0)
COPY_TITLE = "copy of an orange picture"
PICTURES = 96 + 3


def write_extras(folder: Path, catalogue: Path) -> None:
    folder.mkdir()
    rng = np.random.default_rng(11)
    render("purple", "square", "small", rng=rng, image_size=160).save(folder / "zanzibar-lighthouse.png")
    dated = folder / "holiday-orange-circle.png"
    render("orange", "circle", "large", rng=rng, image_size=160).save(dated)
    stamp = DATED_AT.timestamp()  # local time, as taken_at reads an mtime
    os.utime(dated, (stamp, stamp))
    original = sorted(catalogue.glob("*orange*"))[0]
    shutil.copyfile(original, folder / "copy-of-an-orange-picture.png")


@pytest.fixture(scope="module")
def demo_server(tmp_path_factory: pytest.TempPathFactory, demo_encoder: Any) -> Iterator[LocalServer]:
    """96 generated shape pictures (every class twice) and the extras, indexed with the demo model, on loopback."""
    base = tmp_path_factory.mktemp("browser")
    images = base / "catalogue"
    write_catalogue(images, count=96)
    write_extras(base / "extras", images)
    index = EmbeddedIndex(base / "index", model=demo_encoder.model, dim=demo_encoder.dim)
    summary = index_paths([images, base / "extras"], demo_encoder, index)
    assert summary.indexed == PICTURES
    with make_server(index, demo_encoder, port=0).start() as srv:
        yield srv


@pytest.fixture
def page(browser: Any, demo_server: LocalServer) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860}, device_scale_factor=1)
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    # A 4xx answer is logged by Chromium as "Failed to load resource"; the page shows those itself.
    tab.on(
        "console",
        lambda msg: (
            problems.append(f"console: {msg.text}")
            if msg.type == "error" and "Failed to load resource" not in msg.text
            else None
        ),
    )
    tab.goto(demo_server.url + "/")
    expect(tab.locator("#health")).to_contain_text(f"{PICTURES} pictures")
    yield tab
    context.close()
    assert problems == [], problems


def hit_titles(page: Any) -> list[str]:
    return [t.strip() for t in page.locator("#results .hit .hit-title").all_inner_texts()]


def wait_for_results(page: Any, status_text: str) -> list[str]:
    # Locator expectations, not wait_for_function: the page's CSP (rightly) forbids eval.
    expect(page.locator("#status")).to_contain_text(status_text)
    expect(page.locator("#results .hit").first).to_be_visible()
    return hit_titles(page)


def thumbnails_loaded(page: Any) -> bool:
    thumbs = page.locator("#results img.hit-thumb")
    for i in range(min(4, thumbs.count())):
        expect(thumbs.nth(i)).to_have_js_property("complete", True)
    widths = thumbs.evaluate_all("(imgs) => imgs.slice(0, 4).map((img) => img.naturalWidth)")
    return bool(widths) and all(w > 0 for w in widths)


def save_screenshot(page: Any, name: str, readme: bool = False) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=False)
    docs = ROOT / "docs" / "screenshot.png"
    if readme and (not docs.exists() or os.environ.get("CLIPSEARCH_UPDATE_SCREENSHOT") == "1"):
        page.screenshot(path=str(docs), full_page=False)


def test_given_the_page_when_a_sentence_is_typed_then_live_results_show_red_circles_first(page):
    page.locator("#q").press_sequentially("a red circle", delay=20)

    titles = wait_for_results(page, "a red circle")

    assert len(titles) == 10
    assert "red circle" in titles[0], titles
    assert sum("red circle" in t for t in titles[:4]) >= 3, titles
    scores = [float(s) for s in page.locator("#results .hit-score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    assert page.locator("#results .hit-path").first.inner_text().endswith(".png")
    assert thumbnails_loaded(page)
    save_screenshot(page, "browser-text-search.png", readme=True)


def test_given_the_page_when_a_picture_is_uploaded_then_pictures_of_the_same_class_come_first(page, tmp_path):
    query = tmp_path / "my-blue-star.png"
    render("blue", "star", "large", rng=np.random.default_rng(2024), image_size=160).save(query)

    page.set_input_files("#file", str(query))

    titles = wait_for_results(page, "my-blue-star.png")
    assert "blue star" in titles[0], titles
    assert page.locator("#query-image").is_visible()
    assert thumbnails_loaded(page)
    save_screenshot(page, "browser-image-search.png")


def test_given_results_when_one_is_chosen_with_the_keyboard_then_more_like_it_replace_them(page):
    page.locator("#hint").click()  # away from the search box, which has autofocus
    page.keyboard.press("/")
    expect(page.locator("#q")).to_be_focused()
    page.keyboard.type("a green triangle")
    page.keyboard.press("Enter")
    wait_for_results(page, "a green triangle")
    first = page.locator("#results .hit").first
    first_id = first.get_attribute("data-id")
    first.locator(".hit-button").focus()

    page.keyboard.press("Enter")

    titles = wait_for_results(page, "pictures like")
    ids = page.locator("#results .hit").evaluate_all("(hits) => hits.map((h) => h.dataset.id)")
    assert first_id not in ids
    # Pictures like a green triangle: green ones first, another green triangle among the first few.
    assert all("green" in t for t in titles[:3]), titles
    assert any("green triangle" in t for t in titles[:5]), titles


def test_given_results_when_one_is_added_and_another_subtracted_then_the_query_holds_both_as_weighted_terms(page):
    page.locator("#q").fill("a red circle")
    titles = wait_for_results(page, "a red circle")
    tenth = page.locator("#results .hit").last  # not a red circle
    added_id, added_title = tenth.get_attribute("data-id"), tenth.locator(".hit-title").inner_text().strip()

    with page.expect_request(lambda r: r.method == "POST" and "/search" in r.url) as added:
        tenth.locator(".hit-add").click()

    expect(page.locator("#status")).to_contain_text(f"\u201ca red circle\u201d + \u201c{added_title}\u201d")
    assert added.value.post_data_json["query"] == [{"text": "a red circle"}, {"id": added_id, "weight": 1}]
    mixed = hit_titles(page)
    assert added_id not in page.locator("#results .hit").evaluate_all("(hits) => hits.map((h) => h.dataset.id)")
    assert "red circle" not in added_title and any("red circle" in t for t in mixed[:3]), (added_title, mixed)
    assert mixed != titles

    circle = page.locator("#results .hit", has_text="circle").first
    circle_id, circle_title = circle.get_attribute("data-id"), circle.locator(".hit-title").inner_text().strip()
    with page.expect_request(lambda r: r.method == "POST" and "/search" in r.url) as subtracted:
        circle.locator(".hit-subtract").click()

    expect(page.locator("#status")).to_contain_text(f"\u2212 \u201c{circle_title}\u201d")
    terms = subtracted.value.post_data_json["query"]
    assert terms == [{"text": "a red circle"}, {"id": added_id, "weight": 1}, {"id": circle_id, "weight": -1}]
    after = hit_titles(page)
    assert sum("circle" in t for t in after[:5]) < sum("circle" in t for t in mixed[:5]), (mixed, after)


def test_given_results_when_k_changes_then_the_same_query_returns_that_many(page):
    page.locator("#q").fill("a yellow square")
    wait_for_results(page, "a yellow square")

    page.select_option("#k", "5")

    expect(page.locator("#results .hit")).to_have_count(5)
    expect(page.locator("#status")).to_contain_text("5 results")


def test_given_a_file_that_is_not_a_picture_when_uploaded_then_a_clear_error_shows(page):
    page.set_input_files("#file", files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"hello"}])

    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("notes.txt is not an image")


def test_given_a_broken_picture_when_uploaded_then_the_servers_message_shows(page):
    broken = {"name": "broken.png", "mimeType": "image/png", "buffer": b"not a png"}

    page.set_input_files("#file", files=[broken])

    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("Search failed: not a recognised image")
    expect(page.locator("#results .hit")).to_have_count(0)


def camera_original() -> bytes:
    """A 4000x3000 phone-style JPEG over 6 MB: a blue star with sensor-like noise, quality 95."""
    rng = np.random.default_rng(7)
    star = render("blue", "star", "large", rng=rng, image_size=3000)
    scene = Image.new("RGB", (4000, 3000), star.getpixel((0, 0)))
    scene.paste(star, (500, 0))
    noise = rng.normal(0, 14, (3000, 4000, 1))
    noisy = np.clip(np.asarray(scene, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_given_a_camera_original_over_6_mb_when_uploaded_then_the_page_sends_a_small_jpeg_and_results_come_back(
    page, tmp_path
):
    query = tmp_path / "camera-blue-star.jpg"
    query.write_bytes(camera_original())
    assert query.stat().st_size > LAMBDA_EVENT_BYTES

    with page.expect_response(lambda r: r.request.method == "POST" and "/search" in r.url) as answer:
        page.set_input_files("#file", str(query))

    # The query thumbnail shows the very blob that was sent: 4000x3000 shrunk to a 448 px shorter side.
    thumb = page.locator("#query-thumb")
    expect(thumb).to_have_js_property("complete", True)
    assert thumb.evaluate("(img) => [img.naturalWidth, img.naturalHeight]") == [597, 448]
    assert answer.value.request.headers["content-type"] == "image/jpeg"
    received = answer.value.json()["query"]["bytes"]  # the body's size, as the server read it
    assert 4 * math.ceil(received / 3) < LAMBDA_EVENT_BYTES // 10, received  # base64 in the event: far under
    titles = wait_for_results(page, "camera-blue-star.jpg")
    assert "blue star" in titles[0], titles


def search_params(request: Any) -> dict[str, list[str]]:
    return parse_qs(urlsplit(request.url).query)


def test_given_the_hybrid_box_when_a_rare_file_name_word_is_searched_then_mode_hybrid_is_sent_and_that_picture_leads(
    page,
):
    page.get_by_label("match words in titles and file names").check()

    with page.expect_request(lambda r: "/search?" in r.url and RARE_WORD in r.url) as sent:
        page.locator("#q").fill(RARE_WORD)

    assert search_params(sent.value)["mode"] == ["hybrid"]
    titles = wait_for_results(page, RARE_WORD)
    assert titles[0] == RARE_TITLE, titles
    # The score shown stays the cosine, not the fused rank score.
    assert -1 <= float(page.locator("#results .hit-score").first.inner_text()) <= 1


def test_given_a_query_with_date_words_when_searched_then_the_understood_text_and_dates_show_and_can_be_turned_off(
    page,
):
    page.locator("#q").fill("an orange circle summer 2019")

    titles = wait_for_results(page, "summer 2019")
    expect(page.locator("#understood")).to_have_text(
        "Searching \u201can orange circle\u201d taken 2019-06-01 to 2019-09-01"
    )
    assert titles == [DATED_TITLE]
    expect(page.locator("#results .hit-taken")).to_have_text("2019-07-15 12:00")
    save_screenshot(page, "browser-dates.png")

    with page.expect_request(lambda r: "/search?" in r.url) as sent:
        page.get_by_label("don\u2019t read dates").check()

    assert search_params(sent.value)["dates"] == ["false"]
    expect(page.locator("#results .hit")).to_have_count(10)
    expect(page.locator("#understood")).to_be_hidden()


def test_given_two_identical_files_when_duplicates_are_shown_then_their_exact_group_lists_both_thumbnails(page):
    with page.expect_request(lambda r: "/duplicates?" in r.url) as sent:
        page.get_by_role("button", name="Duplicates").click()

    assert search_params(sent.value) == {"kind": ["all"], "limit": ["50"]}
    group = page.locator("#groups .group", has_text=COPY_TITLE)
    expect(group).to_have_count(1)
    expect(group.locator(".group-head")).to_have_text("exact copies \u00b7 2 pictures")
    thumbs = group.locator("img.group-thumb")
    expect(thumbs).to_have_count(2)
    for i in range(2):
        expect(thumbs.nth(i)).to_have_js_property("complete", True)
    assert all(w > 0 for w in thumbs.evaluate_all("(imgs) => imgs.map((img) => img.naturalWidth)"))
    expect(page.locator("#duplicates-status")).to_contain_text("of duplicates")
    save_screenshot(page, "browser-duplicates.png")

    page.locator("#q").fill("a red circle")

    wait_for_results(page, "a red circle")
    expect(page.locator("#duplicates")).to_be_hidden()


def test_given_more_groups_than_a_page_when_more_is_pressed_then_the_next_pages_follow_until_the_last(
    page, demo_server
):
    with urllib.request.urlopen(f"{demo_server.url}/duplicates?kind=all&limit=200") as answer:
        every = [group["hits"][0]["id"] for group in json.load(answer)["groups"]]
    assert len(every) >= 2, every
    # The real server answers, one group a page: the page's limit=50 is narrowed on its way out.
    page.route("**/duplicates?*", lambda route: route.continue_(url=route.request.url.replace("limit=50", "limit=1")))
    page.get_by_role("button", name="Duplicates").click()
    expect(page.locator("#groups .group")).to_have_count(1)
    more = page.get_by_role("button", name="More")

    for shown in range(2, len(every) + 1):
        with page.expect_request(lambda r: "/duplicates?" in r.url) as sent:
            more.click()
        assert search_params(sent.value)["from"] == [str(shown - 1)]
        expect(page.locator("#groups .group")).to_have_count(shown)

    expect(more).to_be_hidden()
    firsts = page.locator("#groups .group").evaluate_all(
        "(groups) => groups.map((g) => g.querySelector('.group-hit').dataset.id)"
    )
    assert firsts == every
