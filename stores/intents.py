"""Intents: every mutation of a store's bytes, recorded before it starts.

Before the first byte moves, a process records what it is about to do in
the `store_intent` table (`models.StoreIntent`), with itself as the owner;
when the mutation is settled, the record goes (for a commit, in the same
transaction as the file's records, so that bytes in place and their record
appear together). A process that dies leaves its intents behind, and
`settle` finishes or undoes each of them:

- `receive`: a staging folder being written: removed.
- `take`: a pre-staged file moved from `store_path` into the staging folder
  `staging`: put back (see `StoreAccess.give_back`).
- `commit`: the staged item `staging` being moved to `store_path`: if the
  bytes are there but not registered, moved back to `staging` (and so
  settled with the folder's own intent).
- `delete`: the instance at `store_path`, whose record went when the intent
  was made: its bytes are moved into the folder `staging`, then removed.

An intent is settled only when its owner is gone: a process of this host
that has ended (`models.process_is_gone`), one of another host that has not
heartbeated for `LEASE_SECONDS`, or no owner (a live process that could not
settle it itself hands it over with `abandon`). Settling never touches a
live process's work, on any host; it runs at start-up and every
`SETTLE_SECONDS` in every serving or working process.
"""

import datetime
import json
import logging
import os
import posixpath
import signal
import socket
import threading

from models import (StoreIntent, process_is_gone, this_process, utcnow,
                    write_transaction)

log = logging.getLogger("librarian")

HEARTBEAT_SECONDS = 20.0
LEASE_SECONDS = 120.0   # an intent of another host without a heartbeat this long is settled
SETTLE_SECONDS = 300.0  # how often a serving process settles what dead ones left
ORDER = ("commit", "delete", "take", "receive")  # commits go back before their folders


def crash_point(step):
    """Die at once (SIGKILL) at `step` if the environment variable
    LIBRARIAN_CRASH_AT names it: how the tests kill a real server at each
    step of a mutation. A no-op otherwise."""
    if os.environ.get("LIBRARIAN_CRASH_AT") == step:
        os.kill(os.getpid(), signal.SIGKILL)


def begin(kind, store_row, staging=None, store_path=None):
    """Record an intent of this process (committed at once unless called
    inside a transaction, as `delete` is); returns its id."""
    now = utcnow()
    with write_transaction():
        return StoreIntent.insert(kind=kind, store=store_row, staging=staging,
                                  store_path=store_path, owner=this_process(), heartbeat=now,
                                  created=now).execute()


def end(intent_id):
    """Remove a settled intent (inside the caller's transaction, if any)."""
    with write_transaction():
        StoreIntent.delete().where(StoreIntent.id == intent_id).execute()


def note(intent_id, detail):
    """Keep JSON-able `detail` with an intent, for its settling."""
    with write_transaction():
        (StoreIntent.update(detail=json.dumps(detail))
         .where(StoreIntent.id == intent_id).execute())


def detail_of(intent):
    return json.loads(intent.detail) if intent.detail else None


def deleting(store_row, store_path):
    """Whether a deletion of the instance at `store_path` is in flight."""
    return StoreIntent.select().where(
        (StoreIntent.store == store_row) & (StoreIntent.kind == "delete")
        & (StoreIntent.store_path == store_path)).exists()


def abandon(intent_id):
    """Hand an intent that this live process cannot settle (a store host
    gone quiet mid-undo) to the next `settle`, of any process."""
    with write_transaction():
        StoreIntent.update(owner="").where(StoreIntent.id == intent_id).execute()


def owner_is_gone(intent, now=None):
    """Whether nobody will settle `intent` but `settle`: see the module
    docstring."""
    return is_gone(intent.owner, intent.heartbeat, now)


def is_gone(owner, heartbeat, now=None):
    """Whether the process `owner` ("host:pid:start") is gone: on this host
    its process has ended; on another, `heartbeat` (its last sign of life)
    is older than the lease. No owner counts as gone."""
    if not owner:
        return True
    if owner.split(":", 1)[0] == socket.gethostname():
        return process_is_gone(owner)
    now = now or utcnow()
    return heartbeat < now - datetime.timedelta(seconds=LEASE_SECONDS)


# What else `heartbeat` renews: functions called in its transaction (the
# resumable uploads this process is writing register theirs: `uploads`).
RENEWALS = []


def heartbeat():
    """Renew the lease of this process's intents, and run `RENEWALS`."""
    with write_transaction():
        (StoreIntent.update(heartbeat=utcnow())
         .where(StoreIntent.owner == this_process()).execute())
        for renew in RENEWALS:
            renew()


def dead(store_row):
    """The intents on a store whose owner is gone, in settling order."""
    found = [i for i in StoreIntent.select().where(StoreIntent.store == store_row)
             if owner_is_gone(i)]
    return sorted(found, key=lambda i: (ORDER.index(i.kind), i.id))


def held_folders(store_row):
    """The staging folders on a store that intents hold: a live process's,
    or a dead one's that could not be settled yet (read after the staging
    area is listed: an intent is always recorded before its folder is
    made)."""
    held = set()
    for i in StoreIntent.select().where((StoreIntent.store == store_row)
                                       & StoreIntent.staging.is_null(False)):
        held.add(posixpath.dirname(i.staging) if i.kind == "commit" else i.staging)
    return held


def start_heartbeat(stop, settle_all=None):
    """A daemon thread that renews this process's leases every
    HEARTBEAT_SECONDS and, if given, calls `settle_all()` every
    SETTLE_SECONDS, until `stop` (an Event) is set."""
    from models import db

    def loop():
        ticks = 0
        while not stop.wait(HEARTBEAT_SECONDS):
            ticks += 1
            try:
                with db.connection_context():
                    heartbeat()
                    if settle_all and ticks % max(1, int(SETTLE_SECONDS / HEARTBEAT_SECONDS)) == 0:
                        settle_all()
            except Exception as e:  # the database away for a while: try again later
                log.warning("intent heartbeat: %s", e)

    thread = threading.Thread(target=loop, daemon=True, name="librarian-intents")
    thread.start()
    return thread
