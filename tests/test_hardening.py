"""Bad input, odd file systems and malformed data: each a clear 4xx that
leaves the catalogue and the disks in agreement."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest

import models
from conftest import AUTH, ctx, MIRIAD, ROOT, UVH5, api, bearer, need_data, store_contents
from reference import shell_size


def put(web, path, body=b"abc", status=201, headers=None, **query):
    query.setdefault("null_obsid", "true")
    url = "/api/upload/%s?%s" % (path, "&".join("%s=%s" % kv for kv in query.items()))
    return web.put(url, body, headers=dict(bearer(), **(headers or {})), status=status,
                   content_type="application/octet-stream").json


def tar_bytes(members):
    """A tar of (name, bytes or None for a folder) pairs."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


TAR = {"X-Librarian-Directory": "tar"}


def test_upload_inside_a_registered_directory_or_file_is_refused(web, store_dir):
    put(web, "t/d1", tar_bytes([("d1/a", b"a"), ("d1/sub/b", b"b")]), headers=TAR)
    before = store_contents(store_dir)
    for path in ("t/d1/inner.txt", "t/d1/sub/inner2.txt"):
        reply = put(web, path, status=409)
        assert "inside the registered file t/d1" in reply["message"]
    put(web, "t/flat.txt")
    assert "inside the registered file t/flat.txt" in put(web, "t/flat.txt/under.txt",
                                                          status=409)["message"]
    assert store_contents(store_dir)[0] == before[0] | {"t/flat.txt"}


def test_unregistered_file_in_the_way_is_a_clear_conflict(web, store_dir):
    os.makedirs(os.path.join(store_dir, "u"))
    with open(os.path.join(store_dir, "u", "plain"), "wb") as f:
        f.write(b"x")
    reply = put(web, "u/plain/x.txt", status=409)
    assert "is a file on store" in reply["message"]
    assert models.File.select().count() == 0


@pytest.mark.parametrize("members,message", [
    ([("flat1.dat", b"x" * 1400)], "is a file, but a directory upload needs a folder"),
    ([("flat1.dat/a", b"a"), ("flat1.dat/a/b", b"b")], "a file and a folder of the same name"),
])
def test_tar_whose_shape_is_not_a_directory_is_refused(web, store_dir, members, message):
    reply = put(web, "tt/flat1.dat", tar_bytes(members), status=400, headers=TAR)
    assert message in reply["message"]
    assert models.File.select().count() == 0
    assert store_contents(store_dir) == (set(), [])


def test_sparse_tar_members_are_refused(web, store_dir):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("sp.dat/huge")
        info.type = tarfile.GNUTYPE_SPARSE
        info.size = 0
        tar.addfile(info)
    reply = put(web, "sp.dat", buf.getvalue(), status=400, headers=TAR)
    assert "tar member" in reply["message"]
    assert store_contents(store_dir) == (set(), [])


def test_registered_trees_may_not_hold_symlinks(web, store_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside data")
    tree = os.path.join(store_dir, "reg", "dirlink")
    os.makedirs(tree)
    with open(os.path.join(tree, "a"), "w") as f:
        f.write("a")
    os.symlink(secret, os.path.join(tree, "s"))
    from librarian_client import path_md5

    size, md5 = path_md5(tree)
    reply = api(web, "register_instances", status=400, store_name="main", null_obsid=True,
                file_info={tree: {"size": size, "md5": md5, "type": ""}})
    assert "is a link or special file" in reply["message"]

    staging = api(web, "initiate_upload", upload_size=10)["staging_dir"]
    shutil.copytree(tree, os.path.join(store_dir, staging, "d2"), symlinks=True)
    reply = api(web, "complete_upload", status=400, store_name="main", staging_dir=staging,
                dest_store_path="d2", meta_mode="infer", null_obsid=True)
    assert "is a link or special file" in reply["message"]
    assert models.File.select().count() == 0


def test_fifo_is_refused_without_reading_it(web, store_dir):
    fifo = os.path.join(store_dir, "fifo")
    os.mkfifo(fifo)
    reply = api(web, "register_instances", status=400, store_name="main", null_obsid=True,
                file_info={fifo: {"size": 0, "md5": "d41d8cd98f00b204e9800998ecf8427e"}})
    assert "is a link or special file" in reply["message"]


def test_store_path_through_a_link_into_staging_is_refused(web, store_dir):
    os.makedirs(os.path.join(store_dir, ".staging"), exist_ok=True)
    os.symlink(".staging", os.path.join(store_dir, "stlink"))
    reply = put(web, "stlink/st1.txt", status=400)
    assert "passes through a link" in reply["message"]
    assert models.File.select().count() == 0


def test_staging_cleanup_never_changes_modes_through_links(app, web, store_dir, tmp_path):
    import librarian

    protected = tmp_path / "protected"
    protected.mkdir(mode=0o700)
    leftover = os.path.join(store_dir, ".staging", "leftover")
    os.makedirs(leftover)
    os.symlink(protected, os.path.join(leftover, "lnk"))
    put(web, "kept.txt")
    final = os.path.join(store_dir, "kept.txt")
    os.link(final, os.path.join(leftover, "hardlinked"))
    librarian.startup(app)
    assert os.stat(protected).st_mode & 0o777 == 0o700
    assert os.stat(final).st_mode & 0o777 == 0o444
    assert os.listdir(os.path.join(store_dir, ".staging")) == []


def test_malformed_miriad_header_is_a_400_and_the_server_lives_on(web, store_dir, tmp_path):
    need_data()
    bad = tmp_path / "bad.uv"
    shutil.copytree(MIRIAD, bad)
    os.chmod(bad / "header", 0o644)
    (bad / "header").write_bytes(bytes(range(256)))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(bad, arcname="bad.uv")
    reply = put(web, "2458043/bad.uv", buf.getvalue(), status=400, headers=TAR,
                null_obsid="false")
    assert "MIRIAD" in reply["message"] and "null_obsid" in reply["message"]
    assert store_contents(store_dir) == (set(), [])
    # As in the original, a data set that cannot be read has no obsid.
    reply = put(web, "2458043/bad.uv", buf.getvalue(), headers=TAR, null_obsid="true")
    assert reply["obsid"] is None and reply["size"] == shell_size(str(bad))
    with open(UVH5, "rb") as f:
        assert put(web, "zen.2458432.34569.uvh5", f.read(), null_obsid="false")["obsid"] \
            == 1225829886


@pytest.mark.parametrize("times", [[float("nan")], [1e300], [-1e9]])
def test_uvh5_with_impossible_times_is_a_400(web, store_dir, tmp_path, times):
    import h5py

    path = tmp_path / "zen.bad.uvh5"
    with h5py.File(path, "w") as f:
        f["Header/time_array"] = times
    reply = put(web, "zen.bad.uvh5", path.read_bytes(), status=400, null_obsid="false")
    assert "zen.bad.uvh5" in reply["message"]
    assert models.File.select().count() == 0


@pytest.mark.parametrize("raw,message", [
    ("[" * 100000, "nested too deeply"),
    ('{"authenticator": "admin-secret", "upload_size": NaN}', "not valid JSON"),
    ('{"authenticator": "admin-secret", "upload_size": 1e400}', "must be an integer"),
    ('{"authenticator": "admin-secret", "upload_size": 99999999999999999999}',
     "out of the 64-bit integer range"),
    ('{"authenticator": "admin-secret", "upload_size": 1, "files": {"x": "size"}}',
     "file x must be an object"),
    ('{"authenticator": "admin-secret", "upload_size": 1, "sessions": {"x": ["id"]}}',
     "session x must be an object"),
    ('{"authenticator": "admin-secret", "upload_size": 1, "files": {"x": {"name": "x", '
     '"type": "t", "create_time": 99999999999999999, "obsid": null, "size": 1, '
     '"md5": "d41d8cd98f00b204e9800998ecf8427e"}}}', "create_time out of range"),
    ('{"authenticator": "admin-secret", "upload_size": 1, "sessions": {"1": {"id": 6, '
     '"start_time_jd": 2459000.5, "stop_time_jd": 2459000.4}}}', "not a valid session"),
])
def test_malformed_payloads_are_400_not_500(web, raw, message):
    raw = raw.replace("admin-secret", AUTH["admin"])
    resp = web.post("/api/initiate_upload", {"request": raw}, status=400)
    assert message in resp.json["message"]
    assert models.File.select().count() == models.ObservingSession.select().count() == 0


@pytest.mark.parametrize("value,message", [("\ud800", "not valid Unicode"),
                                           ("a\u0000b", "NUL character")])
def test_bad_text_arguments_are_refused(web, value, message):
    reply = api(web, "locate_file_instance", status=400, file_name=value)
    assert message in reply["message"]


def test_event_payload_may_use_any_key(web):
    put(web, "ev.txt")
    api(web, "create_file_event", file_name="ev.txt", type="note",
        payload={"type": "x", "file_name": "y", "cls": 1})
    event = models.FileEvent.get(models.FileEvent.type == "note")
    assert json.loads(event.payload) == {"type": "x", "file_name": "y", "cls": 1}
    assert "1 to 64 characters" in api(web, "create_file_event", status=400, file_name="ev.txt",
                               type="t" * 65, payload={})["message"]


@pytest.mark.parametrize("path,message", [("a%0Ab.txt", "control characters"),
                                          ("x/file." + "t" * 40, "longer than 32")])
def test_names_with_control_characters_or_long_types_are_refused(web, store_dir, path, message):
    assert message in put(web, path, status=400)["message"]
    assert store_contents(store_dir) == (set(), [])


def test_unknown_upload_query_arguments_and_directory_kinds_are_refused(web, store_dir):
    assert "unknown query argument MD5" in put(web, "q.txt", status=400,
                                               MD5="0" * 32)["message"]
    reply = put(web, "q.txt", status=400, headers={"X-Librarian-Directory": "zip"})
    assert "must be 'tar'" in reply["message"]
    assert store_contents(store_dir) == (set(), [])


UNPRIVILEGED = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all"]


@pytest.fixture
def public_dir():
    """A directory other users can enter (pytest's own are private)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="librarian-test-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_directory_upload_works_for_a_server_that_is_not_root(public_dir):
    """Linux needs write permission on a directory to move it into another
    parent; the store must manage that without root's override."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run the store as an unprivileged user")
    probe = subprocess.run(UNPRIVILEGED + [sys.executable, "-c", "import sys; sys.path.insert("
                                            "0, %r); import models, stores" % ROOT],
                           capture_output=True, text=True, cwd=public_dir)
    if probe.returncode != 0:
        pytest.skip("an unprivileged user cannot run this checkout (is it in a private folder, "
                    "such as mktemp's?): %s" % probe.stderr.strip().splitlines()[-1:])
    store = os.path.join(public_dir, "store")
    os.mkdir(store)
    shutil.chown(store, 65534, 65534)
    script = (
        "import io, os, sys, tarfile; sys.path.insert(0, %r)\n"
        "import models, stores\n"
        "models.bind_database('sqlite:///:memory:'); models.db.create_tables(models.ALL_MODELS)\n"
        "row = models.Store.create(name='s', ssh_host='localhost', path_prefix=%r)\n"
        "st = stores.StoreRegistry({}).open(row)\n"
        "staging = st.new_staging_dir()\n"
        "os.makedirs(os.path.join(staging, 'd.uv', 'sub'))\n"
        "open(os.path.join(staging, 'd.uv', 'sub', 'f'), 'w').write('x')\n"
        "final = st.move_into_place(os.path.join(staging, 'd.uv'), 'a/b/d.uv', readonly=True)\n"
        "print(oct(os.stat(final).st_mode & 0o777), oct(os.stat(final + '/sub/f').st_mode & 0o777))\n"
        "st.delete('a/b/d.uv', lambda: True); print(os.path.exists(final))\n" % (ROOT, store))
    out = subprocess.run(UNPRIVILEGED + [sys.executable, "-c", script],
                         capture_output=True, text=True, cwd=public_dir)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0o555", "0o444", "False"]


def test_a_move_interrupted_before_commit_is_undone_at_start(app, web, store_dir):
    """A crash between moving bytes into place and committing their record
    leaves an intent; start-up moves the bytes back out of the final path,
    and a client's file back into its issued folder."""
    import librarian
    from stores import intents
    from test_v1_compat import dead_process

    store = ctx().open_store(models.Store.get())
    # An issued staging directory (two-step protocol) and a request's own.
    issued_rel = api(web, "initiate_upload", upload_size=3)["staging_dir"]
    issued = os.path.join(store_dir, issued_rel)
    with open(os.path.join(issued, "two.txt"), "wb") as f:
        f.write(b"two")
    own = store.new_staging_dir()
    with open(os.path.join(own, "one.txt"), "wb") as f:
        f.write(b"one")
    # What the registrations would do just before their commit, then "crash".
    dead = dead_process()
    private = store.new_staging_dir("take", origin=issued_rel + "/two.txt")
    two = store.take(issued, "two.txt", private)[0]
    for staged, path in ((two, "x/two.txt"), (os.path.join(own, "one.txt"), "x/one.txt")):
        intents.begin("commit", store.row, staging=staged, store_path=path)
        store.move_into_place(staged, path)
    models.StoreIntent.update(owner=dead).execute()
    assert store_contents(store_dir)[0] == {"x/one.txt", "x/two.txt"}

    librarian.startup(app)
    files, staging = store_contents(store_dir)
    assert files == set()
    assert staging == [os.path.basename(issued)]
    assert os.listdir(issued) == ["two.txt"]
    # The two-step upload can now be completed as if nothing had happened.
    api(web, "complete_upload", store_name="main", staging_dir=issued_rel,
        dest_store_path="x/two.txt", meta_mode="infer", null_obsid=True)
    assert store_contents(store_dir)[0] == {"x/two.txt"}


def test_registered_bytes_are_left_alone_by_start_up(app, web, store_dir):
    import librarian

    put(web, "y/kept.txt")
    marker_dir = os.path.join(store_dir, ".staging", "crashed-after-commit")
    os.makedirs(marker_dir)
    with open(os.path.join(marker_dir, ".librarian-destination"), "w") as f:
        f.write("y/kept.txt")
    librarian.startup(app)
    assert store_contents(store_dir) == ({"y/kept.txt"}, [])
