"""The web pages through the WSGI app (WebTest): every page, not-found
names, bad query text, CSRF, levels, and the query counts of lists."""

import datetime
import re

import pytest

import models
from conftest import ctx, AUTH, bearer, web_login


@pytest.fixture
def browser(web):
    """A WebTest client logged in as admin."""
    form = web.get("/login").forms[0]
    form["authenticator"] = AUTH["admin"]
    form.submit(status=302)
    return web


def login_as(web, who):
    web.reset()
    return web_login(web, AUTH[who])


@pytest.fixture
def sample(app, web):
    """Two sessions, three observations, four files, one with two events."""
    models.ObservingSession.create(id=1192201262, start_time_jd=2458043.1, stop_time_jd=2458043.2)
    models.Observation.create(obsid=1192201262, start_time_jd=2458043.12552,
                              stop_time_jd=2458043.13285, start_lst_hr=18.12896,
                              session=1192201262)
    models.Observation.create(obsid=1192201900, start_time_jd=2458043.13, stop_time_jd=2458043.14,
                              start_lst_hr=18.3, session=1192201262)
    models.Observation.create(obsid=1225829886, start_time_jd=2458432.34569, stop_time_jd=None)
    for name, obsid, size in (("zen.2458043.12552.xx.HH.uvA", 1192201262, 983251),
                              ("zen.2458043.13000.xx.HH.uvA", 1192201900, 5 * 2**30),
                              ("zen.2458432.34569.uvh5", 1225829886, 224073)):
        models.File.create(name=name, type=name.rsplit(".", 1)[1], create_time=models.utcnow(),
                           size=size, md5="0" * 32, source="admin", observation=obsid)
    web.put("/api/upload/notes/readme.txt?null_obsid=true", b"hello", headers=bearer(),
            status=201)
    models.FileEvent.record("readme.txt", "qa", {"ok": True})


def test_login_redirects_back_to_the_page_first_asked_for(web):
    resp = web.get("/stores", status=302)
    assert resp.location.endswith("/login?next=/stores")
    form = resp.follow().forms[0]
    form["authenticator"] = AUTH["reader"]
    resp = form.submit(status=302)
    assert resp.location.endswith("/stores")
    assert "HttpOnly" in resp.headers["Set-Cookie"] and "samesite=strict" in \
        resp.headers["Set-Cookie"].lower()
    assert "<h1>Stores</h1>" in web.get("/stores").text


@pytest.mark.parametrize("target", ["//evil.example/x", "http://evil.example/", "\\\\evil",
                                    "/\t/evil.example/x", "/\\evil.example"])
def test_login_never_redirects_off_site(web, target):
    resp = web_login(web, AUTH["reader"], next=target)
    assert resp.location.endswith("/") and "evil" not in resp.location


def test_logout_ends_the_session_even_for_a_kept_cookie(web):
    login_as(web, "reader")
    kept = web.cookies["librarian_session"]
    web.get("/", status=200)
    web.get("/logout", status=302)
    web.set_cookie("librarian_session", kept)
    web.get("/", status=302)
    assert models.WebSession.select().count() == 0


def test_wrong_authenticator_and_logout(web):
    resp = web_login(web, "nope", status=401)
    assert "not known here" in resp.text
    # A login POSTed from another site carries no token of this one's form.
    web.reset()
    resp = web.post("/login", {"authenticator": AUTH["admin"], "next": "/"}, status=403)
    assert "token" in resp.text and "librarian_session" not in web.cookies
    login_as(web, "reader")
    web.get("/logout", status=302)
    web.get("/", status=302)


def test_forged_session_cookie_is_ignored(web):
    login_as(web, "reader")
    value = web.cookies["librarian_session"]
    payload, mac = value.split(".")
    import base64
    import json

    data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    data["source"] = "admin"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")
    web.set_cookie("librarian_session", forged + "." + mac)
    web.get("/", status=302)


def test_home_shows_site_time_sessions_files_and_stores(browser, sample):
    page = browser.get("/").text
    assert "<h1>Test</h1>" in page
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", page)
    assert "Africa/Johannesburg" in page
    assert "/sessions/1192201262" in page and "zen.2458432.34569.uvh5" in page
    assert "/stores/main" in page


def test_file_page_shows_metadata_instances_and_events(browser, sample, store_dir):
    page = browser.get("/files/readme.txt").text
    assert "5 B (5 bytes)" in page and store_dir + "/notes/readme.txt" in page
    assert page.index("qa") < page.index("create_instance"), "events newest first"
    page = browser.get("/files/zen.2458043.13000.xx.HH.uvA").text
    assert 'title="5368709120 bytes">5.0 GiB' in page
    assert "JD 2458043.13000" in page and "LST 18.3000 h" in page
    assert "No instance here" in page
    assert "No file named" in browser.get("/files/nothing.txt", status=404).text


def test_download_link_works_with_the_session(browser, sample):
    assert browser.get("/stream/readme.txt").body == b"hello"


def test_observation_pages(browser, sample):
    page = browser.get("/observations").text
    assert page.index("1225829886") < page.index("1192201262"), "most recent first"
    rows = {tr.find("a").text: tr for tr in browser.get("/observations").html.find_all("tr")[1:]}
    cells = [rows["1192201900"].find("td", class_=c).text for c in ("duration", "n-files", "size")]
    assert cells == ["14.4 min", "1", "5.0 GiB"]
    assert rows["1225829886"].find("td", class_="duration").text == "-"  # no stop time
    assert rows["1225829886"].find("td", class_="size")["title"] == "224073 bytes"
    page = browser.get("/observations/1192201262").text
    assert "JD 2458043.12552 · 2017-10-16 15:00:44 UTC" in page
    assert "18.1290 h" in page and "zen.2458043.12552.xx.HH.uvA" in page
    browser.get("/observations/42", status=404)


def test_session_pages(browser, sample):
    for url in ("/sessions/recent", "/sessions/all"):
        page = browser.get(url).text
        assert "/sessions/1192201262" in page
    page = browser.get("/sessions/1192201262").text
    assert "<tr><th>Observations</th><td>2</td></tr>" in page
    assert "2, of which 0 with a copy on this Librarian" in page
    assert "5.0 GiB" in page
    assert "/files/zen.2458043.13000.xx.HH.uvA" in page, "the session lists its files"
    browser.get("/sessions/7", status=404)


def test_store_pages_and_availability_needs_admin_and_csrf(browser, web, sample):
    page = browser.get("/stores").text
    assert 'class="bar"' in page
    page = browser.get("/stores/main")
    assert "1 (5 B)" in page.text
    form = page.forms[0]
    form.submit(status=302)
    assert models.Store.get().available is False
    resp = browser.post("/stores/main/make-available", {}, status=403)
    assert "CSRF" in resp.text
    assert models.Store.get().available is False
    login_as(web, "writer")
    resp = web.post("/stores/main/make-available", {"csrf_token": "x"}, status=403)
    assert "needs level <strong>admin</strong>" in resp.text
    browser.get("/stores/nowhere", status=404)


def test_search_pages_and_outputs(browser, sample, store_dir):
    for url, sample_text in (("/search-files", "name-matches"), ("/search-obs", "start-lst-hr"),
                             ("/search-sessions", "num-files")):
        assert sample_text in browser.get(url).text
    form = browser.get("/search-files").forms[0]
    form["search"] = '{"name-matches": "zen.%"}'
    page = form.submit().text
    assert '<span id="count">3</span> file(s)' in page and "5.0 GiB" in page
    resp = browser.post("/search", {"type": "files", "search": '{"always-true": 1}',
                                    "output_format": "Raw text with file names"})
    assert resp.content_type == "text/plain"
    assert resp.text.split() == sorted(["readme.txt", "zen.2458043.12552.xx.HH.uvA",
                                        "zen.2458043.13000.xx.HH.uvA", "zen.2458432.34569.uvh5"])
    resp = browser.post("/search", {"type": "files", "search": '{"name-is-exactly": "readme.txt"}',
                                    "output_format": "Raw text with full instance paths"})
    assert resp.text.strip().endswith(store_dir + "/notes/readme.txt")
    page = browser.post("/search", {"type": "obs", "search": '{"start-lst-hr-greater-than": 18.2}',
                                    "output_format": "List of observations"}).text
    assert "/observations/1192201900" in page and "/observations/1192201262" not in page
    assert '<span id="count">1</span> observation(s)' in page
    page = browser.post("/search", {"type": "sessions", "search": '{"num-obs-is-exactly": 2}',
                                    "output_format": "List of sessions"}).text
    assert "/sessions/1192201262" in page


def test_bad_search_shows_the_error_next_to_the_query(browser, sample):
    resp = browser.post("/search", {"type": "files", "search": '{"size-greater-than": "big"}',
                                    "output_format": "List of files"}, status=400)
    assert "size-greater-than needs an integer" in resp.text
    assert "{&quot;size-greater-than&quot;: &quot;big&quot;}" in resp.text
    resp = browser.post("/search", {"type": "planets", "search": "{}"}, status=400)
    assert "type must be files, obs or sessions" in resp.text


def test_lists_are_paginated(browser, app):
    md5 = "0" * 32
    now = models.utcnow()
    models.File.insert_many([{"name": "f%03d" % i, "type": "dat", "size": i, "md5": md5,
                              "source": "t", "create_time": now - datetime.timedelta(seconds=i)}
                             for i in range(120)]).execute()
    page1 = browser.post("/search", {"type": "files", "search": '{"name-matches": "f%"}',
                                     "output_format": "List of files"}).text
    assert "f000" in page1 and "f050" not in page1 and "next &rarr;" in page1
    link = re.search(r'href="\?([^"]*page=2[^"]*)"', page1).group(1).replace("&amp;", "&")
    page2 = browser.get("/search?" + link).text
    assert "f050" in page2 and "f000" not in page2 and '<span id="count">120</span>' in page2


def test_upload_page_needs_read_append(web, browser):
    assert 'id="upload-form"' in browser.get("/upload").text
    assert 'href="/upload"' in browser.get("/").text
    login_as(web, "reader")
    assert "needs level <strong>read-append</strong>" in web.get("/upload", status=403).text
    assert 'href="/upload"' not in web.get("/").text, "not offered to whom it would refuse"


def test_search_forms_list_their_clauses(browser):
    page = browser.get("/search-sessions").text
    assert "no-file-has-event" in page and "num-obs-greater-than" in page
    page = browser.get("/search-files").text
    assert "start-lst-hr-in-range" in page and "obs-matches" in page
    reply = browser.post("/search", {"type": "files", "search": '{"lst-in-range": [1, 2]}'},
                         status=400).text
    assert "its attributes are" in reply and "start-lst-hr" in reply


def test_upload_with_session_needs_the_csrf_header(browser, store_dir):
    browser.put("/api/upload/web.txt?null_obsid=true", b"data", status=403)
    token = re.search(r'"X-CSRF-Token": "([^"]+)"', browser.get("/upload").text).group(1)
    reply = browser.put("/api/upload/web.txt?null_obsid=true", b"data",
                        headers={"X-CSRF-Token": token}, status=201).json
    assert reply["name"] == "web.txt" and models.File.get().source == "admin"
    # the form's resumable upload, likewise
    create = {"Tus-Resumable": "1.0.0", "Upload-Length": "4",
              "Upload-Metadata": "dest d2ViMi50eHQ=,null_obsid dHJ1ZQ=="}
    browser.post("/api/uploads", headers=create, status=403)
    browser.post("/api/uploads", headers=dict(create, **{"X-CSRF-Token": token}), status=201)


@pytest.mark.parametrize("url,status", [
    ("/observations?page=999999999999999999999", 200), ("/observations?page=-3", 200),
    ("/observations/9223372036854775808", 404), ("/sessions/99999999999999999999", 404),
    ("/sessions/all?page=abc", 200)])
def test_odd_numbers_in_urls_are_not_errors(browser, url, status):
    browser.get(url, status=status)


def test_pages_survive_out_of_range_dates(browser, app):
    models.Observation.create(obsid=5, start_time_jd=1e300, stop_time_jd=None)
    assert "/observations/5" in browser.get("/observations").text
    browser.get("/observations/5")


def test_tasks_page_lists_states_and_admins_can_retry_and_cancel(browser, web, app):
    import tasks
    import task_support  # noqa: F401

    failed = tasks.enqueue(ctx(), "test_fail", {"permanent": True})
    tasks.run_until_empty(ctx())
    pending = tasks.enqueue(ctx(), "test_fail", {}, delay=3600)
    page = browser.get("/tasks")
    assert "bad arguments" in page.text and "due " in page.text
    cancel = [f for f in page.forms.values() if f.action == "/tasks/%d/cancel" % pending.id][0]
    cancel.submit(status=302)
    assert tasks.Task.get_by_id(pending.id).state == "failed"
    retry = [f for f in browser.get("/tasks").forms.values()
             if f.action == "/tasks/%d/retry" % failed.id][0]
    retry.submit(status=302)
    assert tasks.Task.get_by_id(failed.id).state == "pending"
    browser.post("/tasks/%d/cancel" % failed.id, {}, status=403)  # no CSRF token
    login_as(web, "writer")
    assert "Retry now" not in web.get("/tasks").text
    web.post("/tasks/%d/retry" % failed.id, {"csrf_token": "x"}, status=403)


def test_standing_order_pages_create_edit_delete(browser, web, app, monkeypatch):
    import copies

    monkeypatch.setattr(copies, "client_for", lambda ctx, name: None)
    page = browser.get("/standing-orders")
    form = page.forms[0]
    form["name"] = "to-penn"
    form["conn_name"] = "penn"
    form["search"] = '{"type-is-exactly": "uvh5"}'
    resp = form.submit(status=302)
    assert resp.location.endswith("/standing-orders/to-penn")
    page = browser.get("/standing-orders/to-penn")
    edit = page.forms[0]
    edit["search"] = '{"bogus": 1}'
    assert "unknown clause" in edit.submit(status=400).text
    edit = browser.get("/standing-orders/to-penn").forms[0]
    edit["search"] = '{"type-is-exactly": "uvA"}'
    edit.submit(status=302)
    assert "uvA" in browser.get("/standing-orders").text
    browser.get("/standing-orders/to-penn").forms[1].submit(status=302)
    assert "No standing orders" in browser.get("/standing-orders").text
    browser.get("/standing-orders/nope", status=404)
    login_as(web, "reader")
    assert "New standing order" not in web.get("/standing-orders").text


def test_events_are_added_from_the_file_page_by_read_append_and_up(web, sample):
    login_as(web, "reader")
    assert web.get("/files/readme.txt").forms.get("add-event") is None
    login_as(web, "appender")
    form = web.get("/files/readme.txt").forms["add-event"]
    form["type"], form["payload"] = "qa_checked", '{"score": 0.9}'
    assert form.submit(status="3*").location.endswith("/files/readme.txt#events")
    latest = models.FileEvent.select().where(models.FileEvent.file == "readme.txt") \
        .order_by(models.FileEvent.id.desc()).first()
    assert (latest.type, latest.to_dict()["payload"]) == ("qa_checked", {"score": 0.9})
    form["type"], form["payload"] = "qa_checked", "[1]"
    refused = form.submit(status=400).text
    assert "must be a JSON object" in refused
    assert 'href="/logout"' in refused and 'href="/search-files"' in refused  # the site's frame
    form["type"], form["payload"] = "qa_checked", "[" * 100000 + "]" * 100000
    assert "nested too deeply" in form.submit(status=400).text
    form["type"], form["payload"] = "qa\0checked", ""
    assert "NUL" in form.submit(status=400).text
    form["type"], form["payload"] = "create_instance", ""
    assert "written by the server itself" in form.submit(status=403).text
    form["csrf_token"] = "forged"
    form["type"] = "qa_checked"
    form.submit(status=403)
    assert models.FileEvent.select().where(models.FileEvent.type == "qa_checked").count() == 1


def test_store_fill_is_counted_one_way_on_every_page(browser, sample):
    import re as _re

    home = browser.get("/").text
    bar = float(_re.search(r'class="bar" title="([\d.]+)% used"', home).group(1))
    health = browser.get("/health").text
    assert "%.1f%%" % bar in health  # as df counts it: used / (used + free)
