"""Resumable uploads (tus 1.0, `uploads`) through the WSGI app and against
real servers, on SQLite and PostgreSQL: chunks, offsets, checksums,
termination, resumption after a dropped connection, directories as tars,
expiry, and the bounded request body."""

import base64
import datetime
import hashlib
import io
import os
import socket
import tarfile
import zlib


import pytest
import requests

import librarian
import librarian_client
import models
import uploads
from conftest import (AUTH, MIRIAD, UVH5, Server, add_user, bearer, ctx, need_data,
                      store_contents)
from reference import shell_md5

TUS = {"Tus-Resumable": "1.0.0"}


def metadata(**fields):
    return ",".join("%s %s" % (k, base64.b64encode(str(v).encode()).decode())
                    for k, v in fields.items())


def create(web, length, who="admin", status=201, **meta):
    headers = dict(TUS, **bearer(who))
    headers["Upload-Length"] = str(length)
    headers["Upload-Metadata"] = metadata(**meta)
    resp = web.post("/api/uploads", headers=headers, status=status)
    return resp.headers.get("Location"), resp


def patch(web, url, offset, data, who="admin", status=204, checksum=None, md5=None):
    headers = dict(TUS, **bearer(who))
    headers.update({"Upload-Offset": str(offset),
                    "Content-Type": "application/offset+octet-stream"})
    if checksum:
        headers["Upload-Checksum"] = checksum
    if md5:
        headers["X-Librarian-MD5"] = md5
    return web.patch(url, data, headers=headers, status=status, expect_errors=status >= 400)


def offset_of(web, url, who="admin"):
    return int(web.head(url, headers=dict(TUS, **bearer(who))).headers["Upload-Offset"])


def test_a_file_in_three_chunks_is_registered_with_its_md5(web, store_dir):
    data = os.urandom(300_000)
    url, resp = create(web, len(data), dest="a/b/zen.1.txt", md5=hashlib.md5(data).hexdigest(),
                       null_obsid="true")
    assert resp.headers["Tus-Resumable"] == "1.0.0" and url.startswith("/api/uploads/")
    assert offset_of(web, url) == 0
    assert patch(web, url, 0, data[:100_000]).headers["Upload-Offset"] == "100000"
    assert offset_of(web, url) == 100_000
    # a chunk sent again at an old offset is refused, and changes nothing
    patch(web, url, 0, data[:100_000], status=409)
    patch(web, url, 100_000, data[100_000:200_000])
    assert models.File.select().count() == 0
    patch(web, url, 200_000, data[200_000:])
    state = web.get(url, headers=bearer()).json
    assert state["finished"] and state["offset"] == len(data)
    assert state["outcome"]["name"] == "zen.1.txt"
    assert state["outcome"]["md5"] == hashlib.md5(data).hexdigest()
    assert state["outcome"]["status"] == 201
    with open(os.path.join(store_dir, "a", "b", "zen.1.txt"), "rb") as f:
        assert f.read() == data
    files, staging = store_contents(store_dir)
    assert staging == []  # the upload's staging folder went with its last chunk
    assert models.File.get_by_id("zen.1.txt").size == len(data)


def test_a_damaged_chunk_is_refused_with_460_and_not_written(web, store_dir):
    data = b"x" * 1000
    url, _ = create(web, len(data), dest="zen.2.txt", null_obsid="true")
    good = "md5 " + base64.b64encode(hashlib.md5(data).digest()).decode()
    resp = patch(web, url, 0, b"y" + data[1:], status=460, checksum=good)
    assert resp.status == "460 Checksum Mismatch"
    assert "Upload-Checksum" in resp.json["message"]
    assert offset_of(web, url) == 0
    patch(web, url, 0, data, checksum="sha1 " + base64.b64encode(
        hashlib.sha1(data).digest()).decode())
    assert models.File.get_by_id("zen.2.txt").md5 == hashlib.md5(data).hexdigest()


def test_a_file_whose_obsid_cannot_be_known_is_refused_before_any_byte(web, store_dir):
    """Without null_obsid, a file no reader reads is refused when the upload
    is created (it would be after its last byte); a UVH5 name, a directory
    and a file known here already are let through to their bytes."""
    _, resp = create(web, 10, status=400, dest="zen.5.txt")
    assert "null_obsid" in resp.json["message"] and models.Upload.select().count() == 0
    resp = web.put("/api/upload/zen.5.txt", b"x" * 10, headers=bearer(), status=400)
    assert "null_obsid" in resp.json["message"]
    create(web, 10, dest="zen.5.uvh5")
    create(web, 10, dest="zen.5.dir", directory="tar")
    web.put("/api/upload/zen.6.txt?null_obsid=true", b"y" * 10, headers=bearer())
    create(web, 10, dest="again/zen.6.txt")  # its obsid is known: the file's


def test_a_claim_the_database_could_not_end_is_free_once_its_request_ends(
        web, store_dir, monkeypatch):
    """The database fails while a chunk is written and again when its claim
    would end: the next try of that chunk is written (no 409 until a
    restart), and the heartbeat renews only claims a request still holds."""
    data = os.urandom(3000)
    url, _ = create(web, len(data), dest="zen.db.txt", null_obsid="true")
    patch(web, url, 0, data[:1000])
    store = type(ctx().open_store(models.Store.get()))
    real_write, real_release = store.write_at, uploads.release

    def failing(*args, **kwargs):
        raise models.pw.OperationalError("server closed the connection unexpectedly")
    monkeypatch.setattr(store, "write_at", failing)
    monkeypatch.setattr(uploads, "release", failing)
    patch(web, url, 1000, data[1000:2000], status=500)
    row = models.Upload.get()
    assert row.writer == models.this_process() and row.offset == 1000  # left claimed
    stale = datetime.datetime(2026, 1, 1)
    models.Upload.update(updated=stale).execute()
    from stores import intents
    intents.heartbeat()
    assert models.Upload.get().updated == stale  # not renewed: no request holds it
    monkeypatch.setattr(store, "write_at", real_write)
    monkeypatch.setattr(uploads, "release", real_release)
    patch(web, url, 1000, data[1000:2000])
    patch(web, url, 2000, data[2000:])
    assert models.File.get_by_id("zen.db.txt").md5 == hashlib.md5(data).hexdigest()


def test_a_crc32_checksum_is_checked(web, store_dir):
    data = b"w" * 3000
    url, _ = create(web, len(data), dest="zen.4.txt", null_obsid="true")
    crc = zlib.crc32(data).to_bytes(4, "big")
    damaged = "crc32 " + base64.b64encode(bytes([crc[0] ^ 1]) + crc[1:]).decode()
    patch(web, url, 0, data, status=460, checksum=damaged)
    assert offset_of(web, url) == 0
    patch(web, url, 0, data, checksum="crc32 " + base64.b64encode(crc).decode())
    assert models.File.get_by_id("zen.4.txt").size == 3000


def test_the_md5_sent_with_the_last_chunk_decides(web, store_dir):
    """A client hashing as it sends gives the whole MD5 with the last chunk:
    bytes that differ from it are refused, and it is refused on any other
    chunk or when it contradicts the MD5 the upload was created with."""
    data = os.urandom(6000)
    right = hashlib.md5(data).hexdigest()
    url, _ = create(web, len(data), dest="zen.5.txt", null_obsid="true")
    resp = patch(web, url, 0, data[:3000], md5=right, status=400)
    assert "only with the chunk that completes" in resp.json["message"]
    patch(web, url, 0, data[:3000])
    resp = patch(web, url, 3000, data[3000:], md5="1" * 32, status=400)
    assert "md5" in resp.json["message"].lower()
    assert models.File.select().count() == 0 and store_contents(store_dir) == (set(), [])

    url, _ = create(web, len(data), dest="zen.6.txt", null_obsid="true", md5=right)
    resp = patch(web, url, 0, data, md5="2" * 32, status=400)
    assert "differs from the MD5 the upload was created with" in resp.json["message"]
    assert offset_of(web, url) == 0
    patch(web, url, 0, data, md5=right.upper())
    assert models.File.get_by_id("zen.6.txt").md5 == right


def test_wrong_md5_fails_at_the_last_chunk_and_leaves_nothing(web, store_dir):
    data = b"z" * 5000
    url, _ = create(web, len(data), dest="zen.3.txt", md5="0" * 32, null_obsid="true")
    patch(web, url, 0, data[:2000])
    resp = patch(web, url, 2000, data[2000:], status=400)
    assert "md5" in resp.json["message"].lower()
    state = web.get(url, headers=bearer()).json
    assert state["finished"] and state["outcome"]["success"] is False
    assert models.File.select().count() == 0
    assert store_contents(store_dir) == (set(), [])


def test_bad_requests_are_refused_with_what_was_wrong(web):
    _, resp = create(web, 10, status=400)  # no dest
    assert "dest" in resp.json["message"]
    headers = dict(bearer(), **{"Upload-Length": "10", "Upload-Metadata": metadata(dest="x")})
    assert web.post("/api/uploads", headers=headers, status=412).headers["Tus-Version"]
    _, resp = create(web, 10, status=400, dest="../up")
    _, resp = create(web, 10, status=400, dest="f", bogus="1")
    assert "bogus" in resp.json["message"]
    url, _ = create(web, 10, dest="zen.4.txt", null_obsid="true")
    resp = patch(web, url, 0, b"x" * 11, status=400)
    assert "beyond" in resp.json["message"]
    resp = web.patch(url, b"x", headers=dict(TUS, **bearer(), **{"Upload-Offset": "0"}),
                     status=415, content_type="application/octet-stream")


def test_an_upload_is_only_its_creators(web):
    url, _ = create(web, 10, who="appender", dest="zen.5.txt", null_obsid="true")
    web.head(url, headers=dict(TUS, **bearer("writer")), status=404)
    patch(web, url, 0, b"0123456789", who="writer", status=404)
    web.head(url, headers=dict(TUS, **bearer("admin")), status=200)  # an admin sees all
    create(web, 10, who="reader", status=403, dest="zen.6.txt")


def test_unfinished_uploads_are_bounded_per_caller_and_reserve_their_space(web, app,
                                                                          monkeypatch):
    app.config["librarian.settings"].server["uploads_per_caller"] = 2
    free = 100 << 30  # (the disk's own moves with whatever else runs beside)
    monkeypatch.setattr(type(ctx().open_store(models.Store.get())), "free_space",
                        lambda self: free)
    create(web, free - (64 << 20), dest="zen.r1.txt", null_obsid="true")
    # the space the first will still write is taken: a second as large finds no room
    _, resp = create(web, free - (64 << 20), status=400, dest="zen.r2.txt", null_obsid="true")
    assert "room" in resp.json["message"]
    create(web, 10, dest="zen.r3.txt", null_obsid="true")
    _, resp = create(web, 10, status=429, dest="zen.r4.txt", null_obsid="true")
    assert "uploads_per_caller" in resp.json["message"]
    create(web, 10, who="writer", dest="zen.r5.txt", null_obsid="true")  # others are not held


def test_uploads_created_at_once_cannot_reserve_more_than_there_is(web, app, monkeypatch):
    """Requests that passed the checks at the same time are checked again
    once recorded: the one that would take more room than the store has, or
    one upload too many, is refused and leaves no row; an empty PATCH keeps
    no abandoned upload from expiring."""
    store = ctx().open_store(models.Store.get())
    monkeypatch.setattr(type(store), "free_space", lambda self: 1000)
    fields = uploads.check_request(600, {"dest": "zen.c1.txt", "null_obsid": "true"})

    def create_as_admin(**changes):
        return uploads.create(store, "admin", dict(fields, **changes), 2, "none")
    first = create_as_admin()
    with pytest.raises(models.LibrarianError) as refused:
        create_as_admin(dest_store_path="zen.c2.txt")
    assert refused.value.status == 400 and "no room" in refused.value.message
    create_as_admin(length=10, dest_store_path="zen.c3.txt")
    with pytest.raises(models.LibrarianError) as refused:
        create_as_admin(length=10, dest_store_path="zen.c4.txt")
    assert refused.value.status == 429 and "has 2 unfinished" in refused.value.message
    assert models.Upload.select().count() == 2

    stale = models.utcnow() - datetime.timedelta(hours=48)
    models.Upload.update(updated=stale).where(models.Upload.id == first.id).execute()
    patch(web, "/api/uploads/" + first.id, 0, b"")
    assert models.Upload.get_by_id(first.id).updated == stale
    assert uploads.expire(ctx(), 24) == 1


def test_termination_removes_the_staged_bytes(web, store_dir):
    url, _ = create(web, 10, dest="zen.7.txt", null_obsid="true")
    patch(web, url, 0, b"01234")
    assert len(store_contents(store_dir)[1]) == 1
    web.delete(url, headers=dict(TUS, **bearer()), status=204)
    web.head(url, headers=dict(TUS, **bearer()), status=404)
    assert store_contents(store_dir) == (set(), [])


def test_an_abandoned_upload_expires_with_its_staging(web, store_dir):
    url, _ = create(web, 10, dest="zen.8.txt", null_obsid="true")
    patch(web, url, 0, b"01234")
    assert uploads.expire(ctx(), 1.0) == 0  # touched just now
    models.Upload.update(updated=models.utcnow() - datetime.timedelta(hours=2)).execute()
    assert uploads.expire(ctx(), 1.0) == 1
    assert models.Upload.select().count() == 0
    assert store_contents(store_dir) == (set(), [])


def test_a_removed_sources_uploads_are_not_a_later_namesakes(web, config_path, store_dir,
                                                             capsys):
    first = add_user(config_path, "pipeline", capsys)
    url, _ = create(web, 10, who=first, dest="zen.10.txt", null_obsid="true")
    patch(web, url, 0, b"01234", who=first)
    assert librarian.main(["remove-user", "pipeline", "--config", config_path]) == 0
    second = add_user(config_path, "pipeline", capsys)
    web.head(url, headers=dict(TUS, **bearer(second)), status=404)
    patch(web, url, 5, b"56789", who=second, status=404)
    patch(web, url, 5, b"56789", who="admin", status=404)  # nobody's: a file without source
    assert uploads.expire(ctx(), 1.0) == 1  # the next sweep, however recent the bytes
    assert store_contents(store_dir) == (set(), [])


def test_the_staging_clean_up_leaves_an_upload_in_progress(web, store_dir):
    url, _ = create(web, 10, dest="zen.9.txt", null_obsid="true")
    patch(web, url, 0, b"01234")
    import librarian
    librarian.settle_all(ctx())
    patch(web, url, 5, b"56789")
    assert models.File.get_by_id("zen.9.txt").size == 10


def test_a_directory_travels_as_a_tar(web, store_dir):
    need_data()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(MIRIAD, arcname=os.path.basename(MIRIAD))
    body = buf.getvalue()
    url, _ = create(web, len(body), dest="2458043/" + os.path.basename(MIRIAD), directory="tar")
    step = len(body) // 3 + 1
    for start in range(0, len(body), step):
        patch(web, url, start, body[start:start + step])
    outcome = web.get(url, headers=bearer()).json["outcome"]
    assert outcome["md5"] == librarian_client.path_md5(MIRIAD)[1]
    assert os.path.isdir(os.path.join(store_dir, "2458043", os.path.basename(MIRIAD)))


# ---------------------------------------------------------------------------
# Real servers: the client resumes; bodies are bounded
# ---------------------------------------------------------------------------

@pytest.fixture
def small_body_server(app, tmp_path, config_path):
    """A real server whose request bodies are bounded at 1 MiB."""
    text = open(config_path).read().replace("[server]\n", "[server]\nmax_body_bytes = 1048576\n")
    open(config_path, "w").write(text)
    models.db.close()
    srv = Server(config_path).start()
    yield srv
    srv.stop()


def test_a_body_over_the_bound_is_refused_from_its_headers(small_body_server, store_dir):
    """An anonymous client announcing a 1 GiB body is answered 413 at once,
    and nothing is written anywhere."""
    with socket.create_connection(("127.0.0.1", small_body_server.port)) as s:
        s.sendall(b"PUT /api/upload/zen.big HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1073741824\r\n\r\n" + b"x" * 65536)
        s.settimeout(10)
        head = b""
        while b"bytes)" not in head:  # the answer, to its body (then waitress closes)
            more = s.recv(4096)
            if not more:
                break
            head += more
    assert head.startswith(b"HTTP/1.1 413")
    assert b"over [server] max_body_bytes (1048576 bytes)" in head, head
    assert store_contents(store_dir) == (set(), [])
    # A client that waits for 100 Continue is told 413 instead, and sends nothing.
    with socket.create_connection(("127.0.0.1", small_body_server.port)) as s:
        s.sendall(b"POST /api/ping HTTP/1.1\r\nHost: x\r\nContent-Length: 1048577\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        s.settimeout(10)
        assert s.recv(12) == b"HTTP/1.1 413"


def test_the_client_uploads_in_chunks_and_resumes_after_a_dropped_connection(
        small_body_server, tmp_path, store_dir, monkeypatch):
    """A 5 MiB file in 1 MiB chunks; the connection is dropped once at half
    way; the client asks for the offset and goes on from there, sending
    the file about once."""
    path = tmp_path / "zen.2459000.5.txt"
    path.write_bytes(os.urandom(5 << 20))
    client = librarian_client.LibrarianClient(conn_config={
        "url": small_body_server.url, "authenticator": AUTH["admin"]})
    sent, dropped = [], []
    real_patch = librarian_client.requests.Session.request

    def flaky(self, method, url, **kw):
        if method == "PATCH":
            sent.append(len(kw.get("data") or b""))
            if sum(sent) > (5 << 20) // 2 and not dropped:
                dropped.append(True)
                raise requests.ConnectionError("dropped")
        return real_patch(self, method, url, **kw)

    monkeypatch.setattr(librarian_client.requests.Session, "request", flaky)
    reply = client.upload(str(path), "x/zen.2459000.5.txt", null_obsid=True, chunk_size=1 << 20)
    assert dropped and reply["md5"] == shell_md5(str(path)) and reply["created"]
    assert sum(sent) <= 1.25 * (5 << 20)
    assert open(os.path.join(store_dir, "x", "zen.2459000.5.txt"), "rb").read() == \
        path.read_bytes()


def test_the_client_uploads_a_directory_in_chunks_and_resumes(small_body_server, tmp_path,
                                                               store_dir, monkeypatch):
    """The MIRIAD data set as a tar in 16 KiB chunks, the connection dropped
    at half way: the tar view starts again at the server's offset."""
    need_data()
    client = librarian_client.LibrarianClient(conn_config={
        "url": small_body_server.url, "authenticator": AUTH["admin"]})
    name = os.path.basename(MIRIAD)
    length = librarian_client.TarView(MIRIAD, name).length
    sent, dropped = [], []
    real = librarian_client.requests.Session.request

    def flaky(self, method, url, **kw):
        if method == "PATCH":
            sent.append(len(kw.get("data") or b""))
            if sum(sent) > length // 2 and not dropped:
                dropped.append(True)
                raise requests.ConnectionError("dropped")
        return real(self, method, url, **kw)

    monkeypatch.setattr(librarian_client.requests.Session, "request", flaky)
    monkeypatch.setattr(librarian_client, "RESUME_DELAY", 0.01)
    reply = client.upload(MIRIAD, "2458043/" + name, chunk_size=16 << 10)
    assert dropped and sum(sent) <= length + (16 << 10)
    assert reply["md5"] == librarian_client.path_md5(MIRIAD)[1]
    assert sorted(os.listdir(os.path.join(store_dir, "2458043", name))) == \
        sorted(os.listdir(MIRIAD))


def test_the_client_uploads_the_uvh5_file(small_body_server, store_dir):
    need_data()
    client = librarian_client.LibrarianClient(conn_config={
        "url": small_body_server.url, "authenticator": AUTH["admin"]})
    reply = client.upload(UVH5, "2458432/zen.2458432.34569.uvh5", chunk_size=512 << 10)
    assert reply["md5"] == shell_md5(UVH5) and reply["obsid"] is not None


def test_an_existing_tus_client_uploads_with_checksums(small_body_server, tmp_path, store_dir):
    """tuspy (the tus project's Python client) as it is documented."""
    from tusclient import client as tus_client

    path = tmp_path / "zen.2459000.6.txt"
    path.write_bytes(os.urandom(3 << 20))
    tus = tus_client.TusClient(small_body_server.url + "api/uploads",
                               headers={"Authorization": "Bearer " + AUTH["writer"]})
    uploader = tus.uploader(str(path), chunk_size=1 << 20, upload_checksum=True,
                            metadata={"dest": "t/zen.2459000.6.txt", "null_obsid": "true",
                                      "md5": shell_md5(str(path))})
    uploader.upload()
    state = requests.get(uploader.url, headers=bearer("writer")).json()
    assert state["outcome"]["status"] == 201 and state["outcome"]["md5"] == shell_md5(str(path))
    assert open(os.path.join(store_dir, "t", "zen.2459000.6.txt"), "rb").read() == \
        path.read_bytes()


def test_sending_the_same_file_again_after_an_interruption_goes_on(small_body_server, tmp_path,
                                                                   store_dir, monkeypatch):
    """The client stopped at half way (Ctrl-C): running the same upload
    again sends only the rest; an upload refused at its end is not resumed."""
    path = tmp_path / "zen.2459000.7.txt"
    path.write_bytes(os.urandom(4 << 20))
    client = librarian_client.LibrarianClient(conn_config={
        "url": small_body_server.url, "authenticator": AUTH["admin"]})
    real = librarian_client.requests.Session.request
    sent = _interrupt_patches(monkeypatch, lambda sent: sum(sent) >= 2 << 20)
    with pytest.raises(KeyboardInterrupt):
        client.upload(str(path), "zen.2459000.7.txt", null_obsid=True, chunk_size=1 << 20)
    monkeypatch.setattr(librarian_client.requests.Session, "request", real)
    before = models.Upload.select().count()
    sent.clear()

    def counting(self, method, url, **kw):
        if method == "PATCH":
            sent.append(len(kw["data"]))
        return real(self, method, url, **kw)

    monkeypatch.setattr(librarian_client.requests.Session, "request", counting)
    reply = client.upload(str(path), "zen.2459000.7.txt", null_obsid=True, chunk_size=1 << 20)
    assert reply["created"] and sum(sent) == 2 << 20 and before == 1
    assert librarian_client.UploadMemo()._load() == {}
    # without null_obsid the text file is refused (before any byte is sent);
    # sent again with it, the upload goes through
    other = tmp_path / "zen.2459000.8.txt"
    other.write_bytes(b"not data")
    with pytest.raises(librarian_client.RPCError):
        client.upload(str(other), "zen.2459000.8.txt")
    assert client.upload(str(other), "zen.2459000.8.txt", null_obsid=True)["created"]


def test_an_upload_stopped_after_its_last_byte_is_finished_by_sending_it_again(
        small_body_server, tmp_path, store_dir, monkeypatch):
    """The outcome's GET is tried again after dropped connections; a client
    stopped (Ctrl-C) after the last chunk, before the outcome, sends no byte
    again when run again: it reads the file for its MD5, gets the outcome,
    and forgets the upload."""
    monkeypatch.setattr(librarian_client, "RESUME_DELAY", 0.01)
    path = tmp_path / "zen.2459000.6.txt"
    data = os.urandom(2 << 20)
    path.write_bytes(data)
    client = librarian_client.LibrarianClient(conn_config={
        "url": small_body_server.url, "authenticator": AUTH["admin"]})
    real = librarian_client.requests.Session.request
    calls = []

    def flaky(self, method, url, **kw):
        calls.append(method)
        if method == "GET" and "/api/uploads/" in url:
            if calls.count("GET") <= 2:
                raise librarian_client.requests.ConnectionError("dropped")
            if calls.count("GET") == 3:
                raise KeyboardInterrupt
        return real(self, method, url, **kw)

    monkeypatch.setattr(librarian_client.requests.Session, "request", flaky)
    with pytest.raises(KeyboardInterrupt):
        client.upload(str(path), "zen.2459000.6.txt", null_obsid=True, chunk_size=1 << 20)
    assert calls.count("GET") == 3 and calls.count("PATCH") == 2  # tried again twice
    calls.clear()

    def counting(self, method, url, **kw):
        calls.append(method)
        return real(self, method, url, **kw)

    monkeypatch.setattr(librarian_client.requests.Session, "request", counting)
    reply = client.upload(str(path), "zen.2459000.6.txt", null_obsid=True, chunk_size=1 << 20)
    assert "PATCH" not in calls and "POST" not in calls
    assert reply["created"] and reply["md5"] == hashlib.md5(data).hexdigest()
    assert librarian_client.UploadMemo()._load() == {}


def _interrupt_patches(monkeypatch, stop):
    """Make the client's PATCHes raise KeyboardInterrupt once `stop(sent)`
    holds; returns `sent`, the sizes of the chunks sent before that."""
    sent = []
    real = librarian_client.requests.Session.request

    def interrupted(self, method, url, **kw):
        if method == "PATCH":
            if stop(sent):
                raise KeyboardInterrupt
            sent.append(len(kw["data"]))
        return real(self, method, url, **kw)

    monkeypatch.setattr(librarian_client.requests.Session, "request", interrupted)
    return sent


def test_a_file_changed_since_the_interruption_starts_afresh(small_body_server, tmp_path,
                                                             store_dir, monkeypatch):
    """The memo knows a file by its path, size, inode and modification time:
    rewritten (same size) after an interruption, it is sent whole, and the
    MD5 recorded is the new bytes'."""
    path = tmp_path / "zen.2459000.9.txt"
    path.write_bytes(os.urandom(3 << 20))
    client = librarian_client.LibrarianClient(conn_config={
        "url": small_body_server.url, "authenticator": AUTH["admin"]})
    real = librarian_client.requests.Session.request
    _interrupt_patches(monkeypatch, bool)  # stop before the second chunk
    with pytest.raises(KeyboardInterrupt):
        client.upload(str(path), "zen.2459000.9.txt", null_obsid=True, chunk_size=1 << 20)
    monkeypatch.setattr(librarian_client.requests.Session, "request", real)
    new = os.urandom(3 << 20)
    path.write_bytes(new)
    os.utime(path, ns=(1, 1))  # unmistakably another modification time
    reply = client.upload(str(path), "zen.2459000.9.txt", null_obsid=True, chunk_size=1 << 20)
    assert reply["md5"] == hashlib.md5(new).hexdigest() and reply["created"]
    with open(os.path.join(store_dir, "zen.2459000.9.txt"), "rb") as f:
        assert f.read() == new
    # the upload of the old bytes was abandoned on the server, and forgotten
    with models.db.connection_context():
        assert models.Upload.select().where(models.Upload.outcome.is_null()).count() == 0
    assert librarian_client.UploadMemo()._load() == {}
    # another caller's unfinished upload to the same place is not this caller's to abandon
    writer = librarian_client.LibrarianClient(conn_config={
        "url": small_body_server.url, "authenticator": AUTH["writer"]})
    _interrupt_patches(monkeypatch, bool)
    with pytest.raises(KeyboardInterrupt):
        writer.upload(str(path), "again/zen.2459000.9.txt", null_obsid=True, chunk_size=1 << 20)
    monkeypatch.setattr(librarian_client.requests.Session, "request", real)
    path.write_bytes(os.urandom(3 << 20))
    with pytest.raises(librarian_client.RPCError):  # (a file of that name has other bytes)
        client.upload(str(path), "again/zen.2459000.9.txt", null_obsid=True, chunk_size=1 << 20)
    with models.db.connection_context():
        assert models.Upload.select().where(models.Upload.outcome.is_null()).count() == 1
    assert len(librarian_client.UploadMemo()._load()) == 1
