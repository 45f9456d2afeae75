"""Adopting an original (v1) Librarian: its database (`adopt-v1`), checked
through the API, re-run after `kill -9`, and its configuration file
(`adopt-v1-config`), loaded and served. The v1 databases are built here
from V1-SITE.md's schema (tests/v1site.py), on SQLite and PostgreSQL."""

import calendar
import datetime
import hashlib
import html
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest
import requests

import adopt
import librarian
import models
import settings
import v1site
from conftest import AUTH, PG_BASE, ROOT, Server, api, config_text, free_port, web_login

T0 = datetime.datetime(2017, 10, 23, 5, 14, 32)
EVENT_TIME = datetime.datetime(2017, 10, 23, 5, 20, 1, 123456)   # v1 events keep microseconds
MD5 = "3b2b3e55b8a4a8eb9d1d2ba4dbd0e7f0"
EMPTY_MD5 = "d41d8cd98f00b204e9800998ecf8427e"


class V1Site:
    """A v1 database: a SQLite file, or a schema of the run's PostgreSQL
    database; `url` names it as the original's configuration would."""

    def __init__(self, kind, tmp_path, request):
        self.kind = kind
        if kind == "sqlite":
            self.path = str(tmp_path / "v1.sqlite")
            self.conn = sqlite3.connect(self.path)
            self.url, self.param = "sqlite:///" + self.path, "?"
        else:
            import psycopg2

            dbname = request.getfixturevalue("pg_database")
            self.schema = "v1_%s" % uuid.uuid4().hex[:12]
            self.conn = psycopg2.connect("%s/%s" % (PG_BASE, dbname))
            with self.conn, self.conn.cursor() as cur:
                cur.execute("CREATE SCHEMA %s" % self.schema)
                cur.execute("SET search_path = %s" % self.schema)
            self.url = ("%s/%s?options=-csearch_path%%3D%s"
                        % (PG_BASE.replace("postgresql://", "postgresql+psycopg2://"), dbname,
                           self.schema))
            self.param = "%s"
        cur = self.conn.cursor()
        v1site.create(cur)
        self.conn.commit()

    def fill(self, tables):
        cur = self.conn.cursor()
        for table, rows in tables.items():
            v1site.insert(cur, table, rows, self.param)
        self.conn.commit()

    def execute(self, sql):
        cur = self.conn.cursor()
        cur.execute(sql)
        self.conn.commit()

    def fingerprint(self):
        """Something that changes if anything in the v1 database does."""
        if self.kind == "sqlite":
            with open(self.path, "rb") as f:
                return hashlib.sha256(f.read()).hexdigest(), os.listdir(os.path.dirname(
                    self.path))
        cur = self.conn.cursor()
        out = []
        for table in v1site.COLUMNS:
            cur.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY t::text)) "
                        "FROM %s t" % table)
            out.append(cur.fetchone())
        self.conn.rollback()
        return out

    def close(self):
        self.conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def v1(request, tmp_path):
    site = V1Site(request.param, tmp_path, request)
    yield site
    site.close()


def v1_time(dt, kind):
    """A time as the v1 database holds it: SQLAlchemy's text on SQLite."""
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f") if kind == "sqlite" else dt


def awkward_rows(kind):
    """A small v1 catalogue with every kind of row that needs care."""
    t = lambda dt: v1_time(dt, kind)  # noqa: E731
    sec = datetime.timedelta(seconds=1)
    return {
        "store": [(1, "pot1", "pot1.karoo", "/data/pot1", "http://pot1.karoo/data", True),
                  (2, "nrao", "nrao.example.org", "/lustre/hera", None, False),
                  (3, "bad store", "x", "/x", None, True),             # refused: name
                  (4, "main", "oldhost", "/old/main", None, True)],    # matched by name
        "observing_session": [(1192201262, 2458043.1, 2458043.2),
                              (1192300000, 2458044.1, 2458044.2),     # no observations
                              (1192400000, 2458045.2, 2458045.1)],    # refused: times
        "observation": [
            (1192201262, 2458043.12552, 2458043.13285, 18.12896, 1192201262),
            (1192201900, 2458043.13, 2458043.14, 18.3, 1192201262),
            (1225829886, 2458432.34569, None, None, None),
            (1192400100, 2458045.15, 2458045.16, 3.0, 1192400000),    # session refused
            (1192500000, 2458046.5, 2458046.4, 1.0, None)],           # refused: times
        "file": [
            ("zen.2458043.12552.xx.HH.uvA", "uvA", t(T0), 1192201262, 983251, MD5, "RTP"),
            ("zen.2458043.13000.xx.HH.uvA", "uvA", t(T0 + sec), 1192201900, 5 * 2**40, MD5,
             "RTP"),
            ("zen.2458432.34569.uvh5", "uvh5", t(T0 + 2 * sec), 1225829886, 224073, MD5,
             "correlator"),
            ("notes.txt", "txt", t(T0 + 3 * sec), None, 0, EMPTY_MD5, "HumanUser"),
            ("backup.pgdump", "pgdump", t(T0 + 4 * sec), None, 12, MD5.upper(), "ops"),
            ("zen.2458045.15000.uv", "uv", t(T0), 1192400100, 1, MD5, "RTP"),
            ("bad/name.uv", "uv", t(T0), None, 1, MD5, "RTP"),                 # refused
            ("badmd5.uv", "uv", t(T0), None, 1, "xyz", "RTP"),                 # refused
            ("zen.2458046.5.uv", "uv", t(T0), 1192500000, 1, MD5, "RTP")],     # refused
        "file_instance": [
            (1, "2458043", "zen.2458043.12552.xx.HH.uvA", 0),
            (2, "2458043", "zen.2458043.12552.xx.HH.uvA", 1),
            (4, "2458432", "zen.2458432.34569.uvh5", 1),
            (1, "", "notes.txt", 0),
            (3, "x", "backup.pgdump", 0),                           # refused: store
            (1, "2458046", "zen.2458046.5.uv", 0),                  # refused: file
            (1, "y", "zen.2458043.13000.xx.HH.uvA", 7)],            # refused: policy
        "file_event": [
            (10, "zen.2458043.12552.xx.HH.uvA", t(EVENT_TIME), "create_instance",
             '{"store_name": "pot1"}'),
            (11, "zen.2458043.12552.xx.HH.uvA", t(T0), "json_null", "null"),
            (12, "zen.2458043.12552.xx.HH.uvA", t(T0), "json_list", "[1, 2, 3]"),
            (13, "zen.2458043.12552.xx.HH.uvA", t(T0), "json_string", '"just text"'),
            (14, "zen.2458043.12552.xx.HH.uvA", t(T0), "not_json", "rtp: done\tOK"),
            (15, "zen.2458043.12552.xx.HH.uvA", t(T0), "unicode",
             '{"note": "caf\u00e9 \u2603 \u65e5\u672c"}'),
            (16, "notes.txt", t(T0), "sql_null", None),
            (17, "bad/name.uv", t(T0), "orphan", "{}"),                        # refused
            (1000, "zen.2458432.34569.uvh5", t(T0), "rtp_notified", "{}")],
        "standing_order": [(1, "to-nrao", '{"name-matches": "zen.%"}', "nrao"),
                           (2, "order with spaces", "{}", "nrao"),             # refused
                           (3, "badsearch", '{"colour-is": "blue"}', "nrao")],  # refused
    }


def run_adoption(v1_url, config_path, capsys, *extra):
    """`librarian.py adopt-v1` in this process: (exit status, JSON report)."""
    models.close_database()
    status = librarian.main(["adopt-v1", "--from", v1_url, "--config", config_path, "--json",
                             "--no-progress"] + list(extra))
    out = capsys.readouterr().out
    return status, json.loads(out) if out else None


def reasons(report, table, kind="refused"):
    return {json.dumps(r["row"], sort_keys=True): r["reason"]
            for r in report["tables"][table][kind + "_rows"]}


def login(web):
    web_login(web, AUTH["admin"])


def test_adoption_takes_every_table_and_the_api_sees_it(v1, app, web, config_path, store_dir,
                                                         capsys):
    v1.fill(awkward_rows(v1.kind))
    before = v1.fingerprint()
    status, report = run_adoption(v1.url, config_path, capsys)
    assert status == 1 and not report["complete"] and report["warnings"] == []
    assert report["revision"] == "464899566429"
    counts = {t: (r["read"], r["new"], r["already_present"], r["refused"], r["converted"])
              for t, r in report["tables"].items()}
    assert counts == {"store": (4, 2, 1, 1, 1), "observing_session": (3, 2, 0, 1, 0),
                      "observation": (5, 4, 0, 1, 1), "file": (9, 6, 0, 3, 1),
                      "file_instance": (7, 4, 0, 3, 0), "file_event": (9, 8, 0, 1, 2),
                      "standing_order": (3, 1, 0, 2, 0)}
    assert reasons(report, "file") == {
        '{"name": "bad/name.uv"}': "file name 'bad/name.uv' may not contain '/'",
        '{"name": "badmd5.uv"}': "md5 must be 32 hexadecimal digits, got 'xyz'",
        '{"name": "zen.2458046.5.uv"}': "its observation 1192500000 was not taken"}
    assert reasons(report, "file_instance") == {
        '{"name": "backup.pgdump", "parent_dirs": "x", "store": "bad store"}':
            "its store (v1 id 3) was not taken",
        '{"name": "zen.2458046.5.uv", "parent_dirs": "2458046", "store": "pot1"}':
            "its file 'zen.2458046.5.uv' was not taken",
        '{"name": "zen.2458043.13000.xx.HH.uvA", "parent_dirs": "y", "store": "pot1"}':
            "deletion_policy 7 is neither 0 (disallowed) nor 1 (allowed)"}
    assert reasons(report, "observation") == {
        '{"obsid": 1192500000}': "stop_time_jd 2458046.4 is before start_time_jd 2458046.5"}
    assert reasons(report, "observation", "converted") == {
        '{"obsid": 1192400100}': "its observing session 1192400000 was not taken; session_id "
                                 "left NULL"}
    assert reasons(report, "file_event", "converted") == {
        '{"id": 14}': "payload is not JSON; kept as a JSON string holding its text",
        '{"id": 16}': "payload was NULL; kept as JSON null"}
    assert list(reasons(report, "standing_order")) == ['{"name": "order with spaces"}',
                                                       '{"name": "badsearch"}']
    assert "main" in json.dumps(report["tables"]["store"]["converted_rows"])
    assert v1.fingerprint() == before, "the v1 database was changed"

    # Files by name, with exact records, and those without an obsid.
    files = {f["name"]: f for f in api(web, "search", search='{"name-matches": "%"}',
                                       output_format="file-listing-json")["results"]}
    assert sorted(files) == ["backup.pgdump", "notes.txt", "zen.2458043.12552.xx.HH.uvA",
                             "zen.2458043.13000.xx.HH.uvA", "zen.2458045.15000.uv",
                             "zen.2458432.34569.uvh5"]
    assert files["zen.2458043.13000.xx.HH.uvA"] == {
        "name": "zen.2458043.13000.xx.HH.uvA", "type": "uvA", "obsid": 1192201900,
        "size": 5 * 2**40, "md5": MD5,
        "create_time": calendar.timegm((T0 + datetime.timedelta(seconds=1)).timetuple())}
    assert files["backup.pgdump"]["md5"] == MD5                       # lower-cased
    assert models.File.get_by_id("notes.txt").source == "HumanUser"
    nulls = api(web, "search", search='{"obsid-is-null": ""}', output_format="file-listing-json")
    assert sorted(f["name"] for f in nulls["results"]) == ["backup.pgdump", "notes.txt"]
    twice = api(web, "search", search='{"num-instances-greater-than": 1}',
                output_format="file-listing-json")
    assert [f["name"] for f in twice["results"]] == ["zen.2458043.12552.xx.HH.uvA"]

    # Observations and sessions, times exact.
    obs = {o["obsid"]: o for o in api(web, "search", search='{"obsid-greater-than": 0}',
                                      output_format="obs-listing-json")["results"]}
    assert obs[1192201262] == {"obsid": 1192201262, "start_time_jd": 2458043.12552,
                               "stop_time_jd": 2458043.13285, "start_lst_hr": 18.12896,
                               "session_id": 1192201262}
    assert obs[1192400100]["session_id"] is None and obs[1225829886]["stop_time_jd"] is None
    sessions = api(web, "search", search='{"session-id-greater-than": 0}',
                   output_format="session-listing-json")["results"]
    assert [(s["id"], s["start_time_jd"]) for s in sessions] == [(1192201262, 2458043.1),
                                                                 (1192300000, 2458044.1)]

    # Instances: where they are (a v1 store matched by name is ours), their policies.
    os.makedirs(os.path.join(store_dir, "2458432"))
    with open(os.path.join(store_dir, "2458432", "zen.2458432.34569.uvh5"), "wb") as f:
        f.write(b"bytes already on the store")
    where = api(web, "locate_file_instance", file_name="zen.2458432.34569.uvh5")
    assert where["store_name"] == "main" and where["full_path_on_store"] == \
        os.path.join(store_dir, "2458432", "zen.2458432.34569.uvh5")
    listing = api(web, "search", search='{"name-matches": "%"}',
                  output_format="instance-listing-json")["results"]
    assert sorted((i["store_name"], i["parent_dirs"], i["name"], i["deletion_policy"])
                  for i in listing) == [
        ("main", "2458432", "zen.2458432.34569.uvh5", "allowed"),
        ("nrao", "2458043", "zen.2458043.12552.xx.HH.uvA", "allowed"),
        ("pot1", "", "notes.txt", "disallowed"),
        ("pot1", "2458043", "zen.2458043.12552.xx.HH.uvA", "disallowed")]
    pot1 = models.Store.get(models.Store.name == "pot1")
    assert (pot1.http_prefix, pot1.ssh_host, pot1.available) == ("http://pot1.karoo/data",
                                                                 "pot1.karoo", True)
    assert models.Store.get(models.Store.name == "nrao").available is False
    assert models.Store.get(models.Store.name == "main").path_prefix == store_dir

    # Events: on the file page, payloads as they were; times to the microsecond.
    login(web)
    page = html.unescape(web.get("/files/zen.2458043.12552.xx.HH.uvA").text)
    for text in ('{"store_name": "pot1"}', "[1, 2, 3]", '"just text"', '"rtp: done\\tOK"',
                 '{"note": "caf\u00e9 \u2603 \u65e5\u672c"}', "json_null"):
        assert text in page
    assert models.FileEvent.get_by_id(10).time == EVENT_TIME
    assert models.FileEvent.get_by_id(14).to_dict()["payload"] == "rtp: done\tOK"
    assert models.FileEvent.get_by_id(16).to_dict()["payload"] is None
    # New events do not take v1's ids.
    api(web, "create_file_event", file_name="notes.txt", type="after", payload={"k": 1})
    assert models.FileEvent.get(models.FileEvent.type == "after").id == 1001

    orders = api(web, "list_standing_orders")["standing_orders"]
    assert orders == [{"name": "to-nrao", "search": '{"name-matches": "zen.%"}',
                       "conn_name": "nrao"}]

    # Running it again takes nothing twice.
    status, again = run_adoption(v1.url, config_path, capsys)
    assert status == 1
    for table, r in again["tables"].items():
        first = report["tables"][table]
        assert (r["new"], r["already_present"], r["refused"]) == \
            (0, first["new"] + first["already_present"], first["refused"]), table
    assert models.File.select().count() == 6 and models.FileEvent.select().count() == 9


def test_the_v1_connection_is_read_only(v1):
    reader = adopt.V1Database(v1.url)
    try:
        with pytest.raises(Exception, match="read-only|readonly"):
            reader.conn.cursor().execute("CREATE TABLE intruder (a INTEGER)")
    finally:
        reader.close()


def test_unusable_input_is_refused_with_status_2(v1, app, config_path, tmp_path, capsys):
    models.close_database()
    for url, message in (("mysql://x/y", "expected sqlite:///PATH or postgresql://"),
                         ("sqlite:///%s/none.sqlite" % tmp_path, "no SQLite database at")):
        assert librarian.main(["adopt-v1", "--from", url, "--config", config_path]) == 2
        assert message in capsys.readouterr().err
    v1.execute("DROP TABLE standing_order")
    assert librarian.main(["adopt-v1", "--from", v1.url, "--config", config_path]) == 2
    assert "does not have the table standing_order" in capsys.readouterr().err
    unmigrated = tmp_path / "fresh.ini"
    unmigrated.write_text("[server]\nsecret_key = s\n[database]\nurl = sqlite:///%s/fresh.db\n"
                          % tmp_path)
    assert librarian.main(["adopt-v1", "--from", v1.url, "--config", str(unmigrated)]) == 2
    assert "is not migrated (pending: 001_initial" in capsys.readouterr().err
    ours = settings.load(config_path).database["url"]
    assert librarian.main(["adopt-v1", "--from", ours, "--config", config_path]) == 2
    assert "is a database of this server (it has migratehistory)" in capsys.readouterr().err
    if v1.kind == "sqlite":   # the INI from adopt-v1-config, still naming the original's
        into_v1 = tmp_path / "into-v1.ini"
        into_v1.write_text("[server]\nsecret_key = s\n[database]\nurl = %s\n" % v1.url)
        assert librarian.main(["adopt-v1", "--from", v1.url, "--config", str(into_v1)]) == 2
        assert "holds an original Librarian's tables" in capsys.readouterr().err


def test_another_schema_revision_is_a_warning_not_a_failure(v1, app, config_path, capsys):
    v1.execute("UPDATE alembic_version SET version_num = 'b02eb31402b1'")
    v1.fill({"file": [("a.uv", "uv", v1_time(T0, v1.kind), None, 1, MD5, "RTP")]})
    status, report = run_adoption(v1.url, config_path, capsys)
    assert status == 0 and report["complete"] and report["tables"]["file"]["new"] == 1
    assert report["warnings"] == ["the v1 database is at schema revision b02eb31402b1, not "
                                  "464899566429; its tables were read as 464899566429 "
                                  "describes them"]


def test_every_refused_row_is_counted_and_the_first_hundred_listed(v1, app, config_path,
                                                                   capsys):
    v1.fill({"file": [("bad%03d.uv" % i, "uv", v1_time(T0, v1.kind), None, 1, "md5?", "RTP")
                      for i in range(130)] + [("good.uv", "uv", v1_time(T0, v1.kind), None, 1,
                                               MD5, "RTP")]})
    status, report = run_adoption(v1.url, config_path, capsys)
    files = report["tables"]["file"]
    assert status == 1 and (files["read"], files["new"], files["refused"]) == (131, 1, 130)
    assert len(files["refused_rows"]) == 100
    assert files["refused_rows"][0] == {"row": {"name": "bad000.uv"},
                                        "reason": "md5 must be 32 hexadecimal digits, got 'md5?'"}
    models.close_database()
    assert librarian.main(["adopt-v1", "--from", v1.url, "--config", config_path,
                           "--no-progress"]) == 1
    text = capsys.readouterr().out
    assert "refused rows of file (130, first 100 listed):" in text
    assert "130 rows were not taken (listed above)" in text


def count_rows(db_url, table):
    """Rows of one of our tables, read with a connection of its own."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url[len("sqlite:///"):], timeout=30)
    else:
        import psycopg2

        conn = psycopg2.connect(db_url)
    try:
        cur = conn.cursor()
        cur.execute("SELECT count(*) FROM %s" % table)
        return cur.fetchone()[0]
    finally:
        conn.close()


def test_a_run_killed_mid_way_is_completed_by_running_again(db_url, app, config_path,
                                                            tmp_path, request, capsys):
    n = 1500
    site = V1Site("sqlite" if db_url.startswith("sqlite") else "postgresql", tmp_path, request)
    t = v1_time(T0, site.kind)
    site.fill({"store": [(7, "pot1", "pot1", "/data", None, True)],
               "file": [("f%05d.uv" % i, "uv", t, None, i, MD5, "RTP") for i in range(n)],
               "file_instance": [(7, "d%d" % (i % 10), "f%05d.uv" % i, i % 2) for i in range(n)],
               "file_event": [(i + 1, "f%05d.uv" % (i // 2), t, "e", '{"i": %d}' % i)
                              for i in range(2 * n)]})
    models.close_database()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "librarian.py"), "adopt-v1",
                             "--from", site.url, "--config", config_path, "--batch", "20",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while count_rows(db_url, "file_instance") < 100:
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert count_rows(db_url, "file_event") < 2 * n, "the run was not stopped mid-way"

    status, report = run_adoption(site.url, config_path, capsys, "--batch", "200")
    assert status == 0 and report["complete"]
    tables = report["tables"]
    assert tables["file"]["already_present"] == n and tables["file"]["new"] == 0
    assert 100 <= tables["file_instance"]["already_present"] < n
    for table, rows in (("file", n), ("file_instance", n), ("file_event", 2 * n)):
        assert tables[table]["written"] == tables[table]["read"] == rows
        assert count_rows(db_url, table) == rows
    assert models.File.select().where(models.File.num_instances != 1).count() == 0
    assert models.FileInstance.select().where(models.FileInstance.deletion_policy == 1) \
        .count() == n // 2
    site.close()


# ---------------------------------------------------------------------------
# The configuration file
# ---------------------------------------------------------------------------

V1_CONFIG = """\
# DELETE ALL LINES beginning with "#" before deploying! (We did not.)
{
    "server": "tornado",
    "SECRET_KEY": "not # a comment",   # <- the hash inside the string stays
    "SQLALCHEMY_DATABASE_URI": "postgresql+psycopg2://librarian@db.example.org/hera_lib",
    "SQLALCHEMY_TRACK_MODIFICATIONS": false,
    "log_level": "debug",
    "displayed_site_name": "Karoo",
    "host": "127.0.0.1",
    "port": %(port)d,
    "flask_debug": false,
    "report_to_mandc": true,
    "n_server_processes": 4,
    "n_worker_threads": 6,
    "standing_order_mode": "nighttime",
    "permissions_mode": "unchanged",
    "obsid_inference_mode": "hera",
    "local_disk_staging": {
        "ssh_host": "lustre-host",
        "dest_prefix": "%(staging)s",
        "displayed_dest": "Lustre",
        "username_placeholder": "your username",
        "chown_command": ["sudo", "-n", "/usr/local/bin/fix owner"],  # a word with a space
    },
    "sources": {
        "RTP": {"authenticator": "rtp-secret"},  # <- essentially, the password
        "HumanUser": {
            "authenticator": "I am a human",
        },
    },
    "add-stores": {
        "pot1": {
            "path_prefix": "%(store)s",
            "ssh_host": "localhost",
            "available": true,
        },
        "bad store": {"path_prefix": "/x"},
    },
    "colour": "blue",
    "_ignore_me_dummy": 1
}
"""


def test_v1_configuration_converts_loads_and_serves(tmp_path, db_url, capsys):
    staging, store = tmp_path / "staging", tmp_path / "store"
    staging.mkdir()
    port = free_port()
    v1_path = tmp_path / "server-config.json"
    v1_path.write_text(V1_CONFIG % {"port": port, "staging": staging, "store": store})
    client = tmp_path / "hl_client.cfg"
    client.write_text(json.dumps({"connections": {
        "penn": {"url": "https://penn.example.org/librarian/", "authenticator": "to-penn"},
        "broken": {"url": "ftp://x"}}}))
    assert librarian.main(["adopt-v1-config", str(v1_path), "--level", "read-append",
                           "--admin", "RTP", "--hl-client-cfg", str(client),
                           "--database-url", db_url]) == 0
    text = capsys.readouterr().out
    config = settings.parse(text)
    assert config.server["secret_key"] == "not # a comment"
    assert (config.server["displayed_site_name"], config.server["host"], config.server["port"],
            config.server["log_level"], config.server["workers"]) == ("Karoo", "127.0.0.1",
                                                                      port, "DEBUG", 6)
    assert config.database["url"] == db_url
    assert "adopt-v1 --from postgresql://librarian@db.example.org/hera_lib" in text
    assert config.librarian["standing_order_mode"] == "nighttime"
    assert config.librarian["permissions_mode"] == "unchanged"
    assert config.librarian["obsid_inference_mode"] == "hera"
    assert config.staging["dest_prefix"] == str(staging)
    assert config.staging["chown_command"] == ["sudo", "-n", "/usr/local/bin/fix owner"]
    assert config.stores == {"pot1": dict(config.stores["pot1"], path_prefix=str(store),
                                          ssh_host="localhost", available=True)}
    assert {name: (c["url"], c["authenticator"]) for name, c in config.connections.items()} \
        == {"penn": ("https://penn.example.org/librarian/", "to-penn")}
    assert set(config.sources) == {"RTP", "HumanUser"}
    assert {n: c["level"] for n, c in config.sources.items()} == {"RTP": "admin",
                                                                  "HumanUser": "read-append"}
    for source in config.sources.values():
        assert source["authenticator"] is None
        assert source["authenticator_hash"].startswith("$argon2id$")
    assert "set standing_order_mode = disabled" in text
    assert "rtp-secret" not in text and "I am a human" not in text
    comments = [line for line in text.splitlines() if line.startswith("#   ")]
    for key in ("server", "SQLALCHEMY_TRACK_MODIFICATIONS", "flask_debug", "report_to_mandc",
                "n_server_processes", "_ignore_me_dummy", "colour",
                "local_disk_staging.ssh_host", "local_disk_staging.displayed_dest",
                "local_disk_staging.username_placeholder", "add-stores.bad store",
                "connections.broken"):
        assert any(c.startswith("#   %s = " % key) for c in comments), key
    assert '#   server = "tornado": this server always runs waitress' in text
    assert '#   colour = "blue": not known to this server' in text

    # A server starts from it, and an original source calls it at the chosen level.
    ini = tmp_path / "librarian.ini"
    ini.write_text(text)
    subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate", "--config",
                    str(ini)], check=True, capture_output=True)
    server = Server(str(ini)).start()
    try:
        def call(op, who, **args):
            return requests.post(server.url + "api/" + op, timeout=30, data={
                "request": json.dumps(dict(args, authenticator=who))})

        assert call("ping", "rtp-secret").json()["message"] == "hello"
        assert call("ping", "not-a-source").status_code == 400
        upload = call("initiate_upload", "I am a human", upload_size=1)
        assert upload.status_code == 200, upload.text           # read-append: allowed
        refused = call("set_one_file_deletion_policy", "I am a human", file_name="x",
                       deletion_policy="allowed")
        assert refused.status_code == 403 and "needs level read-write" in refused.json()["message"]
    finally:
        server.stop()
    # A source's level follows its section at the next start.
    ini.write_text(text.replace("level = read-append", "level = read-write"))
    server = Server(str(ini)).start()
    try:
        allowed = call("set_one_file_deletion_policy", "I am a human", file_name="x",
                       deletion_policy="allowed")
        assert "no file named 'x'" in allowed.json()["message"]   # past the level check
    finally:
        server.stop()


def test_migrate_never_touches_an_original_librarians_database(tmp_path):
    v1_db = tmp_path / "hera_lib.sqlite"
    with sqlite3.connect(v1_db) as conn:
        conn.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        conn.execute("INSERT INTO alembic_version VALUES ('464899566429')")
    ini = tmp_path / "librarian.ini"
    ini.write_text(config_text("sqlite:///%s" % v1_db, str(tmp_path / "s"), port=free_port()))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate",
                           "--config", str(ini)], capture_output=True, text=True)
    assert proc.returncode != 0 and "is an original Librarian's" in proc.stderr
    with sqlite3.connect(v1_db) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == \
            ["alembic_version"]


@pytest.mark.parametrize("text,message", [
    ('{"a": 1 "b": 2}', "line 1, column 9: Expecting ',' delimiter"),
    ('{\n  "a": 1, # fine\n  "b": [1,, 2]\n}', "line 3, column 11: Expecting value"),
    ('["not", "an", "object"]', "expected a JSON object at the top"),
])
def test_broken_v1_configuration_names_line_and_column(tmp_path, text, message, capsys):
    path = tmp_path / "server-config.json"
    path.write_text(text)
    assert librarian.main(["adopt-v1-config", str(path), "--level", "admin"]) == 2
    assert "%s: %s" % (path, message) in capsys.readouterr().err


def test_v1_entries_that_cannot_be_taken_become_comments_and_the_rest_loads():
    import v1config

    text = v1config.convert_config({
        "SQLALCHEMY_DATABASE_URI": "sqlite:///v1.sqlite", "n_worker_threads": 500,
        "sources": {"nokey": {}, "ok": {"authenticator": "a", "level": "admin"}},
        "add-stores": {"noprefix": {"ssh_host": "h"}},
        "local_disk_staging": {"chown_command": "sudo chown"}}, "read-only")
    config = settings.parse(text)
    assert len(config.server["secret_key"]) == 64 and "no usable SECRET_KEY" in text
    assert list(config.sources) == ["ok"] and config.sources["ok"]["level"] == "read-only"
    assert config.stores == {} and config.server["workers"] == 1
    assert config.database["url"] == "sqlite:///v1.sqlite"
    for comment in ("#   sources.nokey = ...: needs authenticator",
                    "#   sources.ok.level = ...: not known to this server",
                    "#   add-stores.noprefix = ...: needs path_prefix",
                    "#   n_worker_threads = 500: expected a whole number from 0 to 64; [server] "
                    "workers keeps its default",
                    '#   local_disk_staging.chown_command = "sudo chown": expected a list of '
                    "words (each without line breaks)"):
        assert comment in text.splitlines()
    with pytest.raises(adopt.AdoptError, match="SQLALCHEMY_DATABASE_URI 'mysql://x/y': expected "
                       "sqlite:///PATH or postgresql://"):
        v1config.convert_config({"SQLALCHEMY_DATABASE_URI": "mysql://x/y"}, "admin")


# ---------------------------------------------------------------------------
# What an adversarial pass found
# ---------------------------------------------------------------------------

def test_rows_this_server_would_not_store_are_refused_with_their_dependents(
        v1, app, web, config_path, capsys):
    t = lambda dt: v1_time(dt, v1.kind)  # noqa: E731
    # A file already here with other bytes: v1's own is refused, and so are
    # its instances and events, which would otherwise be taken as ours.
    api(web, "initiate_upload", upload_size=1, files={"zen.1.uv": {
        "name": "zen.1.uv", "type": "uv", "create_time": 1500000000, "obsid": None,
        "size": 5, "md5": "9" * 32}})
    deep = "[" * 100000 + "]" * 100000
    v1.fill({"store": [(1, "pot1", "pot1.karoo", "/data/pot1", None, True),
                       (2, "rel", "x", "relative/prefix", None, True)],
             "file": [("zen.1.uv", "uv", t(T0), None, 5, MD5, "RTP"),
                      ("ok.uv", "uv", t(T0), None, 5, MD5, "RTP")],
             "file_instance": [(1, "2458043", "zen.1.uv", 0), (1, "../../etc", "ok.uv", 0),
                               (1, "/etc", "ok.uv", 0), (1, ".staging/abc", "ok.uv", 0),
                               (1, "line\nbreak", "ok.uv", 0), (1, "a", "ok.uv", 0),
                               (2, "", "ok.uv", 0)],
             "file_event": [(1, "zen.1.uv", t(T0), "v1_event", "{}"),
                            (2, "ok.uv", t(T0), "deep", deep)]})
    status, report = run_adoption(v1.url, config_path, capsys)
    assert status == 1
    assert "md5" in reasons(report, "file")['{"name": "zen.1.uv"}']
    assert reasons(report, "file_instance")[
        '{"name": "zen.1.uv", "parent_dirs": "2458043", "store": "pot1"}'] \
        == "its file 'zen.1.uv' was not taken"
    refused = {json.loads(k)["parent_dirs"] for k in reasons(report, "file_instance")}
    assert refused == {"2458043", "../../etc", "/etc", ".staging/abc", "line\nbreak", ""}
    assert reasons(report, "store") == {
        '{"name": "rel"}': "path_prefix 'relative/prefix' is not an absolute path"}
    assert reasons(report, "file_event") == {'{"id": 1}': "its file 'zen.1.uv' was not taken"}
    assert "nested too deeply" in reasons(report, "file_event", "converted")['{"id": 2}']
    assert [i.store_path for i in models.FileInstance.select()] == ["a/ok.uv"]
    assert models.File.get_by_id("zen.1.uv").md5 == "9" * 32
    assert all(t["read"] == t["written"] + t["refused"] for t in report["tables"].values())


def test_text_that_is_not_utf8_is_refused_not_a_crash(tmp_path, app, config_path, capsys):
    site = V1Site("sqlite", tmp_path, None)
    site.fill({"file": [("ok.uv", "uv", v1_time(T0, "sqlite"), None, 1, MD5, "RTP")]})
    site.execute("INSERT INTO file VALUES (CAST(X'6261645FFF2E7576' AS TEXT), 'uv', "
                 "'2017-10-23 05:14:32.000000', NULL, 1, '%s', 'RTP')" % MD5)
    site.execute("INSERT INTO file_event VALUES (1, 'ok.uv', '2017-10-23 05:14:32.000000', 't', "
                 "CAST(X'7B2278223A2022FF227D' AS TEXT))")
    status, report = run_adoption(site.url, config_path, capsys)
    assert status == 1
    assert list(reasons(report, "file").values()) == [
        "file name 'bad_\\udcff.uv' is not valid UTF-8"]
    assert "not valid UTF-8" in reasons(report, "file_event", "converted")['{"id": 1}']
    assert models.File.select().count() == 1


def test_a_password_in_a_database_url_is_never_shown(tmp_path, capsys):
    import settings as settings_mod

    for url in ("postgresql://u:s3cret@127.0.0.1:1/x",
                "postgresql://u@127.0.0.1:1/x?password=s3cret"):
        assert "s3cret" not in settings_mod.redact_url(url)
        ini = tmp_path / "p.ini"
        ini.write_text(config_text(url, str(tmp_path / "s"), port=free_port()))
        with pytest.raises(SystemExit) as end:  # our own database cannot be reached
            librarian.main(["adopt-v1", "--from", url, "--config", str(ini), "--no-progress"])
        err = capsys.readouterr().err
        assert end.value.code == 2 and "s3cret" not in err and "***" in err
        assert "cannot reach the database" in err


def test_authenticators_are_hashed_exactly_as_the_original_compared_them(tmp_path, capsys):
    from argon2 import PasswordHasher

    import v1config

    text = v1config.convert_config({
        "SQLALCHEMY_DATABASE_URI": "sqlite:///v1.db",
        "sources": {"Spacey": {"authenticator": "  two spaces  "}}}, "read-only",
        connections={"edge": {"url": "https://x.example.org/", "authenticator": " lead"}})
    config = settings.parse(text)
    assert PasswordHasher().verify(config.sources["Spacey"]["authenticator_hash"],
                                   "  two spaces  ")
    assert "edge" not in config.connections and "spaces at its ends" in text


def test_a_v1_postgresql_database_in_sql_ascii_is_read_as_utf8_where_it_is(
        app, config_path, capsys, pg_database):  # (pg_database: skipped without PostgreSQL)
    import psycopg2

    from conftest import _pg_admin

    name = "v1_ascii_%s" % uuid.uuid4().hex[:8]
    admin = _pg_admin()
    with admin.cursor() as cur:
        cur.execute("CREATE DATABASE %s ENCODING 'SQL_ASCII' TEMPLATE template0 "
                    "LC_COLLATE 'C' LC_CTYPE 'C'" % name)
    try:
        conn = psycopg2.connect("%s/%s" % (PG_BASE, name))
        conn.set_client_encoding("SQL_ASCII")
        with conn, conn.cursor() as cur:
            v1site.create(cur)
            for file_name in (b"caf\xc3\xa9.uv", b"bad\xff.uv"):
                cur.execute(b"INSERT INTO file VALUES ('" + file_name + b"', 'uv', "
                            b"'2017-10-23 05:14:32', NULL, 1, '" + MD5.encode() + b"', 'RTP')")
        conn.close()
        status, report = run_adoption("%s/%s" % (PG_BASE, name), config_path, capsys)
        assert status == 1
        assert [f.name for f in models.File.select()] == ["caf\u00e9.uv"]
        assert list(reasons(report, "file").values()) == [
            "file name 'bad\\udcff.uv' is not valid UTF-8"]
    finally:
        with admin.cursor() as cur:
            cur.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % name)
        admin.close()
