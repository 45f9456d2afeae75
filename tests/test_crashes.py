"""Faults against real servers: a `librarian.py serve` killed (SIGKILL, at
a named step: `stores.intents.crash_point`) in the middle of each store
mutation, then started again; a second server started beside one that is
mid-upload. After each, the database and the disks must agree."""

import base64
import hashlib
import os
import time

import pytest
import requests

import librarian_client
import models
from conftest import AUTH, Server, bearer, store_contents, the_task
from librarian_client import path_md5


def agree(store_dir, store_name="main"):
    """Assert that every instance on the store at `store_dir` has its bytes
    at their place with their record's size and MD5, that nothing else is
    outside the staging area, and that no intent is left. Returns the
    registered store paths. Staging folders of issued folders and of
    resumable uploads in progress are allowed."""
    with models.db.connection_context():
        records = {(i.store_path): (i.file.size, i.file.md5) for i in models.FileInstance
                   .select().join(models.Store).where(models.Store.name == store_name)}
        assert models.StoreIntent.select().count() == 0
        issued = {os.path.basename(s.path) for s in models.StagingDir.select()}
        issued |= {os.path.basename(u.staging) for u in models.Upload.select()
                   if u.outcome is None}  # resumable uploads in progress hold theirs
    for store_path, (size, md5) in records.items():
        assert path_md5(os.path.join(store_dir, store_path)) == (size, md5), store_path
    found, staging = store_contents(store_dir)
    owned = {f for f in found if any(f == p or f.startswith(p + "/") for p in records)}
    assert found == owned, "bytes without a record: %s" % sorted(found - owned)[:5]
    assert set(staging) <= issued, "staging leftovers: %s" % staging
    return set(records)


def put(server, path, body, status=None, directory=False):
    headers = dict(bearer())
    if directory:
        headers["X-Librarian-Directory"] = "tar"
    return requests.put(server.url + "api/upload/" + path + "?null_obsid=true", data=body,
                        headers=headers, timeout=60)


def crashing(config_path, step):
    """A server that kills itself at `step`."""
    return Server(config_path, env={"LIBRARIAN_CRASH_AT": step}).start()


def died(server):
    server.proc.wait(120)  # (a loaded machine: the worker may take a while to get there)
    server.log.close()
    assert server.proc.returncode == -9


@pytest.fixture
def quiet(app):
    """The migrated database, closed here so that real servers use it."""
    models.db.close()
    return app


def policy_alone(config_path):
    """Deletions decided by the policy alone (the original's rule), so that
    a file's sole instance may go: these tests are about the mechanism."""
    with open(config_path, "a") as f:
        f.write("[librarian]\ndeletion_min_other_copies = 0\n")


def test_an_upload_killed_between_move_and_commit_leaves_nothing(quiet, config_path, store_dir):
    srv = crashing(config_path, "commit:moved")
    with pytest.raises(requests.ConnectionError):
        put(srv, "a/one.dat", b"one")
    died(srv)
    assert os.path.exists(os.path.join(store_dir, "a", "one.dat"))  # in place, no record
    srv = Server(config_path).start()  # start-up settles what the dead one left
    try:
        assert agree(store_dir) == set()
        assert put(srv, "a/one.dat", b"one").status_code == 201
        assert agree(store_dir) == {"a/one.dat"}
    finally:
        srv.stop()


def tus_upload(server, dest, length, **meta):
    """Create a resumable upload; returns (its URL, the headers of a chunk)."""
    tus = dict(bearer(), **{"Tus-Resumable": "1.0.0"})
    fields = dict(dest=dest, null_obsid="true", **meta)
    resp = requests.post(server.url + "api/uploads", headers=dict(tus, **{
        "Upload-Length": str(length), "Upload-Metadata": ",".join(
            "%s %s" % (k, base64.b64encode(v.encode()).decode()) for k, v in fields.items())}))
    assert resp.status_code == 201, resp.text
    return (server.url.rstrip("/") + resp.headers["Location"],
            dict(tus, **{"Content-Type": "application/offset+octet-stream"}))


def patch(url, headers, offset, data):
    return requests.patch(url, data=data, headers=dict(headers, **{"Upload-Offset": str(offset)}),
                          timeout=60)


def killed_at_the_last_chunk(config_path, step, dest, data, first, **meta):
    """A resumable upload of `data` to `dest` sent in two chunks (`first`
    bytes, then the rest) to a server that kills itself at `step` while
    taking the second; returns (the server started again, the upload's
    URL, its chunk headers)."""
    srv = crashing(config_path, step)
    url, headers = tus_upload(srv, dest, len(data), **meta)
    assert patch(url, headers, 0, data[:first]).status_code == 204
    with pytest.raises(requests.ConnectionError):
        patch(url, headers, first, data[first:])
    died(srv)
    return Server(config_path).start(), url, headers


@pytest.mark.parametrize("directory", [False, True])
def test_a_resumable_upload_killed_at_its_commit_finishes_when_sent_again(
        quiet, config_path, store_dir, tmp_path, directory):
    """kill -9 while the last chunk registers the file: after a restart the
    client's HEAD gives the offset before that chunk, and sending it again
    registers the file (the bytes a settle put back are the partial again)."""
    if directory:
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "f").write_bytes(os.urandom(300_000))
        data = b"".join(iter(lambda v=librarian_client.TarView(str(tmp_path / "d"), "d"):
                             v.read(1 << 16), b""))
        dest, meta = "t/d", {"directory": "tar"}
    else:
        data, dest, meta = os.urandom(300_000), "t/f.dat", {}
    srv, url, headers = killed_at_the_last_chunk(config_path, "commit:moved", dest, data,
                                                 100_000, **meta)
    try:
        assert agree(store_dir) == set()
        offset = int(requests.head(url, headers=headers).headers["Upload-Offset"])
        assert offset == 100_000
        assert patch(url, headers, offset, data[offset:]).status_code == 204
        outcome = requests.get(url, headers=bearer()).json()["outcome"]
        assert outcome["status"] == 201, outcome
        assert agree(store_dir) == {dest}
    finally:
        srv.stop()


def test_a_resumable_upload_killed_right_after_its_commit_is_finished(
        quiet, config_path, store_dir):
    """kill -9 once the last chunk's registration committed: the outcome
    committed with it, so after a restart HEAD gives the whole length, GET
    the registration's outcome, and the last chunk sent again is answered
    409 (finished), not a server error."""
    data = os.urandom(200_000)
    srv, url, headers = killed_at_the_last_chunk(config_path, "upload:finished", "t/g.dat",
                                                 data, 50_000)
    try:
        assert int(requests.head(url, headers=headers).headers["Upload-Offset"]) == len(data)
        outcome = requests.get(url, headers=bearer()).json()["outcome"]
        assert (outcome["status"], outcome["md5"], outcome["store_path"]) == (
            201, hashlib.md5(data).hexdigest(), "t/g.dat")
        again = patch(url, headers, 50_000, data[50_000:])
        assert again.status_code == 409 and "finished" in again.text, again.text
        assert agree(store_dir) == {"t/g.dat"}
    finally:
        srv.stop()


def test_a_directory_deletion_killed_at_each_step_leaves_it_whole_or_gone(quiet, config_path,
                                                                          store_dir, tmp_path):
    policy_alone(config_path)
    tree = tmp_path / "big.uv"
    for i in range(100):  # 20,000 files
        sub = tree / ("d%03d" % i)
        sub.mkdir(parents=True)
        for j in range(200):
            (sub / ("f%03d" % j)).write_bytes(b"%d.%d" % (i, j))
    srv = Server(config_path).start()
    try:
        client = librarian_client.LibrarianClient(conn_config={"url": srv.url,
                                                               "authenticator": AUTH["admin"]})
        assert client.upload(str(tree), "t/big.uv", null_obsid=True)["created"]
        requests.post(srv.url + "api/set_one_file_deletion_policy", data={"request": (
            '{"authenticator": "%s", "file_name": "big.uv", "deletion_policy": "allowed"}'
            % AUTH["admin"])}).raise_for_status()
    finally:
        srv.stop()
    expected = path_md5(os.path.join(store_dir, "t", "big.uv"))
    for step, whole in (("delete:moved", True), ("delete:unrecorded", False)):
        srv = crashing(config_path, step)
        with pytest.raises(requests.ConnectionError):
            requests.post(srv.url + "api/delete_file_instances", data={"request": (
                '{"authenticator": "%s", "file_name": "big.uv"}' % AUTH["admin"])}, timeout=60)
        died(srv)
        assert not os.path.exists(os.path.join(store_dir, "t", "big.uv"))  # moved out at once
        srv = Server(config_path).start()
        srv.stop()
        if whole:  # the record was still there: the deletion is undone
            assert agree(store_dir) == {"t/big.uv"}
            assert path_md5(os.path.join(store_dir, "t", "big.uv")) == expected
        else:  # the record was gone: the deletion is finished
            assert agree(store_dir) == set()


def test_a_flat_deletion_killed_after_its_record_went_is_finished(quiet, config_path, store_dir):
    policy_alone(config_path)
    srv = Server(config_path).start()
    try:
        assert put(srv, "x.dat", b"x").status_code == 201
    finally:
        srv.stop()
    with models.db.connection_context():
        models.FileInstance.update(deletion_policy=models.DELETION_ALLOWED).execute()
    models.db.close()
    srv = crashing(config_path, "delete:unrecorded")
    with pytest.raises(requests.ConnectionError):
        requests.post(srv.url + "api/delete_file_instances", data={"request": (
            '{"authenticator": "%s", "file_name": "x.dat"}' % AUTH["admin"])}, timeout=60)
    died(srv)
    Server(config_path).start().stop()
    assert agree(store_dir) == set()


def test_a_second_server_started_mid_upload_leaves_the_upload_alone(quiet, config_path,
                                                                   store_dir, tmp_path):
    """A resumable upload half sent to one server: a second server's
    start-up (which settles what dead processes left) keeps its staged
    bytes, and the upload finishes."""
    from conftest import free_port

    first = Server(config_path).start()
    second_config = tmp_path / "second.ini"
    text = open(config_path).read().replace("port = %d" % first.port, "port = %d" % free_port())
    second_config.write_text(text)
    data = os.urandom(1 << 20)
    tus = dict(bearer(), **{"Tus-Resumable": "1.0.0"})
    try:
        resp = requests.post(first.url + "api/uploads", headers=dict(tus, **{
            "Upload-Length": str(len(data)),
            "Upload-Metadata": "dest %s,null_obsid %s" % (
                base64.b64encode(b"big.dat").decode(), base64.b64encode(b"true").decode())}))
        url = first.url.rstrip("/") + resp.headers["Location"]
        chunk = dict(tus, **{"Content-Type": "application/offset+octet-stream"})
        assert requests.patch(url, data=data[:1 << 19], headers=dict(
            chunk, **{"Upload-Offset": "0"})).status_code == 204
        second = Server(str(second_config)).start()  # its start-up settles, beside a live one
        second.stop()
        assert requests.patch(url, data=data[1 << 19:], headers=dict(
            chunk, **{"Upload-Offset": str(1 << 19)})).status_code == 204
        outcome = requests.get(url, headers=bearer()).json()["outcome"]
        assert outcome["status"] == 201 and outcome["size"] == len(data)
    finally:
        first.stop()
    assert agree(store_dir) == {"big.dat"}


def test_a_prestaged_completion_killed_before_its_commit_puts_the_file_back(
        quiet, config_path, store_dir):
    folder = os.path.join(store_dir, "carried", "disk1")
    os.makedirs(folder)
    for name in ("a.dat", "b.dat"):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(name.encode())
        os.chmod(os.path.join(folder, name), 0o664)
    srv = crashing(config_path, "commit:moved")
    request = ('{"authenticator": "%s", "upload_size": 5, "known_staging_store": "main", '
               '"known_staging_subdir": "carried/disk1"}' % AUTH["admin"])
    requests.post(srv.url + "api/initiate_upload", data={"request": request}).raise_for_status()
    with pytest.raises(requests.ConnectionError):
        requests.post(srv.url + "api/complete_upload", data={"request": (
            '{"authenticator": "%s", "store_name": "main", "staging_dir": "carried/disk1", '
            '"dest_store_path": "2458000/a.dat", "meta_mode": "infer", "null_obsid": true, '
            '"staging_was_known": true}' % AUTH["admin"])}, timeout=60)
    died(srv)
    Server(config_path).start().stop()
    assert sorted(os.listdir(folder)) == ["a.dat", "b.dat"]
    assert os.stat(os.path.join(folder, "a.dat")).st_mode & 0o777 == 0o664  # as it was
    with models.db.connection_context():
        assert models.FileInstance.select().count() == 0
        assert models.StoreIntent.select().count() == 0
    assert not os.path.exists(os.path.join(store_dir, "2458000", "a.dat"))


def children_of(pid):
    """Pids whose parent is `pid` (from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, IndexError, ValueError):
                pass
    return found


def test_the_header_reader_does_not_outlive_a_killed_server(quiet, config_path, store_dir):
    srv = Server(config_path).start()
    reply = put(srv, "h.uvh5", b"not a real uvh5 header")  # starts the reader process
    assert reply.status_code == 201  # (with null_obsid: a header it cannot read)
    readers = children_of(srv.proc.pid)
    assert readers, "the reader process runs beside the server"
    srv.proc.kill()
    died(srv)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(os.path.exists("/proc/%d" % p) and
                                               open("/proc/%d/stat" % p).read().split()[2] != "Z"
                                               for p in readers):
        time.sleep(0.2)
    left = [p for p in readers if os.path.exists("/proc/%d" % p)
            and open("/proc/%d/stat" % p).read().rsplit(")", 1)[1].split()[0] != "Z"]
    assert left == [], "readers still running after the server was killed"


def test_an_offload_killed_after_its_copy_leaves_the_source_as_it_was(quiet, config_path,
                                                                     store_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with open(config_path, "a") as f:
        f.write("[store:other]\npath_prefix = %s\n\n" % other)
    srv = Server(config_path).start()
    try:
        assert put(srv, "o/one.dat", b"one").status_code == 201
    finally:
        srv.stop()
    srv = crashing(config_path, "commit:moved")
    requests.post(srv.url + "api/initiate_offload", data={"request": (
        '{"authenticator": "%s", "source_store_name": "main", "dest_store_name": "other"}'
        % AUTH["admin"])}).raise_for_status()
    died(srv)  # its worker thread ran the offload and died moving the copy into place
    assert os.path.exists(other / "o" / "one.dat")  # in place, without its record
    srv = Server(config_path, env={"LIBRARIAN_CRASH_AT": "none"})
    srv.start()  # settles, then its worker takes the offload up again and finishes it
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with models.db.connection_context():
                if the_task().state in ("done", "failed"):
                    break
            time.sleep(0.3)
    finally:
        srv.stop()
    with models.db.connection_context():
        assert the_task().state == "done"
    assert agree(store_dir) == {"o/one.dat"} == agree(str(other), "other")
