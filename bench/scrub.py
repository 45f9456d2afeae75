"""Benchmark: the fixity scrub on a local store next to `md5sum` of the same
files in the same run.

    python bench/scrub.py [--files 64] [--file-mib 32] [--rate-mb 100] [--keep]

Writes `--files` files of `--file-mib` MiB of random bytes into a store,
registers them in a fresh SQLite database, then times, with the files warm
in the page cache for both: `md5sum` of all of them (one process); one
unthrottled scrub pass (`integrity.scrub`, scrub_bytes_per_second = 0);
and a throttled pass over the same files at `--rate-mb` MB/s. Prints
the rates, the unthrottled ratio to md5sum (goal >= 0.9) and the
throttled rate's deviation from the configured one (goal within 10 %).
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import integrity  # noqa: E402
import librarian  # noqa: E402
import models  # noqa: E402
import settings  # noqa: E402


def make_store(work, count, size):
    """`count` files of `size` bytes in `work/store/data`; their MD5s."""
    folder = os.path.join(work, "store", "data")
    os.makedirs(folder)
    md5s = {}
    for i in range(count):
        block = os.urandom(size)
        name = "bench.%04d.dat" % i
        with open(os.path.join(folder, name), "wb") as f:
            f.write(block)
        md5s[name] = hashlib.md5(block).hexdigest()
    return folder, md5s


def register(md5s, size):
    """Records of the files: one File and one FileInstance each."""
    store = models.Store.get(models.Store.name == "bench")
    now = models.utcnow()
    with models.write_transaction():
        for name, md5 in md5s.items():
            models.File.create(name=name, type="dat", create_time=now, size=size, md5=md5,
                               source="bench")
            models.FileInstance.create(store=store, parent_dirs="data", file=name)


def timed_scrub(context, store):
    """Seconds and bytes of one full pass (every instance due again)."""
    models.FileInstance.update(verified_at=None, verify_result=None).execute()
    start = time.perf_counter()
    count, read, more = integrity.scrub(context, store, seconds=1e9)
    seconds = time.perf_counter() - start
    bad = models.FileInstance.select().where(models.FileInstance.verify_result != "ok").count()
    assert not more and bad == 0, "every file verified, none bad"
    return seconds, count


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--file-mib", type=int, default=32)
    parser.add_argument("--rate-mb", type=float, default=100.0)
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    size = args.file_mib << 20
    work = tempfile.mkdtemp(prefix="librarian-bench-scrub-")
    try:
        folder, md5s = make_store(work, args.files, size)
        config_path = os.path.join(work, "librarian.ini")
        with open(config_path, "w") as f:
            f.write("[server]\nsecret_key = bench\nlog_level = WARNING\n[database]\n"
                    "url = sqlite:///%s\n[librarian]\nscrub_bytes_per_second = 0\n"
                    "[store:bench]\npath_prefix = %s\n"
                    % (os.path.join(work, "db.sqlite"), os.path.join(work, "store")))
        config = settings.load(config_path)
        app = librarian.setup(config)
        context = app.config["librarian.context"]
        with models.db.connection_context():
            librarian.migration_router().run()
            librarian.sync_config_records(config)
            register(md5s, size)
            store = models.Store.get(models.Store.name == "bench")
            paths = [os.path.join(folder, n) for n in sorted(md5s)]
            subprocess.run(["cat"] + paths, stdout=subprocess.DEVNULL, check=True)  # warm
            start = time.perf_counter()
            subprocess.run(["md5sum"] + paths, stdout=subprocess.DEVNULL, check=True)
            md5sum_s = time.perf_counter() - start
            scrub_s, count = timed_scrub(context, store)
            config.librarian["scrub_bytes_per_second"] = int(args.rate_mb * 1e6)
            paced_s, _ = timed_scrub(context, store)
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    mb = args.files * size / 1e6
    paced_rate = mb / paced_s
    print("files:                %d of %d MiB (%.0f MB)" % (args.files, args.file_mib, mb))
    print("md5sum:               %8.1f MB/s (%.2f s)" % (mb / md5sum_s, md5sum_s))
    print("scrub, unthrottled:   %8.1f MB/s (%.2f s, %d instances)" % (mb / scrub_s, scrub_s,
                                                                        count))
    print("ratio scrub/md5sum:   %8.2f   (goal >= 0.9)" % (md5sum_s / scrub_s))
    print("scrub at %.0f MB/s:   %8.1f MB/s (%.2f s): %+.1f %% of the rate (goal within 10 %%)"
          % (args.rate_mb, paced_rate, paced_s, 100 * (paced_rate / args.rate_mb - 1)))


if __name__ == "__main__":
    main()
