"""Callers with few or no rights: what each level may not do, bounded
error echo, credentials, Range, login CSRF, search limits and the header
reader's limits; on SQLite and PostgreSQL."""

import base64
import hashlib
import io
import json
import os
import tarfile
import threading

import h5py
import numpy as np
import pytest

import models
import search
import uvmeta
from conftest import AUTH, api, bearer, ctx


def test_record_sets_need_read_write(web):
    """A read-append caller cannot reserve a name with a bogus record."""
    record = {"zen.1.txt": {"name": "zen.1.txt", "type": "txt", "create_time": 1500000000,
                            "obsid": None, "size": 3, "md5": "0" * 32, "source": "x"}}
    reply = api(web, "initiate_upload", auth="appender", status=403, upload_size=3,
                files=record)
    assert "read-write" in reply["message"]
    assert models.File.select().count() == 0
    assert api(web, "initiate_upload", auth="writer", upload_size=3, files=record)["success"]
    assert models.File.get_by_id("zen.1.txt").md5 == "0" * 32
    # records_only (a copy's records) leaves no staging folder behind
    assert models.StagingDir.select().count() == 1
    api(web, "initiate_upload", auth="writer", upload_size=3, records_only=True, files={})
    assert models.StagingDir.select().count() == 1


def test_a_removed_sources_issued_folder_is_not_a_later_namesakes(web, config_path, store_dir,
                                                                  capsys):
    import librarian
    from conftest import add_user

    first = add_user(config_path, "bob", capsys)
    info = api(web, "initiate_upload", auth=first, upload_size=3)
    with open(os.path.join(store_dir, info["staging_dir"], "zen.old.txt"), "wb") as f:
        f.write(b"abc")
    assert librarian.main(["remove-user", "bob", "--config", config_path]) == 0
    second = add_user(config_path, "bob", capsys)
    reply = api(web, "complete_upload", auth=second, status=403, store_name="main",
                staging_dir=info["staging_dir"], dest_store_path="zen.old.txt",
                meta_mode="infer", null_obsid=True)
    assert "issued to another source" in reply["message"]
    assert models.File.select().count() == 0


def test_server_event_types_cannot_be_forged(web):
    web.put("/api/upload/zen.2.txt?null_obsid=true", b"abc", headers=bearer("appender"),
            status=201)
    for forged in ("standing_order_succeeded:offsite", "create_instance", "copy_finished"):
        reply = api(web, "create_file_event", auth="appender", status=403,
                    file_name="zen.2.txt", type=forged, payload={})
        assert "written by the server" in reply["message"]
    api(web, "create_file_event", auth="appender", file_name="zen.2.txt", type="pipeline_done",
        payload={"ok": 1})
    types = [e.type for e in models.FileEvent.select().where(models.FileEvent.file == "zen.2.txt")]
    assert types == ["create_instance", "pipeline_done"]


def test_an_issued_staging_folder_is_completed_only_by_its_source(web, store_dir):
    info = api(web, "initiate_upload", auth="appender", upload_size=3)
    folder = os.path.join(store_dir, info["staging_dir"])
    with open(os.path.join(folder, "zen.3.txt"), "wb") as f:
        f.write(b"abc")
    args = dict(store_name="main", staging_dir=info["staging_dir"], dest_store_path="zen.3.txt",
                meta_mode="infer", null_obsid=True)
    reply = api(web, "complete_upload", auth="writer", status=403, **args)
    assert "another source" in reply["message"]
    assert models.File.select().count() == 0
    api(web, "complete_upload", auth="appender", **args)
    assert models.File.get_by_id("zen.3.txt").source == "appender"


def test_authenticators_that_are_not_text_get_400_and_wrong_ones_401(web):
    resp = web.post("/api/ping", {"request": json.dumps({"authenticator": "\ud800"})},
                    status=400)
    assert "not valid text" in resp.json["message"]
    # the original protocol keeps its 400 for a wrong authenticator...
    assert api(web, "ping", auth="wrong", status=400)["message"] == "unknown authenticator"
    # ...our additions answer 401 with a challenge
    resp = web.get("/api/download/nothing", headers=bearer("wrong"), status=401)
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    web.put("/api/upload/x.txt", b"x", status=401)
    resp = web.post("/api/ping", "{}", headers=dict(bearer("wrong"),
                                                     **{"Content-Type": "application/json"}),
                    status=401)
    assert resp.headers["WWW-Authenticate"]
    # the scheme's name is case-insensitive (RFC 9110 11.1)
    web.post("/api/ping", "{}", headers={"Authorization": "bEARER " + AUTH["admin"],
                                         "Content-Type": "application/json"}, status=200)
    # a JSON body that is not UTF-8 is refused, never read with replacement characters
    resp = web.post("/api/create_file_event", b'{"type": "q\xff"}', status=400,
                    headers=dict(bearer(), **{"Content-Type": "application/json"}))
    assert "not UTF-8" in resp.json["message"]


def test_errors_quote_only_a_prefix_of_bad_input(web):
    name = "x/" * 300_000
    reply = web.get("/api/download/" + "y" * 500_000, headers=bearer(), status=400).json
    assert len(reply["message"]) < 1000
    reply = api(web, "locate_file_instance", status=400, file_name=name)
    assert len(reply["message"]) < 1000


@pytest.fixture
def flat_file(web):
    data = bytes(range(256)) * 40
    web.put("/api/upload/zen.4.dat?null_obsid=true", data, headers=bearer(), status=201)
    return data


def test_range_follows_rfc_9110(web, flat_file):
    url = "/api/download/zen.4.dat"
    resp = web.get(url, headers=dict(bearer(), Range="bytes=10-19"), status=206)
    assert resp.body == flat_file[10:20] and resp.headers["Content-Range"] == "bytes 10-19/10240"
    # an unknown unit is ignored: the whole body
    assert web.get(url, headers=dict(bearer(), Range="items=0-5"), status=200).body == flat_file
    # several ranges: the whole body, never only the first range
    assert web.get(url, headers=dict(bearer(), Range="bytes=0-1,5-6"),
                   status=200).body == flat_file
    resp = web.get(url, headers=dict(bearer(), Range="bytes=20000-"), status=416)
    assert resp.headers["Content-Range"] == "bytes */10240"
    assert web.get(url, headers=dict(bearer(), Range="bytes=-5"), status=206).body == \
        flat_file[-5:]
    # malformed numbers are no range at all (Python's int() would take them)
    for spec in ("bytes=+5-10", "bytes=1_0-20", "bytes= 5 - 9", "bytes=-"):
        assert web.get(url, headers=dict(bearer(), Range=spec), status=200).body == flat_file
    # If-Range: the range only while the validator (the MD5 as ETag) matches
    etag = web.head(url, headers=bearer()).headers["ETag"]
    assert etag == '"%s"' % hashlib.md5(flat_file).hexdigest()
    assert web.get(url, headers=dict(bearer(), Range="bytes=0-1", **{"If-Range": etag}),
                   status=206).body == flat_file[:2]
    assert web.get(url, headers=dict(bearer(), Range="bytes=0-1", **{"If-Range": '"other"'}),
                   status=200).body == flat_file


def test_concurrent_session_assignments_do_not_conflict(web):
    """Many callers assigning at once: one makes each session, none gets a
    false 409."""
    for i in range(6):
        models.Observation.create(obsid=1000 + i, start_time_jd=2459000.1 + i * 0.001,
                                  stop_time_jd=2459000.1 + i * 0.001 + 0.0009,
                                  start_lst_hr=1.0)
    models.db.close()
    statuses = []

    def assign():
        import webtest
        from conftest import ctx as _ctx  # noqa: F401
        resp = webtest.TestApp(web.app).post(
            "/api/assign_observing_sessions",
            {"request": json.dumps({"authenticator": AUTH["appender"]})}, expect_errors=True)
        statuses.append(resp.status_int)
        models.db.close()

    threads = [threading.Thread(target=assign) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 6
    assert models.ObservingSession.select().count() == 1


def test_a_search_over_its_time_limit_is_stopped_with_a_clear_error(web):
    with models.write_transaction():
        models.File.insert_many(
            [{"name": "f%05d.txt" % i, "type": "txt", "create_time": models.utcnow(),
              "size": 1, "md5": "0" * 32, "source": "x"} for i in range(3000)]).execute()
    ors = '{"or": {%s}}' % ", ".join('"name-matches": "%%%d%%%d%%%d%%"' % (i, i + 1, i + 2)
                                     for i in range(300))
    with pytest.raises(models.LibrarianError) as e:
        with search.limited("someone", 0.001, 4):
            list(search.file_query(ors))
    assert e.value.status == 503 and "search_timeout_seconds" in e.value.message
    every_row = ors[:-2] + ', "name-matches": "f%"}}'  # a first row soon, the rest slowly
    with pytest.raises(models.LibrarianError) as e:  # rows fetched by the driver itself
        with search.limited("someone", 0.001, 4):
            models.raw_rows(search.file_query(every_row))
    assert e.value.status == 503 and "search_timeout_seconds" in e.value.message
    # the connection is usable afterwards, and a quick search passes
    with search.limited("someone", 30, 4):
        assert len(list(search.file_query('{"name-matches": "f0000%"}'))) == 10


def test_a_caller_runs_at_most_its_share_of_searches_at_once():
    with search.limited("greedy", 30, 2), search.limited("greedy", 30, 2):
        with pytest.raises(models.LibrarianError) as e:
            with search.limited("greedy", 30, 2):
                pass
        assert e.value.status == 429 and "searches_per_caller" in e.value.message
        with search.limited("other", 30, 2):  # others are not held up
            pass
    with search.limited("greedy", 30, 2):
        pass


def test_an_allocation_bomb_header_is_refused_and_the_reader_recovers(app, tmp_path):
    """A tiny UVH5 file whose header declares a gigantic array: the reader
    runs out of its address space, the file is refused as unreadable, and
    the next read works."""
    bomb = tmp_path / "zen.bomb.uvh5"
    with h5py.File(bomb, "w") as f:
        header = f.create_group("Header")
        header["Ntimes"] = np.int64(1)
        header["Nblts"] = np.int64(1)
        header.create_dataset("time_array", shape=(1 << 28,), dtype="f8", chunks=(1 << 20,),
                              compression="gzip")  # 2 GiB when read
        header["lst_array"] = np.zeros(1)
        header["obsid"] = np.int64(1)
    assert os.path.getsize(bomb) < 100_000
    old = dict(uvmeta.LIMITS)
    uvmeta.shutdown()
    uvmeta.set_limits(1 << 30, 20.0)
    try:
        with pytest.raises(uvmeta.MetadataError) as e:
            uvmeta.read_observation(str(bomb))
        assert "more than the 1024 MiB a header read may use" in str(e.value)
    finally:
        uvmeta.shutdown()
        uvmeta.set_limits(old["memory_bytes"], old["seconds"])
    from conftest import UVH5
    if os.path.exists(UVH5):
        assert uvmeta.read_observation(UVH5)["obsid"] > 0
    assert ctx() is not None


@pytest.mark.parametrize("how", ["external storage", "external link", "virtual dataset"])
def test_a_header_never_reads_another_file_of_the_host(tmp_path, how):
    """HDF5 can keep a dataset's values in another file: a header read that
    followed it would tell the caller that file's bytes in its refusal."""
    secret = tmp_path / "secret.ini"
    secret.write_bytes(np.array([2458432.5], dtype="<f8").tobytes())  # a plausible JD
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f.create_group("Header")["time_array"] = np.array([2458432.5])
    path = tmp_path / "zen.sneaky.uvh5"
    with h5py.File(path, "w") as f:
        header = f.create_group("Header")
        if how == "external storage":
            header.create_dataset("time_array", shape=(1,), dtype="<f8",
                                  external=[(str(secret), 0, 8)])
        elif how == "external link":
            header["time_array"] = h5py.ExternalLink(str(other), "/Header/time_array")
        else:
            layout = h5py.VirtualLayout(shape=(1,), dtype="f8")
            layout[:] = h5py.VirtualSource(str(other), "Header/time_array", shape=(1,))
            header.create_virtual_dataset("time_array", layout)
    with pytest.raises(uvmeta.MetadataError) as e:
        uvmeta.read_observation(str(path))
    assert "Header/time_array" in str(e.value) and "2458432" not in str(e.value)


def test_a_reader_left_holding_memory_is_replaced(monkeypatch):
    from conftest import UVH5, need_data

    need_data()
    assert uvmeta.read_observation(UVH5)["obsid"] > 0
    pool = uvmeta._pool
    monkeypatch.setattr(uvmeta, "KEEP_RSS_BYTES", 1 << 20)  # every reader holds more
    assert uvmeta.read_observation(UVH5)["obsid"] > 0
    assert uvmeta._pool is None and pool is not None  # the next read starts a fresh one


def tar_bytes(build, mode="w"):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        build(tar)
    return buf.getvalue()


def test_compressed_tars_and_huge_tar_headers_are_refused(web, store_dir):
    def one_file(tar, name="zen.t/f"):
        info = tarfile.TarInfo(name)
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))

    headers = dict(bearer(), **{"X-Librarian-Directory": "tar"})
    bomb = tar_bytes(one_file, "w:bz2")  # a few bytes could unpack to gigabytes
    reply = web.put("/api/upload/zen.t?null_obsid=true", bomb, headers=headers, status=400).json
    assert "not a valid tar" in reply["message"]
    huge = tar_bytes(lambda tar: one_file(tar, "zen.t/" + "n" * 300_000))  # a pax header
    reply = web.put("/api/upload/zen.t?null_obsid=true", huge, headers=headers, status=400).json
    assert "at most 65536 allowed" in reply["message"] and len(reply["message"]) < 700
    assert models.File.select().count() == 0


def test_headers_that_are_not_text_or_numbers_are_refused(web):
    resp = web.get("/api/ping", headers={"Authorization": "Bearer \xff"}, status=400)
    assert "not valid UTF-8" in resp.json["message"]
    arabic_three = "\u0663".encode().decode("latin-1")  # valid UTF-8, but not an ASCII digit
    headers = dict(bearer(), **{"Tus-Resumable": "1.0.0", "Upload-Length": arabic_three,
                                "Upload-Metadata": "dest eA=="})
    assert "whole number" in web.post("/api/uploads", headers=headers, status=400).json["message"]


def test_look_alike_server_events_and_infinite_numbers_are_refused(web):
    web.put("/api/upload/zen.5.txt?null_obsid=true", b"abc", headers=bearer(), status=201)
    for forged in ("create_instance ", "Create_Instance", "create_\u200binstance",
                   "STANDING_ORDER_SUCCEEDED:x"):
        api(web, "create_file_event", status=403, file_name="zen.5.txt", type=forged, payload={})
    resp = web.post("/api/create_file_event", json.dumps(
        {"authenticator": AUTH["admin"], "file_name": "zen.5.txt", "type": "q"})[:-1]
        + ', "payload": {"x": 1e999}}', headers={"Content-Type": "application/json"},
        status=400)
    assert "cannot hold" in resp.json["message"]


def test_destinations_are_checked_before_any_byte_is_sent(web, store_dir):
    web.put("/api/upload/a/zen.6.dat?null_obsid=true", b"abc", headers=bearer(), status=201)
    tus = dict(bearer(), **{"Tus-Resumable": "1.0.0", "Upload-Length": "3"})

    def create(dest, status):
        meta = "dest " + base64.b64encode(dest.encode()).decode()
        return web.post("/api/uploads", headers=dict(tus, **{"Upload-Metadata": meta}),
                        status=status).json

    assert "inside" in create("a/zen.6.dat/inner.dat", 409)["message"]
    assert "control characters" in create("x\n\x1b[31m/zen.7.dat", 400)["message"]
    assert "at most 1024" in create("b/" * 600 + "zen.8.dat", 400)["message"]
    assert models.Upload.select().count() == 0


def test_range_units_are_case_insensitive_and_the_log_is_one_line(web, flat_file, caplog):
    resp = web.get("/api/download/zen.4.dat", headers=dict(bearer(), Range="Bytes=0-1"),
                   status=206)
    assert resp.body == flat_file[:2]
    import logging
    with caplog.at_level(logging.INFO, logger="librarian"):
        web.get("/api/nothing%0A2026-01-01T00:00:00Z%20ERROR%20forged", status=404)
    lines = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert lines and all("\n" not in line for line in lines)


def test_a_read_stopped_for_its_limits_costs_no_other_caller_their_read(app):
    """Two reads at once: one over the time limit is stopped (with the
    reader process), the other is read again in a fresh reader."""
    from conftest import UVH5, need_data
    need_data()
    import time
    old = dict(uvmeta.LIMITS)
    uvmeta.shutdown()
    uvmeta.set_limits(old["memory_bytes"], 2.0)
    results = {}

    def slow():
        try:
            uvmeta.run_reader("slow", time.sleep, 30)
        except uvmeta.MetadataError as e:
            results["slow"] = str(e)

    def good():  # a read of 1.5 s, still running when the slow one is stopped at 2 s
        time.sleep(1.0)
        try:
            results["good"] = uvmeta.run_reader("good", time.sleep, 1.5) is None
        except uvmeta.MetadataError as e:
            results["good"] = str(e)

    try:
        threads = [threading.Thread(target=slow), threading.Thread(target=good)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        uvmeta.shutdown()
        uvmeta.set_limits(old["memory_bytes"], old["seconds"])
    assert "longer than the 2 s allowed" in results["slow"]
    assert results["good"] is True
    assert uvmeta.read_observation(UVH5)["obsid"] > 0
