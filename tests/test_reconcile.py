"""Reconciliation of a store against the catalogue (reconcile.py): the exact
report on a store of this host and on one reached over SSH, the fixes, the
command line, the periodic task and the page."""

import datetime
import json
import os
import subprocess
import sys
from urllib.parse import quote

import pytest

import models
import reconcile
import tasks
from conftest import AUTH, ROOT, config_text, ctx, free_port, web_login
from reference import shell_md5
from test_upload import put, tar_of

ODD_STORE = "store 'a' \"b\""  # the store's folder: every command must survive its name
NIGHT = "night"


@pytest.fixture(params=["local", "ssh"])
def transport(request):
    return request.param


@pytest.fixture
def store_dir(tmp_path):
    path = tmp_path / ODD_STORE
    path.mkdir()
    return str(path)


@pytest.fixture
def config_path(request, tmp_path, db_url, store_dir):
    """The store `main`, on this host or (transport ssh) reached through sshd;
    other tests of this module use the store of this host only."""
    section = None
    if "transport" in request.fixturenames and request.getfixturevalue("transport") == "ssh":
        section = request.getfixturevalue("sshd").store_section("main", store_dir)
    path = tmp_path / "librarian.ini"
    path.write_text(config_text(db_url, store_dir, port=free_port(), store_section=section))
    return str(path)


def write(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def tree(tmp_path, name, files):
    """A directory `name` under tmp_path holding `files` {relative path: bytes}."""
    top = tmp_path / name
    for rel, data in files.items():
        write(str(top / rel), data)
    return str(top)


@pytest.fixture
def damaged(web, store_dir, tmp_path):
    """A store with one lost instance, two size mismatches (a file grown, a
    directory that lost a file), three dark entries (a file, a directory
    beside instances, a folder holding no record), and what must not be
    reported: staging, a registered directory's contents, empty folders,
    names that sort between a directory and its contents."""
    for name in ("keep.dat", "gone.dat", "grown.dat"):
        put(web, "%s/%s" % (NIGHT, name), name.encode(), null_obsid="true")
    for name, files in (("set.uv", {"a": b"aa", "sub/b": b"bbb"}),
                        ("shrunk.uv", {"a": b"aa", "b": b"bbb"})):
        put(web, "%s/%s" % (NIGHT, name), tar_of(tree(tmp_path, name, files), name),
            null_obsid="true", headers={"X-Librarian-Directory": "tar"})
    put(web, "a-b/y.dat", b"y", null_obsid="true")  # '-' sorts before '/': "a-b/x" < "a/..."
    put(web, "a/x.dat", b"x", null_obsid="true")
    night = os.path.join(store_dir, NIGHT)
    os.remove(os.path.join(night, "gone.dat"))
    os.chmod(os.path.join(night, "grown.dat"), 0o644)
    with open(os.path.join(night, "grown.dat"), "ab") as f:
        f.write(b" more")
    os.chmod(os.path.join(night, "shrunk.uv"), 0o755)
    os.remove(os.path.join(night, "shrunk.uv", "b"))
    write(os.path.join(night, "set.uv.bak"), b"dark file")  # sorts between set.uv and set.uv/
    write(os.path.join(night, "tab\tand\nnewline"))
    write(os.path.join(night, "extra.uv", "a"), b"dark")
    write(os.path.join(night, "extra.uv", "sub", "b"), b"directory")
    write(os.path.join(store_dir, "stray", "deep", "y.dat"))
    os.makedirs(os.path.join(store_dir, "emptied", "sub"))  # what deletions leave: not dark
    write(os.path.join(store_dir, ".staging", "0123abcd", "half.dat"))
    write(os.path.join(store_dir, ".staging", "loose"))


EXPECTED = {
    "lost": [{"store_path": "night/gone.dat", "file_name": "gone.dat"}],
    "dark": [{"store_path": "night/extra.uv", "type": "directory"},
             {"store_path": "night/set.uv.bak", "type": "file"},
             {"store_path": "night/tab\tand\nnewline", "type": "file"},
             {"store_path": "stray", "type": "directory"}],
    "size_mismatch": [{"store_path": "night/grown.dat", "file_name": "grown.dat",
                       "recorded_size": 9, "found_size": 14},
                      {"store_path": "night/shrunk.uv", "file_name": "shrunk.uv",
                       "recorded_size": 5, "found_size": 2}],
}


def test_a_store_is_reported_exactly_and_left_as_it_was(transport, damaged, store_dir):
    before = sorted(os.walk(store_dir)), models.FileInstance.select().count()
    assert reconcile.find(ctx(), models.Store.get()) == EXPECTED
    assert (sorted(os.walk(store_dir)), models.FileInstance.select().count()) == before


def test_the_fixes_register_dark_bytes_and_forget_lost_records(transport, damaged, store_dir):
    store = models.Store.get()
    done = reconcile.register_dark(ctx(), store, "night/extra.uv", null_obsid=True)
    assert (done["name"], done["size"]) == ("extra.uv", 13)
    assert models.File.get_by_id("extra.uv").md5 == shell_md5(
        os.path.join(store_dir, "night", "extra.uv"))
    assert models.FileInstance.get(models.FileInstance.file == "extra.uv").store_path \
        == "night/extra.uv"
    assert os.stat(os.path.join(store_dir, "night", "extra.uv", "a")).st_mode & 0o222 == 0
    reconcile.forget_lost(ctx(), store, "night/gone.dat")
    assert not models.FileInstance.select().where(models.FileInstance.file == "gone.dat").exists()
    event = models.FileEvent.get((models.FileEvent.file == "gone.dat")
                                 & (models.FileEvent.type == "delete_instance"))
    assert "reconcile --forget-lost" in json.loads(event.payload)["reason"]
    after = reconcile.find(ctx(), store)
    assert after["lost"] == [] and after["size_mismatch"] == EXPECTED["size_mismatch"]
    assert after["dark"] == [e for e in EXPECTED["dark"] if e["store_path"] != "night/extra.uv"]
    for fix, path, message in (
            (reconcile.register_dark, "night/keep.dat", "is a registered instance"),
            (reconcile.register_dark, "night/set.uv/a", "is inside the registered file"),
            (reconcile.register_dark, "night/nothing", "nothing is at"),
            (reconcile.register_dark, "night", "holds the registered file"),
            (reconcile.forget_lost, "night/keep.dat", "it is not lost"),
            (reconcile.forget_lost, "night/set.uv.bak", "no instance is recorded")):
        with pytest.raises(models.LibrarianError, match=message):
            fix(ctx(), store, path)
    assert reconcile.find(ctx(), store) == after


def test_records_and_listing_agree_on_byte_order(transport, web, tmp_path):
    """Names whose order differs by folder and by whole path (' ', '-', '.'
    sort before '/'), non-ASCII ones, a directory beside a file named like
    it: all present, nothing reported."""
    for path in ("a/1", "a b/2", "a-b/3", "a.b", "ä/4", "zé.dat", "d.uv.flags", "A/5"):
        put(web, quote(path), path.encode(), null_obsid="true")
    put(web, "d.uv", tar_of(tree(tmp_path, "d.uv", {"f": b"f", "e/f": b"g"}), "d.uv"),
        null_obsid="true", headers={"X-Librarian-Directory": "tar"})
    assert reconcile.find(ctx(), models.Store.get()) == {"lost": [], "dark": [],
                                                         "size_mismatch": []}


# ---------------------------------------------------------------------------
# The command line (the store of this host)
# ---------------------------------------------------------------------------

def cli(config_path, *args):
    models.close_database()  # SQLite: the child writes
    return subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "reconcile",
                           *args, "--config", config_path], capture_output=True, text=True,
                          timeout=120, check=False)


def test_the_command_prints_the_report_and_applies_only_the_fixes_asked_for(
        damaged, config_path, store_dir, tmp_path, db_url):
    run = cli(config_path, "main")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == EXPECTED
    advice = dict(line.split(": ", 1) for line in run.stderr.splitlines())
    assert "--forget-lost STORE_PATH" in advice["lost"] and "repair" in advice["lost"]
    assert "--register-dark STORE_PATH" in advice["dark"]
    assert "repair" in advice["size_mismatch"]

    run = cli(config_path, "nosuch")
    assert run.returncode == 2 and "no store named 'nosuch' (stores: main)" in run.stderr
    run = cli(config_path, "main", "--register-dark", "night/keep.dat", "--forget-lost",
              "night/keep.dat")
    assert run.returncode == 1
    assert "--register-dark night/keep.dat refused: night/keep.dat is a registered" in run.stderr
    assert "--forget-lost night/keep.dat refused: the bytes of night/keep.dat" in run.stderr
    run = cli(config_path, "main", "--register-dark", "night/set.uv.bak", "--null-obsid",
              "--forget-lost", "night/gone.dat")
    assert run.returncode == 0, run.stderr
    assert "registered night/set.uv.bak as set.uv.bak (9 bytes" in run.stdout
    assert models.File.get_by_id("set.uv.bak").md5 == shell_md5(
        os.path.join(store_dir, "night", "set.uv.bak"))
    assert not models.FileInstance.select().where(models.FileInstance.file == "gone.dat").exists()
    assert models.FileEvent.select().where(models.FileEvent.type == "delete_instance").count() == 1
    report = json.loads(cli(config_path, "main").stdout)
    assert report["lost"] == [] and len(report["dark"]) == 3

    unreachable = tmp_path / "unreachable.ini"
    unreachable.write_text(config_text(db_url, store_dir, port=free_port(), store_section=(
        "[store:main]\npath_prefix = %s\nssh_host = 127.0.0.1\ntransport = ssh\nssh_port = %d\n"
        "known_hosts = ignore\nssh_timeout = 3\n\n" % (store_dir, free_port()))))
    run = cli(str(unreachable), "main")
    assert run.returncode == 2 and run.stdout == ""
    assert "store 'main' cannot be read: " in run.stderr and "store 'main' on host" in run.stderr
    assert "is unreachable: connection refused" in run.stderr


# ---------------------------------------------------------------------------
# The periodic task and the page
# ---------------------------------------------------------------------------

def pending():
    return list(tasks.Task.select().where((tasks.Task.kind == "reconcile")
                                          & (tasks.Task.state == "pending")))


def test_the_task_keeps_its_report_and_queues_the_next_one_interval_later(damaged, store_dir):
    reconcile.schedule(ctx())
    reconcile.schedule(ctx())  # (the start-up queued one already)
    [first] = pending()
    assert datetime.timedelta(0) < first.next_attempt - models.utcnow() <= datetime.timedelta(
        seconds=reconcile.FIRST_RUN_SECONDS), "never reconciled: a while after the start"
    tasks.Task.update(next_attempt=models.utcnow()).where(tasks.Task.id == first.id).execute()
    assert tasks.run_until_empty(ctx()) == 1
    report = reconcile.last_report(models.Store.get())
    assert report["counts"] == {"lost": 1, "dark": 4, "size_mismatch": 2}
    assert report["dark"] == EXPECTED["dark"]
    [next_one] = pending()
    due = next_one.next_attempt - models.utcnow()
    assert datetime.timedelta(hours=23, minutes=59) < due <= datetime.timedelta(hours=24)
    reconcile.schedule(ctx())  # at start-up: the chain is there, due after the last report
    assert [t.id for t in pending()] == [next_one.id]

    assert reconcile.run_now(ctx(), "main") == "due"
    assert tasks.run_until_empty(ctx()) == 1
    assert len(pending()) == 1 and pending()[0].id != next_one.id

    # A failure that is tried again keeps the chain; the last one queues the next.
    os.rename(store_dir, store_dir + ".away")
    tasks.Task.update(next_attempt=models.utcnow()).where(tasks.Task.kind == "reconcile").execute()
    assert tasks.run_until_empty(ctx()) == 1
    [retried] = pending()
    assert retried.attempts == 1 and "is not a writable folder" in retried.last_error
    tasks.Task.update(next_attempt=models.utcnow(), max_attempts=2).where(
        tasks.Task.kind == "reconcile").execute()
    assert tasks.run_until_empty(ctx()) == 1
    assert tasks.Task.get_by_id(retried.id).state == "failed"
    assert len(pending()) == 1 and pending()[0].next_attempt > models.utcnow()


def test_the_page_shows_the_last_report_and_admins_can_run_one_now(web, damaged, store_dir):
    for i in range(reconcile.KEPT + 5):
        write(os.path.join(store_dir, NIGHT, "zz<b>%04d" % i))
    web_login(web, AUTH["admin"])
    assert "/stores/main/reconcile" in web.get("/stores/main").text
    page = web.get("/stores/main/reconcile")
    assert "No reconciliation has finished yet" in page.text
    web.post("/stores/main/reconcile", {"csrf_token": "x"}, status=403)
    assert [t for t in pending() if t.next_attempt <= models.utcnow()] == []
    page.forms[0].submit(status=302)
    assert "A reconciliation is pending" in web.get("/stores/main/reconcile").text
    tasks.run_until_empty(ctx())
    page = web.get("/stores/main/reconcile").text
    assert "1 lost, %d dark, 2 size mismatch" % (reconcile.KEPT + 9) in page
    assert "night/gone.dat" in page and "night/extra.uv" in page and ">14</td>" in page
    assert "<b>" not in page and "night/zz&lt;b&gt;0000" in page
    assert "… and 9 more" in page
    web.reset()
    web_login(web, AUTH["reader"])
    assert "Reconcile now" not in web.get("/stores/main/reconcile").text
    web.get("/stores/nosuch/reconcile", status=404)
