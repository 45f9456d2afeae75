"""What we add to waitress: a bound on the request bodies it holds in
memory, over all connections at once, and the closing of connections
whose clients stopped reading (`close_stalled`).

waitress reads a whole body before the application sees the request (and
so before anyone has checked the caller), and we have it keep bodies in
memory rather than spool them to disk (`librarian.waitress_limits`). Each
body is bounded by `max_body_bytes`, but many connections could each hold
one: anonymous callers could fill the host's memory. So a body larger than
SMALL_BODY_BYTES reserves its length (a chunked one, the bound) from one
budget of `[server] buffered_body_bytes` when its headers arrive; when the
budget is spent, waitress answers 503 with Retry-After from the headers and
reads none of it (tus clients, ours included, retry). The reservation ends
when the request is done or its connection goes. Small bodies are bounded
by `connection_limit` x SMALL_BODY_BYTES.

Callers this process has recognised (an `Authorization: Bearer` issued
authenticator that authenticated before: `known`) may use the whole
budget. Others (a v1 call's authenticator travels inside its body) share
at most half of it, and one peer address at most a quarter (at least one
body): a few anonymous connections that trickle their bodies cannot keep
authenticated uploads out.
"""

import fcntl
import functools
import logging
import struct
import termios
import threading
import weakref

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import BaseWSGIServer
from waitress.utilities import Error, RequestEntityTooLarge

SMALL_BODY_BYTES = 64 << 10  # a v1 call's JSON; bounded by the connection count instead
RETRY_AFTER_SECONDS = 5
log = logging.getLogger("librarian")


class BodyBudget:
    """`total` bytes of request bodies that may be held at once; at most
    half by callers not `known`, and a quarter (at least `bound`) by one
    peer of those."""

    def __init__(self, total, bound):
        self.total = self.free = total
        self.unknown_limit, self.peer_limit = total // 2, max(bound, total // 4)
        self.unknown, self.peers = 0, {}  # bytes held by unknown callers, and per peer
        self.lock = threading.Lock()

    def take(self, n, peer, known):
        """Reserve `n` bytes for a body from `peer` (an address); False
        (nothing reserved) when that would go over a limit."""
        with self.lock:
            if n > self.free:
                return False
            if not known:
                held = self.peers.get(peer, 0)
                if self.unknown + n > self.unknown_limit or held + n > self.peer_limit:
                    return False
                self.unknown += n
                self.peers[peer] = held + n
            self.free -= n
            return True

    def give(self, n, peer, known):
        """Return what `take(n, peer, known)` reserved."""
        with self.lock:
            self.free += n
            if not known:
                self.unknown -= n
                held = self.peers.pop(peer) - n
                if held:
                    self.peers[peer] = held


class BodiesBusy(Error):
    """waitress's answer when the budget is spent: 503 with Retry-After."""

    code = 503
    reason = "Service Unavailable"

    def to_response(self, ident=None):
        status, headers, body = super().to_response(ident)
        return status, headers + [("Retry-After", str(RETRY_AFTER_SECONDS))], body


class BodyTooLarge(RequestEntityTooLarge):
    """waitress's 413, with a message naming the setting (its own names the
    bound plus one)."""


def channel_class(budget, bound, known):
    """A waitress channel class whose requests reserve their bodies from
    `budget` (`BodyBudget`); `bound` is the largest body taken (bytes);
    `known(authorization)` tells whether an Authorization header's value is
    a caller this process has recognised (memory only: it runs in
    waitress's I/O thread)."""

    class BudgetedParser(HTTPRequestParser):
        release = None

        def __init__(self, adj, peer=None):
            super().__init__(adj)
            self.peer = peer

        def received(self, data):
            n = super().received(data)
            if type(self.error) is RequestEntityTooLarge:  # waitress's, naming bound + 1
                self.error = BodyTooLarge(
                    "the request body is over [server] max_body_bytes (%d bytes); files of "
                    "any size travel as resumable uploads (tus) in chunks of at most that"
                    % bound)
            return n

        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            n = bound if self.chunked else self.content_length
            if n > bound:  # refused (413) by waitress from the headers alone
                self.expect_continue = False  # else it would send 100 and read the body
                return
            if n <= SMALL_BODY_BYTES:
                return
            recognised = known(self.headers.get("AUTHORIZATION", ""))
            if not budget.take(n, self.peer, recognised):
                self.expect_continue = False  # waitress would send 100 and read it all
                self.error = BodiesBusy(
                    "the server holds as many request bodies as it may (%s); try again in a "
                    "few seconds" % ("[server] buffered_body_bytes, %d bytes" % budget.total
                                     if recognised else "its share for callers not yet "
                                     "known, or for one address"))
                self.completed = True
                return
            # Given back when the request is closed, or when a connection that
            # went away mid-body drops its parser.
            self.release = weakref.finalize(self, budget.give, n, self.peer, recognised)

        def close(self):
            super().close()
            if self.release is not None:
                self.release()

    class BudgetedChannel(HTTPChannel):
        def __init__(self, server, sock, addr, adj, map=None):
            peer = addr[0] if isinstance(addr, tuple) else addr
            self.parser_class = functools.partial(BudgetedParser, peer=peer)
            super().__init__(server, sock, addr, adj, map)

        def handle_close(self):
            with self.requests_lock:
                request, self.request = self.request, None  # a body cut off mid-way
            if request is not None:
                request.close()
            super().handle_close()

    return BudgetedChannel


def install(server, channel, send_timeout):
    """Make every listening socket of the waitress `server` (one
    TcpWSGIServer, or a MultiSocketServer of several: `host = localhost`
    with IPv4 and IPv6) use `channel`, and close its connections stalled
    for `send_timeout` seconds (`close_stalled`); raises RuntimeError if
    there is no listener."""
    listeners = {id(s): s for s in [server, *getattr(server, "map", {}).values()]
                 if isinstance(s, BaseWSGIServer)}
    if not listeners:
        raise RuntimeError("no waitress listener to bound request bodies on")
    for listener in listeners.values():
        listener.channel_class = channel
        listener.maintenance = functools.partial(close_stalled, listener,
                                                 listener.maintenance, send_timeout)


def close_stalled(listener, maintenance, send_timeout, now):
    """waitress's look for idle connections, and then ours for stalled
    ones: a connection holding an answer of which nothing was sent for
    `send_timeout` seconds (its client stopped reading) is closed, so that
    such clients hold neither a connection slot (waitress closes only a
    connection whose socket can be written to, which never happens) nor a
    worker thread (waitress blocks one whose output is over its high
    watermark, without a limit). A client that reads slowly keeps its
    connection while its bytes move (`_stalled_since`); one whose TCP
    window stays shut for that long cannot be told from one that stopped.
    Runs in waitress's I/O thread,
    within its poll: the closing is left to the trigger, which runs after
    the poll's select."""
    maintenance(now)
    for ch in list(listener.active_channels.values()):
        if ch.total_outbufs_len and _stalled_since(ch, now) <= now - send_timeout:
            listener.trigger.pull_trigger(functools.partial(_close_if_stalled, ch, now,
                                                            send_timeout))


def _unsent(sock):
    """Bytes waiting in the socket's kernel send queue (Linux SIOCOUTQ), or
    None where that cannot be asked."""
    try:
        return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ,
                                              b"\0\0\0\0"))[0]
    except (OSError, ValueError, AttributeError):
        return None


def _stalled_since(ch, now):
    """When the client of channel `ch` last took bytes, as far as we can
    tell: waitress's last send, or later, the last shrinking of the
    kernel's send queue (a slow reader drains it long before the socket
    reads as writable again, and waitress sends nothing meanwhile)."""
    unsent = _unsent(ch.socket)
    if unsent is None:
        return ch.last_activity
    previous = getattr(ch, "librarian_unsent", None)  # (queue length, when it last shrank)
    if previous is None or unsent < previous[0]:
        previous = (unsent, now)
    ch.librarian_unsent = (unsent, previous[1])
    return max(ch.last_activity, previous[1])


def _close_if_stalled(ch, when, send_timeout):
    shrank = getattr(ch, "librarian_unsent", (None, 0.0))[1]
    if ch.connected and ch.total_outbufs_len and \
            max(ch.last_activity, shrank) <= when - send_timeout:
        log.warning("closed a connection whose client took nothing for %g s", send_timeout)
        ch.handle_close()  # (wakes a thread that waits to add output)
