"""What operators watch: the archive's state from a handful of aggregate
queries (`snapshot`), served as Prometheus metrics (`GET /metrics`) and as
the Health page (`/health`), and the store-full alert (`check_store_fill`).

`/metrics` carries counts and byte totals only, never a file name:
Prometheus scrapes it without credentials unless `[server] metrics_public =
false`, which asks for a read-only authenticator as a Bearer header.

Cost, for millions of files: one statement per figure, none per store or
per file. The instance table is read in full once (grouped by store,
joined to `file` for sizes) and once more for its few bad rows; `file`,
`task`, `remote_instance` and the `copy_finished` events (`file_event.type`
index) once each. With a million files, 1.2 million instances and half a
million copies, a scrape takes about 3.5 s on PostgreSQL (two cores,
default work_mem). Every store's disk usage is asked at once, in threads,
so that slow store hosts do not add up.
"""

import datetime
import json
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import bottle
import peewee as pw
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import alerts
import webauth
from context import of_request
from errors import LibrarianError
from models import (BaseModel, File, FileEvent, FileInstance, RemoteInstance, Store, is_postgres,
                    utcnow, write_transaction)
from tasks import Task

RECENT_COPIES = 100   # the copies the recent copy rate is averaged over
MAX_LISTED = 100      # bad instances listed on the Health page
fn, SQL = pw.fn, pw.SQL
PER_STORE = (  # metric name, key of `store_counts`, its help text
    ("store_instances", "instances", "Instances on the store"),
    ("store_instance_bytes", "bytes", "Bytes of the instances on the store"),
    ("scrub_verified_instances", "verified",
     "Instances verified within [librarian] scrub_period_days"),
    ("scrub_overdue_instances", "overdue", "Instances never verified, or not within the period"))
COPY_COUNTERS = (  # metric name, help text, for the fields of `copy_totals`
    ("copies", "Copies to other Librarians that succeeded"),
    ("copy_failures", "Copies to other Librarians that failed for good"),
    ("copy_bytes", "Bytes of the files copied to other Librarians"))


def count_if(condition, value=1):
    """SQL: the sum of `value` over the rows meeting `condition`."""
    return fn.SUM(pw.Case(None, [(condition, value)], 0))


def store_counts(period_days, now=None):
    """{store id: {instances, bytes, verified, overdue, corrupt, missing}}
    in one pass over the instance table: `verified` within the last
    `period_days`, `overdue` never or before (what `integrity.due` picks)."""
    cutoff = (now or utcnow()) - datetime.timedelta(days=period_days)
    fi = FileInstance
    query = (fi.select(fi.store, fn.COUNT(SQL("*")), fn.SUM(File.size),
                       count_if(fi.verified_at >= cutoff), count_if(fi.verify_result == "corrupt"),
                       count_if(fi.verify_result == "missing"))
             .join(File).group_by(fi.store).tuples())
    return {sid: dict(instances=n, bytes=int(b or 0), verified=int(v), overdue=n - int(v),
                      corrupt=int(c), missing=int(m)) for sid, n, b, v, c, m in query}


def short_of_copies(needed):
    """How many files have at most `needed` good copies ([librarian]
    deletion_min_other_copies): none of their copies may be deleted. Good
    copies: instances in service (`file.num_instances` less those found
    bad; two on one store count twice, where deletion counts the store
    once) and remote copies whose MD5 and size are the record's, whatever
    their age (deletion has stale ones verified again first). One
    statement: `file` and `remote_instance` scanned once each, and the
    instance table once for its few bad rows."""
    fi, ri = FileInstance, RemoteInstance
    bad = (fi.select(fi.file.alias("name"), fn.COUNT(SQL("*")).alias("n"))
           .where(~fi.in_service()).group_by(fi.file).alias("bad"))
    good = (ri.select(ri.file.alias("name"), ri.md5, ri.size, fn.COUNT(SQL("*")).alias("n"))
            .group_by(ri.file, ri.md5, ri.size).alias("good"))
    return (File.select(fn.COUNT(SQL("*")))
            .join(bad, pw.JOIN.LEFT_OUTER, on=(bad.c.name == File.name)).switch(File)
            .join(good, pw.JOIN.LEFT_OUTER, on=((good.c.name == File.name)
                                                & (good.c.md5 == File.md5)
                                                & (good.c.size == File.size)))
            .where(File.num_instances - fn.COALESCE(bad.c.n, 0) + fn.COALESCE(good.c.n, 0)
                   <= needed).scalar())


def payload_field(key):
    """SQL: the event payload's field `key` as text (NULL when absent, or
    when the payload is no JSON object, as some adopted ones are)."""
    if is_postgres():
        return pw.NodeList((pw.Cast(FileEvent.payload, "json"), SQL("->>"), key))
    return pw.Cast(fn.json_extract(FileEvent.payload, "$." + key), "TEXT")


def copy_totals():
    """{connection: (copies that succeeded, that failed for good, bytes)} of
    the copies to other Librarians, from their `copy_finished` events (the
    record of every copy, also of those adopted from an original
    Librarian). Bytes are the sizes of the files delivered (exact; a copy
    of pre-staged bytes counts too, though they went by other means)."""
    conn, ok = payload_field("connection_name"), payload_field("error_code") == "0"
    query = (FileEvent.select(conn, count_if(ok), fn.COUNT(SQL("*")), count_if(ok, File.size))
             .join(File).where(FileEvent.type == "copy_finished").group_by(SQL("1")).tuples())
    return {c: (int(n_ok), n - int(n_ok), int(size)) for c, n_ok, n, size in query if c}


def copy_rates():
    """{connection: bytes per second} of the last RECENT_COPIES copies that
    sent bytes: their bytes (the payload's kB/s times its seconds) over
    their seconds."""
    query = (FileEvent.select(FileEvent.payload).where(
        (FileEvent.type == "copy_finished") & (payload_field("error_code") == "0"))
        .order_by(FileEvent.id.desc()).limit(RECENT_COPIES).tuples())
    sums = {}
    for (text,) in query:
        p = json.loads(text)
        if (p.get("average_rate") or 0) > 0 and (p.get("duration") or 0) > 0:
            sent, seconds = sums.get(p.get("connection_name"), (0.0, 0.0))
            sums[p.get("connection_name")] = (sent + p["average_rate"] * 1024 * p["duration"],
                                              seconds + p["duration"])
    return {c: sent / seconds for c, (sent, seconds) in sums.items() if c}


def usages(ctx, rows):
    """The `DiskUsage` of each store record in `rows` (None: unreachable),
    all asked at once."""
    def usage(row):
        try:
            return ctx.open_store(row).disk_usage()
        except (OSError, LibrarianError):
            return None
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(rows)))) as pool:
        return list(pool.map(usage, rows))


def fill(usage):
    """The fraction of a store's file system in use, as `df` shows it:
    used / (used + free to us), or None."""
    if usage is None or not usage.used + usage.free:
        return None
    return usage.used / (usage.used + usage.free)


def snapshot(ctx):
    """The archive's state: {files: (count, bytes), stores: [(Store, its
    `store_counts` dict, DiskUsage or None)], tasks: {(kind, state): n},
    copies: `copy_totals`, rates: `copy_rates`, remote: {librarian: n},
    short: `short_of_copies`, min_other_copies}."""
    lib = ctx.settings.librarian
    rows = list(Store.select().order_by(Store.name))
    counts = store_counts(lib["scrub_period_days"])
    zero = dict(instances=0, bytes=0, verified=0, overdue=0, corrupt=0, missing=0)
    n_files, size = File.select(fn.COUNT(SQL("*")), fn.SUM(File.size)).tuples().get()
    task_rows = Task.select(Task.kind, Task.state, fn.COUNT(SQL("*"))) \
        .group_by(Task.kind, Task.state).tuples()
    remote = RemoteInstance.select(RemoteInstance.librarian, fn.COUNT(SQL("*"))) \
        .group_by(RemoteInstance.librarian).tuples()
    return {"files": (n_files, int(size or 0)),
            "stores": [(r, counts.get(r.id, zero), u) for r, u in zip(rows, usages(ctx, rows))],
            "tasks": {(k, s): n for k, s, n in task_rows}, "copies": copy_totals(),
            "rates": copy_rates(), "remote": dict(remote.order_by(RemoteInstance.librarian)),
            "short": short_of_copies(lib["deletion_min_other_copies"]),
            "min_other_copies": lib["deletion_min_other_copies"]}


def families(s):
    """The metric families (all `librarian_...`) of a `snapshot` `s`."""
    G, C = GaugeMetricFamily, CounterMetricFamily
    st = [(row.name, n, u) for row, n, u in s["stores"]]
    up, copies = [(x, u) for x, n, u in st if u is not None], s["copies"].items()
    specs = [("files", G, "Files in the catalogue", [], [((), s["files"][0])]),
             ("file_bytes", G, "Bytes of all files, each once", [], [((), s["files"][1])])]
    specs += [(name, G, doc, ["store"], [((x,), n[key]) for x, n, u in st])
              for name, key, doc in PER_STORE]
    specs += [
        ("store_bad_instances", G, "Instances found corrupt or missing (out of service)",
         ["store", "result"], [((x, r), n[r]) for x, n, u in st for r in ("corrupt", "missing")]),
        ("store_up", G, "Whether the store's disk usage could be read", ["store"],
         [((x,), int(u is not None)) for x, n, u in st]),
        ("store_capacity_bytes", G, "Capacity of the store's file system", ["store"],
         [((x,), u.total) for x, u in up]),
        ("store_free_bytes", G, "Bytes the server can still write on the store", ["store"],
         [((x,), u.free) for x, u in up]),
        ("tasks", G, "Background tasks", ["kind", "state"], s["tasks"].items()),
        ("copy_rate_bytes_per_second", G, "Average rate of the last %d copies that sent bytes"
         % RECENT_COPIES, ["connection"], [((c,), r) for c, r in s["rates"].items()]),
        ("remote_instances", G, "Copies held by other Librarians", ["librarian"],
         [((x,), n) for x, n in s["remote"].items()]),
        ("files_short_of_copies", G, "Files with at most [librarian] deletion_min_other_copies "
         "good copies", [], [((), s["short"])])]
    specs += [(name, C, doc, ["connection"], [((c,), t[i]) for c, t in copies])
              for i, (name, doc) in enumerate(COPY_COUNTERS)]
    for name, kind, doc, labels, samples in specs:
        fam = kind("librarian_" + name, doc, labels=labels)
        for values, value in samples:
            fam.add_metric(list(values), value)
        yield fam


class Collector:
    """Runs the queries of `snapshot` at each scrape (no `describe`: the
    registry then never collects just to learn the names)."""

    def __init__(self, ctx):
        self.ctx = ctx

    def collect(self):
        return families(snapshot(self.ctx))


CACHE_SECONDS = 15.0  # scrapes within this share one computation
_cache = weakref.WeakKeyDictionary()  # context -> (monotonic time, body)
_cache_lock = threading.Lock()


def endpoint():
    """GET /metrics: the Prometheus text exposition of `Collector`. Its
    queries scan the catalogue, so one computation serves every scrape of
    the next CACHE_SECONDS, and scrapes arriving meanwhile wait for it
    rather than run their own (callers without credentials cannot load the
    database)."""
    ctx = of_request()
    if not ctx.settings.server["metrics_public"]:
        webauth.authenticate(webauth.bearer_token(), "read-only", challenge=True)
    with _cache_lock:
        at, body = _cache.get(ctx, (None, None))
        if at is None or time.monotonic() - at > CACHE_SECONDS:
            registry = CollectorRegistry()
            registry.register(Collector(ctx))
            body = generate_latest(registry)
            _cache[ctx] = (time.monotonic(), body)
    bottle.response.content_type = CONTENT_TYPE_LATEST
    return body


def bad_instances(limit=MAX_LISTED):
    """The instances out of service, latest finding first, at most
    `limit`: (file name, store name, parent_dirs, result, verified_at)."""
    fi = FileInstance
    return list(fi.select(fi.file, Store.name, fi.parent_dirs, fi.verify_result, fi.verified_at)
                .join(Store).where(~fi.in_service())
                .order_by(fi.verified_at.desc(), fi.file).limit(limit).tuples())


def health_page():
    """GET /health: `snapshot` at a glance, for a logged-in person."""
    import pages

    pages.person()
    s = snapshot(of_request())
    failed = sum(n for (kind, state), n in s["tasks"].items() if state == "failed")
    return pages.render("health", "Health", s=s, bad=bad_instances(), failed=failed, fill=fill,
                        max_listed=MAX_LISTED)


_reported = weakref.WeakKeyDictionary()  # context -> names of the stores reported full
_reported_lock = threading.Lock()       # heartbeats of several threads may check at once


class StoreSample(BaseModel):
    """A store's used and free space (bytes) on a UTC `day`: the last
    reading of that day (`check_store_fill` records one with each look)."""

    store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
    day = pw.DateField()
    used_bytes = pw.BigIntegerField()
    free_bytes = pw.BigIntegerField()

    class Meta:
        table_name = "store_sample"
        indexes = ((("store", "day"), True),)


def record_sample(row, usage, day=None):
    """Keep `usage` (total, used, free) as the store `row`'s sample of `day`
    (default today, UTC), replacing an earlier one of that day."""
    day = day or utcnow().date()
    with write_transaction():
        (StoreSample.insert(store=row, day=day, used_bytes=usage.used, free_bytes=usage.free)
         .on_conflict(conflict_target=[StoreSample.store, StoreSample.day],
                      update={StoreSample.used_bytes: usage.used,
                              StoreSample.free_bytes: usage.free}).execute())


def check_store_fill(ctx):
    """Record each reachable store's space of the day (`record_sample`),
    and alert `store_full` for each store filled beyond `[librarian]
    store_full_fraction` (see `fill`), once per crossing: a store is
    reported again only after it went below. An unreachable store changes
    nothing. Returns the names of the stores reported now."""
    limit = ctx.settings.librarian["store_full_fraction"]
    rows = list(Store.select().order_by(Store.name))
    reported_now = []
    for row, usage in zip(rows, usages(ctx, rows)):
        fraction = fill(usage)
        if fraction is None:
            continue
        record_sample(row, usage)
        with _reported_lock:
            reported = _reported.setdefault(ctx, set())
            news = fraction > limit and row.name not in reported
            (reported.add if fraction > limit else reported.discard)(row.name)
        if news:
            alerts.send(ctx, "store_full", "store %s is %.1f%% full (%d of %d bytes free), above "
                        "[librarian] store_full_fraction %g" % (row.name, 100 * fraction,
                                                                usage.free, usage.total, limit),
                        store_name=row.name, capacity_bytes=usage.total, free_bytes=usage.free)
            reported_now.append(row.name)
    return reported_now
