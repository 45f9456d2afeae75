"""The rules for store paths, applied before any byte moves.

A store path is relative to its store's `path_prefix`, `/`-separated, with
a valid file name last; the staging area (`STAGING`) is the server's own.
Name and path lengths follow Linux file systems.
"""

from errors import Refused, short
from models import CONTROL_RE, check_file_name

MAX_STORE_PATH_CHARS = 1024  # as the API documents (openapi.STORE_PATH)

STAGING = ".staging"
RESERVED_NAMES = (".librarian-destination",)
NAME_MAX_BYTES, PATH_MAX_BYTES = 255, 4096  # Linux: a store path gets half, the prefix the rest


def split_store_path(store_path):
    """Check a store path (relative, `/`-separated) and return
    `(parent_dirs, name)`. Refuses absolute paths, `..`, the staging area and
    bad names with `LibrarianError(400)`; empty and `.` components are
    dropped."""
    if not isinstance(store_path, str) or not store_path:
        raise Refused("store path must be a non-empty string")
    if "\0" in store_path:
        raise Refused("store path may not contain a NUL character")
    if store_path.startswith("/"):
        raise Refused("store path %s must be relative" % short(store_path))
    if len(store_path) > MAX_STORE_PATH_CHARS:
        raise Refused("store path is %d characters long; at most %d allowed"
                      % (len(store_path), MAX_STORE_PATH_CHARS))
    if CONTROL_RE.search(store_path):
        raise Refused("store path %s may not contain control characters (newlines, tabs, "
                      "...), in its folders either" % short(store_path))
    parts = [p for p in store_path.split("/") if p not in ("", ".")]
    if not parts or store_path.endswith("/"):
        raise Refused("store path %r names no file: it must end in the file's "
                             "name" % store_path)
    if ".." in parts:
        raise Refused("store path %r may not contain '..'" % store_path)
    if parts[0] == STAGING:
        raise Refused("store path %r points into the staging area" % store_path)
    name = check_file_name(parts[-1])
    check_name_lengths(parts, store_path)
    if name in RESERVED_NAMES:
        raise Refused("the name %r is reserved for the Librarian's own use" % name)
    return "/".join(parts[:-1]), name


def check_relative_folder(path, what):
    """Check a folder given relative to a store's prefix (a staging folder
    as `initiate_upload` names it, a known staging folder of an operator):
    returns its normalised parts. Refuses (400) absolute paths, `..`, NUL
    and empty paths, naming `what`."""
    if not isinstance(path, str) or not path.strip("/."):
        raise Refused("%s must name a folder, relative to the store's path_prefix"
                             % what)
    if "\0" in path:
        raise Refused("%s may not contain a NUL character" % what)
    if path.startswith("/"):
        raise Refused("%s %r must be relative to the store's path_prefix (as "
                             "initiate_upload returns it), not absolute" % (what, path))
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise Refused("%s %r may not contain '..'" % (what, path))
    check_name_lengths(parts, path)
    return parts


def check_name_lengths(parts, path):
    """Refuse (400) a path with a component longer than NAME_MAX_BYTES or a
    total longer than PATH_MAX_BYTES (in UTF-8), the limits of Linux file
    systems, before any store is asked."""
    if any(len(p.encode("utf-8", "surrogatepass")) > NAME_MAX_BYTES for p in parts):
        raise Refused("a name in %r is longer than %d bytes, too long for the store's "
                             "file system" % (path, NAME_MAX_BYTES))
    if len(path.encode("utf-8", "surrogatepass")) > PATH_MAX_BYTES // 2:
        raise Refused("the path %r is longer than %d bytes" % (path,
                                                                         PATH_MAX_BYTES // 2))


def is_inside(path, root):
    """Whether the normalised absolute `path` is `root` or below it."""
    return path == root or path.startswith(root.rstrip("/") + "/")
