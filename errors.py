"""The kinds of failure, and the two decisions made from them.

Every refused or failed operation raises a `LibrarianError` of one kind:

| kind          | HTTP | retried by a task | meaning                                   |
|---------------|------|-------------------|-------------------------------------------|
| `Refused`     | 400  | no                | the request itself is wrong               |
| `Forbidden`   | 403  | no                | the caller's level does not allow it      |
| `NotFound`    | 404  | no                | no such file, store or operation          |
| `Conflict`    | 409  | no                | the archive holds something else there    |
| `Corrupt`     | 500  | no                | bytes do not match their checksum         |
| `Unavailable` | 503  | yes               | a store host or peer cannot be reached    |
| `Transient`   | 503  | yes               | busy, or a failure that may pass          |

`http_status(e)` (the status a route answers with) and `is_retryable(e)`
(whether a task tries again) are the only places that decide from a kind.
`LibrarianError(status, message)` builds the kind of that status, so older
call sites read as before.
"""


class LibrarianError(Exception):
    """A refused or failed operation; `message` says what was wrong, for
    the caller to read, and `status` is its HTTP status."""

    status = 500
    retryable = False

    def __new__(cls, *args):
        if cls is LibrarianError and args and isinstance(args[0], int):
            cls = _BY_STATUS.get(args[0], LibrarianError)
        return super().__new__(cls)

    def __init__(self, *args):
        if len(args) == 2:
            status, message = args
        else:
            status, message = type(self).status, args[0]
        super().__init__(message)
        self.status = status
        self.message = message


class Refused(LibrarianError):
    """The request is wrong (bad argument, unsafe path, bad bytes sent)."""
    status = 400


class ChecksumMismatch(Refused):
    """A chunk of a resumable upload arrived damaged (tus's 460)."""
    status = 460


class Forbidden(LibrarianError):
    """The caller's level does not allow the operation."""
    status = 403


class NotFound(LibrarianError):
    """No such file, store, task or operation."""
    status = 404


class Conflict(LibrarianError):
    """Something else is already where the operation would put its bytes
    or records."""
    status = 409


class Corrupt(LibrarianError):
    """Stored or copied bytes do not match their recorded size and MD5:
    trying again cannot help."""
    status = 500


class Unavailable(LibrarianError):
    """A store host or another Librarian cannot be reached now."""
    status = 503
    retryable = True


class Transient(LibrarianError):
    """A failure that may pass (a busy host, a peer's server error)."""
    status = 503
    retryable = True


_BY_STATUS = {400: Refused, 403: Forbidden, 404: NotFound, 409: Conflict, 503: Unavailable}


def short(text, limit=80):
    """`text` as quoted in an error message: its repr, cut to about `limit`
    characters, so that bad input is never echoed whole."""
    text = str(text)
    if len(text) <= limit:
        return repr(text)
    return repr(text[:limit]) + "... (%d characters)" % len(text)


def http_status(error):
    """The HTTP status to answer an exception with: its kind's, else 500."""
    return error.status if isinstance(error, LibrarianError) else 500


def is_retryable(error):
    """Whether a task that raised `error` should be tried again: the kinds
    marked retryable, and anything that is not a `LibrarianError` (an
    OSError, a dropped connection)."""
    return error.retryable if isinstance(error, LibrarianError) else True


def from_peer(status, message):
    """The kind of an error another Librarian answered with (`status`: its
    HTTP status, None when it could not be reached): what it refused stays
    refused; anything else may pass."""
    kind = _BY_STATUS.get(status)
    if kind is None or kind.retryable:
        kind = Transient
    return kind("another Librarian answered: %s" % message if status else message)
