"""A bound on the request bodies waitress holds in memory, over all
connections at once.

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
"""

import threading
import weakref

from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.utilities import Error

SMALL_BODY_BYTES = 64 << 10  # a v1 call's JSON; bounded by the connection count instead
RETRY_AFTER_SECONDS = 5


class BodyBudget:
    """`total` bytes of request bodies that may be held at once."""

    def __init__(self, total):
        self.total = self.free = total
        self.lock = threading.Lock()

    def take(self, n):
        """Reserve `n` bytes; False (nothing reserved) when fewer are free."""
        with self.lock:
            if n > self.free:
                return False
            self.free -= n
            return True

    def give(self, n):
        """Return `n` bytes that `take` reserved."""
        with self.lock:
            self.free += n


class BodiesBusy(Error):
    """waitress's answer when the budget is spent: 503 with Retry-After."""

    code = 503
    reason = "Service Unavailable"

    def to_response(self, ident=None):
        status, headers, body = super().to_response(ident)
        return status, headers + [("Retry-After", str(RETRY_AFTER_SECONDS))], body


def channel_class(budget, bound):
    """A waitress channel class whose requests reserve their bodies from
    `budget` (`BodyBudget`); `bound` is the largest body taken (bytes)."""

    class BudgetedParser(HTTPRequestParser):
        release = None

        def parse_header(self, header_plus):
            super().parse_header(header_plus)
            n = bound if self.chunked else self.content_length
            if n <= SMALL_BODY_BYTES or n > bound:  # small, or refused (413) by waitress
                return
            if not budget.take(n):
                self.expect_continue = False  # waitress would send 100 and read it all
                self.error = BodiesBusy(
                    "the server holds as many request bodies as [server] buffered_body_bytes "
                    "allows (%d bytes); try again in a few seconds" % budget.total)
                self.completed = True
                return
            # Given back when the request is closed, or when a connection that
            # went away mid-body drops its parser.
            self.release = weakref.finalize(self, budget.give, n)

        def close(self):
            super().close()
            if self.release is not None:
                self.release()

    class BudgetedChannel(HTTPChannel):
        parser_class = BudgetedParser

        def handle_close(self):
            with self.requests_lock:
                request, self.request = self.request, None  # a body cut off mid-way
            if request is not None:
                request.close()
            super().handle_close()

    return BudgetedChannel
