"""Local-disk staging: copying the files a search matches to a directory
people can work in.

`launch(search_text, user, stage_dest)` resolves the destination: an
absolute `stage_dest` (what the deployed client sends: the resolved path of
a folder) must lie inside `[staging] dest_prefix`; a relative one means
`dest_prefix/USER/stage_dest`. Symbolic links are resolved first, so that
nothing lands outside the prefix. It takes the destination's lock by
creating `STAGING-IN-PROGRESS` (a second staging into the same place is
refused while one runs) and queues a `stage` task. The task copies one
present instance of each matching file to `DEST/<parent_dirs>/<name>`
(keeping the store's folders, as the original's pipelines expect), makes
what it created group-writable (folders also setgid, as the original did),
runs `[staging] chown_command -u USER -R -d DEST` when one is configured,
and finishes by replacing the lock with `STAGING-SUCCEEDED` (holding the
finishing time, Unix seconds) or with `STAGING-ERRORS` listing one error per
line.
"""

import hashlib
import os
import posixpath
import pwd
import re
import shutil
import signal
import stat
import subprocess
import threading
import time

import peewee as pw

import integrity
import search
import tasks
from errors import Corrupt
from librarian_client import directory_digest
from models import File, LibrarianError, StagingDestination, utcnow, write_transaction
from stores import CHUNK, is_inside

IN_PROGRESS, SUCCEEDED, ERRORS = "STAGING-IN-PROGRESS", "STAGING-SUCCEEDED", "STAGING-ERRORS"
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
GROUP_WRITABLE = stat.S_IWUSR | stat.S_IWGRP
GROUP_FOLDER = GROUP_WRITABLE | stat.S_IXUSR | stat.S_IXGRP | stat.S_ISGID
def destination(ctx, user, stage_dest):
    """The resolved absolute destination for `user` and `stage_dest`; 400
    when staging is not configured, the user name is not a plain name, or
    the destination is not below `dest_prefix`."""
    prefix = ctx.settings.staging["dest_prefix"]
    if not prefix:
        raise LibrarianError(400, "staging is not configured on this Librarian ([staging] "
                             "dest_prefix)")
    if not isinstance(user, str) or not USER_RE.match(user):
        raise LibrarianError(400, "stage_user %r must be a plain name" % (user,))
    if not isinstance(stage_dest, str) or "\0" in stage_dest \
            or ".." in stage_dest.split("/"):
        raise LibrarianError(400, "stage_dest %r must be a path without '..'" % (stage_dest,))
    root = os.path.realpath(prefix)
    if stage_dest.startswith("/"):
        dest = os.path.realpath(stage_dest)
    else:
        dest = os.path.realpath(os.path.join(root, user, stage_dest))
    if dest == root or not is_inside(dest, root):
        raise LibrarianError(400, "stage_dest %r resolves to %s, which is not a folder inside "
                             "the staging area %s" % (stage_dest, dest, root))
    return dest


def open_folder(ctx, path, create=False):
    """A descriptor of the folder `path` (absolute, inside the staging
    prefix), reached one name at a time from the prefix without following
    any link, so that a link planted in a shared folder never leads a copy
    elsewhere; with `create`, missing folders are made, group-writable and
    setgid (the people staging share them). Raises OSError (ELOOP or
    ENOTDIR where a link or a file is met)."""
    root = os.path.realpath(ctx.settings.staging["dest_prefix"])
    os.makedirs(root, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for name in ([] if path == root else os.path.relpath(path, root).split(os.sep)):
        fd = enter(fd, name, create)
    return fd


def enter(fd, name, create):
    """The descriptor of the folder `name` in the folder `fd` (closed),
    made if missing with `create`."""
    try:
        made = False
        if create:
            try:
                os.mkdir(name, 0o777, dir_fd=fd)
                made = True
            except FileExistsError:
                pass
        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
    finally:
        os.close(fd)
    if made:
        share(sub, GROUP_FOLDER)
    return sub


def share(fd, bits):
    """Add mode `bits` to an open file or folder we made."""
    os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | bits)


def copy_into(store, src, folder_fd, name):
    """Copy the file or tree `src` of `store` (a `stores.StoreAccess`) as
    the new entry `name` of the folder open as `folder_fd`, group-writable,
    never through a link; iteratively (one open folder per level). Returns
    (size, md5) of the bytes read, by the shared definition. Raises
    OSError (FileExistsError when `name` exists) or LibrarianError (400)
    for a link or special file in the tree."""
    stack = []  # (source folder, its copy's fd, its remaining entries)
    hashes, total = [], 0

    def enter_copy(path, st, parent, entry):
        nonlocal total
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(entry, 0o777, dir_fd=parent)
            fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
            stack.append((path, fd, iter(store.listdir(path))))
            share(fd, GROUP_FOLDER)
        elif stat.S_ISREG(st.st_mode):
            size, md5 = _copy_file(store, path, parent, entry)
            total += size
            hashes.append((posixpath.relpath(path, src), md5))
        else:
            raise LibrarianError(400, "%s is a link or special file" % path)

    top = store.stat(src)
    is_dir = stat.S_ISDIR(top.st_mode)
    try:
        enter_copy(src, top, folder_fd, name)
        while stack:
            path, fd, entries = stack[-1]
            child = next(entries, None)
            if child is None:
                os.close(fd)
                stack.pop()
                continue
            enter_copy(posixpath.join(path, child[0]), child[1], fd, child[0])
    finally:
        for _, fd, _ in stack:
            os.close(fd)
    if not is_dir:
        return total, hashes[0][1]
    return total, directory_digest(hashes)


def remove_entry(folder_fd, name):
    """Remove the file or tree `name` of the folder open as `folder_fd`,
    never following a link (shutil.rmtree with dir_fd)."""
    if stat.S_ISDIR(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode):
        shutil.rmtree(name, dir_fd=folder_fd)
    else:
        os.unlink(name, dir_fd=folder_fd)


def _copy_file(store, path, folder_fd, name):
    out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666,
                  dir_fd=folder_fd)
    digest, size = hashlib.md5(), 0
    with os.fdopen(out, "wb") as f, store.open_read(path) as data:
        share(out, GROUP_WRITABLE)
        for chunk in iter(lambda: data.read(CHUNK), b""):
            digest.update(chunk)
            f.write(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def totals(search_text):
    """(number of files with an instance here, their bytes) for a search."""
    q = search.file_query(search_text).where(File.num_instances > 0).order_by()
    n, size = q.select(pw.fn.COUNT(pw.SQL("*")), pw.fn.COALESCE(pw.fn.SUM(File.size), 0)) \
        .tuples().get()
    return int(n), int(size)


def launch(ctx, search_text, user, stage_dest, source):
    """Check, lock and queue a staging for the caller `source` (a
    models.Source); returns `{destination, n_instances, n_bytes}`. 400 on
    bad input, 403 when another source's staging made the destination or
    a folder above it, 409 when a staging into it is running."""
    dest = destination(ctx, user, stage_dest)
    claim_destination(dest, source, ctx.settings.staging["dest_prefix"])
    if ctx.settings.staging["chown_command"]:
        check_user_may_have(dest, user)
    with search.limited_by(ctx.settings, source.name):  # the caller's search, as any other
        n, size = totals(search_text)
    fd = open_folder(ctx, dest, create=True)
    try:
        try:
            _write_marker(fd, IN_PROGRESS, "%r\n" % time.time())
        except FileExistsError:
            raise LibrarianError(409, "a staging into %s is in progress" % dest) from None
        _remove_markers(fd, (SUCCEEDED, ERRORS))
    finally:
        os.close(fd)
    tasks.enqueue(ctx, "stage", {"search": search_text, "destination": dest, "user": user,
                                 "subdir": stage_dest}, max_attempts=1)
    return {"destination": dest, "n_instances": n, "n_bytes": size}


def claim_destination(dest, source, prefix):
    """Record `dest` as `source`'s, unless it, a folder above it (below
    the prefix) or one inside it is another source's (403; an admin may
    stage anywhere)."""
    root = os.path.realpath(prefix)
    above, path = [], dest
    while path != root and is_inside(path, root):
        above.append(path)
        path = os.path.dirname(path)
    with write_transaction():
        owners = {r.path: r.source for r in StagingDestination.select().where(
            StagingDestination.path.in_(above)
            | StagingDestination.path.startswith(dest.rstrip("/") + "/"))}
        others = [p for p, s in owners.items() if s != source.name]
        if others and not source.allows("admin"):
            raise LibrarianError(403, "%s was made by the staging of another source (%s); "
                                 "stage into a folder of your own" % (dest, owners[others[0]]))
        if dest not in owners:
            StagingDestination.insert(path=dest, source=source.name, created=utcnow()) \
                .on_conflict_ignore().execute()


def check_user_may_have(dest, user):
    """With a chown_command, the copies are handed to `user` (which the
    caller only claims): refuse (400) a user this system does not know,
    and a destination that exists and belongs to someone else, whose files
    would be handed over too."""
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        raise LibrarianError(400, "stage_user %r is not a user of this system, to whom the "
                             "staged copies could be given" % user) from None
    try:
        owner = os.lstat(dest).st_uid
    except FileNotFoundError:
        return
    if owner != uid:
        raise LibrarianError(400, "%s belongs to another user than %s; stage into a folder of "
                             "your own, or a new one" % (dest, user))


def _write_marker(dest_fd, name, text):
    """Create a marker file in the folder `dest_fd`, never through a
    symbolic link, never over an existing entry (FileExistsError)."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o664,
                 dir_fd=dest_fd)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


def _remove_markers(dest_fd, names):
    for name in names:
        try:
            os.unlink(name, dir_fd=dest_fd)  # a link is removed, not followed
        except FileNotFoundError:
            pass


@tasks.handler("stage")
def stage_task(ctx, task, args):
    """Copy each matching file's first present instance to
    `DEST/<parent_dirs>/<name>`; hand the result to the user; finish with
    the marker files."""
    dest = args["destination"]
    try:
        if destination(ctx, args["user"], args["subdir"]) != dest:
            raise OSError("it resolves elsewhere now")
        fd = open_folder(ctx, dest)
    except (OSError, LibrarianError) as e:
        # The folder was swapped (for a link) since the launch: stage nothing.
        raise tasks.Permanent("%s is no longer a folder inside the staging area: %s"
                              % (dest, e)) from None
    errors, copied = [], 0
    try:
        for f in search.file_query(args["search"]).where(File.num_instances > 0):
            try:
                copied += stage_one(ctx, fd, f)
                task.report(copied)
            except (OSError, LibrarianError, RecursionError) as e:
                errors.append("%s: %s" % (f.name, e))
        if not errors:
            errors += hand_over(ctx, dest, fd, args["user"])
    finally:
        finish(fd, errors)
        os.close(fd)


def stage_one(ctx, dest_fd, file):
    """Copy a present instance of `file` into the folder `dest_fd`, at its
    store path, verified as it is read: a copy that does not match the
    record is removed, its instance marked corrupt, and the next instance
    tried. Returns its size. Raises OSError or LibrarianError (`Corrupt`
    when no instance reads true)."""
    while True:
        inst, store, present = ctx.stores.present_instance(file.name)
        if present is None:
            raise FileNotFoundError("no instance of %s is present here" % file.name)
        fd = os.dup(dest_fd)
        for name in filter(None, inst.parent_dirs.split("/")):
            fd = enter(fd, name, create=True)
        try:
            integrity.check_copy(ctx, inst, copy_into(store, present, fd, file.name), "staging")
            return file.size
        except FileExistsError:
            raise FileExistsError("%s exists already in the destination" % inst.store_path) \
                from None
        except Corrupt:
            remove_entry(fd, file.name)  # bytes that do not match are not handed to anyone
            if ctx.stores.present_instance(file.name)[0] is None:
                raise
        finally:
            os.close(fd)


def hand_over(ctx, dest, dest_fd, user):
    """Run `[staging] chown_command -u USER -R -d DEST` (as the original
    did), if configured, for at most `chown_timeout` seconds (it and what
    it started); returns error lines (with the head of what it printed).
    DEST must still be the folder staged into (`dest_fd`), reached without
    links: the command acts on the path."""
    command = ctx.settings.staging["chown_command"]
    if not command:
        return []
    try:
        fd = open_folder(ctx, dest)
        same = os.path.samestat(os.fstat(fd), os.fstat(dest_fd))
        os.close(fd)
    except OSError:
        same = False
    if not same:
        return ["%s is no longer the folder staged into: not handed over" % dest]
    argv = command + ["-u", user, "-R", "-d", dest]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        return ["cannot run %s: %s" % (argv[0], e)]
    head = []
    reader = threading.Thread(target=_keep_head, args=(proc.stdout, head), daemon=True)
    reader.start()
    try:
        code = proc.wait(ctx.settings.staging["chown_timeout"])
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # and whatever it started
        proc.wait()
        code = None
    reader.join(10)
    said = b"".join(head).decode("utf-8", "replace").strip()
    if code is None:
        return ["%s did not finish within %g s" % (posixpath.basename(argv[0]),
                                                   ctx.settings.staging["chown_timeout"])]
    if code != 0:
        return ["%s exited with %d: %s" % (posixpath.basename(argv[0]), code, said)]
    return []


def _keep_head(stream, head, limit=500):
    """Read `stream` to its end, keeping its first `limit` bytes."""
    kept = 0
    for chunk in iter(lambda: stream.read(65536), b""):
        if kept < limit:
            head.append(chunk[:limit - kept])
            kept += len(head[-1])
    stream.close()


def finish(dest_fd, errors):
    """Replace the lock by the outcome's marker: STAGING-ERRORS with one
    line per error, or STAGING-SUCCEEDED holding the finishing time."""
    _remove_markers(dest_fd, (SUCCEEDED, ERRORS))
    if errors:
        _write_marker(dest_fd, ERRORS, "".join(line.replace("\n", " ") + "\n"
                                               for line in errors))
    else:
        _write_marker(dest_fd, SUCCEEDED, "%r\n" % time.time())
    _remove_markers(dest_fd, (IN_PROGRESS,))


@tasks.on_cancel("stage")
def stage_cancelled(ctx, args):
    """A cancelled staging releases its folder, saying so."""
    try:
        fd = open_folder(ctx, args["destination"])
    except OSError:
        return  # gone, or swapped for a link: nothing of ours to release
    try:
        finish(fd, ["cancelled before it ran"])
    finally:
        os.close(fd)
