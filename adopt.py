"""Switching from the original (v1) Librarian: copying its catalogue
(`adopt`, behind `librarian.py adopt-v1`). Its configuration file is
v1config.py's.

The v1 database (PostgreSQL or SQLite, schema revision 464899566429 as
V1-SITE.md describes it) is opened read-only and never changed. Its tables
are streamed in batches (a server-side cursor, `fetchmany` on SQLite), read
and checked in a thread while the batch before is written, each batch in
one transaction, so that a run killed at any moment is simply run again.
On PostgreSQL a batch is first COPYed straight into its table; a batch
holding anything our database refuses or already has (and every batch on
SQLite) goes through a temporary table instead: rows whose parent was not
taken are picked out there, and `INSERT ... SELECT ... ON CONFLICT DO
NOTHING` writes the rest. Rows our schema refuses are counted and listed
with the reason; none is dropped silently.

`file.num_instances` is kept by a trigger on `file_instance`, which at a
million files costs minutes of single-row updates. On PostgreSQL files are
therefore written with the number of instances v1 holds for them, and the
trigger is disabled inside each instance batch's transaction (so a kill
leaves it enabled); one statement at the end corrects the files whose
instances were not all taken. SQLite keeps its triggers.
"""

import csv
import datetime
import functools
import io
import json
import logging
import math
import os
import sqlite3
import sys
import time
import urllib.parse

import peewee as pw

import models
from models import LibrarianError, Store, db
from settings import redact_url
from stores import split_store_path

log = logging.getLogger("librarian")

V1_REVISION = "464899566429"
LIST_CAP = 100          # refused / converted rows listed per table (all are counted)
BATCH_ROWS = 20_000
ADOPT_LOCK = 0x4C6942  # PostgreSQL advisory lock: one adoption at a time


class AdoptError(Exception):
    """Unusable input (a URL, database or configuration file): the message
    says what was wrong; nothing was written."""


class Refused(Exception):
    """A v1 row our schema does not take; the message is the reason."""


def database_url(url, what="database URL"):
    """Our spelling of a database URL (`sqlite:///PATH`,
    `postgresql://...`), accepting SQLAlchemy's (`postgresql+psycopg2://`,
    `postgres://`, `sqlite+pysqlite:///`). Raises `AdoptError` otherwise."""
    scheme, sep, rest = url.partition("://")
    kind = scheme.split("+", 1)[0].lower()
    if sep and kind in ("postgresql", "postgres") and rest:
        return "postgresql://" + rest
    if sep and kind == "sqlite" and len(rest) > 1 and rest.startswith("/"):
        return "sqlite://" + rest
    raise AdoptError("%s %r: expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB"
                     % (what, redact_url(url)))


# ---------------------------------------------------------------------------
# The v1 database, read-only
# ---------------------------------------------------------------------------

class V1Database:
    """A v1 database opened read-only: on PostgreSQL one READ ONLY,
    REPEATABLE READ transaction (every table seen at one moment), on SQLite
    a `mode=ro` connection. Raises `AdoptError` when it cannot be opened."""

    def __init__(self, url):
        self.url = database_url(url, "v1 database URL")
        self.postgres = self.url.startswith("postgresql:")
        try:
            if self.postgres:
                import psycopg2

                self.conn = psycopg2.connect(self.url, connect_timeout=10)
                self.conn.set_session(isolation_level="REPEATABLE READ", readonly=True)
                # A database in SQL_ASCII holds bytes of any kind: read them one
                # character per byte, then as UTF-8 where they are (`batches`).
                self.latin1 = self.scalar("SHOW server_encoding") == "SQL_ASCII"
                if self.latin1:
                    self.conn.set_client_encoding("LATIN1")
            else:
                path = self.url[len("sqlite:///"):]
                if not os.path.isfile(path):
                    raise AdoptError("no SQLite database at %s" % path)
                # Read by the reader thread, never two threads at once.
                self.conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path),
                                            uri=True, check_same_thread=False)
                # Text that is not UTF-8 is refused row by row (see `_text`).
                self.conn.text_factory = lambda b: b.decode("utf-8", "surrogateescape")
        except AdoptError:
            raise
        except Exception as e:  # psycopg2.Error, sqlite3.Error: the driver says why
            raise AdoptError("cannot open the v1 database %s: %s"
                             % (redact_url(self.url), str(e).strip())) from None
        if self.has_table("migratehistory"):
            self.close()
            raise AdoptError("%s is a database of this server (it has migratehistory), not an "
                             "original Librarian's" % redact_url(self.url))

    def scalar(self, sql):
        """The first column of the first row of `sql`, or None."""
        cur = self.conn.cursor()
        cur.execute(sql)
        row = cur.fetchone()
        cur.close()
        return row[0] if row else None

    def has_table(self, table):
        return bool(self.scalar("SELECT to_regclass('%s') IS NOT NULL" % table if self.postgres
                                else "SELECT count(*) FROM sqlite_master WHERE name = '%s'"
                                % table))

    def revision(self):
        """The `alembic_version` of the database, or None without one."""
        return self.scalar("SELECT version_num FROM alembic_version") \
            if self.has_table("alembic_version") else None

    def check_table(self, table, columns):
        """Rows in `table`; `AdoptError` when it or one of `columns` is missing."""
        try:
            self.scalar("SELECT %s FROM %s WHERE 1 = 0" % (", ".join(columns), table))
            return self.scalar("SELECT count(*) FROM %s" % table)
        except Exception as e:
            raise AdoptError("the v1 database %s does not have the table %s with columns %s "
                             "(is it an original Librarian's?): %s"
                             % (redact_url(self.url), table, ", ".join(columns),
                                str(e).strip().splitlines()[0])) from None

    def batches(self, table, select, size):
        """Lists of at most `size` rows (tuples) of `SELECT select FROM
        table`, streamed so that memory stays flat."""
        cur = self.conn.cursor("adopt_" + table) if self.postgres else self.conn.cursor()
        if self.postgres:
            cur.itersize = size
        cur.execute("SELECT %s FROM %s" % (select, table))
        while True:
            rows = cur.fetchmany(size)
            if not rows:
                break
            if getattr(self, "latin1", False):
                rows = [tuple(v.encode("latin-1").decode("utf-8", "surrogateescape")
                              if isinstance(v, str) else v for v in r) for r in rows]
            yield rows
        cur.close()

    def close(self):
        self.conn.close()


# ---------------------------------------------------------------------------
# Checking and converting v1 rows
# ---------------------------------------------------------------------------

def _text(value, column, max_chars):
    if not isinstance(value, str):
        raise Refused("%s is %s, not text" % (column, "NULL" if value is None
                                              else type(value).__name__))
    if "\0" in value:
        raise Refused("%s contains a NUL character" % column)
    if not _is_utf8(value):
        raise Refused("%s is not valid UTF-8" % column)
    if len(value) > max_chars:
        raise Refused("%s is %d characters long; at most %d are allowed here"
                      % (column, len(value), max_chars))
    return value


def _is_utf8(text):
    """False for text holding bytes that were not UTF-8 in v1 (read with
    `surrogateescape`)."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _int(value, column, nullable=False):
    if value is None and nullable:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise Refused("%s is %r, not a whole number" % (column, value))
    return value


def _jd(value, column, nullable=False):
    if value is None and nullable:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) \
            or not math.isfinite(value):
        raise Refused("%s is %r, not a finite number" % (column, value))
    return float(value)


def _time(value, column):
    """A naive UTC datetime from v1's naive UTC timestamp (a datetime from
    PostgreSQL, SQLAlchemy's 'YYYY-MM-DD HH:MM:SS.ffffff' text on SQLite)."""
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            raise Refused("%s %r is not a time" % (column, value)) from None
    if not isinstance(value, datetime.datetime):
        raise Refused("%s is %r, not a time" % (column, value))
    if value.tzinfo is not None:
        value = value.astimezone(datetime.timezone.utc).replace(tzinfo=None)
    return value


def _checked(check, value):
    try:
        return check(value)
    except LibrarianError as e:
        raise Refused(e.message) from None


def convert_session(row, note):
    sid, start, stop = row
    sid, start = _int(sid, "id"), _jd(start, "start_time_jd")
    stop = _jd(stop, "stop_time_jd")
    if stop < start:
        raise Refused("stop_time_jd %r is before start_time_jd %r" % (stop, start))
    return sid, start, stop


def convert_observation(row, note):
    obsid, start, stop, lst, session = row
    obsid, start = _int(obsid, "obsid"), _jd(start, "start_time_jd")
    stop, lst = _jd(stop, "stop_time_jd", True), _jd(lst, "start_lst_hr", True)
    if stop is not None and stop < start:
        raise Refused("stop_time_jd %r is before start_time_jd %r" % (stop, start))
    if lst is not None and not 0 <= lst < 24:
        raise Refused("start_lst_hr %r is not in [0, 24)" % lst)
    return obsid, start, stop, lst, _int(session, "session_id", True)


def convert_file(row, note):
    name, type_, create_time, obsid, size, md5, source = row[:7]
    md5_ours = _checked(models.check_md5, md5)
    if md5_ours != md5:
        note("md5 %s written in lower case" % md5)
    size = _int(size, "size")
    if size < 0:
        raise Refused("size %d is negative" % size)
    out = (_checked(models.check_file_name, name), _text(type_, "type", 32),
           _time(create_time, "create_time"), _int(obsid, "obsid", True), size, md5_ours,
           _text(source, "source", 64))
    return out + tuple(row[7:])  # PostgreSQL: the count of v1 instances


def convert_instance(row, note, store_ids, refused_files):
    store, parent_dirs, name, policy = row
    if store not in store_ids:
        raise Refused("its store (v1 id %r) was not taken" % (store,))
    if policy not in (models.DELETION_DISALLOWED, models.DELETION_ALLOWED):
        raise Refused("deletion_policy %r is neither 0 (disallowed) nor 1 (allowed)" % (policy,))
    parent_dirs, name = _text(parent_dirs, "parent_dirs", 1024), _text(name, "name", 256)
    store_path = "/".join(p for p in (parent_dirs, name) if p)
    if _checked(split_store_path, store_path) != (parent_dirs, name) \
            or models.CONTROL_RE.search(parent_dirs):
        raise Refused("its path %r is not one this server would store (no '..', no "
                      "absolute or empty folders, no control characters)" % store_path)
    _not_refused(name, refused_files)
    return store_ids[store], parent_dirs, name, policy


def _not_refused(name, refused_files):
    if name in refused_files:
        raise Refused("its file %r was not taken" % name)


def convert_event(row, note, refused_files):
    eid, name, when, type_, payload = row
    out = (_int(eid, "id"), _text(name, "name", 256), _time(when, "time"),
           _text(type_, "type", 64))
    _not_refused(name, refused_files)
    if payload is None:
        note("payload was NULL; kept as JSON null")
        return out + ("null",)
    if not _is_utf8(str(payload)):
        note("payload is not valid UTF-8; kept as a JSON string of its text, bad bytes "
             "replaced")
        return out + (json.dumps(str(payload).encode("utf-8", "replace").decode(),
                                 ensure_ascii=False),)
    try:
        json.loads(payload)
    except (ValueError, TypeError, RecursionError) as e:
        note("payload is %s; kept as a JSON string holding its text" % (
            "nested too deeply to read" if isinstance(e, RecursionError) else "not JSON"))
        return out + (json.dumps(str(payload), ensure_ascii=False),)
    return out + (payload,)


def convert_order(row, note):
    import search
    import standing

    name, text, conn_name = row
    if not isinstance(name, str) or not standing.NAME_RE.match(name):
        raise Refused("name %r is not 1 to 39 letters, digits, '.', '_' or '-' (the name is "
                      "part of its event type, at most 64 characters)" % (name,))
    _checked(search.file_query, _text(text, "search", 1 << 20))
    return name, text, _text(conn_name, "conn_name", 64), models.utcnow()


class Spec:
    """How one v1 table becomes ours: our columns (in the order `convert`
    returns them; v1's are the same unless `v1_columns` says otherwise), the
    natural key, `parents`: (column, table, its key, whether a missing parent
    makes the column NULL rather than refusing the row), and the columns
    that may be NULL (none of them text). Rows whose key is here already are
    compared on the other columns v1 has."""

    def __init__(self, table, columns, key, convert, parents=(), nullable=(), v1_columns=None):
        self.table, self.columns, self.key, self.convert = table, columns, key, convert
        self.parents, self.nullable = parents, nullable
        self.v1_columns = v1_columns or columns
        self.compare = [c for c in columns if c not in key and c in self.v1_columns]


def specs(postgres):
    """The tables after `store`, in the order their foreign keys need. On
    PostgreSQL, files are read with their count of v1 instances."""
    files = ("name", "type", "create_time", "obsid", "size", "md5", "source")
    count = "(SELECT count(*) FROM file_instance i WHERE i.name = file.name)"
    return [
        Spec("observing_session", ("id", "start_time_jd", "stop_time_jd"), ("id",),
             convert_session),
        Spec("observation", ("obsid", "start_time_jd", "stop_time_jd", "start_lst_hr",
                             "session_id"), ("obsid",), convert_observation,
             [("session_id", "observing_session", "id", True)],
             ("stop_time_jd", "start_lst_hr", "session_id")),
        Spec("file", files + ("num_instances",) if postgres else files, ("name",), convert_file,
             [("obsid", "observation", "obsid", False)], ("obsid",),
             files + (count,) if postgres else files),
        Spec("file_instance", ("store", "parent_dirs", "name", "deletion_policy"),
             ("store", "parent_dirs", "name"), convert_instance,
             [("name", "file", "name", False)]),
        Spec("file_event", ("id", "name", "time", "type", "payload"), ("id",), convert_event,
             [("name", "file", "name", False)]),
        Spec("standing_order", ("name", "search", "conn_name", "created"), ("name",),
             convert_order, v1_columns=("name", "search", "conn_name")),
    ]


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

class Tally:
    """Counts of one table: read from v1, new here, already here (and
    identical), refused and converted, with the first LIST_CAP of each of
    the last two listed as {"row": key columns, "reason": text}."""

    def __init__(self):
        self.read = self.new = self.present = self.seconds = 0
        self.rows = {"refused": [], "converted": []}
        self.counts = {"refused": 0, "converted": 0}
        self.refused_keys = set()  # all of them: the rows that depend on them are refused too

    @property
    def refused(self):
        return self.counts["refused"]

    def add(self, kind, row, reason):
        """Count a "refused" or "converted" row (its key columns) and why."""
        self.counts[kind] += 1
        if kind == "refused":
            self.refused_keys.add(tuple(row.values()))
        if len(self.rows[kind]) < LIST_CAP:
            self.rows[kind].append({"row": row, "reason": reason})

    def to_dict(self):
        return {"read": self.read, "written": self.new + self.present, "new": self.new,
                "already_present": self.present, "refused": self.refused,
                "converted": self.counts["converted"], "seconds": round(self.seconds, 3),
                "refused_rows": self.rows["refused"], "converted_rows": self.rows["converted"]}


def format_report(report):
    """The report (as `adopt` returns it) as text for people."""
    lines = ["Adopted %s (revision %s) in %.1f s." % (report["from"], report["revision"],
                                                     report["seconds"])]
    lines += ["warning: " + w for w in report["warnings"]]
    lines.append("%-18s %10s %10s %10s %10s %9s %9s" % ("table", "read", "written", "new",
                                                       "present", "refused", "converted"))
    for table, t in report["tables"].items():
        lines.append("%-18s %10d %10d %10d %10d %9d %9d" % (
            table, t["read"], t["written"], t["new"], t["already_present"], t["refused"],
            t["converted"]))
    for kind in ("refused", "converted"):
        for table, t in report["tables"].items():
            if t[kind]:
                lines.append("%s rows of %s (%d%s):" % (kind, table, t[kind],
                             ", first %d listed" % LIST_CAP if t[kind] > LIST_CAP else ""))
                lines += ["  %s: %s" % (", ".join("%s=%r" % kv for kv in r["row"].items()),
                                        r["reason"]) for r in t[kind + "_rows"]]
    if report["num_instances_corrected"]:
        lines.append("num_instances corrected for %d file(s) whose v1 instances were not all "
                     "taken" % report["num_instances_corrected"])
    lines.append("every row was taken" if report["complete"] else
                 "%d rows were not taken (listed above)"
                 % sum(t["refused"] for t in report["tables"].values()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Writing into our database
# ---------------------------------------------------------------------------

def _sql(sql, params=()):
    return db.execute_sql(sql, params)


def _ahead(items):
    """The items of the iterator `items`, each produced in a thread while
    the consumer handles the one before (reading and converting v1 rows
    overlaps writing them; memory: two batches). The producer's exceptions
    are raised here."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="adopt-reader") as pool:
        future = pool.submit(next, items, None)
        while (item := future.result()) is not None:
            future = pool.submit(next, items, None)
            yield item


def _converted(batches, convert, label):
    """The v1 row batches converted: (rows read, rows taken, their data for
    the temporary table (CSV text on PostgreSQL, else rows), [(kind, key,
    reason)] with kind "refused" or "converted")."""
    postgres = models.is_postgres()
    for rows in batches:
        good, notes = [], []
        for row in rows:
            marks = []
            try:
                good.append(convert(row, marks.append))
            except Refused as e:
                notes.append(("refused", label(row), str(e)))
            notes += [("converted", label(row), reason) for reason in marks]
        if postgres:
            text = io.StringIO()  # numbers bare, the rest quoted; "" is NULL (FORCE_NULL)
            csv.writer(text, quoting=csv.QUOTE_NONNUMERIC, lineterminator="\n").writerows(good)
            data = text.getvalue()
        else:
            data = [[str(v) if isinstance(v, datetime.datetime) else v for v in r] for r in good]
        yield len(rows), len(good), data, notes


class Writer:
    """Writes one table's converted batches (straight in, or through a
    temporary table), counting each row in the table's tally."""

    def __init__(self, spec, tally, label):
        self.spec, self.tally, self.label = spec, tally, label
        self.postgres = models.is_postgres()
        self.tmp = "adopt_" + spec.table
        _sql("DROP TABLE IF EXISTS %s" % self.tmp)
        # Emptied at each commit on PostgreSQL, by `write` on SQLite.
        _sql("CREATE TEMP TABLE %s %s AS SELECT %s FROM %s WHERE 1 = 0"
             % (self.tmp, "ON COMMIT DELETE ROWS" if self.postgres else "",
                ", ".join(spec.columns), spec.table))

    def close(self):
        _sql("DROP TABLE IF EXISTS %s" % self.tmp)

    def copy(self, table, data):
        """COPY CSV `data` into `table` (PostgreSQL)."""
        force_null = (", FORCE_NULL (%s)" % ", ".join(self.spec.nullable)
                      if self.spec.nullable else "")
        db.cursor().copy_expert("COPY %s (%s) FROM STDIN WITH (FORMAT csv%s)" % (
            table, ", ".join(self.spec.columns), force_null), io.StringIO(data))

    def write(self, n, data):
        """Write a batch of `n` rows (`data` from `_converted`) in one
        transaction; counts them in the tally as new, present or refused.

        On PostgreSQL the batch is first copied straight into the table: on
        a first run nearly every batch goes in so, without the temporary
        table and the search for missing parents. If anything in it is
        refused (a row here already, a missing parent, a check), that is
        undone and the batch takes the careful way."""
        import psycopg2

        spec, tmp = self.spec, self.tmp
        if not n:
            return
        refused_before = self.tally.refused
        with db.atomic():
            if self.postgres:
                _sql("SET LOCAL synchronous_commit = off")  # a lost batch is re-run
                try:
                    with db.atomic():
                        self.without_trigger(lambda: self.copy(spec.table, data))
                    self.tally.new += n
                    return
                except (psycopg2.IntegrityError, psycopg2.DataError):
                    pass
                self.copy(tmp, data)
            else:
                db.cursor().executemany("INSERT INTO %s (%s) VALUES (%s)" % (
                    tmp, ", ".join(spec.columns), ", ".join("?" * len(spec.columns))), data)
            self.drop_orphans()
            inserted = self.insert()
            if inserted < n - (self.tally.refused - refused_before):
                self.report_differences()
            self.tally.new += inserted
            self.tally.present += n - inserted - (self.tally.refused - refused_before)
            if not self.postgres:
                _sql("DELETE FROM %s" % tmp)

    def drop_orphans(self):
        """Rows whose parent (observation, file...) is not here: refused,
        or their column made NULL."""
        keys = ", ".join(self.spec.key)
        for column, parent, parent_key, nullify in self.spec.parents:
            where = ("%s IS NOT NULL AND NOT EXISTS (SELECT 1 FROM %s p WHERE p.%s = %s.%s)"
                     % (column, parent, parent_key, self.tmp, column))
            if nullify:
                found = list(_sql("SELECT %s, %s FROM %s WHERE %s"
                                  % (keys, column, self.tmp, where)))
                _sql("UPDATE %s SET %s = NULL WHERE %s" % (self.tmp, column, where))
            else:
                found = _sql("DELETE FROM %s WHERE %s RETURNING %s, %s"
                             % (self.tmp, where, keys, column))
            for row in found:
                reason = "its %s %r was not taken" % (parent.replace("_", " "), row[-1])
                self.tally.add("converted" if nullify else "refused", self.label(row[:-1]),
                               reason + ("; %s left NULL" % column if nullify else ""))

    def insert(self):
        """INSERT the temporary table's rows that are new; returns how many.
        A batch the database refuses (a check nobody foresaw) is retried row
        by row, and each refused row reported with the database's reason."""
        cols = ", ".join(self.spec.columns)
        sql = ("INSERT INTO %s (%s) SELECT %s FROM %s WHERE %%s ON CONFLICT DO NOTHING"
               % (self.spec.table, cols, cols, self.tmp))
        try:
            with db.atomic():
                return self.without_trigger(lambda: _sql(sql % "1 = 1").rowcount)
        except (pw.IntegrityError, pw.DataError):
            pass
        inserted = 0
        match = " AND ".join("%s = %s" % (k, db.param) for k in self.spec.key)
        for key in list(_sql("SELECT %s FROM %s" % (", ".join(self.spec.key), self.tmp))):
            try:
                with db.atomic():
                    inserted += self.without_trigger(lambda: _sql(sql % match, key).rowcount)
            except (pw.IntegrityError, pw.DataError) as e:
                self.tally.add("refused", self.label(key), "refused by the database: %s"
                               % str(e).strip().splitlines()[0])
                _sql("DELETE FROM %s WHERE %s" % (self.tmp, match), key)
        return inserted

    def without_trigger(self, write):
        """`write()`'s result. Instances on PostgreSQL: the files were
        written with their count already (see the module's docstring), so
        the trigger is off meanwhile, in this transaction only."""
        trigger = self.postgres and self.spec.table == "file_instance"
        if trigger:
            _sql("ALTER TABLE file_instance DISABLE TRIGGER file_instance_count")
        result = write()
        if trigger:
            _sql("ALTER TABLE file_instance ENABLE TRIGGER file_instance_count")
        return result

    def report_differences(self):
        """Refuse the rows whose key is here with other values."""
        spec, n = self.spec, len(self.spec.key)
        on = " AND ".join("o.%s = t.%s" % (k, k) for k in spec.key)
        distinct = "IS DISTINCT FROM" if self.postgres else "IS NOT"
        differ = " OR ".join("o.%s %s t.%s" % (c, distinct, c) for c in spec.compare)
        pairs = ", ".join("o.%s, t.%s" % (c, c) for c in spec.compare)
        for row in _sql("SELECT %s, %s FROM %s t JOIN %s o ON %s WHERE %s" % (
                ", ".join("t." + k for k in spec.key), pairs, self.tmp, spec.table, on, differ)):
            cols = [c for i, c in enumerate(spec.compare) if row[n + 2 * i] != row[n + 2 * i + 1]]
            self.tally.add("refused", self.label(row[:n]), "a different row with this key is "
                           "here already (differs in %s)" % ", ".join(cols))


def fix_num_instances():
    """Set `file.num_instances` to the true count where it is not; returns
    how many files were corrected (one statement, with instances locked
    against writers meanwhile, whose counts it would otherwise overwrite)."""
    with models.write_transaction():
        if models.is_postgres():
            _sql("LOCK TABLE file_instance IN SHARE MODE")
        return _sql("UPDATE file SET num_instances = c.n FROM (SELECT f.name, count(i.name) "
                    "AS n FROM file f LEFT JOIN file_instance i ON i.name = f.name GROUP BY "
                    "f.name) c WHERE c.name = file.name AND file.num_instances <> c.n").rowcount


def align_event_ids(v1):
    """Move our `file_event` id sequence (PostgreSQL) past v1's largest id
    and ours, so that events recorded here never take an id v1 has."""
    top = max(v1.scalar("SELECT max(id) FROM file_event") or 0,
              _sql("SELECT max(id) FROM file_event").fetchone()[0] or 0)
    if top:
        _sql("SELECT setval(pg_get_serial_sequence('file_event', 'id'), %s)" % db.param, (top,))


STORE_COLUMNS = ("id", "name", "ssh_host", "path_prefix", "http_prefix", "available")


class Adoption:
    """One run: the v1 database, a tally per table, and the v1 store ids
    mapped to ours."""

    def __init__(self, v1, batch, progress):
        self.v1, self.batch, self.progress = v1, batch, progress
        self.postgres = models.is_postgres()
        self.specs = specs(self.postgres)
        self.counts = {"store": v1.check_table("store", STORE_COLUMNS)}
        for spec in self.specs:
            self.counts[spec.table] = v1.check_table(spec.table, [
                c for c in spec.v1_columns if not c.startswith("(")])
        self.tallies = {name: Tally() for name in self.counts}
        self.store_ids, self.store_names = {}, {}

    def label(self, spec, side):
        """A function from a row (of v1, or of our key columns) to its key
        columns for the report, stores by name."""
        def label(values):
            row = dict(zip(spec.v1_columns if side == "v1" else spec.key, values))
            key = {k: row[k] for k in spec.key}
            if "store" in key:
                key["store"] = self.store_names.get((side, key["store"]), key["store"])
            return key
        return label

    def stores(self):
        """Map v1 stores to ours by name, creating those not here yet."""
        tally = self.tallies["store"]
        for rows in self.v1.batches("store", ", ".join(STORE_COLUMNS), self.batch):
            for v1_id, name, host, prefix, http, available in rows:
                tally.read += 1
                self.store_names[("v1", v1_id)] = name
                try:
                    _checked(models.check_store_name, name)
                    spec = {"name": name, "ssh_host": _text(host, "ssh_host", 256),
                            "path_prefix": _text(prefix, "path_prefix", 1024),
                            "http_prefix": http if http is None else _text(http, "http_prefix",
                                                                           1024),
                            "available": bool(available)}
                    if not spec["path_prefix"].startswith("/"):
                        raise Refused("path_prefix %r is not an absolute path" % prefix)
                except Refused as e:
                    tally.add("refused", {"name": name}, str(e))
                    continue
                row = Store.get_or_none(Store.name == name)
                if row is None:  # (another run may make it meanwhile: no error then)
                    Store.insert(**spec).on_conflict_ignore().execute()
                    row = Store.get(Store.name == name)
                    tally.new += 1
                else:
                    tally.present += 1
                    differ = ["%s %r (v1: %r)" % (k, getattr(row, k), spec[k])
                              for k in ("ssh_host", "path_prefix", "http_prefix")
                              if getattr(row, k) != spec[k]]
                    if differ:
                        tally.add("converted", {"name": name}, "matched by name to the store "
                                  "here; kept its " + ", ".join(differ))
                self.store_ids[v1_id] = row.id
                self.store_names[("ours", row.id)] = name

    def table(self, spec):
        """Stream one table's rows from v1 into ours."""
        from tqdm import tqdm

        tally = self.tallies[spec.table]
        if spec.table == "file_event" and self.postgres:
            align_event_ids(self.v1)
        convert = spec.convert
        refused_files = {key[0] for key in self.tallies["file"].refused_keys}
        if spec.table == "file_instance":
            def convert(row, note):
                return convert_instance(row, note, self.store_ids, refused_files)
        elif spec.table == "file_event":
            def convert(row, note):
                return convert_event(row, note, refused_files)
        writer = Writer(spec, tally, self.label(spec, "ours"))
        batches = self.v1.batches(spec.table, ", ".join(spec.v1_columns), self.batch)
        with tqdm(total=self.counts[spec.table], desc=spec.table, unit=" rows",
                  file=sys.stderr, disable=not self.progress, mininterval=1.0) as bar:
            for n_read, n_good, data, notes in _ahead(_converted(batches, convert,
                                                                 self.label(spec, "v1"))):
                tally.read += n_read
                for kind, key, reason in notes:
                    tally.add(kind, key, reason)
                writer.write(n_good, data)
                bar.update(n_read)
        writer.close()


def adopt(v1_url, batch=BATCH_ROWS, progress=True):
    """Copy the v1 database at `v1_url` into the bound, migrated database,
    `batch` rows per transaction, with tqdm progress bars on stderr.

    Returns the report: {"from", "revision", "warnings": [text],
    "tables": {table: Tally.to_dict()}, "num_instances_corrected",
    "complete": whether every row was taken, "seconds"}. Raises
    `AdoptError` when the v1 database cannot be opened or lacks a table."""
    started = time.monotonic()
    if models.is_postgres() and not _sql("SELECT pg_try_advisory_lock(%s)" % db.param,
                                         (ADOPT_LOCK,)).fetchone()[0]:
        raise AdoptError("another adopt-v1 into this database is running; let it finish")
    v1 = V1Database(v1_url)
    try:
        run = Adoption(v1, batch, progress)
        revision, warnings = v1.revision(), []
        if revision != V1_REVISION:
            warnings.append("the v1 database is at schema revision %s, not %s; its tables "
                            "were read as %s describes them" % (revision, V1_REVISION,
                                                               V1_REVISION))
            log.warning(warnings[-1])
        for name, step in [("store", run.stores)] + [
                (spec.table, functools.partial(run.table, spec)) for spec in run.specs]:
            t0 = time.monotonic()
            step()
            run.tallies[name].seconds = time.monotonic() - t0
        corrected = fix_num_instances()
    finally:
        v1.close()
    return {"from": redact_url(v1.url), "revision": revision, "warnings": warnings,
            "tables": {name: t.to_dict() for name, t in run.tallies.items()},
            "num_instances_corrected": corrected,
            "complete": not any(t.refused for t in run.tallies.values()),
            "seconds": round(time.monotonic() - started, 3)}
