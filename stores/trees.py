"""Byte streams and trees on any store file system (`LocalFS`, `SSHFS`):
request bodies, tar streams in and out, walks and copies. Every walk is
iterative (a stack, not recursion), so a tree of any depth is handled in
bounded memory.
"""

import hashlib
import io
import posixpath
import stat
import tarfile
from concurrent.futures import ThreadPoolExecutor

from errors import LibrarianError, short
from librarian_client import CHUNK, directory_digest
from models import check_file_name
from stores.paths import check_name_lengths
from stores.ssh import stream_started

TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK


class Mismatch(IOError):
    """The bytes read do not match their record: `path` (the file or
    directory read), `md5` (what they have; None when their size already
    differs)."""

    def __init__(self, path, md5, message=None):
        super().__init__(message or "%s reads with md5 %s, not the md5 of its record"
                         % (path, md5))
        self.path, self.md5 = path, md5


def held_back(chunks, digest, check):
    """`chunks`, each fed to `digest`; the last one is held back until
    `check()` (which raises `Mismatch`) has passed, so that a reader of a
    bad stream never receives its end."""
    previous = None
    for chunk in chunks:
        if previous is not None:
            yield previous
        digest.update(chunk)
        previous = chunk
    check()
    if previous is not None:
        yield previous


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


class ChunkStream(io.RawIOBase):
    """A seekable, read-only file over a stream of `length` bytes that
    `from_offset(offset)` yields in chunks from any offset: a seek drops
    the current stream, and the next read starts one there."""

    def __init__(self, from_offset, length):
        self.from_offset, self.length = from_offset, length
        self.pos, self.chunks, self.buffer = 0, None, b""

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, offset, whence=io.SEEK_SET):
        pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.length}[whence] + offset
        if pos != self.pos:
            self._drop()
            self.pos = pos
        return self.pos

    def read(self, n=-1):
        n = self.length - self.pos if n is None or n < 0 else min(n, self.length - self.pos)
        if self.chunks is None:
            self.chunks = iter(self.from_offset(self.pos))
        parts, have = [self.buffer], len(self.buffer)
        while have < n:
            chunk = next(self.chunks, b"")
            if not chunk:
                raise IOError("the stream ended at byte %d of %d" % (self.pos + have,
                                                                     self.length))
            parts.append(chunk)
            have += len(chunk)
        data = b"".join(parts)
        out, self.buffer = data[:n], data[n:]
        self.pos += n
        return out

    def _drop(self):
        getattr(self.chunks, "close", lambda: None)()
        self.chunks, self.buffer = None, b""

    def close(self):
        self._drop()
        super().close()


def skip(chunks, n):
    """The chunks after their first `n` bytes."""
    for chunk in chunks:
        if n >= len(chunk):
            n -= len(chunk)
            continue
        yield chunk[n:] if n else chunk
        n = 0


def copy_hashing(reader, out):
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
            raise Mismatch(label, None, "%s holds fewer bytes than its record" % label)
        sent += len(chunk)
        yield chunk


def _tar_member_path(member):
    """The relative path parts a tar member is unpacked to, or a 400
    naming the member: absolute paths, `..`, links, devices and FIFOs are
    refused."""
    path = member.name
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise LibrarianError(400, "tar member %r has a name that is not valid UTF-8"
                             % path[:200]) from None
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


MAX_TAR_HEADER = 1 << 16  # bytes of a long-name or pax header: far above PATH_MAX


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses a long-name or pax header over MAX_TAR_HEADER bytes before
    tarfile reads it whole into memory."""

    def _proc_member(self, tar):
        if self.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                         tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE) and self.size > MAX_TAR_HEADER:
            raise tarfile.HeaderError("a header of %d bytes; at most %d allowed"
                                      % (self.size, MAX_TAR_HEADER))
        return super()._proc_member(tar)


def receive_tar(fs, reader, dest, name, max_depth):
    """Unpack a tar stream into the new directory `dest` on `fs`, computing
    each file's MD5 as it is written; returns (size, md5) by the directory
    definition. The members sit either all under one top folder called
    `name` (as `tar -C PARENT -c NAME` and our downloads make them), or at
    the top level (`tar -C DIR -c .`, whose members start with `./`); the
    first member decides. Raises `LibrarianError(400)` on unsafe or
    malformed input and on folders nested more than `max_depth` deep."""
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
        # "r|": no decompression (a few bytes of bzip2 could fill the store).
        with tarfile.open(fileobj=reader, mode="r|", tarinfo=_BoundedTarInfo) as tar:
            for member in tar:
                parts = _tar_member_path(member)
                if under_top is None:  # `./name/...` is a folder `name` inside the directory
                    under_top = bool(parts) and parts[0] == name and not (
                        member.name == "." or member.name.startswith("./"))
                if not parts:
                    continue
                if under_top:
                    if parts[0] != name:
                        raise LibrarianError(400, "tar member %s is not under the top folder "
                                             "%r" % (short(member.name), name))
                    parts = parts[1:]
                    if not parts:
                        if not member.isdir():
                            raise LibrarianError(400, "tar member %s is a file, but a directory "
                                                 "upload needs a folder %r"
                                                 % (short(member.name), name))
                        continue
                rel = "/".join(parts)
                check_name_lengths(parts, member.name)
                for part in parts:
                    check_file_name(part)  # no control characters, as for the top name
                if len(parts) - (0 if member.isdir() else 1) > max_depth:
                    raise LibrarianError(400, "tar member %r nests folders more than %d deep"
                                         % (member.name[:200], max_depth))
                if member.isdir():
                    if rel in entries:
                        raise FileExistsError(rel)
                    make_parents(rel)
                    continue
                if rel in entries or rel in made:
                    raise LibrarianError(400, "tar member %s appears twice, or as a file and "
                                         "a folder" % short(member.name))
                make_parents(posixpath.dirname(rel))
                with fs.open(posixpath.join(dest, rel), "xb") as out:
                    size, md5 = copy_hashing(tar.extractfile(member), out)
                if size != member.size:
                    raise LibrarianError(400, "tar member %s is truncated" % short(member.name))
                entries[rel] = md5
                total += size
    except tarfile.TarError as e:
        raise LibrarianError(400, "body is not a valid tar stream: %s" % e) from None
    except (FileExistsError, NotADirectoryError, IsADirectoryError):
        raise LibrarianError(400, "tar stream has a file and a folder of the same "
                             "name") from None
    return total, directory_digest(entries.items())


def walk(fs, path):
    """Yield (relative path, lstat) of everything under the directory
    `path` on `fs`, folders before their contents, sorted by name; by a
    stack of listings, so any depth costs no recursion."""
    stack = [iter(fs.scandir(path))]
    rels = [""]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            rels.pop()
            continue
        name, st = entry
        sub = posixpath.join(rels[-1], name) if rels[-1] else name
        yield sub, st
        if stat.S_ISDIR(st.st_mode):
            stack.append(iter(fs.scandir(posixpath.join(path, sub))))
            rels.append(sub)


# Every entry under the folder $1 but its staging area, as "SIZE TYPE PATH\0"
# (find's %s, %y, %P: PATH relative, its bytes as they are: tabs, newlines
# and invalid UTF-8 pass), sorted by the bytes of PATH: `sort -z` in the C
# locale, keyed from the third space-separated field to the end of the
# record, so that a path is compared whole (spaces and all) and a prefix
# sorts first, as Python compares bytes. sort spills to temporary files
# beyond its memory, so any number of entries can be sorted on the store's
# host. Exits non-zero when find could not read everything (its first 4 KiB
# of messages on stderr): a partial listing must never be taken as whole.
LISTING_SCRIPT = """\
d=$(mktemp -d) || exit 1
trap 'rm -rf "$d"' EXIT
cd -- "$1" || exit 1
{ find . -mindepth 1 -path ./.staging -prune -o -printf '%s %y %P\\0' 2>"$d/err" \\
  || : >"$d/failed"; } | LC_ALL=C sort -z -t ' ' -k3 || exit 1
head -c 4096 "$d/err" >&2
[ ! -e "$d/failed" ]
"""


def sorted_listing(fs, path):
    """Yield (relative path as bytes, find's type letter: f file, d folder,
    l link, others special, size in bytes) of every entry under the folder
    `path` on `fs` outside its staging area, sorted by the bytes of the
    path. One command (`LISTING_SCRIPT`) on the host, parsed as its output
    streams in: bounded memory for any number of entries. Raises OSError
    at the end when the listing is incomplete."""
    rest = b""
    for chunk in fs.command_output(["sh", "-c", LISTING_SCRIPT, "sh", path]):
        *records, rest = (rest + chunk).split(b"\0")
        for record in records:
            size, kind, rel = record.split(b" ", 2)
            yield rel, kind.decode("ascii"), int(size)
    if rest:
        raise OSError("the listing of %s ended within a record" % path)


def tree_depth(fs, path):
    """How deep folders nest in the tree at `path` (0 for a file or an
    empty folder; 1 for a folder of files)."""
    if not stat.S_ISDIR(fs.lstat(path).st_mode):
        return 0
    return max([rel.count("/") + 1 for rel, _ in walk(fs, path)] or [0])


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


def iter_tar(fs, path, name, size=None, md5=None):
    """Yield a tar stream of the directory `path` on `fs` with members under
    the top folder `name`, built on the fly in chunks (no temporary copy).
    The directory is listed before the first chunk, and an IOError raised
    then if its files hold other than `size` bytes (their record's, when
    given); once a chunk is sent, a store host's sessions are waited for
    longer (`sshfs.stream_started`). With `md5`, the files' bytes are
    hashed on the way and `Mismatch` raised, instead of the tar's end, when
    the directory's MD5 (the shared definition) is not `md5`."""
    (top, _), *members = _tar_entries(fs, path, name)
    found = sum(ti.size for ti, abs_path in members if abs_path is not None)
    if size is not None and found != size:
        raise Mismatch(path, None, "%s holds %d bytes, not the %d of its record"
                       % (path, found, size))
    header = top.tobuf(tarfile.PAX_FORMAT)
    yield header
    total = len(header)
    hashes = []  # (path relative to the directory, md5)
    with stream_started():
        for ti, abs_path in members:
            header = ti.tobuf(tarfile.PAX_FORMAT)
            total += len(header)
            yield header
            if abs_path is None:
                continue
            digest = hashlib.md5()
            with fs.open(abs_path, "rb") as f:
                for chunk in _read_exactly(f, ti.size, abs_path):
                    if md5 is not None:
                        digest.update(chunk)
                    yield chunk
            hashes.append((posixpath.relpath(abs_path, path), digest.hexdigest()))
            pad = _padding(ti.size)
            total += ti.size + pad
            if pad:
                yield b"\0" * pad
        if md5 is not None and directory_digest(hashes) != md5:
            raise Mismatch(path, directory_digest(hashes))
        end = 2 * TAR_BLOCK
        end += (-(total + end)) % TAR_RECORD
        yield b"\0" * end


def iter_file(fs, path, start=0, length=None, md5=None):
    """Yield `length` bytes (None: to the end) of the file `path` on `fs`
    from byte `start`, in chunks. With `md5` (a read of the whole file),
    `Mismatch` is raised instead of the last chunk when the bytes do not
    have that MD5."""
    if md5 is not None:
        digest = hashlib.md5()

        def check():
            if digest.hexdigest() != md5:
                raise Mismatch(path, digest.hexdigest())
            if length is not None and fs.lstat(path).st_size != length:
                raise Mismatch(path, None, "%s holds more bytes than its record" % path)
        yield from held_back(iter_file(fs, path, 0, length), digest, check)
        return
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
    called with each chunk's bytes. Returns (size in bytes, md5) of what
    was read, by the shared definition, for the caller to compare with
    the record. Links and special files are refused with
    `LibrarianError(400)`."""
    bad = src_fs.find_special(src)
    if bad is not None:
        raise LibrarianError(400, "%s is a link or special file" % bad)
    if not stat.S_ISDIR(src_fs.lstat(src).st_mode):
        return _copy_file(src_fs, src, dst_fs, dst, progress)
    dst_fs.mkdir(dst)
    total, hashes = 0, []
    for rel, st in walk(src_fs, src):
        if stat.S_ISDIR(st.st_mode):
            dst_fs.mkdir(posixpath.join(dst, rel))
        else:
            size, md5 = _copy_file(src_fs, posixpath.join(src, rel), dst_fs,
                                   posixpath.join(dst, rel), progress)
            total += size
            hashes.append((rel, md5))
    return total, directory_digest(hashes)


def _copy_file(src_fs, src, dst_fs, dst, progress=None):
    """Copy one file; returns (size, md5) of the bytes read."""
    digest, size = hashlib.md5(), 0
    with src_fs.open(src, "rb") as f, dst_fs.open(dst, "xb") as out:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
            out.write(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return size, digest.hexdigest()


