"""Who is calling: authenticators for programs, a signed session cookie for
people in a browser, and CSRF tokens for the browser's state changes.

Programs present their authenticator as `Authorization: Bearer ...`, an
`authenticator` query argument, or the `authenticator` field of the
existing protocol's request object. A person logs in once with theirs; the
server then sets an HttpOnly, SameSite=Strict cookie holding the source's
session token (the server keeps only its SHA-256, in `web_session`, so that
logging out ends the session for good), the issue time and a CSRF token,
signed with HMAC-SHA256 under `[server] secret_key` (RFC 2104; stdlib
`hmac`). Every state-changing form carries that token and is refused
without it.
"""

import base64
import contextlib
import datetime
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections import OrderedDict

from bottle import HTTPError, request, response

import models
from errors import LibrarianError, short
from models import Source, WebSession

AUTH_CACHE_ENTRIES = 10000
BEARER_SECONDS = 60.0  # how long an issued authenticator that authenticated counts as known
SESSION_COOKIE = "librarian_session"
SESSION_SECONDS = 12 * 3600


def fail(status, message):
    raise HTTPError(status, message)


def bearer_token(header=None):
    """The token of an `Authorization: Bearer` header value (by default the
    request's), or None. The scheme is case-insensitive (RFC 9110 11.1)."""
    if header is None:
        header = request.get_header("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def require_level(source, level):
    """`source` if its level is at least `level`, else 403."""
    if not source.allows(level):
        fail(403, "%s needs level %s; source %r has level %s"
             % (request.path, level, source.name, source.level))
    return source


MAX_AUTHENTICATOR_CHARS = 1024


def refuse_credentials(message, challenge):
    """Stop the request for missing or wrong credentials: 401 with a Bearer
    challenge (RFC 6750) on our additions (`challenge`), 400 in the
    original protocol, whose clients expect that."""
    if challenge:
        raise HTTPError(401, message, **{"WWW-Authenticate": 'Bearer realm="Librarian"'})
    fail(400, message)


class _Check:
    """One Argon2 check in progress, for the requests waiting on it."""

    def __init__(self):
        self.done = threading.Event()
        self.error = None


def _put(entries, key, value):
    """Set `key` in the OrderedDict `entries` as the most recently used,
    the least recently used dropped beyond AUTH_CACHE_ENTRIES."""
    entries[key] = value
    entries.move_to_end(key)
    while len(entries) > AUTH_CACHE_ENTRIES:
        entries.popitem(last=False)


class AuthCache:
    """What this process found out about authenticators: the database's key
    for issued ones (read once), the sources whose chosen secrets Argon2
    recognised, and the secrets it found to be nobody's, each under a keyed
    hash with a key of this process only (never stored), least recently used
    dropped beyond AUTH_CACHE_ENTRIES; and the issued authenticators it
    found a source for (`recognises`). A recognised entry holds while the
    source's stored hash is unchanged: no expiry, so no moment when every
    client pays Argon2 again at once. A refused one holds while the chosen
    secrets are the same, so a client retrying a stale secret costs Argon2
    once, not once per retry. Requests that bring the same unknown secret at
    once wait for one Argon2 check (a pipeline's workers after a restart),
    not one each."""

    def __init__(self):
        self.lock = threading.Lock()
        self.process_key = secrets.token_bytes(32)
        self.db_key = None
        self.known = OrderedDict()  # keyed hash -> (source id, its authenticator_hash)
        self.refused = OrderedDict()  # keyed hash -> digest of the chosen secrets then
        self.checking = {}  # keyed hash -> its _Check in progress
        self.bearers = OrderedDict()  # keyed hashes of issued authenticators found here
        self.searching = set()  # peers whose unknown secret Argon2 is checking

    def recognises(self, authorization):
        """Whether the value of an Authorization header is `Bearer` and an
        issued authenticator this process found a source for (memory only,
        for `bodybudget`; the request is still authenticated in full),
        in the last BEARER_SECONDS."""
        token = bearer_token(authorization)
        if token is None:
            return False
        mac = hmac.new(self.process_key, token.encode("utf-8", "replace"),
                       hashlib.sha256).digest()
        with self.lock:
            seen = self.bearers.get(mac)
        # Only while it keeps authenticating: a source removed meanwhile (in
        # another process) is a stranger again within BEARER_SECONDS.
        return seen is not None and time.monotonic() - seen < BEARER_SECONDS

    def find(self, authenticator, peer=None):
        """The Source calling with `authenticator` (text), or None; raises
        `LibrarianError(503)` when Argon2 is too busy (`models.find_source`)
        or already checking another secret for the same `peer` (an address:
        one flooding address holds one of the `ARGON2_SEARCHES`, so people's
        first calls from elsewhere still get through)."""
        if self.db_key is None:
            self.db_key = models.authenticator_key()
        mac = hmac.new(self.process_key, authenticator.encode("utf-8"),
                       hashlib.sha256).digest()
        if models.ISSUED_RE.match(authenticator):  # one indexed query, microseconds
            source = models.find_source(authenticator, self.db_key)
            if source is not None:
                with self.lock:
                    _put(self.bearers, mac, time.monotonic())
            return source
        source = self._known(mac)
        if source is not None:
            return source
        chosen = models.chosen_secret_sources()
        generation = hashlib.sha256(repr([(s.id, s.authenticator_hash) for s in chosen])
                                    .encode()).digest()
        with self.lock:
            if self.refused.get(mac) == generation:
                self.refused.move_to_end(mac)
                return None
            check = self.checking.get(mac)
            leader = check is None
            if leader:
                check = self.checking[mac] = _Check()
        if not leader:  # the same secret is being checked: its outcome is ours
            check.done.wait()
            if check.error is not None:
                raise check.error
            return self._known(mac)
        try:
            with self._one_search_per(peer):
                source = self._known(mac) or models.find_source(authenticator, self.db_key,
                                                                chosen)
            with self.lock:
                self._remember(mac, source, generation)
            return source
        except Exception as e:
            check.error = e
            raise
        finally:
            with self.lock:
                del self.checking[mac]
            check.done.set()

    @contextlib.contextmanager
    def _one_search_per(self, peer):
        """At most one Argon2 search at once for `peer`; 503 beyond."""
        with self.lock:
            if peer is not None and peer in self.searching:
                raise LibrarianError(503, "an authenticator from %s is being checked already; "
                                     "try again in a few seconds" % short(peer))
            self.searching.add(peer)
        try:
            yield
        finally:
            with self.lock:
                self.searching.discard(peer)

    def _remember(self, mac, source, generation):
        """Note what Argon2 found for `mac` (`source`, or None for nobody's
        under the chosen secrets `generation`); call holding the lock."""
        if source is None:
            self.known.pop(mac, None)
            _put(self.refused, mac, generation)
        else:
            self.refused.pop(mac, None)
            _put(self.known, mac, (source.id, source.authenticator_hash))

    def _known(self, mac):
        """The cached Source for `mac`, if its stored hash is unchanged."""
        with self.lock:
            hit = self.known.get(mac)
            if hit:
                self.known.move_to_end(mac)
        if hit:
            source = models.source_where(Source.id, hit[0])
            if source is not None and source.authenticator_hash == hit[1]:
                return source
        return None


def authenticate(authenticator, level, challenge=False):
    """The Source calling with `authenticator`, if its level is at least
    `level`; otherwise 400 or, with `challenge`, 401 (missing or wrong; see
    `refuse_credentials`), 400 (not valid text), 403 (too low); see
    `AuthCache` for the cost."""
    if authenticator is not None and not isinstance(authenticator, str):
        fail(400, "the authenticator must be a string")
    if not authenticator:
        refuse_credentials("no authenticator given", challenge)
    try:
        authenticator.encode("utf-8")
    except UnicodeEncodeError:
        fail(400, "the authenticator is not valid text (it holds a lone surrogate)")
    if len(authenticator) > MAX_AUTHENTICATOR_CHARS or "\0" in authenticator \
            or models.CONTROL_RE.search(authenticator):
        fail(400, "the authenticator is not one this server issues (at most %d characters, "
             "no control characters)" % MAX_AUTHENTICATOR_CHARS)
    source = request.app.config["librarian.auth_cache"].find(authenticator, request.remote_addr)
    if source is None:
        refuse_credentials("unknown authenticator", challenge)
    return require_level(source, level)


def caller(level, allow_session=False):
    """The Source making this request, at `level` or above: from a Bearer
    header or `authenticator` query argument, else (when `allow_session`)
    from the session cookie, which for anything but GET/HEAD also needs the
    session's CSRF token in an `X-CSRF-Token` header."""
    token = bearer_token() or request.query.get("authenticator")
    if token is None and allow_session:
        source = session_source()
        if source is not None:
            if request.method not in ("GET", "HEAD"):
                check_csrf(request.get_header("X-CSRF-Token"))
            return require_level(source, level)
    return authenticate(token, level, challenge=True)


# ---------------------------------------------------------------------------
# The session cookie
# ---------------------------------------------------------------------------

def _secret():
    return request.app.config["librarian.settings"].server["secret_key"].encode("utf-8")


def _b64(data):
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign(data):
    """`data` (JSON-able) as `payload.signature`, both base64url."""
    payload = json.dumps(data, sort_keys=True).encode("utf-8")
    mac = hmac.new(_secret(), payload, hashlib.sha256).digest()
    return _b64(payload) + "." + _b64(mac)


def unsign(value):
    """The data of a value made by `sign`, or None if it was tampered with
    or is malformed (compared in constant time)."""
    try:
        payload_text, mac_text = value.split(".", 1)
        payload, mac = _unb64(payload_text), _unb64(mac_text)
    except (ValueError, AttributeError):
        return None
    if not hmac.compare_digest(mac, hmac.new(_secret(), payload, hashlib.sha256).digest()):
        return None
    try:
        return json.loads(payload)
    except ValueError:
        return None


def _token_hash(token):
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


LOGIN_COOKIE = "librarian_login"


def login_csrf_token():
    """A token for the login form, also set as a SameSite=Strict cookie: a
    login POSTed from another site lacks the cookie and is refused, so
    nobody can log a victim's browser in as themselves (login CSRF)."""
    token = secrets.token_urlsafe(24)
    response.set_cookie(LOGIN_COOKIE, sign({"login": token}), httponly=True,
                        samesite="strict", path="/login", max_age=3600)
    return token


def check_login_csrf(token):
    """403 unless the login form's `token` matches its cookie."""
    data = unsign(request.get_cookie(LOGIN_COOKIE) or "")
    if not _same_token(token, data.get("login") if isinstance(data, dict) else None):
        fail(403, "the login form is missing its token or it is stale; reload the page and "
             "try again")


def start_session(source):
    """Log `source` in: record a new session and set its signed cookie.
    Expired session records are swept out at the same time."""
    token = secrets.token_urlsafe(32)
    now = models.utcnow()
    with models.write_transaction():
        WebSession.delete().where(WebSession.expires < now).execute()
        WebSession.create(token_hash=_token_hash(token), source=source.name, created=now,
                          expires=now + datetime.timedelta(seconds=SESSION_SECONDS))
    data = {"token": token, "csrf": secrets.token_urlsafe(24), "issued": int(time.time())}
    response.set_cookie(SESSION_COOKIE, sign(data), httponly=True, samesite="strict",
                        path="/", max_age=SESSION_SECONDS)


def end_session():
    """Log out: forget the session on the server and in the browser."""
    data = session_data()
    if data is not None:
        with models.write_transaction():
            WebSession.delete().where(WebSession.token_hash == _token_hash(data["token"])) \
                .execute()
    response.delete_cookie(SESSION_COOKIE, path="/")


def session_data():
    """The cookie's data `{token, csrf, issued}` if its signature is good,
    or None. (Whether the session is still open is `session_source`'s
    question.)"""
    value = request.get_cookie(SESSION_COOKIE)
    data = unsign(value) if value else None
    if not isinstance(data, dict) or not isinstance(data.get("token"), str) \
            or not isinstance(data.get("csrf"), str):
        return None
    return data


def session_source():
    """The Source logged in with this request's cookie while its session
    is open, or None."""
    data = session_data()
    if data is None:
        return None
    row = WebSession.get_or_none((WebSession.token_hash == _token_hash(data["token"]))
                                 & (WebSession.expires > models.utcnow()))
    if row is None:
        return None
    return models.source_where(Source.name, row.source)


def csrf_token():
    """The CSRF token of the current session ('' when not logged in)."""
    data = session_data()
    return data["csrf"] if data and session_source() is not None else ""


def _same_token(token, expected):
    """Whether the sent `token` is the `expected` one (constant time)."""
    return bool(expected) and isinstance(token, str) and hmac.compare_digest(
        token.encode("utf-8", "replace"), expected.encode("utf-8"))


def check_csrf(token):
    """403 unless `token` is the current session's CSRF token."""
    if not _same_token(token, csrf_token()):
        fail(403, "this form is missing its CSRF token or it is stale; reload the page and "
             "try again")
