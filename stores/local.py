"""The file system of this host, as a store's: the primitives that the
store logic in `stores.StoreAccess` needs, on absolute paths (the same as
`stores.ssh.SSHFS` offers for a host reached over SSH).

Every operation below the store's folder goes from a descriptor of that
folder one name at a time, never following a link (`O_NOFOLLOW`, and the
`*at` system calls with folder descriptors): a folder swapped for a link by
another process between a check and the act makes the act fail (or act on
the link itself), never reach outside the store or into registered data.
"""

import contextlib
import errno
import mmap
import os
import posixpath
import shutil
import stat
import subprocess
import tempfile

import quicklook
import uvmeta
from librarian_client import CHUNK, path_md5
from stores.ssh import DiskUsage, remote_error

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
DIRECT_ALIGN = 4096  # bytes: offsets and lengths of writes that may bypass the page cache


def _enter(parent_fd, name):
    """The descriptor of the folder `name` in the folder `parent_fd`,
    never through a link (OSError ELOOP or ENOTDIR otherwise)."""
    return os.open(name, DIR_FLAGS, dir_fd=parent_fd)


def page_aligned(data):
    """The bytes-like `data` in a new anonymous mmap (page-aligned, as
    O_DIRECT needs); also how a chunk is received (`uploads.receive`)."""
    aligned = mmap.mmap(-1, len(data))
    aligned.write(data)
    return aligned


class LocalFS:
    """The file system of this host, for the store whose folder is `root`
    (as configured; its own links are followed, once)."""

    where = "this host"

    def __init__(self, root):
        self.root = posixpath.normpath(root)
        self.real_root = os.path.realpath(self.root)

    # -- reaching a path without links ------------------------------------------

    def _parts(self, path):
        """The names of `path` below the store's folder ([] for the folder
        itself); PermissionError for a path outside it."""
        path = posixpath.normpath(path)
        for root in (self.real_root, self.root):
            if path == root:
                return []
            if path.startswith(root.rstrip("/") + "/"):
                return path[len(root.rstrip("/")) + 1:].split("/")
        raise PermissionError(errno.EACCES, "outside the store's folder %s" % self.root, path)

    @contextlib.contextmanager
    def _parent(self, path):
        """(descriptor of the folder holding `path`, its last name), the
        folder reached from the store's folder without following links."""
        parts = self._parts(path)
        if not parts:
            raise PermissionError(errno.EACCES, "the store's folder itself", path)
        fd = os.open(self.real_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in parts[:-1]:
                child = _enter(fd, name)
                os.close(fd)
                fd = child
            yield fd, parts[-1]
        finally:
            os.close(fd)

    # -- primitives ---------------------------------------------------------------

    def lstat(self, path):
        """lstat of `path`; FileNotFoundError when missing."""
        if not self._parts(path):
            return os.lstat(self.real_root)
        with self._parent(path) as (fd, name):
            return os.stat(name, dir_fd=fd, follow_symlinks=False)

    def lexists(self, path):
        try:
            self.lstat(path)
            return True
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as e:
            if e.errno == errno.ELOOP:  # a folder on the way is a link
                return True
            raise

    @contextlib.contextmanager
    def _folder(self, path):
        """A descriptor of the folder `path`, reached without links."""
        if not self._parts(path):
            fd = os.open(self.real_root, os.O_RDONLY | os.O_DIRECTORY)
        else:
            with self._parent(path) as (parent, name):
                fd = _enter(parent, name)
        try:
            yield fd
        finally:
            os.close(fd)

    def scandir(self, path):
        """[(name, lstat result)] of a directory's entries, sorted by name."""
        with self._folder(path) as fd:
            return sorted((e.name, e.stat(follow_symlinks=False)) for e in os.scandir(fd))

    def mkdir(self, path, mode=0o755):
        with self._parent(path) as (fd, name):
            os.mkdir(name, mode, dir_fd=fd)

    def makedirs(self, path):
        """Make the folders of `path` that are missing (the store's own
        folder too); NotADirectoryError (or ELOOP) where a file or a link
        is met."""
        os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.real_root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in self._parts(path):
                try:
                    os.mkdir(name, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = _enter(fd, name)
                os.close(fd)
                fd = child
        finally:
            os.close(fd)

    def open(self, path, mode):
        """A binary file: mode 'rb', or 'xb' (new file, never replacing);
        never through a link."""
        flags = os.O_RDONLY if mode == "rb" else os.O_WRONLY | os.O_CREAT | os.O_EXCL
        with self._parent(path) as (fd, name):
            return os.fdopen(os.open(name, flags | os.O_NOFOLLOW, 0o644, dir_fd=fd), mode)

    def write_at(self, path, offset, data):
        """Write `data` at byte `offset` of the file `path` (created if
        missing), cutting off whatever lay beyond `offset` first (what an
        interrupted write left). Aligned chunks bypass the page cache
        (O_DIRECT, from a page-aligned copy unless `data` is an mmap, which
        is page-aligned already): a chunk of a resumable upload
        is written once and not read soon, and where page-cache writes are
        slow (seen: a third of direct writes' speed) they set the pace."""
        direct = getattr(os, "O_DIRECT", 0) if (offset | len(data)) % DIRECT_ALIGN == 0 else 0
        if direct and data:
            try:
                aligned = data if isinstance(data, mmap.mmap) else page_aligned(data)
                return self._pwrite(path, offset, memoryview(aligned), direct)
            except OSError as e:
                if e.errno != errno.EINVAL:  # EINVAL: no direct I/O here (tmpfs, say)
                    raise
        self._pwrite(path, offset, memoryview(data), 0)

    def _pwrite(self, path, offset, view, extra_flags):
        with self._parent(path) as (fd, name):
            out = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | extra_flags, 0o644,
                          dir_fd=fd)
        try:
            os.ftruncate(out, offset)
            while view:
                n = os.pwrite(out, view, offset)
                view, offset = view[n:], offset + n
        finally:
            os.close(out)

    def read_text(self, path, limit=1 << 16):
        """At most `limit` bytes of a small text file (UTF-8; ValueError
        otherwise)."""
        with self.open(path, "rb") as f:
            return f.read(limit).decode("utf-8")

    def rename_new(self, src, dst):
        """Move `src` to the new path `dst` atomically; a file never
        replaces an existing entry (link, then unlink). The entries are
        named in their folders: a link at `src` is moved as a link."""
        with self._parent(src) as (sfd, sname), self._parent(dst) as (dfd, dname):
            st = os.stat(sname, dir_fd=sfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                try:
                    os.stat(dname, dir_fd=dfd, follow_symlinks=False)
                    raise FileExistsError(errno.EEXIST, "exists", dst)
                except FileNotFoundError:
                    pass
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
            else:
                os.link(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
                os.unlink(sname, dir_fd=sfd)

    def unlink(self, path):
        with self._parent(path) as (fd, name):
            os.unlink(name, dir_fd=fd)

    def chmod(self, path, mode):
        """Change the mode of a file or folder; a link is never followed
        (ELOOP)."""
        with self._parent(path) as (fd, name):
            _chmod_at(fd, name, mode)

    def realpath(self, path):
        return os.path.realpath(path)

    def remove_tree(self, path):
        """Remove a file or tree, first making its folders writable (files
        keep their modes: a hard link elsewhere must not change); links met
        on the way are removed, never followed. Iterative: any depth."""
        try:
            with self._parent(path) as (fd, name):
                _remove_at(fd, name)
        except FileNotFoundError:
            return

    def _tree(self, path):
        """(path, lstat) of `path` and of everything under it, parents
        first; iterative, never through a link."""
        pending = [(path, self.lstat(path))]
        while pending:
            current, st = pending.pop()
            yield current, st
            if stat.S_ISDIR(st.st_mode):
                pending += [(posixpath.join(current, n), s) for n, s in self.scandir(current)]

    def make_readonly(self, path):
        """Files 0444, sub-directories 0555; the top directory stays
        writable (see `StoreAccess.move_into_place`). Links are not
        followed."""
        for p, st in list(self._tree(path)):
            if stat.S_ISREG(st.st_mode):
                self.chmod(p, 0o444)
            elif stat.S_ISDIR(st.st_mode) and p != path:
                self.chmod(p, 0o555)

    def find_special(self, path):
        """The first entry of a file or tree that is neither a regular file
        nor a directory (a link, device, FIFO or socket), or None."""
        for p, st in self._tree(path):
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return p
        return None

    def writers(self, path):
        """Pids of the other processes of this host that hold a file of the
        tree at `path` open for writing (from /proc: what this process is
        allowed to see of them)."""
        inodes = {(st.st_dev, st.st_ino) for _, st in self._tree(path)
                  if stat.S_ISREG(st.st_mode)}
        found = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            if int(pid) == os.getpid():
                continue
            try:
                fds = os.listdir("/proc/%s/fd" % pid)
            except OSError:
                continue
            for fd in fds:
                try:
                    st = os.stat("/proc/%s/fd/%s" % (pid, fd))
                    if (st.st_dev, st.st_ino) not in inodes:
                        continue
                    with open("/proc/%s/fdinfo/%s" % (pid, fd)) as f:
                        flags = next(int(line.split()[1], 8) for line in f
                                     if line.startswith("flags:"))
                except (OSError, StopIteration, ValueError):
                    continue
                if flags & (os.O_WRONLY | os.O_RDWR):
                    found.add(int(pid))
        return sorted(found)

    def path_info(self, path):
        """(size in bytes, md5) by the shared definition."""
        self.lstat(path)  # reached without links
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

    def quick_look(self, path, baseline, pol):
        """`quicklook.look` of the data set at `path`, in the reader process;
        None for what is not one."""
        kind = uvmeta.data_kind(path)
        if kind is None:
            return None
        return uvmeta.run_reader("data set", quicklook.look, kind, os.path.abspath(path),
                                 baseline, pol)

    def command_output(self, argv):
        """Yield the standard output of the command `argv` (a list) as it
        comes, in chunks; at its end, OSError with its message when it
        exited non-zero. Its standard error goes to a temporary file: a
        command that says much there never blocks on a full pipe while we
        read the other."""
        with tempfile.TemporaryFile() as err, subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err) as proc:
            try:
                yield from iter(lambda: proc.stdout.read1(CHUNK), b"")
            except GeneratorExit:  # the reader stopped early: so does the command
                proc.kill()
                raise
            status = proc.wait()
            err.seek(0)
            if status != 0:
                raise remote_error("%s on this host" % argv[0], err.read(4096))


def _chmod_at(fd, name, mode):
    """chmod of the entry `name` of the folder `fd`, through a descriptor
    opened without following a link."""
    try:
        target = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
    except PermissionError:  # unreadable: the entry itself, checked not to be a link
        if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "a link", name) from None
        os.chmod(name, mode, dir_fd=fd)
        return
    try:
        os.fchmod(target, mode)
    finally:
        os.close(target)


def _listing(fd):
    """The entries of the folder `fd`, read once."""
    with os.scandir(fd) as it:
        return iter(list(it))


def _remove_at(parent, name):
    """Remove the entry `name` of the folder `parent` and all below it,
    folder descriptor by folder descriptor (a stack as deep as the tree)."""
    try:
        fd = _enter(parent, name)
    except OSError as e:
        if e.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        os.unlink(name, dir_fd=parent)  # a file, or a link (removed, not followed)
        return
    stack = [(parent, name, fd, iter(()))]
    try:
        os.fchmod(fd, 0o755)
        stack[0] = (parent, name, fd, _listing(fd))
        while stack:
            pfd, pname, fd, entries = stack[-1]
            child = next(entries, None)
            if child is None:
                stack.pop()
                os.close(fd)
                os.rmdir(pname, dir_fd=pfd)
                continue
            try:
                cfd = _enter(fd, child.name)
            except FileNotFoundError:
                continue  # gone meanwhile
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(child.name, dir_fd=fd)  # a file, or a link: never followed
                continue
            stack.append((fd, child.name, cfd, iter(())))
            os.fchmod(cfd, 0o755)
            stack[-1] = (fd, child.name, cfd, _listing(cfd))
    finally:
        for _, _, open_fd, _ in stack:
            os.close(open_fd)
