"""Switching from the original (v1) Librarian: its catalogue (`adopt`,
behind `librarian.py adopt-v1`) and its configuration file
(`convert_config`, behind `librarian.py adopt-v1-config`).

The v1 database (PostgreSQL or SQLite, schema revision 464899566429 as
V1-SITE.md describes it) is opened read-only and never changed. Its tables
are streamed in batches (a server-side cursor, `fetchmany` on SQLite) into
this server's migrated database: each batch goes into a temporary table
(COPY on PostgreSQL), rows whose parent was not taken are picked out there,
and one `INSERT ... SELECT ... ON CONFLICT DO NOTHING` writes the rest, so
that a batch is one transaction and a run killed at any moment is simply
run again. Rows our schema refuses are counted and listed with the reason;
none is dropped silently.

`file.num_instances` is kept by a trigger on `file_instance`, which at a
million files costs minutes of single-row updates. On PostgreSQL files are
therefore written with the number of instances v1 holds for them, and the
trigger is disabled inside each instance batch's transaction (so a kill
leaves it enabled); one statement at the end corrects the files whose
instances were not all taken. SQLite keeps its triggers.
"""

import datetime
import io
import json
import logging
import math
import os
import re
import shlex
import sqlite3
import sys
import time
import urllib.parse

import peewee as pw

import models
from models import LibrarianError, Store, db

log = logging.getLogger("librarian")

V1_REVISION = "464899566429"
LIST_CAP = 100          # refused / converted rows listed per table (all are counted)
BATCH_ROWS = 20_000


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
                     % (what, redact(url)))


def redact(url):
    """`url` without the password it may hold."""
    return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)


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
            else:
                path = self.url[len("sqlite:///"):]
                if not os.path.isfile(path):
                    raise AdoptError("no SQLite database at %s" % path)
                self.conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path),
                                            uri=True)
        except AdoptError:
            raise
        except Exception as e:  # psycopg2.Error, sqlite3.Error: the driver says why
            raise AdoptError("cannot open the v1 database %s: %s"
                             % (redact(self.url), str(e).strip())) from None

    def scalar(self, sql):
        cur = self.conn.cursor()
        cur.execute(sql)
        row = cur.fetchone()
        cur.close()
        return row[0] if row else None

    def revision(self):
        """The `alembic_version` of the database, or None without one."""
        exists = ("SELECT to_regclass('alembic_version') IS NOT NULL" if self.postgres else
                  "SELECT count(*) FROM sqlite_master WHERE name = 'alembic_version'")
        return self.scalar("SELECT version_num FROM alembic_version") if self.scalar(exists) \
            else None

    def check_table(self, table, columns):
        """Rows in `table`; `AdoptError` when it or one of `columns` is missing."""
        try:
            self.scalar("SELECT %s FROM %s WHERE 1 = 0" % (", ".join(columns), table))
            return self.scalar("SELECT count(*) FROM %s" % table)
        except Exception as e:
            raise AdoptError("the v1 database %s does not have the table %s with columns %s "
                             "(is it an original Librarian's?): %s"
                             % (redact(self.url), table, ", ".join(columns),
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
    if len(value) > max_chars:
        raise Refused("%s is %d characters long; at most %d are allowed here"
                      % (column, len(value), max_chars))
    return value


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


def convert_instance(row, note, store_ids):
    store, parent_dirs, name, policy = row
    if store not in store_ids:
        raise Refused("its store (v1 id %r) was not taken" % (store,))
    if policy not in (models.DELETION_DISALLOWED, models.DELETION_ALLOWED):
        raise Refused("deletion_policy %r is neither 0 (disallowed) nor 1 (allowed)" % (policy,))
    return store_ids[store], _text(parent_dirs, "parent_dirs", 1024), _text(name, "name", 256), \
        policy


def convert_event(row, note):
    eid, name, when, type_, payload = row
    out = (_int(eid, "id"), _text(name, "name", 256), _time(when, "time"),
           _text(type_, "type", 64))
    if payload is None:
        note("payload was NULL; kept as JSON null")
        return out + ("null",)
    try:
        json.loads(payload)
    except (ValueError, TypeError):
        note("payload is not JSON; kept as a JSON string holding its text")
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
    """How one v1 table becomes ours: the v1 columns read, our columns
    (in the order `convert` returns them), the natural key, the columns
    compared when the key is here already, and `parents`: (column, table,
    its key, whether a missing parent makes the column NULL rather than
    refusing the row)."""

    def __init__(self, table, v1_columns, columns, key, compare, convert, parents=()):
        self.table, self.v1_columns, self.columns = table, v1_columns, columns
        self.key, self.compare, self.convert, self.parents = key, compare, convert, parents


def specs(postgres):
    """The tables after `store`, in the order their foreign keys need."""
    file_cols = ("name", "type", "create_time", "obsid", "size", "md5", "source")
    v1_file = list(file_cols)
    if postgres:
        v1_file.append("(SELECT count(*) FROM file_instance i WHERE i.name = file.name)")
    return [
        Spec("observing_session", ("id", "start_time_jd", "stop_time_jd"),
             ("id", "start_time_jd", "stop_time_jd"), ("id",),
             ("start_time_jd", "stop_time_jd"), convert_session),
        Spec("observation", ("obsid", "start_time_jd", "stop_time_jd", "start_lst_hr",
                             "session_id"),
             ("obsid", "start_time_jd", "stop_time_jd", "start_lst_hr", "session_id"),
             ("obsid",), ("start_time_jd", "stop_time_jd", "start_lst_hr", "session_id"),
             convert_observation, [("session_id", "observing_session", "id", True)]),
        Spec("file", v1_file, file_cols + (("num_instances",) if postgres else ()), ("name",),
             ("type", "create_time", "obsid", "size", "md5"), convert_file,
             [("obsid", "observation", "obsid", False)]),
        Spec("file_instance", ("store", "parent_dirs", "name", "deletion_policy"),
             ("store", "parent_dirs", "name", "deletion_policy"),
             ("store", "parent_dirs", "name"), ("deletion_policy",), convert_instance,
             [("name", "file", "name", False)]),
        Spec("file_event", ("id", "name", "time", "type", "payload"),
             ("id", "name", "time", "type", "payload"), ("id",),
             ("name", "time", "type", "payload"), convert_event,
             [("name", "file", "name", False)]),
        Spec("standing_order", ("name", "search", "conn_name"),
             ("name", "search", "conn_name", "created"), ("name",), ("search", "conn_name"),
             convert_order),
    ]


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

class Tally:
    """Counts of one table: read from v1, new here, already here (and
    identical), refused and converted, with the first LIST_CAP of each of
    the last two listed as {"row": key columns, "reason": text}."""

    def __init__(self):
        self.read = self.new = self.present = self.refused = self.converted = 0
        self.refused_rows, self.converted_rows = [], []
        self.seconds = 0.0

    def refuse(self, row, reason):
        self.refused += 1
        if len(self.refused_rows) < LIST_CAP:
            self.refused_rows.append({"row": row, "reason": reason})

    def convert(self, row, reason):
        self.converted += 1
        if len(self.converted_rows) < LIST_CAP:
            self.converted_rows.append({"row": row, "reason": reason})

    def to_dict(self):
        return {"read": self.read, "written": self.new + self.present, "new": self.new,
                "already_present": self.present, "refused": self.refused,
                "converted": self.converted, "seconds": round(self.seconds, 3),
                "refused_rows": self.refused_rows, "converted_rows": self.converted_rows}


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
        lines.append("num_instances recomputed for %d files" % report["num_instances_corrected"])
    lines.append("every row was taken" if report["complete"] else
                 "%d rows were not taken (listed above)"
                 % sum(t["refused"] for t in report["tables"].values()))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Writing into our database
# ---------------------------------------------------------------------------

def _sql(sql, params=()):
    return db.execute_sql(sql, params)


def _copy_text(value):
    if value is None:
        return "\\N"
    if isinstance(value, str):
        return (value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")
                .replace("\r", "\\r"))
    if isinstance(value, float):
        return repr(value)
    return str(value)


class Writer:
    """Writes one table's converted batches through a temporary table."""

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

    def key_of(self, values):
        return self.label(dict(zip(self.spec.key, values)))

    def write(self, rows):
        """Write converted rows in one transaction; updates the tally."""
        spec, tmp = self.spec, self.tmp
        if not rows:
            return
        refused_before = self.tally.refused
        with db.atomic():
            if self.postgres:
                _sql("SET LOCAL synchronous_commit = off")  # a lost batch is re-run
                text = "".join("\t".join(map(_copy_text, r)) + "\n" for r in rows)
                db.cursor().copy_expert("COPY %s (%s) FROM STDIN" % (
                    tmp, ", ".join(spec.columns)), io.StringIO(text))
            else:
                db.cursor().executemany("INSERT INTO %s (%s) VALUES (%s)" % (
                    tmp, ", ".join(spec.columns), ", ".join("?" * len(spec.columns))),
                    [[str(v) if isinstance(v, datetime.datetime) else v for v in r]
                     for r in rows])
            self.drop_orphans()
            inserted = self.insert()
            if inserted < len(rows) - (self.tally.refused - refused_before):
                self.report_differences()
            self.tally.new += inserted
            self.tally.present += len(rows) - inserted - (self.tally.refused - refused_before)
            if not self.postgres:
                _sql("DELETE FROM %s" % tmp)

    def drop_orphans(self):
        """Rows whose parent (observation, file...) is not here: refused,
        or their column made NULL."""
        spec = self.spec
        for column, parent, parent_key, nullify in spec.parents:
            where = ("%s IS NOT NULL AND NOT EXISTS (SELECT 1 FROM %s p WHERE p.%s = %s.%s)"
                     % (column, parent, parent_key, self.tmp, column))
            keys = ", ".join(spec.key)
            for row in _sql("SELECT %s, %s FROM %s WHERE %s" % (keys, column, self.tmp, where)):
                reason = "its %s %r was not taken" % (parent.replace("_", " "), row[-1])
                if nullify:
                    self.tally.convert(self.key_of(row[:-1]), reason + "; %s left NULL" % column)
                else:
                    self.tally.refuse(self.key_of(row[:-1]), reason)
            _sql(("UPDATE %s SET %s = NULL WHERE %s" if nullify else "DELETE FROM %s WHERE %s")
                 % ((self.tmp, column, where) if nullify else (self.tmp, where)))

    def insert(self):
        """INSERT the temporary table's rows that are new; returns how many.
        A batch the database refuses (a check nobody foresaw) is retried row
        by row, and each refused row reported with the database's reason."""
        cols = ", ".join(self.spec.columns)
        sql = ("INSERT INTO %s (%s) SELECT %s FROM %s WHERE %%s ON CONFLICT DO NOTHING"
               % (self.spec.table, cols, cols, self.tmp))
        try:
            with db.atomic():
                return self.run_insert(sql % "1 = 1", ())
        except (pw.IntegrityError, pw.DataError):
            pass
        inserted = 0
        match = " AND ".join("%s = %s" % (k, db.param) for k in self.spec.key)
        for key in list(_sql("SELECT %s FROM %s" % (", ".join(self.spec.key), self.tmp))):
            try:
                with db.atomic():
                    inserted += self.run_insert(sql % match, key)
            except (pw.IntegrityError, pw.DataError) as e:
                self.tally.refuse(self.key_of(key), "refused by the database: %s"
                                  % str(e).strip().splitlines()[0])
                _sql("DELETE FROM %s WHERE %s" % (self.tmp, match), key)
        return inserted

    def run_insert(self, sql, params):
        # Instances on PostgreSQL: the files were written with their count
        # already (see the module's docstring), so the trigger is off for
        # this transaction only.
        trigger = self.postgres and self.spec.table == "file_instance"
        if trigger:
            _sql("ALTER TABLE file_instance DISABLE TRIGGER file_instance_count")
        count = _sql(sql, params).rowcount
        if trigger:
            _sql("ALTER TABLE file_instance ENABLE TRIGGER file_instance_count")
        return count

    def report_differences(self):
        """Refuse the rows whose key is here with other values."""
        spec = self.spec
        on = " AND ".join("o.%s = t.%s" % (k, k) for k in spec.key)
        distinct = "IS NOT" if not self.postgres else "IS DISTINCT FROM"
        differ = " OR ".join("o.%s %s t.%s" % (c, distinct, c) for c in spec.compare)
        pairs = ", ".join("o.%s, t.%s" % (c, c) for c in spec.compare)
        rows = list(_sql("SELECT %s, %s FROM %s t JOIN %s o ON %s WHERE %s" % (
            ", ".join("t." + k for k in spec.key), pairs, self.tmp, spec.table, on, differ)))
        for row in rows:
            n = len(spec.key)
            cols = [c for i, c in enumerate(spec.compare)
                    if row[n + 2 * i] != row[n + 2 * i + 1]]
            self.tally.refuse(self.key_of(row[:n]), "a different row with this key is here "
                              "already (differs in %s)" % ", ".join(cols))


def adopt_stores(v1, tally, store_ids, store_names, batch):
    """Map v1 stores to ours by name, creating the missing ones; fills
    `store_ids` (v1 id -> ours) and `store_names` (both ids -> name)."""
    for rows in v1.batches("store", "id, name, ssh_host, path_prefix, http_prefix, available",
                           batch):
        for v1_id, name, host, prefix, http, available in rows:
            tally.read += 1
            store_names[("v1", v1_id)] = name
            try:
                _checked(models.check_store_name, name)
                spec = {"name": name, "ssh_host": _text(host, "ssh_host", 256),
                        "path_prefix": _text(prefix, "path_prefix", 1024),
                        "http_prefix": None if http is None else _text(http, "http_prefix", 1024),
                        "available": bool(available)}
            except Refused as e:
                tally.refuse({"name": name}, str(e))
                continue
            with db.atomic():
                row = Store.get_or_none(Store.name == name)
                if row is None:
                    row = Store.create(**spec)
                    tally.new += 1
                else:
                    tally.present += 1
                    differ = [k for k in ("ssh_host", "path_prefix", "http_prefix")
                              if getattr(row, k) != spec[k]]
                    if differ:
                        tally.convert({"name": name}, "matched by name to the store here; kept "
                                      "its " + ", ".join("%s %r (v1: %r)" % (
                                          k, getattr(row, k), spec[k]) for k in differ))
            store_ids[v1_id] = row.id
            store_names[("ours", row.id)] = name


def fix_num_instances():
    """Set `file.num_instances` to the true count where it is not; returns
    how many files were corrected (one statement)."""
    return _sql("UPDATE file SET num_instances = c.n FROM (SELECT f.name, count(i.name) AS n "
                "FROM file f LEFT JOIN file_instance i ON i.name = f.name GROUP BY f.name) c "
                "WHERE c.name = file.name AND file.num_instances <> c.n").rowcount


def adopt(v1_url, batch=BATCH_ROWS, progress=True):
    """Copy the v1 database at `v1_url` into the bound, migrated database.

    Returns the report: {"from", "revision", "warnings": [text],
    "tables": {table: Tally.to_dict()}, "num_instances_corrected",
    "complete": whether every row was taken, "seconds"}. Raises
    `AdoptError` when the v1 database cannot be opened or lacks a table."""
    from tqdm import tqdm

    started = time.monotonic()
    v1 = V1Database(v1_url)
    try:
        postgres = models.is_postgres()
        table_specs = specs(postgres)
        counts = {"store": v1.check_table("store", ("id", "name", "ssh_host", "path_prefix",
                                                    "http_prefix", "available"))}
        for spec in table_specs:
            counts[spec.table] = v1.check_table(spec.table, [c for c in spec.v1_columns
                                                             if not c.startswith("(")])
        revision = v1.revision()
        warnings = []
        if revision != V1_REVISION:
            warnings.append("the v1 database is at schema revision %s, not %s; its tables "
                            "were read as %s describes them"
                            % (revision, V1_REVISION, V1_REVISION))
            log.warning(warnings[-1])
        tallies = {name: Tally() for name in counts}
        store_ids, store_names = {}, {}

        def label(table):
            def show(key):
                if table == "file_instance":
                    key["store"] = store_names.get(("ours", key["store"]), key["store"])
                return key
            return show

        t0 = time.monotonic()
        adopt_stores(v1, tallies["store"], store_ids, store_names, batch)
        tallies["store"].seconds = time.monotonic() - t0
        for spec in table_specs:
            t0, tally = time.monotonic(), tallies[spec.table]
            if spec.table == "file_event" and postgres:
                align_event_ids(v1)
            convert = spec.convert
            if spec.table == "file_instance":
                def convert(row, note):
                    return convert_instance(row, note, store_ids)
            writer = Writer(spec, tally, label(spec.table))
            bar = tqdm(total=counts[spec.table], desc=spec.table, unit=" rows", file=sys.stderr,
                       disable=not progress, mininterval=1.0, dynamic_ncols=True)
            for rows in v1.batches(spec.table, ", ".join(spec.v1_columns), batch):
                tally.read += len(rows)
                good = []
                for row in rows:
                    notes = []
                    try:
                        good.append(convert(row, notes.append))
                    except Refused as e:
                        tally.refuse(v1_key(spec, row, store_names), str(e))
                    for reason in notes:
                        tally.convert(v1_key(spec, row, store_names), reason)
                writer.write(good)
                bar.update(len(rows))
            bar.close()
            writer.close()
            tally.seconds = time.monotonic() - t0
        corrected = fix_num_instances()
    finally:
        v1.close()
    return {"from": redact(v1.url), "revision": revision, "warnings": warnings,
            "tables": {name: t.to_dict() for name, t in tallies.items()},
            "num_instances_corrected": corrected,
            "complete": not any(t.refused for t in tallies.values()),
            "seconds": round(time.monotonic() - started, 3)}


def v1_key(spec, row, store_names):
    """The key columns of a v1 row, for the report."""
    key = dict(zip(spec.v1_columns, row))
    key = {k: key[k] for k in spec.key}
    if spec.table == "file_instance":
        key["store"] = store_names.get(("v1", key["store"]), key["store"])
    return key


def align_event_ids(v1):
    """Move our `file_event` id sequence past v1's largest id and ours, so
    that events recorded here never take an id v1 has."""
    top = max(v1.scalar("SELECT max(id) FROM file_event") or 0,
              _sql("SELECT max(id) FROM file_event").fetchone()[0] or 0)
    if top:
        _sql("SELECT setval(pg_get_serial_sequence('file_event', 'id'), %s)" % db.param, (top,))


# ---------------------------------------------------------------------------
# The v1 configuration file
# ---------------------------------------------------------------------------

def load_commented_json(text, path):
    """The object in `text`: JSON as operators write server-config.json,
    following the original's sample: `#` comments (whole lines, or after a
    value) outside strings, and trailing commas. Comments become spaces, so
    that errors point at the right place. Raises `AdoptError` naming `path`,
    line and column for anything else that is not JSON, or a top level that
    is not an object."""
    out, last, in_string, i = [], None, False, 0
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                out.append(text[i:i + 2])
                i += 2
                continue
            in_string = ch != '"'
        elif ch == "#":
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            out.append(" " * (end - i))
            i = end
            continue
        elif ch in "}]" and last is not None and out[last] == ",":
            out[last] = " "  # a trailing comma
        elif ch == '"':
            in_string = True
        out.append(ch)
        if not ch.isspace():
            last = len(out) - 1
        i += 1
    try:
        value = json.loads("".join(out))
    except json.JSONDecodeError as e:
        raise AdoptError("%s: line %d, column %d: %s" % (path, e.lineno, e.colno, e.msg)) \
            from None
    if not isinstance(value, dict):
        raise AdoptError("%s: expected a JSON object at the top" % path)
    return value


NOT_CARRIED = {
    "server": "this server always runs waitress ([server] threads: its HTTP threads)",
    "n_server_processes": "one process serves HTTP here; run more workers with `librarian.py "
                          "worker` ([server] workers)",
    "report_to_mandc": "reporting to HERA M&C is not part of this server",
    "flask_debug": "there is no Flask debug mode here (log_level = DEBUG logs more)",
    "SQLALCHEMY_TRACK_MODIFICATIONS": "an SQLAlchemy setting; this server uses Peewee",
    "_ignore_me_dummy": "a placeholder of the original's sample file",
    "local_disk_staging.ssh_host": "staging here always writes to this host's file system",
    "local_disk_staging.displayed_dest": "the web pages here do not name the staging area",
    "local_disk_staging.username_placeholder": "the web pages here do not ask for a user name",
}
CHOICES = {"standing_order_mode": ("normal", "disabled", "nighttime"),
           "permissions_mode": ("readonly", "unchanged"),
           "obsid_inference_mode": ("none", "hera")}
SECTION_NAME_RE = re.compile(r"^[^\]\s:][^\]\n\r]*$")


class _Ini:
    """INI sections being written, and the keys that were not carried over."""

    def __init__(self):
        self.sections, self.skipped = {}, []

    def set(self, section, key, value, comment=None):
        text = str(value).strip()
        if "\n" in text or "\r" in text or not text:
            return self.skip(section + "." + key, "an INI value is one non-empty line", value)
        lines = self.sections.setdefault(section, [])
        lines += ["# " + c for c in comment.split("\n")] if comment else []
        lines.append("%s = %s" % (key, text))

    def skip(self, key, why, value=None, show=True):
        shown = json.dumps(value, ensure_ascii=False) if show else "..."
        self.skipped.append("#   %s = %s: %s" % (key, shown if len(shown) <= 60
                                                 else shown[:57] + "...", why))

    def unknown(self, prefix, spec, known, show=True):
        """Skip the keys of `spec` not in `known` (values hidden unless
        `show`: those of sources and connections may be secrets)."""
        for key in spec:
            if key not in known:
                name = prefix + key
                self.skip(name, NOT_CARRIED.get(name, "not known to this server"), spec[key],
                          show)

    def text(self, header):
        out = header + ["#", "# Not carried over from the original:"] + \
            (self.skipped or ["#   (nothing)"])
        for section, lines in self.sections.items():
            out += ["", "[%s]" % section] + lines
        return "\n".join(out) + "\n"


def _typed(ini, key, value, kinds, what):
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        ini.skip(key, "expected %s" % what, value)
        return False
    return True


def convert_config(v1, level, connections=None, names=("server-config.json", None),
                   database=None):
    """The INI text (our `config.example.ini` keys) for the v1 server
    configuration `v1` (a dict, as `load_commented_json` returns it).

    `level` is given to every source (the original had no levels); each
    source's authenticator is written as its Argon2 hash. `connections` is
    the `connections` object of a `~/.hl_client.cfg`; `names` the two
    files' paths, for the header; `database` our database URL when it is
    not v1's own (adoption needs a fresh one). Keys with no counterpart
    here become comments saying why. Raises `AdoptError` on an unusable
    database URI or bad level, or if the result would not load."""
    from argon2 import PasswordHasher

    import settings

    if level not in models.LEVELS:
        raise AdoptError("level must be one of %s, got %r" % (", ".join(models.LEVELS), level))
    ini = _Ini()
    known = {"SECRET_KEY", "SQLALCHEMY_DATABASE_URI", "displayed_site_name", "host", "port",
             "log_level", "n_worker_threads", "local_disk_staging", "sources", "add-stores"}
    known.update(CHOICES)
    ini.unknown("", v1, known)

    secret = v1.get("SECRET_KEY")
    if isinstance(secret, str) and secret.strip():
        ini.set("server", "secret_key", secret)
    else:
        import secrets

        ini.set("server", "secret_key", secrets.token_hex(32),
                comment="The original had no usable SECRET_KEY; a new random one.")
    for key in ("displayed_site_name", "host"):
        if key in v1 and _typed(ini, key, v1[key], (str,), "text"):
            ini.set("server", key, v1[key])
    if "port" in v1 and _typed(ini, "port", v1["port"], (int,), "a port number"):
        ini.set("server", "port", v1["port"])
    if "log_level" in v1:
        if str(v1["log_level"]).upper() in ("DEBUG", "INFO", "WARNING", "ERROR"):
            ini.set("server", "log_level", str(v1["log_level"]).upper())
        else:
            ini.skip("log_level", "not debug, info, warning or error (the original used info)",
                     v1["log_level"])
    threads = v1.get("n_worker_threads")
    if threads is not None and _typed(ini, "n_worker_threads", threads, (int,),
                                      "a whole number"):
        if 0 <= threads <= 64:
            ini.set("server", "workers", threads, comment="From n_worker_threads: threads "
                    "running background tasks (copies, offloads, staging).")
        else:
            ini.skip("n_worker_threads", "not between 0 and 64; [server] workers keeps its "
                     "default", threads)

    uri = v1.get("SQLALCHEMY_DATABASE_URI")
    if not isinstance(uri, str):
        raise AdoptError("%s has no SQLALCHEMY_DATABASE_URI" % names[0])
    v1_url = database_url(uri, "SQLALCHEMY_DATABASE_URI")
    if database:
        ini.set("database", "url", database_url(database),
                comment="A fresh database for `librarian.py migrate` and `adopt-v1 --from %s`."
                % redact(v1_url))
    else:
        ini.set("database", "url", v1_url, comment="The original's own database "
                "(SQLALCHEMY_DATABASE_URI). adopt-v1 copies it into a fresh,\nmigrated "
                "database: create one, put its URL here (or use --database-url), then\n"
                "  librarian.py migrate --config THIS\n"
                "  librarian.py adopt-v1 --from %s --config THIS" % redact(v1_url))

    for key, allowed in CHOICES.items():
        if key in v1:
            if v1[key] in allowed:
                ini.set("librarian", key, v1[key])
            else:
                ini.skip(key, "not one of %s" % ", ".join(allowed), v1[key])

    staging = v1.get("local_disk_staging")
    if staging is not None and _typed(ini, "local_disk_staging", staging, (dict,), "an object"):
        ini.unknown("local_disk_staging.", staging, {"dest_prefix", "chown_command"})
        if "dest_prefix" in staging and _typed(ini, "local_disk_staging.dest_prefix",
                                               staging["dest_prefix"], (str,), "text"):
            ini.set("staging", "dest_prefix", staging["dest_prefix"])
        words = staging.get("chown_command")
        if words is not None:
            if isinstance(words, list) and words and all(isinstance(w, str) for w in words):
                ini.set("staging", "chown_command", shlex.join(words))
            else:
                ini.skip("local_disk_staging.chown_command", "expected a list of words", words)

    stores = v1.get("add-stores", {})
    for name, spec in (stores.items() if _typed(ini, "add-stores", stores, (dict,),
                                                "an object") else ()):
        key = "add-stores." + name
        if not models.STORE_NAME_RE.match(name):
            ini.skip(key, "a store name here is 1 to 64 letters, digits, '.', '_' or '-'", spec)
        elif _typed(ini, key, spec, (dict,), "an object") and \
                _typed(ini, key + ".path_prefix", spec.get("path_prefix"), (str,), "text"):
            ini.unknown(key + ".", spec, {"path_prefix", "ssh_host", "available"})
            ini.set("store:" + name, "path_prefix", spec["path_prefix"])
            if "ssh_host" in spec and _typed(ini, key + ".ssh_host", spec["ssh_host"], (str,),
                                             "text"):
                ini.set("store:" + name, "ssh_host", spec["ssh_host"])
            if "available" in spec and _typed(ini, key + ".available", spec["available"],
                                              (bool,), "true or false"):
                ini.set("store:" + name, "available", str(spec["available"]).lower())

    sources = v1.get("sources", {})
    hasher = PasswordHasher()
    for name, spec in (sources.items() if _typed(ini, "sources", sources, (dict,),
                                                 "an object") else ()):
        key = "sources." + name
        secret = spec.get("authenticator") if isinstance(spec, dict) else None
        if not SECTION_NAME_RE.match(name) or len(name) > 64:
            ini.skip(key, "a source name here is 1 to 64 characters without ']' or line breaks",
                     show=False)
        elif not isinstance(secret, str) or not secret:
            ini.skip(key, "no authenticator (text)", show=False)
        else:
            ini.unknown(key + ".", spec, {"authenticator"}, show=False)
            ini.set("source:" + name, "authenticator_hash", hasher.hash(secret),
                    comment="The original let every source do everything; level from --level.")
            ini.set("source:" + name, "level", level)

    conns = connections or {}
    for name, spec in (conns.items() if _typed(ini, "connections", conns, (dict,),
                                               "an object") else ()):
        key = "connections." + name
        if not SECTION_NAME_RE.match(name):
            ini.skip(key, "a connection name here has no ']' or line breaks", show=False)
        elif not (isinstance(spec, dict) and isinstance(spec.get("url"), str)
                  and spec["url"].startswith(("http://", "https://"))
                  and isinstance(spec.get("authenticator"), str) and spec["authenticator"]):
            ini.skip(key, "needs an http(s) url and an authenticator", show=False)
        else:
            ini.unknown(key + ".", spec, {"url", "authenticator"}, show=False)
            ini.set("connection:" + name, "url", spec["url"])
            ini.set("connection:" + name, "authenticator", spec["authenticator"])

    header = ["# Converted by `librarian.py adopt-v1-config` from %s%s on %sZ." % (
        names[0], " and connections of %s" % names[1] if names[1] else "",
        models.utcnow().isoformat()), "# config.example.ini documents every key."]
    text = ini.text(header)
    try:
        settings.parse(text)
    except settings.ConfigError as e:
        raise AdoptError("the converted configuration would not load: %s" % e) from None
    return text


def read_config_files(config_path, client_path):
    """(v1 server configuration, connections or None, client path used) from
    the files; `client_path` None means $HL_CLIENT_CFG or ~/.hl_client.cfg
    if it exists. Raises `AdoptError` naming a file that cannot be read."""
    explicit = client_path is not None
    client_path = client_path or os.path.expanduser(os.environ.get("HL_CLIENT_CFG")
                                                    or "~/.hl_client.cfg")

    def read(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise AdoptError("cannot read %s: %s" % (path, getattr(e, "strerror", e))) from None

    v1 = load_commented_json(read(config_path), config_path)
    if not explicit and not os.path.exists(client_path):
        return v1, None, None
    client = load_commented_json(read(client_path), client_path)
    return v1, client.get("connections", {}), client_path
