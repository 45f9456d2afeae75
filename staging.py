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

import os
import posixpath
import pwd
import re
import stat
import subprocess
import time

import peewee as pw

import search
import tasks
from models import File, LibrarianError
from stores import LocalFS, copy_tree, is_inside, present_instance

IN_PROGRESS, SUCCEEDED, ERRORS = "STAGING-IN-PROGRESS", "STAGING-SUCCEEDED", "STAGING-ERRORS"
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$")
GROUP_WRITABLE = stat.S_IWUSR | stat.S_IWGRP
GROUP_FOLDER = GROUP_WRITABLE | stat.S_IXUSR | stat.S_IXGRP | stat.S_ISGID
_settings = None


def configure(settings):
    global _settings
    _settings = settings


def destination(user, stage_dest):
    """The resolved absolute destination for `user` and `stage_dest`; 400
    when staging is not configured, the user name is not a plain name, or
    the destination is not below `dest_prefix`."""
    prefix = _settings.staging["dest_prefix"] if _settings else None
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


def make_folders(root, folder):
    """Create `folder` and its missing parents below `root`, each
    group-writable and setgid (so that the people staging share them)."""
    os.makedirs(root, exist_ok=True)
    parts = os.path.relpath(folder, root).split(os.sep)
    for i in range(1, len(parts) + 1):
        path = os.path.join(root, *parts[:i])
        try:
            os.mkdir(path)
        except FileExistsError:
            if i < len(parts) or os.path.islink(path) or not os.path.isdir(path):
                continue
        _add_mode(path, GROUP_FOLDER)


def _add_mode(path, bits):
    """Add mode `bits` to `path` (never through a link), where we may."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or stat.S_IMODE(st.st_mode) | bits == stat.S_IMODE(st.st_mode):
        return
    try:
        os.chmod(path, stat.S_IMODE(st.st_mode) | bits)
    except PermissionError:
        pass  # a folder someone else owns: theirs to share


def make_group_writable(path):
    """A staged copy is the user's to change: files u+w g+w, folders also
    u+x g+x and setgid."""
    _add_mode(path, GROUP_FOLDER if os.path.isdir(path) else GROUP_WRITABLE)
    for dirpath, dirnames, filenames in os.walk(path):
        for d in dirnames:
            _add_mode(os.path.join(dirpath, d), GROUP_FOLDER)
        for f in filenames:
            _add_mode(os.path.join(dirpath, f), GROUP_WRITABLE)


def totals(search_text):
    """(number of files with an instance here, their bytes) for a search."""
    q = search.file_query(search_text).where(File.num_instances > 0).order_by()
    n, size = q.select(pw.fn.COUNT(pw.SQL("*")), pw.fn.COALESCE(pw.fn.SUM(File.size), 0)) \
        .tuples().get()
    return int(n), int(size)


def launch(search_text, user, stage_dest):
    """Check, lock and queue a staging; returns `{destination, n_instances,
    n_bytes}`. 400 on bad input, 409 when a staging into it is running."""
    dest = destination(user, stage_dest)
    if _settings.staging["chown_command"]:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise LibrarianError(400, "stage_user %r is not a user of this system, to whom the "
                                 "staged copies could be given" % user) from None
    n, size = totals(search_text)
    make_folders(os.path.realpath(_settings.staging["dest_prefix"]), dest)
    try:
        _write_marker(dest, IN_PROGRESS, "%r\n" % time.time())
    except FileExistsError:
        raise LibrarianError(409, "a staging into %s is in progress" % dest) from None
    for marker in (SUCCEEDED, ERRORS):
        if os.path.lexists(os.path.join(dest, marker)):  # links included
            os.unlink(os.path.join(dest, marker))
    tasks.enqueue("stage", {"search": search_text, "destination": dest, "user": user,
                            "subdir": stage_dest}, max_attempts=1)
    return {"destination": dest, "n_instances": n, "n_bytes": size}


def _write_marker(dest, name, text):
    """Create a marker file, never through a symbolic link, never over an
    existing entry (FileExistsError)."""
    fd = os.open(os.path.join(dest, name),
                 os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o664)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)


@tasks.handler("stage")
def stage_task(task, args):
    """Copy each matching file's first present instance to
    `DEST/<parent_dirs>/<name>`; hand the result to the user; finish with
    the marker files."""
    dest = args["destination"]
    if destination(args["user"], args["subdir"]) != dest:
        # The folder was swapped (for a link) since the launch: stage nothing.
        raise tasks.Permanent("%s no longer resolves to itself inside the staging area" % dest)
    errors, copied = [], 0
    try:
        for f in search.file_query(args["search"]).where(File.num_instances > 0):
            try:
                copied += stage_one(dest, f)
                task.report(copied)
            except (OSError, LibrarianError) as e:
                errors.append("%s: %s" % (f.name, e))
        if not errors:
            errors += hand_over(dest, args["user"])
    finally:
        finish(dest, errors)


def stage_one(dest, file):
    """Copy a present instance of `file` under `dest`, at its store path;
    returns its size. Raises OSError or LibrarianError."""
    inst, store, present = present_instance(file.name)
    if present is None:
        raise FileNotFoundError("no instance of %s is present here" % file.name)
    folder = os.path.realpath(os.path.join(dest, *inst.parent_dirs.split("/")))
    if not is_inside(folder, dest):  # a link planted in the destination
        raise LibrarianError(400, "%s leads out of %s" % (inst.parent_dirs, dest))
    target = os.path.join(folder, file.name)
    if os.path.lexists(target):
        raise FileExistsError("%s exists already" % target)
    make_folders(dest, folder)
    copy_tree(store.fs, present, LocalFS(), target)
    make_group_writable(target)
    return file.size


def hand_over(dest, user):
    """Run `[staging] chown_command -u USER -R -d DEST` (as the original
    did), if configured; returns error lines."""
    command = _settings.staging["chown_command"] if _settings else None
    if not command:
        return []
    argv = command + ["-u", user, "-R", "-d", dest]
    try:
        subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, check=True, timeout=3600)
    except subprocess.CalledProcessError as e:
        return ["%s exited with %d: %s" % (posixpath.basename(argv[0]), e.returncode,
                                          e.stdout.decode("utf-8", "replace").strip()[:500])]
    except (OSError, subprocess.TimeoutExpired) as e:
        return ["cannot run %s: %s" % (argv[0], e)]
    return []


def finish(dest, errors):
    """Replace the lock by the outcome's marker: STAGING-ERRORS with one
    line per error, or STAGING-SUCCEEDED holding the finishing time."""
    for marker in (SUCCEEDED, ERRORS):
        if os.path.lexists(os.path.join(dest, marker)):
            os.unlink(os.path.join(dest, marker))
    if errors:
        _write_marker(dest, ERRORS, "".join(line.replace("\n", " ") + "\n" for line in errors))
    else:
        _write_marker(dest, SUCCEEDED, "%r\n" % time.time())
    if os.path.lexists(os.path.join(dest, IN_PROGRESS)):
        os.unlink(os.path.join(dest, IN_PROGRESS))


@tasks.on_cancel("stage")
def stage_cancelled(args):
    """A cancelled staging releases its folder, saying so."""
    if os.path.isdir(args["destination"]) and not os.path.islink(args["destination"]):
        finish(args["destination"], ["cancelled before it ran"])
