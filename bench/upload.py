"""Benchmark: send a generated file as a resumable upload (tus, in chunks
of the server's body bound, by `LibrarianClient.upload`) on loopback and
compare with `md5sum` of the same file in the same run.

    python bench/upload.py [--size-mib 1024] [--keep]

Prints the upload rate (MB/s), md5sum's rate, their ratio (goal >= 0.8),
`dd`'s rate writing the same file to the same disk and the upload's ratio
to it (an upload writes each byte once, so the disk's write speed bounds it),
the server's peak resident memory and its growth during the uploads (goal:
<= threads x chunk size + 64 MB), and, for a second upload whose connection
is dropped once at half way, the bytes sent against the file's size (goal:
<= 1.1). Runs a real `librarian.py serve` on a temporary SQLite database
and store. Each byte is received into memory (at most one chunk per
request) and written to staging once.
"""

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

import requests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import librarian_client  # noqa: E402


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kb(pid, field):
    """VmRSS / VmHWM of a process, in kB (Linux /proc)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def cpu_seconds(pid):
    """User + system CPU time of a process so far, in seconds (Linux /proc)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_file(path, size):
    """A file of `size` bytes of pseudo-random data, written in 64 MiB blocks."""
    block = os.urandom(64 << 20)
    with open(path, "wb") as f:
        left = size
        while left > 0:
            f.write(block[:min(left, len(block))])
            left -= len(block)


def start_server(work, store_section, server_extra=None):
    """Start `librarian.py serve` on a new SQLite database in `work` with
    the `[store:...]` section `store_section` (and any further sections
    after it), the `[server]` keys of the dict `server_extra`, and an admin
    source whose
    authenticator is 'bench-secret'; returns (process, base URL) once it
    has answered one authenticated call (Argon2 verification itself peaks
    at its 64 MiB memory cost, which is not what the benchmarks measure)."""
    port = free_port()
    config = os.path.join(work, "librarian.ini")
    with open(config, "w") as f:
        f.write("[server]\nport = %d\nsecret_key = bench\nlog_level = WARNING\n%s"
                "[database]\nurl = sqlite:///%s\n"
                "[source:bench]\nauthenticator = bench-secret\nlevel = admin\n%s"
                % (port, "".join("%s = %s\n" % kv for kv in (server_extra or {}).items()),
                   os.path.join(work, "db.sqlite"), store_section))
    py = sys.executable
    subprocess.run([py, os.path.join(ROOT, "librarian.py"), "migrate", "--config", config],
                   check=True, capture_output=True)
    server = subprocess.Popen([py, os.path.join(ROOT, "librarian.py"), "serve", "--config",
                               config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d/" % port
    for _ in range(100):
        try:
            requests.get(url, timeout=1)
            break
        except requests.ConnectionError:
            time.sleep(0.1)
    requests.post(url + "api/ping", data={"request": '{"authenticator": "bench-secret"}'},
                  timeout=60).raise_for_status()
    return server, url


def arguments(doc):
    """An ArgumentParser with the benchmarks' --size-mib and --keep."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    return parser


@contextmanager
def work_dir(prefix, keep):
    """A temporary folder for a run, removed afterwards unless `keep`."""
    work = tempfile.mkdtemp(prefix=prefix)
    try:
        yield work
    finally:
        if keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


@contextmanager
def running_server(work, store_section, server_extra=None):
    """`start_server` for the block, stopped after it: yields (process, URL)."""
    server, url = start_server(work, store_section, server_extra)
    try:
        yield server, url
    finally:
        server.terminate()
        server.wait(10)


THREADS = 16
CHUNK = 32 << 20  # the server's default [server] max_body_bytes, and the client's chunks


class DropOnce:
    """Counts the bytes PATCHed, and drops the connection once, before the
    request that would pass half of `size`."""

    def __init__(self, size):
        self.size, self.sent, self.dropped = size, 0, False
        self.real = librarian_client.requests.Session.request

    def __call__(self, session, method, url, **kw):
        if method == "PATCH":
            self.sent += len(kw["data"])  # the dropped chunk too: as if it were lost whole
            if not self.dropped and self.sent > self.size // 2:
                self.dropped = True
                raise requests.ConnectionError("dropped by the benchmark")
        return self.real(session, method, url, **kw)


def main():
    args = arguments(__doc__).parse_args()
    size = args.size_mib << 20
    with work_dir("librarian-bench-", args.keep) as work:
        data = os.path.join(work, "bench.dat")
        make_file(data, size)
        os.sync()  # so that writing it back does not compete with the upload
        with running_server(work, "[store:bench]\npath_prefix = %s\n"
                            % os.path.join(work, "store")) as (server, url):
            client = librarian_client.LibrarianClient(conn_config={
                "url": url, "authenticator": "bench-secret"})
            rss_before = memory_kb(server.pid, "VmHWM")

            # md5sum of the same file, warm in the page cache like the upload.
            start = time.perf_counter()
            md5 = subprocess.run(["md5sum", data], check=True, capture_output=True,
                                 text=True).stdout.split()[0]
            md5sum_s = time.perf_counter() - start

            # dd of the same file to the same disk in the same blocks: what writing the
            # bytes costs here (once the page cache is busy, this machine's writes slow).
            start = time.perf_counter()
            subprocess.run(["dd", "if=" + data, "of=" + os.path.join(work, "dd.dat"),
                            "bs=%d" % CHUNK, "status=none"], check=True)
            dd_s = time.perf_counter() - start
            os.unlink(os.path.join(work, "dd.dat"))

            server_cpu, client_cpu = cpu_seconds(server.pid), own_cpu_seconds()
            start = time.perf_counter()
            reply = client.upload(data, "bench.dat", null_obsid=True, chunk_size=CHUNK)
            upload_s = time.perf_counter() - start
            server_cpu = cpu_seconds(server.pid) - server_cpu
            client_cpu = own_cpu_seconds() - client_cpu
            assert reply["md5"] == md5 and reply["created"]

            # The same bytes under another name, the connection dropped once.
            again = os.path.join(work, "bench2.dat")
            os.link(data, again)
            counter = DropOnce(size)
            librarian_client.requests.Session.request = \
                lambda session, method, url, **kw: counter(session, method, url, **kw)
            try:
                reply = client.upload(again, "bench2.dat", null_obsid=True, chunk_size=CHUNK)
            finally:
                librarian_client.requests.Session.request = counter.real
            assert counter.dropped and reply["md5"] == md5
            peak = memory_kb(server.pid, "VmHWM")

    mb = size / 1e6
    print("file size:            %d MiB, chunks of %d MiB" % (args.size_mib, CHUNK >> 20))
    print("resumable upload:     %8.1f MB/s (%.2f s)" % (mb / upload_s, upload_s))
    print("md5sum of same file:  %8.1f MB/s (%.2f s)" % (mb / md5sum_s, md5sum_s))
    print("ratio upload/md5sum:  %8.2f   (goal >= 0.8)" % (md5sum_s / upload_s))
    print("CPU of the upload:    server %.2f s, client %.2f s; on %d cores at best %.2f s "
          "(ratio %.2f)" % (server_cpu, client_cpu, os.cpu_count(),
                            (server_cpu + client_cpu) / os.cpu_count(),
                            md5sum_s * os.cpu_count() / (server_cpu + client_cpu)))
    print("  (both ends compute the MD5, each at most md5sum's speed)")
    print("dd of same file:      %8.1f MB/s (%.2f s)" % (mb / dd_s, dd_s))
    print("ratio upload/dd:      %8.2f   (an upload writes each byte once)" % (dd_s / upload_s))
    print("server peak RSS before upload: %.1f MB" % (rss_before / 1024))
    print("server peak RSS:      %8.1f MB" % (peak / 1024))
    print("server memory growth: %8.1f MB  (goal <= %d threads x %d MiB + 64 MB = %d MB)"
          % ((peak - rss_before) / 1024, THREADS, CHUNK >> 20,
             (THREADS * CHUNK >> 20) * 1.048576 + 64))
    print("interrupted once: sent %.3f x the file (goal <= 1.1)" % (counter.sent / size))


if __name__ == "__main__":
    main()
