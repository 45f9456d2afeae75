"""Quick looks (`quicklook`): the waterfall's numbers against the sample
files read independently with h5py and aipy, the header summary, the
picture, and the file page that shows them (WebTest, both databases)."""

import struct

import h5py
import numpy as np
import pytest

import quicklook
from conftest import MIRIAD, UVH5, bearer, need_data, web_login, AUTH


def png_size(data):
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_uvh5_slice_is_the_baselines_amplitudes_in_time_order():
    need_data()
    summary, baselines, pols, chosen, pol, times, freqs, amp = quicklook.uvh5_waterfall(
        UVH5, (1, 12), "yy")
    with h5py.File(UVH5, "r") as f:
        a1, a2 = f["Header/ant_1_array"][()], f["Header/ant_2_array"][()]
        rows = np.nonzero((a1 == 1) & (a2 == 12))[0]
        rows = rows[np.argsort(f["Header/time_array"][()][rows])]
        vis = f["Data/visdata"][()][rows, 0, :, 1]  # yy is the second polarization
        flags = f["Data/flags"][()][rows, 0, :, 1]
        expected = np.abs(vis["r"] + 1j * vis["i"].astype(float))
        expected[flags] = np.nan
        np.testing.assert_allclose(times, f["Header/time_array"][()][rows])
        np.testing.assert_allclose(freqs, f["Header/freq_array"][()][0])
        assert summary["n_antennas"] == len(set(a1) | set(a2)) == 4
    assert (chosen, pol, pols) == ((1, 12), "yy", ["xx", "yy", "xy", "yx"])
    assert amp.shape == (8, 64) and len(baselines) == summary["n_baselines"] == 10
    np.testing.assert_allclose(amp, expected)
    assert summary["n_channels"] == 64
    assert summary["channel_width_khz"] == pytest.approx(122.0703125)
    assert summary["freq_min_mhz"] == pytest.approx(freqs.min() / 1e6)
    assert summary["n_times"] == 8 and summary["integration_s"] == pytest.approx(8.589934592)


def test_the_miriad_slice_is_what_aipy_reads_for_the_baseline():
    need_data()
    import aipy

    summary, baselines, pols, chosen, pol, times, freqs, amp = quicklook.miriad_waterfall(
        MIRIAD, (24, 37), "xx")
    uv = aipy.miriad.UV(MIRIAD)
    uv.select("antennae", 24, 37)
    rows = [(t, np.ma.filled(np.abs(d).astype(float), np.nan)) for (_, t, _), d in uv.all()]
    expected = np.vstack([d for _, d in sorted(rows, key=lambda r: r[0])])
    np.testing.assert_allclose(amp, expected)
    np.testing.assert_allclose(times, sorted(t for t, _ in rows))
    assert freqs[0] == pytest.approx(100e6) and freqs[1] - freqs[0] == pytest.approx(1.5625e6)
    assert summary["n_baselines"] == 28 and summary["n_antennas"] == 7
    assert summary["polarizations"] == ["xx"] and summary["n_times"] == 60
    assert summary["integration_s"] == pytest.approx(10.737418174743652)


def test_the_default_is_the_first_cross_correlation_and_unknown_choices_are_refused():
    need_data()
    look = quicklook.look("uvh5", UVH5)
    assert look["baseline"] == (26, 0) and look["pol"] == "xx"  # its first row not an auto
    assert png_size(look["png"]) == quicklook.IMAGE_SIZE
    look = quicklook.look("miriad", MIRIAD)
    assert look["baseline"] == (24, 25) and png_size(look["png"]) == quicklook.IMAGE_SIZE
    with pytest.raises(quicklook.QuickLookError, match="no baseline 7-8"):
        quicklook.look("uvh5", UVH5, (7, 8))
    with pytest.raises(quicklook.QuickLookError, match="no polarization rr"):
        quicklook.look("uvh5", UVH5, None, "rr")


@pytest.fixture
def browser(web):
    web_login(web, AUTH["admin"])
    return web


def put(web, dest, body, **params):
    query = "&".join("%s=%s" % kv for kv in params.items())
    web.put("/api/upload/%s%s" % (dest, "?" + query if query else ""), body, headers=bearer(),
            status=201)


def test_the_file_page_shows_a_waterfall_and_the_header_summary(browser):
    need_data()
    put(browser, "2458432/zen.2458432.34569.uvh5", open(UVH5, "rb").read())
    page = browser.get("/files/zen.2458432.34569.uvh5")
    img = page.html.find("img", id="waterfall")
    assert img["width"] == "720" and img["height"] == "440"
    assert img["alt"].startswith("Waterfall of baseline 26-0, polarization xx: visibility "
                                 "amplitude over 8 integrations (1.00 minutes from JD")
    summary = page.html.find("table", id="header-summary").text
    assert "46.921 to 54.611 MHz, 64 channels of 122.070 kHz" in summary
    assert "xx, yy, xy, yx" in summary
    picture = browser.get(img["src"])
    assert picture.content_type == "image/png" and png_size(picture.body) == (720, 440)
    # another baseline and polarization, chosen by the form (no JavaScript)
    form = page.forms["quicklook-choice"]
    form["baseline"], form["pol"] = "1-12", "yy"
    chosen = form.submit()
    img = chosen.html.find("img", id="waterfall")
    assert img["src"].endswith("waterfall.png?baseline=1-12&pol=yy")
    assert browser.get(img["src"]).body != picture.body
    page = browser.get("/files/zen.2458432.34569.uvh5?baseline=7-8")
    assert page.html.find(id="quick-look-choice-refused").text == \
        "The file has no baseline 7-8; the default is shown."
    assert page.html.find("img", id="waterfall")["src"].endswith("/waterfall.png")
    assert page.forms["quicklook-choice"]["baseline"].value == "26-0"
    # a baseline named the other way round is the same baseline
    img = browser.get("/files/zen.2458432.34569.uvh5?baseline=12-1").html.find(
        "img", id="waterfall")
    assert img["alt"].startswith("Waterfall of baseline 1-12,")
    browser.get("/files/zen.2458432.34569.uvh5?baseline=x", status=400)
    browser.get("/files/zen.2458432.34569.uvh5/waterfall.png?baseline=7-8", status=404)


def test_the_second_view_reads_nothing(browser, monkeypatch):
    need_data()
    put(browser, "2458432/zen.2458432.34569.uvh5", open(UVH5, "rb").read())
    browser.get("/files/zen.2458432.34569.uvh5?pol=xy")
    monkeypatch.setattr(quicklook, "look", lambda *a: pytest.fail("read again"))
    assert png_size(browser.get("/files/zen.2458432.34569.uvh5/waterfall.png?pol=xy").body) \
        == (720, 440)


def test_files_that_are_not_visibility_data_say_so(browser):
    put(browser, "notes/readme.txt", b"hello", null_obsid="true")
    page = browser.get("/files/readme.txt").text
    assert "No quick look: this file is not visibility data (UVH5 or MIRIAD)." in page
    assert 'id="waterfall"' not in page


def test_a_file_whose_axes_are_not_finite_has_no_quick_look_and_a_page(browser, tmp_path):
    need_data()
    bad = tmp_path / "zen.2458432.99999.uvh5"
    import shutil

    shutil.copy(UVH5, bad)
    with h5py.File(bad, "r+") as f:
        f["Header/freq_array"][0, 3] = np.nan
    with pytest.raises(quicklook.QuickLookError, match="not all finite"):
        quicklook.look("uvh5", str(bad))
    put(browser, "x/zen.2458432.99999.uvh5", bad.read_bytes())
    page = browser.get("/files/zen.2458432.99999.uvh5").text  # 200, not 500
    assert "No quick look: its times, frequencies or integration time are not all" in page


def test_failures_are_remembered_and_one_look_at_a_time_is_drawn_per_caller(monkeypatch):
    calls = []

    def failing():
        calls.append(1)
        raise quicklook.QuickLookError("the file has no baseline 1-2")

    for _ in range(3):
        with pytest.raises(quicklook.QuickLookError, match="no baseline 1-2"):
            quicklook.cached(("md5-x", (1, 2), None), failing, "reader")
    assert calls == [1]  # read once

    def nested():  # while one of the reader's looks is drawn, another is refused
        with pytest.raises(quicklook.QuickLookError, match="another quick look of yours"):
            quicklook.cached(("md5-y", None, None), lambda: {"png": b""}, "reader")
        assert quicklook.cached(("md5-z", None, None), lambda: {"png": b"z"}, "writer") \
            == {"png": b"z"}  # others are not held up
        return {"png": b"y"}

    assert quicklook.cached(("md5-w", None, None), nested, "reader") == {"png": b"y"}
    assert quicklook.cached(("md5-y", None, None), lambda: {"png": b"y2"}, "reader") \
        == {"png": b"y2"}


def test_a_look_lists_at_most_the_first_baselines(monkeypatch):
    need_data()
    monkeypatch.setattr(quicklook, "LISTED_BASELINES", 3)
    look = quicklook.look("miriad", MIRIAD)
    assert len(look["baselines"]) == 3 and look["summary"]["n_baselines"] == 28
