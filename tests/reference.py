"""Expected values of the sample data sets, computed here independently of
the server's code: aipy by reading every record, h5py and astropy directly,
and the checksum with the `md5sum` and `find` commands themselves."""

import math
import subprocess


def shell_md5(path):
    """MD5 by the shared definition, computed by the shell pipeline itself
    (a flat file: plain md5sum)."""
    import os

    if os.path.isdir(path):
        cmd = ("cd \"$1\" && find . ! -type d -print0 | LC_ALL=C sort -z | xargs -0 -n1 md5sum "
               "| md5sum")
    else:
        cmd = "md5sum < \"$1\""
    out = subprocess.run(["bash", "-c", cmd, "md5", path], check=True, capture_output=True,
                         text=True).stdout
    return out.split()[0]


def shell_size(path):
    """Bytes of a file, or the sum over a directory's files (GNU find)."""
    out = subprocess.run(["bash", "-c", "find \"$1\" ! -type d -printf '%s\\n'", "size", path],
                         check=True, capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split())


def miriad_reference(path):
    """obsid, first/last integration JD and first LST (hours), by reading
    every record of the data set."""
    import aipy

    uv = aipy.miriad.UV(path)
    obsid = int(uv["obsid"])
    times, first_lst = [], None
    for (_, t, _), _ in uv.all():
        if first_lst is None:
            first_lst = uv["lst"]
        times.append(t)
    return {"obsid": obsid, "start_time_jd": min(times), "stop_time_jd": max(times),
            "start_lst_hr": first_lst * 12 / math.pi}


def uvh5_reference(path):
    import h5py
    import numpy as np
    from astropy.time import Time

    with h5py.File(path, "r") as f:
        times = f["Header/time_array"][()]
        lsts = f["Header/lst_array"][()]
    i = int(np.argmin(times))
    return {"obsid": int(math.floor(Time(times[i], format="jd", scale="utc").gps)),
            "start_time_jd": float(times[i]), "stop_time_jd": float(times.max()),
            "start_lst_hr": float(lsts[i]) * 12 / math.pi}
