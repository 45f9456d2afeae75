"""Fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL is the server on 127.0.0.1:5432 (override with
`LIBRARIAN_TEST_PG`, a `postgresql://USER@HOST:PORT` URL). The suite creates
one database per run and a fresh schema per test, and drops them at the end.
When PostgreSQL is unreachable its tests are skipped, except under CI (`CI`
set), where they fail.
"""

import http.server
import json
import os
import socket
import subprocess
import threading
import sys
import time
import uuid

import pytest
import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import librarian  # noqa: E402
import models  # noqa: E402
import settings  # noqa: E402

DATA = os.environ.get("LIBRARIAN_TEST_DATA") or os.path.normpath(
    os.path.join(ROOT, "..", "shared", "data"))
MIRIAD = os.path.join(DATA, "zen.2458043.12552.xx.HH.uvA")
UVH5 = os.path.join(DATA, "zen.2458432.34569.uvh5")
PG_BASE = os.environ.get("LIBRARIAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432")

# The test sources' authenticators: in the form the server issues (checked by
# a keyed hash in microseconds), so that no test pays Argon2 for its sources;
# a test marked `chosen_secrets` gets CHOSEN instead (secrets a person chose,
# Argon2-hashed), and AUTH says those for that test.
AUTH = {name: "lib_" + ("%s-test-authenticator-" % name).ljust(43, "x")
        for name in ("admin", "reader", "appender", "writer")}
CHOSEN = {name: name + "-secret" for name in AUTH}
LEVEL = {"admin": "admin", "reader": "read-only", "appender": "read-append",
         "writer": "read-write"}


def need_data():
    """Skip (with a clear reason) when the sample data sets are absent."""
    if not (os.path.isdir(MIRIAD) and os.path.isfile(UVH5)):
        pytest.skip("sample data sets not found in %s (give their folder as "
                    "$LIBRARIAN_TEST_DATA)" % DATA)


# ---------------------------------------------------------------------------
# Databases
# ---------------------------------------------------------------------------

def _pg_admin():
    import psycopg2

    conn = psycopg2.connect(PG_BASE + "/postgres", connect_timeout=5)
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def pg_database():
    """Name of a PostgreSQL database made for this run, or skip/fail."""
    try:
        conn = _pg_admin()
    except Exception as e:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL at %s is unreachable under CI: %s" % (PG_BASE, e))
        pytest.skip("PostgreSQL at %s is unreachable: %s" % (PG_BASE, e))
    name = "librarian_test_%s" % uuid.uuid4().hex[:10]
    with conn.cursor() as cur:
        cur.execute("CREATE DATABASE %s" % name)
    yield name
    with conn.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
    conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A URL of an empty database: a SQLite file, or a fresh PostgreSQL
    schema (selected with `search_path`)."""
    if request.param == "sqlite":
        yield "sqlite:///%s" % (tmp_path / "librarian.db")
        return
    dbname = request.getfixturevalue("pg_database")
    url, schema, conn = pg_schema(dbname)
    yield url
    models.close_database()
    with conn.cursor() as cur:
        cur.execute("DROP SCHEMA %s CASCADE" % schema)
    conn.close()


def pg_schema(dbname):
    """A fresh schema in the run's PostgreSQL database `dbname`: (its URL,
    its name, an autocommit connection to the database)."""
    import psycopg2

    schema = "t_%s" % uuid.uuid4().hex[:12]
    conn = psycopg2.connect("%s/%s" % (PG_BASE, dbname))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("CREATE SCHEMA %s" % schema)
    return "%s/%s?options=-csearch_path%%3D%s" % (PG_BASE, dbname, schema), schema, conn


# ---------------------------------------------------------------------------
# Configuration and app
# ---------------------------------------------------------------------------

def config_text(db_url, store_dir, port=21106, extra="", store_section=None):
    """A configuration with the test sources and one store: `[store:main]`
    at `store_dir`, or the given `store_section` text instead."""
    sources = "".join("[source:%s]\nauthenticator = %s\nlevel = %s\n\n"
                      % (name, AUTH[name], LEVEL[name]) for name in AUTH)
    if store_section is None:
        store_section = "[store:main]\npath_prefix = %s\n\n" % store_dir
    return ("[server]\nport = %d\nsecret_key = test-secret\ndisplayed_site_name = Test\n"
            "threads = 8\nlog_level = WARNING\n\n[database]\nurl = %s\n\n%s%s%s"
            % (port, db_url, store_section, sources, extra))


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's client keeps its unfinished uploads (`UploadMemo`) apart."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def store_dir(tmp_path):
    path = tmp_path / "store"
    path.mkdir()
    return str(path)


@pytest.fixture
def config_path(request, tmp_path, db_url, store_dir, monkeypatch):
    if request.node.get_closest_marker("chosen_secrets"):
        for name, secret in CHOSEN.items():
            monkeypatch.setitem(AUTH, name, secret)
    path = tmp_path / "librarian.ini"
    path.write_text(config_text(db_url, store_dir, port=free_port()))
    return str(path)


_contexts = []


def ctx():
    """The context (settings, stores) of the app the running test made with
    the `app` fixture, for calls that a route or a task handler would make."""
    return _contexts[-1]


@pytest.fixture
def app(config_path):
    """The migrated, started Bottle app on a fresh database."""
    config = settings.load(config_path)
    application = librarian.setup(config)
    _contexts.append(application.config["librarian.context"])
    with models.db.connection_context():
        librarian.migration_router().run()
    librarian.startup(application)
    yield application
    _contexts.pop().close()
    models.close_database()


@pytest.fixture
def web(app):
    """A WebTest client of the app."""
    import webtest

    return webtest.TestApp(app)


def api(web, operation, auth="admin", status=200, **args):
    """POST an operation in the existing protocol's form; returns the reply."""
    payload = dict(args)
    if auth is not None:
        payload["authenticator"] = AUTH.get(auth, auth)
    import json

    resp = web.post("/api/" + operation, {"request": json.dumps(payload)}, status=status)
    return resp.json


def web_login(web, authenticator, next="/", status=302):
    """Log `web` in through the login form (which carries its CSRF token)."""
    form = web.get("/login").forms[0]
    form["authenticator"] = authenticator
    form["next"] = next
    return form.submit(status=status)


def add_user(config_path, name, capsys, level="read-append"):
    """`librarian.py add-user NAME` on the test's configuration; returns the
    authenticator it printed."""
    models.db.close()
    assert librarian.main(["add-user", name, "--level", level, "--config", config_path]) == 0
    return capsys.readouterr().out.strip().splitlines()[-1]


def bearer(who="admin"):
    return {"Authorization": "Bearer " + AUTH.get(who, who)}


# ---------------------------------------------------------------------------
# Real servers
# ---------------------------------------------------------------------------

def need_sshd():
    """Skip (fail under CI) when OpenSSH's sshd is not installed."""
    from sshd import find_sshd

    if find_sshd() is None:
        if os.environ.get("CI"):
            pytest.fail("OpenSSH's sshd is not installed (.ci/run installs openssh-server)")
        pytest.skip("OpenSSH's sshd is not installed (Debian: apt install openssh-server)")


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on a loopback port (tests/sshd.py), shared by
    the run; skipped when sshd is not installed, except under CI."""
    from sshd import SSHServer

    need_sshd()
    server = SSHServer(tmp_path_factory.mktemp("sshd")).start()
    yield server
    server.stop()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PortTaken(RuntimeError):
    """The server could not listen: its port was taken meanwhile."""


class Server:
    """A `librarian.py serve` child process on a free loopback port (another
    one if a test beside took it first)."""

    def __init__(self, config_path, env=None):
        self.config_path = config_path
        self.env = dict(os.environ, **(env or {}))
        self.port = settings.load(config_path).server["port"]
        self.url = "http://127.0.0.1:%d/" % self.port
        self.proc = None

    def start(self):
        for _ in range(3):
            try:
                return self._start()
            except PortTaken:  # another test, side by side, took the free port first
                text = open(self.config_path).read().replace(
                    "port = %d\n" % self.port, "port = %d\n" % free_port(), 1)
                open(self.config_path, "w").write(text)
                self.port = settings.load(self.config_path).server["port"]
                self.url = "http://127.0.0.1:%d/" % self.port
        return self._start()

    def _start(self):
        self.log = open(self.config_path + ".log", "ab")
        self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "librarian.py"),
                                      "serve", "--config", self.config_path],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.close()
                output = open(self.config_path + ".log").read()
                if "Address already in use" in output:
                    raise PortTaken(output)
                raise RuntimeError("server exited: %s" % output)
            try:
                requests.get(self.url, timeout=1)
                return self
            except requests.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def server(app, config_path):
    """A real server on the same (migrated) database as `app`."""
    if not models.db.is_closed():
        models.db.close()
    srv = Server(config_path).start()
    yield srv
    srv.stop()


@pytest.fixture
def client_config(tmp_path, server):
    """Path of a `~/.hl_client.cfg`-style file with connections to `server`
    as each test source."""
    import json

    path = tmp_path / "hl_client.cfg"
    path.write_text(json.dumps({"connections": {
        who: {"url": server.url, "authenticator": AUTH[who]} for who in AUTH}}))
    return str(path)


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------

class QueryCounter:
    """Counts the SQL statements Peewee executes inside a `with` block (it
    logs each one at DEBUG on the 'peewee' logger)."""

    def __enter__(self):
        import logging

        self.count = 0
        counter = self

        class Handler(logging.Handler):
            def emit(self, record):
                counter.count += 1

        self.handler = Handler(logging.DEBUG)
        self.logger = logging.getLogger("peewee")
        self.old_level = self.logger.level
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.old_level)


class WebhookReceiver:
    """A webhook receiver on a loopback port: keeps each JSON body POSTed."""

    def __init__(self):
        self.bodies = []
        bodies = self.bodies

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/hook" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, kind, seconds=10):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = [b for b in self.bodies if b["kind"] == kind]
            if found:
                return found
            time.sleep(0.05)
        raise AssertionError("no %s alert in %r" % (kind, self.bodies))


@pytest.fixture
def hook():
    """A webhook receiver for alerts (`WebhookReceiver`)."""
    receiver = WebhookReceiver()
    yield receiver
    receiver.server.shutdown()


# The periodic checks every server queues at its start.
PERIODIC = ("scrub", "confirm_remote_instances", "rolling_deletion", "reconcile")


def the_task():
    """The one task a test made (the periodic checks left out)."""
    import tasks

    return tasks.Task.get(tasks.Task.kind.not_in(PERIODIC))


def store_contents(store_dir):
    """Relative paths of everything under a store outside its staging area,
    and the staging area's entries."""
    found, staging = set(), []
    for dirpath, dirnames, filenames in os.walk(store_dir):
        rel = os.path.relpath(dirpath, store_dir)
        if rel == ".staging":
            staging.extend(dirnames + filenames)
            dirnames[:] = []
            continue
        for name in filenames:
            found.add(os.path.normpath(os.path.join(rel, name)))
    return found, staging
