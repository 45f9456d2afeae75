"""Offload: move a store's sole copies to another store of this Librarian.

`launch(source, dest)` answers `store-shut-down` (and marks the source
unavailable) when every file on the source also has an instance elsewhere;
otherwise it queues an `offload` task for the instances that exist only on
the source, up to `BATCH`, and answers `task-launched` with their count.
The task copies each into the destination's staging area, checks its MD5
against the File record, registers the new instance (bytes moved into place
in the same transaction, as for uploads) and marks the source instance
deletable, with an `instance_deletion_policy_changed` event whose context
is "offload". Deleting the source copies stays a separate, deliberate step
(`delete_file_instances`).
"""

import json
import posixpath

import ingest
import integrity
import tasks
from models import (DELETION_ALLOWED, File, FileEvent, FileInstance, LibrarianError, Store,
                    write_transaction)
from errors import Corrupt, NotFound, is_retryable

BATCH = 1000


def sole_instances(source):
    """Instances on `source` (a Store row) of files with no other instance."""
    return (FileInstance.select(FileInstance, File).join(File)
            .where((FileInstance.store == source) & (File.num_instances == 1))
            .order_by(FileInstance.file))


def launch(ctx, source_name, dest_name):
    """See the module docstring; returns the reply fields."""
    if source_name == dest_name:
        raise LibrarianError(400, "source and destination are the same store")
    source, dest = Store.by_name(source_name), Store.by_name(dest_name)
    if not ctx.open_store(dest).is_reachable():
        raise LibrarianError(400, "destination store %r is not reachable" % dest_name)
    running = tasks.Task.select().where(
        (tasks.Task.kind == "offload") & tasks.Task.state.in_(("pending", "running"))
        & tasks.Task.args.contains('"source": %s' % json.dumps(source_name)))
    if running.exists():
        raise LibrarianError(409, "an offload of store %r is already queued or running"
                             % source_name)
    count = min(sole_instances(source).count(), BATCH)
    if count == 0:
        with write_transaction():
            Store.update(available=False).where(Store.id == source.id).execute()
        return {"outcome": "store-shut-down"}
    tasks.enqueue(ctx, "offload", {"source": source_name, "dest": dest_name, "batch": BATCH})
    return {"outcome": "task-launched", "instance-count": count}


def copy_into_staging(src_store, src_path, dest_store, name):
    """Copy a file or tree of `src_store` into a fresh staging dir of
    `dest_store` (either may be on another host); returns (staging dir,
    staged path, (size, md5) of the bytes read)."""
    staging = dest_store.new_staging_dir()
    staged = posixpath.join(staging, name)
    try:
        read = src_store.copy_to(src_path, dest_store, staged)
    except BaseException:
        dest_store.release(staging)
        raise
    return staging, staged, read


@tasks.handler("offload")
def offload_task(ctx, task, args):
    """Copy, verify, register, mark deletable; one instance at a time."""
    source, dest = Store.by_name(args["source"]), ctx.open_store(Store.by_name(args["dest"]))
    done, errors, transient = 0, [], None
    for inst in list(sole_instances(source).limit(args["batch"])):
        try:
            offload_one(ctx, source, dest, inst)
            done += 1
            task.report(done)
        except (OSError, LibrarianError) as e:  # one bad instance must not stop the rest
            errors.append("%s: %s" % (inst.name, e))
            if is_retryable(e):
                transient = e
    if transient is not None:
        # A store could not be reached: the task is retried after its back-off
        # and goes on with what is still on the source alone.
        raise transient
    if errors:
        raise tasks.Permanent("%d instance(s) not offloaded: %s" % (len(errors),
                                                                   "; ".join(errors[:20])))


def offload_one(ctx, source, dest, inst):
    """Copy one instance to `dest`, verify, register, mark the source
    instance deletable."""
    src_store = ctx.open_store(source)
    src_path = src_store.resolve(inst.store_path)
    if not src_store.exists_at(src_path):
        raise NotFound("the bytes of %s are missing on store %s" % (inst.store_path,
                                                                    source.name))
    staging, staged, read = copy_into_staging(src_store, src_path, dest, inst.name)
    try:
        integrity.check_copy(ctx, inst, read, "offload")  # the source read true
        size, md5 = dest.checksum(staged)  # and the copy was written true
        if (size, md5) != (inst.file.size, inst.file.md5):
            raise Corrupt("the copy of %s from store %s has size %d md5 %s, not %d %s as "
                          "recorded" % (inst.name, source.name, size, md5, inst.file.size,
                                        inst.file.md5))
        ingest.register_staged(dest, staged, inst.store_path, source=inst.file.source,
                               meta_mode="direct", size=size, md5=md5, another_copy=True)
    finally:
        dest.release(staging)
    with write_transaction():
        (FileInstance.update(deletion_policy=DELETION_ALLOWED)
         .where((FileInstance.store == source) & (FileInstance.parent_dirs == inst.parent_dirs)
                & (FileInstance.file == inst.name)).execute())
        FileEvent.record(inst.name, "instance_deletion_policy_changed",
                         {"store_name": source.name, "parent_dirs": inst.parent_dirs,
                          "old_policy": "disallowed", "new_policy": "allowed",
                          "context": "offload"})
