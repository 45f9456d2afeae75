"""The deletion interlock: instances are removed only where their policy
allows it.

Every FileInstance carries a `deletion_policy`, `disallowed` unless someone
with read-write level changed it. `delete_instances` removes only `allowed`
instances (optionally only those on one store): the policy is re-checked
under a lock in the transaction that takes the instance out of the
catalogue and records a delete intent; the bytes go after it, and a crash
or a store gone quiet meanwhile leaves the intent, which a settle finishes
(`stores.StoreAccess.delete`). So the catalogue never names bytes that are
gone, and no bytes stay unaccounted for. `noop` mode reports what would
happen and changes nothing. Every change writes a FileEvent.
"""

import logging

from models import (DELETION_ALLOWED, DELETION_POLICY_NAMES, File, FileEvent, FileInstance,
                    LibrarianError, Store, is_postgres, write_transaction)
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
    """Delete the instances of `file_name` whose policy is `allowed` (only
    on `restrict_to_store` if given). Returns `{n_deleted, n_kept,
    n_error}`. Raises `LibrarianError(400)` on a bad mode or unknown
    store."""
    check_request(mode, restrict_to_store)
    stats = {"n_deleted": 0, "n_kept": 0, "n_error": 0}
    for inst in list(_instances(file_name)):
        if restrict_to_store is not None and inst.store.name != restrict_to_store:
            stats["n_kept"] += 1
            continue
        stats[_delete_one(ctx, inst, mode)] += 1
    return stats


def _delete_one(ctx, inst, mode):
    """Delete one instance if, at this moment, its policy allows it.

    The interlock. Be very careful changing this: it is what stands between
    a typo and the loss of the archive. The policy is read again under a
    lock (row lock on PostgreSQL, the write lock on SQLite) in the
    transaction that removes the record, so a concurrent change to
    `disallowed` either happens before (and is obeyed) or after the
    instance is out of the catalogue. Returns the name of the counter to
    increment."""
    store = ctx.open_store(inst.store)
    where = ((FileInstance.store == inst.store) & (FileInstance.parent_dirs == inst.parent_dirs)
             & (FileInstance.file == inst.name))
    current = FileInstance.get_or_none(where)
    if current is None:
        return "n_deleted"  # removed meanwhile by someone else: it is gone either way
    if current.deletion_policy != DELETION_ALLOWED:
        return "n_kept"
    if mode == "noop":
        log.info("noop deletion would remove %s on store %s", inst.store_path, inst.store.name)
        return "n_deleted"
    outcome = []

    def unrecord():
        current = FileInstance.select().where(where)
        if is_postgres():
            current = current.for_update()
        current = current.first()
        if current is None:  # removed meanwhile by someone else: it is gone either way
            outcome.append("n_deleted")
            return False
        if current.deletion_policy != DELETION_ALLOWED:
            outcome.append("n_kept")
            return False
        FileInstance.delete().where(where).execute()
        FileEvent.record(inst.name, "delete_instance",
                         {"store_name": inst.store.name, "parent_dirs": inst.parent_dirs})
        outcome.append("n_deleted")
        return True

    try:
        store.delete(inst.store_path, unrecord)
    except (OSError, LibrarianError) as e:
        log.warning("cannot delete %s on store %s: %s", inst.store_path, inst.store.name, e)
        return "n_error"
    return outcome[0]
