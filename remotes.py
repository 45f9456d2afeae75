"""Copies held by other Librarians (remote instances), kept true.

A copy to another Librarian that finished records a `RemoteInstance` with
the receiver's own word on it (its store, path, and the size and MD5 it
computed); the receiver records the sender's copy in turn (`copy_held`:
where the file came from). The record is kept true three ways: a peer that deletes its
last copy tells us (`copy_gone`, best effort, `notify_peers` on its side);
a periodic check (`confirm` tasks) asks each peer about copies not
confirmed for `[librarian] remote_confirm_hours`; and `reverify` asks a
peer to recompute its copy (before a deletion counts on it, or for
`verify_file`). A peer is asked with `verify_file` and `here_only`, so a
request between Librarians never fans out again.

Peers are `[connection:NAME]` sections; a remote instance's `librarian` is
that NAME. The connection's `source` names the source that Librarian uses
when it calls us (default: NAME), which is how its word is matched to its
copies.
"""

import datetime
import logging
import os

import librarian_client
import tasks
from errors import LibrarianError
from models import File, RemoteInstance, from_unix, to_unix, utcnow, write_transaction

log = logging.getLogger("librarian")

CONFIRM_BATCH = 100
CONFIRM_INTERVAL_SECONDS = 3600.0


def remember(file, connection_name, theirs, verified_at=None, origin=None):
    """Record (or refresh) the copy of `file` held by the Librarian of
    `connection_name`, from its word `theirs` = {store_name, store_path,
    size, md5} (what it computed). `origin`: whether it is the copy the
    file came from (None: as recorded before, else not)."""
    now = utcnow()
    fields = dict(store_name=theirs["store_name"], store_path=theirs["store_path"],
                  size=theirs["size"], md5=theirs["md5"], verified_at=verified_at or now,
                  confirmed_at=now)
    if origin is not None:
        fields["origin"] = origin
    with write_transaction():  # one statement: two at once cannot both insert
        (RemoteInstance.insert(file=file.name, librarian=connection_name, **fields)
         .on_conflict(conflict_target=[RemoteInstance.file, RemoteInstance.librarian],
                      update=fields).execute())


def forget(file_name, connection_names):
    """Drop the remote instances of `file_name` held by those Librarians;
    returns how many."""
    with write_transaction():
        File.lock(file_name)
        return (RemoteInstance.delete()
                .where((RemoteInstance.file == file_name)
                       & RemoteInstance.librarian.in_(list(connection_names))).execute())


def connections_of_source(ctx, source_name):
    """The names of our connections to the Librarian that calls us as
    `source_name`."""
    return [name for name, spec in ctx.settings.connections.items()
            if (spec.get("source") or name) == source_name]


def good(rinst, file):
    """Whether a remote instance is a good copy: its Librarian's MD5 and
    size are the record's."""
    return rinst.md5 == file.md5 and rinst.size == file.size


def counted_for_deletion(ctx, file, fresh_after):
    """The copies other Librarians hold that make deleting one here safe:
    good, not the copy the file came from (`origin`), verified after
    `fresh_after`, and confirmed by their Librarian just now (asked:
    a record alone may be out of date, e.g. when its `copy_gone` was lost).
    Network calls: not inside a transaction."""
    found = []
    for rinst in RemoteInstance.select().where((RemoteInstance.file == file.name)
                                               & (RemoteInstance.origin == False)  # noqa: E712
                                               & (RemoteInstance.verified_at >= fresh_after)):
        if good(rinst, file) and rinst.librarian in ctx.settings.connections \
                and ask_about(ctx, rinst) and RemoteInstance.get_or_none(
                    RemoteInstance.id == rinst.id) is not None:
            found.append(rinst.librarian)
    return found


def reverify(ctx, rinst):
    """Ask the Librarian holding `rinst` to recompute its copy (`verify_file`
    with `here_only`); updates or forgets the record and returns the
    peer's word as a `verify_file` copy dict (`librarian` set to the
    connection's name). A peer that cannot be asked gives ok False and
    result "unreachable", and the record stays as it was."""
    from copies import client_for

    word = {"librarian": rinst.librarian, "store_name": rinst.store_name,
            "store_path": rinst.store_path, "ok": False, "md5": None, "size": None,
            "verified_at": None}
    try:
        reply = client_for(ctx, rinst.librarian).verify_file(rinst.name, here_only=True)
    except librarian_client.RPCError as e:
        if e.status == 404:  # the peer does not know the file (any more)
            forget(rinst.name, [rinst.librarian])
            return dict(word, result="missing", message=e.message)
        return dict(word, result="unreachable", message=e.message)
    except LibrarianError as e:
        return dict(word, result="unreachable", message=e.message)
    theirs = [c for c in reply.get("copies", []) if c.get("ok")]
    if not theirs:
        forget(rinst.name, [rinst.librarian])
        bad = reply.get("copies") or [{}]
        return dict(word, result=bad[0].get("result", "missing"), md5=bad[0].get("md5"))
    best = theirs[0]
    file = File.get_by_id(rinst.name)
    remember(file, rinst.librarian, best, verified_at=from_unix(best["verified_at"]))
    same = (best["md5"], best["size"]) == (file.md5, file.size)
    return dict(word, ok=same, result="ok" if same else "differs", md5=best["md5"],
                size=best["size"], store_name=best["store_name"],
                store_path=best.get("store_path", rinst.store_path),
                verified_at=best["verified_at"])


def as_copy(rinst):
    """The record `rinst` as a `verify_file` copy, without asking."""
    file = File.get_by_id(rinst.name)
    return {"librarian": rinst.librarian, "store_name": rinst.store_name,
            "store_path": rinst.store_path, "ok": good(rinst, file), "result": "recorded",
            "md5": rinst.md5, "size": rinst.size, "verified_at": to_unix(rinst.verified_at)}


def fetch(ctx, rinst, store, staged):
    """Download the copy `rinst` from its Librarian to the new path
    `staged` in a staging folder of `store` (through a temporary folder on
    this host when the store is on another one); True when bytes matching
    the record arrived there, False (nothing left behind) otherwise."""
    import tempfile

    from copies import client_for

    file = File.get_by_id(rinst.name)
    try:
        client = client_for(ctx, rinst.librarian)
        if store.is_local():
            read = client.download(file.name, staged)
        else:
            with tempfile.TemporaryDirectory(prefix="librarian-fetch-") as tmp:
                local = os.path.join(tmp, file.name)
                read = client.download(file.name, local)
                store.copy_in(local, staged)
    except (librarian_client.RPCError, LibrarianError, OSError) as e:
        log.warning("cannot fetch %s back from %s: %s", file.name, rinst.librarian, e)
        return False
    if read != (file.size, file.md5):
        log.warning("%s fetched from %s has size %d md5 %s, not those of its record",
                    file.name, rinst.librarian, *read)
        store.remove_staged(staged)
        return False
    return True


def notify_peers(ctx, file):
    """Tell the Librarians that may have recorded our copy (the one the
    file came from: our connection whose source is the file's; and those
    we sent it to) that our last copy is gone; best effort."""
    from copies import client_for

    names = set(connections_of_source(ctx, file.source))
    names.update(r.librarian for r in RemoteInstance.select(RemoteInstance.librarian)
                 .where(RemoteInstance.file == file.name))
    for name in sorted(names & set(ctx.settings.connections)):
        try:
            client_for(ctx, name).copy_gone(file.name)
        except (librarian_client.RPCError, LibrarianError) as e:
            log.info("could not tell %s that %s is gone here: %s", name, file.name, e)


def confirm(ctx, now=None):
    """Ask each configured peer about its copies not confirmed for
    `remote_confirm_hours` (a batch per peer, oldest first; a peer that
    cannot be asked is passed over until the next check, and copies at
    Librarians we have no connection to wait for one). Returns how many
    copies were asked about."""
    hours = ctx.settings.librarian["remote_confirm_hours"]
    cutoff = (now or utcnow()) - datetime.timedelta(hours=hours)
    asked = 0
    for name in sorted(ctx.settings.connections):
        stale = (RemoteInstance.select().where((RemoteInstance.librarian == name)
                                               & (RemoteInstance.confirmed_at < cutoff))
                 .order_by(RemoteInstance.confirmed_at).limit(CONFIRM_BATCH))
        for rinst in list(stale):
            asked += 1
            if not ask_about(ctx, rinst):
                break
    return asked


def ask_about(ctx, rinst):
    """Whether the peer still has the copy, by its last verification (no
    recomputation): refreshes `confirmed_at`, or forgets the copy. Returns
    False when the peer could not be asked."""
    from copies import client_for

    try:
        reply = client_for(ctx, rinst.librarian).verify_file(rinst.name, here_only=True,
                                                             recompute=False)
    except librarian_client.RPCError as e:
        if e.status == 404:
            forget(rinst.name, [rinst.librarian])
            return True
        return False
    except LibrarianError:
        return False
    if not any(c.get("ok") for c in reply.get("copies", [])):
        forget(rinst.name, [rinst.librarian])
        return True
    with write_transaction():
        RemoteInstance.update(confirmed_at=utcnow()).where(RemoteInstance.id == rinst.id) \
            .execute()
    return True


@tasks.handler("confirm_remote_instances")
def confirm_task(ctx, task, args):
    """The periodic check as a task; it queues the next one when it ends
    (one that fails for good is started again by `schedule`)."""
    confirm(ctx)
    with write_transaction():
        tasks.enqueue(ctx, "confirm_remote_instances", {}, delay=CONFIRM_INTERVAL_SECONDS)


def schedule(ctx):
    """Make sure a check is queued or running (at start, with heartbeats)."""
    if not tasks.active_args("confirm_remote_instances"):
        with write_transaction():
            tasks.enqueue(ctx, "confirm_remote_instances", {}, delay=CONFIRM_INTERVAL_SECONDS)
