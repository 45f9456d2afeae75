"""Reconciliation: a store's bytes against its instance records.

`find(ctx, store_row)` reports, changing nothing: `lost` instances (nothing
at their path, or a link or special file), `dark` entries (outside the
staging area and every instance, and not a folder of one: each at its
topmost such path, so a folder of unregistered data once; folders holding
no file at all, as deletions leave them, are not reported) and
`size_mismatch` instances (bytes, a directory's summed over its regular
files, other than the record's `size`).

The store is listed once (`StoreAccess.listing`: one `find | sort` on its
host) and its records read in one query, both sorted by the bytes of the
store path, and the two streams merged: dicts of a million paths and
records would hold gigabytes, the merge only the folders not done yet
(`_Folder`). Each sort runs where its data are, in byte order (`LC_ALL=C
sort -z`, spilling to temporary files; `COLLATE "C"` on PostgreSQL,
SQLite's binary collation), checked as the streams come. A million files
take 10 s here, in 83 MiB (bench/reconcile.py; 2 cores, SQLite).

Fixes are the operator's, one path at a time (`register_dark`,
`forget_lost`, or `librarian.py reconcile STORE --register-dark PATH`). The
task `reconcile` runs `find` per store every `[librarian]
reconcile_interval_hours`, keeping the last report for /stores/NAME/reconcile.
"""

import contextlib
import itertools
import json
import logging
import posixpath
import stat
import sys
import time
import uuid

import peewee as pw

import ingest
import standing
import integrity
import tasks
from errors import Conflict, LibrarianError, Refused, Unavailable, is_retryable
from models import (BaseModel, File, FileEvent, FileInstance, Store, db, is_postgres, utcnow,
                    write_transaction)
from stores import split_store_path

log = logging.getLogger("librarian")

KINDS = ("lost", "dark", "size_mismatch")
KEPT = 1000  # entries of each list kept for the page (all are counted)
BATCH = 10000  # records fetched at a time from PostgreSQL
TYPES = {"f": "file", "d": "directory", "l": "link"}  # find's %y letters; others: special


class ReconcileReport(BaseModel):
    """A store's last reconciliation: `report` is the JSON of {"counts":
    {kind: n}, kind: [its first KEPT entries]}; `seconds` it took."""

    store = pw.ForeignKeyField(Store, column_name="store", unique=True, on_delete="CASCADE")
    finished = pw.DateTimeField()
    seconds = pw.FloatField()
    report = pw.TextField()

    class Meta:
        table_name = "reconcile_report"


# -- finding ------------------------------------------------------------------

def find(ctx, store_row):
    """{"lost": [...], "dark": [...], "size_mismatch": [...]} of the store,
    each sorted by store path. Entries: `store_path` (relative to the
    prefix; bytes that are not UTF-8 as \\xNN); `file_name` (lost,
    size_mismatch); `recorded_size`, `found_size` (bytes; size_mismatch);
    `type` (file, directory, link, special; dark). Raises Unavailable
    (StoreUnreachable) or OSError when the store cannot be listed whole."""
    report = {kind: [] for kind in KINDS}
    integrity.check_store(ctx.open_store(store_row))  # an unmounted disk is not all lost
    with _records(store_row) as records:
        _merge(records, _ascending(ctx.open_store(store_row).listing(), "the store's entries"),
               report)
    for entries in report.values():
        entries.sort(key=lambda e: e["store_path"].encode("utf-8", "surrogateescape"))
    return report


@contextlib.contextmanager
def _records(store_row):
    """(store path as bytes, store path, file name, recorded size) of the
    store's instances sorted by the bytes of the path, from one query (on
    PostgreSQL a server-side cursor: psycopg2 would fetch all at once). Its
    first row is read before the block lists the store: bytes that arrive
    meanwhile are reported dark (and are registered when --register-dark
    looks), never lost."""
    path = pw.Case(None, [(FileInstance.parent_dirs == "", FileInstance.file)],
                   FileInstance.parent_dirs.concat("/").concat(FileInstance.file))
    order = pw.NodeList((path, pw.SQL('COLLATE "C"'))) if is_postgres() else path
    sql, params = (FileInstance.select(path, FileInstance.file, File.size).join(File)
                   .where(FileInstance.store == store_row).order_by(order)).sql()
    with db.atomic():
        if is_postgres():  # peewee's connections are autocommit: WITH HOLD is needed
            cursor = db.connection().cursor(name="reconcile_" + uuid.uuid4().hex, withhold=True)
            cursor.itersize = BATCH
            cursor.execute(sql, params)
        else:
            cursor = db.execute_sql(sql, params)
        try:
            rows = ((p.encode("utf-8", "surrogateescape"), p, n, s) for p, n, s in cursor)
            first = next(rows, None)
            yield _ascending(itertools.chain([first] if first else [], rows), "the records")
        finally:
            cursor.close()


def _ascending(items, what):
    """`items`, checked to come in strictly ascending order of their first
    element (a collation other than byte order would report falsely)."""
    last = None
    for item in items:
        if last is not None and item[0] <= last:
            raise RuntimeError("%s are not sorted by the bytes of the path (%r after %r)"
                               % (what, item[0], last))
        last = item[0]
        yield item


class _Folder:
    """A listed folder whose subtree is not done. The subtree is the keys
    from `path/` to `end` ('0' is the byte after '/'), but does not follow
    `path` at once (`path.flags` sorts between): so folders close in stack
    order, and an entry's folder is found by name (`_parent`). `owner`: the
    directory instance it is or is in (`total`: bytes of its files);
    `covered`: it holds a record; `data`: a non-folder outside instances;
    `held`: its dark children, until it is known whether it is dark itself
    (then it alone is reported)."""

    __slots__ = ("covered", "data", "end", "held", "owner", "parent", "path", "record", "total")

    def __init__(self, path, parent, owner=None, record=None):
        self.path, self.end, self.parent = path, path + b"0", parent
        self.owner, self.record, self.total = owner, record, 0
        self.covered, self.data, self.held = parent is None, False, []


def _merge(records, listing, report):
    """Walk the two sorted streams of (key, ...) together, filling `report`."""
    folders, stack = {b"": _Folder(b"", None)}, []
    rec, ent = next(records, None), next(listing, None)
    while rec is not None or ent is not None:
        key = rec[0] if ent is None or (rec is not None and rec[0] < ent[0]) else ent[0]
        r = rec if rec is not None and rec[0] == key else None
        e = ent if ent is not None and ent[0] == key else None
        while stack and stack[-1].end <= key:
            _close(stack.pop(), folders, report)
        parent = _parent(folders, key)
        if e is not None and e[1] == "d":
            folder = folders[key] = _Folder(key, parent, parent.owner, r)
            folder.owner = folder if r is not None else folder.owner
            stack.append(folder)
        elif e is not None and e[1] == "f" and parent.owner is not None:
            parent.owner.total += e[2]
        if r is not None:
            _up(parent, "covered", report)
            if e is None or e[1] not in "fd":
                report["lost"].append({"store_path": r[1], "file_name": r[2]})
            elif e[1] == "f" and e[2] != r[3]:
                _mismatch(report, r, e[2])
        elif e[1] != "d" and parent.owner is None:
            _up(parent, "data", report)
            _dark(parent, key, e[1], report)
        rec = next(records, None) if r is not None else rec
        ent = next(listing, None) if e is not None else ent
    while stack:
        _close(stack.pop(), folders, report)


def _parent(folders, key):
    """The nearest open folder above `key` (the root at least: a record's
    folders may be missing from the store)."""
    while True:
        key = key.rpartition(b"/")[0]
        if key in folders:
            return folders[key]


def _close(folder, folders, report):
    """The subtree is done: check a directory instance's size, or report an
    uncovered folder holding data as dark in place of what it held."""
    del folders[folder.path]
    if folder.record is not None and folder.total != folder.record[3]:
        _mismatch(report, folder.record, folder.total)
    elif folder.owner is None and not folder.covered and folder.data:
        _dark(folder.parent, folder.path, "d", report)


def _up(folder, flag, report):
    """Set `flag` on `folder` and those above; a folder found covered is not
    dark: what it held is reported now, and later ones at once."""
    while folder is not None and not getattr(folder, flag):
        setattr(folder, flag, True)
        if flag == "covered":
            report["dark"].extend(folder.held)
            folder.held = None
        folder = folder.parent


def _dark(parent, path, kind, report):
    entry = {"store_path": path.decode("utf-8", "backslashreplace"),
             "type": TYPES.get(kind, "special")}
    (report["dark"] if parent.covered else parent.held).append(entry)


def _mismatch(report, record, found):
    report["size_mismatch"].append({"store_path": record[1], "file_name": record[2],
                                    "recorded_size": record[3], "found_size": found})


def counts(report):
    return {kind: len(report[kind]) for kind in KINDS}


# -- fixes, one path at a time --------------------------------------------------

def register_dark(ctx, store_row, store_path, null_obsid=False):
    """Register the dark file or directory at `store_path`, checked as an
    upload is (path rules, links and special files, MD5 computed here,
    observation metadata read; `null_obsid` for data that carry none), by
    `ingest.prepare_in_place` and `register_prepared`, the code behind
    `register_instances`; its source is "reconcile". Refuses (400, 409)
    what is not dark now: nothing there, a registered instance, inside or
    holding one, bytes being written. Returns {created, name, obsid,
    store_path, size, md5}."""
    store = ctx.open_store(store_row)
    parent_dirs, name = split_store_path(store_path)
    real = store.resolve(store_path)
    if not store.exists_at(real):
        raise Refused("nothing is at %s on store %r" % (store_path, store.name))
    if FileInstance.select().where(_instance_at(store_row, parent_dirs, name)).exists():
        raise Conflict("%s is a registered instance on store %r, not dark"
                       % (store_path, store.name))
    ingest.check_not_inside_instance(store, parent_dirs)
    store.check_no_writers(real)
    before = store.signature(real)  # what an rsync still writing would change
    prepared = ingest.prepare_in_place(
        store, real, size=None, md5=None, null_obsid=null_obsid,
        inference_mode=ctx.settings.librarian["obsid_inference_mode"])
    if store.signature(real) != before:
        raise Conflict("%s changed while it was being checked; register it once it is written"
                       % store_path)
    with write_transaction():
        result = ingest.register_prepared(store, prepared, source="reconcile")
    if ctx.settings.librarian["permissions_mode"] == "readonly":
        store.make_readonly(real)
    standing.sweep_soon(ctx)
    return dict(result, size=prepared["size"], md5=prepared["md5"])


def forget_lost(ctx, store_row, store_path):
    """Remove the record of the lost instance at `store_path`, with a
    `delete_instance` event saying why. Refuses (400, 409) when there is
    no such record, or its bytes are there after all (looked at under the
    transaction's lock, which an upload healing it takes too)."""
    store = ctx.open_store(store_row)
    integrity.check_store(store)  # its folder not there: nothing is known to be lost
    parent_dirs, name = split_store_path(store_path)
    where = _instance_at(store_row, parent_dirs, name)
    with write_transaction():
        query = FileInstance.select().where(where)
        if (query.for_update() if is_postgres() else query).first() is None:
            raise Refused("no instance is recorded at %s on store %r" % (store_path, store.name))
        if _present(store, store_path):
            raise Conflict("the bytes of %s are on store %r: it is not lost"
                           % (store_path, store.name))
        FileInstance.delete().where(where).execute()
        FileEvent.record(name, "delete_instance", {
            "store_name": store.name, "parent_dirs": parent_dirs,
            "reason": "lost: its bytes were not on the store (reconcile --forget-lost)"})


def _instance_at(store_row, parent_dirs, name):
    return ((FileInstance.store == store_row) & (FileInstance.parent_dirs == parent_dirs)
            & (FileInstance.file == name))


def _present(store, store_path):
    """Whether a file or folder is at `store_path` (as `find` judges it)."""
    try:
        mode = store.stat(posixpath.join(store.prefix, store_path)).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as e:  # a link on the way (ELOOP), permissions: cannot tell
        raise Conflict("cannot tell whether %s is on store %r: %s"
                       % (store_path, store.name, e.strerror or e)) from None
    return stat.S_ISREG(mode) or stat.S_ISDIR(mode)


# -- the periodic task and its last report -----------------------------------------

def save(store_row, report, seconds):
    """Keep `report` as the store's last: counts, the first KEPT entries."""
    kept = dict({kind: report[kind][:KEPT] for kind in KINDS}, counts=counts(report))
    with write_transaction():
        ReconcileReport.delete().where(ReconcileReport.store == store_row).execute()
        ReconcileReport.create(store=store_row, finished=utcnow(), seconds=seconds,
                               report=json.dumps(kept))


def last_report(store_row):
    """The store's last report as `save` kept it, with `finished` (naive
    UTC) and `seconds`; None before the first."""
    row = ReconcileReport.get_or_none(ReconcileReport.store == store_row)
    if row is None:
        return None
    return dict(json.loads(row.report), finished=row.finished, seconds=row.seconds)


def _interval(ctx):
    return ctx.settings.librarian["reconcile_interval_hours"] * 3600.0


def queued(store_name):
    """The store's reconcile tasks that are pending or running."""
    return [t for t in tasks.Task.select().where(
        (tasks.Task.kind == "reconcile") & tasks.Task.state.in_(("pending", "running")))
        if json.loads(t.args).get("store") == store_name]


def queue(ctx, store_name, delay, unless=None):
    """Queue a reconcile of the store in `delay` seconds unless one other
    than the task `unless` is pending or running (one chain per store);
    returns the new task or None."""
    with write_transaction():
        if any(t.id != unless for t in queued(store_name)):
            return None
        return tasks.enqueue(ctx, "reconcile", {"store": store_name}, delay=delay)


FIRST_RUN_SECONDS = 300.0


def schedule(ctx):
    """Make sure each store has one reconcile pending or running: due one
    interval after its last report, FIRST_RUN_SECONDS after the start for a
    store never reconciled (a server that starts is not slowed at once)."""
    for row in Store.select().order_by(Store.name):
        last = ReconcileReport.get_or_none(ReconcileReport.store == row)
        due = FIRST_RUN_SECONDS if last is None else (last.finished - utcnow()).total_seconds() + _interval(ctx)
        queue(ctx, row.name, max(0.0, due))


def run_now(ctx, store_name):
    """Have the store reconciled as soon as a worker is free: its pending
    task is made due now, or one is queued. Returns 'running' (one runs:
    nothing changes), 'due' or 'queued'."""
    with write_transaction():
        current = queued(store_name)
        if any(t.state == "running" for t in current):
            return "running"
        if current:
            tasks.Task.update(next_attempt=utcnow()).where(
                tasks.Task.id.in_([t.id for t in current])).execute()
            return "due"
    queue(ctx, store_name, 0.0)
    return "queued"


@tasks.handler("reconcile")
def reconcile_task(ctx, task, args):
    """`find` for the store `args["store"]`, logged and kept (`save`). The
    next one is queued an interval later after success, and after the
    failure that ends this task (one retried keeps the chain going)."""
    row = Store.get_or_none(Store.name == args["store"])
    if row is None:
        raise tasks.Permanent("no store named %r any more" % args["store"])
    started = time.monotonic()
    try:
        report = find(ctx, row)
        save(row, report, time.monotonic() - started)
    except Exception as e:
        if not is_retryable(e) or task.attempts >= task.max_attempts:
            queue(ctx, row.name, _interval(ctx), unless=task.id)
        raise
    log.info("reconciled store %s in %.1f s: %s", row.name, time.monotonic() - started,
             ", ".join("%d %s" % (n, kind) for kind, n in counts(report).items()))
    queue(ctx, row.name, _interval(ctx), unless=task.id)


# -- the command line: librarian.py reconcile STORE ------------------------------

ADVICE = {
    "lost": "records whose bytes are not on the store: --forget-lost STORE_PATH removes one "
            "(with a delete_instance event); or repair it from another copy instead",
    "dark": "files or folders no record names: --register-dark STORE_PATH checks one as an "
            "upload is checked and registers it (--null-obsid for data without an "
            "observation); or remove them by hand",
    "size_mismatch": "instances whose bytes differ in size from their record: repair each "
                     "from another copy (with the bad bytes moved off the store it is lost, "
                     "and --forget-lost removes its record)",
}


def command(ctx, args):
    """`librarian.py reconcile`: the report as JSON on stdout and what fixes
    each kind on stderr (exit 0), or the fixes asked for (exit 1 if one
    was refused); exit 2 for an unknown store or one that cannot be read."""
    row = Store.get_or_none(Store.name == args.store)
    if row is None:
        names = ", ".join(s.name for s in Store.select().order_by(Store.name)) or "none"
        print("reconcile: no store named %r (stores: %s)" % (args.store, names), file=sys.stderr)
        return 2
    fixes = [(register_dark, p) for p in args.register_dark or ()] \
        + [(forget_lost, p) for p in args.forget_lost or ()]
    try:
        if fixes:
            return _fix(ctx, row, fixes, args.null_obsid)
        report = find(ctx, row)
    except (OSError, Unavailable) as e:
        print("reconcile: store %r cannot be read: %s" % (row.name, getattr(e, "message", e)),
              file=sys.stderr)
        return 2
    json.dump(report, sys.stdout, indent=1)
    print()
    for kind in KINDS:
        print("%s: %d %s" % (kind, len(report[kind]), ADVICE[kind]), file=sys.stderr)
    return 0


def _fix(ctx, row, fixes, null_obsid):
    refused = 0
    for fix, path in fixes:
        option = "--" + fix.__name__.replace("_", "-")
        try:
            if fix is register_dark:
                done = register_dark(ctx, row, path, null_obsid=null_obsid)
                print("registered %s as %s (%d bytes, md5 %s, %s)"
                      % (path, done["name"], done["size"], done["md5"],
                         "no obsid" if done["obsid"] is None else "obsid %d" % done["obsid"]))
            else:
                forget_lost(ctx, row, path)
                print("forgot the lost instance %s" % path)
        except Unavailable:
            raise
        except LibrarianError as e:
            print("reconcile: %s %s refused: %s" % (option, path, e.message), file=sys.stderr)
            refused += 1
    return 1 if refused else 0
