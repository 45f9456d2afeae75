"""Pictures of the archive (`pictures`): the numbers plotted, from a
catalogue built so that the answers are known, on both databases; the
pictures and their text alternatives on the pages (WebTest)."""

import datetime

import pytest

import models
import pages
import pictures
from conftest import AUTH, web_login
from test_quicklook import png_size

ZONE = "Africa/Johannesburg"  # UTC+2 all year


def add_file(name, size, utc):
    models.File.create(name=name, type="dat", create_time=utc, size=size, md5="0" * 32,
                       source="t")


@pytest.fixture
def catalogue(app):
    pages._pictures.clear()  # (a page of an earlier test may have drawn them)
    add_file("a.dat", 100, datetime.datetime(2026, 11, 30, 19, 0))   # 21:00 local: night of 30th
    add_file("b.dat", 200, datetime.datetime(2026, 12, 1, 8, 0))     # 10:00 local: still the 30th
    add_file("c.dat", 400, datetime.datetime(2026, 12, 1, 10, 30))   # 12:30 local: the 1st
    add_file("d.dat", 5 * 10**9, datetime.datetime(2026, 12, 3, 20, 0))
    # A session from 20:00 UTC on Dec 2 (22:00 local) lasting 0.05 days, its first
    # observation at LST 23.5 h: its coverage wraps past 24 h.
    start = 2461377.5 - 4 / 24  # JD of 2026-12-02 20:00 UTC
    models.ObservingSession.create(id=1, start_time_jd=start, stop_time_jd=start + 0.05)
    models.Observation.create(obsid=1, start_time_jd=start, stop_time_jd=start + 0.01,
                              start_lst_hr=23.5, session=1)
    models.Observation.create(obsid=2, start_time_jd=start + 0.04, stop_time_jd=start + 0.05,
                              start_lst_hr=0.46, session=1)
    models.ObservingSession.create(id=2, start_time_jd=start + 1, stop_time_jd=start + 1.1)


def test_bytes_per_local_night(catalogue):
    assert pictures.volume_by_night(ZONE) == [
        (datetime.date(2026, 11, 30), 300), (datetime.date(2026, 12, 1), 400),
        (datetime.date(2026, 12, 3), 5 * 10**9)]
    assert pictures.describe_volume(pictures.volume_by_night(ZONE)) == (
        "Data ingested per night on 3 nights from 2026-11-30 to 2026-12-03; the most, 5.0 GB, "
        "on the night of 2026-12-03; the archive holds 5.0 GB in all.")


def test_session_coverage_in_nights_and_lst(catalogue):
    (night, start, stop, lst0, lst1), (night2, _, _, lst2, _) = \
        pictures.session_coverage(ZONE)
    assert night == datetime.date(2026, 12, 2) and night2 == datetime.date(2026, 12, 3)
    assert (lst0, lst2) == (23.5, None)  # the second session has no observations
    assert lst1 == pytest.approx((23.5 + 0.05 * 24 * 1.00273790935) % 24)
    assert stop - start == pytest.approx(0.05)


def test_the_pictures_are_pngs_of_their_size_empty_or_not(catalogue):
    nights, coverage = pictures.volume_by_night(ZONE), pictures.session_coverage(ZONE)
    for png in (pictures.volume_png(nights), pictures.timeline_png(coverage),
                pictures.volume_png([]), pictures.timeline_png([])):
        assert png_size(png) == pictures.SIZE


def test_the_pages_show_the_pictures_with_text_alternatives(catalogue, web):
    web_login(web, AUTH["reader"])
    img = web.get("/").html.find("img", id="volume")
    assert img["alt"].startswith("Data ingested per night on 3 nights from 2026-11-30")
    picture = web.get(img["src"])
    assert picture.content_type == "image/png" and png_size(picture.body) == pictures.SIZE
    img = web.get("/sessions/recent").html.find("img", id="timeline")
    assert img["alt"] == "2 observing sessions on 2 nights from 2026-12-02 to 2026-12-03."
    assert png_size(web.get(img["src"]).body) == pictures.SIZE
    web.get("/pictures/nothing.png", status=404)


def test_a_store_keeps_one_sample_a_day_and_its_page_shows_them(app, web):
    import metrics
    from conftest import ctx

    row = models.Store.get()
    usage = ctx().open_store(row).disk_usage()
    metrics.check_store_fill(ctx())  # the periodic look records today's sample
    [(day, used, free)] = pictures.store_history(row)
    assert day == models.utcnow().date() and used > 0 and free > 0
    assert abs(free - usage.free) < 1 << 30  # the same file system, read moments apart
    Usage = type(usage)
    for when, used_bytes in ((datetime.date(2026, 11, 1), 10), (datetime.date(2026, 11, 2), 20),
                             (datetime.date(2026, 11, 2), 30)):  # the day's last reading wins
        metrics.record_sample(row, Usage(total=100, used=used_bytes, free=100 - used_bytes),
                              day=when)
    assert pictures.store_history(row)[:2] == [(datetime.date(2026, 11, 1), 10, 90),
                                               (datetime.date(2026, 11, 2), 30, 70)]
    web_login(web, AUTH["reader"])
    img = web.get("/stores/%s" % row.name).html.find("img", id="space")
    assert img["alt"].startswith("Used and free space on 3 days from 2026-11-01 to %s" % day)
    assert png_size(web.get(img["src"]).body) == pictures.SIZE
    web.get("/stores/nothing/space.png", status=404)


def test_a_made_up_date_of_year_one_does_not_break_the_pictures(catalogue, web):
    add_file("ancient.dat", 7, datetime.datetime(1, 1, 1, 0, 0))
    nights = pictures.volume_by_night(ZONE)
    assert (datetime.date(2026, 11, 30), 300) in nights
    web_login(web, AUTH["reader"])
    web.get("/")
    assert png_size(web.get("/pictures/volume.png").body) == pictures.SIZE
    web.post("/logout", status="*")  # a write after it: no read transaction was left open
