"""Store operations: where bytes live, how they arrive and how they leave.

A store is a directory tree at `path_prefix`. Every arriving file or
directory is first written under the store's staging area
(`path_prefix/.staging/`, on the same file system so that the final move is
an atomic rename), checked, made read-only, and only then moved to
`path_prefix/parent_dirs/name`. Nothing half-written is ever visible at a
final path.

Checksums follow the definition shared by the Librarians of the network,
which lives in `librarian_client` (`path_md5`, `directory_digest`) so that
client and server compute it in one way.

This module is about local stores (the server reaches `path_prefix`
directly); stores on other hosts come later behind the same methods.
"""

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import uuid
from concurrent.futures import ThreadPoolExecutor

from librarian_client import directory_digest, file_md5, path_md5 as path_info  # noqa: F401
from models import LibrarianError, check_file_name

log = logging.getLogger("librarian")

CHUNK = 1 << 20  # bytes per read/write when streaming
STAGING = ".staging"
DESTINATION_MARKER = ".librarian-destination"  # in a staging dir: where its bytes are going
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------

def split_store_path(store_path):
    """Check a store path (relative, `/`-separated) and return
    `(parent_dirs, name)`. Refuses absolute paths, `..`, the staging area and
    bad names with `LibrarianError(400)`; empty and `.` components are
    dropped."""
    if not isinstance(store_path, str) or not store_path:
        raise LibrarianError(400, "store path must be a non-empty string")
    if "\0" in store_path:
        raise LibrarianError(400, "store path may not contain a NUL character")
    if store_path.startswith("/"):
        raise LibrarianError(400, "store path %r must be relative" % store_path)
    parts = [p for p in store_path.split("/") if p not in ("", ".")]
    if not parts or store_path.endswith("/"):
        raise LibrarianError(400, "store path %r names no file: it must end in the file's "
                             "name" % store_path)
    if ".." in parts:
        raise LibrarianError(400, "store path %r may not contain '..'" % store_path)
    if parts[0] == STAGING:
        raise LibrarianError(400, "store path %r points into the staging area" % store_path)
    name = check_file_name(parts[-1])
    return "/".join(parts[:-1]), name


# ---------------------------------------------------------------------------
# Receiving streams
# ---------------------------------------------------------------------------

class BodyReader:
    """A file-like reader over a request body that stops at `length` bytes
    (None: at EOF) and raises `LibrarianError(400)` when the body ends early."""

    def __init__(self, stream, length):
        self.stream = stream
        self.remaining = length

    def read(self, n=-1):
        if self.remaining is None:
            return self.stream.read(n if n and n > 0 else CHUNK)
        if self.remaining <= 0:
            return b""
        want = self.remaining if n is None or n < 0 else min(n, self.remaining)
        data = self.stream.read(want)
        if not data:
            raise LibrarianError(400, "request body ended %d bytes before its declared "
                                 "Content-Length" % self.remaining)
        self.remaining -= len(data)
        return data


def _copy_hashing(reader, out):
    """Copy `reader` to the open file `out`; returns (size, md5 hex).

    MD5 runs in a second thread, one chunk behind the writes (hashlib
    releases the GIL on large buffers), so that hashing and disk writes
    overlap instead of adding up. At most two chunks are in flight."""
    digest = hashlib.md5()
    size = 0
    pending = None
    with ThreadPoolExecutor(max_workers=1) as hasher:
        while True:
            chunk = reader.read(CHUNK)
            if not chunk:
                break
            if pending is not None:
                pending.result()
            pending = hasher.submit(digest.update, chunk)
            out.write(chunk)
            size += len(chunk)
        if pending is not None:
            pending.result()
    return size, digest.hexdigest()


def receive_file(reader, dest):
    """Write the stream to the new file `dest`; returns (size, md5)."""
    with open(dest, "xb") as out:
        return _copy_hashing(reader, out)


def _tar_member_path(member, name):
    """The relative path a tar member is unpacked to, or a 400 naming the
    member: absolute paths, `..`, links, devices and FIFOs are refused. A
    leading top folder called `name` (as `tar -C PARENT -c NAME` makes) is
    stripped later by the caller."""
    path = member.name
    if path.startswith("/") or "\0" in path:
        raise LibrarianError(400, "tar member %r has an absolute path" % path)
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LibrarianError(400, "tar member %r contains '..'" % path)
    if not (member.isfile() or member.isdir()):
        raise LibrarianError(400, "tar member %r is a link or special file; only regular "
                             "files and directories are accepted" % path)
    if member.issparse():
        raise LibrarianError(400, "tar member %r is a sparse file; send it as a regular file"
                             % path)
    return parts


def receive_tar(reader, dest, name):
    """Unpack a tar stream into the new directory `dest`, computing each
    file's MD5 as it is written; returns (size, md5) by the directory
    definition. The members sit either all under one top folder called
    `name` (as `tar -C PARENT -c NAME` and our downloads make them), or at
    the top level (`tar -C DIR -c .`); the first member decides. Raises
    `LibrarianError(400)` on unsafe or malformed input."""
    os.mkdir(dest)
    entries = {}
    total = 0
    under_top = None
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for member in tar:
                parts = _tar_member_path(member, name)
                if not parts:
                    continue
                if under_top is None:
                    under_top = parts[0] == name
                if under_top:
                    if parts[0] != name:
                        raise LibrarianError(400, "tar member %r is not under the top folder "
                                             "%r" % (member.name, name))
                    parts = parts[1:]
                    if not parts:
                        if not member.isdir():
                            raise LibrarianError(400, "tar member %r is a file, but a directory "
                                                 "upload needs a folder %r" % (member.name, name))
                        continue
                rel = "/".join(parts)
                target = os.path.join(dest, rel)
                if member.isdir():
                    os.makedirs(target, exist_ok=True)
                    continue
                if rel in entries:
                    raise LibrarianError(400, "tar member %r appears twice" % member.name)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "xb") as out:
                    size, md5 = _copy_hashing(tar.extractfile(member), out)
                if size != member.size:
                    raise LibrarianError(400, "tar member %r is truncated" % member.name)
                entries[rel] = md5
                total += size
    except tarfile.TarError as e:
        raise LibrarianError(400, "body is not a valid tar stream: %s" % e) from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise LibrarianError(400, "tar stream has a file and a folder of the same "
                             "name") from None
    return total, directory_digest(entries.items())


# ---------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------

def _tar_entries(path, name):
    """(TarInfo, absolute path or None) for a directory, sorted, under the
    top folder `name`; deterministic owner and mode bits."""
    def info(abs_path, arcname):
        st = os.lstat(abs_path)
        ti = tarfile.TarInfo(arcname)
        ti.mtime = int(st.st_mtime)
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        if stat.S_ISDIR(st.st_mode):
            ti.type, ti.mode, ti.size = tarfile.DIRTYPE, 0o755, 0
        else:
            ti.type, ti.mode, ti.size = tarfile.REGTYPE, 0o644, st.st_size
        return ti

    yield info(path, name), None
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        rel = os.path.relpath(dirpath, path)
        for d in dirnames:
            arc = os.path.normpath(os.path.join(name, rel, d))
            yield info(os.path.join(dirpath, d), arc), None
        for f in sorted(filenames):
            abs_path = os.path.join(dirpath, f)
            yield info(abs_path, os.path.normpath(os.path.join(name, rel, f))), abs_path


def _padding(n):
    return (-n) % TAR_BLOCK


def tar_size(path, name):
    """Exact byte length of the tar stream `iter_tar(path, name)` yields."""
    total = 0
    for ti, abs_path in _tar_entries(path, name):
        total += len(ti.tobuf(tarfile.PAX_FORMAT)) + ti.size + _padding(ti.size)
    total += 2 * TAR_BLOCK
    return total + (-total) % TAR_RECORD


def iter_tar(path, name):
    """Yield a tar stream of the directory `path` with members under the top
    folder `name`, built on the fly in chunks (no temporary copy)."""
    total = 0
    for ti, abs_path in _tar_entries(path, name):
        header = ti.tobuf(tarfile.PAX_FORMAT)
        total += len(header)
        yield header
        if abs_path is None:
            continue
        sent = 0
        with open(abs_path, "rb") as f:
            while sent < ti.size:
                chunk = f.read(min(CHUNK, ti.size - sent))
                if not chunk:
                    raise IOError("%s shrank while being sent" % abs_path)
                sent += len(chunk)
                yield chunk
        pad = _padding(ti.size)
        total += ti.size + pad
        if pad:
            yield b"\0" * pad
    end = 2 * TAR_BLOCK
    end += (-(total + end)) % TAR_RECORD
    yield b"\0" * end


# ---------------------------------------------------------------------------
# A local store
# ---------------------------------------------------------------------------

def make_readonly(path):
    """Make a staged file, or a directory's contents, read-only: files 0444,
    sub-directories 0555. The top directory itself stays writable, because
    Linux needs write permission on a directory to rename it into another
    parent; `LocalStore.move_into_place` closes it after the move.
    Symbolic links are never followed."""
    if not os.path.isdir(path) or os.path.islink(path):
        os.chmod(path, 0o444)
        return
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for n in filenames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o444)
        if dirpath != path:
            os.chmod(dirpath, 0o555)


def _make_dirs_writable(path):
    """Give the owner write permission on every directory of a tree (what
    deleting its entries needs); files and links are not touched, so a
    hard-linked or linked-to file elsewhere keeps its mode."""
    os.chmod(path, 0o755)
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames:
            p = os.path.join(dirpath, n)
            if not os.path.islink(p):
                os.chmod(p, 0o755)


def remove_tree(path):
    """Remove a file or tree, first making its directories writable."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        _make_dirs_writable(path)
        shutil.rmtree(path)
    else:
        os.unlink(path)


def check_tree(path):
    """Refuse (400) a file or tree that holds anything but regular files and
    directories: symbolic links (which would lead out of the store),
    devices, FIFOs, sockets."""
    def check(p):
        st = os.lstat(p)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise LibrarianError(400, "%s is a link or special file; only regular files and "
                                 "directories can be stored" % p)

    check(path)
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            for n in dirnames + filenames:
                check(os.path.join(dirpath, n))


def present_instance(file_name, available_only=False):
    """(FileInstance, absolute path) of the first instance of `file_name`
    (by store name) whose bytes are present, optionally only on available
    stores; (None, None) when there is none. The one place that decides
    which copy the server reads from."""
    from models import FileInstance, Store

    query = (FileInstance.select(FileInstance, Store).join(Store)
             .where(FileInstance.file == file_name).order_by(Store.name))
    if available_only:
        query = query.where(Store.available == True)  # noqa: E712
    for inst in query:
        path = LocalStore(inst.store).resolve(inst.store_path)
        if os.path.lexists(path):
            return inst, path
    return None, None


class LocalStore:
    """Operations on a store whose `path_prefix` this host reaches directly.

    `row` is the `models.Store` record. Paths given to methods are store
    paths (relative to the prefix) unless named `abs_...`."""

    def __init__(self, row):
        self.row = row
        self.name = row.name
        self.prefix = row.path_prefix

    # -- paths --------------------------------------------------------------

    def resolve(self, store_path):
        """Absolute path of a store path, refusing (400) one whose existing
        part resolves outside the store or into its staging area, symlinks
        included."""
        parent_dirs, name = split_store_path(store_path)
        root = os.path.realpath(self.prefix)
        parent = os.path.realpath(os.path.join(root, parent_dirs))
        if parent != root and not parent.startswith(root + os.sep):
            raise LibrarianError(400, "store path %r resolves outside store %r"
                                 % (store_path, self.name))
        staging = os.path.join(root, STAGING)
        if parent == staging or parent.startswith(staging + os.sep):
            raise LibrarianError(400, "store path %r resolves into the staging area"
                                 % store_path)
        full = os.path.join(parent, name)
        if os.path.islink(full):
            raise LibrarianError(400, "store path %r is a symbolic link" % store_path)
        return full

    def staging_root(self):
        return os.path.join(self.prefix, STAGING)

    def new_staging_dir(self):
        """Create and return a fresh, empty staging directory."""
        path = os.path.join(self.staging_root(), uuid.uuid4().hex)
        os.makedirs(path, mode=0o755)
        return path

    def clean_staging(self, keep=(), is_registered=lambda store_path: True):
        """Start-up cleaning of the staging area. First undo moves that a
        crash interrupted: a staging directory whose DESTINATION marker
        names a store path that `is_registered(store_path)` denies had its
        bytes moved but never recorded, so they are moved back. Then remove
        everything except the directories in `keep` (absolute paths).
        Returns how many entries were removed."""
        root = self.staging_root()
        if not os.path.isdir(root):
            return 0
        keep = {os.path.realpath(k) for k in keep}
        removed = 0
        for entry in os.listdir(root):
            path = os.path.join(root, entry)
            self._undo_interrupted_move(path, is_registered)
            if os.path.realpath(path) not in keep:
                remove_tree(path)
                removed += 1
        return removed

    def _undo_interrupted_move(self, staging_dir, is_registered):
        marker = os.path.join(staging_dir, DESTINATION_MARKER)
        if os.path.islink(staging_dir) or not os.path.isfile(marker):
            return
        with open(marker, encoding="utf-8") as f:
            store_path = f.read()
        try:
            final = self.resolve(store_path)
        except LibrarianError:
            return
        staged = os.path.join(staging_dir, os.path.basename(final))
        if not is_registered(store_path) and os.path.lexists(final) \
                and not os.path.lexists(staged):
            log.warning("moving unregistered %s on store %s back to staging: its registration "
                        "was interrupted", store_path, self.name)
            if os.path.isdir(final):
                os.chmod(final, 0o755)
            os.rename(final, staged)
        os.unlink(marker)

    # -- bytes ----------------------------------------------------------------

    def move_into_place(self, abs_staged, store_path, readonly=True):
        """Atomically move a staged file or directory to `store_path`,
        creating parent directories; never replaces an existing entry
        (409). With `readonly`, the bytes are read-only when they appear
        (a directory's own mode is closed right after the rename). Returns
        the final absolute path."""
        final = self.resolve(store_path)
        # The marker lets start-up undo this move if the process dies before
        # the registration commits (see clean_staging).
        with open(os.path.join(os.path.dirname(abs_staged), DESTINATION_MARKER), "w",
                  encoding="utf-8") as f:
            f.write(store_path)
        try:
            os.makedirs(os.path.dirname(final), exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise LibrarianError(409, "a folder of the store path %r is a file on store %r"
                                 % (store_path, self.name)) from None
        final = self.resolve(store_path)  # re-check now that parents exist
        if os.path.lexists(final):
            raise LibrarianError(409, "%s already exists on store %r but is not registered "
                                 "there" % (store_path, self.name))
        if readonly:
            make_readonly(abs_staged)
        if os.path.isdir(abs_staged):
            os.rename(abs_staged, final)  # fails if `final` appeared meanwhile, non-empty
            if readonly:
                os.chmod(final, 0o555)
        else:
            os.link(abs_staged, final)  # atomic and never replaces
            os.unlink(abs_staged)
        return final

    def delete(self, store_path):
        """Remove the bytes at `store_path` (made writable first)."""
        remove_tree(self.resolve(store_path))

    def exists(self, store_path):
        return os.path.lexists(self.resolve(store_path))

    def disk_usage(self):
        """`shutil.disk_usage` of the store's file system (total, used, free
        bytes); raises OSError when unreachable."""
        return shutil.disk_usage(self.prefix)

    def free_space(self):
        """Free bytes on the store's file system (None if unreachable)."""
        try:
            return shutil.disk_usage(self.prefix).free
        except OSError:
            return None

    def is_reachable(self):
        return os.path.isdir(self.prefix) and os.access(self.prefix, os.W_OK | os.X_OK)
