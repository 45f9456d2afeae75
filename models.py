"""Database models of the Librarian and the query helpers that go with them.

One `DatabaseProxy` (`db`) is bound at start from the configured URL
(`bind_database`). Table and column names are those of the existing HERA
deployment (`store`, `file`, `file_instance`, `file_event`, `observation`,
`observing_session`) so that its data can be adopted. The schema itself is
created only by the migrations in `migrations/`; this module never calls
`create_tables`.

Times are naive `datetime` objects in UTC, whole seconds for files. Unix
times on the wire are converted with `to_unix` / `from_unix`, which do not
depend on the host's time zone.

This module imports nothing from Bottle: errors are `LibrarianError`, which
the web layer turns into HTTP replies.
"""

import calendar
import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import threading
import unicodedata

import peewee as pw
from playhouse.db_url import connect as db_url_connect

from errors import LibrarianError, short  # noqa: F401 (where most callers import it from)

log = logging.getLogger("librarian")

db = pw.DatabaseProxy()

MD5_RE = re.compile(r"^[0-9a-f]{32}\Z")  # \Z: no newline after
CONTROL_RE = re.compile(r"[\x01-\x1f\x7f]")
MAX_NAME_BYTES = 256

LEVELS = ("read-only", "read-append", "read-write", "admin")

DELETION_DISALLOWED = 0
DELETION_ALLOWED = 1
DELETION_POLICIES = {"disallowed": DELETION_DISALLOWED, "allowed": DELETION_ALLOWED}
DELETION_POLICY_NAMES = {v: k for k, v in DELETION_POLICIES.items()}


# ---------------------------------------------------------------------------
# Database binding and time helpers
# ---------------------------------------------------------------------------

def open_database(url):
    """Open the database named by `url` (`sqlite:///PATH` or
    `postgresql://USER@HOST:PORT/DB`) and return the Peewee database.

    SQLite gets foreign keys, WAL and a busy timeout so that several threads
    (and a worker process) can share it. Both kinds are pools: a request
    "closes" its connection back into it, so that it pays neither the
    connect nor (SQLite) the pragmas. Raises `ValueError` on a URL of an
    unsupported kind."""
    if url.startswith("sqlite:"):
        # case_sensitive_like: LIKE in searches behaves as on PostgreSQL.
        # check_same_thread off: a pooled connection serves one thread at a
        # time, but not always the same thread.
        return db_url_connect("sqlite+pool:" + url.split(":", 1)[1], max_connections=64,
                              check_same_thread=False,
                              pragmas={"foreign_keys": 1, "journal_mode": "wal",
                                       "busy_timeout": 30000, "synchronous": "normal",
                                       "case_sensitive_like": 1})
    if url.startswith(("postgresql:", "postgres:")):
        pooled = "postgresql+pool:" + url.split(":", 1)[1]
        return db_url_connect(pooled, max_connections=64, stale_timeout=300)
    raise ValueError("database url must start with sqlite:/// or postgresql://, got %r" % url)


def bind_database(url):
    """Bind the module's proxy to the database at `url`; returns it."""
    database = open_database(url)
    db.initialize(database)
    return database


def close_database():
    """Close this thread's connection and, for a pool, every idle one."""
    if db.obj is None:
        return
    if not db.is_closed():
        db.close()
    if hasattr(db.obj, "close_all"):
        db.obj.close_all()


def is_postgres():
    """True when the bound database is PostgreSQL."""
    return isinstance(db.obj, pw.PostgresqlDatabase)


def utcnow():
    """The current UTC time as a naive datetime, whole seconds."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None, microsecond=0)


def unix_seconds_sql(field):
    """SQL for the whole Unix seconds of a naive UTC DateTimeField, as
    `to_unix` gives them (fractions dropped), on either database."""
    if is_postgres():
        return pw.NodeList((pw.SQL("CAST(FLOOR(EXTRACT(EPOCH FROM"), field,
                            pw.SQL(")) AS BIGINT)")), glue=" ")
    # (SQLite's strftime rounds to milliseconds first, so :59.9999 would
    # become the next second: the stored text's fraction is cut off first.)
    return pw.fn.CAST(pw.NodeList((pw.fn.strftime("%s", pw.fn.substr(field, 1, 19)),
                                   pw.SQL("AS INTEGER"))))


def raw_rows(query):
    """The rows of `query` as the driver gives them (tuples, no Peewee
    conversion per value): for long listings whose columns need none."""
    return db.execute(query).fetchall()


def to_unix(dt):
    """Naive UTC datetime -> integer Unix seconds (host TZ plays no part)."""
    return calendar.timegm(dt.utctimetuple())


def from_unix(seconds):
    """Integer Unix seconds -> naive UTC datetime (host TZ plays no part)."""
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).replace(tzinfo=None)


def check_file_name(name):
    """Refuse a file name that is not a plain basename: empty, `.`, `..`,
    containing `/` or NUL, or longer than 256 bytes in UTF-8. Raises
    `LibrarianError(400)` naming the problem; returns the name."""
    if not isinstance(name, str) or not name:
        raise LibrarianError(400, "file name must be a non-empty string")
    if name in (".", ".."):
        raise LibrarianError(400, "file name may not be %r" % name)
    if "/" in name:
        raise LibrarianError(400, "file name %s may not contain '/'" % short(name))
    if "\0" in name:
        raise LibrarianError(400, "file name may not contain a NUL character")
    if CONTROL_RE.search(name):
        raise LibrarianError(400, "file name %s may not contain control characters (newlines, "
                             "tabs, ...)" % short(name))
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise LibrarianError(400, "file name %s is not valid UTF-8" % short(name)) from None
    if len(encoded) > MAX_NAME_BYTES:
        raise LibrarianError(400, "file name is %d bytes long in UTF-8; at most %d allowed"
                             % (len(encoded), MAX_NAME_BYTES))
    return name


STORE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_store_name(name):
    """Refuse (400) a store name that is not 1-64 letters, digits, '.', '_'
    or '-' (it appears in URLs and paths)."""
    if not isinstance(name, str) or not STORE_NAME_RE.match(name):
        raise LibrarianError(400, "store name %r must be 1 to 64 letters, digits, '.', '_' or "
                             "'-', starting with a letter or digit" % (name,))
    return name


def check_md5(md5):
    """Normalise an MD5 given by a caller to 32 lowercase hex digits;
    raises `LibrarianError(400)` when it is not one."""
    if not isinstance(md5, str) or not MD5_RE.match(md5.lower()):
        raise LibrarianError(400, "md5 must be 32 hexadecimal digits, got %s" % short(md5))
    return md5.lower()


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------

class BaseModel(pw.Model):
    class Meta:
        database = db


class Store(BaseModel):
    """A disk area where instances live, at `path_prefix` on `ssh_host`."""

    name = pw.CharField(max_length=256, unique=True)
    ssh_host = pw.CharField(max_length=256)
    path_prefix = pw.CharField(max_length=1024)
    http_prefix = pw.CharField(max_length=1024, null=True)
    available = pw.BooleanField(default=True)

    class Meta:
        table_name = "store"

    def to_dict(self):
        """The store as the existing protocol describes it."""
        return {"name": self.name, "path_prefix": self.path_prefix,
                "ssh_host": self.ssh_host, "available": self.available}

    @classmethod
    def by_name(cls, name):
        """The store called `name`; raises `LibrarianError(400)` if none."""
        store = cls.get_or_none(cls.name == name)
        if store is None:
            raise LibrarianError(400, "no store named %r" % (name,))
        return store


class ObservingSession(BaseModel):
    """A night's contiguous run of observations; `id` is its first obsid."""

    id = pw.BigIntegerField(primary_key=True)
    start_time_jd = pw.DoubleField()
    stop_time_jd = pw.DoubleField()

    class Meta:
        table_name = "observing_session"

    def to_dict(self):
        return self._listing(self.id, self.start_time_jd, self.stop_time_jd)

    @classmethod
    def listed(cls, query):
        """`to_dict` of each session `query` (a select of sessions) finds,
        read as tuples: long listings cost a third of what building model
        objects does."""
        for row in query.select(cls.id, cls.start_time_jd, cls.stop_time_jd).tuples():
            yield cls._listing(*row)

    @staticmethod
    def _listing(id, start, stop):
        return {"id": id, "start_time_jd": start, "stop_time_jd": stop}


class Observation(BaseModel):
    """One observation: `obsid` is the integer GPS second of its start;
    times are JD (UTC), `start_lst_hr` is hours."""

    obsid = pw.BigIntegerField(primary_key=True)
    start_time_jd = pw.DoubleField()
    stop_time_jd = pw.DoubleField(null=True)
    start_lst_hr = pw.DoubleField(null=True)
    session = pw.ForeignKeyField(ObservingSession, null=True, column_name="session_id",
                                 backref="observations", on_delete="SET NULL")

    class Meta:
        table_name = "observation"

    def to_dict(self):
        return self._listing(self.obsid, self.start_time_jd, self.stop_time_jd,
                             self.start_lst_hr, self.session_id)

    @classmethod
    def listed(cls, query):
        """`to_dict` of each observation `query` finds, read as tuples (see
        `ObservingSession.listed`)."""
        columns = (cls.obsid, cls.start_time_jd, cls.stop_time_jd, cls.start_lst_hr, cls.session)
        for row in query.select(*columns).tuples():
            yield cls._listing(*row)

    @staticmethod
    def _listing(obsid, start, stop, lst, session_id):
        return {"obsid": obsid, "start_time_jd": start, "stop_time_jd": stop,
                "start_lst_hr": lst, "session_id": session_id}


class File(BaseModel):
    """An immutable data product with a unique basename. Never deleted or
    changed once created."""

    name = pw.CharField(max_length=256, primary_key=True)
    type = pw.CharField(max_length=32)
    create_time = pw.DateTimeField()
    observation = pw.ForeignKeyField(Observation, null=True, column_name="obsid",
                                     backref="files", on_delete="RESTRICT")
    size = pw.BigIntegerField()
    md5 = pw.CharField(max_length=32)
    source = pw.CharField(max_length=64)
    # Kept exact by database triggers on file_instance (migration 002); never
    # written from Python.
    num_instances = pw.IntegerField(default=0)

    class Meta:
        table_name = "file"

    @classmethod
    def lock(cls, name):
        """Take the file's row lock on PostgreSQL, inside a write
        transaction (SQLite's write transaction already excludes every
        other writer): deletions of a file's instances and changes to its
        remote copies then happen one at a time, so that two deletions
        cannot each count the other's instance as the copy that stays."""
        if is_postgres():
            cls.select(cls.name).where(cls.name == name).for_update().execute()

    def to_dict(self):
        """The record shape shared between Librarians (`create_time` is Unix
        seconds; `source` is local and not included)."""
        return self._listing(self.name, self.type, to_unix(self.create_time), self.obsid,
                             self.size, self.md5)

    @classmethod
    def listed(cls, query):
        """`to_dict` of each file `query` finds, read as tuples (see
        `ObservingSession.listed`)."""
        columns = (cls.name, cls.type, unix_seconds_sql(cls.create_time), cls.observation,
                   cls.size, cls.md5)
        for row in raw_rows(query.select(*columns)):
            yield cls._listing(*row)

    @staticmethod
    def _listing(name, type, create_unix, obsid, size, md5):
        return {"name": name, "type": type, "create_time": create_unix, "obsid": obsid,
                "size": size, "md5": md5}


class FileInstance(BaseModel):
    """One copy of a file on one store, at
    `store.path_prefix/parent_dirs/name`."""

    store = pw.ForeignKeyField(Store, column_name="store", backref="instances",
                               on_delete="RESTRICT")
    parent_dirs = pw.CharField(max_length=1024)
    file = pw.ForeignKeyField(File, column_name="name", backref="instances",
                              on_delete="RESTRICT")
    deletion_policy = pw.IntegerField(default=DELETION_DISALLOWED)
    # The last full read of the bytes (the scrub, a download, a copy...):
    # when, and its result (VERIFY_RESULTS); never read: None, None.
    verified_at = pw.DateTimeField(null=True)
    verify_result = pw.CharField(max_length=16, null=True)

    class Meta:
        table_name = "file_instance"
        primary_key = pw.CompositeKey("store", "parent_dirs", "file")

    @classmethod
    def in_service(cls):
        """The condition an instance must meet to be served, copied from,
        staged or counted as a copy: not found corrupt or missing."""
        return cls.verify_result.is_null() | (cls.verify_result == "ok")

    @classmethod
    def key(cls, inst):
        """The condition selecting the row of the instance `inst`."""
        return ((cls.store == inst.store_id) & (cls.parent_dirs == inst.parent_dirs)
                & (cls.file == inst.name))

    @property
    def store_path(self):
        """Path of the instance relative to its store's prefix."""
        return "/".join(p for p in (self.parent_dirs, self.name) if p)

    @property
    def full_path_on_store(self):
        return self.store.path_prefix.rstrip("/") + "/" + self.store_path

    def to_dict(self):
        return self._listing(self.store.name, self.store.ssh_host, self.store.path_prefix,
                             self.parent_dirs, self.name, self.deletion_policy,
                             self.verified_at, self.verify_result)

    @classmethod
    def listed(cls, query):
        """`to_dict` of each instance `query` (a select of instances joined
        to their stores) finds, read as tuples (see `ObservingSession.listed`)."""
        columns = (Store.name, Store.ssh_host, Store.path_prefix, cls.parent_dirs, cls.file,
                   cls.deletion_policy, cls.verified_at, cls.verify_result)
        for row in query.select(*columns).tuples():
            yield cls._listing(*row)

    @staticmethod
    def _listing(store_name, ssh_host, prefix, parent_dirs, name, policy, verified_at,
                 verify_result):
        return {"store_name": store_name, "store_ssh_host": ssh_host,
                "parent_dirs": parent_dirs, "name": name,
                "deletion_policy": DELETION_POLICY_NAMES[policy],
                "full_path_on_store": prefix.rstrip("/") + "/"
                + "/".join(p for p in (parent_dirs, name) if p),
                "verified_at": to_unix(verified_at) if verified_at else None,
                "verify_result": verify_result}


VERIFY_RESULTS = ("ok", "corrupt", "missing")


class RemoteInstance(BaseModel):
    """A copy of a file held by another Librarian (`librarian`: the name of
    our `[connection:NAME]` to it), on its store `store_name` at
    `store_path`, as that Librarian verified it: `md5` and `size` it
    computed, at `verified_at` (its clock, as it reported); `confirmed_at`
    is when it last told us it still holds the copy."""

    file = pw.ForeignKeyField(File, column_name="name", backref="remote_instances",
                              on_delete="CASCADE")
    librarian = pw.CharField(max_length=64)
    store_name = pw.CharField(max_length=256)
    store_path = pw.CharField(max_length=1024)
    md5 = pw.CharField(max_length=32)
    size = pw.BigIntegerField()
    verified_at = pw.DateTimeField()
    confirmed_at = pw.DateTimeField(index=True)
    # The copy the file came from, recorded on its sender's word (copy_held):
    # shown, but never counted as a copy that makes a deletion safe here (the
    # sender counts ours; each counting the other, both could delete).
    origin = pw.BooleanField(default=False)

    class Meta:
        table_name = "remote_instance"
        indexes = ((("file", "librarian"), True),)

    def to_dict(self):
        """Times in Unix seconds."""
        return {"librarian": self.librarian, "store_name": self.store_name,
                "store_path": self.store_path, "md5": self.md5, "size": self.size,
                "verified_at": to_unix(self.verified_at),
                "confirmed_at": to_unix(self.confirmed_at), "origin": self.origin}


class FileEvent(BaseModel):
    """An append-only log entry about a file. `payload` is JSON text: an
    object for events recorded here; events adopted from an original
    Librarian may hold any JSON value (text that was not JSON is kept as a
    JSON string)."""

    file = pw.ForeignKeyField(File, column_name="name", backref="events", on_delete="RESTRICT")
    time = pw.DateTimeField()
    type = pw.CharField(max_length=64)
    payload = pw.TextField()

    class Meta:
        table_name = "file_event"

    def to_dict(self):
        """`time` in Unix seconds; `payload` decoded (any JSON value), or
        the raw text should it not be JSON."""
        try:
            payload = json.loads(self.payload)
        except ValueError:
            payload = self.payload
        return {"name": self.name, "time": to_unix(self.time), "type": self.type,
                "payload": payload}

    @classmethod
    def record(cls, file_name, type, payload):
        """Append an event now; `payload` (a dict) becomes its JSON object.
        Raises `LibrarianError(400)` on a type longer than 64 characters."""
        if len(type) > 64:
            raise LibrarianError(400, "event type is %d characters long; at most 64 allowed"
                                 % len(type))
        try:
            text = json.dumps(payload, sort_keys=True, allow_nan=False)
        except ValueError:  # 1e999 parses as infinity, which JSON cannot hold
            raise LibrarianError(400, "the event payload holds a number JSON cannot hold "
                                 "(infinite or not a number)") from None
        return cls.create(file=file_name, time=utcnow(), type=type, payload=text)


# Events this server writes itself: a caller may not forge them (a forged
# standing_order_succeeded:NAME would keep a file from ever going off-site).
SERVER_EVENT_TYPES = {"create_instance", "delete_instance", "heal_instance",
                      "instance_deletion_policy_changed", "launch_copy", "copy_finished",
                      "instance_corrupt", "instance_missing", "instance_repaired"}
SERVER_EVENT_PREFIXES = ("standing_order_succeeded:",)


def check_caller_event_type(type):
    """Refuse (403) an event type that only the server writes, also spelt
    with other case, spaces or invisible characters."""
    plain = "".join(c for c in unicodedata.normalize("NFKC", type)
                    if unicodedata.category(c)[0] not in "CZ").lower()
    if plain in SERVER_EVENT_TYPES or plain.startswith(SERVER_EVENT_PREFIXES):
        raise LibrarianError(403, "event type %s is written by the server itself; callers "
                             "may not add it" % type[:80])


def record_caller_event(file_name, type, payload):
    """Append a caller's event of `type` (at most 64 characters, not one
    the server reserves) with the JSON object `payload` (a dict) to the
    log of the file `file_name`: what the API and the file page add.
    Raises LibrarianError: 400 for an empty or long type or an unknown
    file, 403 for a reserved type."""
    if not type.strip():
        raise LibrarianError(400, "event type may not be empty")
    if len(type) > 64:
        raise LibrarianError(400, "event type %s... is longer than 64 characters" % type[:40])
    if "\0" in type:
        raise LibrarianError(400, "event type may not contain a NUL character")
    check_caller_event_type(type)
    with write_transaction():
        if File.get_or_none(File.name == file_name) is None:
            raise LibrarianError(400, "no file named %r" % file_name[:200])
        FileEvent.record(file_name, type, payload)


class Source(BaseModel):
    """A user or site that calls this Librarian. Only a hash of its
    authenticator is kept: for one this server issued (`ISSUED_RE`, 256
    random bits) `authenticator_hash` is `KEYED` and `lookup` its keyed
    hash (HMAC-SHA256 under the database's `ServerKey`, hex), found by one
    indexed query; for a secret a person chose, an Argon2 hash (salted,
    slow) and an empty `lookup`."""

    name = pw.CharField(max_length=64, unique=True)
    lookup = pw.CharField(max_length=64, index=True)
    authenticator_hash = pw.CharField(max_length=256)
    level = pw.CharField(max_length=16)
    created = pw.DateTimeField()

    class Meta:
        table_name = "source"

    def allows(self, level):
        """True when this source's level is at least `level`."""
        return LEVELS.index(self.level) >= LEVELS.index(level)


class StagingDir(BaseModel):
    """A staging directory issued by `initiate_upload` and not yet used by
    `complete_upload` (each is accepted once), or an operator's pre-staged
    folder named there."""

    store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
    path = pw.CharField(max_length=1024, unique=True)
    source = pw.CharField(max_length=64)
    created = pw.DateTimeField()

    class Meta:
        table_name = "staging_dir"


class StoreIntent(BaseModel):
    """What the process `owner` is doing to a store's bytes, recorded before
    the first byte moves: `kind` receive (into the staging folder
    `staging`), take (a pre-staged file from the store path `store_path`
    into `staging`), commit (the staged item `staging` to `store_path`) or
    delete (the instance at `store_path`, by way of the folder `staging`).
    See `stores.intents`."""

    kind = pw.CharField(max_length=16)
    store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
    staging = pw.CharField(max_length=1024, null=True)
    store_path = pw.CharField(max_length=1024, null=True)
    owner = pw.CharField(max_length=128, index=True)
    detail = pw.TextField(null=True)  # JSON: what settling needs (a take: the modes)
    heartbeat = pw.DateTimeField()
    created = pw.DateTimeField()

    class Meta:
        table_name = "store_intent"


class Upload(BaseModel):
    """A resumable upload (tus 1.0; see `uploads`): `length` bytes for
    `dest_store_path`, of which `offset` have been written to `staging`
    (a folder of the staging area of `store`). `writer` is the process
    (host:pid:start) appending or registering now, else null; `outcome`
    the JSON of the finished upload's reply or error."""

    id = pw.CharField(max_length=32, primary_key=True)
    source = pw.CharField(max_length=64)
    store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
    staging = pw.CharField(max_length=1024)
    dest_store_path = pw.CharField(max_length=1024)
    length = pw.BigIntegerField()
    offset = pw.BigIntegerField(default=0)
    md5 = pw.CharField(max_length=32, null=True)
    is_tar = pw.BooleanField(default=False)
    null_obsid = pw.BooleanField(default=False)
    deletion_policy = pw.CharField(max_length=16, null=True)
    writer = pw.CharField(max_length=128, null=True)
    outcome = pw.TextField(null=True)
    created = pw.DateTimeField()
    updated = pw.DateTimeField(index=True)

    class Meta:
        table_name = "upload"


class StagingDestination(BaseModel):
    """A folder that a staging (to local disk, see `staging`) made or first
    wrote into, and the source that asked: no other source's staging
    writes into it or below it."""

    path = pw.CharField(max_length=1024, unique=True)
    source = pw.CharField(max_length=64)
    created = pw.DateTimeField()

    class Meta:
        table_name = "staging_destination"


class WebSession(BaseModel):
    """A logged-in browser session; only a SHA-256 of its token is kept. A
    session cookie is honoured only while its row exists and has not
    expired."""

    token_hash = pw.CharField(max_length=64, primary_key=True)
    source = pw.CharField(max_length=64)
    created = pw.DateTimeField()
    expires = pw.DateTimeField()

    class Meta:
        table_name = "web_session"


def detach_source(name):
    """What a removed source leaves (within the caller's transaction): its
    web sessions end; its unfinished uploads and issued staging folders
    become nobody's, so that a source added later under the same name can
    neither resume nor complete them (the next upload expiry and staging
    settle remove them, sparing what a live process is still writing)."""
    WebSession.delete().where(WebSession.source == name).execute()
    Upload.update(source="", updated=datetime.datetime(1970, 1, 1)).where(
        Upload.source == name).execute()
    StagingDir.update(source="").where(StagingDir.source == name).execute()


ALL_MODELS = [Store, ObservingSession, Observation, File, FileInstance, FileEvent, Source, Upload,
              StagingDestination,
              StagingDir, StoreIntent, WebSession]


class ServerKey(BaseModel):
    """Random keys this database was given when it was made (migration
    010): `authenticator` keys the hashes of issued authenticators."""

    name = pw.CharField(max_length=64, unique=True)
    value = pw.CharField(max_length=128)

    class Meta:
        table_name = "server_key"


# ---------------------------------------------------------------------------
# Authenticators
# ---------------------------------------------------------------------------

class Reusable:
    """A select built once per database and run again with other values:
    Peewee spends about 100 us building the SQL of even a one-row lookup,
    which takes about 10, and some lookups are on the path of every
    request. `build(*values)` makes the query; `rows(*values)` runs its SQL
    with these values and yields what the query itself would (models, with
    their joins). Each value must reach the SQL as one parameter."""

    def __init__(self, build):
        self.build, self.built = build, {}

    def rows(self, *values):
        built = self.built.get(db.param)
        if built is None:
            marks = ["\0librarian-value-%d" % i for i in range(len(values))]
            query = self.build(*marks)
            sql, params = query.sql()
            if sorted(p for p in params if p in marks) != sorted(marks):
                raise ValueError("each value must be one parameter of the SQL")
            slots = [marks.index(p) if p in marks else None for p in params]
            built = self.built[db.param] = (query, sql, slots, params)
        query, sql, slots, params = built
        cursor = db.execute_sql(sql, [p if i is None else values[i]
                                      for i, p in zip(slots, params)])
        # (Peewee's own reading of a cursor for this query: models and joins.)
        return iter(query._get_cursor_wrapper(cursor))

    def first(self, *values):
        """The first row of `rows(*values)`, or None."""
        return next(self.rows(*values), None)


_SOURCE_BY = {name: Reusable(lambda value, name=name: Source.select().where(
    getattr(Source, name) == value)) for name in ("id", "name", "lookup")}


def source_where(field, value):
    """The Source whose `field` (Source.id, .name or .lookup) is `value`,
    or None, by SQL built once (`Reusable`): it is on the path of every
    authenticated request."""
    return _SOURCE_BY[field.name].first(value)


ISSUED_PREFIX = "lib_"
ISSUED_RE = re.compile(r"^lib_[A-Za-z0-9_-]{43}\Z")  # new_authenticator's form
KEYED = "hmac-sha256"  # authenticator_hash of an issued authenticator
ARGON2_AT_ONCE = threading.BoundedSemaphore(2)  # 64 MiB and a core each, at most two
ARGON2_WAIT_SECONDS = 5.0  # beyond this wait for a turn, 503: a flood of guesses is refused
# Requests searching the chosen secrets at once; one more is refused (503) at
# once, so that a flood of guesses holds at most this many worker threads and
# the rest keep serving callers with issued authenticators.
ARGON2_SEARCHES = threading.BoundedSemaphore(4)


def new_authenticator():
    """A new authenticator: `lib_` and 256 random bits in base64url (47
    characters). Its entropy makes a keyed fast hash the right storage."""
    return ISSUED_PREFIX + secrets.token_urlsafe(32)


def authenticator_key():
    """The database's key for issued authenticators' hashes (bytes)."""
    return bytes.fromhex(ServerKey.get(ServerKey.name == "authenticator").value)


def keyed_lookup(authenticator, key):
    """HMAC-SHA256 of an issued `authenticator` under `key`, hex: its
    `Source.lookup`."""
    return hmac.new(key, authenticator.encode("utf-8"), hashlib.sha256).hexdigest()


def check_authenticator_hash(value):
    """`value` if it is an Argon2 hash string (`$argon2id$v=19$m=...`), as
    `argon2.PasswordHasher().hash` writes; raises `ValueError` otherwise."""
    from argon2 import extract_parameters
    from argon2.exceptions import InvalidHashError

    try:
        extract_parameters(value)
    except (InvalidHashError, ValueError, TypeError):
        raise ValueError("expected an Argon2 hash such as $argon2id$v=19$m=65536,t=3,p=4$..."
                         ) from None
    return value


def create_source(name, authenticator, level, authenticator_hash=None):
    """Create a source (user) from its plaintext `authenticator` (one in
    `new_authenticator`'s form stored by its keyed hash, any other as an
    Argon2 hash) or, with `authenticator` None, from a ready Argon2
    `authenticator_hash`. Raises `LibrarianError(400)` on a bad level, a
    bad hash or not exactly one of the two, `(409)` on a taken name."""
    if level not in LEVELS:
        raise LibrarianError(400, "level must be one of %s, got %r" % (", ".join(LEVELS), level))
    lookup, hashed = _stored_forms(name, authenticator, authenticator_hash)
    try:
        with db.atomic():
            return Source.create(name=name, lookup=lookup, authenticator_hash=hashed,
                                 level=level, created=utcnow())
    except pw.IntegrityError:
        raise LibrarianError(409, "a source named %r already exists" % name) from None


def follow_configured_authenticator(source, authenticator, authenticator_hash=None):
    """Make `source` (a Source) take the authenticator its configuration
    section gives (plaintext `authenticator`, or `authenticator_hash`) if
    the stored one is another; returns whether it changed. (Costs one
    Argon2 check for a chosen secret: call it at start-up.)"""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    if authenticator_hash is not None:
        same = source.authenticator_hash == authenticator_hash
    elif source.authenticator_hash == KEYED:
        same = bool(ISSUED_RE.match(authenticator)) and hmac.compare_digest(
            source.lookup, keyed_lookup(authenticator, authenticator_key()))
    else:
        try:
            same = PasswordHasher().verify(source.authenticator_hash, authenticator)
        except (VerificationError, InvalidHashError):
            same = False
    if same:
        return False
    lookup, hashed = _stored_forms(source.name, authenticator, authenticator_hash)
    Source.update(lookup=lookup, authenticator_hash=hashed).where(Source.id == source.id) \
        .execute()
    return True


def _stored_forms(name, authenticator, authenticator_hash):
    """(lookup, authenticator_hash) to store for source `name`: see
    `Source`. 400 unless exactly one of the two is given, valid."""
    from argon2 import PasswordHasher

    if (authenticator is None) == (authenticator_hash is None):
        raise LibrarianError(400, "give exactly one of an authenticator and its hash")
    if authenticator is not None:
        if not authenticator:
            raise LibrarianError(400, "authenticator may not be empty")
        if ISSUED_RE.match(authenticator):
            return keyed_lookup(authenticator, authenticator_key()), KEYED
        return "", PasswordHasher().hash(authenticator)
    try:
        return "", check_authenticator_hash(authenticator_hash)
    except ValueError as e:
        raise LibrarianError(400, "authenticator hash of %r: %s" % (name, e)) from None


def find_source(authenticator, key=None, chosen=None):
    """The Source whose authenticator this is, or None. An issued one is
    found by its keyed hash (`key`: `authenticator_key()`, which callers
    may keep) in one indexed query; any other is checked with Argon2
    (constant time, deliberately slow) against `chosen` (default
    `chosen_secret_sources()`), which are few (people's and other sites'
    chosen secrets): callers keep what it found (`webauth.AuthCache`).
    Raises `LibrarianError(503)` when `ARGON2_SEARCHES` requests are already
    searching, or after waiting `ARGON2_WAIT_SECONDS` for one of the
    `ARGON2_AT_ONCE` turns."""
    from argon2 import PasswordHasher
    from argon2.exceptions import InvalidHashError, VerificationError

    if ISSUED_RE.match(authenticator):
        digest = keyed_lookup(authenticator, key or authenticator_key())
        source = source_where(Source.lookup, digest)
        if source is not None and hmac.compare_digest(source.lookup, digest):
            return source
        return None
    busy = LibrarianError(503, "too many unknown authenticators are being checked at once; "
                          "try again in a few seconds")
    if not ARGON2_SEARCHES.acquire(blocking=False):
        raise busy
    try:
        hasher = PasswordHasher()
        for source in chosen_secret_sources() if chosen is None else chosen:
            if not ARGON2_AT_ONCE.acquire(timeout=ARGON2_WAIT_SECONDS):
                raise busy
            try:
                hasher.verify(source.authenticator_hash, authenticator)
            except (VerificationError, InvalidHashError):
                continue
            finally:
                ARGON2_AT_ONCE.release()
            return source
        return None
    finally:
        ARGON2_SEARCHES.release()


def chosen_secret_sources():
    """The sources whose authenticator a person chose (an Argon2 hash), in
    id order: what `find_source` checks a secret of that kind against."""
    return list(Source.select().where(Source.authenticator_hash != KEYED).order_by(Source.id))


def _proc_stat(pid):
    """The fields of /proc/PID/stat after the command name, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _start_ticks(pid):
    """When process `pid` started (clock ticks since boot, from
    /proc/PID/stat), or None: with the pid, it names one process even when
    pids are reused (a server that is pid 1 in its container, restarted)."""
    fields = _proc_stat(pid)
    return fields[19] if fields and len(fields) > 19 else None


def this_process():
    """"host:pid:start" of this process, as what it owns records it."""
    return "%s:%d:%s" % (socket.gethostname(), os.getpid(), _start_ticks(os.getpid()))


def process_is_gone(owner):
    """Whether the process named by `owner` ("host:pid:start[:...]", see
    `this_process`) ran on this host and has ended (its pid is free, or
    another process started under it since). A process on another host is
    never taken as gone: only it can settle what it left."""
    host, pid, start = ((owner or "").split(":") + ["", ""])[:3]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    fields = _proc_stat(int(pid))
    if fields and fields[0] in ("Z", "X"):  # killed, not yet reaped by its parent
        return True
    started = _start_ticks(int(pid))
    return bool(start) and start != "None" and started is not None and started != start


def write_transaction():
    """A transaction for a request's writes. On SQLite it takes the write
    lock at BEGIN (IMMEDIATE) so that two writers wait for each other
    instead of failing when one upgrades a read lock."""
    if isinstance(db.obj, pw.SqliteDatabase):
        return db.atomic("IMMEDIATE")
    return db.atomic()


# ---------------------------------------------------------------------------
# The planner's statistics
# ---------------------------------------------------------------------------

STATISTICS_SECONDS = 10.0  # at most one look per process this often
_statistics_lock = threading.Lock()
_statistics_looked = [0.0]
_rows_written = {}  # table -> rows this process wrote since it last analysed the table


def note_rows_written(table, n):
    """Count `n` rows written to `table` for `refresh_statistics` (the
    server's own counts reach `pg_stat_user_tables` only seconds later)."""
    with _statistics_lock:
        _rows_written[table] = _rows_written.get(table, 0) + n


def refresh_statistics():
    """Bring the planner's statistics up to date as autovacuum would, for
    a database where it is off or slow to come: on PostgreSQL, ANALYZE each
    of this schema's tables whose rows changed since its last analysis by
    more than 50 + 10% of its rows (autovacuum's default thresholds; the
    changes are `pg_stat_user_tables`' count, or this process's own
    `note_rows_written` if larger); on SQLite, `PRAGMA optimize` (which
    analyses where its planner would gain). Called after bulk ingest and
    when a server settles; at most one look per process every
    STATISTICS_SECONDS, none while another runs. Returns the tables
    analysed (PostgreSQL)."""
    import time

    now = time.monotonic()
    if now - _statistics_looked[0] < STATISTICS_SECONDS or \
            not _statistics_lock.acquire(blocking=False):
        return []
    try:
        _statistics_looked[0] = now
        if not is_postgres():
            db.execute_sql("PRAGMA optimize")
            return []
        stale = []
        for name, changed, rows in db.execute_sql(
                "SELECT s.relname, s.n_mod_since_analyze, c.reltuples FROM pg_stat_user_tables s "
                "JOIN pg_class c ON c.oid = s.relid WHERE s.schemaname = current_schema()"):
            if max(changed, _rows_written.get(name, 0)) > 50 + 0.1 * max(rows, 0):
                stale.append(name)
        for name in stale:
            db.execute_sql('ANALYZE "%s"' % name.replace('"', '""'))
            _rows_written.pop(name, None)
        if stale:
            log.info("analysed %s for the planner", ", ".join(stale))
        return stale
    finally:
        _statistics_lock.release()
