"""What a site running the original Librarian relies on, checked against our
server: pre-staged folders, store-relative staging folders, the original's
search aliases, its leniency about extra arguments, record sets that add a
session later, zero-length files. (The deployed client itself is driven in
test_v1_client.py.)"""

import os
import shutil
import socket
import subprocess

import models
from conftest import ctx, api, bearer
from reference import shell_md5


def prestage(store_dir, subdir, files):
    """Put `{name: bytes}` into `store_dir/subdir` as an operator would."""
    folder = os.path.join(store_dir, subdir)
    os.makedirs(folder, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
    return folder


def snapshot(folder):
    """{relative path: (bytes, mtime)} of everything in a folder."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return found


def ingest_prestaged(web, subdir, name, dest=None, status=200, **extra):
    reply = api(web, "initiate_upload", upload_size=1, known_staging_store="main",
                known_staging_subdir=subdir)
    assert reply["staging_dir"] == subdir  # as given: relative to path_prefix
    return api(web, "complete_upload", status=status, store_name="main", staging_dir=subdir,
               dest_store_path=dest or "2458043/" + name, meta_mode="infer",
               staging_was_known=True, **extra)


def test_a_prestaged_folder_is_ingested_one_file_per_call_and_keeps_the_others(
        web, store_dir):
    import librarian

    names = ["f%03d.flag" % i for i in range(200)]
    folder = prestage(store_dir, "incoming/night 1", {n: n.encode() for n in names})
    prestage(store_dir, "incoming/night 1", {"README.txt": b"operator's notes"})
    for name in names[:150]:
        ingest_prestaged(web, "incoming/night 1", name, null_obsid=True)
    assert models.FileInstance.select().count() == 150
    left = snapshot(folder)
    assert sorted(left) == sorted(names[150:] + ["README.txt"])
    assert left["README.txt"][0] == b"operator's notes"
    with open(os.path.join(store_dir, "2458043", "f007.flag"), "rb") as f:
        assert f.read() == b"f007.flag"
    # Start-up housekeeping never sweeps an operator's folder.
    before = snapshot(folder)
    librarian.settle_all(ctx())
    assert snapshot(folder) == before
    assert os.listdir(os.path.join(store_dir, ".staging")) == []


def test_a_prestaged_file_that_cannot_be_registered_stays_where_it_was(web, store_dir):
    folder = prestage(store_dir, "carried/disk7", {"zen.x.dat": b"no obsid", "other": b"o"})
    before = snapshot(folder)
    msg = ingest_prestaged(web, "carried/disk7", "zen.x.dat", status=400)["message"]
    assert "null_obsid" in msg
    assert snapshot(folder) == before
    assert models.File.select().count() == 0
    assert os.listdir(os.path.join(store_dir, ".staging")) == []
    # Different bytes under a registered name: refused, and still left alone.
    api(web, "initiate_upload", upload_size=1, files={"zen.x.dat": {
        "name": "zen.x.dat", "type": "dat", "create_time": 1500000000, "obsid": None,
        "size": 3, "md5": "0" * 32}})
    msg = ingest_prestaged(web, "carried/disk7", "zen.x.dat", status=409, null_obsid=True)
    assert snapshot(folder) == before


def take_as(store, folder, name, owner):
    """Do what complete_upload does before registering a pre-staged file,
    as the process `owner` ("host:pid")."""
    private = store.new_staging_dir("take", origin=os.path.join(folder, name))
    as_owner(private, owner)
    return store.take(store.known_staging_dir(folder), name, private)[0]


def as_owner(staging, owner):
    """Make the intents on `staging` (a folder, or an item in one) `owner`'s."""
    models.StoreIntent.update(owner=owner).where(models.StoreIntent.staging == staging).execute()


def commit_as(store, staged, store_path, owner):
    """Do what a commit does before its transaction ends: the intent, then
    the move (a crash then leaves the bytes in place without a record)."""
    from stores import intents

    intents.begin("commit", store.row, staging=staged, store_path=store_path)
    as_owner(staged, owner)
    return store.move_into_place(staged, store_path)


def dead_process():
    proc = subprocess.Popen(["true"])
    proc.wait()
    return "%s:%d" % (socket.gethostname(), proc.pid)


def test_a_prestaged_file_taken_by_a_process_that_died_is_put_back_at_start(app, web,
                                                                            store_dir):
    import librarian

    folder = prestage(store_dir, "pre", {"a.flag": b"aaa", "b.flag": b"bbb"})
    store = ctx().open_store(models.Store.get())
    dead = take_as(store, "pre", "a.flag", dead_process())
    live = take_as(store, "pre", "b.flag", models.this_process())
    assert sorted(os.listdir(folder)) == []
    # A process starting now settles what the dead one left, and only that:
    # the live one may be registering its file this very moment.
    librarian.startup(app)
    assert snapshot(folder) == {"a.flag": (b"aaa", snapshot(folder)["a.flag"][1])}
    assert not os.path.exists(os.path.dirname(dead))
    with open(live, "rb") as f:
        assert f.read() == b"bbb"
    assert [i.kind for i in models.StoreIntent.select()] == ["take"]


def test_a_crash_between_the_move_and_the_commit_of_a_prestaged_file_puts_it_back(
        app, web, store_dir):
    import librarian

    folder = prestage(store_dir, "pre", {"a.flag": b"aaa", "b.flag": b"bbb"})
    store = ctx().open_store(models.Store.get())
    # Killed after the move into place, before the commit:
    dead = dead_process()
    commit_as(store, take_as(store, "pre", "a.flag", dead), "2458043/a.flag", dead)
    # ... and after the move's link was made, before its unlink:
    staged = take_as(store, "pre", "b.flag", dead)
    commit_as(store, staged, "2458043/b.flag", dead)
    os.link(os.path.join(store_dir, "2458043", "b.flag"), staged)
    librarian.startup(app)
    assert {n: v[0] for n, v in snapshot(folder).items()} == {"a.flag": b"aaa", "b.flag": b"bbb"}
    assert os.listdir(os.path.join(store_dir, "2458043")) == []
    assert models.StoreIntent.select().count() == 0


def test_a_live_process_keeps_what_it_took_while_another_starts(app, web, store_dir):
    import librarian

    prestage(store_dir, "pre", {"a.flag": b"aaa"})
    store = ctx().open_store(models.Store.get())
    final = commit_as(store, take_as(store, "pre", "a.flag", models.this_process()),
                      "2458043/a.flag", models.this_process())
    librarian.startup(app)  # a second server or worker: its owner is alive (this process)
    with open(final, "rb") as f:
        assert f.read() == b"aaa"
    # A process that reused the pid is not the owner.
    pid_reused = models.this_process().rsplit(":", 1)[0] + ":1"
    assert models.process_is_gone(pid_reused) and not models.process_is_gone(
        models.this_process()) and not models.process_is_gone("another-host:1:1")


def test_a_taken_file_that_cannot_go_back_is_kept_never_deleted(app, web, store_dir, caplog):
    import librarian

    folder = prestage(store_dir, "pre", {"a.flag": b"the only full copy"})
    store = ctx().open_store(models.Store.get())
    staged = take_as(store, "pre", "a.flag", dead_process())
    with open(os.path.join(folder, "a.flag"), "wb") as f:
        f.write(b"partial re-copy")  # the operator, seeing the file gone
    librarian.startup(app)
    assert "cannot be put back" in caplog.text
    with open(staged, "rb") as f:
        assert f.read() == b"the only full copy"
    librarian.startup(app)  # and again: still kept, and the server starts
    assert os.path.exists(staged)
    # The folder itself gone: kept as well.
    shutil.rmtree(folder)
    librarian.startup(app)
    assert os.path.exists(staged)


def test_markers_the_server_did_not_write_are_never_acted_on(app, web, store_dir):
    import librarian

    folder = prestage(store_dir, "incoming", {"operator.dat": b"precious"})
    staging = os.path.join(store_dir, api(web, "initiate_upload", upload_size=1)["staging_dir"])
    with open(os.path.join(staging, ".librarian-destination"), "w") as f:
        f.write("incoming/operator.dat")  # a client's forgery, unsigned
    other = os.path.join(store_dir, api(web, "initiate_upload", upload_size=1)["staging_dir"])
    with open(os.path.join(other, ".librarian-destination"), "wb") as f:
        f.write(b"\xff\xfe not UTF-8")
    librarian.startup(app)  # starts, and
    assert snapshot(folder)["operator.dat"][0] == b"precious"


def test_known_staging_subdirs_must_be_folders_inside_the_store(web, store_dir, tmp_path):
    os.makedirs(os.path.join(store_dir, "ok"))
    (tmp_path / "outside").mkdir()
    os.symlink(str(tmp_path / "outside"), os.path.join(store_dir, "link"))
    with open(os.path.join(store_dir, "plain"), "wb") as f:
        f.write(b"x")
    cases = {"../../escape": "may not contain '..'", "/abs/path": "not absolute",
             "": "must name a folder", ".staging/x": "server's own staging area",
             "missing/dir": "does not exist", "plain": "is not a folder",
             "link": "not a folder of store 'main'"}
    for subdir, message in cases.items():
        reply = api(web, "initiate_upload", status=400, upload_size=1,
                    known_staging_store="main", known_staging_subdir=subdir)
        assert message in reply["message"], (subdir, reply["message"])
    assert api(web, "initiate_upload", upload_size=1, known_staging_store="main",
               known_staging_subdir="ok/")["staging_dir"] == "ok/"
    # A registered directory is not a staging folder.
    tree = os.path.join(store_dir, "reg.uv")
    os.makedirs(os.path.join(tree, "sub"))
    from librarian_client import path_md5
    size, md5 = path_md5(tree)
    api(web, "register_instances", store_name="main", null_obsid=True,
        file_info={tree: {"size": size, "md5": md5}})
    reply = api(web, "initiate_upload", status=409, upload_size=1, known_staging_store="main",
                known_staging_subdir="reg.uv/sub")
    assert "inside the registered file reg.uv" in reply["message"]


def test_a_known_folder_must_be_named_in_initiate_upload_first(web, store_dir):
    prestage(store_dir, "pre", {"a.flag": b"a"})
    msg = api(web, "complete_upload", status=400, store_name="main", staging_dir="pre",
              dest_store_path="a.flag", meta_mode="infer", null_obsid=True)["message"]
    assert "named in initiate_upload first" in msg


def test_initiate_upload_names_the_free_bytes_and_a_relative_staging_folder(web, store_dir):
    reply = api(web, "initiate_upload", upload_size=10)
    free = shutil.disk_usage(store_dir).free
    assert isinstance(reply["available"], int) and not isinstance(reply["available"], bool)
    assert abs(reply["available"] - free) < 64 << 20
    assert not reply["staging_dir"].startswith("/")
    assert os.path.isdir(os.path.join(reply["path_prefix"], reply["staging_dir"]))


def test_search_aliases_of_the_original_work_in_searches_and_standing_orders(
        web, app, store_dir):
    app.config["librarian.settings"].connections["penn"] = {
        "url": "http://127.0.0.1:9/", "authenticator": "x"}
    api(web, "initiate_upload", upload_size=1, auth="writer", files={
        n: {"name": n, "type": "flag", "create_time": 1500000000, "obsid": None, "size": 1,
            "md5": "0" * 32} for n in ("zen.a.flag", "zen.b.flag", "other.flag")})
    names = lambda search: [r["name"] for r in api(  # noqa: E731
        web, "search", search=search, output_format="file-listing-json")["results"]]
    assert names('{"name-like": "zen.%"}') == ["zen.a.flag", "zen.b.flag"]
    assert names('{"source-is": "writer", "name-like": "%.a.%"}') == ["zen.a.flag"]
    assert names('{"source-is": "admin"}') == []
    api(web, "create_standing_order", name="zen-to-penn", search='{"name-like": "zen.%"}',
        conn_name="penn")
    orders = api(web, "list_standing_orders")["standing_orders"]
    assert orders[0]["search"] == '{"name-like": "zen.%"}'


def session_record(sid, start):
    return {str(sid): {"id": sid, "start_time_jd": start, "stop_time_jd": start + 0.1}}


def obs_record(obsid, start, session_id=None):
    rec = {"obsid": obsid, "start_time_jd": start, "stop_time_jd": start + 0.01,
           "start_lst_hr": 1.5}
    if session_id is not None:
        rec["session_id"] = session_id
    return {str(obsid): rec}


def test_a_resent_observation_gets_the_session_assigned_at_the_source(web):
    api(web, "initiate_upload", upload_size=1, observations=obs_record(1192201262, 2458043.1))
    assert models.Observation.get_by_id(1192201262).session_id is None
    api(web, "initiate_upload", upload_size=1, sessions=session_record(1192201262, 2458043.1),
        observations=obs_record(1192201262, 2458043.1, session_id=1192201262))
    assert models.Observation.get_by_id(1192201262).session_id == 1192201262
    # Sent again: a no-op. Another session for it: refused, nothing changed.
    api(web, "initiate_upload", upload_size=1,
        observations=obs_record(1192201262, 2458043.1, session_id=1192201262))
    reply = api(web, "initiate_upload", status=409, upload_size=1,
                sessions=session_record(1192201000, 2458043.0),
                observations=obs_record(1192201262, 2458043.1, session_id=1192201000))
    assert "belongs to session 1192201262 here, not 1192201000" in reply["message"]
    assert models.Observation.get_by_id(1192201262).session_id == 1192201262
    assert models.ObservingSession.get_or_none(models.ObservingSession.id == 1192201000) is None


def test_a_zero_length_file_arrives_by_the_two_step_protocol(web, store_dir):
    reply = api(web, "initiate_upload", upload_size=0)
    open(os.path.join(store_dir, reply["staging_dir"], "done.flag"), "wb").close()
    out = api(web, "complete_upload", store_name="main", staging_dir=reply["staging_dir"],
              dest_store_path="flags/done.flag", meta_mode="infer", null_obsid=True)
    assert (out["size"], out["md5"]) == (0, "d41d8cd98f00b204e9800998ecf8427e")


def test_a_put_without_any_body_is_refused(server, store_dir):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(("PUT /api/upload/nobody.dat?null_obsid=true HTTP/1.1\r\nHost: x\r\n"
                   "Authorization: %s\r\nConnection: close\r\n\r\n"
                   % bearer()["Authorization"]).encode())
        reply = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 400") and b"no request body" in reply


def test_a_directory_the_reader_cannot_read_has_no_obsid_with_null_obsid(web, tmp_path):
    tree = tmp_path / "cal.uv"
    tree.mkdir()
    (tree / "visdata").write_bytes(b"not miriad")
    (tree / "header").write_bytes(b"\0garbage")
    from librarian_client import path_md5
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(tree), "cal.uv")
    headers = dict(bearer(), **{"X-Librarian-Directory": "tar"})
    msg = web.put("/api/upload/cal.uv", buf.getvalue(), headers=headers, status=400).json
    assert "cannot read MIRIAD header" in msg["message"] and "null_obsid" in msg["message"]
    reply = web.put("/api/upload/cal.uv?null_obsid=true", buf.getvalue(), headers=headers,
                    status=201).json
    assert reply["obsid"] is None and reply["md5"] == path_md5(str(tree))[1] \
        == shell_md5(str(tree))


def test_completing_a_known_file_elsewhere_adds_an_instance_as_the_original_did(web, store_dir):
    web.put("/api/upload/first/dup.flag?null_obsid=true", b"same", headers=bearer(),
            status=201, content_type="application/octet-stream")
    folder = prestage(store_dir, "pre", {"dup.flag": b"same"})
    ingest_prestaged(web, "pre", "dup.flag", dest="second/dup.flag", null_obsid=True)
    places = sorted(i.store_path for i in models.FileInstance.select())
    assert places == ["first/dup.flag", "second/dup.flag"]
    assert os.listdir(folder) == []
    # The very same instance again: nothing to do, and the bytes go back.
    prestage(store_dir, "pre", {"dup.flag": b"same"})
    reply = ingest_prestaged(web, "pre", "dup.flag", dest="second/dup.flag", null_obsid=True)
    assert reply["already_present"] is True
    assert models.FileInstance.select().count() == 2 and os.listdir(folder) == ["dup.flag"]


def test_an_empty_query_deletes_nothing_and_says_how_to_mean_everything(web, store_dir,
                                                                       monkeypatch):
    monkeypatch.setitem(ctx().settings.librarian, "deletion_min_other_copies", 0)  # sole copy
    web.put("/api/upload/gone.flag?null_obsid=true&deletion_policy=allowed", b"g",
            headers=bearer(), status=201, content_type="application/octet-stream")
    for query in ("{}", " { } # nothing\n"):
        msg = api(web, "delete_file_instances_matching_query", status=400,
                  query=query)["message"]
        assert '{"always-true": []}' in msg
    assert models.FileInstance.select().count() == 1
    reply = api(web, "delete_file_instances_matching_query", query='{"always-true": []}')
    assert reply["stats"] == {"gone.flag": {"n_deleted": 1, "n_kept": 0, "n_error": 0}}


def test_reversed_range_bounds_are_swapped_as_the_original_did(web):
    api(web, "initiate_upload", upload_size=1, files={"r.flag": {
        "name": "r.flag", "type": "flag", "create_time": 1500000000, "obsid": None,
        "size": 20, "md5": "0" * 32}})
    for search in ('{"size-in-range": [30, 10]}', '{"size-in-range": [10, 30]}'):
        assert [r["name"] for r in api(web, "search", search=search,
                                       output_format="file-listing-json")["results"]] == ["r.flag"]


# ---------------------------------------------------------------------------
# What an adversarial pass found
# ---------------------------------------------------------------------------

def test_a_registered_file_is_never_taken_out_of_its_place(web, store_dir):
    web.put("/api/upload/raw/big.dat?null_obsid=true", b"registered", headers=bearer(),
            status=201, content_type="application/octet-stream")
    api(web, "initiate_upload", upload_size=1, known_staging_store="main",
        known_staging_subdir="raw")
    msg = api(web, "complete_upload", status=409, store_name="main", staging_dir="raw",
              dest_store_path="elsewhere/big.dat", meta_mode="infer", null_obsid=True,
              staging_was_known=True)["message"]
    assert "registered file raw/big.dat" in msg
    with open(os.path.join(store_dir, "raw", "big.dat"), "rb") as f:
        assert f.read() == b"registered"


def test_a_folder_registered_after_initiate_is_not_taken_from(web, store_dir):
    from librarian_client import path_md5

    tree = prestage(store_dir, "obs/set.uv", {"visdata": b"v" * 100, "header": b"h"})
    api(web, "initiate_upload", upload_size=1, known_staging_store="main",
        known_staging_subdir="obs/set.uv")
    size, md5 = path_md5(tree)
    api(web, "register_instances", store_name="main", null_obsid=True,
        file_info={tree: {"size": size, "md5": md5}})
    msg = api(web, "complete_upload", status=409, store_name="main", staging_dir="obs/set.uv",
              dest_store_path="other/visdata", meta_mode="infer", null_obsid=True,
              staging_was_known=True)["message"]
    assert "inside the registered file obs/set.uv" in msg
    assert path_md5(tree) == (size, md5)


def test_a_failed_registration_gives_the_operator_back_their_modes(app, web, store_dir,
                                                                   monkeypatch):
    import ingest

    tree = prestage(store_dir, "pre/d.flags", {"a": b"a", "b": b"b"})
    os.chmod(os.path.join(tree, "a"), 0o664)
    os.chmod(tree, 0o775)

    def fail_after_the_move(*args, **kwargs):
        kwargs["move"]()
        raise models.LibrarianError(500, "database went away")

    monkeypatch.setattr(ingest, "_register", fail_after_the_move)
    api(web, "initiate_upload", upload_size=1, known_staging_store="main",
        known_staging_subdir="pre")
    api(web, "complete_upload", status=500, store_name="main", staging_dir="pre",
        dest_store_path="d.flags", meta_mode="infer", null_obsid=True, staging_was_known=True)
    assert os.stat(tree).st_mode & 0o777 == 0o775
    assert os.stat(os.path.join(tree, "a")).st_mode & 0o777 == 0o664
    assert not os.path.exists(os.path.join(store_dir, "d.flags"))


def test_a_session_is_attached_only_to_observations_inside_it(web):
    api(web, "initiate_upload", upload_size=1, observations=obs_record(1225829886, 2458432.35))
    reply = api(web, "initiate_upload", status=409, upload_size=1,
                sessions=session_record(1000000000, 2400001.0),
                observations=obs_record(1225829886, 2458432.35, session_id=1000000000))
    assert "outside session 1000000000" in reply["message"]
    assert models.Observation.get_by_id(1225829886).session_id is None
