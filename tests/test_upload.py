"""Streamed upload and download (API.md section 2) through the WSGI app, on
SQLite and PostgreSQL, with the real sample data sets."""

import hashlib
import io
import os
import shutil
import subprocess
import tarfile

import pytest
import webtest

import models
from conftest import MIRIAD, UVH5, bearer, need_data, store_contents
from reference import miriad_reference, shell_md5, shell_size, uvh5_reference


def tar_of(path, arcname):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(path, arcname=arcname)
    return buf.getvalue()


def put(web, store_path, body, status=201, who="admin", headers=None, **query):
    url = "/api/upload/" + store_path
    if query:
        url += "?" + "&".join("%s=%s" % kv for kv in query.items())
    return web.put(url, body, headers=dict(bearer(who), **(headers or {})), status=status,
                   content_type="application/octet-stream")


def assert_nothing_registered(store_dir):
    assert models.File.select().count() == 0
    assert models.FileInstance.select().count() == 0
    files, staging = store_contents(store_dir)
    assert files == set() and staging == []


# ---------------------------------------------------------------------------
# The sample data sets
# ---------------------------------------------------------------------------

def test_uvh5_upload_registers_obsid_size_md5_and_observation(web, store_dir):
    need_data()
    with open(UVH5, "rb") as f:
        body = f.read()
    reply = put(web, "2458432/zen.2458432.34569.uvh5", body).json
    want = uvh5_reference(UVH5)
    assert reply == {"success": True, "name": "zen.2458432.34569.uvh5", "store_name": "main",
                     "store_path": "2458432/zen.2458432.34569.uvh5", "size": shell_size(UVH5),
                     "md5": shell_md5(UVH5), "obsid": want["obsid"], "already_present": False}
    obs = models.Observation.get_by_id(want["obsid"])
    assert obs.start_time_jd == pytest.approx(want["start_time_jd"], abs=1e-8)
    assert obs.stop_time_jd == pytest.approx(want["stop_time_jd"], abs=1e-8)
    assert obs.start_lst_hr == pytest.approx(want["start_lst_hr"], abs=1e-9)
    record = models.File.get_by_id("zen.2458432.34569.uvh5")
    assert (record.type, record.source, record.obsid) == ("uvh5", "admin", want["obsid"])
    placed = os.path.join(store_dir, "2458432", "zen.2458432.34569.uvh5")
    assert shell_md5(placed) == shell_md5(UVH5)
    assert os.stat(placed).st_mode & 0o222 == 0, "instances are made read-only"
    events = [(e.type, e.payload) for e in models.FileEvent.select()]
    assert events == [("create_instance", '{"parent_dirs": "2458432", "store_name": "main"}')]


def test_miriad_directory_upload_as_tar_uses_directory_checksum(web, store_dir):
    need_data()
    body = tar_of(MIRIAD, "zen.2458043.12552.xx.HH.uvA")
    reply = put(web, "zen.2458043.12552.xx.HH.uvA", body,
                headers={"X-Librarian-Directory": "tar"}).json
    want = miriad_reference(MIRIAD)
    assert reply["md5"] == shell_md5(MIRIAD)
    assert reply["size"] == shell_size(MIRIAD)
    assert reply["obsid"] == want["obsid"] == 1192201262
    obs = models.Observation.get_by_id(want["obsid"])
    assert obs.start_time_jd == pytest.approx(want["start_time_jd"], abs=1e-8)
    assert obs.stop_time_jd == pytest.approx(want["stop_time_jd"], abs=1e-8)
    assert obs.start_lst_hr == pytest.approx(want["start_lst_hr"], abs=1e-9)
    placed = os.path.join(store_dir, "zen.2458043.12552.xx.HH.uvA")
    assert shell_md5(placed) == shell_md5(MIRIAD)
    assert models.File.get_by_id("zen.2458043.12552.xx.HH.uvA").type == "uvA"


def test_directory_tar_of_contents_without_top_folder_is_accepted(web):
    need_data()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(os.listdir(MIRIAD)):
            tar.add(os.path.join(MIRIAD, name), arcname="./" + name)
    reply = put(web, "x/zen.2458043.12552.xx.HH.uvA", buf.getvalue(),
                headers={"X-Librarian-Directory": "tar"}).json
    assert reply["md5"] == shell_md5(MIRIAD)


def test_download_equals_upload_and_directory_tar_unpacks_to_same_checksum(web, tmp_path):
    need_data()
    with open(UVH5, "rb") as f:
        body = f.read()
    put(web, "zen.2458432.34569.uvh5", body)
    put(web, "a/b/zen.2458043.12552.xx.HH.uvA", tar_of(MIRIAD, "zen.2458043.12552.xx.HH.uvA"),
        headers={"X-Librarian-Directory": "tar"})

    resp = web.get("/api/download/zen.2458432.34569.uvh5", headers=bearer("reader"))
    assert resp.body == body
    assert resp.headers["Content-Length"] == str(len(body))
    assert resp.headers["X-Librarian-MD5"] == hashlib.md5(body).hexdigest()

    resp = web.get("/stream/zen.2458043.12552.xx.HH.uvA", headers=bearer("reader"))
    assert int(resp.headers["Content-Length"]) == len(resp.body)
    assert resp.headers["X-Librarian-MD5"] == shell_md5(MIRIAD)
    with tarfile.open(fileobj=io.BytesIO(resp.body)) as tar:
        assert {m.name.split("/")[0] for m in tar.getmembers()} == {"zen.2458043.12552.xx.HH.uvA"}
        tar.extractall(tmp_path, filter="data")
    assert shell_md5(str(tmp_path / "zen.2458043.12552.xx.HH.uvA")) == shell_md5(MIRIAD)
    # GNU tar agrees that the stream is well formed.
    listing = subprocess.run(["tar", "tf", "-"], input=resp.body, capture_output=True, check=True)
    assert b"zen.2458043.12552.xx.HH.uvA/visdata" in listing.stdout


def test_range_request_returns_the_asked_bytes(web):
    body = bytes(range(256)) * 40
    put(web, "ranged.dat", body, null_obsid="true")
    resp = web.get("/api/download/ranged.dat", headers=dict(bearer(), Range="bytes=1000-1099"),
                   status=206)
    assert resp.body == body[1000:1100]
    assert resp.headers["Content-Range"] == "bytes 1000-1099/%d" % len(body)


# ---------------------------------------------------------------------------
# Refusals that leave nothing behind
# ---------------------------------------------------------------------------

def test_wrong_md5_is_refused_and_leaves_nothing(web, store_dir):
    reply = put(web, "f.dat", b"some bytes", status=400, null_obsid="true",
                md5="0" * 32).json
    assert reply["success"] is False and "md5 mismatch" in reply["message"]
    assert_nothing_registered(store_dir)


def test_malformed_md5_is_refused(web, store_dir):
    reply = put(web, "f.dat", b"x", status=400, null_obsid="true", md5="xyz").json
    assert "32 hexadecimal" in reply["message"]
    assert_nothing_registered(store_dir)


def test_truncated_body_is_refused_and_leaves_nothing(web, store_dir):
    req = webtest.TestRequest.blank("/api/upload/t.dat?null_obsid=true", method="PUT",
                                    headers=bearer())
    req.environ["wsgi.input"] = io.BytesIO(b"only ten b")
    req.environ["CONTENT_LENGTH"] = "1000"
    resp = web.do_request(req, status=400)
    assert "ended 990 bytes before" in resp.json["message"]
    assert_nothing_registered(store_dir)


@pytest.mark.parametrize("path,why", [
    ("dir/", "names no file"),
    ("a/../b.dat", "'..'"),
    ("%2E%2E/b.dat", "'..'"),
    (".staging/x/b.dat", "staging area"),
    ("a%00b.dat", "NUL"),
    ("n" * 257, "257 bytes"),
    ("%C3%A9" * 129, "258 bytes"),
])
def test_bad_store_paths_are_refused_with_a_clear_message(web, store_dir, path, why):
    reply = put(web, path, b"abc", status=400, null_obsid="true").json
    assert why in reply["message"]
    assert_nothing_registered(store_dir)


def test_name_of_255_bytes_is_accepted_and_256_is_too_long_for_the_disk(web, store_dir):
    reply = put(web, "n" * 256, b"abc", status=400, null_obsid="true").json
    assert "too long for the store's file system" in reply["message"]
    assert_nothing_registered(store_dir)
    put(web, "n" * 255, b"abc", null_obsid="true")
    assert models.File.get().name == "n" * 255


def test_store_path_through_symlink_leaving_the_store_is_refused(web, store_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, os.path.join(store_dir, "escape"))
    reply = put(web, "escape/f.dat", b"abc", status=400, null_obsid="true").json
    assert "outside store" in reply["message"]
    assert os.listdir(outside) == []
    assert models.File.select().count() == 0


def test_a_zero_length_file_is_an_ordinary_file(web, store_dir):
    reply = put(web, "flags/empty.flag", b"", null_obsid="true").json
    assert (reply["size"], reply["md5"]) == (0, "d41d8cd98f00b204e9800998ecf8427e")
    assert os.path.getsize(os.path.join(store_dir, "flags", "empty.flag")) == 0
    assert web.get("/api/download/empty.flag", headers=bearer()).body == b""


def test_a_directory_with_zero_length_members_keeps_them(web, store_dir, tmp_path):
    tree = tmp_path / "d.flags"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "empty").write_bytes(b"")
    (tree / "data").write_bytes(b"x")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(tree), "d.flags")
    reply = put(web, "d.flags", buf.getvalue(), null_obsid="true",
                headers={"X-Librarian-Directory": "tar"}).json
    assert reply["md5"] == shell_md5(str(tree)) and reply["size"] == 1
    assert os.path.getsize(os.path.join(store_dir, "d.flags", "sub", "empty")) == 0


@pytest.mark.parametrize("member", ["../x", "/etc/passwd-copy", "symlink", "hardlink", "fifo"])
def test_unsafe_tar_members_are_refused_and_leave_nothing(web, store_dir, tmp_path, member):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        ok = tarfile.TarInfo("d.uv/fine")
        ok.size = 3
        tar.addfile(ok, io.BytesIO(b"abc"))
        bad = tarfile.TarInfo({"../x": "d.uv/../x", "/etc/passwd-copy": "/etc/passwd-copy"}
                              .get(member, "d.uv/" + member))
        if member == "symlink":
            bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif member == "hardlink":
            bad.type, bad.linkname = tarfile.LNKTYPE, "d.uv/fine"
        elif member == "fifo":
            bad.type = tarfile.FIFOTYPE
        else:
            bad.size = 1
        tar.addfile(bad, io.BytesIO(b"x") if bad.isfile() else None)
    reply = put(web, "d.uv", buf.getvalue(), status=400, null_obsid="true",
                headers={"X-Librarian-Directory": "tar"}).json
    assert "tar member" in reply["message"]
    assert not os.path.exists(tmp_path / "x")
    assert_nothing_registered(store_dir)


def test_garbage_declared_as_tar_is_refused(web, store_dir):
    reply = put(web, "d.uv", b"this is not a tar stream" * 100, status=400, null_obsid="true",
                headers={"X-Librarian-Directory": "tar"}).json
    assert "tar" in reply["message"]
    assert_nothing_registered(store_dir)


def test_file_without_obsid_needs_null_obsid(web, store_dir):
    reply = put(web, "notes.txt", b"hello", status=400).json
    assert "null_obsid" in reply["message"]
    assert_nothing_registered(store_dir)
    reply = put(web, "notes.txt", b"hello", null_obsid="true").json
    assert reply["obsid"] is None


def test_null_obsid_on_data_that_carry_one_is_refused(web, store_dir):
    need_data()
    with open(UVH5, "rb") as f:
        reply = put(web, "zen.2458432.34569.uvh5", f.read(), status=400, null_obsid="true").json
    assert "carry obsid 1225829886" in reply["message"]
    assert_nothing_registered(store_dir)


# ---------------------------------------------------------------------------
# Idempotence, conflicts, policies, levels
# ---------------------------------------------------------------------------

def test_same_bytes_again_is_a_no_op_and_other_bytes_are_a_conflict(web, store_dir):
    first = put(web, "a/same.dat", b"first bytes", null_obsid="true")
    again = put(web, "b/same.dat", b"first bytes", status=200, null_obsid="true")
    assert again.json["store_path"] == "a/same.dat"
    assert (first.json["already_present"], again.json["already_present"]) == (False, True)
    assert again.json["md5"] == first.json["md5"]
    reply = put(web, "a/same.dat", b"other bytes", status=409, null_obsid="true").json
    assert "different file" in reply["message"]
    # Without the flag the first upload needed: still the name's refusal, which
    # says what is wrong (not that the data carry no observation).
    reply = put(web, "a/same.dat", b"other bytes", status=409).json
    assert reply["message"] == ("a different file named 'same.dat' is already registered "
                                "(size 11, md5 %s)" % first.json["md5"])
    assert models.FileInstance.select().count() == 1
    files, staging = store_contents(store_dir)
    assert files == {"a/same.dat"} and staging == []


def test_deletion_policy_is_recorded_and_bad_policy_refused(web):
    put(web, "p.dat", b"abc", null_obsid="true", deletion_policy="allowed")
    assert models.FileInstance.get().deletion_policy == models.DELETION_ALLOWED
    reply = put(web, "q.dat", b"abc", status=400, null_obsid="true", deletion_policy="maybe").json
    assert "deletion_policy" in reply["message"]


def test_permissions_unchanged_mode_keeps_write_bits(app, web, store_dir):
    app.config["librarian.settings"].librarian["permissions_mode"] = "unchanged"
    put(web, "w.dat", b"abc", null_obsid="true")
    assert os.stat(os.path.join(store_dir, "w.dat")).st_mode & 0o200


def test_upload_needs_read_append_and_download_needs_an_authenticator(web, store_dir):
    reply = put(web, "r.dat", b"abc", status=403, who="reader", null_obsid="true").json
    assert "read-append" in reply["message"]
    reply = put(web, "r.dat", b"abc", status=401, who="not-a-secret", null_obsid="true").json
    assert reply["message"] == "unknown authenticator"
    assert_nothing_registered(store_dir)
    put(web, "r.dat", b"abc", who="appender", null_obsid="true")
    assert models.File.get().source == "appender"
    assert web.get("/api/download/r.dat", status=401).json["message"] == "no authenticator given"
    assert web.get("/api/download/missing.dat", headers=bearer("reader"),
                   status=400).json["message"] == "no file named 'missing.dat'"


def test_download_of_a_file_whose_bytes_vanished_says_so(web, store_dir):
    put(web, "gone.dat", b"abc", null_obsid="true")
    os.chmod(store_dir, 0o755)
    os.unlink(os.path.join(store_dir, "gone.dat"))
    reply = web.get("/api/download/gone.dat", headers=bearer(), status=400).json
    assert "no instance on an available store" in reply["message"]


def test_staging_leftovers_are_removed_at_start(app, store_dir):
    import librarian

    leftover = os.path.join(store_dir, ".staging", "deadbeef")
    os.makedirs(leftover)
    with open(os.path.join(leftover, "half.dat"), "wb") as f:
        f.write(b"half")
    librarian.startup(app)
    assert os.listdir(os.path.join(store_dir, ".staging")) == []
    shutil.rmtree(os.path.join(store_dir, ".staging"))
