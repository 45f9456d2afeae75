"""Stores on other hosts: the file system of a store host, reached over SSH
with paramiko.

`SSHFS` offers the primitives of `stores.LocalFS` (the store logic in
`stores.StoreAccess` runs on either): SFTP for listings, metadata and
reading; `cat` on an exec channel for writing streams (faster in paramiko
than SFTP's write requests); `md5sum`, `find`, `chmod`, `rm` and `df` run
on the host with every path passed as a separate argument (`shlex.join`,
or `sh -c SCRIPT sh PATH...`), never pasted into shell text. One
`SSHConnection` per store is shared by the server's threads.
"""

import collections
import errno
import io
import logging
import os
import posixpath
import shlex
import socket
import stat
import threading
import time
from contextlib import contextmanager

import uvmeta
from librarian_client import CHUNK, directory_digest, ssh_failure_reason
from errors import LibrarianError, Unavailable

log = logging.getLogger("librarian")
# paramiko logs a traceback of its own for every failed connection; ours
# name the store, the host and the reason once.
logging.getLogger("paramiko").setLevel(logging.CRITICAL)

DiskUsage = collections.namedtuple("DiskUsage", "total used free")

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
READ_WINDOW_BYTES = 8 << 20  # a download or copy holds at most this much unread
SMALL_FILE_BYTES = 4 << 20   # read whole by SFTP below this size
REKEY_BYTES = 16 << 32  # 2**32 blocks of AES's 16 bytes
RETRY_SECONDS = 5.0  # between reconnection attempts to a host that is down
STREAM_WAIT_SECONDS = 120.0  # for a session, by a response whose first bytes are sent

_streaming = threading.local()  # .depth > 0: this thread is inside `stream_started`


@contextmanager
def stream_started():
    """Inside the block (a response that has sent its first bytes, such as
    a directory's tar between members), waiting for a session is bounded
    by STREAM_WAIT_SECONDS instead of `ssh_timeout`: a 503 is no longer
    possible, and failing would cut the body short. A waiting stream
    holds no session, so it waits only for the others to end."""
    _streaming.depth = getattr(_streaming, "depth", 0) + 1
    try:
        yield
    finally:  # (a generator may be closed in another thread than it ran in)
        _streaming.depth = max(0, getattr(_streaming, "depth", 1) - 1)


def _session_wait(timeout):
    """Seconds to wait for a session in this thread (see `stream_started`)."""
    return max(timeout, STREAM_WAIT_SECONDS) if getattr(_streaming, "depth", 0) else timeout


class StoreUnreachable(Unavailable):
    """A store's host cannot be reached or refused us (HTTP 503; retried)."""

    def __init__(self, store_name, target, reason):
        super().__init__("store %r on host %s port %d is unreachable: %s"
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
        # paramiko re-keys every 512 MiB, and a channel closing during a
        # re-key can stall the connection (paramiko issue #822): re-key
        # when OpenSSH does for 128-bit block ciphers, after 2**32 blocks
        # (RFC 4344, section 3.2).
        t.packetizer.REKEY_BYTES = REKEY_BYTES
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
        # channel_timeout: paramiko's own bound on opening a channel gives up
        # on a channel that the host may still open later (and that nobody
        # would close): `SSHConnection.watchdog` acts first.
        client.connect(target.host, port=target.port, username=target.user, key_filename=key,
                       look_for_keys=key is None, allow_agent=key is None,
                       timeout=target.timeout, banner_timeout=target.timeout,
                       auth_timeout=target.timeout, channel_timeout=2 * target.timeout,
                       transport_factory=transport)
    except BaseException:
        _close(client)  # a refused host key or login leaves the socket open otherwise
        raise
    return client


class SSHConnection:
    """One SSH connection to a store's host, shared by every thread.

    Every channel on it (an SFTP session, idle or in use, or a command)
    holds one of `MAX_CHANNELS` slots, below OpenSSH's default `MaxSessions`
    of 10: a busy server waits for a slot (up to `ssh_timeout`, then 503)
    instead of being refused. Idle SFTP sessions are kept for reuse. No
    wait on the host lasts longer than `ssh_timeout` (but a command's own
    run time): a host that stalls has its connection dropped (`watchdog`,
    `errors`). When the connection drops, the next use reconnects; when
    connecting fails, a background thread retries every `RETRY_SECONDS`
    and meanwhile every use fails at once with the reason, so that a host
    that is down never holds up requests."""

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
        self.went_quiet = False  # the last drop was for not answering, and no connect since

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
                self._mark_unreachable(e)
                raise
            return self.client

    def _mark_unreachable(self, e):
        """From now on every use fails at once with `e` (StoreUnreachable),
        while a background thread reconnects every `RETRY_SECONDS`."""
        with self.lock:
            first, self.failed = self.failed is None, e
        if first:
            log.warning("%s; trying again every %g s", e.message, RETRY_SECONDS)
            threading.Thread(target=self._retry, daemon=True,
                             name="reconnect-%s" % self.store_name).start()

    def _connect(self):
        started = time.monotonic()
        try:
            client = ssh_connect(self.target)
        except Exception as e:
            if time.monotonic() - started >= self.target.timeout:
                # A host that accepts the TCP connection and then says
                # nothing: paramiko's message for it is obscure.
                raise self.stalled() from None
            raise self.unreachable(e) from None
        with self.lock:
            self._discard_idle()
            self.client = client
            self.went_quiet = False
        threading.Thread(target=self._heartbeat, args=(client,), daemon=True,
                         name="heartbeat-%s" % self.store_name).start()

    def _heartbeat(self, client):
        """Every `ssh_timeout` (at least 1 s), ask the host for a reply while
        `client` is the connection in use; one that does not come within
        `ssh_timeout` means the host is stalled (`drop_stalled`). This
        bounds waits that have no timeout of their own, such as a command's
        run. (paramiko's keepalive asks for no reply: it notices only a
        closed socket.)"""
        interval = max(1.0, self.target.timeout)
        while True:
            time.sleep(interval)
            transport = client.get_transport()
            if client is not self.client or transport is None or not transport.is_active():
                return
            answered = threading.Event()

            def ask():
                transport.global_request("keepalive@openssh.com", wait=True)  # any reply
                answered.set()

            threading.Thread(target=ask, daemon=True).start()
            if not answered.wait(self.target.timeout):
                self.drop_stalled(client)
                return

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
            with self.lock:
                self.failed = None
            log.info("store %s on host %s is reachable again", self.store_name,
                     self.target.host)
            return

    def _discard_idle(self):
        for sftp in self.idle:
            _close(sftp)
            self.slots.release()
        self.idle = []

    def drop(self, client=None):
        """Forget the connection (after an error that broke it); with
        `client`, only if that is still the connection in use. Returns
        whether a connection was closed."""
        with self.lock:
            if client is not None and client is not self.client:
                return False
            dropped, self.client = self.client, None
            idle, self.idle = self.idle, []
        # The connection first: closing a session on it sends a message,
        # which blocks for good when a stalled host reads nothing more.
        if dropped is not None:
            _close(dropped)
        for sftp in idle:
            _close(sftp)
            self.slots.release()
        return dropped is not None

    def drop_stalled(self, client):
        """Drop `client`, which did not answer within `ssh_timeout`: every
        wait on it ends, with `stalled()` as the reason, and the host is
        taken as unreachable until a reconnection succeeds (a stalled host
        mostly stays so: requests must not each wait to find out)."""
        if client is self.client:  # said before the drop ends the waits on it
            self.went_quiet = True
        if self.drop(client):
            self._mark_unreachable(self.stalled())

    def stalled(self):
        return StoreUnreachable(self.store_name, self.target, "it did not answer within %g s"
                                % self.target.timeout)

    @contextmanager
    def watchdog(self, client):
        """Inside the block, a host that does not answer within `ssh_timeout`
        is taken as stalled: the connection is dropped, which ends every
        wait on it, and the block raises `stalled()`. This bounds the waits
        paramiko bounds badly (a channel whose opening timed out is still
        opened by the host later, and never closed) or not at all (starting
        a command or an SFTP session, a transport stuck in a rekey)."""
        fired = threading.Event()

        def stall():
            fired.set()
            self.drop_stalled(client)

        timer = threading.Timer(self.target.timeout, stall)
        timer.daemon = True
        timer.start()
        try:
            yield
        except Exception:
            if fired.is_set():
                raise self.stalled() from None
            raise
        finally:
            timer.cancel()

    def take_slot(self):
        """Wait for a channel slot, closing an idle SFTP session if that is
        what holds the last ones; a 503 ('busy') after `ssh_timeout` (see
        `stream_started`), since downloads to slow readers may hold them
        all for long."""
        deadline = time.monotonic() + _session_wait(self.target.timeout)
        while not self.slots.acquire(timeout=0.05):
            if not self._close_idle() and time.monotonic() > deadline:
                raise LibrarianError(503, "store %r on host %s is busy: all %d of its SSH "
                                     "sessions are in use; try again later"
                                     % (self.store_name, self.target.host, self.MAX_CHANNELS))

    def _close_idle(self):
        """Close one idle SFTP session, freeing its slot; False if none."""
        with self.lock:
            if not self.idle:
                return False
            sftp = self.idle.pop(0)
        _close(sftp)
        self.slots.release()
        return True

    def checkout_sftp(self):
        client = self._client()
        with self.lock:
            if self.idle:
                return self.idle.pop()

        def start():
            sftp = client.open_sftp()
            sftp.get_channel().settimeout(self.target.timeout)
            return sftp

        return self._open(client, start)

    def _open(self, client, start):
        """Take a slot and run `start()`, which opens a channel on `client`
        and starts what runs on it; returns what it returns, holding the slot.

        A host that refuses a channel (over its sshd's MaxSessions, which
        also counts sessions whose closing it has not finished) is asked
        again, after one of our idle SFTP sessions is closed, until
        `ssh_timeout`; then 503. A stalled host: see `watchdog`."""
        import paramiko

        self.take_slot()
        deadline = time.monotonic() + _session_wait(self.target.timeout)
        pause = 0.02
        try:
            while True:
                with self.watchdog(client), self.errors():
                    try:
                        return start()
                    except paramiko.ChannelException as e:
                        refusal = "it refused a new session (%s)" % e
                    except (paramiko.SSHException, EOFError) as e:
                        if self._goes_down():
                            raise  # the connection is lost: `errors` says so
                        # paramiko keeps one reason per connection: concurrent
                        # refusals may come as "Unable to open channel".
                        refusal = "it ended a new session (%s)" % ssh_failure_reason(e)
                if time.monotonic() > deadline:
                    raise LibrarianError(503, "store %r on host %s: %s; its sshd must allow %d "
                                         "sessions per connection (MaxSessions)"
                                         % (self.store_name, self.target.host, refusal,
                                            self.MAX_CHANNELS + 2))
                if not self._close_idle():
                    time.sleep(pause)
                    pause = min(2 * pause, 0.5)
        except BaseException:
            self.slots.release()
            raise

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
        except LibrarianError:  # the session may be mid-request: never reuse it
            _close(sftp)
            raise
        finally:
            self.checkin_sftp(sftp)

    @contextmanager
    def channel(self, argv, window_size=None):
        """A new session channel running the command `argv` (a list: every
        word is quoted), holding a slot; `window_size` bounds what the host
        may send ahead of our reads. Reads and writes on it time out after
        `ssh_timeout` (see `errors`)."""
        client = self._client()

        def start():
            ch = client.get_transport().open_session(window_size=window_size)
            try:
                ch.exec_command(shlex.join(argv))
            except BaseException:
                _close(ch)
                raise
            ch.settimeout(self.target.timeout)
            return ch

        ch = self._open(client, start)
        try:
            yield ch
        finally:
            _close(ch)
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
        (503, and the connection is forgotten), and so does a wait on a
        channel longer than `ssh_timeout`: the host is stalled, and what
        it may still send would confuse the channel's next use. A channel
        that the host refused or ended becomes a 503 without harming the
        connection's other channels; errors of the remote file system
        (ENOENT, permissions) pass as the OSErrors they are."""
        import paramiko

        try:
            yield
        except StoreUnreachable:
            raise
        except (paramiko.SSHException, EOFError, OSError) as e:
            if isinstance(e, paramiko.ChannelException):  # e.g. over the host's MaxSessions
                raise LibrarianError(503, "store %r on host %s refused a new session: %s"
                                     % (self.store_name, self.target.host, e)) from None
            if isinstance(e, (socket.timeout, TimeoutError)):
                self.drop_stalled(self.client)
                raise self.stalled() from None
            if not isinstance(e, (paramiko.SSHException, EOFError, ConnectionError)):
                raise  # an error of the remote file system
            if self._goes_down():
                went_quiet = self.went_quiet
                self.drop()
                if went_quiet:
                    raise self.stalled() from None
                raise StoreUnreachable(self.store_name, self.target,
                                       "lost the connection (%s)" % ssh_failure_reason(e)) from None
            # One channel ended (the connection itself is fine): only this
            # request fails, the others on the connection go on.
            raise LibrarianError(503, "store %r on host %s closed a session: %s"
                                 % (self.store_name, self.target.host, ssh_failure_reason(e))) from None

    def run(self, argv, check=True):
        """Run a command (argv: a list, every word quoted) on the host and
        wait for it however long it takes (md5sum of a large data set can
        take minutes; a host that stops answering is noticed by
        `_heartbeat`); returns (exit status, stdout bytes, stderr bytes).
        With `check`, a non-zero status raises `remote_error` of its
        stderr."""
        with self.channel(argv) as ch, self.errors():
            ch.settimeout(None)
            ch.shutdown_write()
            out = ch.makefile("rb").read()
            err = ch.makefile_stderr("rb").read()
            status = ch.recv_exit_status()
            if status == -1:  # closed without an exit status
                raise EOFError("the session running %s ended" % argv[0])
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


class _ExecReader:
    """A file on the store host read from byte `seek()`'s offset by `cat`
    (or `tail -c +N`) on an exec channel: paramiko reads that several times
    faster than SFTP's one 32 kB request at a time, and the channel window
    (READ_WINDOW_BYTES) bounds what is held in memory when our reader is
    slow. The command starts at the first read; errors on the host (a
    missing file) are raised at the end of the data as OSErrors."""

    def __init__(self, conn, path):
        self.conn, self.path = conn, path
        self.offset = 0
        self.context = self.channel = None

    def seek(self, offset, whence=0):
        if self.channel is not None or whence != 0:
            raise OSError("a remote file can only be positioned before reading")
        self.offset = offset

    def _start(self):
        if self.offset:
            argv = ["sh", "-c", 'exec tail -c +"$2" -- "$1"', "sh", self.path,
                    str(self.offset + 1)]
        else:
            argv = ["cat", "--", self.path]
        context = self.conn.channel(argv, window_size=READ_WINDOW_BYTES)
        self.channel = context.__enter__()
        self.context = context
        with self.conn.errors():
            self.channel.shutdown_write()

    def _fill(self, n):
        """Up to `n` bytes (fewer only at the end; all with n < 0), gathered
        in a bytearray: paramiko's file objects grow bytes objects chunk by
        chunk, which copies every 32 kB packet again and again."""
        data = bytearray()
        while n < 0 or len(data) < n:
            packet = self.channel.recv(CHUNK if n < 0 else min(CHUNK, n - len(data)))
            if not packet:
                break
            data += packet
        return bytes(data)

    def read(self, n=-1):
        if self.channel is None:
            self._start()
        with self.conn.errors():
            data = self._fill(n if n is not None else -1)
            if data or n == 0:
                return data
            status = self.channel.recv_exit_status()
            if status == -1:
                raise EOFError("the session reading %s ended" % self.path)
            err = self.channel.makefile_stderr("rb").read()
        if status != 0:
            raise remote_error("reading %s on %s" % (self.path, self.conn.target.host), err)
        return b""

    def close(self):
        if self.context is not None:
            context, self.context = self.context, None
            context.__exit__(None, None, None)

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
        self.context = conn.channel(["sh", "-c", 'set -C && exec cat > "$1"', "sh", path])
        self.channel = self.context.__enter__()
        self.closed = False

    def _release(self):
        self.closed = True
        self.context.__exit__(None, None, None)

    def write(self, data):
        with self.conn.errors():
            try:
                # A memoryview: paramiko's sendall slices what is left after
                # each 32 kB packet, which copies a bytes object every time.
                self.channel.sendall(memoryview(data))
            except TimeoutError:
                raise  # the host took nothing for ssh_timeout: `errors` drops it as stalled
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
        """A binary file. 'xb' creates a new file, never replacing one
        (`_ExecWriter`). 'rb' reads a large file through a command on an
        exec channel, which paramiko drives much faster than SFTP's 32 kB
        requests (`_ExecReader`); a file under SMALL_FILE_BYTES is read
        whole by SFTP at once, which spares starting a command per file of
        a directory."""
        if mode == "xb":
            return _ExecWriter(self.conn, path)
        with self.conn.sftp() as sftp:
            st = sftp.stat(path)
            if st.st_size >= SMALL_FILE_BYTES or not stat.S_ISREG(st.st_mode):
                return _ExecReader(self.conn, path)
            with sftp.open(path, "r") as f:
                f.prefetch(st.st_size)
                return io.BytesIO(f.read())

    def write_at(self, path, offset, data):
        """As `LocalFS.write_at`, by SFTP (pipelined writes)."""
        with self.conn.sftp() as sftp:
            with sftp.open(path, "r+" if offset else "w") as f:
                f.truncate(offset)
                f.seek(offset)
                f.set_pipelined(True)
                f.write(data)

    def write_text(self, path, text):
        with self.conn.sftp() as sftp, sftp.open(path, "w") as f:
            f.write(text.encode("utf-8"))

    def read_text(self, path, limit=1 << 16):
        with self.conn.sftp() as sftp, sftp.open(path, "r") as f:
            return f.read(limit).decode("utf-8")

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

    def command_output(self, argv):
        """As `LocalFS.command_output`, on the store host: one exec channel,
        read as the bytes come (its window bounds what waits unread) and
        waited for however long the command runs (a host that stops
        answering is noticed by the connection's heartbeat)."""
        with self.conn.channel(argv, window_size=READ_WINDOW_BYTES) as ch, self.conn.errors():
            ch.settimeout(None)
            ch.shutdown_write()
            yield from iter(lambda: ch.recv(CHUNK), b"")
            status = ch.recv_exit_status()
            err = ch.makefile_stderr("rb").read(4096)
            if status == -1:  # closed without an exit status
                raise EOFError("the session running %s ended" % argv[0])
        if status != 0:
            raise remote_error("%s on %s" % (argv[0], self.conn.target.host), err)

    def read_observation(self, path):
        """Observation metadata read over SFTP by the isolated reader
        process (see `read_remote_observation`); None, without asking it,
        for what is not shaped like a data set (`uvmeta.data_kind`)."""
        with self.conn.sftp() as sftp:
            if uvmeta.data_kind(path, _SFTPFiles(sftp)) is None:
                return None
        try:
            return uvmeta.run_reader("data set", read_remote_observation, self.conn.target, path)
        except OSError as e:
            raise LibrarianError(503, "cannot read the header of %s on %s: %s"
                                 % (path, self.where, e)) from None


    def quick_look(self, path, baseline, pol):
        """`quicklook.look` of the data set at `path` on the store host, in
        the reader process (`look_remote`); None for what is not one."""
        with self.conn.sftp() as sftp:
            if uvmeta.data_kind(path, _SFTPFiles(sftp)) is None:
                return None
        try:
            return uvmeta.run_reader("data set", look_remote, self.conn.target, path, baseline,
                                     pol)
        except OSError as e:
            raise LibrarianError(503, "cannot read %s on %s: %s" % (path, self.where, e)) from None


class _SFTPFiles:
    """The bytes of a store host's files through an SFTP session, as
    `uvmeta.read_via` fetches them: the readers decide what to read."""

    def __init__(self, sftp):
        self.sftp = sftp

    def lstat(self, path):
        return self.sftp.lstat(path)

    def listdir(self, path):
        return self.sftp.listdir(path)

    def open(self, path):
        return self.sftp.open(path, "rb", bufsize=CHUNK)


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
    with _reader_sftp(target) as sftp:
        return uvmeta.read_via(_SFTPFiles(sftp), path)


def _reader_sftp(target):
    """An SFTP session to `target` on the reader process's shared client."""
    client = _reader_clients.get(target)
    if client is None or not client.get_transport() or not client.get_transport().is_active():
        client = _reader_clients[target] = ssh_connect(target)
    return client.open_sftp()


def look_remote(target, path, baseline, pol):
    """Runs in uvmeta's reader process: `quicklook.look` of a data set on
    another host. A UVH5 file is read by h5py straight from the SFTP file
    (only the parts the picture needs); a MIRIAD data set, whose records
    are read in sequence, is fetched into a temporary folder first."""
    import tempfile

    import quicklook

    try:
        with _reader_sftp(target) as sftp:
            files = _SFTPFiles(sftp)
            if uvmeta.data_kind(path, files) == "uvh5":
                with files.open(path) as f:
                    return quicklook.look("uvh5", f, baseline, pol)
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, posixpath.basename(path))
                os.mkdir(local)
                for item in files.listdir(path):
                    sftp.get(posixpath.join(path, item), os.path.join(local, item))
                return quicklook.look("miriad", local, baseline, pol)
    except (uvmeta.MetadataError, quicklook.QuickLookError, MemoryError):
        raise
    except Exception as e:  # paramiko's errors do not all survive pickling
        _reader_clients.pop(target, None)
        raise OSError(ssh_failure_reason(e)) from None
