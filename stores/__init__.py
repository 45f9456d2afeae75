"""Stores: where bytes live, how they arrive and how they leave.

A store is a directory tree at `path_prefix` on the host `ssh_host`. Every
arriving file or directory is first written under the store's staging area
(`path_prefix/.staging/`, on the same file system so that the final move is
an atomic rename), checked, made read-only, and only then moved to
`path_prefix/parent_dirs/name`. Nothing half-written is ever visible at a
final path.

The package:

- `StoreRegistry` (here): a process's stores, their settings and shared
  SSH connections; `open(row)` gives the `StoreAccess` of a store record.
- `StoreAccess` (here): every operation on a store, the only interface the
  rest of the server uses: staging, receiving, committing, undoing,
  reading ranges and trees, checksums, deletion, usage, reachability,
  settling what dead processes left. Every mutation records an intent
  first (`stores.intents`).
- `stores.paths`: the path rules, `stores.trees`: streams and tree walks.
- `stores.local.LocalFS` and `stores.ssh.SSHFS`: the primitives of one
  host's file system on absolute paths, this host's or one reached over
  SSH. A new kind of store is one such module and its settings.

Checksums follow the definition shared by the Librarians of the network,
which lives in `librarian_client` (`path_md5`, `directory_digest`) so that
client and server compute it in one way.
"""

import contextlib
import functools
import hashlib
import logging
import posixpath
import stat
import threading
import uuid

from errors import Conflict, LibrarianError, Refused, Unavailable
from librarian_client import CHUNK  # noqa: F401 (callers stream in these chunks)
from models import Reusable, write_transaction
from settings import names_this_host
from stores import intents
from stores.intents import crash_point
from stores.local import LocalFS
from stores.paths import (STAGING, check_relative_folder, is_inside,  # noqa: F401
                          split_store_path)
from stores.ssh import (SSHFS, DiskUsage, SSHConnection, SSHTarget,  # noqa: F401
                        StoreUnreachable, stream_started)
from stores.trees import (BodyReader, ChunkStream, Mismatch, copy_hashing,  # noqa: F401
                          copy_tree, iter_file, iter_tar, skip, sorted_listing,
                          tar_size, tree_depth, walk)

log = logging.getLogger("librarian")

MAX_TREE_DEPTH = 64  # folders within folders in a stored directory (MIRIAD has one)


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------

class StoreRegistry:
    """The stores of one process: their `[store:NAME]` settings (transport,
    SSH), and one shared SSH connection per store host, and per store host
    of another Librarian that copies reach by SSH. Built by
    `context.Context`; `open(row)` gives a store's `StoreAccess`."""

    def __init__(self, store_settings):
        self.settings = dict(store_settings)  # store name -> its [store:NAME] section
        self._connections = {}  # (store name, SSHTarget) -> SSHConnection
        self._peer_hosts = {}   # SSHTarget -> SSHConnection
        self._lock = threading.Lock()

    def close(self):
        """Drop every connection (settings replaced, or the process ends)."""
        with self._lock:
            for conn in list(self._connections.values()) + list(self._peer_hosts.values()):
                conn.retired = True
                conn.drop()
            self._connections.clear()
            self._peer_hosts.clear()

    def transport_of(self, row):
        """'local' or 'ssh' for a store record: `[store:NAME] transport`,
        else local when its ssh_host names this host."""
        spec = self.settings.get(row.name, {})
        if spec.get("transport"):
            return spec["transport"]
        return "local" if names_this_host(row.ssh_host) else "ssh"

    def ssh_target(self, row):
        """The SSHTarget of a store record, from its configuration section."""
        spec = self.settings.get(row.name, {})
        return SSHTarget(row.ssh_host, spec.get("ssh_port") or 22, spec.get("ssh_user"),
                         spec.get("ssh_key"), spec.get("known_hosts"),
                         spec.get("ssh_timeout") or 15.0)

    def describe_access(self, row):
        """How the server reaches a store, in words: 'directly (this host)'
        or 'over SSH as USER to HOST port N'."""
        if self.transport_of(row) == "local":
            return "directly (this host)"
        target = self.ssh_target(row)
        return "over SSH as %s to %s port %d" % (target.user or "the server's user",
                                                 target.host, target.port)

    def _connection(self, row):
        key = (row.name, self.ssh_target(row))
        with self._lock:
            if key not in self._connections:
                self._connections[key] = SSHConnection(row.name, key[1])
            return self._connections[key]

    def peer_host(self, label, target):
        """The file system of another Librarian's store host, as a
        destination for `StoreAccess.copy_to`."""
        with self._lock:
            if target not in self._peer_hosts:
                self._peer_hosts[target] = SSHConnection(label, target)
            return SSHFS(self._peer_hosts[target])

    def open(self, row):
        """A `StoreAccess` for the `models.Store` record `row`, on the local
        or SSH file system as configured."""
        if self.transport_of(row) == "local":
            return StoreAccess(row, LocalFS(row.path_prefix), self)
        return StoreAccess(row, SSHFS(self._connection(row)), self)

    def present_instance(self, file_name, available_only=False):
        """(FileInstance, StoreAccess, absolute path) of the first instance
        of `file_name` (by store name) in service (not found corrupt or
        missing) whose bytes are present, optionally only on available
        stores; (None, None, None) when there is none.
        Unreachable stores are passed over. The one place that decides
        which copy the server reads from. Raises `StoreUnreachable` when no
        instance is present but one could be on a store that cannot be
        reached now."""
        unreachable = None
        for inst in _INSTANCES_IN_SERVICE[bool(available_only)].rows(file_name):
            store = self.open(inst.store)
            try:
                path = store.resolve(inst.store_path)
                if store.exists_at(path):
                    return inst, store, path
            except StoreUnreachable as e:
                unreachable = unreachable or e
        if unreachable is not None:
            raise unreachable
        return None, None, None


def _instances_in_service(file_name, available_only):
    """The query of `StoreRegistry.present_instance`."""
    from models import FileInstance, Store

    query = (FileInstance.select(FileInstance, Store).join(Store)
             .where((FileInstance.file == file_name) & FileInstance.in_service())
             .order_by(Store.name))
    if available_only:
        query = query.where(Store.available == True)  # noqa: E712
    return query


# On the path of every download and locate_file_instance: built once.
_INSTANCES_IN_SERVICE = {flag: Reusable(functools.partial(_instances_in_service,
                                                          available_only=flag))
                         for flag in (False, True)}


class StoreAccess:
    """Operations on one store, through its file system `fs` (`LocalFS` or
    `SSHFS`, which only this package touches). `row` is the `models.Store`
    record. Paths given to methods are store paths (relative to the prefix)
    unless named `abs_...`; absolute paths are paths on the store's host."""

    def __init__(self, row, fs, registry=None):
        self.row, self.fs = row, fs
        self.registry = registry  # the StoreRegistry that opened it: its sibling stores
        self.name = row.name
        self.prefix = row.path_prefix
        self._intents = {}  # staging folder made here -> its intent id
        self._kept = set()  # staging folders a settle must see (an undo that failed)

    # -- paths --------------------------------------------------------------

    def resolve(self, store_path):
        """Absolute path of a store path, refusing (400) one whose existing
        part passes through a link, or is one, or lies outside the store or
        in its staging area."""
        parent_dirs, name = split_store_path(store_path)
        try:
            root = self.fs.realpath(self.prefix)
            wanted = posixpath.join(root, parent_dirs) if parent_dirs else root
            parent = self.fs.realpath(wanted)
        except OSError as e:  # (ELOOP, EINVAL: links being swapped meanwhile)
            raise Conflict("store path %r cannot be resolved on store %r now: %s"
                           % (store_path, self.name, e.strerror or e)) from None
        if not is_inside(parent, root):
            raise Refused("store path %r resolves outside store %r" % (store_path, self.name))
        if parent != wanted:
            raise Refused("store path %r passes through a link on store %r; stored paths "
                          "never do" % (store_path, self.name))
        if is_inside(parent, posixpath.join(root, STAGING)):
            raise Refused("store path %r resolves into the staging area" % store_path)
        full = posixpath.join(parent, name)
        if self._is_link(full):
            raise Refused("store path %r is a symbolic link" % store_path)
        return full

    def _is_link(self, abs_path):
        try:
            return stat.S_ISLNK(self.fs.lstat(abs_path).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def staging_root(self):
        return posixpath.join(self.prefix, STAGING)

    def is_staging_dir(self, abs_path):
        """Whether `abs_path` names a directory directly in the staging
        area (as `new_staging_dir` makes them)."""
        return posixpath.dirname(posixpath.normpath(abs_path)) == self.staging_root()

    def relative(self, abs_path):
        """The form the existing protocol sends store folders in: relative
        to the prefix (the deployed client joins it to `path_prefix`)."""
        root = self.prefix if is_inside(abs_path, self.prefix) else self.fs.realpath(self.prefix)
        return posixpath.relpath(abs_path, root)

    def issued_staging_dir(self, staging_dir):
        """The absolute path of a folder of this store that `initiate_upload`
        named as `staging_dir` (relative to the prefix); 400 for an
        absolute path or one with `..`."""
        return posixpath.join(self.prefix, *check_relative_folder(staging_dir, "staging_dir"))

    def known_staging_dir(self, subdir, what="known_staging_subdir"):
        """The resolved absolute path of an operator's pre-staged folder:
        `subdir` is relative to the prefix, of any depth, and must be an
        existing folder inside the store and outside its staging area.
        Such a folder is the operator's: the server only ever takes the
        file it is asked to complete out of it. 400 otherwise, naming
        `what` (the argument that named the folder)."""
        parts = check_relative_folder(subdir, what)
        if parts[0] == STAGING:
            raise Refused("%s %r is inside the server's own staging area, but not one of its "
                          "issued folders" % (what, subdir))
        try:
            root = self.fs.realpath(self.prefix)
            real = self.fs.realpath(posixpath.join(root, *parts))
        except OSError as e:  # (ELOOP, EINVAL: links being swapped meanwhile)
            raise Conflict("%s %r cannot be resolved on %s now: %s"
                           % (what, subdir, self.describe(), e.strerror or e)) from None
        if real == root or not is_inside(real, root) \
                or is_inside(real, posixpath.join(root, STAGING)):
            raise Refused("%s %r resolves to %s, which is not a folder of store %r outside its "
                          "staging area" % (what, subdir, real, self.name))
        try:
            is_dir = stat.S_ISDIR(self.fs.lstat(real).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            is_dir = None
        if not is_dir:
            raise Refused("%s %r %s on %s" % (what, subdir, "does not exist" if is_dir is None
                                             else "is not a folder", self.describe()))
        return real

    # -- staging folders ------------------------------------------------------

    def new_staging_dir(self, kind="receive", origin=None):
        """Create and return a fresh, empty staging folder, held by an
        intent of this process (`kind` receive, or take with the store
        path `origin` it takes from) until `release`d or `keep`-t."""
        self._make_staging_root()
        path = posixpath.join(self.staging_root(), uuid.uuid4().hex)
        self._intents[path] = intents.begin(kind, self.row, staging=path, store_path=origin)
        self.fs.mkdir(path)
        return path

    @contextlib.contextmanager
    def staging_dir(self):
        """A fresh staging folder for the block, released after it."""
        path = self.new_staging_dir()
        try:
            yield path
        finally:
            self.release(path)

    def new_upload_dir(self, path):
        """Make the staging folder `path` (directly in the staging area) of
        a resumable upload; its `models.Upload` row, written first, holds
        it (no intent: it outlives the process that made it)."""
        if posixpath.dirname(path) != self.staging_root():
            raise Refused("%s is not a folder of the staging area of %s" % (path, self.name))
        self._make_staging_root()
        self.fs.mkdir(path)

    def remove_upload_dir(self, path):
        """Remove an upload's staging folder (quietly: the staging clean-up
        takes what is left once the upload is finished or gone)."""
        self._remove_quietly(path)

    def keep(self, path):
        """End the intent of a staging folder that another record now holds
        (a folder issued by `initiate_upload`, once its record is in)."""
        intent = self._intents.pop(path, None)
        if intent is not None:
            intents.end(intent)

    def release(self, path):
        """Remove a staging folder made by `new_staging_dir` and end its
        intent; quietly: what cannot be removed now (a host gone quiet) is
        handed to the next settle."""
        intent = self._intents.pop(path, None)
        if path in self._kept:
            if intent is not None:
                intents.abandon(intent)
            return
        self._remove_quietly(path, intent)

    def check_staging_dir(self, abs_path):
        """Refuse (400) a staging folder that is not a real folder directly
        in this store's staging area (a link put in its place, say)."""
        try:
            st = self.fs.lstat(abs_path)
        except (FileNotFoundError, NotADirectoryError):
            raise Refused("staging folder %s does not exist on %s" % (abs_path, self.describe())) \
                from None
        root = self.fs.realpath(self.staging_root())
        real = self.fs.realpath(abs_path)
        if not stat.S_ISDIR(st.st_mode) or posixpath.dirname(real) != root:
            raise Refused("staging folder %s is not a folder of the staging area of %s"
                          % (abs_path, self.describe()))

    def take(self, folder, name, private):
        """Move `folder/name` (an operator's pre-staged folder, or one issued
        to a client) into the server's fresh, empty staging folder
        `private`, out of the reach of whoever wrote it, and return (its new
        absolute path, its modes). 400 when nothing, or a link, is there;
        409 when it cannot be moved there (another file system, say)."""
        src = posixpath.join(folder, name)
        try:
            is_link = stat.S_ISLNK(self.fs.lstat(src).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            raise Refused("nothing staged at %s on %s" % (src, self.describe())) from None
        if is_link:
            raise Refused("%s on %s is a symbolic link" % (src, self.describe()))
        modes = self.tree_modes(src)
        if private in self._intents:  # so that a settle gives them back as they were
            intents.note(self._intents[private], modes)
        staged = posixpath.join(private, name)
        try:
            self.fs.rename_new(src, staged)
        except FileNotFoundError:
            raise Refused("nothing staged at %s on %s (taken meanwhile)"
                          % (src, self.describe())) from None
        except OSError as e:
            raise Conflict("cannot move %s into the staging area of %s (%s): a folder on "
                           "another file system than the store's cannot be ingested from; copy "
                           "it onto the store, or register it where it is"
                           % (src, self.describe(), e.strerror or e)) from None
        return staged, modes

    def check_no_writers(self, abs_path):
        """Refuse (409) a taken file or tree that another process still holds
        open for writing (a copy still running: its descriptor reaches the
        bytes wherever they are moved). Stores on other hosts are not
        asked."""
        writers = getattr(self.fs, "writers", None)
        pids = writers(abs_path) if writers else []
        if pids:
            raise Conflict("%s is still open for writing (process %s); complete it once it is "
                           "written" % (posixpath.basename(abs_path),
                                        ", ".join(map(str, pids[:5]))))

    def tree_modes(self, abs_path):
        """[(relative path, permission bits)] of a file or tree."""
        modes = [("", stat.S_IMODE(self.fs.lstat(abs_path).st_mode))]
        if stat.S_ISDIR(self.fs.lstat(abs_path).st_mode):
            modes += [(rel, stat.S_IMODE(st.st_mode)) for rel, st in walk(self.fs, abs_path)]
        return modes

    def give_back(self, private, origin, modes=None):
        """Settle a `take`: bytes still in the staging folder `private` (not
        registered) go back to the store path `origin`, with their `modes`
        if given; the folder goes. Returns True when settled; False
        (logged, never raised) when the bytes cannot go back, because
        something else is at `origin` now or its folder is gone: they are
        then kept where they are, for an operator to see to."""
        staged = posixpath.join(private, posixpath.basename(origin))
        try:
            if self.fs.lexists(staged):
                back = self._origin_path(origin)
                if self.fs.lexists(back):
                    if not self._same_file(staged, back):
                        raise FileExistsError("something else is at %s now" % origin)
                    self.fs.unlink(staged)  # a move that a crash cut short: both names held it
                else:
                    self._move_back(staged, back, modes)
            self.fs.remove_tree(private)
            return True
        except (OSError, LibrarianError) as e:
            log.error("keeping %s on store %s, taken from %s, which cannot be put back: %s; "
                      "move it back by hand", staged, self.name, origin,
                      getattr(e, "message", None) or e)
            return False

    def _origin_path(self, origin):
        """The absolute path of a take's origin: a store path, or a path in
        a folder of the staging area issued to a client."""
        if origin.split("/", 1)[0] == STAGING:
            folder, name = posixpath.split(origin)
            path = posixpath.join(self.prefix, *check_relative_folder(folder, "origin"), name)
            self.check_staging_dir(posixpath.dirname(path))
            return path
        return self.resolve(origin)

    def _same_file(self, a, b):
        """Whether two paths name one file (hard links: a move cut short)."""
        sa, sb = self.fs.lstat(a), self.fs.lstat(b)
        return bool(getattr(sa, "st_ino", None)) and (sa.st_ino, sa.st_dev) == (sb.st_ino,
                                                                                 sb.st_dev)

    def _move_back(self, staged, back, modes):
        if stat.S_ISDIR(self.fs.lstat(staged).st_mode):
            self.fs.chmod(staged, 0o755)  # a directory needs write permission to be moved
        self.fs.rename_new(staged, back)
        for rel, mode in modes or ():
            self.fs.chmod(posixpath.join(back, rel) if rel else back, mode)

    def ensure_prefix(self):
        """Create the store's folder if it is missing and the store holds
        no instance: the folder of a store with instances that is not there
        is a disk not mounted, and recreating it would put new bytes (and
        repairs) on the disk beneath the mount point."""
        from models import FileInstance

        if self.fs.lexists(self.prefix):
            return
        if FileInstance.select().where(FileInstance.store == self.row).exists():
            log.warning("the folder %s of store %s is not there (a disk not mounted?): not "
                        "made again, the store is out of use until it is back", self.prefix,
                        self.name)
            return
        self.fs.makedirs(self.prefix)

    def _make_staging_root(self):
        """The staging area's folder, made if missing, inside the store's
        folder, which must be there (`ensure_prefix`): Unavailable if not."""
        if not self.fs.lexists(self.prefix):
            raise Unavailable("the folder %s of store %s is not there (a disk not mounted?)"
                              % (self.prefix, self.name))
        self.fs.makedirs(self.staging_root())

    # -- bytes in -------------------------------------------------------------

    def receive(self, reader, abs_dest, name, is_tar):
        """Write a request body to the new path `abs_dest` in a staging
        folder (a file, or a directory unpacked from a tar stream); returns
        (size, md5)."""
        if is_tar:
            from stores.trees import receive_tar
            return receive_tar(self.fs, reader, abs_dest, name, MAX_TREE_DEPTH)
        with self.fs.open(abs_dest, "xb") as out:
            return copy_hashing(reader, out)

    def write_at(self, abs_path, offset, data):
        """Write the bytes `data` at `offset` of the staging file `abs_path`
        (a chunk of a resumable upload), dropping what lay beyond."""
        self.fs.write_at(abs_path, offset, data)

    def md5_of_prefix(self, abs_path, length):
        """A running `hashlib.md5` of the first `length` bytes of a file
        (to go on with an upload that another process began)."""
        digest = hashlib.md5()
        for chunk in iter_file(self.fs, abs_path, 0, length):
            digest.update(chunk)
        return digest

    def unpack(self, abs_tar, abs_dest, name):
        """Unpack the tar at `abs_tar` (a directory sent as a resumable
        upload) to the new path `abs_dest` of the same staging folder as
        `receive` would; returns (size, md5). The tar stays until the
        folder goes, so that an interrupted unpacking can start again."""
        from stores.trees import receive_tar
        with self.fs.open(abs_tar, "rb") as f:
            return receive_tar(self.fs, f, abs_dest, name, MAX_TREE_DEPTH)

    def remove_staged(self, abs_path):
        """Remove a file or tree inside a staging folder."""
        if not self.is_staging_dir(posixpath.dirname(abs_path)):
            raise Refused("%s is not inside a staging folder of %s" % (abs_path, self.name))
        self.fs.remove_tree(abs_path)

    def rename_staged(self, abs_src, abs_dest):
        """Rename within a staging folder (never replacing an entry)."""
        self.fs.rename_new(abs_src, abs_dest)

    def signature(self, abs_path):
        """What changes when a file or tree is written: the (relative path,
        size, mtime, ctime, inode) of each of its entries. Compared before
        and after a check, so that bytes that changed meanwhile are never
        registered under the checked size and MD5."""
        def sig(rel, st):
            return (rel, st.st_size, getattr(st, "st_mtime_ns", st.st_mtime),
                    getattr(st, "st_ctime_ns", None), getattr(st, "st_ino", None))

        st = self.fs.lstat(abs_path)
        entries = [sig("", st)]
        if stat.S_ISDIR(st.st_mode):
            entries += [sig(rel, s) for rel, s in walk(self.fs, abs_path)]
        return entries

    def check_tree(self, abs_path):
        """Refuse (400) a file or tree that holds anything but regular files
        and directories (links would lead out of the store; devices, FIFOs,
        sockets), or whose folders nest deeper than MAX_TREE_DEPTH."""
        bad = self.fs.find_special(abs_path)
        if bad is not None:
            raise Refused("%s is a link or special file; only regular files and directories "
                          "can be stored" % bad)
        if tree_depth(self.fs, abs_path) > MAX_TREE_DEPTH:
            raise Refused("%s nests folders more than %d deep" % (abs_path, MAX_TREE_DEPTH))

    def checksum(self, abs_path):
        """(size in bytes, md5) of a file or tree by the shared definition."""
        return self.fs.path_info(abs_path)

    def read_observation(self, abs_path):
        """Observation metadata of a data set (see `uvmeta`), or None."""
        return self.fs.read_observation(abs_path)

    def quick_look(self, abs_path, baseline=None, pol=None):
        """`quicklook.look` of the data set at `abs_path` in the reader
        process, or None when it is not visibility data (UVH5 or MIRIAD).
        Raises `quicklook.QuickLookError` or `uvmeta.MetadataError`."""
        return self.fs.quick_look(abs_path, baseline, pol)

    def commit(self, abs_staged, store_path, record, readonly=True):
        """Move the staged item `abs_staged` to `store_path` and run
        `record()` (the database writes that register it) in one
        transaction, under a commit intent recorded before: the bytes
        appear at their place with their record, or not at all, whatever
        fails or dies. `record()` returns a dict; with `move: False` in it
        nothing is moved (the file was already here). Returns that dict with
        `abs_path`, the final path when moved. Raises what `record` raises,
        and 409 when something unregistered is at the place."""
        intent = intents.begin("commit", self.row, staging=abs_staged, store_path=store_path)
        final = None
        try:
            with write_transaction():
                result = record()
                if result.pop("move", True):
                    final = self.move_into_place(abs_staged, store_path, readonly=readonly)
                    crash_point("commit:moved")
                intents.end(intent)
        except BaseException:
            # The move may have happened even when it raised (a host that
            # renamed, then stopped answering): undo whatever is in place.
            if self.undo_move(final or self._place(store_path), abs_staged):
                intents.end(intent)
            else:  # the folder stays for the settle that moves the bytes back
                self._kept.add(posixpath.dirname(abs_staged))
                intents.abandon(intent)
            raise
        result["abs_path"] = final
        return result

    def move_into_place(self, abs_staged, store_path, readonly=True):
        """Atomically move a staged file or directory to `store_path`,
        creating parent directories; never replaces an existing entry
        (409). The place is checked again once its folders exist, and
        after the move (a link planted meanwhile undoes it). With
        `readonly`, the bytes are read-only when they appear (a directory's
        own mode is closed right after the rename). Call it only under a
        commit intent (see `commit`). Returns the final absolute path."""
        final = self.resolve(store_path)
        try:
            self.fs.makedirs(posixpath.dirname(final))
        except (FileExistsError, NotADirectoryError):
            raise Conflict("a folder of the store path %r is a file on store %r"
                           % (store_path, self.name)) from None
        final = self.resolve(store_path)  # re-check now that parents exist
        if self.fs.lexists(final):
            raise Conflict("%s already exists on store %r but is not registered there"
                           % (store_path, self.name))
        is_dir = stat.S_ISDIR(self.fs.lstat(abs_staged).st_mode)
        if readonly:
            self.fs.make_readonly(abs_staged)
        self.fs.rename_new(abs_staged, final)
        try:
            if self.resolve(store_path) != final:
                raise Refused("store path %r changed while the bytes were moved"
                              % store_path)
            if is_dir and readonly:
                self.fs.chmod(final, 0o555)
        except BaseException:
            self.undo_move(final, abs_staged)
            raise
        return final

    def _place(self, store_path):
        """The absolute final path of a store path, or None if it cannot be
        resolved now."""
        try:
            return self.resolve(store_path)
        except (OSError, LibrarianError):
            return None

    def undo_move(self, final, abs_staged):
        """Move bytes that `move_into_place` put at `final` back to
        `abs_staged` (their registration failed). Returns False (logged)
        when that fails too: the commit intent then goes to the next settle."""
        try:
            if self.fs.lexists(abs_staged):
                return True  # never moved
            if final is None:
                return False
            if stat.S_ISDIR(self.fs.lstat(final).st_mode):
                self.fs.chmod(final, 0o755)
            self.fs.rename_new(final, abs_staged)
            return True
        except (OSError, LibrarianError) as e:
            log.warning("could not move %s back to staging on store %s (the next settle "
                        "will): %s", final, self.name, e)
            return False

    def make_readonly(self, abs_path):
        """Make a registered file or tree read-only, the top folder too."""
        self.fs.make_readonly(abs_path)
        if stat.S_ISDIR(self.fs.lstat(abs_path).st_mode):
            self.fs.chmod(abs_path, 0o555)

    # -- bytes out --------------------------------------------------------------

    def stat(self, abs_path):
        """lstat of a path on the store's host; FileNotFoundError when
        missing."""
        return self.fs.lstat(abs_path)

    def exists_at(self, abs_path):
        return self.fs.lexists(abs_path)

    def exists(self, store_path):
        return self.fs.lexists(self.resolve(store_path))

    def is_dir(self, abs_path):
        return stat.S_ISDIR(self.fs.lstat(abs_path).st_mode)

    def listdir(self, abs_path):
        """[(name, lstat)] of a folder's entries, sorted by name."""
        return self.fs.scandir(abs_path)

    def listing(self):
        """Yield (store path as bytes, type letter, size in bytes) of every
        entry of the store outside its staging area, sorted by the bytes of
        the path (type: f file, d folder, l link, others special). One
        command on the store's host (`stores.trees.LISTING_SCRIPT`), read
        as it streams: bounded memory at any size. Raises OSError (or
        StoreUnreachable) at the end when the listing is incomplete."""
        return sorted_listing(self.fs, self.prefix)

    def open_read(self, abs_path):
        """A binary file open for reading."""
        return self.fs.open(abs_path, "rb")

    def read_range(self, abs_path, start=0, length=None):
        """Chunks of `length` bytes (None: to the end) of a file from byte
        `start`."""
        return iter_file(self.fs, abs_path, start, length)

    def stream(self, abs_path, name, size, md5=None):
        """(chunks, length in bytes) of a file, or of a directory as a tar
        under the top folder `name`; `size` is the record's (a directory
        holding other than that many bytes raises IOError before the first
        chunk). With the record's `md5`, the bytes are verified on the way:
        `Mismatch` comes instead of the last chunk when they differ."""
        if self.is_dir(abs_path):
            return (iter_tar(self.fs, abs_path, name, size=size, md5=md5),
                    tar_size(self.fs, abs_path, name))
        return iter_file(self.fs, abs_path, 0, size, md5=md5), size

    def seekable_stream(self, abs_path, name, size, md5=None):
        """The bytes `stream` gives, as a seekable file-like object (for a
        resumable upload to another Librarian): seeking restarts the stream
        and skips to the offset (reading what it skips, so that the whole
        is still verified against `md5`)."""
        def from_offset(offset):
            if md5 is None and not self.is_dir(abs_path):
                return iter_file(self.fs, abs_path, offset, size - offset)
            return skip(self.stream(abs_path, name, size, md5)[0], offset)
        return ChunkStream(from_offset, self.stream(abs_path, name, size)[1])

    def copy_to(self, abs_path, other, abs_dest, progress=None):
        """Copy a file or tree to the new path `abs_dest` of the
        `StoreAccess` (or host file system) `other`, streaming; returns
        (size, md5) of the bytes read (the shared definition)."""
        return copy_tree(self.fs, abs_path, getattr(other, "fs", other), abs_dest,
                         progress=progress)

    def copy_in(self, local_path, abs_dest):
        """Copy a file or tree of this host's file system to the new path
        `abs_dest` of the store; returns (size, md5) of the bytes read."""
        parent = posixpath.dirname(local_path)
        return copy_tree(LocalFS(parent), local_path, self.fs, abs_dest)

    def is_local(self):
        """Whether the store is on this host's file system."""
        return isinstance(self.fs, LocalFS)

    # -- deletion -------------------------------------------------------------

    def delete(self, store_path, unrecord):
        """Delete the bytes of the instance at `store_path`, under a delete
        intent: first they are moved out of their place into a fresh
        staging folder (one rename: a directory is never seen partly
        removed); then `unrecord()` runs in a transaction (the database
        writes that take the instance out of the catalogue, after checking
        again that it may go; it returns False if not, and the bytes are
        moved back); then the bytes are removed and the intent ends. A
        crash at any step leaves the intent, and a settle undoes the
        deletion while the record is there, or finishes it once it is
        gone. Returns whether the instance was deleted; raises OSError or
        LibrarianError when the bytes cannot be moved (nothing changed)."""
        final = self.resolve(store_path)
        trash = posixpath.join(self.staging_root(), uuid.uuid4().hex)
        intent = intents.begin("delete", self.row, staging=trash, store_path=store_path)
        moved = posixpath.join(trash, posixpath.basename(final))
        try:
            self._make_staging_root()
            self.fs.mkdir(trash)
            self._move_out(final, moved)
        except BaseException:
            self._remove_quietly(trash)
            intents.end(intent)
            raise
        crash_point("delete:moved")
        deleted = False
        try:
            with write_transaction():
                deleted = unrecord()
        finally:
            if not deleted:
                self._move_back_from(moved, final)
        crash_point("delete:unrecorded")
        self._remove_quietly(trash, intent)
        return deleted

    def _move_out(self, final, moved):
        is_dir = stat.S_ISDIR(self.fs.lstat(final).st_mode)
        if is_dir:
            self.fs.chmod(final, 0o755)  # a directory needs write permission to be moved
        try:
            self.fs.rename_new(final, moved)
        except BaseException:
            if is_dir:
                self.fs.chmod(final, 0o555)
            raise

    def _move_back_from(self, moved, final):
        """Undo `_move_out` (the record stays)."""
        if self.fs.lexists(moved) and not self.fs.lexists(final):
            is_dir = stat.S_ISDIR(self.fs.lstat(moved).st_mode)
            self.fs.rename_new(moved, final)
            if is_dir:
                self.fs.chmod(final, 0o555)

    def _remove_quietly(self, folder, intent=None):
        """Remove a staging folder, then end `intent`; what cannot be removed
        now (a host gone quiet) is handed to the next settle."""
        try:
            self.fs.remove_tree(folder)
        except (OSError, LibrarianError) as e:
            log.warning("could not remove %s on store %s (the next settle will): %s", folder,
                        self.name, e)
            if intent is not None:
                intents.abandon(intent)
            return
        if intent is not None:
            intents.end(intent)

    # -- settling -------------------------------------------------------------

    def settle(self, is_registered):
        """Finish or undo what dead processes left on this store (see
        `stores.intents`), then remove from the staging area what no live
        process and no issued folder holds. `is_registered(store_path)`
        says whether a path is a registered instance (or inside one).
        Returns how many staging entries were removed. Raises
        StoreUnreachable when the host cannot be reached."""
        for intent in intents.dead(self.row):
            try:
                self._settle_one(intent, is_registered)
            except (OSError, LibrarianError) as e:  # one that cannot be settled stops no other
                log.error("could not settle the %s of %s on store %s: %s", intent.kind,
                          intent.staging or intent.store_path, self.name, e)
        return self._clean_staging()

    def _settle_one(self, intent, is_registered):
        if intent.kind == "commit":
            staged = intent.staging
            final = self.resolve(intent.store_path)
            if not is_registered(intent.store_path) and self.fs.lexists(final):
                if not self.fs.lexists(posixpath.dirname(staged)):
                    self.fs.makedirs(posixpath.dirname(staged))  # removed: made again
                if not self.fs.lexists(staged):
                    log.warning("moving unregistered %s on store %s back to staging: its "
                                "registration was interrupted", intent.store_path, self.name)
                    self.undo_move(final, staged)
                elif self._same_file(final, staged):  # the move's link made, its unlink not
                    self.fs.unlink(final)
        elif intent.kind == "delete":
            moved = posixpath.join(intent.staging, posixpath.basename(intent.store_path))
            if is_registered(intent.store_path):
                log.warning("undoing the interrupted deletion of %s on store %s: its record "
                            "is still there", intent.store_path, self.name)
                self._move_back_from(moved, self.resolve(intent.store_path))
            elif self.fs.lexists(intent.staging):
                log.warning("finishing the deletion of %s on store %s", intent.store_path,
                            self.name)
            self.fs.remove_tree(intent.staging)
        elif intent.kind == "take":
            if self.fs.lexists(intent.staging):
                modes = intents.detail_of(intent)
                if not self.give_back(intent.staging, intent.store_path, modes):
                    return  # kept, and tried again at the next settle
                log.warning("put %s on store %s back where it was: the process registering "
                            "it (%s) died", intent.store_path, self.name, intent.owner)
        elif intent.kind == "receive":
            if self.fs.lexists(intent.staging):
                log.info("removing %s on store %s: what the dead process %s was receiving",
                         intent.staging, self.name, intent.owner or "(unknown)")
            self.fs.remove_tree(intent.staging)
        intents.end(intent.id)

    def _clean_staging(self):
        from models import StagingDir, Upload

        root = self.staging_root()
        try:
            entries = self.fs.scandir(root)
        except FileNotFoundError:
            return 0
        held = intents.held_folders(self.row)  # read after listing: see held_folders
        held |= {s.path for s in StagingDir.select().where(StagingDir.store == self.row)}
        # A finished upload's folder is done with (its outcome committed with
        # its records); an unfinished one's holds the bytes so far.
        held |= {u.staging for u in Upload.select(Upload.staging)
                 .where((Upload.store == self.row) & Upload.outcome.is_null())}
        removed = 0
        for entry, _ in entries:
            path = posixpath.join(root, entry)
            if path in held:
                continue
            try:
                self.fs.remove_tree(path)
                removed += 1
            except OSError as e:
                log.error("could not clean %s on store %s: %s", path, self.name, e)
        return removed

    # -- usage and reachability -----------------------------------------------

    def disk_usage(self):
        """DiskUsage (total, used, free bytes) of the store's file system;
        raises OSError or StoreUnreachable when it cannot be read."""
        return self.fs.disk_usage(self.prefix)

    def free_space(self):
        """Free bytes on the store's file system (None if unreachable)."""
        try:
            return self.disk_usage().free
        except (OSError, LibrarianError):
            return None

    def problem(self):
        """None when the prefix is a writable directory; else what is wrong,
        in words (the host unreachable and why, or the folder missing)."""
        try:
            if self.fs.is_writable_dir(self.prefix):
                return None
            return "%s is not a writable folder on %s" % (self.prefix, self.fs.where)
        except LibrarianError as e:
            return e.message
        except OSError as e:
            return str(e)

    def is_reachable(self):
        """Whether the prefix is a writable directory (False, never an
        error, when the host cannot be reached)."""
        return self.problem() is None

    def describe(self):
        return "store %r (%s on %s)" % (self.name, self.prefix, self.fs.where)
