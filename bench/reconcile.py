"""Benchmark: reconciling a store of a million files (SQLite, this host).

    python bench/reconcile.py [--files 1000000] [--per-folder 1000] [--dir DIR] [--keep]

Builds, in a temporary folder (or DIR), a store of N one-byte files in
folders of `--per-folder` files and a SQLite catalogue recording them
(migrated as a server's; records inserted in bulk, 10,000 rows per
statement), then damages it: 10 files removed (lost), 10 grown (size
mismatch), 10 written beside them (dark). Then, in a fresh process (so
that its peak memory is the reconciliation's alone), times
`reconcile.find` and prints the seconds, the rate in files/s against the
goal (1,000,000 files in under 300 s), the report's counts (which must be
10 of each) and the peak resident memory (ru_maxrss) of that process and
of its `find | sort` children.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GOAL_SECONDS, GOAL_FILES = 300.0, 1_000_000
BATCH = 10_000
DAMAGED = 10


def config(work):
    import settings

    return settings.parse("[server]\nsecret_key = bench\nlog_level = WARNING\n[database]\n"
                          "url = sqlite:///%s\n[store:bench]\npath_prefix = %s\n"
                          % (os.path.join(work, "db.sqlite"), os.path.join(work, "store")))


def paths(n, per_folder):
    """(parent_dirs, name) of the n files: folders 00000, 00001..."""
    for i in range(n):
        yield "%05d" % (i // per_folder), "f%07d.dat" % i


def build(work, n, per_folder):
    """The store's files and their records; returns the seconds it took."""
    import librarian
    import models

    started = time.monotonic()
    store = os.path.join(work, "store")
    for i, (parent, name) in enumerate(paths(n, per_folder)):
        if i % per_folder == 0:
            os.makedirs(os.path.join(store, parent))
        with open(os.path.join(store, parent, name), "wb") as f:
            f.write(b"x")
    models.bind_database(config(work).database["url"])
    with models.db.connection_context():
        librarian.migration_router().run()
        row = models.Store.create(name="bench", ssh_host="localhost", path_prefix=store)
        now = models.utcnow()
        batch = []
        for i, (parent, name) in enumerate(paths(n, per_folder), 1):
            batch.append((parent, name))
            if len(batch) == BATCH or i == n:
                with models.db.atomic():
                    models.File.insert_many(
                        [{"name": nm, "type": "dat", "create_time": now, "size": 1,
                          "md5": "9dd4e461268c8034f5c8564e155c67a6", "source": "bench"}
                         for _, nm in batch]).execute()
                    models.FileInstance.insert_many(
                        [{"store": row.id, "parent_dirs": p, "file": nm} for p, nm in batch]
                    ).execute()
                batch = []
    for i, (parent, name) in enumerate(paths(n, per_folder)):
        if i % (n // DAMAGED) == 1:  # spread over the store
            os.remove(os.path.join(store, parent, name))
            with open(os.path.join(store, parent, name + ".dark"), "wb") as f:
                f.write(b"dark")
        elif i % (n // DAMAGED) == 2:
            with open(os.path.join(store, parent, name), "ab") as f:
                f.write(b"grown")
    return time.monotonic() - started


def measure(work):
    """Run in a fresh process: time `reconcile.find`, print the figures."""
    import context
    import models
    import reconcile

    settings = config(work)
    models.bind_database(settings.database["url"])
    with models.db.connection_context():
        row = models.Store.get(models.Store.name == "bench")
        n = models.FileInstance.select().count()
        started = time.monotonic()
        report = reconcile.find(context.Context(settings), row)
        seconds = time.monotonic() - started
    counts = reconcile.counts(report)
    rate = n / seconds
    print("reconciled %d files in %.1f s: %.0f files/s; goal %d files in < %.0f s: %s"
          % (n, seconds, rate, GOAL_FILES, GOAL_SECONDS,
             "met" if GOAL_FILES / rate < GOAL_SECONDS else "NOT met"))
    print("report: %s (expected %d of each)" % (counts, DAMAGED))
    print("peak memory (ru_maxrss): %.0f MiB in the reconciling process, %.0f MiB in its "
          "find | sort children"
          % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024))
    return 0 if counts == {kind: DAMAGED for kind in reconcile.KINDS} else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=GOAL_FILES)
    parser.add_argument("--per-folder", type=int, default=1000)
    parser.add_argument("--dir", help="build here (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the store and database")
    parser.add_argument("--measure", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.measure)
    if args.files < 3 * DAMAGED:
        parser.error("--files must be at least %d" % (3 * DAMAGED))
    work = args.dir or tempfile.mkdtemp(prefix="librarian-bench-")
    try:
        print("building %d files and records in %s ..." % (args.files, work), flush=True)
        print("built in %.0f s" % build(work, args.files, args.per_folder), flush=True)
        return subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", work],
                              check=False).returncode
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
