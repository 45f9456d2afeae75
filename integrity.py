"""Integrity over time: every full read of an instance verifies its bytes,
a scrub re-reads every instance on a schedule, and what they find is kept.

- `verified(ctx, inst, chunks)` wraps a full read (download, staging,
  offload) of an instance whose store stream was opened with the
  record's MD5 (`StoreAccess.stream(..., md5=)`): on a mismatch the stream
  ends without its last chunk (an HTTP response is cut short), the instance
  is marked corrupt and `Corrupt` is raised naming it.
  A copy to another Librarian is verified by its receiver, which hashes
  what arrives against the record; when it refuses, the instance is
  verified here (`copies.check_sent`).
- `record(ctx, inst, result)` keeps a full read's result on the instance
  (`verified_at`, `verify_result`: ok, corrupt, missing). An instance found
  corrupt or missing is out of service (`FileInstance.in_service()`: never
  served, copied from, staged or counted as a copy); the finding is a file
  event (`instance_corrupt`, `instance_missing`) and an alert.
- The scrub (`scrub` tasks, one chain per store) re-reads instances least
  recently verified first, paced to `[librarian] scrub_bytes_per_second`
  (or the store's own setting), so that a full pass ends within
  `scrub_period_days`; its progress is the instances' `verified_at`, so it
  goes on across restarts.
- `verify_here(ctx, name)` recomputes every instance of a file here (the
  local half of `verify_file`).
"""

import contextlib
import datetime
import json
import logging
import posixpath
import time

import peewee as pw

import alerts
import ingest
import tasks
from errors import Corrupt, NotFound, Unavailable
from models import (File, FileEvent, FileInstance, RemoteInstance, Store, db, to_unix, utcnow,
                    write_transaction)
from stores import Mismatch, intents

log = logging.getLogger("librarian")

SCRUB_SLICE_SECONDS = 60.0  # one scrub task's work before it hands over to the next
SCRUB_BATCH = 200           # instances picked at once
IDLE_RECHECK_SECONDS = 3600.0  # an idle scrub looks again at most this long after
FIRST_SLICE_SECONDS = 300.0    # a new chain starts this long after it is queued (start-up)


def describe(inst):
    """'NAME on store S at PATH' for messages."""
    return "%s on store %s at %s" % (inst.name, inst.store.name, inst.store_path)


def record(ctx, inst, result, md5=None, how="scrub"):
    """Keep the result ("ok", "corrupt", "missing") of a full read of the
    instance `inst` (done `how`), now. A newly bad instance gets a file
    event and an alert. Returns whether the result is news."""
    with _database():
        with write_transaction():
            File.lock(inst.name)  # a deletion counting this copy waits, or went first
            current = (FileInstance.select(FileInstance.verify_result)
                       .where(FileInstance.key(inst)).first())
            if current is None:
                return False  # deleted meanwhile
            (FileInstance.update(verified_at=utcnow(), verify_result=result)
             .where(FileInstance.key(inst)).execute())
            news = result != "ok" and current.verify_result != result
            if news:
                FileEvent.record(inst.name, "instance_" + result, {
                    "store_name": inst.store.name, "parent_dirs": inst.parent_dirs,
                    "found_by": how, "md5_read": md5})
    if news:
        alerts.send(ctx, result, "instance %s is %s (found by %s%s)" % (
            describe(inst), result, how, ", md5 read %s" % md5 if md5 else ""),
            file_name=inst.name, store_name=inst.store.name, store_path=inst.store_path)
    if result != "ok":
        with _database():
            queue_repair(ctx, inst)
    return news


class _database:
    """The database connection for a block that may run after a request
    closed its own (a download's stream): opened if needed, and closed
    again only then."""

    def __enter__(self):
        self.opened = db.is_closed()
        db.connect(reuse_if_open=True)

    def __exit__(self, *exc):
        if self.opened:
            db.close()


@contextlib.contextmanager
def reading(ctx, inst, how):
    """A block that reads `inst` whole from a store stream opened with the
    record's MD5: a `stores.Mismatch` marks the instance corrupt and
    raises `Corrupt` naming it."""
    try:
        yield
    except Mismatch as e:
        record(ctx, inst, "corrupt", md5=e.md5, how=how)
        raise out_of_service(inst, "they read as %s" % e.md5 if e.md5 else e) from None


def out_of_service(inst, found):
    """The `Corrupt` for `inst`, whose bytes were found (`found`: how) not
    to match the file's record, and recorded so."""
    return Corrupt("the bytes of %s do not match the file's record (%s); that instance is "
                   "out of service" % (describe(inst), found))


def verified(ctx, inst, chunks, how):
    """`chunks` of a full read of `inst`, under `reading`."""
    with reading(ctx, inst, how):
        yield from chunks


def check_copy(ctx, inst, read, how):
    """After copying `inst` whole, `read` = (size, md5) of the bytes read:
    a difference from the record marks the instance corrupt and raises
    `Corrupt`."""
    if read != (inst.file.size, inst.file.md5):
        record(ctx, inst, "corrupt", md5=read[1], how=how)
        raise Corrupt("%s read as %d bytes with md5 %s, not %d bytes with md5 %s as recorded; "
                      "that instance is out of service" % (describe(inst), read[0], read[1],
                                                           inst.file.size, inst.file.md5))


# -- verifying one instance --------------------------------------------------

def verify_instance(ctx, inst, how="scrub", pace=None):
    """Read the instance `inst` whole (each chunk's length given to
    `pace`, which may sleep) and record the result; returns a dict
    `{store_name, store_path, ok, result, md5, size, verified_at}` (md5 and
    size as read, None when missing). Raises `Unavailable` (a store host
    that cannot be reached, or a store folder that is not there: an
    unmounted disk is not a disk of missing files) or OSError (a read that
    failed); nothing is recorded then."""
    store = ctx.open_store(inst.store)
    check_store(store)
    path = store.resolve(inst.store_path)
    md5 = size = None
    if not store.exists_at(path):
        if intents.deleting(inst.store, inst.store_path):  # moved out for now; maybe back
            raise Unavailable("%s is being deleted" % describe(inst))
        result = "missing"
    else:
        chunks, _ = store.stream(path, inst.name, inst.file.size, md5=inst.file.md5)
        size = 0
        try:
            for chunk in chunks:
                size += len(chunk)
                if pace is not None:
                    pace(len(chunk))
            result, md5, size = "ok", inst.file.md5, inst.file.size
        except Mismatch as e:  # (other read errors pass: they may not be the bytes' fault)
            result, md5 = "corrupt", e.md5
            size = disk_size(store, path)
    record(ctx, inst, result, md5=md5, how=how)
    return {"librarian": None, "store_name": inst.store.name, "store_path": inst.store_path,
            "ok": result == "ok", "result": result, "md5": md5, "size": size,
            "verified_at": to_unix(utcnow())}


def still_there(ctx, inst, file):
    """Whether the bytes of `inst` (of `file`) are at their place with the
    record's size (a flat file's; a directory is only looked for); a look,
    not a verification: what is not there is recorded missing, a size
    that differs corrupt. An instance that cannot be looked at now does
    not count."""
    store = ctx.open_store(inst.store)
    try:
        check_store(store)
        path = store.resolve(inst.store_path)
        if not store.exists_at(path):
            if intents.deleting(inst.store, inst.store_path):
                return False
            record(ctx, inst, "missing", how="a deletion's look at the other copies")
            return False
        if not store.is_dir(path) and store.stat(path).st_size != file.size:
            record(ctx, inst, "corrupt", how="a deletion's look at the other copies")
            return False
    except (Unavailable, OSError):
        return False
    return True


def disk_size(store, path):
    """Bytes of a flat file on the store (None for a directory)."""
    return None if store.is_dir(path) else store.stat(path).st_size


def check_store(store):
    """Raise `Unavailable` naming the problem unless the store's folder is
    there and reachable."""
    problem = store.problem()
    if problem is not None:
        raise Unavailable("store %s cannot be looked at now: %s" % (store.name, problem))


def verify_here(ctx, file_name, recompute=True):
    """Verify every instance of `file_name` on our stores (paced as the
    scrub is, so that asking cannot take the disks from ingest); a list of
    `verify_instance` results (an unreachable store's with result
    "unreachable"). Without `recompute`, each instance's last result is
    reported (its bytes only looked for). 404 for an unknown file."""
    if File.get_or_none(File.name == file_name) is None:
        raise NotFound("no file named %r" % file_name)
    copies = []
    query = (FileInstance.select(FileInstance, Store, File).join(Store)
             .switch(FileInstance).join(File).where(FileInstance.file == file_name)
             .order_by(Store.name, FileInstance.parent_dirs))
    for inst in query:
        try:
            copies.append(verify_instance(ctx, inst, how="verify_file",
                                          pace=Pacer(scrub_rate(ctx, inst.store)))
                          if recompute else last_result(ctx, inst))
        except (Unavailable, OSError) as e:
            copies.append({"librarian": None, "store_name": inst.store.name,
                           "store_path": inst.store_path, "ok": False,
                           "result": "unreachable", "md5": None, "size": None,
                           "verified_at": None, "message": getattr(e, "message", str(e))})
    return copies


def last_result(ctx, inst):
    """`verify_instance`'s dict from the instance's last verification, its
    bytes only looked for (missing ones are recorded as such)."""
    store = ctx.open_store(inst.store)
    check_store(store)
    if not store.exists_at(store.resolve(inst.store_path)):
        record(ctx, inst, "missing", how="verify_file")
        inst.verify_result = "missing"
    ok = inst.verify_result in (None, "ok")
    return {"librarian": None, "store_name": inst.store.name, "store_path": inst.store_path,
            "ok": ok, "result": inst.verify_result or "unverified",
            "md5": inst.file.md5 if ok else None, "size": inst.file.size if ok else None,
            "verified_at": to_unix(inst.verified_at) if inst.verified_at else None}


# -- repair ------------------------------------------------------------------

REPAIR_RETRY_SECONDS = 3600.0  # no good copy anywhere: looked for again this often


def queue_repair(ctx, inst):
    """Queue the repair of a bad instance unless one is queued or running."""
    args = {"file_name": inst.name, "store": inst.store.name,
            "parent_dirs": inst.parent_dirs}
    with write_transaction():
        queued = tasks.Task.select().where(
            (tasks.Task.kind == "repair") & (tasks.Task.file_name == inst.name)
            & tasks.Task.state.in_(("pending", "running")))
        if not any({k: json.loads(t.args)[k] for k in args} == args for t in queued):
            tasks.enqueue(ctx, "repair", dict(args, alerted=False), file_name=inst.name)


@tasks.handler("repair")
def repair_task(ctx, task, args):
    """Re-make a corrupt or missing instance from a good copy: an instance
    in service on another store here, else one fetched back from a
    Librarian holding a good remote copy; verified and recorded (event
    `instance_repaired`). No good copy anywhere: an alert (once), and the
    search for one again every REPAIR_RETRY_SECONDS."""
    inst = (FileInstance.select(FileInstance, Store, File).join(Store).switch(FileInstance)
            .join(File).where((FileInstance.file == args["file_name"])
                              & (Store.name == args["store"])
                              & (FileInstance.parent_dirs == args["parent_dirs"])).first())
    if inst is None or inst.verify_result in (None, "ok"):
        return  # deleted, or found good meanwhile
    store = ctx.open_store(inst.store)
    staging = store.new_staging_dir()
    try:
        how = fetch_good_copy(ctx, inst, store, posixpath.join(staging, inst.name))
        if how is None:
            if not args.get("alerted"):
                alerts.send(ctx, "no_good_copy", "%s is %s and no good copy of it is known "
                            "anywhere" % (describe(inst), inst.verify_result),
                            file_name=inst.name)
            task.remember(outcome="no good copy found")
            with write_transaction():  # (this task is the one queued: it ends now)
                tasks.enqueue(ctx, "repair", dict(args, alerted=True), file_name=inst.name,
                              delay=REPAIR_RETRY_SECONDS)
            return
        _clear_bad_bytes(store, inst)
        ingest.register_staged(store, posixpath.join(staging, inst.name), inst.store_path,
                               source=inst.file.source, meta_mode="direct")
    finally:
        store.release(staging)
    with write_transaction():
        (FileInstance.update(verified_at=utcnow(), verify_result="ok")
         .where(FileInstance.key(inst)).execute())
        FileEvent.record(inst.name, "instance_repaired", {
            "store_name": inst.store.name, "parent_dirs": inst.parent_dirs, "from": how})
    log.info("repaired %s from %s", describe(inst), how)


def fetch_good_copy(ctx, inst, store, staged):
    """Put a verified copy of `inst`'s file at the new path `staged` (in a
    staging folder of `store`); returns where it came from ("store S",
    "Librarian L"), or None when no good copy could be had."""
    file = inst.file
    while True:
        src_inst, src_store, src_path = ctx.stores.present_instance(file.name)
        if src_inst is None:
            break
        try:
            check_copy(ctx, src_inst, src_store.copy_to(src_path, store, staged), "repair")
            return "store " + src_inst.store.name
        except Corrupt:  # that one is out of service now: the next one
            store.remove_staged(staged)
    from remotes import fetch, good

    for rinst in RemoteInstance.select().where(RemoteInstance.file == file.name):
        if good(rinst, file) and fetch(ctx, rinst, store, staged):
            return "Librarian " + rinst.librarian
    return None


def _clear_bad_bytes(store, inst):
    """Remove the bytes of a corrupt instance from its place, keeping its
    record (the instance is then missing, which registering the good copy
    heals)."""
    if store.exists(inst.store_path):
        store.delete(inst.store_path, lambda: FileInstance.select().where(
            FileInstance.key(inst) & ~FileInstance.in_service()).exists())


# -- the scrub --------------------------------------------------------------

class Pacer:
    """Sleeps so that bytes pass at no more than `rate` bytes per second
    (0: as fast as they come), measured from the first byte."""

    def __init__(self, rate, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.start, self.done = clock(), 0

    def __call__(self, n):
        self.done += n
        if self.rate:
            ahead = self.done / self.rate - (self.clock() - self.start)
            if ahead > 0:
                self.sleep(ahead)


def scrub_rate(ctx, store_row):
    """Bytes per second the scrub may read on a store (0: unthrottled)."""
    own = ctx.settings.stores.get(store_row.name, {}).get("scrub_bytes_per_second")
    return ctx.settings.librarian["scrub_bytes_per_second"] if own is None else own


def due(store_row, period_days, now=None):
    """The store's instances whose last verification is older than the
    period (or that were never verified), least recently verified first."""
    cutoff = (now or utcnow()) - datetime.timedelta(days=period_days)
    return (FileInstance.select(FileInstance, Store, File).join(Store)
            .switch(FileInstance).join(File)
            .where((FileInstance.store == store_row)
                   & (FileInstance.verified_at.is_null() | (FileInstance.verified_at < cutoff)))
            .order_by(FileInstance.verified_at.asc(nulls="first"), FileInstance.file))


def scrub(ctx, store_row, seconds=SCRUB_SLICE_SECONDS):
    """Verify the store's due instances for about `seconds`, paced; returns
    (instances verified, bytes read, whether some are still due). Raises
    `Unavailable` when the store cannot be verified now."""
    period = ctx.settings.librarian["scrub_period_days"]
    check_store(ctx.open_store(store_row))
    pace = Pacer(scrub_rate(ctx, store_row))
    deadline = time.monotonic() + seconds
    count, bad = 0, 0
    for inst in list(due(store_row, period).limit(SCRUB_BATCH)):
        bad += not verify_instance(ctx, inst, pace=pace)["ok"]
        count += 1
        if time.monotonic() >= deadline:
            break
    if count:
        log.info("scrub of store %s: %d instances verified (%d bad), %d bytes read",
                 store_row.name, count, bad, pace.done)
    return count, pace.done, due(store_row, period).exists()


def next_due_seconds(ctx, store_row):
    """Seconds until the store's next instance falls due (at most
    IDLE_RECHECK_SECONDS)."""
    oldest = (FileInstance.select(pw.fn.MIN(FileInstance.verified_at))
              .where(FileInstance.store == store_row).scalar())
    if oldest is None:
        return IDLE_RECHECK_SECONDS
    when = oldest + datetime.timedelta(days=ctx.settings.librarian["scrub_period_days"])
    return max(1.0, min(IDLE_RECHECK_SECONDS, (when - utcnow()).total_seconds()))


@tasks.handler("scrub")
def scrub_task(ctx, task, args):
    """One slice of a store's scrub; the next slice is queued at once when
    instances are still due, else when the next one falls due."""
    store_row = Store.get_or_none(Store.name == args["store"])
    if store_row is None:
        return  # the store is gone: its chain ends
    try:
        count, read, more = scrub(ctx, store_row)
        task.report(read)
        delay = 0.0 if more else next_due_seconds(ctx, store_row)
    except Unavailable as e:  # (StoreUnreachable too) looked at again later
        log.warning("%s", e)
        delay = IDLE_RECHECK_SECONDS / 6
    with write_transaction():
        tasks.enqueue(ctx, "scrub", args, delay=delay)


def schedule(ctx):
    """Make sure every store has a scrub queued or running (called at start
    and with each heartbeat: a chain broken by a failure starts again)."""
    active = {args.get("store") for args in tasks.active_args("scrub")}
    for row in Store.select():
        if row.name not in active:
            with write_transaction():
                tasks.enqueue(ctx, "scrub", {"store": row.name}, delay=FIRST_SLICE_SECONDS)
