"""A real OpenSSH server for the tests of stores on other hosts.

`SSHServer(folder)` writes a host key, a client key, `authorized_keys`,
`known_hosts` and an `sshd_config` into `folder`, and runs `sshd -D` as a
child process on a free loopback port. Logging in as the user running the
tests with the client key gives a shell on this machine, which the tests
treat as "another host".
"""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time

SSHD_PATHS = ("/usr/sbin/sshd", "/usr/local/sbin/sshd", "/sbin/sshd")


def find_sshd():
    """Path of OpenSSH's sshd, or None."""
    found = shutil.which("sshd")
    if found:
        return found
    return next((p for p in SSHD_PATHS if os.access(p, os.X_OK)), None)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid):
    """Pids of every process below `pid` (sshd's per-connection children
    start their own sessions, so a process group does not hold them)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class SSHServer:
    """sshd on 127.0.0.1:`port`; `user`, `client_key`, `known_hosts` are
    what a client needs; `extra_config` lines end its sshd_config."""

    def __init__(self, folder, extra_config=""):
        self.folder = str(folder)
        os.makedirs(self.folder, exist_ok=True)
        self.port = _free_port()
        self.user = getpass.getuser()
        self.host_key = os.path.join(self.folder, "host_key")
        self.client_key = os.path.join(self.folder, "client_key")
        self.known_hosts = os.path.join(self.folder, "known_hosts")
        self.config = os.path.join(self.folder, "sshd_config")
        self.proc = None
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key],
                           check=True)
        shutil.copy(self.client_key + ".pub", os.path.join(self.folder, "authorized_keys"))
        with open(self.host_key + ".pub") as f:
            kind, key = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write("[127.0.0.1]:%d %s %s\n" % (self.port, kind, key))
        with open(self.config, "w") as f:
            f.write("Port %d\nListenAddress 127.0.0.1\nHostKey %s\n"
                    "AuthorizedKeysFile %s/authorized_keys\nPasswordAuthentication no\n"
                    "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                    "PermitRootLogin prohibit-password\nPidFile none\n"
                    "Subsystem sftp internal-sftp\n%s"
                    % (self.port, self.host_key, self.folder, extra_config))

    def start(self):
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation
        self.log = open(os.path.join(self.folder, "sshd.log"), "ab")
        self.proc = subprocess.Popen([find_sshd(), "-D", "-e", "-f", self.config],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sshd exited: %s" % self.read_log())
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not start: %s" % self.read_log())

    def pause(self, paused=True):
        """Stop (SIGSTOP) sshd and its sessions, as a host that hangs with
        its connections open; `pause(False)` lets them go on (SIGCONT)."""
        for pid in [self.proc.pid] + _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGSTOP if paused else signal.SIGCONT)
            except ProcessLookupError:
                pass

    def read_log(self):
        with open(os.path.join(self.folder, "sshd.log"), errors="replace") as f:
            return f.read()

    def stop(self):
        """Kill sshd and every session it runs (as a host going down)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        for pid in _descendants(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.kill()
        self.proc.wait(10)
        self.log.close()

    def store_section(self, name, path_prefix, **extra):
        """A `[store:NAME]` configuration section reaching `path_prefix`
        through this server."""
        keys = {"path_prefix": path_prefix, "ssh_host": "127.0.0.1", "transport": "ssh",
                "ssh_port": self.port, "ssh_user": self.user, "ssh_key": self.client_key,
                "known_hosts": self.known_hosts, "ssh_timeout": 10}
        keys.update(extra)
        return "[store:%s]\n%s\n" % (name, "".join("%s = %s\n" % kv for kv in keys.items()))
