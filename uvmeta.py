"""Observation metadata read from the data files themselves.

Two formats are understood, both read from their headers only so that the
cost does not grow with the visibilities:

- MIRIAD data sets (directories), through aipy. The correlator writes the
  obsid as the variable `obsid`; the start is the first integration's
  `time` (JD) and `lst` (radians); the stop is the last integration,
  `time + (ntimes - 1) * inttime` (MIRIAD `inttime` is in seconds).
- UVH5 files (HDF5, the pyuvdata format, Header group described in
  pyuvdata's "UVH5 memo"), through h5py. Start and stop are the earliest
  and latest entries of `Header/time_array` (JD, UTC); the obsid is the
  floor of the start as GPS seconds (astropy); the start LST comes from
  `Header/lst_array` (radians) at the earliest time.

`read_observation(path)` returns a dict `{obsid, start_time_jd,
stop_time_jd, start_lst_hr}` (obsid an int, JD floats, LST in hours in
[0, 24)), or None for files of other kinds. The readers (aipy's C code,
HDF5) run in a separate worker process: a malformed data set that crashes
them costs that process, never the server, and is reported as a
`MetadataError`.
"""

import math
import multiprocessing
import os
import posixpath
import stat
import tempfile
import threading
import time
import concurrent.futures
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from librarian_client import file_type  # noqa: F401  (re-exported: one definition)

SECONDS_PER_DAY = 86400.0
HOURS_PER_RADIAN = 12.0 / math.pi
PLAUSIBLE_JD = (2400000.5, 2600000.5)  # 1858 to 2406: anything else is a broken header


class MetadataError(Exception):
    """The file looks like a data set of a known kind but its header cannot
    be read or lacks what is needed; the message says what."""


def _lst_hours(radians):
    return (float(radians) * HOURS_PER_RADIAN) % 24.0


def read_miriad(path):
    """Metadata of the MIRIAD data set at `path` (a directory with a
    `visdata` file). Raises `MetadataError` when it cannot be read."""
    import aipy

    try:
        uv = aipy.miriad.UV(path)
        try:
            names = set(uv.vars())
            if "obsid" not in names:
                raise MetadataError("MIRIAD data set has no 'obsid' variable")
            start_jd = _check_jd(float(uv["time"]), "the first 'time'")
            stop_jd = start_jd
            if "ntimes" in names and "inttime" in names:
                stop_jd = start_jd + (int(uv["ntimes"]) - 1) * float(uv["inttime"]) / SECONDS_PER_DAY
            return {"obsid": int(uv["obsid"]), "start_time_jd": start_jd,
                    "stop_time_jd": stop_jd, "start_lst_hr": _lst_hours(uv["lst"])}
        finally:
            del uv
    except (MetadataError, MemoryError):  # MemoryError: the reader's limit (run_reader)
        raise
    except Exception as e:  # aipy raises bare IOError/KeyError/RuntimeError
        raise MetadataError("cannot read MIRIAD header: %s" % e) from e


def _check_jd(jd, what):
    if not (math.isfinite(jd) and PLAUSIBLE_JD[0] <= jd <= PLAUSIBLE_JD[1]):
        raise MetadataError("%s is %r, not the Julian Date of an observation" % (what, jd))
    return jd


def jd_to_gps_seconds(jd):
    """GPS seconds of a UTC Julian Date (astropy handles leap seconds)."""
    from astropy.time import Time

    return float(Time(jd, format="jd", scale="utc").gps)


def read_uvh5(path):
    """Metadata of the UVH5 file at `path` (a path, or a binary file object
    with read/seek/tell). Raises `MetadataError` when it is not a readable
    UVH5 file."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            times = np.asarray(_dataset(f, "Header/time_array")[()], dtype=float)
            if times.size == 0:
                raise MetadataError("UVH5 file has an empty time_array")
            if not np.all(np.isfinite(times)):
                raise MetadataError("UVH5 time_array holds values that are not finite")
            first = int(np.argmin(times))
            start_jd = _check_jd(float(times[first]), "the first time_array entry")
            stop_jd = _check_jd(float(times.max()), "the last time_array entry")
            lst = None
            if "lst_array" in f["Header"]:
                lst = _lst_hours(_dataset(f, "Header/lst_array")[first])
                if not math.isfinite(lst):
                    lst = None
            obsid = int(math.floor(jd_to_gps_seconds(start_jd)))
    except (MetadataError, MemoryError):  # MemoryError: the reader's limit (run_reader)
        raise
    except Exception as e:
        raise MetadataError("cannot read UVH5 header: %s" % e) from e
    return {"obsid": obsid, "start_time_jd": start_jd, "stop_time_jd": stop_jd,
            "start_lst_hr": lst}


def _dataset(f, path):
    """The dataset at `path` ('Group/name') of the open h5py File `f`,
    reached through hard links only and stored in the file itself: HDF5
    lets a file point elsewhere (external links, external storage, virtual
    datasets), and a header read must never read another file of the host
    (a caller would learn its bytes from the refusal). Raises
    `MetadataError`."""
    import h5py

    node = f
    for part in path.split("/"):
        link = node.get(part, getlink=True)
        if link is None:
            raise MetadataError("UVH5 file lacks %s" % path)
        if not isinstance(link, h5py.HardLink):
            raise MetadataError("UVH5 %s is a link to elsewhere, which is not read" % path)
        node = node[part]
    if not isinstance(node, h5py.Dataset):
        raise MetadataError("UVH5 %s is not a dataset" % path)
    if node.external or node.is_virtual:
        raise MetadataError("UVH5 %s keeps its values outside the file, which are not read"
                            % path)
    return node


class LocalFiles:
    """The bytes of this host's files, as `data_kind` and `read_via` ask
    for them (a transport of another host offers the same three calls)."""

    lstat = staticmethod(os.lstat)
    listdir = staticmethod(os.listdir)

    @staticmethod
    def open(path):
        return open(path, "rb")


# What a MIRIAD data set's header needs: its items, and of `visdata` only the
# first record, which is what aipy reads on opening (bytes; None: whole).
MIRIAD_HEAD_ITEMS = {"header": None, "vartable": None, "visdata": 16 << 20}


def data_kind(path, files=LocalFiles):
    """'miriad' for a directory holding `visdata`, 'uvh5' for a `.uvh5`
    file, else None; `files` fetches the bytes (see `LocalFiles`)."""
    st = files.lstat(path)
    if stat.S_ISDIR(st.st_mode):
        return "miriad" if "visdata" in files.listdir(path) else None
    if stat.S_ISREG(st.st_mode) and path.endswith(".uvh5"):
        return "uvh5"
    return None


def read_via(files, path):
    """Observation metadata of the data set at `path`, whose bytes `files`
    fetches (a transport of another host): only what the reader needs is
    asked for, a UVH5 header read through the open file, a MIRIAD data
    set's header items (`MIRIAD_HEAD_ITEMS`) copied to a temporary folder.
    None for other kinds; raises `MetadataError`."""
    kind = data_kind(path, files)
    if kind == "uvh5":
        with files.open(path) as f:
            return read_uvh5(f)
    if kind != "miriad":
        return None
    names = set(files.listdir(path))
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, posixpath.basename(path))
        os.mkdir(local)
        for item, limit in MIRIAD_HEAD_ITEMS.items():
            if item in names:
                with files.open(posixpath.join(path, item)) as src, \
                        open(os.path.join(local, item), "wb") as out:
                    out.write(src.read(limit) if limit else src.read())
        return read_miriad(local)


READERS = {"miriad": read_miriad, "uvh5": read_uvh5}
_pool = None
_pool_lock = threading.Lock()


def _reader_pool():
    """The worker process(es) that read headers, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=2,
                                        mp_context=multiprocessing.get_context("spawn"),
                                        initializer=_start_reader,
                                        initargs=(os.getpid(), LIMITS["memory_bytes"]))
        return _pool


PARENT_POLL_SECONDS = 1.0
# What one header read may cost: address space of the reader process (bytes)
# and wall time (seconds); `[server] reader_memory_bytes` and `reader_seconds`.
LIMITS = {"memory_bytes": 2 << 30, "seconds": 60.0}


def set_limits(memory_bytes, seconds):
    """Set the reader's limits (before its first use; see LIMITS)."""
    LIMITS.update(memory_bytes=memory_bytes, seconds=seconds)


def _start_reader(parent, memory_bytes):
    """In a reader process: cap its address space, so that a header asking
    for gigabytes fails with MemoryError instead of exhausting the host,
    and exit as soon as the server that started it is gone (see
    `_die_with_parent`)."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    _die_with_parent(parent)


def _die_with_parent(parent):
    """In a reader process: exit as soon as the server that started it is
    gone (a server killed with SIGKILL cannot stop it; without this, every
    crash left one more reader behind). Polls the parent pid from a daemon
    thread: the process is reparented when its parent dies."""
    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(0)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _discard_pool(pool):
    global _pool
    with _pool_lock:
        if _pool is pool:
            _pool = None
    pool.shutdown(wait=False, cancel_futures=True)


def shutdown():
    """Stop the reader process (at server exit: it must not outlive us)."""
    global _pool
    with _pool_lock:
        pool, _pool = _pool, None
    if pool is not None:
        pool.shutdown(wait=True, cancel_futures=True)


def _read(kind, path):
    return READERS[kind](path)


def run_reader(label, func, *args):
    """Run `func(*args)` (a module-level function: it is pickled by name)
    in the reader process and return its result. Raises `MetadataError`
    naming `label` ('MIRIAD', 'UVH5', 'data set') when the reader process
    crashes."""
    for attempt in (1, 2):
        pool = _reader_pool()
        try:
            return _run_in(pool, label, func, *args)
        except (BrokenProcessPool, concurrent.futures.CancelledError):
            # The reader died or was stopped, by this read or by another caller's
            # (its limits): once more in a fresh one, so that only the culprit fails.
            _discard_pool(pool)
            if attempt == 2:
                raise MetadataError("the %s header is malformed: reading it crashed the "
                                    "reader" % label) from None


# A reader holding more than this after a read is replaced: a header can make
# HDF5 keep memory that it reports as an ordinary error, not as MemoryError.
KEEP_RSS_BYTES = 512 << 20


def _resident_bytes(pid):
    """Resident memory of process `pid` in bytes (Linux /proc); 0 if unknown."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError):
        pass
    return 0


def _discard_if_bloated(pool):
    processes = list((getattr(pool, "_processes", None) or {}).values())
    if any(_resident_bytes(p.pid) > KEEP_RSS_BYTES for p in processes):
        _discard_pool(pool)


def _run_in(pool, label, func, *args):
    """`run_reader` in `pool`: one read under LIMITS; a reader left holding
    more than KEEP_RSS_BYTES afterwards is replaced."""
    try:
        future = pool.submit(func, *args)
    except RuntimeError:  # shut down by another caller meanwhile
        raise BrokenProcessPool("the reader was stopped") from None
    try:
        return _result(pool, label, future)
    finally:
        _discard_if_bloated(pool)


def _result(pool, label, future):
    try:
        return future.result(timeout=LIMITS["seconds"])
    except MemoryError:
        _discard_pool(pool)  # a fresh reader after a refusal
        raise MetadataError("the %s header asks for more than the %d MiB a header read may "
                            "use" % (label, LIMITS["memory_bytes"] >> 20)) from None
    except concurrent.futures.TimeoutError:
        for process in list((getattr(pool, "_processes", None) or {}).values()):
            process.kill()  # the only way to stop a read in progress
        _discard_pool(pool)
        raise MetadataError("reading the %s header took longer than the %g s allowed"
                            % (label, LIMITS["seconds"])) from None


def read_observation(path):
    """Observation metadata of the file or directory at `path`, chosen by its
    shape (see `data_kind`), read in a worker process. Returns None for
    anything else; raises `MetadataError` for a data set whose header cannot
    be read, including one that crashes the reader."""
    try:
        kind = data_kind(path)
    except FileNotFoundError:
        return None
    if kind is None:
        return None
    return run_reader("MIRIAD" if kind == "miriad" else "UVH5", _read, kind,
                      os.path.abspath(path))
