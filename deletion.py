"""The deletion interlock: instances are removed only where their policy
allows it and the file is safe elsewhere.

Every FileInstance carries a `deletion_policy`, `disallowed` unless someone
with read-write level changed it. `delete_instances` removes only `allowed`
instances (optionally only those on one store): the policy is re-checked
under a lock in the transaction that takes the instance out of the
catalogue and records a delete intent; the bytes go after it, and a crash
or a store gone quiet meanwhile leaves the intent, which a settle finishes
(`stores.StoreAccess.delete`). So the catalogue never names bytes that are
gone, and no bytes stay unaccounted for. `noop` mode reports what would
happen and changes nothing. Every change writes a FileEvent.

Safe elsewhere: an instance is deleted only while the file has at least
`[librarian] deletion_min_other_copies` other good copies (`other_copies`):
instances in service on other stores here (their bytes looked at first),
and copies other Librarians verified (`remotes`) within
`remote_verify_max_age_days` (older ones are verified again by their
Librarian first) and confirm when asked, except the copy the file came
from (two Librarians each counting the other could both delete). With the default, 1, the last
good copy known anywhere is never deleted; 0 is the original's rule (the
policy alone). The count is taken again under the same lock as the policy.
In `noop` mode every instance is reported with the action and its reason.
"""

import datetime

import logging

import integrity
import remotes
import tasks
from models import (DELETION_ALLOWED, DELETION_POLICY_NAMES, File, FileEvent, FileInstance,
                    LibrarianError, RemoteInstance, Store, utcnow,
                    write_transaction)
from ingest import policy_code

log = logging.getLogger("librarian")

MODES = ("standard", "noop")


def _instances(file_name, restrict_to_store=None):
    query = (FileInstance.select(FileInstance, Store).join(Store)
             .where(FileInstance.file == file_name))
    if restrict_to_store is not None:
        query = query.where(Store.name == restrict_to_store)
    return query.order_by(Store.name, FileInstance.parent_dirs)


def _check_store_name(name):
    if name is not None:
        Store.by_name(name)


def check_request(mode, restrict_to_store):
    """400 on a mode other than `standard`/`noop` or an unknown store."""
    if mode not in MODES:
        raise LibrarianError(400, "mode must be 'standard' or 'noop', got %r" % (mode,))
    _check_store_name(restrict_to_store)


def set_one_policy(file_name, deletion_policy, restrict_to_store=None):
    """Set the deletion policy of one instance of `file_name` (the first by
    store name, or the one on `restrict_to_store`) and log an
    `instance_deletion_policy_changed` event. Raises `LibrarianError(400)`
    for an unknown file, store or policy, or a file with no such instance."""
    code = policy_code(deletion_policy)
    _check_store_name(restrict_to_store)
    with write_transaction():
        inst = _instances(file_name, restrict_to_store).first()
        if inst is None:
            if File.get_or_none(File.name == file_name) is None:
                raise LibrarianError(400, "no file named %r" % file_name)
            raise LibrarianError(400, "file %r has no instance%s" % (
                file_name, " on store %r" % restrict_to_store if restrict_to_store else ""))
        old = inst.deletion_policy
        (FileInstance.update(deletion_policy=code)
         .where((FileInstance.store == inst.store) & (FileInstance.parent_dirs == inst.parent_dirs)
                & (FileInstance.file == file_name)).execute())
        FileEvent.record(file_name, "instance_deletion_policy_changed",
                         {"store_name": inst.store.name, "parent_dirs": inst.parent_dirs,
                          "old_policy": DELETION_POLICY_NAMES[old],
                          "new_policy": deletion_policy})


def delete_instances(ctx, file_name, mode="standard", restrict_to_store=None):
    """Delete the instances of `file_name` whose policy is `allowed` and
    that are safe elsewhere (only on `restrict_to_store` if given). Returns
    `{n_deleted, n_kept, n_error}`, and in noop mode also `instances`: one
    `{store_name, store_path, action ("delete" or "keep"), reason}` each.
    Raises `LibrarianError(400)` on a bad mode or unknown store."""
    check_request(mode, restrict_to_store)
    stats, report = {"n_deleted": 0, "n_kept": 0, "n_error": 0}, []
    for inst in list(_instances(file_name)):
        if restrict_to_store is not None and inst.store.name != restrict_to_store:
            counter, reason = "n_kept", "not on store %s" % restrict_to_store
        else:
            counter, reason = _delete_one(ctx, inst, mode)
        stats[counter] += 1
        report.append({"store_name": inst.store.name, "store_path": inst.store_path,
                       "action": "delete" if counter == "n_deleted" else "keep",
                       "reason": reason})
    if mode == "noop":
        stats["instances"] = report
    elif stats["n_deleted"]:
        _after_deletion(ctx, file_name)
    return stats


def _after_deletion(ctx, file_name):
    """Once the last instance of a file here is gone, tell the Librarians
    that may have recorded our copy (`remotes.notify_peers`)."""
    if not FileInstance.select().where(FileInstance.file == file_name).exists():
        remotes.notify_peers(ctx, File.get_by_id(file_name))


def other_copies(ctx, inst, confirmed=()):
    """The good copies of `inst`'s file other than `inst`, as labels
    ("store S", "Librarian L"): instances in service on other stores here,
    and the copies of the Librarians named in `confirmed` (what
    `check_other_copies` found) that are still recorded. Call under the
    deletion lock."""
    local = (FileInstance.select(Store.name).join(Store)
             .where((FileInstance.file == inst.name) & (FileInstance.store != inst.store_id)
                    & FileInstance.in_service()).distinct().tuples())
    remote = (RemoteInstance.select(RemoteInstance.librarian)
              .where((RemoteInstance.file == inst.name)
                     & RemoteInstance.librarian.in_(list(confirmed))).tuples())
    return ["store " + name for (name,) in local] + ["Librarian " + n for (n,) in remote]


def check_other_copies(ctx, inst, needed):
    """Before the deletion's transaction (these are reads of other stores
    and calls to other Librarians): look at the bytes of the file's other
    instances here (there, with the record's size: else recorded missing
    or corrupt) and, if those are too few, ask the Librarians holding
    copies (`remotes.counted_for_deletion`, stale verifications redone
    first). Returns the names of the Librarians whose copies count."""
    file = File.get_by_id(inst.name)
    others = (FileInstance.select(FileInstance, Store).join(Store)
              .where((FileInstance.file == inst.name) & (FileInstance.store != inst.store_id)
                     & FileInstance.in_service()))
    good_here = 0
    for other in others:
        good_here += integrity.still_there(ctx, other, file)
    if good_here >= needed:
        return []
    fresh = utcnow() - datetime.timedelta(
        days=ctx.settings.librarian["remote_verify_max_age_days"])
    for rinst in RemoteInstance.select().where((RemoteInstance.file == inst.name)
                                               & (RemoteInstance.origin == False)  # noqa: E712
                                               & (RemoteInstance.verified_at < fresh)):
        if rinst.librarian in ctx.settings.connections:
            remotes.reverify(ctx, rinst)
    return remotes.counted_for_deletion(ctx, file, fresh)


def _unsafe(ctx, current, needed, confirmed):
    """Why the instance `current` may not be deleted now (None: it may),
    with `needed` other good copies, `confirmed` the Librarians whose
    copies count."""
    if current.deletion_policy != DELETION_ALLOWED:
        return "its deletion policy is disallowed"
    others = other_copies(ctx, current, confirmed) if needed else []
    if len(others) < needed:
        if not others and current.verify_result not in (None, "ok"):
            return "no good copy of the file is known anywhere (this one is %s)" \
                % current.verify_result
        if not others:
            return "it is the last good copy known anywhere"
        return "only %d other good copies (%s); [librarian] deletion_min_other_copies " \
               "asks for %d" % (len(others), ", ".join(others), needed)
    return None


def _delete_one(ctx, inst, mode, needed=None):
    """Delete one instance if, at this moment, its policy allows it and
    the file is safe elsewhere.

    The interlock. Be very careful changing this: it is what stands between
    a typo and the loss of the archive. The policy and the other copies are
    read again under a lock (row lock on PostgreSQL, the write lock on
    SQLite) in the transaction that removes the record, so a concurrent
    change to `disallowed` (or the loss of another copy) either happens
    before (and is obeyed) or after the instance is out of the catalogue.
    Returns (the name of the counter to increment, the reason)."""
    store = ctx.open_store(inst.store)
    where = FileInstance.key(inst)
    current = FileInstance.get_or_none(where)
    if current is None:  # removed meanwhile by someone else: it is gone either way
        return "n_deleted", "already deleted"
    if needed is None:
        needed = ctx.settings.librarian["deletion_min_other_copies"]
    confirmed = []
    if current.deletion_policy == DELETION_ALLOWED and needed:
        confirmed = check_other_copies(ctx, current, needed)
    reason = _unsafe(ctx, current, needed, confirmed)
    if reason is not None:
        return "n_kept", reason
    if mode == "noop":
        log.info("noop deletion would remove %s on store %s", inst.store_path, inst.store.name)
        return "n_deleted", "allowed, and safe elsewhere"
    outcome = []

    def unrecord():
        File.lock(inst.name)
        current = FileInstance.get_or_none(where)
        if current is None:  # removed meanwhile by someone else: it is gone either way
            outcome.append(("n_deleted", "already deleted"))
            return False
        reason = _unsafe(ctx, current, needed, confirmed)
        if reason is not None:
            outcome.append(("n_kept", reason))
            return False
        FileInstance.delete().where(where).execute()
        FileEvent.record(inst.name, "delete_instance",
                         {"store_name": inst.store.name, "parent_dirs": inst.parent_dirs})
        outcome.append(("n_deleted", "deleted"))
        return True

    try:
        store.delete(inst.store_path, unrecord)
    except (OSError, LibrarianError) as e:
        log.warning("cannot delete %s on store %s: %s", inst.store_path, inst.store.name, e)
        return "n_error", str(e)
    return outcome[0]


# -- rolling deletion ----------------------------------------------------------

def rolling(ctx, name, mode=None, limit=10000):
    """Run the rolling deletion `[rolling_deletion:NAME]`: on its store,
    delete instances of files registered more than `older_than_days` ago
    that have at least `min_other_copies` other good copies (never fewer
    than `deletion_min_other_copies` asks), oldest first, at most `limit`;
    through the interlock, so the policy and the other copies are checked
    under the lock as for every deletion. `mode` (default: the section's
    `noop` setting) "noop" only reports. Returns `{store, mode, instances:
    [{name, store_path, action, reason}], n_deleted, n_kept, n_error}`."""
    spec = ctx.settings.rolling_deletions[name]
    mode = mode or ("noop" if spec["noop"] else "standard")
    needed = max(spec["min_other_copies"], ctx.settings.librarian["deletion_min_other_copies"])
    cutoff = utcnow() - datetime.timedelta(days=spec["older_than_days"])
    store = Store.by_name(spec["store"])
    query = (FileInstance.select(FileInstance, Store).join(Store).switch(FileInstance)
             .join(File).where((FileInstance.store == store) & (File.create_time < cutoff)
                               & (FileInstance.deletion_policy == DELETION_ALLOWED))
             .order_by(File.create_time, File.name).limit(limit))
    report = {"store": store.name, "mode": mode, "instances": [],
              "n_deleted": 0, "n_kept": 0, "n_error": 0}
    for inst in list(query):
        counter, reason = _delete_one(ctx, inst, mode, needed)
        report[counter] += 1
        report["instances"].append({"name": inst.name, "store_path": inst.store_path,
                                    "action": "delete" if counter == "n_deleted" else "keep",
                                    "reason": reason})
        if counter == "n_deleted" and mode != "noop":
            _after_deletion(ctx, inst.name)
    return report


@tasks.handler("rolling_deletion")
def rolling_task(ctx, task, args):
    """One run of a rolling deletion; the next is queued after its
    `every_hours` when it ends (one that fails for good is started again by
    `schedule_rolling`). A section removed from the configuration ends its
    chain."""
    if args["name"] not in ctx.settings.rolling_deletions:
        return
    report = rolling(ctx, args["name"])
    log.info("rolling deletion %s (%s) on store %s: %d deleted, %d kept, %d errors",
             args["name"], report["mode"], report["store"], report["n_deleted"],
             report["n_kept"], report["n_error"])
    task.remember(report={k: v for k, v in report.items() if k != "instances"})
    with write_transaction():
        tasks.enqueue(ctx, "rolling_deletion", args, delay=max(60.0, 3600.0 * ctx.settings
                      .rolling_deletions[args["name"]]["every_hours"]))


def schedule_rolling(ctx):
    """Make sure each configured rolling deletion has a run queued."""
    active = {args.get("name") for args in tasks.active_args("rolling_deletion")}
    for name, spec in ctx.settings.rolling_deletions.items():
        if name not in active:
            with write_transaction():
                tasks.enqueue(ctx, "rolling_deletion", {"name": name},
                              delay=3600.0 * spec["every_hours"])
