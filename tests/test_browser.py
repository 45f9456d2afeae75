"""End to end in headless Chromium (Debian's `chromium`, driven by
Playwright): log in, upload a sample data set through the form, find it,
open its page, see its quick look, download it, mark a store unavailable.
Takes screenshots of the home page, a search result page and a file's
quick look: into the test's temporary
folder, or, with LIBRARIAN_SCREENSHOTS set to a folder (`make screenshots`
sets docs/screenshots), there, for the README.

Skipped when /usr/bin/chromium is missing, except under CI, where it fails.
"""

import hashlib
import os

import pytest

from conftest import AUTH, UVH5, config_text, free_port, need_data

CHROMIUM = os.environ.get("LIBRARIAN_CHROMIUM", "/usr/bin/chromium")
# Without the background-networking flags Chromium keeps trying to reach
# Google's hosts, which a closed network refuses.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture
def config_path(tmp_path, db_url, store_dir):
    """Request bodies bounded at 64 KiB, so that the form sends the 224 KB
    sample file in several parts."""
    path = tmp_path / "librarian.ini"
    path.write_text(config_text(db_url, store_dir, port=free_port())
                    .replace("[server]\n", "[server]\nmax_body_bytes = 65536\n"))
    return str(path)


@pytest.fixture
def page(tmp_path):
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("Chromium not found at %s under CI" % CHROMIUM)
        pytest.skip("Chromium not found at %s" % CHROMIUM)
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True, viewport={"width": 1280,
                                                                        "height": 800})
        yield context.new_page()
        context.close()
        browser.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_person_uploads_finds_downloads_and_manages_stores(server, page, tmp_path, db_url):
    need_data()
    url = server.url.rstrip("/")

    # Asking for a page first leads through the login, and back.
    page.goto(url + "/stores")
    page.fill("input[name=authenticator]", AUTH["admin"])
    page.click("button[type=submit]")
    page.wait_for_url(url + "/stores")

    page.goto(url + "/upload")
    sent = []
    page.on("request", lambda r: sent.append(r.method) if "/api/uploads" in r.url else None)
    page.set_input_files("#file", UVH5)
    page.fill("#prefix", "2458432")
    page.click("#send")
    page.wait_for_url(url + "/files/zen.2458432.34569.uvh5", timeout=60000)
    assert sent.count("POST") == 1 and sent.count("PATCH") == 4  # 224,073 bytes in 64 KiB parts
    with open(UVH5, "rb") as f:
        original = f.read()
    md5 = hashlib.md5(original).hexdigest()
    assert md5 in page.content()
    assert "1225829886" in page.inner_text("main")

    page.goto(url + "/search-files")
    page.fill("textarea[name=search]", '{"name-matches": "zen.2458432.%"}')
    page.click("button[type=submit]")
    page.wait_for_selector("#count")
    assert page.inner_text("#count") == "1"
    shots = os.environ.get("LIBRARIAN_SCREENSHOTS") or str(tmp_path)
    os.makedirs(shots, exist_ok=True)
    page.screenshot(path=os.path.join(shots, "search-results.png"), full_page=True)

    page.click("text=zen.2458432.34569.uvh5")
    page.wait_for_url(url + "/files/zen.2458432.34569.uvh5")
    with page.expect_download() as download_info:
        page.click("#download")
    saved = tmp_path / "downloaded.uvh5"
    download_info.value.save_as(saved)
    assert hashlib.md5(saved.read_bytes()).hexdigest() == md5

    # The quick look: the waterfall loads as a 720 x 440 PNG; the form picks another.
    size = page.eval_on_selector("#waterfall", "img => img.complete && "
                                 "[img.naturalWidth, img.naturalHeight]")
    assert size == [720, 440]
    page.select_option("select[name=baseline]", "1-12")
    page.click("#quicklook-choice button")
    page.wait_for_url(url + "/files/zen.2458432.34569.uvh5?baseline=1-12&pol=xx")
    page.wait_for_function("document.getElementById('waterfall').complete")
    assert page.eval_on_selector("#waterfall", "img => img.naturalWidth") == 720
    assert "Waterfall of baseline 1-12" in page.get_attribute("#waterfall", "alt")
    page.screenshot(path=os.path.join(shots, "quick-look.png"), full_page=True)

    import requests

    requests.post(url + "/api/assign_observing_sessions",
                  json={}, headers={"Authorization": "Bearer " + AUTH["admin"]}, timeout=30)
    page.goto(url + "/")
    page.screenshot(path=os.path.join(shots, "home.png"), full_page=True)
    assert "zen.2458432.34569.uvh5" in page.inner_text("main")
    # The pictures of the archive load at their size.
    page.wait_for_function("document.getElementById('volume').complete")
    assert page.eval_on_selector("#volume", "img => [img.naturalWidth, img.naturalHeight]") \
        == [720, 300]
    page.goto(url + "/sessions/recent")
    page.wait_for_function("document.getElementById('timeline').complete")
    assert page.eval_on_selector("#timeline", "img => img.naturalWidth") == 720

    # No empty error boxes where nothing is wrong.
    empty_boxes = ("els => els.filter(e => !e.textContent.trim() && e.offsetHeight > 0)"
                   ".length")
    for path in ("/connectivity", "/stores/main"):
        page.goto(url + path)
        assert page.eval_on_selector_all(".error", empty_boxes) == 0, path

    # A refused upload says why in the form's words, and shows no finished bar.
    notes = tmp_path / "notes.txt"
    notes.write_text("a note without an observation")
    page.goto(url + "/upload")
    page.set_input_files("#file", str(notes))
    page.click("#send")
    page.wait_for_selector("#status.error")
    message = page.inner_text("#status")
    assert message.startswith("Not stored: ") and 'tick "The file has no observation"' in message
    assert "--null-obsid" not in message and page.is_hidden("#progress")

    # At phone width a file's page does not overflow sideways.
    page.set_viewport_size({"width": 375, "height": 700})
    page.goto(url + "/files/zen.2458432.34569.uvh5")
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.set_viewport_size({"width": 1280, "height": 800})

    page.goto(url + "/stores/main")
    assert page.inner_text("#available") == "yes"
    page.click("#toggle")
    page.wait_for_url(url + "/stores/main")
    assert page.inner_text("#available") == "no"
