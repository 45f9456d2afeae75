"""Store operations: where bytes live, how they arrive and how they leave.

A store is a directory tree at `path_prefix` on the host `ssh_host`. Every
arriving file or directory is first written under the store's staging area
(`path_prefix/.staging/`, on the same file system so that the final move is
an atomic rename), checked, made read-only, and only then moved to
`path_prefix/parent_dirs/name`. Nothing half-written is ever visible at a
final path.

Two layers:

- A *file system* (`LocalFS`, or `sshfs.SSHFS` for a store on another
  host, reached with paramiko) offers the same small set of primitives on
  absolute paths of the store's host.
- `StoreAccess` holds the store logic once, on top of either: staging,
  receiving streams, the atomic move, deletion, tar streams, crash recovery.
  `open_store(row)` picks the file system from `[store:NAME] transport`.

Checksums follow the definition shared by the Librarians of the network,
which lives in `librarian_client` (`path_md5`, `directory_digest`) so that
client and server compute it in one way.
"""

import hashlib
import hmac
import logging
import os
import posixpath
import secrets
import shutil
import stat
import tarfile
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import uvmeta
from settings import names_this_host
from librarian_client import directory_digest, path_md5
from models import LibrarianError, check_file_name
from sshfs import (SSHFS, DiskUsage, SSHConnection, SSHTarget, StoreUnreachable,
                   stream_started)

log = logging.getLogger("librarian")

CHUNK = 1 << 20  # bytes per read/write when streaming
STAGING = ".staging"
DESTINATION_MARKER = ".librarian-destination"  # in a staging dir: where its bytes are going
RESERVED_NAMES = (DESTINATION_MARKER,)
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4096  # Linux: a store path gets half, the prefix the rest


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
    check_name_lengths(parts, store_path)
    if name in RESERVED_NAMES:
        raise LibrarianError(400, "the name %r is reserved for the Librarian's own use" % name)
    return "/".join(parts[:-1]), name


def check_relative_folder(path, what):
    """Check a folder given relative to a store's prefix (a staging folder
    as `initiate_upload` names it, a known staging folder of an operator):
    returns its normalised parts. Refuses (400) absolute paths, `..`, NUL
    and empty paths, naming `what`."""
    if not isinstance(path, str) or not path.strip("/."):
        raise LibrarianError(400, "%s must name a folder, relative to the store's path_prefix"
                             % what)
    if "\0" in path:
        raise LibrarianError(400, "%s may not contain a NUL character" % what)
    if path.startswith("/"):
        raise LibrarianError(400, "%s %r must be relative to the store's path_prefix (as "
                             "initiate_upload returns it), not absolute" % (what, path))
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise LibrarianError(400, "%s %r may not contain '..'" % (what, path))
    check_name_lengths(parts, path)
    return parts


def check_name_lengths(parts, path):
    """Refuse (400) a path with a component longer than NAME_MAX_BYTES or a
    total longer than PATH_MAX_BYTES (in UTF-8), the limits of Linux file
    systems, before any store is asked."""
    if any(len(p.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES for p in parts):
        raise LibrarianError(400, "a name in %r is longer than %d bytes, too long for the store's "
                             "file system" % (path, NAME_MAX_BYTES))
    if len(path.encode("utf-8", "surrogatepass")) > PATH_MAX_BYTES // 2:
        raise LibrarianError(400, "the path %r is longer than %d bytes" % (path,
                                                                         PATH_MAX_BYTES // 2))


def marker_text(staging_dir, store_path):
    """The text of a DESTINATION marker: the store path and an HMAC of it
    and of its staging folder under a secret key of the server's database
    (clients may write in staging folders, but cannot forge a marker)."""
    return "%s\n%s" % (store_path, _marker_mac(staging_dir, store_path))


def set_marker_key(key):
    """The key that signs markers: a secret kept in the server's database,
    so that it outlives restarts and configuration changes (start-up sets
    it; until then a key of this process alone is used)."""
    _marker_key[0] = key.encode("ascii")


def _marker_mac(staging_dir, store_path):
    return hmac.new(_marker_key[0], ("%s\0%s" % (posixpath.normpath(staging_dir), store_path))
                    .encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()


def read_marker(staging_dir, text):
    """The store path a marker names; ValueError unless the server wrote it
    for `staging_dir`."""
    store_path, _, mac = text.rpartition("\n")
    if not hmac.compare_digest(mac, _marker_mac(staging_dir, store_path)):
        raise ValueError("marker not signed by this server")
    return store_path


def is_inside(path, root):
    """Whether the normalised absolute `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")


# ---------------------------------------------------------------------------
# Streams
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
    releases the GIL on large buffers), so that hashing and writes overlap
    instead of adding up. At most two chunks are in flight."""
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


def _read_exactly(f, size, label):
    """Yield the `size` bytes of the open file `f` in chunks; IOError if it
    is shorter."""
    sent = 0
    while sent < size:
        chunk = f.read(min(CHUNK, size - sent))
        if not chunk:
            raise IOError("%s shrank while being read" % label)
        sent += len(chunk)
        yield chunk


# ---------------------------------------------------------------------------
# File systems: the primitives the store logic needs, on absolute paths
# ---------------------------------------------------------------------------


class LocalFS:
    """The file system of this host."""

    where = "this host"

    def lstat(self, path):
        """`os.lstat`; FileNotFoundError when missing."""
        return os.lstat(path)

    def lexists(self, path):
        return os.path.lexists(path)

    def scandir(self, path):
        """[(name, lstat result)] of a directory's entries, sorted by name."""
        with os.scandir(path) as it:
            return sorted((e.name, e.stat(follow_symlinks=False)) for e in it)

    def mkdir(self, path, mode=0o755):
        os.mkdir(path, mode)

    def makedirs(self, path):
        os.makedirs(path, exist_ok=True)

    def open(self, path, mode):
        """A binary file: mode 'rb', or 'xb' (new file, never replacing)."""
        return open(path, mode)

    def write_text(self, path, text):
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)

    def read_text(self, path, limit=1 << 16):
        """At most `limit` bytes of a small text file (UTF-8; ValueError
        otherwise)."""
        with open(path, "rb") as f:
            return f.read(limit).decode("utf-8")

    def rename_new(self, src, dst):
        """Move `src` to the new path `dst` atomically; a file never
        replaces an existing entry (link, then unlink)."""
        if os.path.isdir(src) and not os.path.islink(src):
            os.rename(src, dst)
        else:
            os.link(src, dst)
            os.unlink(src)

    def unlink(self, path):
        os.unlink(path)

    def chmod(self, path, mode):
        os.chmod(path, mode)

    def realpath(self, path):
        return os.path.realpath(path)

    def remove_tree(self, path):
        """Remove a file or tree, first making its directories writable
        (files and links keep their modes: a hard link elsewhere must not
        change)."""
        if not os.path.lexists(path):
            return
        if os.path.isdir(path) and not os.path.islink(path):
            for dirpath, dirnames, filenames in os.walk(path):
                os.chmod(dirpath, 0o755)
            shutil.rmtree(path)
        else:
            os.unlink(path)

    def make_readonly(self, path):
        """Files 0444, sub-directories 0555; the top directory stays
        writable (see `StoreAccess.move_into_place`). Links are not
        followed."""
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

    def find_special(self, path):
        """The first entry of a file or tree that is neither a regular file
        nor a directory (a link, device, FIFO or socket), or None."""
        def bad(p):
            st = os.lstat(p)
            return not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode))

        if bad(path):
            return path
        if os.path.isdir(path):
            for dirpath, dirnames, filenames in os.walk(path):
                for n in dirnames + filenames:
                    if bad(os.path.join(dirpath, n)):
                        return os.path.join(dirpath, n)
        return None

    def path_info(self, path):
        """(size in bytes, md5) by the shared definition."""
        return path_md5(path)

    def disk_usage(self, path):
        """DiskUsage of the file system holding `path`; OSError when
        unreachable."""
        return DiskUsage(*shutil.disk_usage(path))

    def is_writable_dir(self, path):
        return os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK)

    def read_observation(self, path):
        """`uvmeta.read_observation` of the file or directory at `path`."""
        return uvmeta.read_observation(path)


# ---------------------------------------------------------------------------
# Tar streams, on any file system
# ---------------------------------------------------------------------------

def _tar_member_path(member):
    """The relative path parts a tar member is unpacked to, or a 400
    naming the member: absolute paths, `..`, links, devices and FIFOs are
    refused."""
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


def receive_tar(fs, reader, dest, name):
    """Unpack a tar stream into the new directory `dest` on `fs`, computing
    each file's MD5 as it is written; returns (size, md5) by the directory
    definition. The members sit either all under one top folder called
    `name` (as `tar -C PARENT -c NAME` and our downloads make them), or at
    the top level (`tar -C DIR -c .`); the first member decides. Raises
    `LibrarianError(400)` on unsafe or malformed input."""
    fs.mkdir(dest)
    made = {""}  # folders created, relative to dest
    entries = {}
    total = 0
    under_top = None

    def make_parents(rel_dir):
        parts = rel_dir.split("/") if rel_dir else []
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in made:
                if sub in entries:
                    raise FileExistsError(sub)
                fs.mkdir(posixpath.join(dest, sub))
                made.add(sub)

    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for member in tar:
                parts = _tar_member_path(member)
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
                check_name_lengths(parts, member.name)
                if member.isdir():
                    if rel in entries:
                        raise FileExistsError(rel)
                    make_parents(rel)
                    continue
                if rel in entries or rel in made:
                    raise LibrarianError(400, "tar member %r appears twice, or as a file and "
                                         "a folder" % member.name)
                make_parents(posixpath.dirname(rel))
                with fs.open(posixpath.join(dest, rel), "xb") as out:
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


def walk(fs, path, rel=""):
    """Yield (relative path, lstat) of everything under the directory
    `path` on `fs`, folders before their contents, sorted by name."""
    for name, st in fs.scandir(path):
        sub = posixpath.join(rel, name) if rel else name
        yield sub, st
        if stat.S_ISDIR(st.st_mode):
            yield from walk(fs, posixpath.join(path, name), sub)


def _tar_entries(fs, path, name):
    """(TarInfo, absolute path or None) for a directory, sorted, under the
    top folder `name`; deterministic owner and mode bits. Links and special
    files are not sent."""
    def info(st, arcname):
        ti = tarfile.TarInfo(arcname)
        ti.mtime = int(st.st_mtime)
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        if stat.S_ISDIR(st.st_mode):
            ti.type, ti.mode, ti.size = tarfile.DIRTYPE, 0o755, 0
        else:
            ti.type, ti.mode, ti.size = tarfile.REGTYPE, 0o644, st.st_size
        return ti

    yield info(fs.lstat(path), name), None
    for rel, st in walk(fs, path):
        if stat.S_ISDIR(st.st_mode):
            yield info(st, posixpath.join(name, rel)), None
        elif stat.S_ISREG(st.st_mode):
            yield info(st, posixpath.join(name, rel)), posixpath.join(path, rel)


def _padding(n):
    return (-n) % TAR_BLOCK


def tar_size(fs, path, name):
    """Exact byte length of the tar stream `iter_tar(fs, path, name)` yields."""
    total = 0
    for ti, abs_path in _tar_entries(fs, path, name):
        total += len(ti.tobuf(tarfile.PAX_FORMAT)) + ti.size + _padding(ti.size)
    total += 2 * TAR_BLOCK
    return total + (-total) % TAR_RECORD


def iter_tar(fs, path, name, size=None):
    """Yield a tar stream of the directory `path` on `fs` with members under
    the top folder `name`, built on the fly in chunks (no temporary copy).
    The directory is listed before the first chunk, and an IOError raised
    then if its files hold other than `size` bytes (their record's, when
    given); once a chunk is sent, a store host's sessions are waited for
    longer (`sshfs.stream_started`)."""
    (top, _), *members = _tar_entries(fs, path, name)
    found = sum(ti.size for ti, abs_path in members if abs_path is not None)
    if size is not None and found != size:
        raise IOError("%s holds %d bytes, not the %d of its record" % (path, found, size))
    header = top.tobuf(tarfile.PAX_FORMAT)
    yield header
    total = len(header)
    with stream_started():
        for ti, abs_path in members:
            header = ti.tobuf(tarfile.PAX_FORMAT)
            total += len(header)
            yield header
            if abs_path is None:
                continue
            with fs.open(abs_path, "rb") as f:
                yield from _read_exactly(f, ti.size, abs_path)
            pad = _padding(ti.size)
            total += ti.size + pad
            if pad:
                yield b"\0" * pad
        end = 2 * TAR_BLOCK
        end += (-(total + end)) % TAR_RECORD
        yield b"\0" * end


def iter_file(fs, path, start=0, length=None):
    """Yield `length` bytes (None: to the end) of the file `path` on `fs`
    from byte `start`, in chunks."""
    with fs.open(path, "rb") as f:
        if start:
            f.seek(start)
        if length is None:
            yield from iter(lambda: f.read(CHUNK), b"")
        else:
            yield from _read_exactly(f, length, path)


def copy_tree(src_fs, src, dst_fs, dst, progress=None):
    """Copy the file or directory `src` on `src_fs` to the new path `dst` on
    `dst_fs`, streaming (either may be local or remote); `progress(n)` is
    called with each chunk's bytes. Links and special files are refused
    with `LibrarianError(400)`."""
    bad = src_fs.find_special(src)
    if bad is not None:
        raise LibrarianError(400, "%s is a link or special file" % bad)
    if not stat.S_ISDIR(src_fs.lstat(src).st_mode):
        _copy_file(src_fs, src, dst_fs, dst, progress)
        return
    dst_fs.mkdir(dst)
    for rel, st in walk(src_fs, src):
        if stat.S_ISDIR(st.st_mode):
            dst_fs.mkdir(posixpath.join(dst, rel))
        else:
            _copy_file(src_fs, posixpath.join(src, rel), dst_fs, posixpath.join(dst, rel),
                       progress)


def _copy_file(src_fs, src, dst_fs, dst, progress=None):
    with src_fs.open(src, "rb") as f, dst_fs.open(dst, "xb") as out:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            out.write(chunk)
            if progress:
                progress(len(chunk))


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------

_ssh_settings = {}   # store name -> its [store:NAME] section
_marker_key = [secrets.token_bytes(32)]  # see set_marker_key

_connections = {}    # (store name, SSHTarget) -> SSHConnection
_connections_lock = threading.Lock()


def configure(config):
    """Remember the `[store:NAME]` sections (transport and SSH settings);
    connections made under the previous settings are closed."""
    _ssh_settings.clear()
    _ssh_settings.update(config.stores)
    with _connections_lock:
        for conn in _connections.values():
            conn.retired = True
            conn.drop()
        _connections.clear()


def transport_of(row):
    """'local' or 'ssh' for a store record: `[store:NAME] transport`, else
    local when its ssh_host names this host."""
    spec = _ssh_settings.get(row.name, {})
    if spec.get("transport"):
        return spec["transport"]
    return "local" if names_this_host(row.ssh_host) else "ssh"


def ssh_target(row):
    """The SSHTarget of a store record, from its configuration section."""
    spec = _ssh_settings.get(row.name, {})
    return SSHTarget(row.ssh_host, spec.get("ssh_port") or 22, spec.get("ssh_user"),
                     spec.get("ssh_key"), spec.get("known_hosts"),
                     spec.get("ssh_timeout") or 15.0)


def describe_access(row):
    """How the server reaches a store, in words: 'directly (this host)' or
    'over SSH as USER to HOST port N'."""
    if transport_of(row) == "local":
        return "directly (this host)"
    target = ssh_target(row)
    return "over SSH as %s to %s port %d" % (target.user or "the server's user", target.host,
                                             target.port)


def connection(row):
    """The shared SSHConnection of a store on another host."""
    key = (row.name, ssh_target(row))
    with _connections_lock:
        if key not in _connections:
            _connections[key] = SSHConnection(row.name, key[1])
        return _connections[key]


def open_store(row):
    """A `StoreAccess` for the `models.Store` record `row`, on the local or
    SSH file system as configured."""
    if transport_of(row) == "local":
        return StoreAccess(row, LocalFS())
    return StoreAccess(row, SSHFS(connection(row)))


def present_instance(file_name, available_only=False):
    """(FileInstance, StoreAccess, absolute path) of the first instance of
    `file_name` (by store name) whose bytes are present, optionally only on
    available stores; (None, None, None) when there is none. Unreachable
    stores are passed over. The one place that decides which copy the
    server reads from. Raises `StoreUnreachable` when no instance is
    present but one could be on a store that cannot be reached now."""
    from models import FileInstance, Store

    query = (FileInstance.select(FileInstance, Store).join(Store)
             .where(FileInstance.file == file_name).order_by(Store.name))
    if available_only:
        query = query.where(Store.available == True)  # noqa: E712
    unreachable = None
    for inst in query:
        store = open_store(inst.store)
        try:
            path = store.resolve(inst.store_path)
            if store.fs.lexists(path):
                return inst, store, path
        except StoreUnreachable as e:
            unreachable = unreachable or e
    if unreachable is not None:
        raise unreachable
    return None, None, None


class StoreAccess:
    """Operations on one store, through its file system `fs` (`LocalFS` or
    `SSHFS`). `row` is the `models.Store` record. Paths given to methods
    are store paths (relative to the prefix) unless named `abs_...`;
    absolute paths are paths on the store's host."""

    def __init__(self, row, fs):
        self.row, self.fs = row, fs
        self.name = row.name
        self.prefix = row.path_prefix

    # -- paths --------------------------------------------------------------

    def resolve(self, store_path):
        """Absolute path of a store path, refusing (400) one whose existing
        part resolves outside the store or into its staging area, symlinks
        included."""
        parent_dirs, name = split_store_path(store_path)
        root = self.fs.realpath(self.prefix)
        parent = self.fs.realpath(posixpath.join(root, parent_dirs)) if parent_dirs else root
        if not is_inside(parent, root):
            raise LibrarianError(400, "store path %r resolves outside store %r"
                                 % (store_path, self.name))
        if is_inside(parent, posixpath.join(root, STAGING)):
            raise LibrarianError(400, "store path %r resolves into the staging area"
                                 % store_path)
        full = posixpath.join(parent, name)
        try:
            if stat.S_ISLNK(self.fs.lstat(full).st_mode):
                raise LibrarianError(400, "store path %r is a symbolic link" % store_path)
        except (FileNotFoundError, NotADirectoryError):
            pass
        return full

    def staging_root(self):
        return posixpath.join(self.prefix, STAGING)

    def is_staging_dir(self, abs_path):
        """Whether `abs_path` names a directory directly in the staging
        area (as `new_staging_dir` makes them)."""
        return posixpath.dirname(posixpath.normpath(abs_path)) == self.staging_root()

    def new_staging_dir(self):
        """Create and return a fresh, empty staging directory."""
        self.fs.makedirs(self.staging_root())
        path = posixpath.join(self.staging_root(), uuid.uuid4().hex)
        self.fs.mkdir(path)
        return path

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
            raise LibrarianError(400, "%s %r is inside the server's own staging area, but "
                                 "not one of its issued folders" % (what, subdir))
        root = self.fs.realpath(self.prefix)
        real = self.fs.realpath(posixpath.join(root, *parts))
        if real == root or not is_inside(real, root) \
                or is_inside(real, posixpath.join(root, STAGING)):
            raise LibrarianError(400, "%s %r resolves to %s, which is not a folder of store %r "
                                 "outside its staging area" % (what, subdir, real, self.name))
        try:
            is_dir = stat.S_ISDIR(self.fs.lstat(real).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            is_dir = None
        if not is_dir:
            raise LibrarianError(400, "%s %r %s on %s" % (
                what, subdir, "does not exist" if is_dir is None else "is not a folder",
                self.describe()))
        return real

    def take_from_known(self, known_dir, name, private):
        """Move the operator's `known_dir/name` into the server's fresh,
        empty staging folder `private` (whose origin the caller has
        recorded) and return (its new absolute path, its modes), so that
        nothing is written in the operator's folder. (An open descriptor of
        a writer still writing it keeps writing, though.) 400 when nothing,
        or a link, is there; 409 when it cannot be moved there (another
        file system, say)."""
        src = posixpath.join(known_dir, name)
        try:
            is_link = stat.S_ISLNK(self.fs.lstat(src).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            raise LibrarianError(400, "nothing staged at %s on %s" % (src, self.describe())) \
                from None
        if is_link:
            raise LibrarianError(400, "%s on %s is a symbolic link" % (src, self.describe()))
        modes = self.tree_modes(src)
        staged = posixpath.join(private, name)
        try:
            self.fs.rename_new(src, staged)
        except OSError as e:
            raise LibrarianError(409, "cannot move %s into the staging area of %s (%s): a "
                                 "folder on another file system than the store's cannot be "
                                 "ingested from; copy it onto the store, or register it where "
                                 "it is" % (src, self.describe(), e.strerror or e)) from None
        return staged, modes

    def tree_modes(self, abs_path):
        """[(relative path, permission bits)] of a file or tree."""
        modes = [("", stat.S_IMODE(self.fs.lstat(abs_path).st_mode))]
        if stat.S_ISDIR(self.fs.lstat(abs_path).st_mode):
            modes += [(rel, stat.S_IMODE(st.st_mode)) for rel, st in walk(self.fs, abs_path)]
        return modes

    def give_back(self, private, origin, modes=None):
        """Settle a `take_from_known`: bytes still in the staging folder
        `private` (not registered) go back to the store path `origin`, with
        their `modes` if given; the folder goes. Returns True when settled;
        False (logged, never raised) when the bytes cannot go back, because
        something else is at `origin` now or its folder is gone: they are
        then kept where they are, for an operator to see to."""
        staged = posixpath.join(private, posixpath.basename(origin))
        try:
            if self.fs.lexists(staged):
                back = self.resolve(origin)
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
        self.fs.makedirs(self.prefix)

    def clean_staging(self, keep=(), skip=(), is_registered=lambda store_path: True):
        """Start-up cleaning of the staging area. First undo moves that a
        crash interrupted: a staging directory whose DESTINATION marker
        names a store path that `is_registered(store_path)` denies had its
        bytes moved but never recorded, so they are moved back. Then remove
        everything except the directories in `keep` (absolute paths). The
        directories in `skip` (a live process's) are not touched at all.
        Returns how many entries were removed."""
        root = self.staging_root()
        try:
            entries = self.fs.scandir(root)
        except FileNotFoundError:
            return 0
        keep, skip = set(keep), set(skip)
        removed = 0
        for entry, st in entries:
            path = posixpath.join(root, entry)
            if path in skip:
                continue
            try:
                if stat.S_ISDIR(st.st_mode):
                    self.undo_interrupted_move(path, is_registered)
                if path not in keep:
                    self.fs.remove_tree(path)
                    removed += 1
            except OSError as e:  # one folder that cannot be settled does not stop the rest
                log.error("could not clean %s on store %s: %s", path, self.name, e)
        return removed

    def undo_interrupted_move(self, staging_dir, is_registered):
        """If the DESTINATION marker of `staging_dir` (signed by this
        server) names a store path whose bytes are there but which
        `is_registered(store_path)` denies, move them back into the folder
        (a crash came between the move and the commit); forget the
        marker."""
        marker = posixpath.join(staging_dir, DESTINATION_MARKER)
        try:
            if not stat.S_ISREG(self.fs.lstat(marker).st_mode):
                return
        except FileNotFoundError:
            return
        try:
            store_path = read_marker(staging_dir, self.fs.read_text(marker))
            final = self.resolve(store_path)
        except (ValueError, LibrarianError):
            log.warning("ignoring the marker in %s on store %s: the server did not write it",
                        staging_dir, self.name)
            return
        staged = posixpath.join(staging_dir, posixpath.basename(final))
        if not is_registered(store_path) and self.fs.lexists(final):
            if not self.fs.lexists(staged):
                log.warning("moving unregistered %s on store %s back to staging: its "
                            "registration was interrupted", store_path, self.name)
                if stat.S_ISDIR(self.fs.lstat(final).st_mode):
                    self.fs.chmod(final, 0o755)
                self.fs.rename_new(final, staged)
            elif self._same_file(final, staged):  # the move's link made, its unlink not
                self.fs.unlink(final)
        self.fs.unlink(marker)

    # -- bytes in -------------------------------------------------------------

    def receive(self, reader, abs_dest, name, is_tar):
        """Write a request body to the new path `abs_dest` (a file, or a
        directory unpacked from a tar stream); returns (size, md5)."""
        if is_tar:
            return receive_tar(self.fs, reader, abs_dest, name)
        with self.fs.open(abs_dest, "xb") as out:
            return _copy_hashing(reader, out)

    def move_into_place(self, abs_staged, store_path, readonly=True):
        """Atomically move a staged file or directory to `store_path`,
        creating parent directories; never replaces an existing entry
        (409). With `readonly`, the bytes are read-only when they appear
        (a directory's own mode is closed right after the rename). Returns
        the final absolute path."""
        final = self.resolve(store_path)
        staging_dir = posixpath.dirname(abs_staged)
        # The marker stays in the staging folder for as long as the bytes
        # may be at `final` without their record: if the process dies or
        # the host stops answering before that is settled (the record
        # committed: `forget_marker`; the move undone), start-up's
        # clean_staging undoes the move, and remove_quietly keeps the folder.
        self._write_marker(staging_dir, DESTINATION_MARKER, store_path)
        try:
            self.fs.makedirs(posixpath.dirname(final))
        except (FileExistsError, NotADirectoryError):
            self.forget_marker(staging_dir)
            raise LibrarianError(409, "a folder of the store path %r is a file on store %r"
                                 % (store_path, self.name)) from None
        except BaseException:
            self.forget_marker(staging_dir)
            raise
        try:
            final = self.resolve(store_path)  # re-check now that parents exist
            if self.fs.lexists(final):
                raise LibrarianError(409, "%s already exists on store %r but is not registered "
                                     "there" % (store_path, self.name))
            is_dir = stat.S_ISDIR(self.fs.lstat(abs_staged).st_mode)
            if readonly:
                self.fs.make_readonly(abs_staged)
            self.fs.rename_new(abs_staged, final)
        except LibrarianError as e:
            if e.status != 503:  # not a host gone quiet: nothing was moved
                self.forget_marker(staging_dir)
            raise  # else the rename may have happened: the marker stays
        except OSError:
            self.forget_marker(staging_dir)
            raise
        if is_dir and readonly:
            try:
                self.fs.chmod(final, 0o555)
            except BaseException:
                self.undo_move(final, abs_staged)
                raise
        return final

    def undo_move(self, final, abs_staged):
        """Move bytes that `move_into_place` put at `final` back to
        `abs_staged` (their registration failed); quietly: when that fails
        too, the marker stays and the next start undoes the move."""
        try:
            if stat.S_ISDIR(self.fs.lstat(final).st_mode):
                self.fs.chmod(final, 0o755)
            self.fs.rename_new(final, abs_staged)
        except (OSError, LibrarianError) as e:
            log.warning("could not move %s back to staging on store %s (the next start "
                        "will): %s", final, self.name, e)
            return
        self.forget_marker(posixpath.dirname(abs_staged))

    def forget_marker(self, staging_dir):
        """Remove the DESTINATION marker of `staging_dir` once its move is
        settled; quietly: a marker left behind only costs start-up a check
        (it never acts on a registered path)."""
        try:
            self.fs.unlink(posixpath.join(staging_dir, DESTINATION_MARKER))
        except FileNotFoundError:
            pass
        except (OSError, LibrarianError) as e:
            log.warning("could not remove the marker in %s on store %s: %s", staging_dir,
                        self.name, e)

    def _write_marker(self, staging_dir, marker_name, store_path):
        """Write a marker naming `store_path` as a new file: whatever is at
        its place (a staging folder may have been written by a client) goes
        first, so that a planted link is never followed. It is signed
        (`marker_text`), so that a marker a client forged is never acted on."""
        marker = posixpath.join(staging_dir, marker_name)
        try:
            if stat.S_ISDIR(self.fs.lstat(marker).st_mode):
                self.fs.remove_tree(marker)
            else:
                self.fs.unlink(marker)
        except FileNotFoundError:
            pass
        with self.fs.open(marker, "xb") as f:
            f.write(marker_text(staging_dir, store_path).encode("utf-8"))

    def check_staging_dir(self, abs_path):
        """Refuse (400) a staging folder that is not a real folder directly
        in this store's staging area (a link put in its place, say)."""
        try:
            st = self.fs.lstat(abs_path)
        except (FileNotFoundError, NotADirectoryError):
            raise LibrarianError(400, "staging folder %s does not exist on %s"
                                 % (abs_path, self.describe())) from None
        root = self.fs.realpath(self.staging_root())
        real = self.fs.realpath(abs_path)
        if not stat.S_ISDIR(st.st_mode) or posixpath.dirname(real) != root:
            raise LibrarianError(400, "staging folder %s is not a folder of the staging area of "
                                 "%s" % (abs_path, self.describe()))

    def close_directory(self, abs_path):
        """Make a registered directory itself read-only (its contents are
        made so by `fs.make_readonly`)."""
        if stat.S_ISDIR(self.fs.lstat(abs_path).st_mode):
            self.fs.chmod(abs_path, 0o555)

    # -- bytes out and away -------------------------------------------------

    def delete(self, store_path):
        """Remove the bytes at `store_path` (made writable first)."""
        self.fs.remove_tree(self.resolve(store_path))

    def remove_quietly(self, abs_path):
        """Best-effort removal of a staging folder: failures are logged, not
        raised (start-up cleaning catches what remains). A folder that
        still holds a DESTINATION marker is kept: the bytes it staged may
        be in place without their record, which start-up settles."""
        try:
            if self.fs.lexists(posixpath.join(abs_path, DESTINATION_MARKER)):
                log.warning("keeping %s on store %s until the next start: the move it "
                            "staged may have happened without its record", abs_path, self.name)
                return
            self.fs.remove_tree(abs_path)
        except (OSError, LibrarianError) as e:
            log.warning("could not remove %s on store %s: %s", abs_path, self.name, e)

    def exists(self, store_path):
        return self.fs.lexists(self.resolve(store_path))

    def is_dir(self, abs_path):
        return stat.S_ISDIR(self.fs.lstat(abs_path).st_mode)

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
