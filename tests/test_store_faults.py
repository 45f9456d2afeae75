"""The store layer's promises, each finding of the fault pass as a
regression test (the kills against real servers are in test_crashes.py):
deep and one-level trees, names that are not UTF-8, planted links,
bytes that change while they are checked, healing, the retry decision,
and a second process's start-up beside a live one."""

import os
import subprocess
import sys

import pytest

import models
import tasks
from conftest import ctx, ROOT, api, bearer, store_contents, the_task
from test_hardening import tar_bytes
from librarian_client import path_md5


def put(web, path, body=b"abc", status=201, directory=False, **query):
    query.setdefault("null_obsid", "true")
    headers = dict(bearer())
    if directory:
        headers["X-Librarian-Directory"] = "tar"
    url = "/api/upload/%s?%s" % (path, "&".join("%s=%s" % kv for kv in query.items()))
    return web.put(url, body, headers=headers, status=status,
                   content_type="application/octet-stream").json


def test_a_tar_a_thousand_folders_deep_is_refused_and_the_server_starts_again(app, web,
                                                                             store_dir):
    import librarian

    deep = "/".join(["d"] * 1000)
    body = tar_bytes([("t.uv/" + deep[:2 * i + 1], None) for i in range(1000)]
                       + [("t.uv/" + deep + "/f", b"x")])
    msg = put(web, "t.uv", body, status=400, directory=True)["message"]
    assert "more than 64 deep" in msg
    assert store_contents(store_dir) == (set(), [])
    # Bytes that deep planted in the staging area by hand: start-up removes them.
    path = os.path.join(store_dir, ".staging", "x")
    os.makedirs(path)
    for _ in range(1000):  # (os.makedirs recurses)
        path = os.path.join(path, "d")
        os.mkdir(path)
    librarian.startup(app)
    assert store_contents(store_dir) == (set(), [])


def test_a_directory_whose_only_content_is_a_folder_of_its_name_keeps_its_tree(
        web, store_dir, tmp_path):
    folder = tmp_path / "d.uv"
    (folder / "d.uv").mkdir(parents=True)
    (folder / "d.uv" / "vis").write_bytes(b"visibilities")
    # As `tar -C d.uv -cf - .` sends it: members ./, ./d.uv/, ./d.uv/vis
    reply = put(web, "d.uv", tar_bytes([("./", None), ("./d.uv/", None),
                                          ("./d.uv/vis", b"visibilities")]), directory=True)
    assert os.path.exists(os.path.join(store_dir, "d.uv", "d.uv", "vis"))
    assert reply["md5"] == path_md5(str(folder))[1]
    # As `tar -C PARENT -cf - d.uv`: the top folder is the upload's own.
    reply = put(web, "e.uv", tar_bytes([("e.uv/", None), ("e.uv/vis", b"v")]),
                directory=True)
    assert os.listdir(os.path.join(store_dir, "e.uv")) == ["vis"]


def test_names_that_are_not_utf8_are_refused(web, store_dir):
    for path in ("%ED%A0%80.dat", "a%ffb.dat"):
        msg = web.put("/api/upload/" + path, b"x", headers=bearer(), status=400).json["message"]
        assert "not valid UTF-8" in msg
    put(web, "ab.dat", b"ab")
    assert web.get("/api/download/a%ffb.dat", headers=bearer(), status=400)
    assert web.get("/api/download/ab.dat?x=%ff", headers=bearer(), status=400)
    body = tar_bytes([("t.uv/ok", b"1"), ("t.uv/\udcff", b"2")])
    assert "not valid UTF-8" in put(web, "t.uv", body, status=400, directory=True)["message"]
    assert store_contents(store_dir) == ({"ab.dat"}, [])


def test_an_absolute_destination_is_refused_not_made_relative(web, tmp_path, server,
                                                              client_config):
    import librarian_client

    msg = web.put("/api/upload//etc/x.dat?null_obsid=true", b"x", headers=bearer(),
                  status=400).json["message"]
    assert "must be relative" in msg
    local = tmp_path / "x.dat"
    local.write_bytes(b"x")
    client = librarian_client.LibrarianClient("admin", config_path=client_config)
    with pytest.raises(librarian_client.RPCError) as e:
        client.upload(str(local), "/etc/x.dat", null_obsid=True)
    assert "must be relative" in str(e.value)


def test_planted_links_are_never_written_through(web, store_dir, tmp_path):
    put(web, "reg/t.uv", tar_bytes([("t.uv/a", b"a")]), directory=True)
    before = path_md5(os.path.join(store_dir, "reg", "t.uv"))
    os.symlink(os.path.join(store_dir, "reg", "t.uv"), os.path.join(store_dir, "into"))
    (tmp_path / "plain").mkdir()
    os.symlink(str(tmp_path / "plain"), os.path.join(store_dir, "elsewhere"))
    os.symlink(os.path.join(store_dir, "reg"), os.path.join(store_dir, "inside"))
    for path, why in (("into/new.dat", "passes through a link"),
                      ("elsewhere/new.dat", "resolves outside store"),
                      ("inside/other.dat", "passes through a link")):
        assert why in put(web, path, b"new", status=400)["message"]
    assert path_md5(os.path.join(store_dir, "reg", "t.uv")) == before
    assert os.listdir(tmp_path / "plain") == []
    assert not os.path.exists(os.path.join(store_dir, "reg", "other.dat"))


def test_bytes_that_change_while_checked_are_not_registered(web, store_dir, monkeypatch):
    import ingest

    staging = api(web, "initiate_upload", upload_size=5)["staging_dir"]
    issued = os.path.join(store_dir, staging)
    writer = open(os.path.join(issued, "w.dat"), "wb")  # a client still writing
    writer.write(b"first")
    writer.flush()
    real = ingest.observation_of

    def read_while_written(*args, **kwargs):
        writer.write(b" and more")  # the open descriptor reaches the taken file
        writer.flush()
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest, "observation_of", read_while_written)
    msg = api(web, "complete_upload", status=409, store_name="main", staging_dir=staging,
              dest_store_path="w.dat", meta_mode="infer", null_obsid=True)["message"]
    writer.close()
    assert "changed while it was being checked" in msg
    assert models.File.select().count() == 0
    with open(os.path.join(issued, "w.dat"), "rb") as f:  # given back to the client
        assert f.read() == b"first and more"
    monkeypatch.setattr(ingest, "observation_of", real)
    reply = api(web, "complete_upload", store_name="main", staging_dir=staging,
                dest_store_path="w.dat", meta_mode="infer", null_obsid=True)
    assert models.File.get().size == len(b"first and more") and reply["success"]


def test_an_instance_whose_bytes_were_lost_is_healed_by_the_same_bytes(web, store_dir):
    put(web, "a/x.uvh5", b"not really uvh5")  # needed null_obsid: its header is unreadable
    path = os.path.join(store_dir, "a", "x.uvh5")
    os.chmod(os.path.dirname(path), 0o755)
    os.unlink(path)
    reply = put(web, "a/x.uvh5", b"not really uvh5", null_obsid="false")
    assert reply["already_present"] is False and reply["store_path"] == "a/x.uvh5"
    with open(path, "rb") as f:
        assert f.read() == b"not really uvh5"
    assert models.FileInstance.select().count() == 1
    assert models.FileEvent.select().where(models.FileEvent.type == "heal_instance").count() == 1
    # Present now: the same bytes again are a no-op, with or without the flag.
    assert put(web, "a/x.uvh5", b"not really uvh5", status=200,
               null_obsid="false")["already_present"] is True


def test_a_checksum_mismatch_fails_an_offload_at_once_and_every_attempt_is_kept(
        app, web, store_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    models.Store.create(name="other", ssh_host="localhost", path_prefix=str(other))
    put(web, "bad.dat", b"good bytes")
    path = os.path.join(store_dir, "bad.dat")
    os.chmod(path, 0o644)
    with open(path, "wb") as f:
        f.write(b"flipped!!!")  # same size, other bytes
    api(web, "initiate_offload", source_store_name="main", dest_store_name="other")
    tasks.run_until_empty(ctx())
    task = the_task()
    assert (task.state, task.attempts) == ("failed", 1)
    assert "bad.dat" in task.last_error and "not 10" in task.last_error
    assert task.errors.count("\n") == 0 and task.errors.startswith("attempt 1 at ")
    assert store_contents(str(other)) == (set(), [])


@tasks.handler("test_flaky")
def flaky(context, task, args):
    from errors import Transient

    if task.attempts < 3:
        raise Transient("busy (attempt %d)" % task.attempts)


def test_a_retried_task_shows_every_attempts_error(app):
    task = tasks.enqueue(ctx(), "test_flaky", {})
    for _ in range(3):
        tasks.Task.update(next_attempt=models.utcnow()).execute()
        tasks.run_until_empty(ctx())
    task = tasks.Task.get_by_id(task.id)
    assert task.state == "done"
    lines = task.errors.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "Transient: busy (attempt 1)", "Transient: busy (attempt 2)"]


def test_a_second_process_starting_settles_only_what_dead_processes_left(app, config_path,
                                                                         store_dir):

    store = ctx().open_store(models.Store.get())
    live = store.new_staging_dir()  # this process: mid-upload
    with open(os.path.join(live, "part.dat"), "wb") as f:
        f.write(b"half of it")
    dead = store.new_staging_dir()
    models.StoreIntent.update(owner="%s:1:never" % models.this_process().split(":")[0]).where(
        models.StoreIntent.staging == dead).execute()
    models.close_database()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "worker",
                          "--config", config_path, "--once"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    models.db.connect(reuse_if_open=True)
    with open(os.path.join(live, "part.dat"), "rb") as f:
        assert f.read() == b"half of it"
    assert not os.path.exists(dead)
    assert [i.staging for i in models.StoreIntent.select()] == [live]
    store.release(live)
    assert store_contents(store_dir) == (set(), [])


def test_a_file_still_open_for_writing_is_not_completed(web, store_dir):
    staging = api(web, "initiate_upload", upload_size=5)["staging_dir"]
    path = os.path.join(store_dir, staging, "open.dat")
    writer = subprocess.Popen([sys.executable, "-c", "import sys, time\n"
                               "f = open(sys.argv[1], 'wb'); f.write(b'part'); f.flush()\n"
                               "print('open', flush=True); time.sleep(60)", path],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "open"
        msg = api(web, "complete_upload", status=409, store_name="main", staging_dir=staging,
                  dest_store_path="open.dat", meta_mode="infer", null_obsid=True)["message"]
        assert "still open for writing (process %d)" % writer.pid in msg
        assert os.path.exists(path) and models.File.select().count() == 0
    finally:
        writer.kill()
        writer.wait()
    assert api(web, "complete_upload", store_name="main", staging_dir=staging,
               dest_store_path="open.dat", meta_mode="infer", null_obsid=True)["success"]


def test_a_folder_swapped_for_a_link_during_a_deletion_leaves_the_target_alone(
        web, store_dir, tmp_path, monkeypatch):
    from stores import intents

    put(web, "a/x.dat", b"registered")
    models.FileInstance.update(deletion_policy=models.DELETION_ALLOWED).execute()
    monkeypatch.setitem(ctx().settings.librarian, "deletion_min_other_copies", 0)  # sole copy
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "x.dat").write_bytes(b"not ours")
    real_begin = intents.begin

    def begin_then_swap(kind, *args, **kwargs):
        found = real_begin(kind, *args, **kwargs)
        if kind == "delete":  # between the check of the path and the act
            os.rename(os.path.join(store_dir, "a"), os.path.join(store_dir, "a.real"))
            os.symlink(str(victim), os.path.join(store_dir, "a"))
        return found

    monkeypatch.setattr(intents, "begin", begin_then_swap)
    stats = api(web, "delete_file_instances", file_name="x.dat")
    assert stats["n_error"] == 1
    assert (victim / "x.dat").read_bytes() == b"not ours"
    assert models.FileInstance.select().count() == 1
    assert models.StoreIntent.select().count() == 0


def test_removing_a_staging_folder_never_follows_a_link_in_it(web, store_dir):
    put(web, "obs/t.uv", tar_bytes([("t.uv/a", b"a"), ("t.uv/sub/b", b"b")]), directory=True)
    before = path_md5(os.path.join(store_dir, "obs", "t.uv"))
    store = ctx().open_store(models.Store.get())
    folder = store.new_staging_dir()
    os.mkdir(os.path.join(folder, "A"))
    os.symlink(os.path.join(store_dir, "obs", "t.uv"), os.path.join(folder, "A", "B"))
    os.symlink(os.path.join(store_dir, "obs", "t.uv", "sub"), os.path.join(folder, "C"))
    store.release(folder)
    assert not os.path.exists(folder)
    assert path_md5(os.path.join(store_dir, "obs", "t.uv")) == before


def test_the_same_bytes_sent_while_their_instance_is_deleted_wait_for_it(web, store_dir):
    from stores import intents

    put(web, "d/x.dat", b"x")
    store = ctx().open_store(models.Store.get())
    intents.begin("delete", store.row, staging=os.path.join(store_dir, ".staging", "t"),
                  store_path="d/x.dat")  # this process, moving the bytes out
    os.chmod(os.path.join(store_dir, "d"), 0o755)
    os.unlink(os.path.join(store_dir, "d", "x.dat"))
    assert "is being deleted" in put(web, "d/x.dat", b"x", status=409)["message"]
    assert not os.path.exists(os.path.join(store_dir, "d", "x.dat"))


def test_names_inside_a_directory_follow_the_rules_of_file_names(web, store_dir):
    body = tar_bytes([("c.uv/ok", b"1"), ("c.uv/a\nb\x1b[2J", b"2")])
    assert "control characters" in put(web, "c.uv", body, status=400, directory=True)["message"]
    assert store_contents(store_dir) == (set(), [])
