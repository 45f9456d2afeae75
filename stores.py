"""Store operations: where bytes live, how they arrive and how they leave.

A store is a directory tree at `path_prefix` on the host `ssh_host`. Every
arriving file or directory is first written under the store's staging area
(`path_prefix/.staging/`, on the same file system so that the final move is
an atomic rename), checked, made read-only, and only then moved to
`path_prefix/parent_dirs/name`. Nothing half-written is ever visible at a
final path.

Two layers:

- A *file system* (`LocalFS`, or `SSHFS` for a store on another host,
  reached with paramiko: SFTP for bytes and listings, exec channels for
  `md5sum`, `chmod`, `rm -r`, `df`) offers the same small set of primitives
  on absolute paths of the store's host.
- `StoreAccess` holds the store logic once, on top of either: staging,
  receiving streams, the atomic move, deletion, tar streams, crash recovery.
  `open_store(row)` picks the file system from `[store:NAME] transport`.

Checksums follow the definition shared by the Librarians of the network,
which lives in `librarian_client` (`path_md5`, `directory_digest`) so that
client and server compute it in one way.
"""

import collections
import errno
import hashlib
import logging
import os
import posixpath
import shlex
import shutil
import socket
import stat
import tarfile
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import uvmeta
from settings import names_this_host
from librarian_client import directory_digest, path_md5, ssh_failure_reason
from models import LibrarianError, check_file_name

log = logging.getLogger("librarian")

CHUNK = 1 << 20  # bytes per read/write when streaming
STAGING = ".staging"
DESTINATION_MARKER = ".librarian-destination"  # in a staging dir: where its bytes are going
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4096  # Linux: a store path gets half, the prefix the rest
MIRIAD_HEAD_BYTES = 16 << 20  # of `visdata`: enough for the first record aipy reads


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------

def split_store_path(store_path):
    """Check a store path (relative, `/`-separated) and return
    `(parent_dirs, name)`. Refuses absolute paths, `..`, the staging area and
    bad names with `LibrarianError(400)`; empty and `.` components are
    dropped."""
    if not isinstance(store_path, str) or not store_path:
        raise LibrarianError(400, "store path must be a non-empty string")
    if "\0" in store_path:
        raise LibrarianError(400, "store path may not contain a NUL character")
    if store_path.startswith("/"):
        raise LibrarianError(400, "store path %r must be relative" % store_path)
    parts = [p for p in store_path.split("/") if p not in ("", ".")]
    if not parts or store_path.endswith("/"):
        raise LibrarianError(400, "store path %r names no file: it must end in the file's "
                             "name" % store_path)
    if ".." in parts:
        raise LibrarianError(400, "store path %r may not contain '..'" % store_path)
    if parts[0] == STAGING:
        raise LibrarianError(400, "store path %r points into the staging area" % store_path)
    name = check_file_name(parts[-1])
    check_name_lengths(parts, store_path)
    if name == DESTINATION_MARKER:
        raise LibrarianError(400, "the name %r is reserved for the Librarian's own use"
                             % DESTINATION_MARKER)
    return "/".join(parts[:-1]), name


def check_name_lengths(parts, path):
    """Refuse (400) a path with a component longer than NAME_MAX_BYTES or a
    total longer than PATH_MAX_BYTES (in UTF-8), the limits of Linux file
    systems, before any store is asked."""
    if any(len(p.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES for p in parts):
        raise LibrarianError(400, "a name in %r is longer than %d bytes, too long for the store's "
                             "file system" % (path, NAME_MAX_BYTES))
    if len(path.encode("utf-8", "surrogatepass")) > PATH_MAX_BYTES // 2:
        raise LibrarianError(400, "the path %r is longer than %d bytes" % (path,
                                                                         PATH_MAX_BYTES // 2))


def is_inside(path, root):
    """Whether the normalised absolute `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


# ---------------------------------------------------------------------------
# Streams
# ---------------------------------------------------------------------------

class BodyReader:
    """A file-like reader over a request body that stops at `length` bytes
    (None: at EOF) and raises `LibrarianError(400)` when the body ends early."""

    def __init__(self, stream, length):
        self.stream = stream
        self.remaining = length

    def read(self, n=-1):
        if self.remaining is None:
            return self.stream.read(n if n and n > 0 else CHUNK)
        if self.remaining <= 0:
            return b""
        want = self.remaining if n is None or n < 0 else min(n, self.remaining)
        data = self.stream.read(want)
        if not data:
            raise LibrarianError(400, "request body ended %d bytes before its declared "
                                 "Content-Length" % self.remaining)
        self.remaining -= len(data)
        return data


def _copy_hashing(reader, out):
    """Copy `reader` to the open file `out`; returns (size, md5 hex).

    MD5 runs in a second thread, one chunk behind the writes (hashlib
    releases the GIL on large buffers), so that hashing and writes overlap
    instead of adding up. At most two chunks are in flight."""
    digest = hashlib.md5()
    size = 0
    pending = None
    with ThreadPoolExecutor(max_workers=1) as hasher:
        while True:
            chunk = reader.read(CHUNK)
            if not chunk:
                break
            if pending is not None:
                pending.result()
            pending = hasher.submit(digest.update, chunk)
            out.write(chunk)
            size += len(chunk)
        if pending is not None:
            pending.result()
    return size, digest.hexdigest()


def _read_exactly(f, size, label):
    """Yield the `size` bytes of the open file `f` in chunks; IOError if it
    is shorter."""
    sent = 0
    while sent < size:
        chunk = f.read(min(CHUNK, size - sent))
        if not chunk:
            raise IOError("%s shrank while being read" % label)
        sent += len(chunk)
        yield chunk


# ---------------------------------------------------------------------------
# File systems: the primitives the store logic needs, on absolute paths
# ---------------------------------------------------------------------------

DiskUsage = collections.namedtuple("DiskUsage", "total used free")


class LocalFS:
    """The file system of this host."""

    where = "this host"

    def lstat(self, path):
        """`os.lstat`; FileNotFoundError when missing."""
        return os.lstat(path)

    def lexists(self, path):
        return os.path.lexists(path)

    def scandir(self, path):
        """[(name, lstat result)] of a directory's entries, sorted by name."""
        with os.scandir(path) as it:
            return sorted((e.name, e.stat(follow_symlinks=False)) for e in it)

    def mkdir(self, path, mode=0o755):
        os.mkdir(path, mode)

    def makedirs(self, path):
        os.makedirs(path, exist_ok=True)

    def open(self, path, mode):
        """A binary file: mode 'rb', or 'xb' (new file, never replacing)."""
        return open(path, mode)

    def write_text(self, path, text):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def read_text(self, path):
        with open(path, encoding="utf-8") as f:
            return f.read()

    def rename_new(self, src, dst):
        """Move `src` to the new path `dst` atomically; a file never
        replaces an existing entry (link, then unlink)."""
        if os.path.isdir(src) and not os.path.islink(src):
            os.rename(src, dst)
        else:
            os.link(src, dst)
            os.unlink(src)

    def unlink(self, path):
        os.unlink(path)

    def chmod(self, path, mode):
        os.chmod(path, mode)

    def realpath(self, path):
        return os.path.realpath(path)

    def remove_tree(self, path):
        """Remove a file or tree, first making its directories writable
        (files and links keep their modes: a hard link elsewhere must not
        change)."""
        if not os.path.lexists(path):
            return
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, dirnames, filenames in os.walk(path):
                os.chmod(dirpath, 0o755)
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def make_readonly(self, path):
        """Files 0444, sub-directories 0555; the top directory stays
        writable (see `StoreAccess.move_into_place`). Links are not
        followed."""
        if not os.path.isdir(path) or os.path.islink(path):
            os.chmod(path, 0o444)
            return
        for dirpath, dirnames, filenames in os.walk(path, topdown=False):
            for n in filenames:
                p = os.path.join(dirpath, n)
                if not os.path.islink(p):
                    os.chmod(p, 0o444)
            if dirpath != path:
                os.chmod(dirpath, 0o555)

    def find_special(self, path):
        """The first entry of a file or tree that is neither a regular file
        nor a directory (a link, device, FIFO or socket), or None."""
        def bad(p):
            st = os.lstat(p)
            return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))

        if bad(path):
            return path
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                for n in dirnames + filenames:
                    if bad(os.path.join(dirpath, n)):
                        return os.path.join(dirpath, n)
        return None

    def path_info(self, path):
        """(size in bytes, md5) by the shared definition."""
        return path_md5(path)

    def disk_usage(self, path):
        """DiskUsage of the file system holding `path`; OSError when
        unreachable."""
        return DiskUsage(*shutil.disk_usage(path))

    def is_writable_dir(self, path):
        return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)

    def read_observation(self, path):
        """`uvmeta.read_observation` of the file or directory at `path`."""
        return uvmeta.read_observation(path)


# -- SSH ------------------------------------------------------------------

SSHTarget = collections.namedtuple(
    "SSHTarget", "host port user key known_hosts timeout")
SSHTarget.__doc__ = """How to reach a store's host: `port` (int), `user`
(None: the server's user), `key` (private key file, None: the usual
~/.ssh keys), `known_hosts` (file; 'ignore' accepts any host key), `timeout`
(seconds for connecting and for each network wait)."""

# AES-GCM first: with no separate MAC, paramiko moves bytes about 40% faster.
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr",
                     "aes256-ctr")
WINDOW_BYTES = 64 << 20
RETRY_SECONDS = 5.0  # between reconnection attempts to a host that is down


class StoreUnreachable(LibrarianError):
    """A store's host cannot be reached or refused us (HTTP 503)."""

    def __init__(self, store_name, target, reason):
        super().__init__(503, "store %r on host %s port %d is unreachable: %s"
                         % (store_name, target.host, target.port, reason))


def _close(thing):
    """Close an SFTP session, channel or client; on a dead connection
    closing fails too, which does not matter."""
    try:
        thing.close()
    except Exception:  # EOFError, socket errors, paramiko's SSHException
        pass


def ssh_connect(target):
    """A connected `paramiko.SSHClient` for `target`. Host keys are checked
    against `target.known_hosts` (default ~/.ssh/known_hosts) and unknown
    hosts refused. Raises paramiko/socket errors."""
    import paramiko

    def transport(sock, **kwargs):
        t = paramiko.Transport(sock, default_window_size=WINDOW_BYTES, **kwargs)
        offered = t.get_security_options().ciphers
        t.get_security_options().ciphers = tuple(
            [c for c in PREFERRED_CIPHERS if c in offered]
            + [c for c in offered if c not in PREFERRED_CIPHERS])
        return t

    client = paramiko.SSHClient()
    if target.known_hosts == "ignore":
        client.set_missing_host_key_policy(paramiko.WarningPolicy())
    else:
        known_hosts = os.path.expanduser(target.known_hosts or "~/.ssh/known_hosts")
        if not os.path.isfile(known_hosts):
            raise paramiko.SSHException("the known_hosts file %s does not exist (set "
                                        "known_hosts in the store's section)" % known_hosts)
        client.load_host_keys(known_hosts)
        client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key = os.path.expanduser(target.key) if target.key else None
    try:
        client.connect(target.host, port=target.port, username=target.user, key_filename=key,
                       look_for_keys=key is None, allow_agent=key is None,
                       timeout=target.timeout, banner_timeout=target.timeout,
                       auth_timeout=target.timeout, channel_timeout=target.timeout,
                       transport_factory=transport)
    except BaseException:
        _close(client)  # a refused host key or login leaves the socket open otherwise
        raise
    return client


class SSHConnection:
    """One SSH connection to a store's host, shared by every thread.

    Every channel on it (an SFTP session, idle or in use, or a command)
    holds one of `MAX_CHANNELS` slots, below OpenSSH's default `MaxSessions`
    of 10: a busy server waits for a slot instead of being refused. Idle
    SFTP sessions are kept for reuse. When the connection drops, the next
    use reconnects; when connecting fails, a background thread retries
    every `RETRY_SECONDS` and meanwhile every use fails at once with the
    reason, so that a host that is down never holds up requests."""

    MAX_CHANNELS = 8

    def __init__(self, store_name, target):
        self.store_name, self.target = store_name, target
        self.lock = threading.Lock()
        self.connecting = threading.Lock()  # held while a connect is under way
        self.slots = threading.BoundedSemaphore(self.MAX_CHANNELS)
        self.client = None
        self.idle = []  # SFTP sessions not in use (each holds a slot)
        self.failed = None  # StoreUnreachable of the last failed connect, until one succeeds
        self.retired = False  # set when the configuration changed: stop reconnecting

    def unreachable(self, e):
        return StoreUnreachable(self.store_name, self.target, ssh_failure_reason(e))

    def is_up(self):
        t = self.client.get_transport() if self.client else None
        return t is not None and t.is_active()

    def _client(self):
        if self.is_up():
            return self.client
        if self.failed is not None:
            raise self.failed
        with self.connecting:  # one thread connects; the others wait for its outcome
            if self.is_up():
                return self.client
            if self.failed is not None:
                raise self.failed
            try:
                self._connect()
            except StoreUnreachable as e:
                self.failed = e
                threading.Thread(target=self._retry, daemon=True,
                                 name="reconnect-%s" % self.store_name).start()
                raise
            return self.client

    def _connect(self):
        try:
            client = ssh_connect(self.target)
        except Exception as e:
            raise self.unreachable(e) from None
        client.get_transport().set_keepalive(max(5, int(self.target.timeout)))
        with self.lock:
            self._discard_idle()
            self.client = client

    def _retry(self):
        """Reconnect in the background until the host answers again."""
        while True:
            time.sleep(RETRY_SECONDS)
            if self.retired:
                return
            try:
                self._connect()
            except StoreUnreachable as e:
                self.failed = e
                continue
            self.failed = None
            log.info("store %s on host %s is reachable again", self.store_name,
                     self.target.host)
            return

    def _discard_idle(self):
        for sftp in self.idle:
            _close(sftp)
            self.slots.release()
        self.idle = []

    def drop(self):
        """Forget the connection (after an error that broke it)."""
        with self.lock:
            self._discard_idle()
            if self.client is not None:
                _close(self.client)
            self.client = None

    def take_slot(self):
        """Wait for a channel slot, closing an idle SFTP session if that is
        what holds the last ones."""
        while not self.slots.acquire(timeout=0.05):
            with self.lock:
                if self.idle:
                    _close(self.idle.pop(0))
                    self.slots.release()

    def checkout_sftp(self):
        client = self._client()
        with self.lock:
            if self.idle:
                return self.idle.pop()
        self.take_slot()
        try:
            sftp = self._open(client.open_sftp)
        except BaseException:
            self.slots.release()
            raise
        sftp.get_channel().settimeout(self.target.timeout)
        return sftp

    def _open(self, open_channel, attempts=40):
        """Open a channel, retrying for a while when the host refuses one:
        it still counts channels whose closing it has not finished."""
        for attempt in range(attempts):
            try:
                with self.errors():
                    return open_channel()
            except StoreUnreachable:
                raise
            except LibrarianError:  # refused (or slow): the host is still there
                if attempt == attempts - 1:
                    raise
            time.sleep(0.05)

    def checkin_sftp(self, sftp):
        """Give back a session from `checkout_sftp` (closed ones too)."""
        with self.lock:
            if not sftp.sock.closed and len(self.idle) < self.MAX_CHANNELS // 2 \
                    and self.client is not None:
                self.idle.append(sftp)
                return
        _close(sftp)
        self.slots.release()

    @contextmanager
    def sftp(self):
        """An SFTP session for the block; see `errors`."""
        sftp = self.checkout_sftp()
        try:
            with self.errors():
                yield sftp
        except StoreUnreachable:
            _close(sftp)
            raise
        finally:
            self.checkin_sftp(sftp)

    @contextmanager
    def channel(self):
        """A new session channel (for a command) holding a slot."""
        client = self._client()
        self.take_slot()
        try:
            ch = self._open(client.get_transport().open_session)
            try:
                yield ch
            finally:
                _close(ch)
        finally:
            self.slots.release()

    def _goes_down(self, seconds=1.0):
        """Whether the connection is down, or goes down within `seconds`
        (paramiko notices a closed socket a moment after a send failed)."""
        deadline = time.monotonic() + seconds
        while self.is_up():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    @contextmanager
    def errors(self):
        """Inside the block, a dropped connection becomes `StoreUnreachable`
        (503, and the connection is forgotten); a channel that waited longer
        than `ssh_timeout` or that the host refused becomes a 503 without
        harming the connection's other channels; errors of the remote file
        system (ENOENT, permissions) pass as the OSErrors they are."""
        import paramiko

        try:
            yield
        except StoreUnreachable:
            raise
        except (paramiko.SSHException, EOFError, OSError) as e:
            if isinstance(e, paramiko.ChannelException):  # e.g. over the host's MaxSessions
                raise LibrarianError(503, "store %r on host %s refused a new session: %s"
                                     % (self.store_name, self.target.host, e)) from None
            if self.is_up() and isinstance(e, (socket.timeout, TimeoutError)):
                raise LibrarianError(503, "store %r on host %s did not answer within %g s"
                                     % (self.store_name, self.target.host,
                                        self.target.timeout)) from None
            if not isinstance(e, (paramiko.SSHException, EOFError, ConnectionError)):
                raise  # an error of the remote file system
            if self._goes_down():
                self.drop()
                raise StoreUnreachable(self.store_name, self.target,
                                       "lost the connection (%s)" % ssh_failure_reason(e)) from None
            # One channel ended (the connection itself is fine): only this
            # request fails, the others on the connection go on.
            raise LibrarianError(503, "store %r on host %s closed a session: %s"
                                 % (self.store_name, self.target.host, ssh_failure_reason(e))) from None

    def run(self, argv, check=True):
        """Run a command (argv: a list, every word quoted) on the host and
        wait for it however long it takes (md5sum of a large data set can
        take minutes; a dead host is noticed by the keepalives); returns
        (exit status, stdout bytes, stderr bytes). With `check`, a non-zero
        status raises `remote_error` of its stderr."""
        with self.channel() as ch, self.errors():
            ch.settimeout(None)
            ch.exec_command(shlex.join(argv))
            ch.shutdown_write()
            out = ch.makefile("rb").read()
            err = ch.makefile_stderr("rb").read()
            status = ch.recv_exit_status()
        if check and status != 0:
            raise remote_error("%s on %s" % (argv[0], self.target.host), err)
        return status, out, err

    def run_script(self, script, *args, check=True):
        """Run `sh -c script _ ARGS...`: the arguments arrive as $1, $2...,
        so that no path is ever pasted into shell text."""
        return self.run(["sh", "-c", script, "sh"] + list(args), check=check)


# What commands print for the errors a store can meet, and their errno
# (commands on the store host report errors as text).
REMOTE_ERRNOS = [errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST,
                 errno.EACCES, errno.ELOOP, errno.ENOENT, errno.EROFS, errno.EISDIR]


def remote_error(what, stderr):
    """An OSError for a command that failed on a store host, carrying the
    errno its message names (so that callers map it as a local error)."""
    message = stderr.decode(errors="replace").strip() if isinstance(stderr, bytes) else stderr
    for code in REMOTE_ERRNOS:
        if os.strerror(code) in message:
            return OSError(code, "%s: %s" % (what, message))
    return OSError("%s failed: %s" % (what, message or "no message"))


class _SFTPFile:
    """An open SFTP file that gives its session back to the pool on close."""

    def __init__(self, conn, sftp, f):
        self.conn, self.sftp, self.f = conn, sftp, f
        self.closed = False

    def read(self, n=-1):
        with self.conn.errors():
            return self.f.read(n) if n is not None and n >= 0 else self.f.read()

    def write(self, data):
        with self.conn.errors():
            self.f.write(data)

    def seek(self, offset, whence=0):
        return self.f.seek(offset, whence)

    def tell(self):
        return self.f.tell()

    def close(self):
        if self.closed:
            return
        self.closed = True
        try:
            with self.conn.errors():
                self.f.close()
        except BaseException:
            _close(self.sftp)
            raise
        finally:
            self.conn.checkin_sftp(self.sftp)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ExecWriter:
    """A new file on the store host, written by `cat` with the shell's
    noclobber option (so an existing file is never replaced). Errors on the
    host (disk full, permissions, an existing file) are raised by close()
    as OSErrors with their errno (`remote_error`)."""

    def __init__(self, conn, path):
        self.conn, self.path = conn, path
        self.context = conn.channel()
        self.channel = self.context.__enter__()
        self.closed = False
        try:
            with conn.errors():
                self.channel.settimeout(conn.target.timeout)
                self.channel.exec_command(shlex.join(
                    ["sh", "-c", 'set -C && exec cat > "$1"', "sh", path]))
        except BaseException:
            self._release()
            raise

    def _release(self):
        self.closed = True
        self.context.__exit__(None, None, None)

    def write(self, data):
        with self.conn.errors():
            try:
                # A memoryview: paramiko's sendall slices what is left after
                # each 32 kB packet, which copies a bytes object every time.
                self.channel.sendall(memoryview(data))
            except OSError:  # paramiko: "Socket is closed": the channel ended
                if self.channel.exit_status_ready():
                    self._finish()  # cat gave up, or the session was killed: say which
                raise EOFError("the session writing %s ended" % self.path) from None

    def _finish(self):
        with self.conn.errors():
            self.channel.shutdown_write()
            self.channel.settimeout(None)  # the host may still be flushing to disk
            status = self.channel.recv_exit_status()
            err = self.channel.makefile_stderr("rb").read()
            if status == -1:  # closed without an exit status: the session was lost
                raise EOFError("the session writing %s ended" % self.path)
        if status != 0:
            raise remote_error("writing %s on %s" % (self.path, self.conn.target.host), err)

    def close(self):
        if not self.closed:
            try:
                self._finish()
            finally:
                self._release()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:
            self.close()
        elif not self.closed:  # the caller's error comes first; the channel just goes
            self._release()


class SSHFS:
    """The file system of another host, through an `SSHConnection`."""

    def __init__(self, conn):
        self.conn = conn
        self.where = "host %s" % conn.target.host

    def lstat(self, path):
        with self.conn.sftp() as sftp:
            return sftp.lstat(path)

    def lexists(self, path):
        try:
            self.lstat(path)
            return True
        except FileNotFoundError:
            return False

    def scandir(self, path):
        with self.conn.sftp() as sftp:
            return sorted((a.filename, a) for a in sftp.listdir_attr(path))

    def mkdir(self, path, mode=0o755):
        with self.conn.sftp() as sftp:
            if self._exists(sftp, path):
                raise FileExistsError("%s exists on %s" % (path, self.where))
            sftp.mkdir(path, mode)

    @staticmethod
    def _exists(sftp, path):
        try:
            sftp.lstat(path)
            return True
        except FileNotFoundError:
            return False

    def makedirs(self, path):
        """`mkdir -p` by SFTP (one request per folder of the path: much
        cheaper than starting a command); NotADirectoryError when a folder
        of the path is something else."""
        with self.conn.sftp() as sftp:
            parts = [p for p in path.split("/") if p]
            current = ""
            for part in parts:
                current += "/" + part
                try:
                    st = sftp.stat(current)  # links to folders are folders here, as for mkdir -p
                except FileNotFoundError:
                    try:
                        sftp.mkdir(current, 0o755)
                    except OSError:
                        if not self._exists(sftp, current):  # not made by someone else meanwhile
                            raise
                    continue
                if not stat.S_ISDIR(st.st_mode):
                    raise NotADirectoryError("%s is not a folder on %s" % (current, self.where))

    def open(self, path, mode):
        """A binary file: 'rb' reads by SFTP; 'xb' creates a new file (never
        replacing one) written through `cat` on an exec channel, which
        paramiko drives about 50% faster than SFTP's 32 kB write requests
        with their acknowledgements."""
        if mode == "xb":
            return _ExecWriter(self.conn, path)
        sftp = self.conn.checkout_sftp()
        try:
            with self.conn.errors():
                f = sftp.open(path, "r", bufsize=CHUNK)
        except BaseException:
            self.conn.checkin_sftp(sftp)
            raise
        return _SFTPFile(self.conn, sftp, f)

    def write_text(self, path, text):
        with self.conn.sftp() as sftp, sftp.open(path, "w") as f:
            f.write(text.encode("utf-8"))

    def read_text(self, path):
        with self.conn.sftp() as sftp, sftp.open(path, "r") as f:
            return f.read().decode("utf-8")

    def rename_new(self, src, dst):
        # OpenSSH's SFTP rename never replaces an existing target (it links
        # and unlinks files, and checks for anything at the target first).
        with self.conn.sftp() as sftp:
            sftp.rename(src, dst)

    def unlink(self, path):
        with self.conn.sftp() as sftp:
            sftp.remove(path)

    def chmod(self, path, mode):
        with self.conn.sftp() as sftp:
            sftp.chmod(path, mode)

    def realpath(self, path):
        """The canonical path with links resolved; the missing tail of the
        path is kept as given (as `os.path.realpath` does)."""
        with self.conn.sftp() as sftp:
            tail = []
            while True:
                try:
                    head = sftp.normalize(path)
                    return posixpath.join(head, *reversed(tail))
                except FileNotFoundError:
                    parent, name = posixpath.split(path)
                    if parent == path:
                        raise
                    tail.append(name)
                    path = parent

    def remove_tree(self, path):
        self.conn.run_script('[ -e "$1" ] || [ -L "$1" ] || exit 0; '
                             '[ -L "$1" ] || find "$1" -type d -exec chmod u+w {} +; '
                             'rm -rf -- "$1"', path)

    def make_readonly(self, path):
        if not stat.S_ISDIR(self.lstat(path).st_mode):
            self.chmod(path, 0o444)
            return
        self.conn.run_script('if [ -d "$1" ] && [ ! -L "$1" ]; then '
                             'find "$1" -type f -exec chmod 444 {} + && '
                             'find "$1" -mindepth 1 -type d -exec chmod 555 {} +; '
                             'else chmod 444 "$1"; fi', path)

    def find_special(self, path):
        mode = self.lstat(path).st_mode
        if not stat.S_ISDIR(mode):
            return None if stat.S_ISREG(mode) else path
        _, out, _ = self.conn.run(["find", path, "!", "-type", "f", "!", "-type", "d",
                                   "-print0", "-quit"])
        return os.fsdecode(out.rstrip(b"\0")) or None

    def path_info(self, path):
        """(size, md5) computed on the host with `md5sum` (the directory
        definition of `librarian_client.directory_digest`)."""
        st = self.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            _, out, _ = self.conn.run(["md5sum", "-z", "--", path])
            return st.st_size, out[:32].decode()
        _, sizes, _ = self.conn.run_script('cd -- "$1" && find . ! -type d -printf "%s\\n"',
                                           path)
        _, out, _ = self.conn.run_script(
            'cd -- "$1" && find . ! -type d -print0 | xargs -0 -r md5sum -z --', path)
        entries = []
        for line in out.split(b"\0"):
            if line:
                entries.append((os.fsdecode(line[36:]), line[:32].decode()))  # "md5  ./rel"
        return sum(int(n) for n in sizes.split()), directory_digest(entries)

    def disk_usage(self, path):
        """By OpenSSH's `statvfs@openssh.com` SFTP extension (fields as in
        statvfs(3), as `shutil.disk_usage` reads them), else by `df`."""
        from paramiko.sftp import CMD_EXTENDED, CMD_EXTENDED_REPLY

        with self.conn.sftp() as sftp:
            try:
                kind, msg = sftp._request(CMD_EXTENDED, "statvfs@openssh.com", path)
            except OSError as e:
                if e.errno is not None:
                    raise  # the path is missing or unreadable
                kind = None  # the extension is not supported
            if kind == CMD_EXTENDED_REPLY:
                bsize, frsize, blocks, bfree, bavail = (msg.get_int64() for _ in range(5))
                return DiskUsage(blocks * frsize, (blocks - bfree) * frsize, bavail * frsize)
        # Only numbers in the output: a file system's name may hold spaces.
        _, out, _ = self.conn.run(["df", "-k", "--output=size,used,avail", "--", path])
        total, used, free = (int(n) * 1024 for n in out.decode().splitlines()[-1].split())
        return DiskUsage(total, used, free)

    def is_writable_dir(self, path):
        """Whether `path` is a folder with a write bit (by SFTP; whether the
        bit is ours shows when writing)."""
        try:
            st = self.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return False
        return stat.S_ISDIR(st.st_mode) and bool(st.st_mode & 0o222)

    def read_observation(self, path):
        """Observation metadata read over SFTP by the isolated reader
        process (see `read_remote_observation`); None, without asking it,
        for what is not shaped like a data set (`uvmeta.data_kind`)."""
        if stat.S_ISDIR(self.lstat(path).st_mode):
            if not self.lexists(posixpath.join(path, "visdata")):
                return None
        elif not path.endswith(".uvh5"):
            return None
        try:
            return uvmeta.run_reader("data set", read_remote_observation, self.conn.target, path)
        except OSError as e:
            raise LibrarianError(503, "cannot read the header of %s on %s: %s"
                                 % (path, self.where, e)) from None


_reader_clients = {}  # in the reader process: SSHTarget -> SSHClient


def read_remote_observation(target, path):
    """Runs in uvmeta's reader process: read the metadata of a data set on
    another host. A UVH5 header is read by h5py straight from the SFTP file;
    for a MIRIAD data set the header items and the start of `visdata` (what
    aipy reads on opening) are fetched into a temporary directory."""
    try:
        return _read_remote(target, path)
    except uvmeta.MetadataError:
        raise
    except Exception as e:  # paramiko's errors do not all survive pickling
        _reader_clients.pop(target, None)
        raise OSError(ssh_failure_reason(e)) from None


def _read_remote(target, path):
    client = _reader_clients.get(target)
    if client is None or not client.get_transport() or not client.get_transport().is_active():
        client = _reader_clients[target] = ssh_connect(target)
    with client.open_sftp() as sftp:
        st = sftp.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            names = set(sftp.listdir(path))
            if "visdata" not in names:
                return None
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, posixpath.basename(path))
                os.mkdir(local)
                for item in ("header", "vartable", "visdata"):
                    if item in names:
                        limit = MIRIAD_HEAD_BYTES if item == "visdata" else None
                        with sftp.open(posixpath.join(path, item), "rb") as src, \
                                open(os.path.join(local, item), "wb") as out:
                            out.write(src.read(limit) if limit else src.read())
                return uvmeta.read_miriad(local)
        if stat.S_ISREG(st.st_mode) and path.endswith(".uvh5"):
            with sftp.open(path, "rb", bufsize=CHUNK) as f:
                return uvmeta.read_uvh5(f)
    return None


# ---------------------------------------------------------------------------
# Tar streams, on any file system
# ---------------------------------------------------------------------------

def _tar_member_path(member):
    """The relative path parts a tar member is unpacked to, or a 400
    naming the member: absolute paths, `..`, links, devices and FIFOs are
    refused."""
    path = member.name
    if path.startswith("/") or "\0" in path:
        raise LibrarianError(400, "tar member %r has an absolute path" % path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LibrarianError(400, "tar member %r contains '..'" % path)
    if not (member.isfile() or member.isdir()):
        raise LibrarianError(400, "tar member %r is a link or special file; only regular "
                             "files and directories are accepted" % path)
    if member.issparse():
        raise LibrarianError(400, "tar member %r is a sparse file; send it as a regular file"
                             % path)
    return parts


def receive_tar(fs, reader, dest, name):
    """Unpack a tar stream into the new directory `dest` on `fs`, computing
    each file's MD5 as it is written; returns (size, md5) by the directory
    definition. The members sit either all under one top folder called
    `name` (as `tar -C PARENT -c NAME` and our downloads make them), or at
    the top level (`tar -C DIR -c .`); the first member decides. Raises
    `LibrarianError(400)` on unsafe or malformed input."""
    fs.mkdir(dest)
    made = {""}  # folders created, relative to dest
    entries = {}
    total = 0
    under_top = None

    def make_parents(rel_dir):
        parts = rel_dir.split("/") if rel_dir else []
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in made:
                if sub in entries:
                    raise FileExistsError(sub)
                fs.mkdir(posixpath.join(dest, sub))
                made.add(sub)

    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for member in tar:
                parts = _tar_member_path(member)
                if not parts:
                    continue
                if under_top is None:
                    under_top = parts[0] == name
                if under_top:
                    if parts[0] != name:
                        raise LibrarianError(400, "tar member %r is not under the top folder "
                                             "%r" % (member.name, name))
                    parts = parts[1:]
                    if not parts:
                        if not member.isdir():
                            raise LibrarianError(400, "tar member %r is a file, but a directory "
                                                 "upload needs a folder %r" % (member.name, name))
                        continue
                rel = "/".join(parts)
                check_name_lengths(parts, member.name)
                if member.isdir():
                    if rel in entries:
                        raise FileExistsError(rel)
                    make_parents(rel)
                    continue
                if rel in entries or rel in made:
                    raise LibrarianError(400, "tar member %r appears twice, or as a file and "
                                         "a folder" % member.name)
                make_parents(posixpath.dirname(rel))
                with fs.open(posixpath.join(dest, rel), "xb") as out:
                    size, md5 = _copy_hashing(tar.extractfile(member), out)
                if size != member.size:
                    raise LibrarianError(400, "tar member %r is truncated" % member.name)
                entries[rel] = md5
                total += size
    except tarfile.TarError as e:
        raise LibrarianError(400, "body is not a valid tar stream: %s" % e) from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise LibrarianError(400, "tar stream has a file and a folder of the same "
                             "name") from None
    return total, directory_digest(entries.items())


def walk(fs, path, rel=""):
    """Yield (relative path, lstat) of everything under the directory
    `path` on `fs`, folders before their contents, sorted by name."""
    for name, st in fs.scandir(path):
        sub = posixpath.join(rel, name) if rel else name
        yield sub, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk(fs, posixpath.join(path, name), sub)


def _tar_entries(fs, path, name):
    """(TarInfo, absolute path or None) for a directory, sorted, under the
    top folder `name`; deterministic owner and mode bits. Links and special
    files are not sent."""
    def info(st, arcname):
        ti = tarfile.TarInfo(arcname)
        ti.mtime = int(st.st_mtime)
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        if stat.S_ISDIR(st.st_mode):
            ti.type, ti.mode, ti.size = tarfile.DIRTYPE, 0o755, 0
        else:
            ti.type, ti.mode, ti.size = tarfile.REGTYPE, 0o644, st.st_size
        return ti

    yield info(fs.lstat(path), name), None
    for rel, st in walk(fs, path):
        if stat.S_ISDIR(st.st_mode):
            yield info(st, posixpath.join(name, rel)), None
        elif stat.S_ISREG(st.st_mode):
            yield info(st, posixpath.join(name, rel)), posixpath.join(path, rel)


def _padding(n):
    return (-n) % TAR_BLOCK


def tar_size(fs, path, name):
    """Exact byte length of the tar stream `iter_tar(fs, path, name)` yields."""
    total = 0
    for ti, abs_path in _tar_entries(fs, path, name):
        total += len(ti.tobuf(tarfile.PAX_FORMAT)) + ti.size + _padding(ti.size)
    total += 2 * TAR_BLOCK
    return total + (-total) % TAR_RECORD


def iter_tar(fs, path, name):
    """Yield a tar stream of the directory `path` on `fs` with members under
    the top folder `name`, built on the fly in chunks (no temporary copy)."""
    total = 0
    for ti, abs_path in _tar_entries(fs, path, name):
        header = ti.tobuf(tarfile.PAX_FORMAT)
        total += len(header)
        yield header
        if abs_path is None:
            continue
        with fs.open(abs_path, "rb") as f:
            yield from _read_exactly(f, ti.size, abs_path)
        pad = _padding(ti.size)
        total += ti.size + pad
        if pad:
            yield b"\0" * pad
    end = 2 * TAR_BLOCK
    end += (-(total + end)) % TAR_RECORD
    yield b"\0" * end


def iter_file(fs, path, start=0, length=None):
    """Yield `length` bytes (None: to the end) of the file `path` on `fs`
    from byte `start`, in chunks."""
    with fs.open(path, "rb") as f:
        if start:
            f.seek(start)
        if length is None:
            yield from iter(lambda: f.read(CHUNK), b"")
        else:
            yield from _read_exactly(f, length, path)


def copy_tree(src_fs, src, dst_fs, dst):
    """Copy the file or directory `src` on `src_fs` to the new path `dst` on
    `dst_fs`, streaming (either may be local or remote). Links and special
    files are refused with `LibrarianError(400)`."""
    bad = src_fs.find_special(src)
    if bad is not None:
        raise LibrarianError(400, "%s is a link or special file" % bad)
    if not stat.S_ISDIR(src_fs.lstat(src).st_mode):
        _copy_file(src_fs, src, dst_fs, dst)
        return
    dst_fs.mkdir(dst)
    for rel, st in walk(src_fs, src):
        if stat.S_ISDIR(st.st_mode):
            dst_fs.mkdir(posixpath.join(dst, rel))
        else:
            _copy_file(src_fs, posixpath.join(src, rel), dst_fs, posixpath.join(dst, rel))


def _copy_file(src_fs, src, dst_fs, dst):
    with src_fs.open(src, "rb") as f, dst_fs.open(dst, "xb") as out:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            out.write(chunk)


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------

_ssh_settings = {}   # store name -> its [store:NAME] section
_connections = {}    # (store name, SSHTarget) -> SSHConnection
_connections_lock = threading.Lock()


def configure(config):
    """Remember the `[store:NAME]` sections (transport and SSH settings);
    connections made under the previous settings are closed."""
    _ssh_settings.clear()
    _ssh_settings.update(config.stores)
    with _connections_lock:
        for conn in _connections.values():
            conn.retired = True
            conn.drop()
        _connections.clear()


def transport_of(row):
    """'local' or 'ssh' for a store record: `[store:NAME] transport`, else
    local when its ssh_host names this host."""
    spec = _ssh_settings.get(row.name, {})
    if spec.get("transport"):
        return spec["transport"]
    return "local" if names_this_host(row.ssh_host) else "ssh"


def ssh_target(row):
    """The SSHTarget of a store record, from its configuration section."""
    spec = _ssh_settings.get(row.name, {})
    return SSHTarget(row.ssh_host, spec.get("ssh_port") or 22, spec.get("ssh_user"),
                     spec.get("ssh_key"), spec.get("known_hosts"),
                     spec.get("ssh_timeout") or 15.0)


def describe_access(row):
    """How the server reaches a store, in words: 'directly (this host)' or
    'over SSH as USER to HOST port N'."""
    if transport_of(row) == "local":
        return "directly (this host)"
    target = ssh_target(row)
    return "over SSH as %s to %s port %d" % (target.user or "the server's user", target.host,
                                             target.port)


def connection(row):
    """The shared SSHConnection of a store on another host."""
    key = (row.name, ssh_target(row))
    with _connections_lock:
        if key not in _connections:
            _connections[key] = SSHConnection(row.name, key[1])
        return _connections[key]


def open_store(row):
    """A `StoreAccess` for the `models.Store` record `row`, on the local or
    SSH file system as configured."""
    if transport_of(row) == "local":
        return StoreAccess(row, LocalFS())
    return StoreAccess(row, SSHFS(connection(row)))


def present_instance(file_name, available_only=False):
    """(FileInstance, StoreAccess, absolute path) of the first instance of
    `file_name` (by store name) whose bytes are present, optionally only on
    available stores; (None, None, None) when there is none. Unreachable
    stores are passed over. The one place that decides which copy the
    server reads from. Raises `StoreUnreachable` when no instance is
    present but one could be on a store that cannot be reached now."""
    from models import FileInstance, Store

    query = (FileInstance.select(FileInstance, Store).join(Store)
             .where(FileInstance.file == file_name).order_by(Store.name))
    if available_only:
        query = query.where(Store.available == True)  # noqa: E712
    unreachable = None
    for inst in query:
        store = open_store(inst.store)
        try:
            path = store.resolve(inst.store_path)
            if store.fs.lexists(path):
                return inst, store, path
        except StoreUnreachable as e:
            unreachable = unreachable or e
    if unreachable is not None:
        raise unreachable
    return None, None, None


class StoreAccess:
    """Operations on one store, through its file system `fs` (`LocalFS` or
    `SSHFS`). `row` is the `models.Store` record. Paths given to methods
    are store paths (relative to the prefix) unless named `abs_...`;
    absolute paths are paths on the store's host."""

    def __init__(self, row, fs):
        self.row, self.fs = row, fs
        self.name = row.name
        self.prefix = row.path_prefix

    # -- paths --------------------------------------------------------------

    def resolve(self, store_path):
        """Absolute path of a store path, refusing (400) one whose existing
        part resolves outside the store or into its staging area, symlinks
        included."""
        parent_dirs, name = split_store_path(store_path)
        root = self.fs.realpath(self.prefix)
        parent = self.fs.realpath(posixpath.join(root, parent_dirs)) if parent_dirs else root
        if not is_inside(parent, root):
            raise LibrarianError(400, "store path %r resolves outside store %r"
                                 % (store_path, self.name))
        if is_inside(parent, posixpath.join(root, STAGING)):
            raise LibrarianError(400, "store path %r resolves into the staging area"
                                 % store_path)
        full = posixpath.join(parent, name)
        try:
            if stat.S_ISLNK(self.fs.lstat(full).st_mode):
                raise LibrarianError(400, "store path %r is a symbolic link" % store_path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        return full

    def staging_root(self):
        return posixpath.join(self.prefix, STAGING)

    def is_staging_dir(self, abs_path):
        """Whether `abs_path` names a directory directly in the staging
        area (as `new_staging_dir` makes them)."""
        return posixpath.dirname(posixpath.normpath(abs_path)) == self.staging_root()

    def new_staging_dir(self):
        """Create and return a fresh, empty staging directory."""
        self.fs.makedirs(self.staging_root())
        path = posixpath.join(self.staging_root(), uuid.uuid4().hex)
        self.fs.mkdir(path)
        return path

    def ensure_prefix(self):
        self.fs.makedirs(self.prefix)

    def clean_staging(self, keep=(), is_registered=lambda store_path: True):
        """Start-up cleaning of the staging area. First undo moves that a
        crash interrupted: a staging directory whose DESTINATION marker
        names a store path that `is_registered(store_path)` denies had its
        bytes moved but never recorded, so they are moved back. Then remove
        everything except the directories in `keep` (absolute paths).
        Returns how many entries were removed."""
        root = self.staging_root()
        try:
            entries = self.fs.scandir(root)
        except FileNotFoundError:
            return 0
        keep = set(keep)
        removed = 0
        for entry, st in entries:
            path = posixpath.join(root, entry)
            if stat.S_ISDIR(st.st_mode):
                self._undo_interrupted_move(path, is_registered)
            if path not in keep:
                self.fs.remove_tree(path)
                removed += 1
        return removed

    def _undo_interrupted_move(self, staging_dir, is_registered):
        marker = posixpath.join(staging_dir, DESTINATION_MARKER)
        try:
            if not stat.S_ISREG(self.fs.lstat(marker).st_mode):
                return
        except FileNotFoundError:
            return
        store_path = self.fs.read_text(marker)
        try:
            final = self.resolve(store_path)
        except LibrarianError:
            return
        staged = posixpath.join(staging_dir, posixpath.basename(final))
        if not is_registered(store_path) and self.fs.lexists(final) \
                and not self.fs.lexists(staged):
            log.warning("moving unregistered %s on store %s back to staging: its registration "
                        "was interrupted", store_path, self.name)
            if stat.S_ISDIR(self.fs.lstat(final).st_mode):
                self.fs.chmod(final, 0o755)
            self.fs.rename_new(final, staged)
        self.fs.unlink(marker)

    # -- bytes in -------------------------------------------------------------

    def receive(self, reader, abs_dest, name, is_tar):
        """Write a request body to the new path `abs_dest` (a file, or a
        directory unpacked from a tar stream); returns (size, md5)."""
        if is_tar:
            return receive_tar(self.fs, reader, abs_dest, name)
        with self.fs.open(abs_dest, "xb") as out:
            return _copy_hashing(reader, out)

    def move_into_place(self, abs_staged, store_path, readonly=True):
        """Atomically move a staged file or directory to `store_path`,
        creating parent directories; never replaces an existing entry
        (409). With `readonly`, the bytes are read-only when they appear
        (a directory's own mode is closed right after the rename). Returns
        the final absolute path."""
        final = self.resolve(store_path)
        # The marker lets start-up undo this move if the process dies before
        # the registration commits (see clean_staging).
        self._write_marker(posixpath.dirname(abs_staged), store_path)
        try:
            self.fs.makedirs(posixpath.dirname(final))
        except (FileExistsError, NotADirectoryError):
            raise LibrarianError(409, "a folder of the store path %r is a file on store %r"
                                 % (store_path, self.name)) from None
        final = self.resolve(store_path)  # re-check now that parents exist
        if self.fs.lexists(final):
            raise LibrarianError(409, "%s already exists on store %r but is not registered "
                                 "there" % (store_path, self.name))
        is_dir = stat.S_ISDIR(self.fs.lstat(abs_staged).st_mode)
        if readonly:
            self.fs.make_readonly(abs_staged)
        self.fs.rename_new(abs_staged, final)
        if is_dir and readonly:
            self.fs.chmod(final, 0o555)
        return final

    def _write_marker(self, staging_dir, store_path):
        """Write the DESTINATION marker as a new file: whatever is at its
        place (a staging folder may have been written by a client) goes
        first, so that a planted link is never followed."""
        marker = posixpath.join(staging_dir, DESTINATION_MARKER)
        try:
            if stat.S_ISDIR(self.fs.lstat(marker).st_mode):
                self.fs.remove_tree(marker)
            else:
                self.fs.unlink(marker)
        except FileNotFoundError:
            pass
        with self.fs.open(marker, "xb") as f:
            f.write(store_path.encode("utf-8"))

    def check_staging_dir(self, abs_path):
        """Refuse (400) a staging folder that is not a real folder directly
        in this store's staging area (a link put in its place, say)."""
        try:
            st = self.fs.lstat(abs_path)
        except (FileNotFoundError, NotADirectoryError):
            raise LibrarianError(400, "staging folder %s does not exist on %s"
                                 % (abs_path, self.describe())) from None
        root = self.fs.realpath(self.staging_root())
        real = self.fs.realpath(abs_path)
        if not stat.S_ISDIR(st.st_mode) or posixpath.dirname(real) != root:
            raise LibrarianError(400, "staging folder %s is not a folder of the staging area of "
                                 "%s" % (abs_path, self.describe()))

    def close_directory(self, abs_path):
        """Make a registered directory itself read-only (its contents are
        made so by `fs.make_readonly`)."""
        if stat.S_ISDIR(self.fs.lstat(abs_path).st_mode):
            self.fs.chmod(abs_path, 0o555)

    # -- bytes out and away -------------------------------------------------

    def delete(self, store_path):
        """Remove the bytes at `store_path` (made writable first)."""
        self.fs.remove_tree(self.resolve(store_path))

    def remove_quietly(self, abs_path):
        """Best-effort removal of staging leftovers: failures are logged,
        not raised (start-up cleaning catches what remains)."""
        try:
            self.fs.remove_tree(abs_path)
        except (OSError, LibrarianError) as e:
            log.warning("could not remove %s on store %s: %s", abs_path, self.name, e)

    def exists(self, store_path):
        return self.fs.lexists(self.resolve(store_path))

    def is_dir(self, abs_path):
        return stat.S_ISDIR(self.fs.lstat(abs_path).st_mode)

    def disk_usage(self):
        """DiskUsage (total, used, free bytes) of the store's file system;
        raises OSError or StoreUnreachable when it cannot be read."""
        return self.fs.disk_usage(self.prefix)

    def free_space(self):
        """Free bytes on the store's file system (None if unreachable)."""
        try:
            return self.disk_usage().free
        except (OSError, LibrarianError):
            return None

    def problem(self):
        """None when the prefix is a writable directory; else what is wrong,
        in words (the host unreachable and why, or the folder missing)."""
        try:
            if self.fs.is_writable_dir(self.prefix):
                return None
            return "%s is not a writable folder on %s" % (self.prefix, self.fs.where)
        except LibrarianError as e:
            return e.message
        except OSError as e:
            return str(e)

    def is_reachable(self):
        """Whether the prefix is a writable directory (False, never an
        error, when the host cannot be reached)."""
        return self.problem() is None

    def describe(self):
        return "store %r (%s on %s)" % (self.name, self.prefix, self.fs.where)
