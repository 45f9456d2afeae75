"""Copies of files to other Librarians, as background tasks.

`launch(file_name, connection_name, remote_store_path)` checks the request,
records a `launch_copy` event and queues a `copy_to_librarian` task. The
task sends the file's File/Observation/Session records with the receiver's
`initiate_upload` (so that the receiver keeps the same create time and
session), then the bytes, which the receiver verifies (size and MD5 against
the records) before registering:

- to a Librarian like this one, by the streamed upload over HTTP;
- to one that still runs the original server (it has no streamed upload),
  by the original's protocol: over SSH into the staging folder its
  `initiate_upload` named on its store host, logged in with the
  connection's SSH settings, then `complete_upload` in `direct` mode;
- with `known_staging_store`/`known_staging_subdir` (the bytes were put in
  that folder of the receiver by other means), no bytes at all: the
  receiver is asked to complete from that folder.

A broken transfer is simply sent again on the next attempt: the receiver
registers nothing until the whole file has arrived and checked out. When
the receiver already has the identical file, the copy succeeds at once. A
`copy_finished` event records the connection, the remote path, the error
code and message, the duration (s) and the average rate (kB/s).

Connections are `[connection:NAME]` sections of the configuration, or else
entries of `~/.hl_client.cfg`.
"""

import collections
import contextlib
import json
import logging
import os
import posixpath
import threading
import time
import urllib.parse

import integrity
import librarian_client
import remotes
import settings
import tasks
from models import (File, FileEvent, LibrarianError, Observation,
                    ObservingSession, write_transaction)
from errors import from_peer
from stores import SSHTarget, check_relative_folder

log = logging.getLogger("librarian")

REPORT_EVERY = 64 << 20  # bytes between progress reports
WAIT_FOR_SLOT_SECONDS = 1.0  # a copy over its connection's copies_in_flight waits this long
_in_flight = collections.Counter()  # connection name -> copies this process sends now
_in_flight_lock = threading.Lock()


@contextlib.contextmanager
def slot(ctx, connection_name):
    """One of the connection's `copies_in_flight` slots (`[connection:NAME]`,
    in this process) for the block; `tasks.Deferred` when all are taken,
    so that the worker takes other work meanwhile. How many copies run at
    once in all is `[server] workers`."""
    spec = ctx.settings.connections.get(connection_name) or {}  # ({}: ~/.hl_client.cfg's)
    limit = spec.get("copies_in_flight") or settings.SCHEMA["connection:*"]["copies_in_flight"][1]
    with _in_flight_lock:
        if _in_flight[connection_name] >= limit:
            raise tasks.Deferred(WAIT_FOR_SLOT_SECONDS, "%s has %d copies in flight already"
                                 % (connection_name, limit))
        _in_flight[connection_name] += 1
    try:
        yield
    finally:
        with _in_flight_lock:
            _in_flight[connection_name] -= 1


def client_for(ctx, connection_name):
    """A LibrarianClient for a named connection (of the context's settings,
    else of ~/.hl_client.cfg); 400 if there is none."""
    conns = ctx.settings.connections
    if connection_name in conns:
        return librarian_client.LibrarianClient(conn_config=conns[connection_name])
    try:
        return librarian_client.LibrarianClient(connection_name)
    except librarian_client.RPCError as e:
        raise LibrarianError(400, "no connection named %r (not in the configuration; %s)"
                             % (connection_name, e.message)) from None


def connection_names(ctx):
    """Names of the configured connections, then those of ~/.hl_client.cfg."""
    names = list(ctx.settings.connections)
    try:
        path = os.path.expanduser(os.environ.get("HL_CLIENT_CFG") or
                                  librarian_client.CONFIG_PATH)
        with open(path, encoding="utf-8") as f:
            names += [n for n in json.load(f).get("connections", {}) if n not in names]
    except (OSError, ValueError, AttributeError):
        pass
    return names


def check_connection(ctx, name):
    """`{name, url, ok, message, stores}` for a connection: ping it and
    list its stores."""
    result = {"name": name, "url": None, "ok": False, "message": "", "stores": []}
    try:
        client = client_for(ctx, name)
        result["url"] = client.url
        client.ping()
        result["stores"] = client.probe_stores()
        result["ok"] = True
    except (LibrarianError, librarian_client.RPCError) as e:
        result["message"] = e.message
    return result


def local_copy(ctx, file_name):
    """(FileInstance, StoreAccess, absolute path) of a present instance of
    a file on one of our stores, or raise `LibrarianError(400)`."""
    inst, store, path = ctx.stores.present_instance(file_name)
    if inst is None:
        raise LibrarianError(400, "file %r has no instance here to copy" % file_name)
    return inst, store, path


def record_set(file):
    """The records a receiver needs (API.md record sets): the file, its
    observation and that observation's session."""
    sets = {"files": {file.name: file.to_dict()}}
    if file.obsid is not None:
        obs = Observation.get_by_id(file.obsid)
        sets["observations"] = {str(obs.obsid): obs.to_dict()}
        if obs.session_id is not None:
            session = ObservingSession.get_by_id(obs.session_id)
            sets["sessions"] = {str(session.id): session.to_dict()}
    return sets


def launch(ctx, file_name, connection_name, remote_store_path=None, standing_order=None,
           known_staging_store=None, known_staging_subdir=None):
    """Queue a copy (for `standing_order`, if given; from the receiver's
    pre-staged folder with `known_staging_*`); returns the task. 400 for an
    unknown file or connection, or a file with no instance here."""
    if (known_staging_store is None) != (known_staging_subdir is None):
        raise LibrarianError(400, "give both known_staging_store and known_staging_subdir, "
                             "or neither")
    if File.get_or_none(File.name == file_name) is None:
        raise LibrarianError(400, "no file named %r" % file_name)
    client_for(ctx, connection_name)
    inst, _, _ = local_copy(ctx, file_name)
    remote = remote_store_path or inst.store_path
    if remote.rstrip("/").rsplit("/", 1)[-1] != file_name:
        raise LibrarianError(400, "remote_store_path %r must end in the file's name %r"
                             % (remote, file_name))
    with write_transaction():
        FileEvent.record(file_name, "launch_copy", {"connection_name": connection_name,
                                                   "remote_store_path": remote,
                                                   "standing_order": standing_order})
        return tasks.enqueue(ctx, "copy_to_librarian", {"file_name": file_name,
                                                   "connection_name": connection_name,
                                                   "remote_store_path": remote,
                                                   "standing_order": standing_order,
                                                   "known_staging_store": known_staging_store,
                                                   "known_staging_subdir":
                                                   known_staging_subdir},
                             file_name=file_name, standing_order=standing_order)


def _order_exists(name):
    """Whether the standing order is still there (a copy queued before it
    was deleted does not mark files done for a later order of that name)."""
    from standing import StandingOrder

    return StandingOrder.select().where(StandingOrder.name == name).exists()


def _finished(file_name, args, code, message, seconds, size):
    FileEvent.record(file_name, "copy_finished", {
        "connection_name": args["connection_name"],
        "remote_store_path": args["remote_store_path"], "error_code": code,
        "error_message": message, "duration": round(seconds, 3),
        "average_rate": round(size / 1024.0 / seconds, 1) if seconds > 0 else None})


def send_instance(ctx, client, inst, store, path, task, progress):
    """Send the bytes of the instance `inst` at `path` on `store` (a
    directory as a tar) to the receiver as a resumable upload, with the MD5
    of the record. The receiver hashes what arrives and refuses bytes that
    do not match it, so we do not hash them too (an MD5 pass is most of a
    copy's processor time); when it refuses, our instance is verified
    (`integrity.verify_instance`), and one whose bytes differ is marked
    corrupt and raises `Corrupt`. The upload's URL is kept in the task, so
    that a later attempt (after a restart, say) goes on from where the
    receiver's bytes end. Returns the receiver's reply (its store, path,
    size and MD5)."""
    args, file = json.loads(task.args), inst.file
    try:
        with store.seekable_stream(path, file.name, file.size) as stream:
            return client.upload_stream(stream, file.md5, args["remote_store_path"],
                                        is_dir=store.is_dir(path), null_obsid=file.obsid is None,
                                        progress=progress, resume_url=args.get("upload_url"),
                                        on_created=lambda url: task.remember(upload_url=url))
    except librarian_client.RPCError as e:
        if e.status is not None and 400 <= e.status < 500:  # refused: maybe for our bytes
            check_sent(ctx, inst)
        raise


def check_sent(ctx, inst):
    """After the receiver refused what we sent of `inst`: verify it here,
    raising `Corrupt` (and so recorded) when its bytes differ from the
    record; other failures to read are left to the refusal's message."""
    try:
        report = integrity.verify_instance(ctx, inst, how="copy")
    except (LibrarianError, OSError) as e:
        log.warning("could not verify %s after a refused copy: %s", inst.file.name, e)
        return
    if not report["ok"]:
        raise integrity.out_of_service(inst, report["result"])


def peer_host(ctx, connection_name, store_name, host):
    """The file system of a receiver's store host over SSH, reached with
    the `[connection:NAME]` SSH settings (one shared connection per host).
    The host must be one the connection's `ssh_hosts` lists (by default the
    host of its URL): the receiver's word alone never sends our key and
    bytes to a host. 400 otherwise."""
    spec = ctx.settings.connections.get(connection_name, {})
    allowed = spec.get("ssh_hosts") or [urllib.parse.urlsplit(spec.get("url", "")).hostname]
    if host not in allowed:
        raise LibrarianError(400, "%s names the store host %r, which is not among the hosts "
                             "[connection:%s] ssh_hosts allows (%s)" % (
                                 connection_name, host, connection_name,
                                 ", ".join(filter(None, allowed)) or "none"))
    target = SSHTarget(host, spec.get("ssh_port") or 22, spec.get("ssh_user"),
                       spec.get("ssh_key"), spec.get("known_hosts"),
                       spec.get("ssh_timeout") or 15.0)
    return ctx.stores.peer_host("%s of %s" % (store_name, connection_name), target)


def send_by_ssh(ctx, client, connection_name, inst, store, path, remote_store_path, progress):
    """The original protocol: records with `initiate_upload`, which names a
    store and a staging folder (relative to its prefix); the bytes over
    SSH into that folder (verified as they are read: `integrity.check_copy`);
    `complete_upload` in `direct` mode, where the receiver checks them
    against the records. Returns the receiver's store name and path."""
    file = inst.file
    info = client.initiate_upload(file.size, **record_set(file))
    remote = peer_host(ctx, connection_name, info["name"], info["ssh_host"])
    prefix = info["path_prefix"]
    if not (isinstance(prefix, str) and prefix.startswith("/") and ".." not in prefix.split("/")):
        raise LibrarianError(400, "%s names the store prefix %r, not an absolute path"
                             % (connection_name, prefix))
    folder = check_relative_folder(info["staging_dir"], "the staging_dir %s names"
                                   % connection_name)
    staged = posixpath.join(prefix, *folder, file.name)
    integrity.check_copy(ctx, inst, store.copy_to(path, remote, staged, progress=progress),
                         "copy")
    client.complete_upload(info["name"], info["staging_dir"], remote_store_path, "direct")
    return {"store_name": info["name"], "store_path": remote_store_path, "size": file.size,
            "md5": file.md5}


def complete_prestaged(client, file, args):
    """Ask the receiver to register `file` from the folder where its bytes
    were put by other means (`known_staging_store`/`_subdir`)."""
    info = client.initiate_upload(file.size, known_staging_store=args["known_staging_store"],
                                  known_staging_subdir=args["known_staging_subdir"],
                                  **record_set(file))
    client.complete_upload(info["name"], info["staging_dir"], args["remote_store_path"],
                           "direct", staging_was_known=True)


def send(ctx, client, inst, store, path, task, progress):
    """Send the instance `inst` (at `path` on `store`) by the way the
    receiver takes it; see the module docstring. Returns (bytes sent, the
    receiver's word on its copy: `store_name`, `store_path`, `size`,
    `md5`)."""
    args, file = json.loads(task.args), inst.file
    if args.get("known_staging_store"):
        complete_prestaged(client, file, args)
        return 0, {"store_name": args["known_staging_store"],
                   "store_path": args["remote_store_path"], "size": file.size, "md5": file.md5}
    if client.offers_streamed_upload():
        client.initiate_upload(file.size, records_only=True, **record_set(file))
        return file.size, send_instance(ctx, client, inst, store, path, task, progress)
    return file.size, send_by_ssh(ctx, client, args["connection_name"], inst, store, path,
                                  args["remote_store_path"], progress)


@tasks.handler("copy_to_librarian")
def copy_to_librarian(ctx, task, args):
    """The task: send records, then bytes; see the module docstring."""
    file = File.get_or_none(File.name == args["file_name"])
    if file is None:
        raise tasks.Permanent("no file named %r" % args["file_name"])
    started = time.monotonic()
    sent = [0]

    def progress(n):
        before, sent[0] = sent[0], sent[0] + n
        if before // REPORT_EVERY != sent[0] // REPORT_EVERY:
            task.report(sent[0])

    try:
        inst, store, path = local_copy(ctx, file.name)
        client = client_for(ctx, args["connection_name"])
        with slot(ctx, args["connection_name"]):
            size, theirs = send(ctx, client, inst, store, path, task, progress)
    except librarian_client.RPCError as e:
        error = from_peer(e.status, e.message)
        if not error.retryable:  # refused: sending again will not help
            _finished(file.name, args, e.status, e.message, time.monotonic() - started, 0)
        raise error from None
    except LibrarianError as e:
        if not e.retryable:
            _finished(file.name, args, 1, e.message, time.monotonic() - started, 0)
        raise
    with write_transaction():
        _finished(file.name, args, 0, "", time.monotonic() - started, size)
        remotes.remember(file, args["connection_name"], theirs, origin=False)
        if args.get("standing_order") and _order_exists(args["standing_order"]):
            FileEvent.record(file.name, "standing_order_succeeded:" + args["standing_order"],
                             {"connection_name": args["connection_name"]})
    log.info("copied %s to %s as %s", file.name, args["connection_name"],
             args["remote_store_path"])
    try:  # the receiver's record of where the file came from (best effort)
        client.copy_held(file.name, inst.store.name, inst.store_path)
    except librarian_client.RPCError as e:
        log.info("%s did not record our copy of %s: %s", args["connection_name"], file.name, e)
