"""Local-disk staging: copying the files a search matches to a directory
people can work in.

`launch(search_text, user, subdir)` resolves the destination
`dest_prefix/USER/SUBDIR` (it must stay inside `[staging] dest_prefix`,
symbolic links included), takes its lock by creating `STAGING-IN-PROGRESS`
(a second staging into the same place is refused while one runs), and
queues a `stage` task. The task copies one local instance of each matching
file into the destination and finishes by replacing the lock with
`STAGING-SUCCEEDED`, or with `STAGING-ERRORS` listing one error per line.
"""

import os
import re

import peewee as pw

import search
import tasks
from models import File, LibrarianError
from stores import LocalFS, copy_tree, present_instance

IN_PROGRESS, SUCCEEDED, ERRORS = "STAGING-IN-PROGRESS", "STAGING-SUCCEEDED", "STAGING-ERRORS"
USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_settings = None


def configure(settings):
    global _settings
    _settings = settings


def destination(user, subdir):
    """The absolute destination for `user` and `subdir`; 400 when staging is
    not configured, or the user name or subdir is bad, or it resolves
    outside `dest_prefix`."""
    prefix = _settings.staging["dest_prefix"] if _settings else None
    if not prefix:
        raise LibrarianError(400, "staging is not configured on this Librarian ([staging] "
                             "dest_prefix)")
    if not isinstance(user, str) or not USER_RE.match(user):
        raise LibrarianError(400, "stage_user %r must be a plain name" % (user,))
    if not isinstance(subdir, str) or subdir.startswith("/") or "\0" in subdir \
            or ".." in subdir.split("/"):
        raise LibrarianError(400, "stage_dest %r must be a relative path without '..'"
                             % (subdir,))
    root = os.path.realpath(prefix)
    dest = os.path.realpath(os.path.join(root, user, subdir))
    if dest != root and not dest.startswith(root + os.sep):
        raise LibrarianError(400, "stage_dest %r resolves outside the staging area" % subdir)
    return dest


def totals(search_text):
    """(number of files with an instance here, their bytes) for a search."""
    q = search.file_query(search_text).where(File.num_instances > 0).order_by()
    n, size = q.select(pw.fn.COUNT(pw.SQL("*")), pw.fn.COALESCE(pw.fn.SUM(File.size), 0)) \
        .tuples().get()
    return int(n), int(size)


def launch(search_text, user, subdir):
    """Check, lock and queue a staging; returns `{destination, n_instances,
    n_bytes}`. 400 on bad input, 409 when a staging into it is running."""
    dest = destination(user, subdir)
    n, size = totals(search_text)
    os.makedirs(dest, exist_ok=True)
    try:
        _write_marker(dest, IN_PROGRESS, "")
    except FileExistsError:
        raise LibrarianError(409, "a staging into %s is in progress" % dest) from None
    for marker in (SUCCEEDED, ERRORS):
        if os.path.lexists(os.path.join(dest, marker)):  # links included
            os.unlink(os.path.join(dest, marker))
    tasks.enqueue("stage", {"search": search_text, "destination": dest, "user": user,
                            "subdir": subdir}, max_attempts=1)
    return {"destination": dest, "n_instances": n, "n_bytes": size}


def _write_marker(dest, name, text):
    """Create a marker file, never through a symbolic link, never over an
    existing entry (FileExistsError)."""
    fd = os.open(os.path.join(dest, name),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


@tasks.handler("stage")
def stage_task(task, args):
    """Copy each matching file's first present local instance; finish with
    the marker files."""
    dest = args["destination"]
    if destination(args["user"], args["subdir"]) != dest:
        # The folder was swapped (for a link) since the launch: stage nothing.
        raise tasks.Permanent("%s no longer resolves to itself inside the staging area" % dest)
    errors, copied = [], 0
    try:
        for f in search.file_query(args["search"]).where(File.num_instances > 0):
            target = os.path.join(dest, f.name)
            try:
                if os.path.lexists(target):
                    raise FileExistsError("%s exists already" % target)
                _, store, present = present_instance(f.name)
                if present is None:
                    raise FileNotFoundError("no instance of %s is present here" % f.name)
                copy_tree(store.fs, present, LocalFS(), target)
                copied += f.size
                task.report(copied)
            except (OSError, LibrarianError) as e:
                errors.append("%s: %s" % (f.name, e))
    finally:
        finish(dest, errors)


def finish(dest, errors):
    """Replace the lock by the outcome's marker."""
    for marker in (SUCCEEDED, ERRORS):
        if os.path.lexists(os.path.join(dest, marker)):
            os.unlink(os.path.join(dest, marker))
    _write_marker(dest, ERRORS if errors else SUCCEEDED,
                  "".join(line.replace("\n", " ") + "\n" for line in errors))
    if os.path.lexists(os.path.join(dest, IN_PROGRESS)):
        os.unlink(os.path.join(dest, IN_PROGRESS))


@tasks.on_cancel("stage")
def stage_cancelled(args):
    """A cancelled staging releases its folder, saying so."""
    if os.path.isdir(args["destination"]) and not os.path.islink(args["destination"]):
        finish(args["destination"], ["cancelled before it ran"])
