"""Integrity over time on one Librarian, on SQLite and PostgreSQL: the
scrub finds a flipped byte, the corrupt instance is out of service, full
reads verify (a download is cut short), repair from a second store,
deletion only when the file is safe elsewhere, alerts to a webhook."""

import json
import os
from datetime import timedelta

import pytest
import requests

import integrity
import models
import tasks
from conftest import api, bearer, config_text, ctx, free_port
from librarian_client import CHUNK

BIG = 3 * (1 << 20) + 12345  # bytes: several store chunks, so a download is streamed


@pytest.fixture
def two_stores(tmp_path, db_url, store_dir, hook):
    """A config with stores `main` and `second` and the webhook."""
    second = tmp_path / "second"
    second.mkdir()
    path = tmp_path / "librarian.ini"
    text = config_text(db_url, store_dir, port=free_port(), store_section=(
        "[store:main]\npath_prefix = %s\n\n[store:second]\npath_prefix = %s\n\n"
        % (store_dir, second)))
    text = text.replace("[database]", "[librarian]\nalert_webhook_url = %s\n"
                        "scrub_bytes_per_second = 0\n\n[rolling_deletion:night]\nstore = main\n"
                        "older_than_days = 30\n\n[database]" % hook.url)
    path.write_text(text)
    return str(path), str(second)


@pytest.fixture
def config_path(two_stores):
    return two_stores[0]


def put(web, name, body, store=None):
    """Upload `body` as `name` (its instance on the store with most room);
    returns the reply."""
    return web.put("/api/upload/%s?null_obsid=true&deletion_policy=allowed" % name, body,
                   headers=bearer(), content_type="application/octet-stream",
                   status=201).json


def instance(name, store):
    return (models.FileInstance.select(models.FileInstance, models.Store, models.File)
            .join(models.Store).switch(models.FileInstance).join(models.File)
            .where((models.FileInstance.file == name) & (models.Store.name == store)).get())


def all_due():
    """Every instance due for the scrub (uploads are verified at ingest)."""
    models.FileInstance.update(verified_at=None).execute()


def flip_byte(path, offset=100):
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def copy_to_second(name):
    """A second instance of `name` on store `second`, by the repair path's
    own copy (another_copy registration)."""
    import ingest

    main = ctx().open_store(models.Store.by_name("main"))
    second = ctx().open_store(models.Store.by_name("second"))
    inst = instance(name, "main")
    staging = second.new_staging_dir()
    try:
        staged = os.path.join(staging, name)
        main.copy_to(main.resolve(inst.store_path), second, staged)
        ingest.register_staged(second, staged, inst.store_path, source="admin",
                               meta_mode="direct", another_copy=True,
                               deletion_policy="allowed")
    finally:
        second.release(staging)


def test_a_flipped_byte_is_found_by_one_scrub_pass_and_the_instance_leaves_service(
        app, web, store_dir, hook):
    body = os.urandom(BIG)
    put(web, "a.dat", body)
    put(web, "b.dat", b"fine")
    where = "main"  # uploads go to the roomiest store, the first by name on a tie
    flip_byte(os.path.join(ctx().open_store(models.Store.by_name(where)).prefix, "a.dat"))

    all_due()
    count, read, more = integrity.scrub(ctx(), models.Store.by_name(where))
    assert (count, more) == (2, False)
    assert BIG - CHUNK < read <= BIG + 4  # a bad file's last chunk is never passed on
    a = instance("a.dat", where)
    assert a.verify_result == "corrupt" and a.verified_at is not None
    event = models.FileEvent.get((models.FileEvent.file == "a.dat")
                                 & (models.FileEvent.type == "instance_corrupt"))
    assert json.loads(event.payload)["found_by"] == "scrub"
    alert = hook.wait("corrupt")[0]
    assert "a.dat" in alert["text"] and alert["detail"]["store_name"] == where
    # Out of service: not served, not located.
    assert "has no good instance here: the one on store main is corrupt" in web.get(
        "/api/download/a.dat", headers=bearer(), status=400).text
    assert api(web, "locate_file_instance", status=400, file_name="a.dat")["success"] is False
    # A second pass finds it corrupt again without a second alert or event.
    integrity.verify_instance(ctx(), instance("a.dat", where))
    assert models.FileEvent.select().where(models.FileEvent.type == "instance_corrupt").count() \
        == 1
    assert len(hook.wait("corrupt")) == 1
    # verify_file reports both results.
    copies = {c["store_path"]: c for c in api(web, "verify_file", auth="writer",
                                               file_name="a.dat")["copies"]}
    assert copies["a.dat"]["ok"] is False and copies["a.dat"]["result"] == "corrupt"
    good = api(web, "verify_file", auth="writer", file_name="b.dat")["copies"]
    assert [(c["ok"], c["md5"], c["size"], c["librarian"]) for c in good] == [
        (True, models.File.get_by_id("b.dat").md5, 4, "Test")]


def test_a_download_of_bytes_that_changed_is_cut_short_and_marks_the_instance(
        app, server, store_dir, hook):
    body = os.urandom(BIG)
    assert requests.put(server.url + "api/upload/big.dat?null_obsid=true", data=body,
                        headers=bearer(), timeout=60).status_code == 201
    models.db.connect(reuse_if_open=True)
    where = instance("big.dat", "main").store
    path = os.path.join(ctx().open_store(where).prefix, "big.dat")
    flip_byte(path, offset=len(body) - 10)  # in the last chunk: the whole body is read first
    resp = requests.get(server.url + "api/download/big.dat", headers=bearer(), stream=True,
                        timeout=60)
    assert resp.status_code == 200 and int(resp.headers["Content-Length"]) == len(body)
    got = b""
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in resp.iter_content(1 << 16):
            got += chunk
    assert len(got) < len(body), "the end of a bad stream is never sent"
    assert instance("big.dat", where.name).verify_result == "corrupt"
    hook.wait("corrupt")
    # A range of the whole file (as resuming clients ask) is a full read.
    models.FileInstance.update(verify_result=None).execute()
    resp = requests.get(server.url + "api/download/big.dat", headers=dict(
        bearer(), Range="bytes=0-"), stream=True, timeout=60)
    assert resp.status_code == 206
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for chunk in resp.iter_content(1 << 16):
            pass
    # A part is not: served by byte, not verified.
    models.FileInstance.update(verify_result=None).execute()
    part = requests.get(server.url + "api/download/big.dat", headers=dict(
        bearer(), Range="bytes=0-9"), timeout=60)
    assert part.status_code == 206 and part.content == body[:10]


def test_a_corrupt_instance_is_repaired_from_the_other_store(app, web, two_stores, hook):
    body = os.urandom(BIG)
    put(web, "r.dat", body)
    copy_to_second("r.dat")
    path = os.path.join(ctx().open_store(models.Store.by_name("main")).prefix, "r.dat")
    flip_byte(path)
    all_due()
    integrity.scrub(ctx(), models.Store.by_name("main"))
    assert instance("r.dat", "main").verify_result == "corrupt"
    queued = tasks.Task.get(tasks.Task.kind == "repair")
    assert json.loads(queued.args) == {"file_name": "r.dat", "store": "main", "parent_dirs": "",
                                       "alerted": False}
    tasks.run_until_empty(ctx())
    repaired = instance("r.dat", "main")
    assert repaired.verify_result == "ok"
    with open(path, "rb") as f:
        assert f.read() == body
    event = models.FileEvent.get((models.FileEvent.file == "r.dat")
                                 & (models.FileEvent.type == "instance_repaired"))
    assert json.loads(event.payload)["from"] == "store second"
    assert instance("r.dat", "second").verify_result == "ok"  # read, not changed


def test_no_good_copy_anywhere_is_an_alert(app, web, hook):
    put(web, "lone.dat", b"x" * 5000)
    where = instance("lone.dat", "main").store
    flip_byte(os.path.join(ctx().open_store(where).prefix, "lone.dat"))
    all_due()
    integrity.scrub(ctx(), where)
    tasks.run_until_empty(ctx())
    alert = hook.wait("no_good_copy")[0]
    assert "lone.dat" in alert["text"]
    assert instance("lone.dat", where.name).verify_result == "corrupt"
    # The search for a good copy goes on: once one is there, the repair happens
    # (and the alert is not sent again meanwhile).
    [again] = tasks.Task.select().where((tasks.Task.kind == "repair")
                                        & (tasks.Task.state == "pending"))
    assert json.loads(again.args)["alerted"] is True
    assert again.next_attempt > models.utcnow() + timedelta(minutes=50)
    tasks.Task.update(next_attempt=models.utcnow()).where(tasks.Task.id == again.id).execute()
    tasks.run_until_empty(ctx())
    assert len(hook.wait("no_good_copy")) == 1
    second = ctx().open_store(models.Store.by_name("second"))
    staging = second.new_staging_dir()
    try:
        with open(os.path.join(staging, "lone.dat"), "wb") as f:
            f.write(b"x" * 5000)
        import ingest
        ingest.register_staged(second, os.path.join(staging, "lone.dat"), "lone.dat",
                               source="admin", meta_mode="direct", another_copy=True)
    finally:
        second.release(staging)
    tasks.Task.update(next_attempt=models.utcnow()).where(tasks.Task.kind == "repair").execute()
    tasks.run_until_empty(ctx())
    assert instance("lone.dat", where.name).verify_result == "ok"
    with open(os.path.join(ctx().open_store(where).prefix, "lone.dat"), "rb") as f:
        assert f.read() == b"x" * 5000


def test_a_missing_instance_is_found_and_repaired(app, web, hook):
    put(web, "m.dat", b"m" * 4000)
    copy_to_second("m.dat")
    path = os.path.join(ctx().open_store(models.Store.by_name("main")).prefix, "m.dat")
    os.unlink(path)
    all_due()
    integrity.scrub(ctx(), models.Store.by_name("main"))
    assert instance("m.dat", "main").verify_result == "missing"
    hook.wait("missing")
    tasks.run_until_empty(ctx())
    assert instance("m.dat", "main").verify_result == "ok" and os.path.exists(path)


def test_deletion_needs_another_good_copy_and_never_takes_the_last(app, web):
    put(web, "d.dat", b"d" * 3000)
    copy_to_second("d.dat")
    noop = api(web, "delete_file_instances", auth="writer", file_name="d.dat", mode="noop")
    assert noop["n_deleted"] == 2 and [i["action"] for i in noop["instances"]] == [
        "delete", "delete"]
    # The first goes (the second is a good copy); the second is then the last.
    reply = api(web, "delete_file_instances", auth="writer", file_name="d.dat")
    assert (reply["n_deleted"], reply["n_kept"]) == (1, 1)
    left = list(models.FileInstance.select().where(models.FileInstance.file == "d.dat"))
    assert len(left) == 1
    noop = api(web, "delete_file_instances", auth="writer", file_name="d.dat", mode="noop")
    assert noop["instances"][0]["reason"] == "it is the last good copy known anywhere"


def test_a_corrupt_other_copy_does_not_count(app, web):
    put(web, "c.dat", b"c" * 3000)
    copy_to_second("c.dat")
    models.FileInstance.update(verify_result="corrupt").where(
        models.FileInstance.store == models.Store.by_name("second")).execute()
    reply = api(web, "delete_file_instances", auth="writer", file_name="c.dat",
                restrict_to_store="main")
    assert (reply["n_deleted"], reply["n_kept"]) == (0, 2)
    assert os.path.exists(os.path.join(ctx().open_store(models.Store.by_name("main")).prefix,
                                       "c.dat"))


def test_the_pacer_holds_the_configured_rate():
    clock = [0.0]
    slept = []

    def sleep(s):
        slept.append(s)
        clock[0] += s

    pace = integrity.Pacer(10e6, clock=lambda: clock[0], sleep=sleep)
    for _ in range(100):
        pace(1 << 20)  # 100 MiB at 10 MB/s: 10.49 s
    assert clock[0] == pytest.approx(100 * (1 << 20) / 10e6, rel=1e-9)
    unpaced = integrity.Pacer(0, clock=lambda: 0.0, sleep=sleep)
    slept.clear()
    unpaced(1 << 30)
    assert slept == []


def test_rolling_deletion_takes_old_files_with_copies_elsewhere_and_reports_the_rest(
        app, web, config_path):
    import subprocess
    import sys
    from datetime import timedelta

    from conftest import ROOT

    for name in ("old-copied.dat", "old-alone.dat", "new-copied.dat"):
        put(web, name, name.encode() * 100)
    copy_to_second("old-copied.dat")
    copy_to_second("new-copied.dat")
    models.File.update(create_time=models.utcnow() - timedelta(days=40)).where(
        models.File.name.startswith("old-")).execute()
    models.db.close()
    noop = subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"),
                           "rolling-deletion", "night", "--noop", "--config", config_path],
                          capture_output=True, text=True, timeout=120)
    assert noop.returncode == 0, noop.stderr
    report = json.loads(noop.stdout)
    assert (report["store"], report["mode"]) == ("main", "noop")
    assert [(i["name"], i["action"], i["reason"]) for i in report["instances"]] == [
        ("old-alone.dat", "keep", "it is the last good copy known anywhere"),
        ("old-copied.dat", "delete", "allowed, and safe elsewhere")]
    models.db.connect(reuse_if_open=True)
    assert models.FileInstance.select().count() == 5, "noop changed nothing"
    task = tasks.Task.get(tasks.Task.kind == "rolling_deletion")
    tasks.Task.update(next_attempt=models.utcnow()).where(tasks.Task.id == task.id).execute()
    tasks.run_until_empty(ctx())
    left = sorted((i.name, i.store.name) for i in models.FileInstance.select())
    assert left == [("new-copied.dat", "main"), ("new-copied.dat", "second"),
                    ("old-alone.dat", "main"), ("old-copied.dat", "second")]
    assert json.loads(tasks.Task.get_by_id(task.id).args)["report"]["n_deleted"] == 1
    assert tasks.Task.select().where((tasks.Task.kind == "rolling_deletion")
                                     & (tasks.Task.state == "pending")).count() == 1


def test_the_cli_verifies_and_says_why_an_instance_is_kept(app, server, client_config, capsys):
    import librarian_client

    body = b"v" * 7000
    assert requests.put(server.url + "api/upload/v.dat?null_obsid=true&deletion_policy=allowed",
                        data=body, headers=bearer(), timeout=60).status_code == 201
    md5 = __import__("hashlib").md5(body).hexdigest()
    assert librarian_client.main(["--config", client_config, "verify", "writer", "v.dat"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok   Test: ok on store main at v.dat, 7000 bytes, md5 " + md5)
    assert librarian_client.main(["--config", client_config, "delete-files", "writer",
                                  '{"name-is-exactly": "v.dat"}', "--noop"]) == 0
    out = capsys.readouterr().out
    assert "keep   v.dat on store main at v.dat: it is the last good copy known anywhere" in out
    flip_byte(os.path.join(ctx().open_store(models.Store.by_name("main")).prefix, "v.dat"))
    assert librarian_client.main(["--config", client_config, "verify", "writer", "v.dat"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("BAD  Test: corrupt on store main at v.dat")
    assert "1 of 1 copies of v.dat are not good" in captured.err


def test_a_store_whose_folder_is_gone_is_not_made_again_nor_found_missing(app, web, store_dir):
    """An unmounted disk: its instances are not missing, nothing is made
    under the mount point, the scrub waits."""
    from errors import Unavailable

    put(web, "u.dat", b"u" * 3000)
    os.rename(store_dir, store_dir + ".unmounted")
    store = ctx().open_store(models.Store.by_name("main"))
    store.ensure_prefix()
    assert not os.path.exists(store_dir)
    with pytest.raises(Unavailable):
        integrity.scrub(ctx(), models.Store.by_name("main"))
    with pytest.raises(Unavailable):
        store.new_staging_dir()
    copies = api(web, "verify_file", auth="writer", file_name="u.dat")["copies"]
    assert [(c["ok"], c["result"]) for c in copies] == [(False, "unreachable")]
    assert instance("u.dat", "main").verify_result == "ok"
    assert not os.path.exists(store_dir)


def test_a_file_that_grew_is_corrupt(app, web, store_dir):
    put(web, "g.dat", b"g" * 3000)
    path = os.path.join(store_dir, "g.dat")
    os.chmod(path, 0o644)
    with open(path, "ab") as f:
        f.write(b"more")
    result = integrity.verify_instance(ctx(), instance("g.dat", "main"))
    assert (result["ok"], result["result"], result["size"]) == (False, "corrupt", 3004)
