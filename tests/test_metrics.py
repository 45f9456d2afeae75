"""What operators see, on SQLite and PostgreSQL: /metrics (Prometheus) over
a catalogue whose answers are known, its optional authentication, the
Health page, and the store-full alert."""

import datetime
import os
import re
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import integrity
import metrics
import models
import tasks
import task_support  # noqa: F401 (the test_fail task kind)
from conftest import AUTH, bearer, config_text, ctx, free_port, web_login
from test_integrity import copy_to_second, flip_byte

SIZES = {"a.dat": 1000, "b.dat": 2000, "c.dat": 3000, "d.dat": 4000}


@pytest.fixture
def config_path(tmp_path, db_url, store_dir, hook, request):
    """Stores `main` and `second`, the webhook, and `request.param` =
    (lines for [server], lines for [librarian]) when parametrized."""
    server, librarian = getattr(request, "param", ("", ""))
    second = tmp_path / "second"
    second.mkdir()
    text = config_text(db_url, store_dir, port=free_port(), store_section=(
        "[store:main]\npath_prefix = %s\n\n[store:second]\npath_prefix = %s\n\n"
        % (store_dir, second)))
    text = text.replace("log_level = WARNING\n", "log_level = WARNING\n" + server)
    text = text.replace("[database]", "[librarian]\nalert_webhook_url = %s\n"
                        "scrub_bytes_per_second = 0\n%s\n[database]" % (hook.url, librarian))
    path = tmp_path / "librarian.ini"
    path.write_text(text)
    return str(path)


def put(web, name):
    reply = web.put("/api/upload/%s?null_obsid=true" % name, os.urandom(SIZES[name]),
                    headers=bearer(), content_type="application/octet-stream", status=201).json
    assert reply["store_name"] == "main"
    return reply


@pytest.fixture
def catalogue(app, web):
    """Four files on `main`, b and c also on `second` (b verified 40 days
    ago, c never); a found corrupt by a real scrub of `main`; a good remote
    copy of c and a bad one of d at `penn`; copies to two Librarians; a
    failed task and the repair the scrub queued."""
    # Only `main` takes uploads: the two share a disk, and which looks
    # roomier changes with whatever else writes to it meanwhile.
    models.Store.update(available=False).where(models.Store.name == "second").execute()
    for name in SIZES:
        put(web, name)
    models.Store.update(available=True).where(models.Store.name == "second").execute()
    copy_to_second("b.dat")
    copy_to_second("c.dat")
    # Failed by cancelling.
    failed = tasks.enqueue(ctx(), "test_fail", {}, delay=3600)
    assert tasks.cancel(ctx(), failed.id, "admin")
    # As if adopted: never verified (uploads and copies are verified at ingest).
    models.FileInstance.update(verified_at=None, verify_result=None).execute()
    flip_byte(os.path.join(ctx().open_store(models.Store.by_name("main")).prefix, "a.dat"))
    assert integrity.scrub(ctx(), models.Store.by_name("main"))[0] == 4
    second = models.Store.by_name("second")
    (models.FileInstance.update(verified_at=models.utcnow() - datetime.timedelta(days=40),
                                verify_result="ok")
     .where((models.FileInstance.store == second) & (models.FileInstance.file == "b.dat"))
     .execute())
    now = models.utcnow()
    for name, md5 in (("c.dat", models.File.get_by_id("c.dat").md5), ("d.dat", "0" * 32)):
        models.RemoteInstance.create(file=name, librarian="penn", store_name="pot1",
                                     store_path=name, md5=md5, size=SIZES[name],
                                     verified_at=now, confirmed_at=now)
    for name, conn, code, seconds, rate in (("b.dat", "penn", 0, 2.0, 1000.0),
                                            ("c.dat", "penn", 0, 1.0, 2000.0),
                                            ("d.dat", "penn", 1, 0.5, 0.0),
                                            ("a.dat", "karoo", 0, 4.0, 0.25)):
        models.FileEvent.record(name, "copy_finished", {  # as copies._finished writes them
            "connection_name": conn, "remote_store_path": name, "error_code": code,
            "error_message": "refused" if code else "", "duration": seconds,
            "average_rate": rate})


def scrape(web, **kwargs):
    """GET /metrics parsed: {(sample name, frozenset of labels): value}."""
    resp = web.get("/metrics", **kwargs)
    assert resp.content_type == "text/plain"
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_metrics_give_the_catalogues_exact_state(app, web, catalogue):
    m = scrape(web)

    def value(name, **labels):
        return m[("librarian_" + name, frozenset(labels.items()))]

    assert value("files") == 4 and value("file_bytes") == 10000
    assert value("store_instances", store="main") == 4
    assert value("store_instances", store="second") == 2
    assert value("store_instance_bytes", store="main") == 10000
    assert value("store_instance_bytes", store="second") == 5000
    assert value("store_bad_instances", store="main", result="corrupt") == 1
    assert value("store_bad_instances", store="main", result="missing") == 0
    assert value("store_bad_instances", store="second", result="corrupt") == 0
    assert value("scrub_verified_instances", store="main") == 4  # a.dat too: read, found bad
    assert value("scrub_overdue_instances", store="main") == 0
    assert value("scrub_verified_instances", store="second") == 0
    assert value("scrub_overdue_instances", store="second") == 2  # one too old, one never
    assert value("tasks", kind="test_fail", state="failed") == 1
    assert value("tasks", kind="repair", state="pending") == 1
    assert sum(v for (name, labels), v in m.items()
               if name == "librarian_tasks" and ("state", "failed") in labels) == 1
    assert value("remote_instances", librarian="penn") == 2
    # a: its only instance corrupt; d: one instance, the remote copy differs. b has
    # two good copies (main, second), c three (and penn's).
    assert value("files_short_of_copies") == 2
    assert value("copies_total", connection="penn") == 2
    assert value("copy_failures_total", connection="penn") == 1
    assert value("copy_bytes_total", connection="penn") == 5000
    assert value("copies_total", connection="karoo") == 1
    assert value("copy_bytes_total", connection="karoo") == 1000
    assert value("copy_rate_bytes_per_second", connection="penn") == pytest.approx(
        (1000 * 1024 * 2.0 + 2000 * 1024 * 1.0) / 3.0)
    for store in ("main", "second"):
        assert value("store_up", store=store) == 1
        assert 0 < value("store_free_bytes", store=store) <= value("store_capacity_bytes",
                                                                  store=store)
    text = web.get("/metrics").text
    assert not any(name in text for name in SIZES), "counts only, no file name"


def test_a_stricter_rule_counts_more_files_short(app, web, catalogue):
    assert metrics.short_of_copies(2) == 3  # b has two good copies, not three; c has three
    assert metrics.short_of_copies(0) == 1  # a: no good copy anywhere


def test_an_unreachable_store_has_no_capacity_and_is_down(app, web, store_dir):
    os.rename(store_dir, store_dir + ".gone")
    m = scrape(web)
    assert m[("librarian_store_up", frozenset({("store", "main")}))] == 0
    assert ("librarian_store_free_bytes", frozenset({("store", "main")})) not in m
    assert m[("librarian_store_up", frozenset({("store", "second")}))] == 1
    assert m[("librarian_files_short_of_copies", frozenset())] == 0


@pytest.mark.parametrize("config_path", [("metrics_public = false\n", "")], indirect=True)
def test_private_metrics_need_a_readers_bearer(app, web):
    resp = web.get("/metrics", status=401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    web.get("/metrics", headers=bearer("wrong"), status=401)
    assert ("librarian_files", frozenset()) in scrape(web, headers=bearer("reader"))


def test_the_health_page_shows_the_numbers_and_links_the_corrupt_file(app, web, catalogue):
    web.get("/health", status=302)
    web_login(web, AUTH["reader"])
    assert '<a href="/health">Health</a>' in web.get("/").text
    page = web.get("/health").text
    assert '<a href="/files/a.dat">a.dat</a>' in page
    assert "b.dat" not in page and "c.dat" not in page
    assert re.search(r'id="short">2<', page) and re.search(r'id="failed">1<', page)
    row = re.search(r'<a href="/stores/main">main</a>(.*?)</tr>', page, re.S).group(1)
    cells = re.findall(r'<td class="num"[^>]*>([^<]*)</td>', row)
    assert cells[0] == "4" and cells[-4:] == ["4 (100%)", "0", "1", "0"]
    assert '<a href="/tasks">' in page


def alerts_of(hook, kind, n):
    """The `kind` alerts the hook received, once there are `n` (and a
    moment more, so that a surplus one shows)."""
    deadline = time.monotonic() + 10
    while len([b for b in hook.bodies if b["kind"] == kind]) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    return [b for b in hook.bodies if b["kind"] == kind]


@pytest.mark.parametrize("config_path", [("", "store_full_fraction = 0.0001\n")], indirect=True)
def test_a_full_store_is_reported_once_per_crossing(app, web, hook):
    # Any disk holding this test is fuller than 0.01%: both stores crossed the
    # line, which the start-up's checks (schedule_checks) already reported.
    assert metrics.check_store_fill(ctx()) == []
    found = alerts_of(hook, "store_full", 2)
    assert sorted(a["detail"]["store_name"] for a in found) == ["main", "second"]
    assert "store_full_fraction" in found[0]["text"]
    ctx().settings.librarian["store_full_fraction"] = 1.0  # below it now: forgotten
    assert metrics.check_store_fill(ctx()) == []
    ctx().settings.librarian["store_full_fraction"] = 0.0001
    assert metrics.check_store_fill(ctx()) == ["main", "second"]
    assert len(alerts_of(hook, "store_full", 4)) == 4
