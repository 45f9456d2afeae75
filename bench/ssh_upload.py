"""Benchmark: send a generated file as a resumable upload to a
store reached over SSH (an sshd of our own on loopback, as the tests start
it), next to `scp` of the same file to the same host in the same run.

    python bench/ssh_upload.py [--size-mib 1024] [--keep]

Prints the upload rate (MB/s), scp's rate, their ratio (goal >= 0.6) and
the server's memory growth during the upload.

What bounds the ratio: the server sends each chunk on through paramiko
(SFTP writes at the chunk's offset), whose packet layer is Python
(near 270 MB/s on one core here); scp does one transfer, in C. On a
two-core machine the server, sshd and the MD5 thread also share the cores.
Runs a real `librarian.py serve` on a temporary SQLite database; needs
OpenSSH's sshd.
"""

import os
import subprocess
import sys
import time
from contextlib import contextmanager


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import librarian_client  # noqa: E402
from sshd import SSHServer, find_sshd  # noqa: E402
from upload import arguments, make_file, memory_kb, running_server, work_dir  # noqa: E402


@contextmanager
def ssh_store_server(work):
    """For the block, an sshd of our own and a server whose store `bench`
    is a folder reached through it: yields (sshd, server process, URL,
    the store's folder)."""
    if find_sshd() is None:
        sys.exit("OpenSSH's sshd is not installed (Debian: apt install openssh-server)")
    remote = os.path.join(work, "remote-store")
    os.mkdir(remote)
    sshd = SSHServer(os.path.join(work, "sshd")).start()
    try:
        with running_server(work, sshd.store_section("bench", remote)) as (server, url):
            yield sshd, server, url, remote
    finally:
        sshd.stop()


def main():
    args = arguments(__doc__).parse_args()
    size = args.size_mib << 20
    with work_dir("librarian-bench-ssh-", args.keep) as work:
        data = os.path.join(work, "bench.dat")
        make_file(data, size)
        os.sync()
        with ssh_store_server(work) as (sshd, server, url, remote):
            rss_before = memory_kb(server.pid, "VmHWM")

            start = time.perf_counter()
            subprocess.run(["scp", "-q", "-P", str(sshd.port), "-i", sshd.client_key,
                            "-o", "UserKnownHostsFile=" + sshd.known_hosts,
                            "-o", "BatchMode=yes", data,
                            "%s@127.0.0.1:%s/scp.dat" % (sshd.user, remote)], check=True)
            scp_s = time.perf_counter() - start
            os.unlink(os.path.join(remote, "scp.dat"))
            os.sync()

            start = time.perf_counter()
            librarian_client.LibrarianClient(conn_config={
                "url": url, "authenticator": "bench-secret"}).upload(data, "bench.dat",
                                                                    null_obsid=True)
            upload_s = time.perf_counter() - start
            peak = memory_kb(server.pid, "VmHWM")

    mb = size / 1e6
    print("file size:              %d MiB" % args.size_mib)
    print("upload to SSH store:    %8.1f MB/s (%.2f s)" % (mb / upload_s, upload_s))
    print("scp of the same file:   %8.1f MB/s (%.2f s)" % (mb / scp_s, scp_s))
    print("ratio upload/scp:       %8.2f   (goal >= 0.6)" % (scp_s / upload_s))
    print("server memory growth:   %8.1f MB" % ((peak - rss_before) / 1024))


if __name__ == "__main__":
    main()
