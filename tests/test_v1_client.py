"""The client that sites have deployed, unmodified, against our server.

`hera-librarian==0.1.6` (PyPI, 2018; Python 2 only) is installed into its
own virtualenv (`.venv-v1client/`, built on first use from
`tests/v1client-requirements.txt`, so that it never shadows our client),
and each of its scripts is run as a pipeline runs it: reading
`~/.hl_client.cfg`, uploading with `rsync` over `ssh` to the store host the
server names. The server's stores are on the tests' sshd; the `ssh` on the
scripts' PATH reaches it, and drops `-c arcfour256`, a cipher that the
deployed client asks for and OpenSSH removed in 2017 (see README).

Every script's output and effect is checked (records, bytes, events), on
SQLite and on PostgreSQL.
"""

import glob
import hashlib
import json
import os
import pwd
import shutil
import stat
import subprocess
import sys

import pytest
import requests

from conftest import (AUTH, MIRIAD, ROOT, UVH5, Server, config_text, free_port, need_data,
                      pg_schema)
from reference import miriad_reference, shell_md5, shell_size, uvh5_reference
from test_copies import wait_for

VENV = os.path.join(ROOT, ".venv-v1client")
REQUIREMENTS = os.path.join(ROOT, "tests", "v1client-requirements.txt")
PYTHON2_CANDIDATES = ["python2.7", "python2"]


# ---------------------------------------------------------------------------
# The deployed client, in its own virtualenv
# ---------------------------------------------------------------------------

def find_python2():
    """A Python 2.7 interpreter ($LIBRARIAN_TEST_PYTHON2, PATH, pyenv), or None."""
    candidates = [os.environ.get("LIBRARIAN_TEST_PYTHON2")]
    candidates += [shutil.which(name) for name in PYTHON2_CANDIDATES]
    for root in (os.environ.get("PYENV_ROOT"), os.path.expanduser("~/.pyenv"),
                 os.path.join(pwd.getpwuid(os.getuid()).pw_dir, ".pyenv")):
        if root:
            candidates += sorted(glob.glob(os.path.join(root, "versions/2.7*/bin/python2.7")))
    candidates += ["/usr/bin/python2.7"]
    for path in filter(None, candidates):
        try:
            out = subprocess.run([path, "-c", "import sys; print(sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30).stdout
        except OSError:
            continue
        if out.strip() == "(2, 7)":
            return path
    return None


def ensure_v1_client():
    """The virtualenv holding hera-librarian 0.1.6, built if missing or if
    its requirements changed, by one test process at a time (the others
    wait: tests run side by side). Skips (fails under CI) without Python 2.7."""
    import fcntl

    with open(VENV + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _ensure_v1_client()


def _ensure_v1_client():
    with open(REQUIREMENTS, "rb") as f:
        stamp = hashlib.sha256(f.read()).hexdigest()
    marker = os.path.join(VENV, ".requirements-sha256")
    if os.path.exists(marker) and open(marker).read() == stamp:
        return VENV
    python2 = find_python2()
    if python2 is None:
        message = ("the deployed client (hera-librarian 0.1.6) needs Python 2.7, which was not "
                   "found (set LIBRARIAN_TEST_PYTHON2)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    shutil.rmtree(VENV, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "virtualenv", "-q", "-p", python2, VENV], check=True)
    subprocess.run([os.path.join(VENV, "bin", "pip"), "install", "-q", "--disable-pip-version-check",
                    "-r", REQUIREMENTS], check=True)
    with open(marker, "w") as f:
        f.write(stamp)
    return VENV


SSH_WRAPPER = """#!%(python)s
# The `ssh` the deployed client finds: it reaches the tests' sshd, and drops
# "-c arcfour256" (the client's rsync asks for a cipher OpenSSH no longer has).
import os, sys
args, out = sys.argv[1:], []
while args:
    a = args.pop(0)
    if a == "-c" and args and args[0] == "arcfour256":
        args.pop(0)
        continue
    out.append(a)
os.execv(%(ssh)r, [%(ssh)r, "-p", %(port)r, "-i", %(key)r, "-l", %(user)r,
                   "-o", "UserKnownHostsFile=" + %(known)r, "-o", "StrictHostKeyChecking=yes",
                   "-o", "BatchMode=yes"] + out)
"""


# ---------------------------------------------------------------------------
# A site: our server with a store behind sshd, and a second Librarian
# ---------------------------------------------------------------------------

class Site:
    """Our server (stores `pot1` behind sshd and `pot2` on this host, local
    staging, a connection `peer` to a second Librarian), and the way to run
    the deployed client's scripts against it."""

    def __init__(self, base, db_url, sshd, venv):
        self.base, self.venv, self.sshd = base, venv, sshd
        self.pot1, self.pot2 = os.path.join(base, "pot1"), os.path.join(base, "pot2")
        self.lustre = os.path.join(base, "lustre")
        for d in (self.pot1, self.pot2, self.lustre):
            os.makedirs(d)
        peer_base = os.path.join(base, "peer")
        os.makedirs(os.path.join(peer_base, "store"))
        peer_cfg = os.path.join(peer_base, "librarian.ini")
        with open(peer_cfg, "w") as f:
            f.write(config_text("sqlite:///%s/db.sqlite" % peer_base,
                                os.path.join(peer_base, "store"), port=free_port()))
        subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate",
                        "--config", peer_cfg], check=True, capture_output=True)
        self.peer = Server(peer_cfg)
        self.peer_store = os.path.join(peer_base, "store")
        # pot2 takes no uploads: the client would have to reach this host's
        # own sshd for it (offload fills it).
        stores = (sshd.store_section("pot1", self.pot1)
                  + "[store:pot2]\npath_prefix = %s\navailable = false\n\n" % self.pot2)
        extra = ("[staging]\ndest_prefix = %s\n\n[connection:peer]\nurl = %s\n"
                 "authenticator = %s\n" % (self.lustre, self.peer.url, AUTH["writer"]))
        self.config = os.path.join(base, "librarian.ini")
        with open(self.config, "w") as f:
            f.write(config_text(db_url, self.pot1, port=free_port(), extra=extra,
                                store_section=stores).replace(
                "[server]\n", "[server]\ntask_retry_seconds = 1\n", 1))
        subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate",
                        "--config", self.config], check=True, capture_output=True)
        self.server = Server(self.config)
        self.home = os.path.join(base, "home")
        self.bin = os.path.join(base, "bin")
        os.makedirs(self.home)
        os.makedirs(self.bin)
        with open(os.path.join(self.home, ".hl_client.cfg"), "w") as f:
            json.dump({"connections": {
                "site": {"url": self.server.url, "authenticator": AUTH["admin"]},
                "reader": {"url": self.server.url, "authenticator": AUTH["reader"]},
                "peer": {"url": self.peer.url, "authenticator": AUTH["admin"]}}}, f)
        wrapper = os.path.join(self.bin, "ssh")
        with open(wrapper, "w") as f:
            f.write(SSH_WRAPPER % {"python": sys.executable, "ssh": shutil.which("ssh"),
                                   "port": str(sshd.port), "key": sshd.client_key,
                                   "user": sshd.user, "known": sshd.known_hosts})
        os.chmod(wrapper, 0o755)

    def start(self):
        self.peer.start()
        self.server.start()
        return self

    def stop(self):
        self.server.stop()
        self.peer.stop()

    def run(self, script, *args, stdin=None, check=True):
        """Run one of the deployed client's scripts as a pipeline would;
        returns the CompletedProcess (text)."""
        env = {"HOME": self.home, "PATH": os.pathsep.join(
            [self.bin, os.path.join(self.venv, "bin"), os.environ.get("PATH", "")]),
            "LANG": "C.UTF-8"}
        proc = subprocess.run([os.path.join(self.venv, "bin", "python"),
                               os.path.join(self.venv, "bin", script)] + list(args),
                              input=stdin, capture_output=True, text=True, env=env, timeout=300,
                              cwd=self.base)
        if check and proc.returncode != 0:
            raise AssertionError("%s failed (%d):\n%s\n%s" % (script, proc.returncode,
                                                             proc.stdout, proc.stderr))
        return proc

    def call(self, operation, server=None, **args):
        resp = requests.post((server or self.server).url + "api/" + operation, json=args,
                             headers={"Authorization": "Bearer " + AUTH["admin"]}, timeout=60)
        return resp.json()

    def files(self, search, server=None):
        return self.call("search", server=server, search=json.dumps(search),
                         output_format="file-listing-json")["results"]

    def instances(self, name):
        return self.call("search", search=json.dumps({"name-is-exactly": name}),
                         output_format="instance-listing-json")["results"]

    def events(self, name):
        """[(type, payload)] of a file's events, oldest first."""
        import sqlite3

        import settings

        url = settings.load(self.config).database["url"]
        query = "SELECT type, payload FROM file_event WHERE name = %s ORDER BY id"
        if url.startswith("sqlite"):
            with sqlite3.connect(url[len("sqlite:///"):]) as conn:
                rows = conn.execute(query.replace("%s", "?"), (name,)).fetchall()
        else:
            import psycopg2

            conn = psycopg2.connect(url)
            with conn, conn.cursor() as cur:
                cur.execute(query, (name,))
                rows = cur.fetchall()
            conn.close()
        return [(t, json.loads(p)) for t, p in rows]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def site(request, tmp_path_factory, sshd):
    venv = ensure_v1_client()
    base = str(tmp_path_factory.mktemp("v1site"))
    if request.param == "sqlite":
        db_url = "sqlite:///%s/librarian.db" % base
    else:
        db_url, _, conn = pg_schema(request.getfixturevalue("pg_database"))
        conn.close()  # the schema goes with the run's database
    s = Site(base, db_url, sshd, venv).start()
    yield s
    s.stop()


# ---------------------------------------------------------------------------
# Uploads
# ---------------------------------------------------------------------------

def test_upload_infers_both_sample_data_sets(site):
    need_data()
    for local, dest, reference in (
            (UVH5, "2458432/zen.2458432.34569.uvh5", uvh5_reference(UVH5)),
            (MIRIAD, "2458043/zen.2458043.12552.xx.HH.uvA", miriad_reference(MIRIAD))):
        proc = site.run("upload_to_librarian.py", "site", local, dest)
        assert proc.stderr == ""
        name = os.path.basename(dest)
        [record] = site.files({"name-is-exactly": name})
        assert (record["size"], record["md5"], record["obsid"]) == (
            shell_size(local), shell_md5(local), reference["obsid"])
        assert shell_md5(os.path.join(site.pot1, dest)) == shell_md5(local)
        [inst] = site.instances(name)
        assert (inst["store_name"], inst["parent_dirs"], inst["deletion_policy"]) == (
            "pot1", os.path.dirname(dest), "disallowed")
        assert [t for t, _ in site.events(name)] == ["create_instance"]
    assert os.listdir(os.path.join(site.pot1, ".staging")) == []
    [obs] = site.call("search", search='{"obsid-is-exactly": 1192201262}',
                      output_format="obs-listing-json")["results"]
    assert obs["start_time_jd"] == pytest.approx(miriad_reference(MIRIAD)["start_time_jd"],
                                                 abs=1e-9)


def test_upload_with_records_on_stdin_uses_them(site, tmp_path):
    data = b"calibration solutions\n"
    local = tmp_path / "zen.2458100.1.cal"
    local.write_bytes(data)
    md5 = hashlib.md5(data).hexdigest()
    records = {
        "sessions": {"1198000000": {"id": 1198000000, "start_time_jd": 2458100.0,
                                    "stop_time_jd": 2458100.4}},
        "observations": {"1198000000": {"obsid": 1198000000, "start_time_jd": 2458100.0,
                                        "stop_time_jd": 2458100.01, "start_lst_hr": 3.25,
                                        "session_id": 1198000000}},
        "files": {"zen.2458100.1.cal": {"name": "zen.2458100.1.cal", "type": "cal",
                                        "create_time": 1512345678, "obsid": 1198000000,
                                        "size": len(data), "md5": md5}}}
    site.run("upload_to_librarian.py", "--meta=json-stdin", "--deletion=allowed", "site",
             str(local), "cal/zen.2458100.1.cal", stdin=json.dumps(records))
    [record] = site.files({"name-is-exactly": "zen.2458100.1.cal"})
    assert record == dict(records["files"]["zen.2458100.1.cal"])
    assert site.instances("zen.2458100.1.cal")[0]["deletion_policy"] == "allowed"
    [obs] = site.call("search", search='{"obsid-is-exactly": 1198000000}',
                      output_format="obs-listing-json")["results"]
    assert obs["session_id"] == 1198000000 and obs["start_lst_hr"] == 3.25
    # Records whose checksum the bytes do not match: refused, with the reason.
    records["files"] = {"zen.2458100.2.cal": dict(records["files"]["zen.2458100.1.cal"],
                                                  name="zen.2458100.2.cal", md5="0" * 32)}
    (tmp_path / "zen.2458100.2.cal").write_bytes(data)
    proc = site.run("upload_to_librarian.py", "--meta=json-stdin", "site",
                    str(tmp_path / "zen.2458100.2.cal"), "cal/zen.2458100.2.cal",
                    stdin=json.dumps(records), check=False)
    assert proc.returncode == 1 and "do not match its record" in proc.stderr
    assert site.instances("zen.2458100.2.cal") == []


def test_pre_staged_upload_takes_one_file_and_leaves_the_folder(site):
    folder = os.path.join(site.pot1, "incoming", "2458101")
    os.makedirs(folder)
    for i in range(3):
        with open(os.path.join(folder, "zen.2458101.%d.flags" % i), "wb") as f:
            f.write(b"flags %d" % i)
    with open(os.path.join(folder, "transfer.log"), "wb") as f:
        f.write(b"carried on disk 12")
    for i in range(2):
        name = "zen.2458101.%d.flags" % i
        site.run("upload_to_librarian.py", "--pre-staged", "pot1:incoming/2458101",
                 "--null-obsid", "site", os.path.join(folder, name), "2458101/" + name)
        with open(os.path.join(site.pot1, "2458101", name), "rb") as f:
            assert f.read() == b"flags %d" % i
    assert sorted(os.listdir(folder)) == ["transfer.log", "zen.2458101.2.flags"]
    assert [i["store_name"] for i in site.instances("zen.2458101.0.flags")] == ["pot1"]


def test_add_obs_registers_files_already_on_the_store(site):
    need_data()
    place = os.path.join(site.pot1, "registered", "zen.2458432.34569.uvh5.copy.uvh5")
    os.makedirs(os.path.dirname(place))
    shutil.copy(UVH5, place)
    proc = site.run("add_obs_librarian.py", "site", "pot1", place)
    assert "Registering with Librarian." in proc.stdout
    [record] = site.files({"name-is-exactly": "zen.2458432.34569.uvh5.copy.uvh5"})
    assert (record["obsid"], record["md5"]) == (1225829886, shell_md5(UVH5))
    [inst] = site.instances("zen.2458432.34569.uvh5.copy.uvh5")
    assert inst["full_path_on_store"] == place
    # A file without an obsid: 0.1.6 cannot say null_obsid, so it gets the reason.
    notes = os.path.join(site.pot1, "registered", "notes.txt")
    with open(notes, "w") as f:
        f.write("no observation\n")
    proc = site.run("add_obs_librarian.py", "site", "pot1", notes, check=False)
    assert proc.returncode == 1 and "null_obsid" in proc.stderr
    assert site.files({"name-is-exactly": "notes.txt"}) == []


# ---------------------------------------------------------------------------
# Catalogue operations
# ---------------------------------------------------------------------------

def upload_flag(site, tmp_path, name, data=b"flag"):
    local = tmp_path / name
    local.write_bytes(data)
    site.run("upload_to_librarian.py", "--null-obsid", "site", str(local), "flags/" + name)


def test_add_file_event_records_the_payload(site, tmp_path):
    upload_flag(site, tmp_path, "ev.flag")
    site.run("add_librarian_file_event.py", "site", "/some/where/ev.flag", "rtp_processed",
             "score=0.75", 'label="good"', "antennas=[1,2,3]")
    [(kind, payload)] = [e for e in site.events("ev.flag") if e[0] == "rtp_processed"]
    assert payload == {"score": 0.75, "label": "good", "antennas": [1, 2, 3]}
    proc = site.run("add_librarian_file_event.py", "reader", "ev.flag", "t", "x=1", check=False)
    assert proc.returncode == 1 and "event creation failed" in proc.stderr \
        and "read-append" in proc.stderr


def test_locate_prints_the_scp_ready_location(site, tmp_path):
    upload_flag(site, tmp_path, "where.flag")
    proc = site.run("librarian_locate_file.py", "reader", "where.flag")
    assert proc.stdout.strip() == "127.0.0.1:%s/flags/where.flag" % site.pot1
    proc = site.run("librarian_locate_file.py", "reader", "nowhere.flag", check=False)
    assert proc.returncode == 1 and "no file named 'nowhere.flag'" in proc.stderr


def test_assign_sessions_prints_the_new_sessions(site):
    need_data()
    if not site.files({"name-is-exactly": "zen.2458432.34569.uvh5"}):
        site.run("upload_to_librarian.py", "site", UVH5, "2458432/zen.2458432.34569.uvh5")
    proc = site.run("librarian_assign_sessions.py", "--min-start-jd", "2458400", "site")
    lines = proc.stdout.splitlines()
    assert lines[0] == "New sessions created:"
    assert lines[1].startswith("  1225829886: start JD 2458432.") and "n_obs 1" in lines[1]
    proc = site.run("librarian_assign_sessions.py", "--min-start-jd", "2458400", "site")
    assert proc.stdout.strip() == "No new sessions created."


def test_deletion_policy_and_delete_files(site, tmp_path):
    upload_flag(site, tmp_path, "del.me.flag")
    upload_flag(site, tmp_path, "keep.me.flag")
    site.run("librarian_set_file_deletion_policy.py", "site", "del.me.flag", "allowed")
    assert site.instances("del.me.flag")[0]["deletion_policy"] == "allowed"
    assert [t for t, _ in site.events("del.me.flag")][-1] == "instance_deletion_policy_changed"
    query = '{"name-matches": "%.me.flag"}'
    # The sole copy of a file is not deleted; once the peer holds a copy, it may be.
    proc = site.run("librarian_delete_files.py", "--noop", "site", query)
    assert "del.me.flag: todelete=0 kept=1 error=0" in proc.stdout
    site.run("launch_librarian_copy.py", "site", "peer", "del.me.flag")
    wait_for(lambda: site.call("search", search='{"has-remote-instance-at": "peer"}',
                               output_format="file-listing-json")["results"], 120)
    proc = site.run("librarian_delete_files.py", "--noop", "site", query)
    assert "No-op mode enabled" in proc.stdout
    assert "del.me.flag: todelete=1 kept=0 error=0" in proc.stdout
    assert "keep.me.flag: todelete=0 kept=1 error=0" in proc.stdout
    assert os.path.exists(os.path.join(site.pot1, "flags", "del.me.flag"))
    proc = site.run("librarian_delete_files.py", "site", query)
    assert "2 files were matched, 2 had instances; 1 instances were deleted" in proc.stdout
    assert site.instances("del.me.flag") == []
    assert not os.path.exists(os.path.join(site.pot1, "flags", "del.me.flag"))
    assert os.path.exists(os.path.join(site.pot1, "flags", "keep.me.flag"))
    assert [t for t, _ in site.events("del.me.flag")][-1] == "delete_instance"


def test_initiate_offload_moves_the_sole_copies(site, tmp_path):
    upload_flag(site, tmp_path, "move.me.flag", b"to be offloaded")
    site.call("set_one_file_deletion_policy", file_name="move.me.flag",
              deletion_policy="disallowed")
    proc = site.run("librarian_initiate_offload.py", "site", "pot1", "pot2")
    assert proc.stdout.startswith("Task launched, intending to offload ")
    count = int(proc.stdout.split("offload ")[1].split()[0])
    assert count == len(site.files({"num-instances-is-exactly": 1}))
    wait_for(lambda: "pot2" in [i["store_name"] for i in site.instances("move.me.flag")], 120)
    with open(os.path.join(site.pot2, "flags", "move.me.flag"), "rb") as f:
        assert f.read() == b"to be offloaded"
    proc = site.run("librarian_initiate_offload.py", "site", "pot2", "pot2", check=False)
    assert proc.returncode == 1 and "same store" in proc.stderr


def test_launch_copy_reaches_the_other_librarian(site, tmp_path):
    upload_flag(site, tmp_path, "travel.flag", b"from the site")
    site.run("launch_librarian_copy.py", "site", "peer", "travel.flag",
             "--dest", "arrived/travel.flag")
    there = wait_for(lambda: site.files({"name-is-exactly": "travel.flag",
                                         "num-instances-greater-than": 0}, server=site.peer))
    assert there == site.files({"name-is-exactly": "travel.flag"})
    with open(os.path.join(site.peer_store, "arrived", "travel.flag"), "rb") as f:
        assert f.read() == b"from the site"
    finished = wait_for(lambda: [p for t, p in site.events("travel.flag")
                                 if t == "copy_finished"])
    assert finished[0]["error_code"] == 0 and finished[0]["connection_name"] == "peer"
    proc = site.run("launch_librarian_copy.py", "site", "nowhere", "travel.flag", check=False)
    assert proc.returncode == 1 and "no connection named 'nowhere'" in proc.stderr


def test_stage_files_waits_and_finds_the_copies(site, tmp_path):
    upload_flag(site, tmp_path, "stage.a.flag", b"aa")
    upload_flag(site, tmp_path, "stage.b.flag", b"bbb")
    dest = os.path.join(site.lustre, "ann", "run1")
    os.makedirs(dest)
    proc = site.run("librarian_stage_files.py", "--wait", "site", dest,
                    '{"name-matches": "stage.%.flag"}')
    assert "Launched operation to stage 2 instances (5 bytes) to %s" % dest in proc.stdout
    assert "Staging completed successfully" in proc.stdout
    with open(os.path.join(dest, "flags", "stage.b.flag"), "rb") as f:
        assert f.read() == b"bbb"
    assert os.stat(os.path.join(dest, "flags")).st_mode & stat.S_ISGID
    outside = str(tmp_path / "elsewhere")
    os.makedirs(outside)
    proc = site.run("librarian_stage_files.py", "site", outside, "{}", check=False)
    assert proc.returncode == 1 and "not a folder inside the staging area" in proc.stderr


SEARCH_SCRIPT = """
import json, sys
import hera_librarian
client = hera_librarian.LibrarianClient("reader")
out = {}
out["files"] = client.search_files('{"name-like": "zen.%.34569.uvh5"}')["results"]
out["obs"] = client.search_observations('{"obsid-is-exactly": 1225829886}')["results"]
out["instances"] = client.search_instances('{"name-is-exactly": "zen.2458432.34569.uvh5"}')[
    "results"]
out["sessions"] = client.search_sessions('{"session-id-is-exactly": 1225829886}')["results"]
out["describe"] = client.describe_session_without_event("admin", "never_done")
try:
    client.search_files('{"colour-is": "blue"}')
except hera_librarian.RPCError as e:
    out["error"] = e.message
json.dump(out, sys.stdout)
"""


def test_the_client_library_searches_as_pipelines_do(site, tmp_path):
    need_data()
    if not site.files({"name-is-exactly": "zen.2458432.34569.uvh5"}):
        site.run("upload_to_librarian.py", "site", UVH5, "2458432/zen.2458432.34569.uvh5")
    site.call("assign_observing_sessions")
    # Other tests of this module (in whatever order they ran here) add sessions;
    # every one has files from the admin source, so the earliest is described.
    sessions = site.call("search", search='{"always-true": 0}',
                         output_format="session-listing-json")["results"]
    earliest = min(sessions, key=lambda s: s["start_time_jd"])["id"]
    script = tmp_path / "search.py"
    script.write_text(SEARCH_SCRIPT)
    out = json.loads(site.run(str(script)).stdout)
    assert [f["name"] for f in out["files"]] == ["zen.2458432.34569.uvh5"]
    assert out["files"][0]["md5"] == shell_md5(UVH5)
    assert out["obs"][0]["start_time_jd"] == pytest.approx(
        uvh5_reference(UVH5)["start_time_jd"], abs=1e-9)
    assert out["instances"][0]["full_path_on_store"] == os.path.join(
        site.pot1, "2458432", "zen.2458432.34569.uvh5")
    assert out["sessions"][0]["id"] == 1225829886
    assert out["describe"]["any_matching"] is True
    assert out["describe"]["session_id"] == earliest
    assert "unknown clause 'colour-is'" in out["error"]
