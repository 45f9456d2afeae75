"""Benchmark: copies between two Librarians on loopback by standing order,
against `rsync` of the same files in the same run.

    python bench/standing_copy.py [--files 8] [--size-mib 256] [--workers 4] [--keep]

Starts two real `librarian.py serve` (SQLite, a local store each); the
sender has a `[connection:receiver]` and `--workers` task workers. The
files are uploaded to the sender first (not timed), then a standing order
that matches them is created and the time until every file is registered
at the receiver is measured. The reference copies the same files with
`rsync -a --whole-file` from the sender's store to a fresh folder on the
same disk (what an operator would otherwise do; no checksums, no
registration). Both start with the page cache dropped (where allowed:
root on Linux) and end when their bytes are on the disk (`sync`). Prints
both aggregate rates (MB/s) and their ratio (goal >= 0.7), and `dd`'s rate
for one of the files (every byte is read from and written to this disk
once, which bounds both).
"""

import os
import subprocess
import sys
import time

import requests

from upload import ROOT, arguments, make_file, running_server, work_dir

sys.path.insert(0, ROOT)

import librarian_client  # noqa: E402

ADMIN = {"Authorization": "Bearer bench-secret"}


def call(url, operation, **args):
    reply = requests.post(url + "api/" + operation, json=args, headers=ADMIN, timeout=120)
    reply.raise_for_status()
    return reply.json()


def registered_at(url, pattern):
    """How many files matching `pattern` have an instance at `url`."""
    return len(call(url, "search", search='{"name-matches": "%s", '
                    '"num-instances-greater-than": 0}' % pattern,
                    output_format="file-listing-json")["results"])


def cold_cache():
    """Write out dirty pages and drop the page cache (as root on Linux), so
    that both copies read their sources from the disk; False if not allowed."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def durably(func):
    """Seconds that `func()` takes, until what it wrote is on the disk."""
    start = time.perf_counter()
    func()
    os.sync()
    return time.perf_counter() - start


def main():
    parser = arguments(__doc__)
    parser.set_defaults(size_mib=256)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--workers", type=int, default=4,
                        help="the sender's [server] workers (copies in flight)")
    args = parser.parse_args()
    size, n = args.size_mib << 20, args.files
    with work_dir("librarian-bench-copy-", args.keep) as work:
        receiver_dir, sender_dir = (os.path.join(work, d) for d in ("receiver", "sender"))
        os.makedirs(receiver_dir)
        os.makedirs(sender_dir)
        with running_server(receiver_dir, "[store:there]\npath_prefix = %s\n"
                            % os.path.join(receiver_dir, "store")) as (_, receiver):
            # The order's first sweep at once (the batching delay is for uploads).
            sender_extra = ("[store:here]\npath_prefix = %s\n"
                            "[connection:receiver]\nurl = %s\nauthenticator = bench-secret\n"
                            "[librarian]\nstanding_order_delay = 0.1\n"
                            % (os.path.join(sender_dir, "store"), receiver))
            with running_server(sender_dir, sender_extra,
                                {"workers": args.workers}) as (_, sender):
                client = librarian_client.LibrarianClient(conn_config={
                    "url": sender, "authenticator": "bench-secret"})
                source = os.path.join(work, "bench.dat")
                for i in range(n):
                    make_file(source, size)
                    client.upload(source, "copy/bench.%d.dat" % i, null_obsid=True)
                os.unlink(source)

                def by_standing_order():
                    call(sender, "create_standing_order", name="bench",
                         search='{"name-matches": "bench.%.dat"}', conn_name="receiver")
                    while registered_at(receiver, "bench.%.dat") < n:
                        time.sleep(0.05)
                cold = cold_cache()
                copy_s = durably(by_standing_order)
        store = os.path.join(sender_dir, "store", "copy")
        cold = cold_cache() and cold
        rsync_s = durably(lambda: subprocess.run(
            ["rsync", "-a", "--whole-file", store + "/", os.path.join(work, "rsync") + "/"],
            check=True))
        cold_cache()
        dd_s = durably(lambda: subprocess.run(
            ["dd", "if=" + os.path.join(store, "bench.0.dat"),
             "of=" + os.path.join(work, "dd.dat"), "bs=%d" % (32 << 20), "status=none"],
            check=True))
    mb = n * size / 1e6
    print("files:                %d x %d MiB, sender workers %d" % (n, args.size_mib,
                                                                    args.workers))
    print("page cache:           %s" % ("dropped before each copy (sources read from the "
                                         "disk)" if cold else "could not be dropped (not "
                                         "root?): sources may be read from memory"))
    print("standing-order copy:  %8.1f MB/s (%.2f s, from the order to the last "
          "registration, then sync)" % (mb / copy_s, copy_s))
    print("rsync of same files:  %8.1f MB/s (%.2f s, then sync)" % (mb / rsync_s, rsync_s))
    print("ratio copy/rsync:     %8.2f   (goal >= 0.7)" % (rsync_s / copy_s))
    print("dd of one file:       %8.1f MB/s (read and written on this disk, then sync)"
          % (size / 1e6 / dd_s))


if __name__ == "__main__":
    main()
