"""The file system of this host, as a store's: the primitives that the
store logic in `stores.StoreAccess` needs, on absolute paths (the same as
`stores.ssh.SSHFS` offers for a host reached over SSH)."""

import os
import shutil
import stat

import uvmeta
from librarian_client import path_md5
from stores.ssh import DiskUsage


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
        change). Iterative: any depth."""
        if not os.path.lexists(path):
            return
        if not os.path.isdir(path) or os.path.islink(path):
            os.unlink(path)
            return
        folders = [path]
        for sub in folders:  # grows as it goes: every folder, parents first
            os.chmod(sub, 0o755)
            with os.scandir(sub) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        folders.append(entry.path)
                    else:
                        os.unlink(entry.path)
        for sub in reversed(folders):
            os.rmdir(sub)

    def _tree(self, path):
        """(path, lstat) of `path` and of everything under it, parents
        first; iterative."""
        st = os.lstat(path)
        pending = [(path, st)]
        while pending:
            current, st = pending.pop()
            yield current, st
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(current) as it:
                    pending += [(e.path, e.stat(follow_symlinks=False)) for e in it]

    def make_readonly(self, path):
        """Files 0444, sub-directories 0555; the top directory stays
        writable (see `StoreAccess.move_into_place`). Links are not
        followed."""
        for p, st in list(self._tree(path)):
            if stat.S_ISREG(st.st_mode):
                os.chmod(p, 0o444)
            elif stat.S_ISDIR(st.st_mode) and p != path:
                os.chmod(p, 0o555)

    def find_special(self, path):
        """The first entry of a file or tree that is neither a regular file
        nor a directory (a link, device, FIFO or socket), or None."""
        for p, st in self._tree(path):
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                return p
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
