"""The Librarian server: a Bottle app and its command line.

    python librarian.py migrate --config PATH     apply database migrations
    python librarian.py serve --config PATH       serve HTTP with waitress, and run workers
    python librarian.py worker --config PATH      run background workers only
    python librarian.py add-store NAME PATH       register a store
    python librarian.py add-user NAME --level L   create a source (prints its authenticator)
    python librarian.py reconcile STORE           compare a store with the catalogue (JSON)
    python librarian.py init-config PATH          write a fresh config for a local archive
    python librarian.py adopt-v1 --from URL       copy an original Librarian's catalogue in
    python librarian.py adopt-v1-config FILE      its server-config.json as our INI (stdout)

`--config` falls back to `$LIBRARIAN_CONFIG_PATH`, then `./librarian.ini`.

The file reads top to bottom: setup, hooks and errors, authentication and
argument checking, the JSON API (`/api/<operation>`, API.md section 1),
streamed upload and download (section 2), then the command line.
"""

import argparse
import contextlib
import datetime
import errno
import functools
import json
import logging
import os
import posixpath
import re
import secrets
import signal
import socket
import sys
import threading
import time
import traceback
import urllib.parse

import bottle
from bottle import Bottle, HTTPError, HTTPResponse, request, response
from webauth import AuthCache, authenticate, bearer_token, caller, require_level

import bodybudget
import copies
import deletion
import ingest
import integrity
import metrics
import models
import offload
import remotes
import openapi as openapi_doc
import reconcile
import search
import sessions
import settings as settings_mod
import staging
import standing
import tasks
import uploads
import uvmeta
import errors
from errors import http_status
from models import (File, FileInstance, LibrarianError, Source, StagingDir, Store,
                    db)
from context import Context
from stores import BodyReader, StoreUnreachable, intents, split_store_path

__version__ = "0.1.0"

HERE = os.path.dirname(os.path.abspath(__file__))
MIGRATIONS = os.path.join(HERE, "migrations")
RECV_BYTES = 1 << 18
MAX_MESSAGE_CHARS = 600  # an error message is cut here, so bad input is never echoed whole
STAGING_SUBDIR_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
UPLOAD_QUERY_ARGS = {"md5", "deletion_policy", "null_obsid", "authenticator"}

log = logging.getLogger("librarian")



# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------

def configure_logging(level="INFO"):
    """Log to stderr with UTC ISO-8601 times."""
    handler = logging.StreamHandler()
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                  "%Y-%m-%dT%H:%M:%SZ")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def setup(config):
    """Bind the database named by `config` (a `settings.Settings`), point
    the templates at `views/` and return the Bottle app. Does not touch the
    schema; see `startup` for what a serving process does next."""
    models.bind_database(config.database["url"])
    bottle.TEMPLATE_PATH[:] = [os.path.join(HERE, "views")]
    # A JSON request is parsed whole; it is bounded as every body is.
    bottle.BaseRequest.MEMFILE_MAX = config.server["max_body_bytes"]
    uvmeta.set_limits(config.server["reader_memory_bytes"], config.server["reader_seconds"])
    app = Bottle()
    app.config["librarian.settings"] = config
    app.config["librarian.context"] = Context(config)
    app.config["librarian.auth_cache"] = AuthCache()
    install_routes(app)
    app.add_hook("before_request", _open_db)
    app.add_hook("after_request", _close_db)
    app.default_error_handler = render_error
    app.wsgi = strict_utf8(app.wsgi)  # Bottle.__call__ goes through it
    return app


def strict_utf8(wsgi):
    """WSGI middleware refusing (400) a request whose path, query string or
    a header is not valid UTF-8 once percent-decoded: Bottle would drop the bad
    bytes silently, so that `PUT /api/upload/%ED%A0%80.dat` named a file
    `.dat` and a stray `%ff` in a download named another file."""
    def checked(environ, start_response):
        try:
            environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
            urllib.parse.unquote_to_bytes(environ.get("QUERY_STRING", "")).decode("utf-8")
            for key, value in environ.items():  # header values too: Bottle decodes them
                if key.startswith("HTTP_") and isinstance(value, str):
                    value.encode("latin-1").decode("utf-8")
        except UnicodeError:
            body = json.dumps({"success": False, "message": "the URL or a header is not valid "
                               "UTF-8 (once percent-decoded); names are UTF-8 text"}
                              ).encode("utf-8")
            start_response("400 Bad Request", [("Content-Type", "application/json"),
                                               ("Content-Length", str(len(body)))])
            return [body]
        return wsgi(environ, start_response)
    return checked


@contextlib.contextmanager
def database_of(config):
    """A connection to the configured database for the block; one that
    cannot be reached ends the command (status 2) saying so, without the
    URL's password."""
    try:
        db.connect(reuse_if_open=True)
    except models.pw.OperationalError as e:
        print("librarian.py: cannot reach the database %s: %s"
              % (config.database_shown, str(e).strip().splitlines()[0]), file=sys.stderr)
        raise SystemExit(2) from None
    try:
        yield
    finally:
        db.close()


def migration_router():
    from peewee_migrate import Router

    return Router(db, migrate_dir=MIGRATIONS, logger=log)


def pending_migrations():
    """Names of the migrations not yet applied to the bound database."""
    return migration_router().diff


def sync_config_records(config):
    """Add the stores and sources named in the configuration to the database
    if they are missing; a configured source's level and authenticator
    follow its section (existing stores are left as they are: their place
    is fixed)."""
    with models.write_transaction():
        for name, spec in config.stores.items():
            prefix = os.path.abspath(spec["path_prefix"])
            Store.insert(name=name, path_prefix=prefix, ssh_host=spec["ssh_host"],
                         available=spec["available"]).on_conflict_ignore().execute()
            row = Store.by_name(name)
            if (row.path_prefix, row.ssh_host) != (prefix, spec["ssh_host"]):
                log.warning("[store:%s] says %s:%s but the database records %s:%s; the "
                            "database is used (a store's place is fixed once it holds files)",
                            name, spec["ssh_host"], prefix, row.ssh_host, row.path_prefix)
        for name, spec in config.sources.items():
            row = Source.get_or_none(Source.name == name)
            if row is None:
                models.create_source(name, spec["authenticator"], spec["level"],
                                     authenticator_hash=spec["authenticator_hash"])
                continue
            if row.level != spec["level"]:
                Source.update(level=spec["level"]).where(Source.id == row.id).execute()
                log.warning("source %s: level %s, as [source:%s] now says (was %s)", name,
                            spec["level"], name, row.level)
            if models.follow_configured_authenticator(row, spec["authenticator"],
                                                      spec["authenticator_hash"]):
                log.warning("source %s: the authenticator [source:%s] now gives replaces the "
                            "one recorded", name, name)


def settle_all(context):
    """Finish or undo, on every reachable store, what dead processes left
    (their intents, see `stores.intents`) and remove staging leftovers that
    no live process and no outstanding issued folder holds. Safe to run at
    any time, beside live processes on any host: it runs at start-up and
    periodically. Also queues the periodic checks (`schedule_checks`)."""
    # Staging directories issued a day ago and never completed are abandoned
    # (a copy from another Librarian announces its records with
    # initiate_upload, then sends the bytes with the streamed upload).
    with models.write_transaction():
        StagingDir.delete().where(
            StagingDir.created < models.utcnow() - datetime.timedelta(days=1)).execute()
    uploads.expire(context, context.settings.server["upload_expiry_hours"])
    for row in Store.select():
        store = context.open_store(row)
        if not store.is_reachable():
            log.warning("%s is not reachable: what dead processes left there is settled later",
                        store.describe())
            continue
        try:
            removed = store.settle(functools.partial(is_registered, row))
        except (OSError, LibrarianError) as e:
            log.warning("settling %s: %s", store.describe(), e)
            continue
        if removed:
            log.info("removed %d staging leftovers on store %s", removed, row.name)
    models.refresh_statistics()
    schedule_checks(context)


def is_registered(store_row, store_path):
    """Whether the path is a registered instance or inside one (a settle
    never acts on registered data)."""
    parent_dirs, name = split_store_path(store_path)
    exact = FileInstance.select().where(
        (FileInstance.store == store_row) & (FileInstance.parent_dirs == parent_dirs)
        & (FileInstance.file == name)).exists()
    return exact or ingest.instance_containing(store_row, parent_dirs) is not None


def startup(app):
    """What a serving process does before its first request: refuse an
    unmigrated database (`SystemExit` with a message), add configured
    stores and sources, settle what dead processes left (`settle_all`)."""
    config, context = app.config["librarian.settings"], app.config["librarian.context"]
    with database_of(config):
        pending = pending_migrations()
        if pending:
            raise SystemExit("the database %s is not migrated (pending: %s); run: python "
                             "librarian.py migrate --config %s"
                             % (config.database_shown, ", ".join(pending),
                                config.path or "PATH"))
        sync_config_records(config)
        for row in Store.select():
            try:
                context.open_store(row).ensure_prefix()
            except (OSError, StoreUnreachable) as e:
                log.warning("cannot create the folder of store %s: %s", row.name, e)
        settle_all(context)
        standing.schedule_periodic(context)
        tasks.reclaim_dead_local_workers()


def schedule_checks(context):
    """Queue the periodic checks that are not queued or running: each
    store's scrub and reconciliation, the confirmation of other
    Librarians' copies, the rolling deletions (at start and with each
    heartbeat, so that a chain broken by a failure starts again); and
    alert about stores filling up."""
    integrity.schedule(context)
    remotes.schedule(context)
    deletion.schedule_rolling(context)
    reconcile.schedule(context)
    metrics.check_store_fill(context)


# ---------------------------------------------------------------------------
# Hooks and errors
# ---------------------------------------------------------------------------

def _open_db():
    request.environ["librarian.start"] = time.monotonic()
    db.connect(reuse_if_open=True)


def _close_db():
    if not db.is_closed():
        db.close()
    started = request.environ.get("librarian.start")
    if started is not None:
        path = request.path if len(request.path) <= 300 else request.path[:300] + "..."
        path = models.CONTROL_RE.sub(lambda m: "\\x%02x" % ord(m.group()), path)  # one line
        log.info("%s %s %s %.3fs", request.method, path, response.status_code,
                 time.monotonic() - started)


def is_api_request():
    return request.path.startswith("/api/")


def render_error(error):
    """Render any HTTP error: JSON `{success: false, message}` under `/api/`,
    an HTML page elsewhere. A 500 never carries exception text."""
    status = error.status_code
    if status == 500 and getattr(error, "traceback", None):  # (bottle caught it: not logged yet)
        log.error("unhandled error in %s %s\n%s", request.method, request.path, error.traceback)
    message = error.body if status != 500 else "internal error; see the server log"
    if isinstance(message, bytes):
        message = message.decode("utf-8", "replace")
    if status == 404 and not message:
        message = "not found: %s" % errors.short(request.path)
    if len(message) > MAX_MESSAGE_CHARS:  # whatever bad input a message quotes
        message = message[:MAX_MESSAGE_CHARS] + "... (%d characters in all)" % len(message)
    if is_api_request() or request.path.startswith("/stream/"):
        response.content_type = "application/json"
        return json.dumps({"success": False, "message": message or error.status_line})
    response.content_type = "text/html; charset=utf-8"
    import pages

    try:  # inside the site's frame, with its navigation for whoever is logged in
        return pages.render("error", error.status_line, status=status, message=message)
    except Exception:  # (the database itself may be what failed)
        return bottle.template("error", title=error.status_line, message=message)


def fail(status, message):
    """Stop the request with `status` and `message` (JSON under /api/)."""
    raise HTTPError(status, message)


# File-system refusals that are the caller's or the operator's to fix, not bugs.
OS_ERROR_REPLIES = {
    errno.ENAMETOOLONG: (400, "a name or path is too long for the store's file system (at "
                              "most 255 bytes per name, 4096 per path)"),
    errno.ENOTDIR: (409, "a folder of the store path is a file on the store"),
    errno.ENOSPC: (507, "the store is full"),
    errno.EDQUOT: (507, "the store's disk quota is exhausted"),
}


def handle_errors(func):
    """Turn `LibrarianError` into its status and any other exception into a
    logged 500, so that handlers can simply raise."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except HTTPResponse:
            raise
        except LibrarianError as e:
            raise HTTPError(http_status(e), e.message) from None
        except OSError as e:
            if e.errno in OS_ERROR_REPLIES:
                status, message = OS_ERROR_REPLIES[e.errno]
                log.warning("%s %s: %s", request.method, request.path, e)
                raise HTTPError(status, message) from None
            log.error("unhandled error in %s %s\n%s", request.method, request.path,
                      traceback.format_exc())
            raise HTTPError(500, "internal error") from None
        except Exception:
            log.error("unhandled error in %s %s\n%s", request.method, request.path,
                      traceback.format_exc())
            raise HTTPError(500, "internal error") from None
    return wrapper


def json_reply(status=200, **fields):
    response.status = status
    response.content_type = "application/json"
    return json.dumps(dict(success=True, **fields))


# ---------------------------------------------------------------------------
# Authentication and argument checking
# ---------------------------------------------------------------------------

TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean",
              dict: "an object", list: "a list"}


INT64 = (-2**63, 2**63 - 1)


def check_type(name, value, kind):
    """Strict JSON typing of API.md: integers reject floats, strings and
    booleans (and must fit in 64 bits); floats accept integers; booleans
    are JSON booleans; strings may not hold NUL or unpaired surrogates."""
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return float(value) if ok else fail(400, "argument %r must be %s, got %s"
                                            % (name, TYPE_NAMES[kind], json.dumps(value)))
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        fail(400, "argument %r must be %s, got %s" % (name, TYPE_NAMES[kind],
                                                      json.dumps(value)[:100]))
    if kind is int and not INT64[0] <= value <= INT64[1]:
        fail(400, "argument %r is out of the 64-bit integer range" % name)
    if kind is str:
        check_text(name, value)
    return value


def check_text(name, value):
    """400 unless `value` is text a database can hold: no NUL, valid UTF-8."""
    if "\0" in value:
        fail(400, "argument %r may not contain a NUL character" % name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        fail(400, "argument %r is not valid Unicode text" % name)


def validate(payload, spec, lenient=False):
    """Check `payload` against `spec` (`{name: type}`, a name ending in `?`
    is optional) and return `{name: value}` with absent optionals as None.
    Missing required arguments are 400s naming them; so are unknown ones,
    unless `lenient` (the original's operations ignored them, and deployed
    clients may send some): then they are logged and ignored."""
    args = {}
    known = {"authenticator"}
    for key, kind in spec.items():
        name = key.rstrip("?")
        known.add(name)
        if name not in payload or payload[name] is None:
            if not key.endswith("?"):
                fail(400, "missing argument %r" % name)
            args[name] = None
            continue
        args[name] = check_type(name, payload[name], kind)
    unknown = sorted(set(payload) - known)
    if unknown and lenient:
        log.info("%s: ignoring unknown argument%s %s", request.path, "s" if len(unknown) > 1
                 else "", ", ".join(repr(u[:64]) for u in unknown[:10]))
    elif unknown:
        fail(400, "unknown argument%s %s" % ("s" if len(unknown) > 1 else "",
                                             ", ".join(repr(u) for u in unknown)))
    return args


def _refuse_constant(name):
    raise ValueError("%s is not a JSON number" % name)


def parse_json(raw, what):
    """Strict JSON (no NaN or Infinity; nesting within reason); 400 naming
    `what` otherwise."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError:
        fail(400, "%s is nested too deeply" % what)
    except ValueError as e:
        fail(400, "%s is not valid JSON: %s" % (what, e))


def read_api_payload():
    """The request object of the existing protocol: a JSON body, or the
    form/query field `request` holding JSON. 400 when absent or not an
    object; 413 when larger than `bottle.BaseRequest.MEMFILE_MAX`."""
    if request.content_length > bottle.BaseRequest.MEMFILE_MAX:
        fail(413, "request payload of %d bytes is larger than the %d allowed"
             % (request.content_length, bottle.BaseRequest.MEMFILE_MAX))
    if request.content_type.split(";")[0].strip() == "application/json":
        try:
            raw = request.body.read().decode("utf-8")
        except UnicodeDecodeError as e:
            fail(400, "request payload is not UTF-8 text (byte %d)" % e.start)
    else:
        raw = request.forms.getunicode("request") or request.query.getunicode("request")
    if not raw:
        fail(400, "no request payload: send a form field 'request' holding a JSON object")
    payload = parse_json(raw, "request payload")
    if not isinstance(payload, dict):
        fail(400, "request payload must be a JSON object")
    return payload


# ---------------------------------------------------------------------------
# The JSON API
# ---------------------------------------------------------------------------

OPERATIONS = {}


# The operations of the original Librarian (API.md section 1): they ignore
# unknown arguments as it did, where our additions refuse them.
V1_OPERATIONS = {"ping", "probe_stores", "create_file_event", "locate_file_instance",
                 "initiate_upload", "complete_upload", "register_instances", "search",
                 "assign_observing_sessions", "describe_session_without_event",
                 "set_one_file_deletion_policy", "delete_file_instances",
                 "delete_file_instances_matching_query", "launch_file_copy",
                 "initiate_offload"}


def operation(op_name, level, **spec):
    """Register an `/api/NAME` operation for callers of at least `level`;
    keyword arguments are the argument spec of `validate`. The handler is
    called as `handler(source, args)` and returns a dict of reply fields."""
    def register(func):
        OPERATIONS[op_name] = (func, level, {k.replace("_Q", "?"): v for k, v in spec.items()})
        return func
    return register


@handle_errors
def api_dispatch(name):
    if name not in OPERATIONS or (name not in V1_OPERATIONS
                                  and not cfg().server["protocol_additions"]):
        fail(404, "unknown operation %r" % name[:64])
    func, level, spec = OPERATIONS[name]
    payload = read_api_payload()
    token = bearer_token()
    source = authenticate(token or payload.get("authenticator"), level,
                          challenge=token is not None or name not in V1_OPERATIONS)
    args = validate(payload, spec, lenient=name in V1_OPERATIONS)
    for arg, value in args.items():  # what the OpenAPI document promises
        if value is not None:
            openapi_doc.check_rules(arg, value, fail)
    return json_reply(**(func(source, args) or {}))


def ctx():
    """The context (settings, stores) of the app serving this request."""
    return request.app.config["librarian.context"]


def cfg():
    return ctx().settings


def local_instance(file_name):
    """The FileInstance of `file_name` on an available store whose bytes are
    present here and in service; 400 when the file is unknown or has none
    (naming the instances out of service, if that is why)."""
    inst, _, _ = ctx().stores.present_instance(file_name, available_only=True)
    if inst is not None:
        return inst
    if File.get_or_none(File.name == file_name) is None:
        fail(400, "no file named %r" % file_name)
    bad = (FileInstance.select(FileInstance, Store).join(Store)
           .where((FileInstance.file == file_name) & ~FileInstance.in_service()))
    if bad.exists():
        fail(400, "file %r has no good instance here: %s (a repair is under way if a good "
             "copy is known anywhere)" % (file_name, "; ".join(
                 "the one on store %s is %s" % (i.store.name, i.verify_result) for i in bad)))
    fail(400, "file %r has no instance on an available store here" % file_name)


def choose_store(upload_size):
    """The available, reachable store with the most free space (less what
    unfinished uploads to it will still write) that can hold `upload_size`
    bytes (a `stores.StoreAccess`); an unreachable store
    is passed over. Free space is compared in whole GiB, the first store by
    name winning a tie: stores on one file system then always give the same
    answer, however the disk's use moves while they are measured. 400 when
    no store is available or none has room, 503 naming the stores and why
    when the only candidates are unreachable."""
    best, best_free, problems = None, -1, []
    for row in Store.select().where(Store.available == True).order_by(Store.name):  # noqa: E712
        store = ctx().open_store(row)
        problem = store.problem()
        if problem is not None:
            problems.append(problem)
            continue
        free = store.free_space()
        if free is not None:
            free -= uploads.reserved(row)  # what unfinished uploads will still write
        if free is not None and free >= upload_size and free >> 30 > best_free:
            best, best_free = store, free >> 30
    if best is None:
        if not Store.select().where(Store.available == True).exists():  # noqa: E712
            fail(400, "no store is available for uploads (an admin can make one available)")
        if problems:
            fail(503, "no reachable store has room for %d bytes; %s"
                 % (upload_size, "; ".join(problems)))
        fail(400, "no available store has room for %d bytes" % upload_size)
    return best


@operation("ping", "read-only")
def op_ping(source, args):
    """Check that the server answers and the authenticator is valid."""
    return {"message": "hello"}


@operation("probe_stores", "read-only")
def op_probe_stores(source, args):
    """List the available stores: name, path_prefix, ssh_host."""
    stores = Store.select().where(Store.available == True).order_by(Store.name)  # noqa: E712
    return {"stores": [{"name": s.name, "path_prefix": s.path_prefix, "ssh_host": s.ssh_host}
                       for s in stores]}


@operation("create_file_event", "read-append", file_name=str, type=str, payload=dict)
def op_create_file_event(source, args):
    """Append an event of `type` with a JSON object `payload` to a file's log."""
    models.record_caller_event(args["file_name"], args["type"], args["payload"])
    return {}


@operation("locate_file_instance", "read-only", file_name=str)
def op_locate_file_instance(source, args):
    """Where an instance of a file lives: store, host, path."""
    inst = local_instance(args["file_name"])
    return {"full_path_on_store": inst.full_path_on_store, "store_name": inst.store.name,
            "store_path": inst.store_path, "store_ssh_host": inst.store.ssh_host}


@operation("initiate_upload", "read-append", upload_size=int, known_staging_store_Q=str,
           known_staging_subdir_Q=str, files_Q=dict, observations_Q=dict, sessions_Q=dict,
           records_only_Q=bool)
def op_initiate_upload(source, args):
    """Pick a store and make a staging folder (or take the operator's
    pre-staged folder named by `known_staging_*`); ingest records sent
    along. `staging_dir` in the reply is relative to `path_prefix`, and
    `available` is the store's free bytes, as the deployed client expects."""
    if args["upload_size"] < 0:
        fail(400, "upload_size may not be negative")
    if any(args[k] for k in ("files", "observations", "sessions")):
        # Records are another site's word about files: the level Librarians use.
        require_level(source, "read-write")
    if args["records_only"]:  # our addition: a copy's records, its bytes sent as an upload
        with models.write_transaction():
            ingest.ingest_record_sets(args["files"], args["observations"], args["sessions"],
                                      source.name)
        models.refresh_statistics()  # a night's ingest must not leave the planner behind
        return {}
    known = args["known_staging_store"] is not None
    if known != (args["known_staging_subdir"] is not None):
        fail(400, "give both known_staging_store and known_staging_subdir, or neither")
    if known:
        store = ctx().open_store(Store.by_name(args["known_staging_store"]))
        staging = store.known_staging_dir(args["known_staging_subdir"])
        ingest.check_not_inside_instance(store, store.relative(staging))
    else:
        store = choose_store(args["upload_size"])
        staging = store.new_staging_dir()
    try:
        with models.write_transaction():
            ingest.ingest_record_sets(args["files"], args["observations"], args["sessions"],
                                      source.name)
            StagingDir.insert(store=store.row, path=staging, source=source.name,
                              created=models.utcnow()).on_conflict(
                conflict_target=[StagingDir.path],
                update={StagingDir.created: models.utcnow()}).execute()
    except BaseException:
        if not known:
            store.release(staging)
        raise
    store.keep(staging)  # its issued-folder record holds it now
    if any(args[k] for k in ("files", "observations", "sessions")):
        models.refresh_statistics()
    # ssh_port (our addition): the port this server reaches the store host on,
    # which the client's --via-ssh uses unless told otherwise.
    return dict(store.row.to_dict(), available=store.free_space() or 0,
                staging_dir=args["known_staging_subdir"] if known else store.relative(staging),
                ssh_port=ctx().stores.ssh_target(store.row).port)


@operation("complete_upload", "read-append", store_name=str, staging_dir=str,
           dest_store_path=str, meta_mode=str, deletion_policy_Q=str, staging_was_known_Q=bool,
           null_obsid_Q=bool)
def op_complete_upload(source, args):
    """Verify, register and move into place what was copied into the
    staging folder `staging_dir` (relative to the store's prefix, as
    `initiate_upload` named it). A server-issued folder is used once and
    then removed (unless `staging_was_known`); an operator's pre-staged
    folder is never removed or changed: only the named file is taken out
    of it, and put back if it is not registered."""
    if args["meta_mode"] not in ("direct", "infer"):
        fail(400, "meta_mode must be 'direct' or 'infer', got %r" % args["meta_mode"])
    store = ctx().open_store(Store.by_name(args["store_name"]))
    _, name = split_store_path(args["dest_store_path"])
    folder = store.issued_staging_dir(args["staging_dir"])
    issued = store.is_staging_dir(folder)
    if not issued:
        folder = store.known_staging_dir(args["staging_dir"], what="staging_dir")
    record = StagingDir.get_or_none((StagingDir.store == store.row)
                                    & (StagingDir.path == folder))
    if record is None:
        fail(400, "staging_dir %r was not issued by this server for store %r%s"
             % (args["staging_dir"], store.name, ", or was already used" if issued else
                " (a known staging folder is named in initiate_upload first)"))
    if issued and record.source != source.name and not source.allows("admin"):
        fail(403, "staging_dir %r was issued to another source; only it (or an admin) may "
             "complete it" % args["staging_dir"])
    # As in the original, the bytes become a further instance of a file
    # already known here, unless that very instance exists.
    register = functools.partial(
        ingest.register_staged, store, store_path=args["dest_store_path"], source=source.name,
        deletion_policy=args["deletion_policy"], meta_mode=args["meta_mode"],
        null_obsid=bool(args["null_obsid"]), another_copy=True,
        inference_mode=cfg().librarian["obsid_inference_mode"],
        readonly=cfg().librarian["permissions_mode"] == "readonly")
    if issued:
        result = complete_issued(store, folder, name, register)
        if not args["staging_was_known"]:
            store.release(folder)
    else:
        result = complete_known(store, folder, name, register)
    standing.sweep_soon(ctx())
    return upload_outcome(result, store)


def complete_known(store, folder, name, register):
    """Register `folder/name` from an operator's pre-staged folder (see
    `complete_taken`). A file or folder that is registered, or inside
    registered data, is never taken (409)."""
    origin = posixpath.join(store.relative(folder), name)
    ingest.check_not_inside_instance(store, origin)
    ingest.check_no_instance_inside(store, origin)
    return complete_taken(store, folder, name, register)


def complete_issued(store, folder, name, register):
    """Register `folder/name` in a staging folder issued by
    `initiate_upload`, which is consumed in the same transaction (it is
    accepted once); see `complete_taken`."""
    store.check_staging_dir(folder)

    def claim():
        used = StagingDir.delete().where((StagingDir.store == store.row)
                                         & (StagingDir.path == folder)).execute()
        if used != 1:
            fail(400, "staging_dir %r was already used" % store.relative(folder))

    try:
        return complete_taken(store, folder, name, functools.partial(register, claim=claim))
    except LibrarianError as e:
        if e.status == 400 and not StagingDir.select().where(StagingDir.path == folder).exists():
            fail(400, "staging_dir %r was already used" % store.relative(folder))
        raise


def complete_taken(store, folder, name, register):
    """Take `folder/name` (written by a client or an operator) into a fresh
    staging folder of this process under a take intent that records where
    it came from, so that nothing they still do to their folder reaches the
    bytes being checked; register it there, and put it back unless it was
    registered (a settle does, if this process dies)."""
    origin = posixpath.join(store.relative(folder), name)
    private = store.new_staging_dir("take", origin=origin)
    modes = None
    try:
        staged, modes = store.take(folder, name, private)
        store.check_no_writers(staged)
        return register(staged)
    finally:
        if store.give_back(private, origin, modes):
            store.release(private)
        else:
            store.keep(private)  # kept for an operator; tried again at each settle


@operation("register_instances", "read-append", store_name=str, file_info=dict,
           null_obsid_Q=bool)
def op_register_instances(source, args):
    """Register files that appeared on a store by other means."""
    store = ctx().open_store(Store.by_name(args["store_name"]))
    prepared = []
    for full_path, info in args["file_info"].items():
        if not isinstance(info, dict):
            fail(400, "file_info[%r] must be an object" % full_path)
        # `type` is accepted for compatibility; the type is always derived from the name.
        item = validate(info, {"size": int, "md5": str, "type?": str, "obsid?": int},
                        lenient=True)
        prepared.append(ingest.prepare_in_place(
            store, full_path, size=item["size"], md5=item["md5"], obsid=item["obsid"],
            null_obsid=bool(args["null_obsid"]),
            inference_mode=cfg().librarian["obsid_inference_mode"]))
    with models.write_transaction():
        for item in prepared:
            ingest.register_prepared(store, item, source=source.name)
    standing.sweep_soon(ctx())
    if cfg().librarian["permissions_mode"] == "readonly":
        for item in prepared:
            store.make_readonly(item["abs_path"])
    return {}


# ---------------------------------------------------------------------------
# Catalogue: search, sessions, deletion
# ---------------------------------------------------------------------------

# output_format -> (the query of a search's text, its rows as listed dicts)
SEARCH_OUTPUTS = {
    "file-listing-json": (search.file_query, File.listed),
    "instance-listing-json": (search.instance_query, FileInstance.listed),
    "remote-instance-listing-json": (search.remote_instance_query,
                                     lambda q: (dict(r.to_dict(), name=r.name) for r in q)),
    "obs-listing-json": (search.observation_query, models.Observation.listed),
    "session-listing-json": (search.session_query, models.ObservingSession.listed),
}
openapi_doc.RULES["output_format"] = {"enum": sorted(SEARCH_OUTPUTS) + ["stage-the-files-json"]}


def page(query, limit, offset):
    """Apply optional `limit`/`offset` (both >= 0) to a query."""
    if limit is not None:
        if limit < 0:
            fail(400, "limit may not be negative")
        query = query.limit(limit)
    if offset is not None:
        if offset < 0:
            fail(400, "offset may not be negative")
        query = query.offset(offset)
    return query


@operation("search", "read-only", search=str, output_format=str, limit_Q=int, offset_Q=int,
           stage_user_Q=str, stage_dest_Q=str, type_Q=str)
def op_search(source, args):
    """Run a search (SEARCH.md); results in the chosen JSON output format,
    ordered by name, obsid or session id. (`type` is sent by the existing
    client's staging call and means nothing here.)"""
    fmt = args["output_format"]
    if fmt == "stage-the-files-json":
        require_level(source, "read-write")
        return staging.launch(ctx(), args["search"], args["stage_user"] or source.name,
                              args["stage_dest"] or "", source)
    make_query, listed = SEARCH_OUTPUTS[fmt]
    query = page(make_query(args["search"]), args["limit"], args["offset"])
    with search_limits(source):
        return {"results": list(listed(query))}


def search_limits(source):
    """`search.limited_by` this server's settings, for `source`."""
    return search.limited_by(cfg(), source.name)


@operation("assign_observing_sessions", "read-append", minimum_start_jd_Q=float,
           maximum_start_jd_Q=float)
def op_assign_observing_sessions(source, args):
    """Group observations without a session into sessions."""
    new, unclosed = sessions.assign_observing_sessions(args["minimum_start_jd"],
                                                       args["maximum_start_jd"])
    return {"new_sessions": new, "unclosed_obsids": unclosed}


@operation("describe_session_without_event", "read-only", source=str, event_type=str)
def op_describe_session_without_event(source, args):
    """Describe the files of a session that lack an event (pipeline query)."""
    found = sessions.describe_session_without_event(args["source"], args["event_type"])
    if found is None:
        return {"any_matching": False}
    return dict(found, any_matching=True)


@operation("set_one_file_deletion_policy", "read-write", file_name=str, deletion_policy=str,
           restrict_to_store_Q=str)
def op_set_one_file_deletion_policy(source, args):
    """Change the deletion policy of one instance of a file."""
    deletion.set_one_policy(args["file_name"], args["deletion_policy"],
                            args["restrict_to_store"])
    return {}


@operation("delete_file_instances", "read-write", file_name=str, mode_Q=str,
           restrict_to_store_Q=str)
def op_delete_file_instances(source, args):
    """Delete the instances of a file that its policy allows to delete."""
    if File.get_or_none(File.name == args["file_name"]) is None:
        fail(400, "no file named %r" % args["file_name"])
    return deletion.delete_instances(ctx(), args["file_name"], deletion_mode(args),
                                     args["restrict_to_store"])


@operation("delete_file_instances_matching_query", "read-write", query=str, mode_Q=str,
           restrict_to_store_Q=str)
def op_delete_file_instances_matching_query(source, args):
    """Delete the allowed instances of every file a search matches."""
    mode = deletion_mode(args)
    deletion.check_request(mode, args["restrict_to_store"])
    if not search.parse(args["query"]):
        fail(400, "the query is empty, which matches every file; to mean every file, say "
             "so: {\"always-true\": []}")
    with search_limits(source):
        names = [f.name for f in search.file_query(args["query"]).select(File.name)]
    return {"stats": {name: deletion.delete_instances(ctx(), name, mode, args["restrict_to_store"])
                      for name in names}}


@operation("launch_file_copy", "read-write", file_name=str, connection_name=str,
           remote_store_path_Q=str, known_staging_store_Q=str, known_staging_subdir_Q=str)
def op_launch_file_copy(source, args):
    """Queue a copy of a file to another Librarian (a background task)."""
    if args["remote_store_path"] is not None:
        split_store_path(args["remote_store_path"])
    copies.launch(ctx(), args["file_name"], args["connection_name"], args["remote_store_path"],
                  known_staging_store=args["known_staging_store"],
                  known_staging_subdir=args["known_staging_subdir"])
    return {}


@operation("verify_file", "read-write", file_name=str, here_only_Q=bool, recompute_Q=bool)
def op_verify_file(source, args):
    """Recompute every copy of a file: each instance here and (unless
    `here_only`, which Librarians asking each other send, so that a request
    never fans out again) each copy another Librarian holds, which that
    Librarian recomputes. With `recompute` false, the last verification of
    each copy is reported without reading. Reply `copies`: one object per
    copy (`integrity.verify_here`, `remotes.reverify`)."""
    recompute = args["recompute"] is not False
    name = args["file_name"]
    models.check_file_name(name)
    if recompute and not verifications.acquire(blocking=False):
        fail(503, "%d verifications are running here; ask again later" % MAX_VERIFICATIONS)
    try:
        return verify_copies(name, recompute, args["here_only"])
    finally:
        if recompute:
            verifications.release()


MAX_VERIFICATIONS = 2  # recomputations at once per process (each reads whole files)
verifications = threading.BoundedSemaphore(MAX_VERIFICATIONS)


def verify_copies(name, recompute, here_only):
    """`verify_file`'s reply (see there)."""
    here = cfg().server["displayed_site_name"]
    copies_found = [dict(c, librarian=here)
                    for c in integrity.verify_here(ctx(), name, recompute=recompute)]
    if not here_only:
        for rinst in models.RemoteInstance.select().where(models.RemoteInstance.file == name):
            copies_found.append(remotes.reverify(ctx(), rinst) if recompute
                                else remotes.as_copy(rinst))
    return {"copies": copies_found}


@operation("copy_gone", "read-write", file_name=str)
def op_copy_gone(source, args):
    """The caller (another Librarian) no longer holds a copy of the file:
    forget the remote instances our connections to it recorded."""
    return {"forgotten": remotes.forget(args["file_name"],
                                        remotes.connections_of_source(ctx(), source.name))}


@operation("copy_held", "read-write", file_name=str, store_name=str, store_path=str)
def op_copy_held(source, args):
    """The caller (another Librarian, which sent us the file) holds a copy
    of it on its store `store_name` at `store_path`, verified as it was
    read: recorded as the origin's remote instance for our connections to
    it (none: nothing recorded). Its word alone: shown and confirmed, but
    never counted to make a deletion here safe."""
    file = File.get_or_none(File.name == args["file_name"])
    if file is None:
        fail(404, "no file named %r" % args["file_name"])
    names = remotes.connections_of_source(ctx(), source.name)
    for name in names:
        remotes.remember(file, name, {"store_name": args["store_name"], "size": file.size,
                                      "store_path": args["store_path"], "md5": file.md5},
                         origin=True)
    return {"recorded": len(names)}


@operation("create_standing_order", "admin", name=str, search=str, conn_name=str)
def op_create_standing_order(source, args):
    """Save a standing order: copy every file matching `search` to
    `conn_name`, once."""
    standing.create(ctx(), args["name"], args["search"], args["conn_name"])
    return {}


@operation("update_standing_order", "admin", name=str, search_Q=str, conn_name_Q=str)
def op_update_standing_order(source, args):
    """Change a standing order's search and/or connection."""
    standing.update(ctx(), args["name"], args["search"], args["conn_name"])
    return {}


@operation("delete_standing_order", "admin", name=str)
def op_delete_standing_order(source, args):
    """Remove a standing order (copies already made stay)."""
    standing.delete(args["name"])
    return {}


@operation("list_standing_orders", "read-only")
def op_list_standing_orders(source, args):
    """The standing orders: name, search, conn_name."""
    orders = standing.StandingOrder.select().order_by(standing.StandingOrder.name)
    return {"standing_orders": [o.to_dict() for o in orders]}


@operation("initiate_offload", "read-write", source_store_name=str, dest_store_name=str)
def op_initiate_offload(source, args):
    """Move the sole copies on one store to another store of this Librarian."""
    return offload.launch(ctx(), args["source_store_name"], args["dest_store_name"])


def deletion_mode(args):
    """The `mode` argument: `standard` when absent."""
    return "standard" if args["mode"] is None else args["mode"]


def openapi():
    """GET /api/openapi.json: the OpenAPI 3 description of the API."""
    response.content_type = "application/json"
    return json.dumps(openapi_doc.document(OPERATIONS, __version__), indent=1)


# ---------------------------------------------------------------------------
# Streamed upload and download (API.md section 2)
# ---------------------------------------------------------------------------

def query_flag(name):
    value = request.query.get(name)
    if value is None:
        return False
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no", ""):
        return False
    fail(400, "query argument %s must be true or false, got %r" % (name, value))


@handle_errors
def upload(dest_store_path):
    """PUT /api/upload/<dest_store_path>: stream the body (a file, or a tar
    of a directory with `X-Librarian-Directory: tar`) to staging, verify,
    register, move into place. 201 when created, 200 when identical bytes
    were already here, 409 when different bytes are."""
    source = caller("read-append", allow_session=True)
    unknown = sorted(set(request.query) - UPLOAD_QUERY_ARGS)
    if unknown:
        fail(400, "unknown query argument%s %s; known: %s"
             % ("s" if len(unknown) > 1 else "", ", ".join(unknown),
                ", ".join(sorted(UPLOAD_QUERY_ARGS))))
    directory = request.get_header("X-Librarian-Directory")
    if directory is not None and directory.lower() != "tar":
        fail(400, "X-Librarian-Directory must be 'tar', got %r" % directory)
    _, name = split_store_path(dest_store_path)
    md5 = request.query.get("md5")
    if md5 is not None:
        md5 = models.check_md5(md5)
    deletion_policy = request.query.get("deletion_policy")
    ingest.policy_code(deletion_policy)
    null_obsid = query_flag("null_obsid")
    is_tar = directory is not None
    length = request.content_length
    if length < 0 and request.get_header("Transfer-Encoding") is None:
        # (A zero-length file is an ordinary file, with Content-Length: 0.)
        fail(400, "no request body: send the file's bytes, with a Content-Length")
    store = choose_store(max(length, 0))
    store.resolve(dest_store_path)  # refuse paths leaving the store before any byte moves
    ingest.check_destination(store, dest_store_path)
    ingest.refuse_unknown_obsid_early(dest_store_path, is_tar, null_obsid,
                                      cfg().librarian["obsid_inference_mode"])
    with store.staging_dir() as staging:
        reader = BodyReader(request.environ["wsgi.input"], length if length >= 0 else None)
        staged = posixpath.join(staging, name)
        size, got_md5 = store.receive(reader, staged, name, is_tar)
        status, reply = finish_upload(store, staged, dest_store_path, source.name, md5,
                                      null_obsid, deletion_policy, size, got_md5)
    return json_reply(status, **reply)


def finish_upload(store, staged, dest_store_path, source_name, expected_md5, null_obsid,
                  deletion_policy, size, md5, recorded=None):
    """Verify and register the bytes staged at `staged` on `store` (`size`
    bytes with `md5`, as received) for `dest_store_path`, as every upload
    ends; returns (HTTP status: 201 created, 200 identical bytes already
    here; the reply fields). `recorded(status, reply)`, if given, runs in
    the registration's transaction (`ingest.register_staged`). Raises
    `LibrarianError` (409 for other bytes under the name, 400 for a
    mismatch with `expected_md5`)."""
    answer = []

    def reply(result):
        answer.append(((201 if result["created"] else 200), upload_outcome(result, store)))
        if recorded is not None:
            recorded(*answer[0])
    result = ingest.register_staged(
        store, staged, dest_store_path, source=source_name, deletion_policy=deletion_policy,
        null_obsid=null_obsid, expected_md5=expected_md5, size=size, md5=md5,
        inference_mode=cfg().librarian["obsid_inference_mode"],
        readonly=cfg().librarian["permissions_mode"] == "readonly", recorded=reply)
    if result["created"]:
        standing.sweep_soon(ctx())
    return answer[0]


# ---------------------------------------------------------------------------
# Resumable uploads (tus 1.0; the protocol's logic is in `uploads`)
# ---------------------------------------------------------------------------

# tus's checksum extension answers 460; Bottle builds status lines from its
# own table once, at import.
bottle.HTTP_CODES[460] = "Checksum Mismatch"
bottle._HTTP_STATUS_LINES[460] = "460 Checksum Mismatch"


def tus(func):
    """A tus route: every answer carries `Tus-Resumable`, and a request
    must name the version this server speaks (412 otherwise)."""
    handled = handle_errors(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            if request.get_header("Tus-Resumable") != uploads.TUS_VERSION:
                fail(412, "send Tus-Resumable: %s (the tus version this server speaks)"
                     % uploads.TUS_VERSION)
            result = handled(*args, **kwargs)
        except HTTPResponse as e:
            e.set_header("Tus-Resumable", uploads.TUS_VERSION)
            e.set_header("Tus-Version", uploads.TUS_VERSION)
            raise
        # (An HTTPResponse returned replaces `response`'s headers with its own.)
        answer = result if isinstance(result, HTTPResponse) else response
        answer.set_header("Tus-Resumable", uploads.TUS_VERSION)
        answer.set_header("Cache-Control", "no-store")
        return result
    return wrapper


def tus_options():
    """OPTIONS /api/uploads: what this server's tus offers."""
    return HTTPResponse(status=204, headers={
        "Tus-Resumable": uploads.TUS_VERSION, "Tus-Version": uploads.TUS_VERSION,
        "Tus-Extension": uploads.EXTENSIONS, "Tus-Max-Size": str(1 << 62),
        "Tus-Checksum-Algorithm": ",".join(uploads.CHECKSUMS),
        "X-Librarian-Max-Body": str(cfg().server["max_body_bytes"])})


def header_int(name):
    """A header that must be a whole number (None when absent; 400)."""
    value = request.get_header(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()) or len(value) > 19:
        fail(400, "%s must be a whole number, got %s" % (name, errors.short(value)))
    return int(value)


@tus
def tus_create():
    """POST /api/uploads: create a resumable upload (see `uploads`)."""
    source = caller("read-append", allow_session=True)
    fields = uploads.check_request(header_int("Upload-Length"),
                                   uploads.parse_metadata(request.get_header("Upload-Metadata")))
    if request.content_length > 0:
        fail(400, "send the bytes with PATCH after creating the upload")
    limit = cfg().server["uploads_per_caller"]
    uploads.check_open_uploads(source.name, limit)
    store = choose_store(fields["length"])
    row = uploads.create(store, source.name, fields, limit,
                         cfg().librarian["obsid_inference_mode"])
    if row.length == 0:  # complete at creation, as tus clients expect
        append_chunk(store, row, 0, b"")
    return HTTPResponse(status=201, headers={"Location": "/api/uploads/" + row.id})


def append_chunk(store, row, offset, data, checksum=None, final_md5=None):
    """`uploads.append`, finishing as every upload does; the new offset.
    `final_md5`: the whole file's MD5 sent with the chunk that completes it
    (`uploads.expected_md5`)."""
    expected = uploads.expected_md5(row, offset + len(data), final_md5)

    def finish(staged, size, md5, recorded):
        return finish_upload(store, staged, row.dest_store_path, row.source, expected,
                             row.null_obsid, row.deletion_policy, size, md5, recorded)
    return uploads.append(store, row, offset, data, finish, checksum)


@tus
def tus_head(upload_id):
    """HEAD /api/uploads/<id>: the upload's offset and length."""
    row = uploads.find(upload_id, caller("read-append", allow_session=True))
    return HTTPResponse(status=200, headers={"Upload-Offset": str(row.offset),
                                             "Upload-Length": str(row.length)})


@tus
def tus_patch(upload_id):
    """PATCH /api/uploads/<id>: append one chunk at Upload-Offset; the last
    chunk verifies and registers the file (its outcome: GET)."""
    source = caller("read-append", allow_session=True)
    row = uploads.find(upload_id, source)
    if request.get_header("Content-Type") != "application/offset+octet-stream":
        fail(415, "a chunk's Content-Type is application/offset+octet-stream")
    offset = header_int("Upload-Offset")
    if offset is None:
        fail(400, "send Upload-Offset, the byte the chunk starts at")
    length = request.content_length
    if length < 0:
        fail(411, "send the chunk's Content-Length")
    data, got = uploads.receive(request.environ["wsgi.input"], length)
    if got != length:
        fail(400, "the chunk ended %d bytes before its Content-Length" % (length - got))
    checksum = uploads.parse_checksum(request.get_header("Upload-Checksum"))
    new_offset = append_chunk(ctx().open_store(row.store), row, offset, data, checksum,
                              request.get_header(uploads.MD5_HEADER))
    return HTTPResponse(status=204, headers={"Upload-Offset": str(new_offset)})


@tus
def tus_delete(upload_id):
    """DELETE /api/uploads/<id>: abandon an upload and its staged bytes."""
    row = uploads.find(upload_id, caller("read-append", allow_session=True))
    uploads.terminate(ctx().open_store(row.store), row)
    return HTTPResponse(status=204)


@handle_errors
def upload_state(upload_id):
    """GET /api/uploads/<id>: offset, length and, once finished, the reply
    of the registration (as the single-request upload's) or its error."""
    row = uploads.find(upload_id, caller("read-append", allow_session=True))
    return json_reply(**uploads.outcome_of(row))


def upload_outcome(result, store):
    """The reply fields for an upload that `ingest.register_staged` made
    into `result`, on `store`: name, size, md5, obsid, the store_name and
    store_path of its instance (the new one; or, when `already_present`,
    the identical file's, preferably on `store`, at the place named, which
    may differ from the path asked for: nothing was changed)."""
    where = (store.name, result["store_path"]) if result["created"] else None
    if where is None:
        inst = (FileInstance.select(FileInstance, Store).join(Store)
                .where(FileInstance.file == result["name"])
                .order_by((Store.id != store.row.id), Store.name, FileInstance.parent_dirs)
                .first())
        if inst is None:  # its last instance was deleted meanwhile
            fail(409, "%s was being deleted while it was sent; send it again"
                 % result["name"])
        where = (inst.store.name, inst.store_path)
    return dict(name=result["name"], store_name=where[0], store_path=where[1],
                size=result["size"], md5=result["md5"], obsid=result["obsid"],
                already_present=not result["created"])


@handle_errors
def download(name):
    """GET /api/download/<name> and /stream/<name>: the bytes of a local
    instance; a directory as a tar under a top folder named after the file.
    Flat files honour Range."""
    caller("read-only", allow_session=True)
    models.check_file_name(name)
    while True:  # an instance found corrupt by its first chunk: the next one
        try:
            return instance_response(local_instance(name))
        except errors.Corrupt as e:
            log.warning("%s", e.message)


def instance_response(inst):
    """The response of a download of the instance `inst` (its first chunk
    read: `Corrupt` when the bytes are found bad by then)."""
    name = inst.name
    store = ctx().open_store(inst.store)
    path = store.resolve(inst.store_path)
    md5 = inst.file.md5
    db.close()  # the stream may take long; it needs no database connection
    if store.is_dir(path):
        chunks, length = store.stream(path, name, inst.file.size, md5=md5)
        headers = {"Content-Type": "application/x-tar",
                   "Content-Length": str(length), "X-Librarian-MD5": md5,
                   "Content-Disposition": "attachment; filename*=UTF-8''%s.tar"
                   % urllib.parse.quote(name, safe="")}
        return HTTPResponse(primed(integrity.verified(ctx(), inst, chunks, "download")),
                            **headers)
    resp = file_response(store, path, inst)
    resp.set_header("X-Librarian-MD5", md5)
    return resp


RANGE_SPEC = re.compile(r"(\d*)-(\d*)", re.ASCII)


def byte_range(size, etag):
    """The (start, end exclusive) of the request's Range, or None for the
    whole body, by RFC 9110 section 14: a unit other than bytes is
    ignored, and so are several ranges (the whole body is the allowed
    answer), a malformed one, and any under an If-Range other than `etag`
    (13.1.5); a single unsatisfiable bytes range is 416."""
    header = request.environ.get("HTTP_RANGE", "")
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":  # (units are case-insensitive)
        return None
    if_range = request.environ.get("HTTP_IF_RANGE")
    if if_range is not None and if_range.strip() != etag:
        return None
    match = RANGE_SPEC.fullmatch(spec.strip())
    if match is None or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if not first:  # the last `last` bytes
        start, end = max(0, size - int(last)), size
    else:
        start, end = int(first), min(size, int(last) + 1) if last else size
    if start >= end:  # beyond the end, reversed, or a suffix of none
        raise HTTPResponse(status=416, headers={"Content-Range": "bytes */%d" % size})
    return start, end


def file_response(store, path, inst):
    """The response for the flat file of the instance `inst`, honouring
    Range. The whole file (also as `Range: bytes=0-`) is streamed by the
    thread and verified on the way (`integrity.verified`: a mismatch cuts
    it short); a part of a file on
    this host is sent from the open file by waitress's own I/O loop
    (`wsgi.file_wrapper`, bounded by Content-Length), so that a client that
    does not read holds no worker thread."""
    size = inst.file.size
    etag = '"%s"' % inst.file.md5  # the bytes of a file never change
    headers = {"Content-Type": "application/octet-stream", "Accept-Ranges": "bytes",
               "ETag": etag}
    wanted = byte_range(size, etag)
    start, end = wanted or (0, size)
    status = 200 if wanted is None else 206
    if wanted is not None:
        headers["Content-Range"] = "bytes %d-%d/%d" % (start, end - 1, size)
    headers["Content-Length"] = str(end - start)
    if request.method == "HEAD":
        return HTTPResponse("", status=status, **headers)
    if (start, end) == (0, size):  # the whole file, also when asked as a range
        body = integrity.verified(ctx(), inst, store.stream(path, inst.name, size,
                                                           md5=inst.file.md5)[0], "download")
        body = primed(body)
    elif store.is_local() and "wsgi.file_wrapper" in request.environ:
        body = store.open_read(path)
        body.seek(start)
    else:
        body = primed(store.read_range(path, start, end - start))
    return HTTPResponse(body, status=status, **headers)


def primed(chunks):
    """The stream with its first chunk already read, so that a failure to
    start it (a store that cannot be reached, a file that shrank) is an
    error of the request, answered and logged by `handle_errors`, not a
    broken body. (A client that stops reading it is cut off after
    send_timeout: `bodybudget.close_stalled`.)"""
    chunks = iter(chunks)
    try:
        first = next(chunks)
    except StopIteration:
        return iter(())

    def resumed():
        try:
            yield first
            yield from chunks
        finally:  # a client that goes early: the store's session is freed now
            getattr(chunks, "close", lambda: None)()
    return resumed()


def install_routes(app):
    import pages

    pages.install(app)
    app.route("/metrics", "GET", metrics.endpoint)
    if app.config["librarian.settings"].server["protocol_additions"]:
        app.route("/api/openapi.json", "GET", openapi)
        # [\s\S]: any character, so that a name with a newline gets a clear 400.
        app.route(r"/api/upload/<dest_store_path:re:[\s\S]+>", "PUT", upload)
        app.route("/api/download/<name>", "GET", download)
        app.route("/api/uploads", "OPTIONS", tus_options)
        app.route("/api/uploads", "POST", tus_create)
        app.route("/api/uploads/<upload_id>", "HEAD", tus_head)
        app.route("/api/uploads/<upload_id>", "GET", upload_state)
        app.route("/api/uploads/<upload_id>", "PATCH", tus_patch)
        app.route("/api/uploads/<upload_id>", "DELETE", tus_delete)
    app.route("/stream/<name>", "GET", download)
    app.route("/api/<name>", ["GET", "POST"], api_dispatch)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def load_config(path):
    try:
        return settings_mod.load(settings_mod.find_config_path(path))
    except settings_mod.ConfigError as e:
        raise SystemExit("configuration error: %s" % e) from None


def cmd_migrate(args):
    config = load_config(args.config)
    configure_logging(config.server["log_level"])
    logging.getLogger("peewee_migrate").setLevel(logging.WARNING)  # one line per step is noise
    setup(config)
    with database_of(config):
        if db.table_exists("alembic_version"):
            raise SystemExit(
                "the database %s is an original Librarian's (it has alembic_version); it is "
                "never changed: put this server's catalogue in a new, empty database ([database] "
                "url in %s), migrate that, and copy the original's with adopt-v1 --from URL"
                % (config.database_shown, config.path))
        done = migration_router().run()
    print("applied %d migration(s)%s" % (len(done), (": " + ", ".join(done)) if done else ""))
    return 0


def make_server_app(args):
    config = load_config(args.config)
    configure_logging(config.server["log_level"])
    app = setup(config)
    startup(app)
    return config, app


MAX_HEADER_BYTES = 64 << 10  # a request's headers (waitress's default: 256 KiB each)
# A response streamed by a thread waits while this much is unsent, held in
# memory (waitress's defaults: 16 MiB, spooled to a temporary file past 1 MiB).
OUTBUF_BYTES = 4 << 20


def waitress_limits(config):
    """waitress's settings from `[server]`: a body over `max_body_bytes` is
    refused (413) from its headers, and one within it is held in memory
    (never spooled to a temporary file) until the handler reads it once."""
    limit, idle = config.server["max_body_bytes"], config.server["channel_timeout"]
    shortest = min(idle, config.server["send_timeout"])
    # (waitress refuses a body of max_request_body_size bytes or more; it looks
    # for idle connections every cleanup_interval seconds, and so do we for
    # stalled ones: `bodybudget.close_stalled`.)
    return dict(threads=config.server["threads"], max_request_body_size=limit + 1,
                inbuf_overflow=limit + 1, recv_bytes=RECV_BYTES,
                connection_limit=config.server["connection_limit"],
                channel_timeout=idle, cleanup_interval=max(1.0, min(30.0, shortest / 2)),
                max_request_header_size=MAX_HEADER_BYTES,
                outbuf_high_watermark=OUTBUF_BYTES, outbuf_overflow=OUTBUF_BYTES + 1)


def waitress_server(app, config, **listen):
    """The waitress server of `app` on `listen` (host and port, or listen),
    with `waitress_limits` and its request bodies bounded over all its
    listening sockets (`bodybudget`). Raises OSError when it cannot listen."""
    import waitress

    server = waitress.create_server(app, ident="librarian", **listen,
                                    **waitress_limits(config))
    bound = config.server["max_body_bytes"]
    bodybudget.install(server, bodybudget.channel_class(
        bodybudget.BodyBudget(config.server["buffered_body_bytes"], bound), bound,
        app.config["librarian.auth_cache"].recognises), config.server["send_timeout"])
    return server


def raise_open_file_limit(connections):
    """Raise the soft limit on open files to fit `connections` (and the
    files and databases beside them), up to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning("open files are limited to %d: fewer than [server] connection_limit "
                        "%d needs", new, connections)


MALLOC_ARENAS = 2  # glibc's default is 8 per core: each worker thread's garbage stays apart


def limit_malloc_arenas():
    """Ask glibc (where it is the C library) for at most MALLOC_ARENAS
    malloc arenas, as MALLOC_ARENA_MAX would, before threads start: with
    one arena per thread, memory freed after a large request (a record set
    of 100,000 files) stays held by that thread's arena."""
    import ctypes
    import ctypes.util

    M_ARENA_MAX = -8  # from glibc's malloc.h
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    except (OSError, AttributeError):  # not glibc: its own allocator's ways
        pass


def cmd_serve(args):
    limit_malloc_arenas()
    config, app = make_server_app(args)
    raise_open_file_limit(config.server["connection_limit"])
    stop = threading.Event()
    exit_on_sigterm()
    context = app.config["librarian.context"]
    intents.start_heartbeat(stop, functools.partial(settle_all, context))
    tasks.start_workers(context, config.server["workers"], stop)
    host, port = config.server["host"], config.server["port"]
    try:
        server = waitress_server(app, config, host=host, port=port)  # binds the port
    except OSError as e:
        stop.set()
        raise SystemExit("cannot listen on %s:%d: %s (is another server running there? see "
                         "[server] host and port in %s)" % (host, port, e.strerror,
                                                            config.path)) from None
    log.info("Librarian %s serving on http://%s:%d/ with %d threads", __version__, host, port,
             config.server["threads"])
    try:
        server.run()
    finally:
        stop.set()
        log.info("Librarian stopped")
        uvmeta.shutdown()
    return 0


def exit_on_sigterm():
    """Make SIGTERM (`kill`, service managers) leave through the normal
    exit path, so that `finally` blocks run and the header reader process
    stops with the server instead of being left behind."""
    leaving = threading.Event()

    def insist(signum):
        # waitress runs some callbacks under a bare `except:` that can swallow
        # the SystemExit; the signal comes again until the process has left.
        for _ in range(5):
            time.sleep(2.0)
            os.kill(os.getpid(), signum)
        os._exit(128 + signum)

    def handler(signum, frame):
        if not leaving.is_set():
            leaving.set()
            threading.Thread(target=insist, args=(signum,), daemon=True).start()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def cmd_worker(args):
    """Run background workers without the HTTP server (several processes,
    or another host, against one PostgreSQL database)."""
    import importlib

    config, app = make_server_app(args)
    for module in args.handlers or []:
        importlib.import_module(module)
    if args.once:
        with database_of(config):
            count = tasks.run_until_empty(app.config["librarian.context"], tasks.worker_name(0))
        log.info("ran %d task(s)", count)
        return 0
    n = args.threads or max(config.server["workers"], 1)
    stop = threading.Event()
    exit_on_sigterm()
    context = app.config["librarian.context"]
    intents.start_heartbeat(stop, functools.partial(settle_all, context))
    log.info("running %d worker thread(s)", n)
    try:
        for t in tasks.start_workers(context, n, stop):
            while t.is_alive():
                t.join(1.0)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        uvmeta.shutdown()
    return 0


def cmd_add_store(args):
    config = load_config(args.config)
    setup(config)
    try:
        models.check_store_name(args.name)
        with database_of(config):
            Store.create(name=args.name, path_prefix=os.path.abspath(args.path_prefix),
                         ssh_host=args.ssh_host or socket.gethostname(), available=True)
    except LibrarianError as e:
        raise SystemExit(e.message) from None
    except models.pw.IntegrityError:
        raise SystemExit("a store named %r exists already" % args.name) from None
    store = Context(config).open_store(Store(
        name=args.name, path_prefix=os.path.abspath(args.path_prefix),
        ssh_host=args.ssh_host or socket.gethostname()))
    try:
        store.ensure_prefix()
    except (OSError, LibrarianError) as e:
        print("warning: cannot create the folder of the store now: %s" % e, file=sys.stderr)
    print("added %s" % store.describe())
    return 0


def cmd_add_user(args):
    config = load_config(args.config)
    setup(config)
    authenticator = args.authenticator or models.new_authenticator()
    with database_of(config):
        try:
            models.create_source(args.name, authenticator, args.level)
        except LibrarianError as e:
            raise SystemExit(e.message) from None
    print("added source %s with level %s; its authenticator is:\n%s"
          % (args.name, args.level, authenticator))
    return 0


def cmd_remove_user(args):
    """Remove a source: its authenticator and web sessions stop working at
    once, in running servers too. A source that a [source:NAME] section
    gives is refused (start-up would add it again)."""
    config = load_config(args.config)
    if args.name in config.sources:
        raise SystemExit("source %s is given by [source:%s] in %s: remove that section "
                         "(start-up adds configured sources back)" % (args.name, args.name,
                                                                      config.path))
    setup(config)
    with database_of(config), models.write_transaction():
        if not Source.delete().where(Source.name == args.name).execute():
            raise SystemExit("no source named %s" % args.name)
        models.detach_source(args.name)
    print("removed source %s (the files it sent keep it as their source; its unfinished "
          "uploads are removed)" % args.name)
    return 0


def cmd_reconcile(args):
    """Compare a store with the catalogue, or apply one of the fixes it
    offers (reconcile.py)."""
    config = load_config(args.config)
    configure_logging(config.server["log_level"])
    app = setup(config)
    with database_of(config):
        return reconcile.command(app.config["librarian.context"], args)


CONFIG_TEMPLATE = """\
# Generated by `python librarian.py init-config`; see config.example.ini.
[server]
host = 127.0.0.1
port = {port}
secret_key = {secret_key}
displayed_site_name = Local Librarian

[database]
url = sqlite:///{db_path}

[store:local]
path_prefix = {store_path}

# Staging copies search results into dest_prefix/USER/FOLDER.
[staging]
dest_prefix = {staging_path}

[source:admin]
authenticator = {authenticator}
level = admin
"""


def cmd_init_config(args):
    """Write a config for an archive under the config's folder (SQLite
    database, a local store and a staging area), unless the file exists."""
    path = os.path.abspath(args.path)
    if os.path.exists(path):
        print("%s exists; leaving it as it is (remove it, or give another path, for a new "
              "one)" % path)
        return 0
    base = os.path.dirname(path)
    os.makedirs(base, exist_ok=True)
    text = CONFIG_TEMPLATE.format(port=args.port, secret_key=secrets.token_hex(32),
                                  db_path=os.path.join(base, "librarian.db"),
                                  store_path=os.path.join(base, "store"),
                                  staging_path=os.path.join(base, "staging"),
                                  authenticator=models.new_authenticator())
    os.makedirs(os.path.join(base, "staging"), exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    print("wrote %s" % path)
    return 0


def cmd_rolling_deletion(args):
    """Run a `[rolling_deletion:NAME]` now (with --noop: only report); the
    report as JSON on standard output."""
    config = load_config(args.config)
    app = setup(config)
    if args.name not in config.rolling_deletions:
        raise SystemExit("no [rolling_deletion:%s] in %s (there are: %s)" % (
            args.name, config.path, ", ".join(config.rolling_deletions) or "none"))
    with database_of(config):
        try:
            report = deletion.rolling(app.config["librarian.context"], args.name,
                                      mode="noop" if args.noop else "standard")
        except LibrarianError as e:
            raise SystemExit(e.message) from None
    print(json.dumps(report, indent=1))
    return 0


def cmd_show_admin(args):
    config = load_config(args.config)
    print("\n" + "=" * 72)
    print("Librarian at http://%s:%d/" % (config.server["host"], config.server["port"]))
    for name, spec in config.sources.items():
        if spec["level"] == "admin":
            print("admin source %r, authenticator: %s"
                  % (name, spec["authenticator"] or "(only its hash is configured)"))
    print("=" * 72 + "\n")
    return 0


def cmd_adopt_v1(args):
    """Copy a v1 database into the configured, migrated one (adopt.py):
    exit 0 when every row was taken, 1 when some were not, 2 when the
    input is unusable or the database not migrated."""
    import adopt

    config = load_config(args.config)
    configure_logging(config.server["log_level"])
    setup(config)
    with database_of(config):
        pending = pending_migrations()
        if pending and db.table_exists("alembic_version"):
            print("adopt-v1: the database %s holds an original Librarian's tables; adopt-v1 "
                  "copies them into a fresh one: point [database] url in %s at a new database"
                  % (config.database_shown, config.path), file=sys.stderr)
            return 2
        if pending:
            print("adopt-v1: the database %s is not migrated (pending: %s); run: python "
                  "librarian.py migrate --config %s" % (config.database_shown,
                                                         ", ".join(pending), config.path),
                  file=sys.stderr)
            return 2
        try:
            report = adopt.adopt(args.source, batch=args.batch, progress=not args.no_progress)
        except adopt.AdoptError as e:
            print("adopt-v1: %s" % e, file=sys.stderr)
            return 2
    print(json.dumps(report, indent=1, default=str) if args.json else adopt.format_report(report))
    return 0 if report["complete"] else 1


def cmd_adopt_v1_config(args):
    """Print an original Librarian's server-config.json as our INI
    (v1config.py); exit 2 when a file is unusable."""
    import v1config

    try:
        v1, connections, client_path = v1config.read_config_files(args.path, args.hl_client_cfg)
        text = v1config.convert_config(v1, args.level, connections, (args.path, client_path),
                                       args.database_url, admins=args.admin)
    except v1config.AdoptError as e:
        print("adopt-v1-config: %s" % e, file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="librarian.py", description="The Librarian server.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", help="INI file (default: $LIBRARIAN_CONFIG_PATH, then "
                       "./librarian.ini)")
        return p

    with_config(sub.add_parser("migrate", help="apply database migrations")) \
        .set_defaults(func=cmd_migrate)
    with_config(sub.add_parser("serve", help="serve HTTP with waitress (and run workers)")) \
        .set_defaults(func=cmd_serve)
    p = with_config(sub.add_parser("worker", help="run background workers only"))
    p.add_argument("--threads", type=int, help="worker threads (default: [server] workers)")
    p.add_argument("--once", action="store_true", help="run the due tasks, then exit")
    p.add_argument("--handlers", action="append", metavar="MODULE",
                   help="import this module for more task kinds (may repeat)")
    p.set_defaults(func=cmd_worker)
    p = with_config(sub.add_parser("add-store", help="register a store"))
    p.add_argument("name")
    p.add_argument("path_prefix")
    p.add_argument("--ssh-host", help="host of the store (default: this host); how to reach "
                   "it over SSH comes from the [store:NAME] section of the configuration")
    p.set_defaults(func=cmd_add_store)
    p = with_config(sub.add_parser("add-user", help="create a source (user) and print its "
                                   "authenticator"))
    p.add_argument("name")
    p.add_argument("--level", choices=models.LEVELS, default="read-only")
    p.add_argument("--authenticator", help="use this authenticator instead of a random one")
    p.set_defaults(func=cmd_add_user)
    p = with_config(sub.add_parser("remove-user", help="remove a source (user): its "
                                   "authenticator stops working at once"))
    p.add_argument("name")
    p.set_defaults(func=cmd_remove_user)
    p = with_config(sub.add_parser("reconcile", help="compare a store's bytes with the catalogue: "
                                   "lost, dark and size_mismatch as JSON; or fix one path"))
    p.add_argument("store")
    p.add_argument("--register-dark", action="append", metavar="STORE_PATH",
                   help="check and register this dark file or folder (may repeat)")
    p.add_argument("--null-obsid", action="store_true",
                   help="with --register-dark: the data carry no observation")
    p.add_argument("--forget-lost", action="append", metavar="STORE_PATH",
                   help="remove the record of this lost instance (may repeat)")
    p.set_defaults(func=cmd_reconcile)
    p = sub.add_parser("init-config", help="write a config for a local archive")
    p.add_argument("path")
    p.add_argument("--port", type=int, default=settings_mod.DEFAULT_PORT)
    p.set_defaults(func=cmd_init_config)
    with_config(sub.add_parser("show-admin", help="print the URL and admin authenticators")) \
        .set_defaults(func=cmd_show_admin)
    p = with_config(sub.add_parser("rolling-deletion", help="run a [rolling_deletion:NAME] "
                                   "rule now and print its report as JSON"))
    p.add_argument("name", help="the NAME of its [rolling_deletion:NAME] section")
    p.add_argument("--noop", action="store_true", help="only report what would be deleted")
    p.set_defaults(func=cmd_rolling_deletion)
    p = with_config(sub.add_parser("adopt-v1", help="copy an original (v1) Librarian's "
                                   "database into this one (read-only on the v1 side)"))
    p.add_argument("--from", dest="source", required=True, metavar="URL",
                   help="the v1 database: postgresql://USER@HOST:PORT/DB or sqlite:///PATH "
                   "(SQLAlchemy spellings accepted)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--batch", type=positive_int, default=20_000, metavar="ROWS",
                   help="rows per transaction (default 20000)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.set_defaults(func=cmd_adopt_v1)
    p = sub.add_parser("adopt-v1-config", help="print an original (v1) Librarian's "
                       "server-config.json as an INI configuration for this server")
    p.add_argument("path", help="the original's server-config.json")
    p.add_argument("--level", required=True, choices=models.LEVELS,
                   help="level of every source (the original had none: all could do anything)")
    p.add_argument("--admin", action="append", default=[], metavar="SOURCE",
                   help="this source gets level admin instead (may repeat)")
    p.add_argument("--hl-client-cfg", metavar="PATH", help="client file whose connections "
                   "become [connection:NAME] (default: $HL_CLIENT_CFG or ~/.hl_client.cfg)")
    p.add_argument("--database-url", metavar="URL", help="this server's (fresh) database; "
                   "default: the original's SQLALCHEMY_DATABASE_URI")
    p.set_defaults(func=cmd_adopt_v1_config)
    return parser


def positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError("expected a whole number of at least 1, got %r" % text)
    return int(text)


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    # Run as the module `librarian`, so that pages.py and this script share
    # one copy of it (and of its operation registry).
    import librarian as _librarian

    sys.exit(_librarian.main())
