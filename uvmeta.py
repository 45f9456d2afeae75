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
import threading
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
    except MetadataError:
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
            header = f["Header"]
            times = np.asarray(header["time_array"][()], dtype=float)
            if times.size == 0:
                raise MetadataError("UVH5 file has an empty time_array")
            if not np.all(np.isfinite(times)):
                raise MetadataError("UVH5 time_array holds values that are not finite")
            first = int(np.argmin(times))
            start_jd = _check_jd(float(times[first]), "the first time_array entry")
            stop_jd = _check_jd(float(times.max()), "the last time_array entry")
            lst = None
            if "lst_array" in header:
                lst = _lst_hours(header["lst_array"][first])
                if not math.isfinite(lst):
                    lst = None
            obsid = int(math.floor(jd_to_gps_seconds(start_jd)))
    except MetadataError:
        raise
    except Exception as e:
        raise MetadataError("cannot read UVH5 header: %s" % e) from e
    return {"obsid": obsid, "start_time_jd": start_jd, "stop_time_jd": stop_jd,
            "start_lst_hr": lst}


def data_kind(path):
    """'miriad' for a directory holding `visdata`, 'uvh5' for a `.uvh5`
    file, else None."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "visdata")):
        return "miriad"
    if os.path.isfile(path) and path.endswith(".uvh5"):
        return "uvh5"
    return None


READERS = {"miriad": read_miriad, "uvh5": read_uvh5}
_pool = None
_pool_lock = threading.Lock()


def _reader_pool():
    """The worker process(es) that read headers, started on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ProcessPoolExecutor(max_workers=2,
                                        mp_context=multiprocessing.get_context("spawn"))
        return _pool


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
    pool = _reader_pool()
    try:
        return pool.submit(func, *args).result()
    except BrokenProcessPool:
        _discard_pool(pool)
        raise MetadataError("the %s header is malformed: reading it crashed the reader"
                            % label) from None


def read_observation(path):
    """Observation metadata of the file or directory at `path`, chosen by its
    shape (see `data_kind`), read in a worker process. Returns None for
    anything else; raises `MetadataError` for a data set whose header cannot
    be read, including one that crashes the reader."""
    kind = data_kind(path)
    if kind is None:
        return None
    return run_reader("MIRIAD" if kind == "miriad" else "UVH5", _read, kind,
                      os.path.abspath(path))
