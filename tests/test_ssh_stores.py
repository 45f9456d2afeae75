"""A store on "another host": every store operation over SSH, against a
real OpenSSH server on a loopback port (tests/sshd.py).

The store's folder is on this machine, so that the tests can look at the
bytes directly, but the server reaches it only through sshd: its name has
spaces and quotes, which every command sent over SSH must survive.
"""

import hashlib
import os
import posixpath
import subprocess
import sys
import threading
import time

import pytest
import requests

import librarian_client
import models
from stores import ssh as sshfs
import stores
from conftest import (ctx, AUTH, MIRIAD, ROOT, UVH5, Server, api, bearer, config_text, free_port,
                      need_data, need_sshd, store_contents, the_task)
from reference import miriad_reference, shell_md5, shell_size, uvh5_reference
from test_upload import put, tar_of

REMOTE = "remote 'site' \"A\" store"
ODD_DIR = "night of 'Nov 30' \"x\""  # folders and names with spaces and quotes
ODD_NAME = "it's a \"test\" file.dat"


@pytest.fixture
def store_dir(tmp_path):
    """The remote store's folder (on this machine, reached through sshd)."""
    path = tmp_path / REMOTE
    path.mkdir()
    return str(path)


@pytest.fixture
def config_path(tmp_path, db_url, store_dir, sshd):
    path = tmp_path / "librarian.ini"
    path.write_text(config_text(db_url, store_dir, port=free_port(),
                                store_section=sshd.store_section("main", store_dir)))
    return str(path)


def md5_of(data):
    return hashlib.md5(data).hexdigest()


def test_the_store_is_reached_over_ssh(app, web, sshd):
    store = ctx().open_store(models.Store.get())
    assert isinstance(store.fs, stores.SSHFS)
    assert store.fs.conn.target.port == sshd.port
    assert store.is_reachable()
    assert api(web, "initiate_upload", upload_size=1)["ssh_port"] == sshd.port
    form = web.get("/login").forms[0]
    form["authenticator"] = AUTH["admin"]
    form.submit(status=302)
    page = web.get("/stores/main").text
    assert "over SSH as %s to 127.0.0.1 port %d" % (sshd.user, sshd.port) in page


def test_quick_looks_of_files_on_the_remote_store_match_local_ones(web, store_dir):
    """The waterfall and summary read over SFTP (UVH5 in place, MIRIAD
    fetched first) are those of the local sample files."""
    import quicklook

    need_data()
    with open(UVH5, "rb") as f:
        put(web, ODD_DIR + "/zen.2458432.34569.uvh5", f.read())
    put(web, "zen.2458043.12552.xx.HH.uvA", tar_of(MIRIAD, "zen.2458043.12552.xx.HH.uvA"),
        headers={"X-Librarian-Directory": "tar"})
    store = ctx().open_store(models.Store.get())
    for kind, local, path in (("uvh5", UVH5, ODD_DIR + "/zen.2458432.34569.uvh5"),
                              ("miriad", MIRIAD, "zen.2458043.12552.xx.HH.uvA")):
        remote = store.quick_look(store.resolve(path), None, None)
        here = quicklook.look(kind, local)
        assert remote["summary"] == here["summary"] and remote["png"] == here["png"]
    assert store.quick_look(store.resolve(ODD_DIR), None, None) is None


# ---------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------

def test_sample_data_uploaded_over_http_land_on_the_remote_store(web, store_dir):
    """The metadata are read over SFTP; they must equal what the reference
    readers find in the local copy."""
    need_data()
    with open(UVH5, "rb") as f:
        reply = put(web, ODD_DIR + "/zen.2458432.34569.uvh5", f.read()).json
    want = uvh5_reference(UVH5)
    assert (reply["md5"], reply["size"], reply["obsid"]) == (shell_md5(UVH5), shell_size(UVH5),
                                                             want["obsid"])
    placed = os.path.join(store_dir, ODD_DIR, "zen.2458432.34569.uvh5")
    assert shell_md5(placed) == shell_md5(UVH5)
    assert os.stat(placed).st_mode & 0o777 == 0o444

    reply = put(web, "zen.2458043.12552.xx.HH.uvA", tar_of(MIRIAD, "zen.2458043.12552.xx.HH.uvA"),
                headers={"X-Librarian-Directory": "tar"}).json
    want_miriad = miriad_reference(MIRIAD)
    assert reply["md5"] == shell_md5(MIRIAD) and reply["obsid"] == want_miriad["obsid"]
    placed = os.path.join(store_dir, "zen.2458043.12552.xx.HH.uvA")
    assert shell_md5(placed) == shell_md5(MIRIAD)
    assert os.stat(placed).st_mode & 0o777 == 0o555
    assert os.stat(os.path.join(placed, "visdata")).st_mode & 0o777 == 0o444
    for obsid, ref in ((want["obsid"], want), (want_miriad["obsid"], want_miriad)):
        obs = models.Observation.get_by_id(obsid)
        assert obs.start_time_jd == pytest.approx(ref["start_time_jd"], abs=1e-8)
        assert obs.stop_time_jd == pytest.approx(ref["stop_time_jd"], abs=1e-8)
        assert obs.start_lst_hr == pytest.approx(ref["start_lst_hr"], abs=1e-9)
    files, staging = store_contents(store_dir)
    assert len(files) == 1 + len(os.listdir(MIRIAD)) and staging == []


def test_wrong_md5_over_ssh_is_refused_and_leaves_nothing(web, store_dir):
    reply = put(web, "a.dat", b"abc", status=400, md5="0" * 32, null_obsid="true").json
    assert "md5 mismatch" in reply["message"]
    assert models.File.select().count() == 0
    assert store_contents(store_dir) == (set(), [])


@pytest.fixture
def sole_copies_deletable(monkeypatch):
    """The original's deletion rule (policy alone) for this test's app."""
    monkeypatch.setitem(ctx().settings.librarian, "deletion_min_other_copies", 0)


def test_a_path_with_spaces_and_quotes_survives_every_operation(web, store_dir, tmp_path,
                                                               sole_copies_deletable):
    body = b"bytes of an odd name\n" * 1000
    path = ODD_DIR + "/" + ODD_NAME
    from urllib.parse import quote
    reply = put(web, quote(path), body, null_obsid="true").json
    assert reply["store_path"] == path and reply["md5"] == md5_of(body)
    with open(os.path.join(store_dir, ODD_DIR, ODD_NAME), "rb") as f:
        assert f.read() == body
    located = api(web, "locate_file_instance", file_name=ODD_NAME)
    assert located["store_path"] == path and located["store_ssh_host"] == "127.0.0.1"
    got = web.get("/api/download/" + quote(ODD_NAME, safe=""), headers=bearer())
    assert got.body == body and got.headers["X-Librarian-MD5"] == md5_of(body)
    part = web.get("/api/download/" + quote(ODD_NAME, safe=""),
                   headers=dict(bearer(), Range="bytes=5-14"), status=206)
    assert part.body == body[5:15]
    assert part.headers["Content-Range"] == "bytes 5-14/%d" % len(body)
    # A directory with an odd name inside, as a tar.
    tree = tmp_path / "d.uv"
    (tree / "sub 'q'").mkdir(parents=True)
    (tree / "sub 'q'" / 'f "1"').write_bytes(b"one")
    put(web, quote(ODD_DIR + "/d.uv"), tar_of(str(tree), "d.uv"), null_obsid="true",
        headers={"X-Librarian-Directory": "tar"})
    assert models.File.get_by_id("d.uv").md5 == shell_md5(str(tree))
    # Deletion goes too.
    api(web, "set_one_file_deletion_policy", file_name=ODD_NAME, deletion_policy="allowed")
    assert api(web, "delete_file_instances", file_name=ODD_NAME)["n_deleted"] == 1
    assert not os.path.lexists(os.path.join(store_dir, ODD_DIR, ODD_NAME))


# ---------------------------------------------------------------------------
# Downloads, deletion
# ---------------------------------------------------------------------------

def test_download_of_a_file_and_of_a_directory_from_the_remote_store(server, client_config,
                                                                     tmp_path):
    need_data()
    client = librarian_client.LibrarianClient("admin", config_path=client_config)
    client.upload(UVH5, "a/zen.2458432.34569.uvh5")
    client.upload(MIRIAD, "b/zen.2458043.12552.xx.HH.uvA")
    size, md5 = client.download("zen.2458432.34569.uvh5", str(tmp_path / "got.uvh5"))
    assert (size, md5) == (shell_size(UVH5), shell_md5(UVH5))
    assert shell_md5(str(tmp_path / "got.uvh5")) == shell_md5(UVH5)
    size, md5 = client.download("zen.2458043.12552.xx.HH.uvA", str(tmp_path / "got.uvA"))
    assert md5 == shell_md5(MIRIAD) == shell_md5(str(tmp_path / "got.uvA"))
    # The tar is exactly as long as announced.
    resp = requests.get(server.url + "api/download/zen.2458043.12552.xx.HH.uvA",
                        headers=bearer())
    assert len(resp.content) == int(resp.headers["Content-Length"])


def test_delete_interlock_on_the_remote_store(web, store_dir, sole_copies_deletable):
    put(web, "k/keep.dat", b"keep", null_obsid="true")
    put(web, "k/go.dat", b"go", null_obsid="true", deletion_policy="allowed")
    stats = api(web, "delete_file_instances_matching_query",
                query='{"name-matches": "%.dat"}')["stats"]
    assert (stats["go.dat"]["n_deleted"], stats["keep.dat"]["n_kept"]) == (1, 1)
    assert all(s["n_error"] == 0 for s in stats.values())
    assert os.path.exists(os.path.join(store_dir, "k", "keep.dat"))
    assert not os.path.lexists(os.path.join(store_dir, "k", "go.dat"))
    assert [i.name for i in models.FileInstance.select()] == ["keep.dat"]


def test_register_instances_of_bytes_already_on_the_remote_store(web, store_dir):
    os.makedirs(os.path.join(store_dir, ODD_DIR))
    placed = os.path.join(store_dir, ODD_DIR, ODD_NAME)
    with open(placed, "wb") as f:
        f.write(b"placed by rsync")
    api(web, "register_instances", store_name="main", null_obsid=True,
        file_info={placed: {"size": 15, "md5": md5_of(b"placed by rsync")}})
    inst = models.FileInstance.get()
    assert (inst.name, inst.parent_dirs) == (ODD_NAME, ODD_DIR)
    assert os.stat(placed).st_mode & 0o222 == 0
    msg = api(web, "register_instances", store_name="main", status=400, null_obsid=True,
              file_info={placed: {"size": 15, "md5": "0" * 32}})["message"]
    assert "not 15 and 000" in msg


# ---------------------------------------------------------------------------
# The two-step protocol with the client
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("how", ["--via-ssh", "--rsync"])
def test_two_step_upload_with_the_client(server, client_config, sshd, store_dir, tmp_path, how):
    need_data()
    tree = tmp_path / "zen.2458043.12552.xx.HH.uvA"
    subprocess.run(["cp", "-r", MIRIAD, str(tree)], check=True)
    os.chmod(tree, 0o755)
    for cmd in ([UVH5, ODD_DIR + "/zen.2458432.34569.uvh5"],
                [str(tree), "zen.2458043.12552.xx.HH.uvA"]):
        out = subprocess.run(
            [sys.executable, os.path.join(ROOT, "librarian_client.py"), "--config", client_config,
             "upload", "appender", *cmd, how, "--ssh-key", sshd.client_key,
             "--known-hosts", sshd.known_hosts, "--ssh-user", sshd.user],  # the port: from the server
            capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        assert "md5 %s" % shell_md5(cmd[0]) in out.stdout
        assert shell_md5(os.path.join(store_dir, cmd[1])) == shell_md5(cmd[0])
    client = librarian_client.LibrarianClient("reader", config_path=client_config)
    names = {f["name"]: f for f in client.search_files({"source-is-exactly": "appender"})}
    assert names["zen.2458043.12552.xx.HH.uvA"]["obsid"] == 1192201262
    assert names["zen.2458432.34569.uvh5"]["md5"] == shell_md5(UVH5)
    assert store_contents(store_dir)[1] == [], "the used staging directories are removed"


def test_two_step_upload_of_a_file_already_archived_adds_a_copy_or_names_it(
        server, client_config, sshd, tmp_path):
    (tmp_path / "f.dat").write_bytes(b"twice")
    client = librarian_client.LibrarianClient("appender", config_path=client_config)
    ssh = librarian_client.SSHOptions(None, sshd.user, sshd.client_key, sshd.known_hosts)
    first = client.upload_via_ssh(str(tmp_path / "f.dat"), "a/f.dat", ssh=ssh, null_obsid=True)
    assert (first["store_path"], first["created"]) == ("a/f.dat", True)
    # Elsewhere: a second instance, as the original protocol made it.
    again = client.upload_via_ssh(str(tmp_path / "f.dat"), "b/f.dat", ssh=ssh, null_obsid=True)
    assert (again["store_name"], again["store_path"], again["created"]) == ("main", "b/f.dat",
                                                                            True)
    # At the same place: nothing to do, and the reply says where it is.
    third = client.upload_via_ssh(str(tmp_path / "f.dat"), "a/f.dat", ssh=ssh, null_obsid=True)
    assert (third["store_path"], third["created"]) == ("a/f.dat", False)
    assert third["md5"] == md5_of(b"twice")


def test_two_step_upload_to_an_unknown_host_key_is_refused(server, client_config, sshd,
                                                           tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    (tmp_path / "f.dat").write_bytes(b"x")
    client = librarian_client.LibrarianClient("appender", config_path=client_config)
    ssh = librarian_client.SSHOptions(sshd.port, sshd.user, sshd.client_key, str(empty))
    with pytest.raises(librarian_client.RPCError) as e:
        client.upload_via_ssh(str(tmp_path / "f.dat"), "f.dat", ssh=ssh, null_obsid=True)
    assert "127.0.0.1" in str(e.value) and "not found in known_hosts" in str(e.value)


# ---------------------------------------------------------------------------
# Offload, staging, copies
# ---------------------------------------------------------------------------

@pytest.fixture
def local_and_remote(tmp_path, db_url, store_dir, sshd):
    """A configuration with a local store `local` and the remote `main`."""
    local = tmp_path / "local"
    local.mkdir()
    path = tmp_path / "two.ini"
    path.write_text(config_text(
        db_url, store_dir, port=free_port(),
        store_section="[store:local]\npath_prefix = %s\n\n" % local
        + sshd.store_section("main", store_dir)))
    return str(path), str(local)


def _remote_config(tmp_path, db_url, ssh_server, **settings):
    """The folder `REMOTE` under tmp_path (a Path) and the path of a
    configuration whose store `main` is that folder reached through
    `ssh_server`, with the given store settings."""
    remote = tmp_path / REMOTE
    remote.mkdir()
    config = tmp_path / "remote.ini"
    config.write_text(config_text(db_url, str(remote), port=free_port(),
                                  store_section=ssh_server.store_section("main", str(remote),
                                                                         **settings)))
    return remote, str(config)


def _app(config_path):
    import librarian
    import settings
    import webtest

    application = librarian.setup(settings.load(config_path))
    with models.db.connection_context():
        librarian.migration_router().run()
    librarian.startup(application)
    return webtest.TestApp(application)


def _run_tasks(web):
    import tasks

    models.db.connect(reuse_if_open=True)
    tasks.run_until_empty(web.app.config["librarian.context"])


def test_offload_from_a_local_store_to_the_remote_one_and_back(local_and_remote, store_dir,
                                                             tmp_path):
    config_path, local = local_and_remote
    tree = tmp_path / "tree.uv"
    (tree / "sub dir").mkdir(parents=True)
    (tree / "sub dir" / "it's").write_bytes(b"inside")
    (tree / "top").write_bytes(b"top")
    web = _app(config_path)
    try:
        models.Store.update(available=False).where(models.Store.name == "main").execute()
        put(web, "o/one.dat", b"one", null_obsid="true")
        put(web, "o/tree.uv", tar_of(str(tree), "tree.uv"), null_obsid="true",
            headers={"X-Librarian-Directory": "tar"})
        for source, dest, source_dir, dest_dir in (("local", "main", local, store_dir),
                                                   ("main", "local", store_dir, local)):
            reply = api(web, "initiate_offload", source_store_name=source,
                        dest_store_name=dest)
            assert reply["outcome"] == "task-launched" and reply["instance-count"] == 2
            _run_tasks(web)
            assert shell_md5(os.path.join(dest_dir, "o", "one.dat")) == md5_of(b"one")
            assert shell_md5(os.path.join(dest_dir, "o", "tree.uv")) == \
                models.File.get_by_id("tree.uv").md5
            # The source copies are now deletable, and deleted here.
            stats = api(web, "delete_file_instances_matching_query",
                        query='{"always-true": true}', restrict_to_store=source)["stats"]
            assert [s["n_deleted"] for s in stats.values()] == [1, 1]
            assert store_contents(source_dir)[0] == set()
            assert store_contents(dest_dir)[1] == []
            models.Store.update(available=True).execute()
    finally:
        models.close_database()


def test_staging_copies_files_from_the_remote_store(tmp_path, db_url, store_dir, sshd):
    dest = tmp_path / "staged"
    config = tmp_path / "staging.ini"
    config.write_text(config_text(db_url, store_dir, port=free_port(),
                                  store_section=sshd.store_section("main", store_dir),
                                  extra="[staging]\ndest_prefix = %s\n" % dest))
    web = _app(str(config))
    try:
        put(web, "s/" + ODD_NAME.replace('"', "%22"), b"to stage", null_obsid="true")
        reply = api(web, "search", search='{"always-true": true}',
                    output_format="stage-the-files-json", stage_user="amy", stage_dest="run1")
        _run_tasks(web)
        folder = reply["destination"]
        assert os.path.exists(os.path.join(folder, "STAGING-SUCCEEDED"))
        with open(os.path.join(folder, "s", ODD_NAME), "rb") as f:
            assert f.read() == b"to stage"
    finally:
        models.close_database()


# ---------------------------------------------------------------------------
# An unreachable store
# ---------------------------------------------------------------------------

def _with_settings(sshd, store_dir, **changes):
    import settings

    text = config_text("sqlite:///:memory:", store_dir,
                       store_section=sshd.store_section("s", store_dir, **changes))
    return stores.StoreRegistry(settings.parse(text).stores).open(
        models.Store(name="s", ssh_host="127.0.0.1", path_prefix=store_dir))


@pytest.mark.parametrize("change, reason", [
    ({"ssh_port": "1"}, "connection refused"),
    ({"ssh_key": "KEY"}, "authentication failed"),
    ({"known_hosts": "EMPTY"}, "not found in known_hosts"),
])
def test_an_unreachable_store_names_store_host_and_reason(sshd, store_dir, tmp_path, change,
                                                          reason):
    other_key = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other_key)],
                   check=True)
    (tmp_path / "empty_known_hosts").write_text("")
    change = {k: {"KEY": str(other_key), "EMPTY": str(tmp_path / "empty_known_hosts")}.get(v, v)
              for k, v in change.items()}
    store = _with_settings(sshd, store_dir, **change)
    assert not store.is_reachable()
    with pytest.raises(stores.StoreUnreachable) as e:
        store.new_staging_dir()
    assert e.value.status == 503
    assert "store 's' on host 127.0.0.1" in e.value.message and reason in e.value.message


def test_an_unreachable_store_is_passed_over_for_uploads(local_and_remote, sshd):
    config_path, local = local_and_remote
    text = open(config_path).read().replace("ssh_port = %d" % sshd.port, "ssh_port = 1")
    open(config_path, "w").write(text)
    web = _app(config_path)
    try:
        reply = put(web, "x.dat", b"x" * 10, null_obsid="true").json
        assert reply["store_name"] == "local"
        msg = api(web, "initiate_offload", status=400, source_store_name="local",
                  dest_store_name="main")["message"]
        assert "not reachable" in msg
        form = web.get("/login").forms[0]
        form["authenticator"] = AUTH["admin"]
        form.submit(status=302)
        page = web.get("/connectivity").text
        assert "store &#039;main&#039; on host 127.0.0.1 port 1 is unreachable: connection " \
            "refused" in page
    finally:
        models.close_database()


def test_sshd_stopped_mid_upload_gives_a_clear_error_and_leaves_no_record(
        tmp_path, db_url, sshd):
    """A host of its own, killed (with its sessions) while the server writes
    a 256 MiB upload to it."""
    host, remote, config = _own_host(tmp_path, db_url, ssh_timeout="5")
    size = 256 << 20
    with open(config) as f:  # a single request of this size (bodies are held in memory)
        text = f.read().replace("[server]\n", "[server]\nmax_body_bytes = %d\n"
                                "buffered_body_bytes = %d\n" % (2 * size, 4 * size))
    with open(config, "w") as f:
        f.write(text)
    _app(config)
    models.close_database()
    srv = Server(config).start()
    result = {}

    def send():
        body = os.urandom(size)
        result["resp"] = requests.put(srv.url + "api/upload/big.dat", params={"null_obsid": "true"},
                                      data=body, headers=bearer())

    try:
        sender = threading.Thread(target=send)
        sender.start()
        staging = remote / ".staging"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            partial = [p for p in staging.glob("*/big.dat")] if staging.exists() else []
            if partial and partial[0].stat().st_size > 0:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the upload never reached the store")
        host.stop()
        sender.join(60)
        resp = result["resp"]
        assert resp.status_code == 503, resp.text
        message = resp.json()["message"]
        assert "store 'main' on host 127.0.0.1 port %d" % host.port in message
        assert "lost the connection" in message or "unreachable" in message
        with models.db.connection_context():
            assert models.File.select().count() == 0
            assert models.FileInstance.select().count() == 0
        assert store_contents(str(remote))[0] == set()
        # When the host is back, the same server reconnects (after a few seconds in
        # which it answers at once that the host is down)...
        host.start()

        def small_upload():
            return requests.put(srv.url + "api/upload/small.dat", params={"null_obsid": "true"},
                                data=b"small", headers=bearer())

        deadline = time.monotonic() + sshfs.RETRY_SECONDS + 10
        while (resp := small_upload()).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert resp.status_code == 201, resp.text
        # ... and its next start removes whatever the broken upload left.
        srv.stop()
        srv = Server(config).start()
        assert store_contents(str(remote)) == ({"small.dat"}, [])
    finally:
        srv.stop()
        host.stop()


# ---------------------------------------------------------------------------
# Copies between Librarians whose stores are on other hosts
# ---------------------------------------------------------------------------

def test_a_copy_between_two_librarians_with_remote_stores(tmp_path, sshd):
    """Sender and receiver both keep their store behind sshd; a directory
    and a flat file arrive with the sender's MD5s."""
    import test_copies

    servers = {}
    for name in ("receiver", "sender"):
        base = tmp_path / name
        remote = base / REMOTE
        remote.mkdir(parents=True)
        extra = ("[connection:receiver]\nurl = %s\nauthenticator = %s\n"
                 % (servers["receiver"][0].url, AUTH["writer"])) if name == "sender" else ""
        path = base / "librarian.ini"
        path.write_text(config_text("sqlite:///%s" % (base / "db.sqlite"), str(remote),
                                    port=free_port(), extra=extra,
                                    store_section=sshd.store_section("main", str(remote))))
        subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate",
                        "--config", str(path)], check=True, capture_output=True)
        servers[name] = (Server(str(path)).start(), remote)
    (sender, _), (receiver, receiver_dir) = servers["sender"], servers["receiver"]
    tree = tmp_path / "d.uv"
    (tree / "in 'it'").mkdir(parents=True)
    (tree / "in 'it'" / "x").write_bytes(b"x" * 5000)
    try:
        client = librarian_client.LibrarianClient(conn_config={
            "url": sender.url, "authenticator": AUTH["admin"]})
        client.upload(str(tree), ODD_DIR + "/d.uv", null_obsid=True)
        test_copies.put_bytes(sender, "f/" + ODD_NAME.replace('"', "%22"), b"flat" * 1000)
        for name in ("d.uv", ODD_NAME):
            assert test_copies.call(sender, "launch_file_copy", file_name=name,
                                    connection_name="receiver")["success"]
        test_copies.wait_for(lambda: len(test_copies.names_on(receiver)) == 2)
        assert shell_md5(str(receiver_dir / ODD_DIR / "d.uv")) == shell_md5(str(tree))
        with open(receiver_dir / "f" / ODD_NAME, "rb") as f:
            assert f.read() == b"flat" * 1000
        staging = receiver_dir / ".staging"
        # No bytes are left in the receiver's staging, only the empty issued folders
        # (removing a request's own staging folder follows the commit closely).
        test_copies.wait_for(lambda: all(not any(d.iterdir()) for d in staging.iterdir()), 10)
    finally:
        sender.stop()
        receiver.stop()


@pytest.fixture
def original_receiver(tmp_path, sshd):
    """A receiver that speaks only the original protocol (ours with its
    additions switched off), its store behind sshd, and a sender with a
    local store whose connection to it has SSH settings."""
    base = tmp_path / "receiver"
    remote = base / REMOTE
    remote.mkdir(parents=True)
    path = base / "librarian.ini"
    path.write_text(config_text("sqlite:///%s" % (base / "db.sqlite"), str(remote),
                                port=free_port(), store_section=sshd.store_section(
                                    "pot1", str(remote))).replace(
        "[server]\n", "[server]\nprotocol_additions = false\n", 1))
    subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate",
                    "--config", str(path)], check=True, capture_output=True)
    receiver = Server(str(path)).start()
    import test_copies

    sender, sender_dir = test_copies.make_librarian(
        tmp_path, "sender", extra="[connection:v1site]\nurl = %s\nauthenticator = %s\n"
        "ssh_user = %s\nssh_port = %d\nssh_key = %s\nknown_hosts = %s\n"
        % (receiver.url, AUTH["writer"], sshd.user, sshd.port, sshd.client_key,
           sshd.known_hosts))
    sender.start()
    yield sender, receiver, remote
    sender.stop()
    receiver.stop()


def test_a_copy_to_a_librarian_of_the_original_kind_goes_over_ssh(original_receiver, tmp_path):
    import test_copies

    sender, receiver, remote = original_receiver
    assert requests.put(receiver.url + "api/upload/x.dat", data=b"x", headers=bearer(),
                        timeout=10).status_code == 404  # no streamed upload there
    assert not librarian_client.LibrarianClient(conn_config={
        "url": receiver.url, "authenticator": AUTH["reader"]}).offers_streamed_upload()
    tree = tmp_path / "d.uv"
    (tree / "in 'it'").mkdir(parents=True)
    (tree / "in 'it'" / "x").write_bytes(b"x" * 5000)
    (tree / "empty").write_bytes(b"")
    client = librarian_client.LibrarianClient(conn_config={
        "url": sender.url, "authenticator": AUTH["admin"]})
    client.upload(str(tree), ODD_DIR + "/d.uv", null_obsid=True)
    test_copies.put_bytes(sender, "f/" + ODD_NAME.replace('"', "%22"), b"flat" * 1000)
    for name in ("d.uv", ODD_NAME):
        assert test_copies.call(sender, "launch_file_copy", who="writer", file_name=name,
                                connection_name="v1site")["success"]
    test_copies.wait_for(lambda: len(test_copies.names_on(receiver)) == 2)
    assert test_copies.files_on(receiver, {"name-is-exactly": "d.uv"}) == \
        test_copies.files_on(sender, {"name-is-exactly": "d.uv"})
    assert shell_md5(str(remote / ODD_DIR / "d.uv")) == shell_md5(str(tree))
    with open(remote / "f" / ODD_NAME, "rb") as f:
        assert f.read() == b"flat" * 1000
    base = sender.config_path.rsplit("/", 1)[0]
    finished = test_copies.wait_for(lambda: [
        p for t, p in test_copies.events(__import__("pathlib").Path(base), "d.uv")
        if t == "copy_finished"])
    assert finished[0]["error_code"] == 0 and finished[0]["connection_name"] == "v1site"
    # The receiver's issued staging folders were used and removed.
    assert [d for d in (remote / ".staging").iterdir() if any(d.iterdir())] == []


def test_a_copy_from_a_folder_prestaged_at_the_receiver_sends_no_bytes(original_receiver):
    import test_copies

    sender, receiver, remote = original_receiver
    test_copies.put_bytes(sender, "2458043/carried.dat", b"carried by disk")
    carried = remote / "incoming" / "disk 3"
    carried.mkdir(parents=True)
    (carried / "carried.dat").write_bytes(b"carried by disk")
    (carried / "other.dat").write_bytes(b"not this one")
    assert test_copies.call(sender, "launch_file_copy", who="writer", file_name="carried.dat",
                            connection_name="v1site", known_staging_store="pot1",
                            known_staging_subdir="incoming/disk 3")["success"]
    test_copies.wait_for(lambda: test_copies.names_on(receiver) == ["carried.dat"])
    assert (remote / "2458043" / "carried.dat").read_bytes() == b"carried by disk"
    assert sorted(os.listdir(carried)) == ["other.dat"]


@pytest.mark.parametrize("lie", [{"staging_dir": "ABS"}, {"path_prefix": "ABS", "staging_dir": "."},
                                 {"staging_dir": "../../x"}, {"ssh_host": "localhost"}])
def test_a_receiver_of_the_original_kind_cannot_send_our_bytes_elsewhere(tmp_path, sshd, lie):
    """Where the bytes go over SSH is the receiver's word: it may name
    only a staging folder under an absolute prefix, on a host the
    connection allows."""
    import http.server
    import json as json_mod

    import test_copies

    target = tmp_path / "not a staging folder"
    target.mkdir()
    reply = {"success": True, "name": "pot1", "ssh_host": "127.0.0.1",
             "path_prefix": str(tmp_path / "prefix"), "available": 1 << 30,
             "staging_dir": "staging.x"}
    reply.update({k: str(target) if v == "ABS" else v for k, v in lie.items()})

    class Liar(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = json_mod.dumps(reply if "initiate_upload" in self.path
                                  else {"success": True}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    liar = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Liar)
    threading.Thread(target=liar.serve_forever, daemon=True).start()
    sender, sender_dir = test_copies.make_librarian(
        tmp_path, "sender", extra="[connection:liar]\nurl = http://127.0.0.1:%d/\n"
        "authenticator = x\nssh_user = %s\nssh_port = %d\nssh_key = %s\nknown_hosts = %s\n"
        % (liar.server_port, sshd.user, sshd.port, sshd.client_key, sshd.known_hosts))
    sender.start()
    try:
        test_copies.put_bytes(sender, "payload.txt", b"ours")
        test_copies.call(sender, "launch_file_copy", who="writer", file_name="payload.txt",
                         connection_name="liar")
        [done] = test_copies.wait_for(lambda: [p for t, p in test_copies.events(
            sender_dir, "payload.txt") if t == "copy_finished"])
        assert done["error_code"] == 1
        assert any(w in done["error_message"] for w in (
            "not an absolute path", "ssh_hosts", "may not contain '..'", "not absolute",
            "must name a folder"))
        assert os.listdir(target) == [] and not (tmp_path / "x").exists()
    finally:
        sender.stop()
        liar.shutdown()


# ---------------------------------------------------------------------------
# What an adversarial pass found
# ---------------------------------------------------------------------------

def test_the_marker_name_is_reserved(web, store_dir):
    reply = put(web, "d/.librarian-destination", b"data", status=400, null_obsid="true").json
    assert "reserved" in reply["message"]
    assert store_contents(store_dir) == (set(), [])


def test_many_parallel_uploads_and_downloads_share_one_connection(server, store_dir):
    """More requests at once than OpenSSH's default MaxSessions (10) allows
    channels: they wait for a channel slot instead of failing."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = {"p%02d.dat" % i: os.urandom(3 << 20) for i in range(16)}

    def upload(name):
        return requests.put(server.url + "api/upload/par/" + name, data=bodies[name],
                            params={"null_obsid": "true"}, headers=bearer(), timeout=120)

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(upload, bodies))
    assert [r.status_code for r in replies] == [201] * 16, [r.text for r in replies]

    def download(name):
        return requests.get(server.url + "api/download/" + name, headers=bearer(), timeout=120)

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(download, bodies))
    assert all(r.status_code == 200 and r.content == bodies[n] for r, n in zip(got, bodies))
    assert store_contents(store_dir)[1] == []


def test_md5sum_longer_than_the_ssh_timeout_is_waited_for(tmp_path, db_url, sshd):
    """ssh_timeout bounds each network wait, not a command that runs long on
    the host (a 1 GiB file takes md5sum well over 0.3 s)."""
    remote, config = _remote_config(tmp_path, db_url, sshd, ssh_timeout="0.3")
    web = _app(config)
    try:
        big = remote / "big.dat"
        with open(big, "wb") as f:
            f.truncate(1 << 30)
        md5 = subprocess.run(["md5sum", str(big)], capture_output=True, text=True,
                             check=True).stdout.split()[0]
        api(web, "register_instances", store_name="main", null_obsid=True,
            file_info={str(big): {"size": 1 << 30, "md5": md5}})
        assert models.File.get_by_id("big.dat").md5 == md5
    finally:
        models.close_database()


def test_a_folder_holding_registered_files_cannot_be_registered(web, store_dir):
    put(web, "a b/c.dat", b"inside", null_obsid="true")
    folder = os.path.join(store_dir, "a b")
    size, md5 = librarian_client.path_md5(folder)
    msg = api(web, "register_instances", store_name="main", status=409, null_obsid=True,
              file_info={folder: {"size": size, "md5": md5}})["message"]
    assert "holds the registered file a b/c.dat" in msg
    assert models.FileInstance.select().count() == 1


@pytest.mark.parametrize("what", ["file", "directory"])
def test_a_rename_whose_reply_is_lost_is_settled_at_the_next_start(app, web, store_dir,
                                                                   monkeypatch, tmp_path, what):
    """The host renames the upload into place, then stops answering before
    saying so: the request fails (503) with no record, its commit intent
    is handed over, and the next settle moves the bytes back, so that the
    same upload then succeeds (no unregistered bytes in the way)."""
    import librarian

    real_rename = sshfs.SSHFS.rename_new

    def rename_then_go_quiet(fs, src, dst):
        real_rename(fs, src, dst)
        raise stores.StoreUnreachable("main", fs.conn.target, "it did not answer within 10 s")

    body, headers = b"lost reply", {}
    if what == "directory":
        tree = tmp_path / "tree"
        (tree / "sub").mkdir(parents=True)
        (tree / "a").write_bytes(b"alpha")
        (tree / "sub" / "b").write_bytes(b"beta")
        body, headers = tar_of(str(tree), "lost.dat"), {"X-Librarian-Directory": "tar"}
    monkeypatch.setattr(sshfs.SSHFS, "rename_new", rename_then_go_quiet)
    put(web, "n/lost.dat", body, status=503, null_obsid="true", headers=headers)
    monkeypatch.setattr(sshfs.SSHFS, "rename_new", real_rename)
    assert models.File.select().count() == 0
    with models.db.connection_context():
        librarian.settle_all(ctx())  # what the next start, or the periodic settle, does
    assert store_contents(store_dir) == (set(), [])
    assert put(web, "n/lost.dat", body, null_obsid="true", headers=headers).status_int == 201


def test_a_forged_marker_never_moves_registered_bytes(app, web, store_dir):
    """A two-step client can write into its staging folder; a marker naming
    a path inside a registered directory must not be acted on at start."""
    import librarian

    tree = os.path.join(str(store_dir), "..", "t.uv")
    os.makedirs(os.path.join(tree, "sub"))
    with open(os.path.join(tree, "sub", "f"), "wb") as f:
        f.write(b"registered")
    put(web, "t.uv", tar_of(tree, "t.uv"), null_obsid="true",
        headers={"X-Librarian-Directory": "tar"})
    staging = os.path.join(store_dir, api(web, "initiate_upload", upload_size=1)["staging_dir"])
    with open(os.path.join(staging, ".librarian-destination"), "w") as f:
        f.write("t.uv/sub/f")
    librarian.settle_all(ctx())
    with open(os.path.join(store_dir, "t.uv", "sub", "f"), "rb") as f:
        assert f.read() == b"registered"


def test_a_planted_marker_link_is_not_followed(web, store_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    rel = api(web, "initiate_upload", upload_size=4)["staging_dir"]
    staging = os.path.join(store_dir, rel)
    os.symlink(str(victim), os.path.join(staging, ".librarian-destination"))
    with open(os.path.join(staging, "m.dat"), "wb") as f:
        f.write(b"data")
    api(web, "complete_upload", store_name="main", staging_dir=rel,
        dest_store_path="m/m.dat", meta_mode="infer", null_obsid=True)
    assert victim.read_text() == "precious"
    assert open(os.path.join(store_dir, "m", "m.dat"), "rb").read() == b"data"


def test_complete_upload_refuses_a_staging_folder_swapped_for_a_link(web, store_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.dat").write_bytes(b"not from staging")
    rel = api(web, "initiate_upload", upload_size=4)["staging_dir"]
    staging = os.path.join(store_dir, rel)
    os.rmdir(staging)
    os.symlink(str(outside), staging)
    msg = api(web, "complete_upload", store_name="main", staging_dir=rel, status=400,
              dest_store_path="x.dat", meta_mode="infer", null_obsid=True)["message"]
    assert "not a folder of the staging area" in msg
    assert models.File.select().count() == 0 and (outside / "x.dat").exists()


def _store_behind(web, sshd, store_dir, port):
    """Point the configured store `main` at another port of 127.0.0.1."""
    import settings

    text = config_text("sqlite:///:memory:", store_dir, store_section=sshd.store_section(
        "main", store_dir, ssh_port=port))
    context = web.app.config["librarian.context"]
    context.stores.close()
    context.stores = stores.StoreRegistry(settings.parse(text).stores)


def test_an_unreachable_store_is_named_on_download_and_locate(web, sshd, store_dir):
    put(web, "u.dat", b"data", null_obsid="true")
    _store_behind(web, sshd, store_dir, 1)
    for reply in (web.get("/api/download/u.dat", headers=bearer(), status=503).json,
                  api(web, "locate_file_instance", file_name="u.dat", status=503)):
        assert "store 'main' on host 127.0.0.1 port 1 is unreachable: connection refused" \
            in reply["message"]


def test_an_offload_from_an_unreachable_store_waits_and_retries(local_and_remote, sshd,
                                                                store_dir):

    config_path, local = local_and_remote
    web = _app(config_path)
    try:
        models.Store.update(available=False).where(models.Store.name == "local").execute()
        put(web, "o.dat", b"offload me", null_obsid="true")
        _store_behind(web, sshd, store_dir, 1)
        api(web, "initiate_offload", source_store_name="main", dest_store_name="local")
        _run_tasks(web)
        task = the_task()
        assert (task.state, task.attempts) == ("pending", 1), task.last_error
        assert "unreachable" in task.last_error
    finally:
        models.close_database()


def test_a_host_that_never_answers_does_not_hold_up_uploads_elsewhere(local_and_remote):
    """The store `main` listens but never speaks SSH; after the first
    attempt, uploads (to the local store) never wait for it again."""
    import socket as socketlib

    config_path, local = local_and_remote
    silent = socketlib.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    text = open(config_path).read()
    port = text.split("ssh_port = ")[1].split("\n")[0]
    open(config_path, "w").write(text.replace("ssh_port = " + port, "ssh_port = %d"
                                              % silent.getsockname()[1])
                                 .replace("ssh_timeout = 10", "ssh_timeout = 2"))
    web = _app(config_path)
    try:
        put(web, "first.dat", b"1", null_obsid="true")  # pays for finding out
        started = time.monotonic()
        for i in range(3):
            assert put(web, "n%d.dat" % i, b"n", null_obsid="true").json["store_name"] == "local"
        assert time.monotonic() - started < 2, "each upload waited for the silent host"
    finally:
        models.close_database()
        silent.close()


def test_remote_errors_keep_their_errno():
    import errno

    e = sshfs.remote_error("writing x", b"sh: 1: cannot create x: No space left on device\n")
    assert e.errno == errno.ENOSPC
    assert sshfs.remote_error("mkdir", b"mkdir: cannot create directory: File exists").errno \
        == errno.EEXIST
    assert sshfs.remote_error("cat", b"something odd").errno is None


def test_a_large_file_streams_back_whole_and_in_ranges(web):
    """Files from SMALL_FILE_BYTES up are read through `cat` / `tail -c`."""
    body = os.urandom(sshfs.SMALL_FILE_BYTES + 123457)
    put(web, "big/large.dat", body, null_obsid="true")
    got = web.get("/api/download/large.dat", headers=bearer())
    assert got.body == body
    start = sshfs.SMALL_FILE_BYTES - 10
    part = web.get("/api/download/large.dat", headers=dict(bearer(), Range="bytes=%d-%d"
                                                           % (start, start + 99999)), status=206)
    assert part.body == body[start:start + 100000]
    tail = web.get("/api/download/large.dat", headers=dict(bearer(), Range="bytes=-7"),
                   status=206)
    assert tail.body == body[-7:]


# ---------------------------------------------------------------------------
# A host that stalls, refuses sessions, or has all of them busy
# ---------------------------------------------------------------------------

def _own_host(tmp_path, db_url, extra_config="", **settings):
    """An sshd of its own (which a test may stop or pause), and
    `_remote_config` on it."""
    from sshd import SSHServer

    need_sshd()
    host = SSHServer(tmp_path / "host", extra_config).start()
    return (host,) + _remote_config(tmp_path, db_url, host, **settings)


def test_a_stalled_host_is_dropped_after_the_ssh_timeout_and_comes_back(tmp_path, db_url):
    """sshd and its sessions stop (SIGSTOP) with the connection open: a
    request waits about ssh_timeout, then 503 naming the host; later ones
    fail at once, and so does a new connection's first (its port takes the
    connection but nothing answers); when the host goes on, the store
    works again."""
    host, remote, config = _own_host(tmp_path, db_url, ssh_timeout="3")
    web = _app(config)
    try:
        put(web, "s.dat", b"stalls", null_obsid="true")
        host.pause()
        started = time.monotonic()
        reply = web.get("/api/download/s.dat", headers=bearer(), status=503).json
        assert time.monotonic() - started < 9
        stalled = "store 'main' on host 127.0.0.1 port %d is unreachable: it did not answer " \
            "within 3 s" % host.port
        assert stalled in reply["message"]
        started = time.monotonic()
        assert stalled in web.get("/api/download/s.dat", headers=bearer(), status=503).json[
            "message"]
        assert time.monotonic() - started < 1, "a request waited for a host known to be down"
        time.sleep(sshfs.RETRY_SECONDS + 4)  # a reconnection has met the silent port
        assert stalled in web.get("/api/download/s.dat", headers=bearer(), status=503).json[
            "message"]
        host.pause(False)
        deadline = time.monotonic() + sshfs.RETRY_SECONDS + 10
        while (got := web.get("/api/download/s.dat", headers=bearer(), expect_errors=True)) \
                .status_int == 503 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert got.status_int == 200 and got.body == b"stalls"
    finally:
        models.close_database()
        host.stop()


def test_a_host_that_stalls_during_a_command_is_dropped(tmp_path, db_url):
    """A command may run long, but the host must still answer: sshd stops
    while md5sum runs on it, and the wait ends about two ssh_timeouts
    later with the reason."""
    import settings
    from sshd import _descendants

    host, remote, config = _own_host(tmp_path, db_url, ssh_timeout="2")
    store = stores.StoreRegistry(settings.load(config).stores).open(
        models.Store(name="main", ssh_host="127.0.0.1", path_prefix=str(remote)))
    big = remote / "big.dat"
    with open(big, "wb") as f:
        f.truncate(4 << 30)  # md5sum takes seconds
    failure = []

    def checksum():
        try:
            store.fs.path_info(str(big))
        except Exception as e:
            failure.append(e)

    def md5sum_running():
        for pid in _descendants(host.proc.pid):
            try:
                with open("/proc/%d/comm" % pid) as f:
                    if f.read().strip() == "md5sum":
                        return True
            except OSError:
                pass
        return False

    worker = threading.Thread(target=checksum)
    try:
        worker.start()
        deadline = time.monotonic() + 20
        while not md5sum_running() and worker.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert md5sum_running(), "md5sum never ran on the host"
        host.pause()
        started = time.monotonic()
        worker.join(15)
        assert not worker.is_alive(), "the command's wait never ended"
        assert time.monotonic() - started < 8
        assert isinstance(failure[0], stores.StoreUnreachable), failure
        assert "port %d is unreachable: it did not answer within 2 s" % host.port \
            in failure[0].message
    finally:
        host.stop()
        worker.join(15)


def test_readers_holding_every_session_make_others_busy_not_stuck(sshd, store_dir):
    """Downloads to clients that stopped reading hold their sessions; other
    uses of the store wait at most ssh_timeout for one, then 503."""
    store = _with_settings(sshd, store_dir, ssh_timeout="3")
    path = os.path.join(store_dir, "big.dat")
    with open(path, "wb") as f:
        f.write(os.urandom(2 * sshfs.READ_WINDOW_BYTES))  # more than a channel holds unread
    readers = [store.fs.open(path, "rb") for _ in range(sshfs.SSHConnection.MAX_CHANNELS)]
    try:
        for r in readers:
            assert len(r.read(1)) == 1
        started = time.monotonic()
        with pytest.raises(models.LibrarianError) as e:
            store.fs.lstat(path)
        assert 3 <= time.monotonic() - started < 9
        assert e.value.status == 503
        assert "store 's' on host 127.0.0.1 is busy: all 8 of its SSH sessions are in use" \
            in e.value.message
    finally:
        for r in readers:
            r.close()
    assert store.fs.lstat(path).st_size == 2 * sshfs.READ_WINDOW_BYTES


def test_a_started_tar_stream_waits_for_a_session_instead_of_breaking(sshd, store_dir):
    """Once a directory's tar has sent its first bytes, a member that finds
    every session busy waits (longer than ssh_timeout) for one: a 503 is
    no longer possible, and failing would cut the body short."""
    import io
    import tarfile

    store = _with_settings(sshd, store_dir, ssh_timeout="2")  # (a loaded machine connects slowly)
    tree = os.path.join(store_dir, "d.uv")
    os.makedirs(os.path.join(tree, "sub"))
    contents = {"a": b"alpha", "sub/b": os.urandom(sshfs.SMALL_FILE_BYTES + 5)}
    for rel, data in contents.items():
        with open(os.path.join(tree, rel), "wb") as f:
            f.write(data)
    big = os.path.join(store_dir, "big.dat")
    with open(big, "wb") as f:
        f.write(os.urandom(2 * sshfs.READ_WINDOW_BYTES))
    chunks = stores.iter_tar(store.fs, tree, "d.uv")
    body = [next(chunks)]  # what a download sends before answering
    readers = [store.fs.open(big, "rb") for _ in range(sshfs.SSHConnection.MAX_CHANNELS)]
    for r in readers:
        r.read(1)

    def free_sessions():
        for r in readers:
            r.close()

    release = threading.Timer(4.5, free_sessions)
    release.start()
    started = time.monotonic()
    try:
        body.extend(chunks)
    finally:
        release.join()
    assert time.monotonic() - started >= 4, "the stream never had to wait"
    with tarfile.open(fileobj=io.BytesIO(b"".join(body))) as tar:
        got = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    assert got == {"d.uv/" + rel: data for rel, data in contents.items()}


def test_a_host_allowing_fewer_sessions_than_we_use_only_slows_us(tmp_path, db_url):
    """sshd with MaxSessions 4 (the server uses up to 8 channels): refused
    sessions are asked for again as others end, and every operation of 16
    at once succeeds."""
    from concurrent.futures import ThreadPoolExecutor

    import settings

    host, remote, config = _own_host(tmp_path, db_url, extra_config="MaxSessions 4\n",
                                     ssh_timeout="30")
    store = stores.StoreRegistry(settings.load(config).stores).open(
        models.Store(name="main", ssh_host="127.0.0.1", path_prefix=str(remote)))
    bodies = [os.urandom(sshfs.SMALL_FILE_BYTES + i) for i in range(16)]

    def roundtrip(i):
        path = posixpath.join(str(remote), "f%02d.dat" % i)
        with store.fs.open(path, "xb") as f:
            f.write(bodies[i])
        size, md5 = store.fs.path_info(path)
        with store.fs.open(path, "rb") as f:
            back = f.read()
        return size, md5, back

    try:
        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(roundtrip, range(16)))
        for body, (size, md5, back) in zip(bodies, results):
            assert (size, md5) == (len(body), md5_of(body))
            assert back == body
    finally:
        host.stop()


def test_a_directory_whose_bytes_changed_is_not_served(web, store_dir, tmp_path, caplog):
    tree = tmp_path / "t.uv"
    tree.mkdir()
    (tree / "a.bin").write_bytes(b"v" * 1000)
    (tree / "b.bin").write_bytes(b"h" * 10)
    put(web, "t.uv", tar_of(str(tree), "t.uv"), null_obsid="true",
        headers={"X-Librarian-Directory": "tar"})
    member = os.path.join(store_dir, "t.uv", "a.bin")
    os.chmod(member, 0o644)
    os.truncate(member, 10)
    reply = web.get("/api/download/t.uv", headers=bearer(), status=400)
    assert "has no good instance here: the one on store main is corrupt" in reply.json["message"]
    assert "t.uv holds 20 bytes, not the 1010 of its record" in caplog.text
    assert models.FileInstance.get().verify_result == "corrupt"


@pytest.mark.parametrize("size", [10, sshfs.SMALL_FILE_BYTES + 10])
def test_a_stream_that_cannot_start_is_an_error_of_the_request(web, store_dir, caplog, size):
    """The bytes on the store are shorter than their record: the download
    fails before any byte (a 400 naming the instance found corrupt), not as
    a 200 cut short."""
    put(web, "short.dat", os.urandom(size), null_obsid="true")
    path = os.path.join(store_dir, "short.dat")
    os.chmod(path, 0o644)
    os.truncate(path, 0)
    reply = web.get("/api/download/short.dat", headers=bearer(), status=400)
    assert "the one on store main is corrupt" in reply.json["message"]
    assert "short.dat holds fewer bytes than its record" in caplog.text


def test_the_scrub_verifies_and_finds_a_flipped_byte_on_the_remote_store(web, store_dir, tmp_path):
    """A file and a directory on the store behind sshd: read whole over SFTP
    and found good; then a byte flipped in a file of the directory is found,
    and its download is cut short."""
    import integrity

    put(web, "flat.dat", b"flat bytes " * 5000, null_obsid="true")
    tree = tmp_path / "t.uv"
    (tree / "sub").mkdir(parents=True)
    (tree / "sub" / "vis").write_bytes(os.urandom(3 << 20))
    (tree / "header").write_bytes(b"header")
    put(web, "t.uv", tar_of(str(tree), "t.uv"), headers={"X-Librarian-Directory": "tar"},
        null_obsid="true")
    store = models.Store.get()
    models.FileInstance.update(verified_at=None).execute()  # due (verified at ingest)
    count, _, more = integrity.scrub(ctx(), store)
    assert (count, more) == (2, False)
    assert [i.verify_result for i in models.FileInstance.select()] == ["ok", "ok"]
    vis = os.path.join(store_dir, "t.uv", "sub", "vis")
    os.chmod(vis, 0o644)
    with open(vis, "r+b") as f:
        f.seek(1 << 20)
        f.write(b"\0\1\2")
    from errors import Corrupt

    with pytest.raises(Corrupt):  # the stream breaks off (a real server closes the connection)
        web.get("/api/download/t.uv", headers=bearer())
    inst = models.FileInstance.get(models.FileInstance.file == "t.uv")
    assert inst.verify_result == "corrupt"
    result = integrity.verify_instance(ctx(), models.FileInstance.get(
        models.FileInstance.file == "flat.dat"), how="test")
    assert (result["ok"], result["size"]) == (True, len(b"flat bytes " * 5000))
