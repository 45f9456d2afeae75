"""Benchmark: several clients download the same file at once from a store
reached over SSH (an sshd of our own on loopback), and the server's memory
is watched.

    python bench/ssh_download.py [--size-mib 1024] [--clients 8] [--keep]

Prints the combined download rate (MB/s) and the server's peak resident
memory growth during the downloads. Goal: growth flat in the file's size,
below what the clients may hold: each at most the read window of its SSH
channel (sshfs.READ_WINDOW_BYTES, 8 MiB) and a chunk or two, so 64 MiB and
a little for 8 clients, whether the file has 100 MiB or 10 GiB. Runs a real
`librarian.py serve` on a temporary SQLite database; needs OpenSSH's sshd.
"""

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import requests

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import librarian_client  # noqa: E402
from librarian_client import CHUNK  # noqa: E402
from ssh_upload import ssh_store_server  # noqa: E402
from stores.ssh import READ_WINDOW_BYTES  # noqa: E402
from upload import arguments, make_file, memory_kb, work_dir  # noqa: E402

AUTH = {"Authorization": "Bearer bench-secret"}


def download(url):
    """MD5 of the body of GET `url`, read in 1 MiB pieces."""
    md5 = hashlib.md5()
    with requests.get(url, headers=AUTH, stream=True, timeout=3600) as resp:
        resp.raise_for_status()
        for chunk in resp.iter_content(1 << 20):
            md5.update(chunk)
    return md5.hexdigest()


def main():
    parser = arguments(__doc__)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    size = args.size_mib << 20
    with work_dir("librarian-bench-ssh-", args.keep) as work:
        data = os.path.join(work, "bench.dat")
        make_file(data, size)
        with ssh_store_server(work) as (_, server, url, _):
            md5 = librarian_client.LibrarianClient(conn_config={
                "url": url, "authenticator": "bench-secret"}).upload(
                    data, "bench.dat", null_obsid=True)["md5"]
            os.unlink(data)
            rss_before = memory_kb(server.pid, "VmRSS")
            peak = rss_before
            start = time.perf_counter()
            with ThreadPoolExecutor(args.clients) as pool:
                futures = [pool.submit(download, url + "api/download/bench.dat")
                           for _ in range(args.clients)]
                while not all(f.done() for f in futures):
                    peak = max(peak, memory_kb(server.pid, "VmRSS"))
                    time.sleep(0.05)
            elapsed = time.perf_counter() - start
            assert all(f.result() == md5 for f in futures), "a download differs"

    mb = size * args.clients / 1e6
    print("file size:              %d MiB, %d clients at once" % (args.size_mib, args.clients))
    print("combined download rate: %8.1f MB/s (%.2f s)" % (mb / elapsed, elapsed))
    print("server RSS before:      %8.1f MB" % (rss_before * 1024 / 1e6))
    bound = args.clients * (READ_WINDOW_BYTES + 2 * CHUNK) / 1e6
    print("server peak RSS growth: %8.1f MB  (goal: below %.0f MB whatever the file size)"
          % ((peak - rss_before) * 1024 / 1e6, bound))


if __name__ == "__main__":
    main()
