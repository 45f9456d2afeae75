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
[0, 24)), or None for files of other kinds.
"""

import math
import os

from librarian_client import file_type  # noqa: F401  (re-exported: one definition)

SECONDS_PER_DAY = 86400.0
HOURS_PER_RADIAN = 12.0 / math.pi


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
            start_jd = float(uv["time"])
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


def jd_to_gps_seconds(jd):
    """GPS seconds of a UTC Julian Date (astropy handles leap seconds)."""
    from astropy.time import Time

    return float(Time(jd, format="jd", scale="utc").gps)


def read_uvh5(path):
    """Metadata of the UVH5 file at `path`. Raises `MetadataError` when it is
    not a readable UVH5 file."""
    import h5py
    import numpy as np

    try:
        with h5py.File(path, "r") as f:
            header = f["Header"]
            times = np.asarray(header["time_array"][()], dtype=float)
            if times.size == 0:
                raise MetadataError("UVH5 file has an empty time_array")
            first = int(np.argmin(times))
            start_jd, stop_jd = float(times[first]), float(times.max())
            lst = None
            if "lst_array" in header:
                lst = _lst_hours(header["lst_array"][first])
    except MetadataError:
        raise
    except Exception as e:
        raise MetadataError("cannot read UVH5 header: %s" % e) from e
    return {"obsid": int(math.floor(jd_to_gps_seconds(start_jd))), "start_time_jd": start_jd,
            "stop_time_jd": stop_jd, "start_lst_hr": lst}


def read_observation(path):
    """Observation metadata of the file or directory at `path`, chosen by its
    shape: a directory holding `visdata` is MIRIAD, a `.uvh5` file is UVH5.
    Returns None for anything else; raises `MetadataError` for a data set
    whose header cannot be read."""
    if os.path.isdir(path) and os.path.exists(os.path.join(path, "visdata")):
        return read_miriad(path)
    if os.path.isfile(path) and path.endswith(".uvh5"):
        return read_uvh5(path)
    return None
