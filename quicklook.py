"""Quick looks at visibility data: a header summary and a waterfall
(amplitude against time and frequency) of one baseline and polarization.

`look(kind, source, baseline, pol)` runs in uvmeta's reader process (under
its memory and time limits) and reads only what the picture needs:

- UVH5 (pyuvdata's UVH5 memo): the per-row antenna and time arrays of the
  header, then only the rows of `Data/visdata` and `Data/flags` of the
  baseline, at the one polarization (h5py reads a selection, not the file);
- MIRIAD (read with aipy): one pass over the records, keeping the spectra
  of the baseline and polarization (the format is sequential).

The default baseline is the file's first cross-correlation (its first
autocorrelation if it has none), the default polarization its first. The
picture is rendered there too, with matplotlib (Agg), as a PNG of
`IMAGE_SIZE` pixels; flagged samples are left blank. Results are kept in a
small in-memory cache (`cached`) keyed by the file's MD5 and the choice.
"""

import collections
import io
import math
import threading

import numpy as np

# AIPS polarization codes (pyuvdata's polarization_array, MIRIAD's pol).
POLARIZATIONS = {1: "pI", 2: "pQ", 3: "pU", 4: "pV", -1: "rr", -2: "ll", -3: "rl", -4: "lr",
                 -5: "xx", -6: "yy", -7: "xy", -8: "yx"}
IMAGE_SIZE = (720, 440)  # pixels of a waterfall PNG
DPI = 80
CACHE_ENTRIES = 32
LISTED_BASELINES = 2048  # baselines a look lists for the form (the first, in file order)


class QuickLookError(Exception):
    """A data set whose quick look cannot be made (the message says why)."""


def _pol_name(code):
    return POLARIZATIONS.get(int(code), str(int(code)))


def _choose(baselines, baseline):
    """The baseline asked for (an (ant1, ant2) pair, which must be among
    `baselines`, in the file's order), else the first cross-correlation."""
    if baseline is not None:
        baseline = tuple(int(a) for a in baseline)
        if baseline not in baselines and baseline[::-1] in baselines:
            return baseline[::-1]  # the same baseline (conjugate data: the same amplitudes)
        if baseline not in baselines:
            raise QuickLookError("the file has no baseline %d-%d" % baseline)
        return baseline
    cross = [b for b in baselines if b[0] != b[1]]
    return (cross or baselines)[0]


def _ordered_unique(pairs):
    return list(dict.fromkeys(pairs))


def uvh5_waterfall(source, baseline=None, pol=None):
    """(summary, baselines, pols, baseline, pol, times in JD (n,), frequencies
    in Hz (m,), amplitudes (n, m) with NaN where flagged) of a UVH5 file
    (`source`: a path or a binary file object). Raises QuickLookError."""
    import h5py

    from uvmeta import _dataset

    with h5py.File(source, "r") as f:
        ant1 = np.asarray(_dataset(f, "Header/ant_1_array")[()])
        ant2 = np.asarray(_dataset(f, "Header/ant_2_array")[()])
        times = np.asarray(_dataset(f, "Header/time_array")[()], dtype=float)
        freqs = np.asarray(_dataset(f, "Header/freq_array")[()], dtype=float).ravel()
        pol_codes = [int(p) for p in _dataset(f, "Header/polarization_array")[()]]
        inttime = np.asarray(_dataset(f, "Header/integration_time")[()], dtype=float)
        baselines = _ordered_unique(zip(ant1.tolist(), ant2.tolist()))
        chosen = _choose(baselines, baseline)
        pols = [_pol_name(p) for p in pol_codes]
        pol = pols[0] if pol is None else pol
        if pol not in pols:
            raise QuickLookError("the file has no polarization %s (it has %s)"
                                 % (pol, ", ".join(pols)))
        p = pols.index(pol)
        rows = np.nonzero((ant1 == chosen[0]) & (ant2 == chosen[1]))[0]
        rows = rows[np.argsort(times[rows], kind="stable")]
        visdata, flags = _dataset(f, "Data/visdata"), _dataset(f, "Data/flags")
        index = (sorted(rows.tolist()),) + (slice(None),) * (visdata.ndim - 2) + (p,)
        data = visdata[index]
        flagged = np.asarray(flags[index], dtype=bool)
    if data.dtype.names:  # integers stored as a compound of r and i
        data = data["r"].astype(float) + 1j * data["i"].astype(float)
    order = np.argsort(np.argsort(rows))  # `index` read them sorted by row
    amplitude = np.abs(np.asarray(data, dtype=complex)).reshape(len(rows), -1)[order]
    amplitude[flagged.reshape(len(rows), -1)[order]] = np.nan
    summary = _summary(sorted({a for b in baselines for a in b}), len(baselines), freqs,
                       float(np.median(inttime)), pols, times)
    return summary, baselines, pols, chosen, pol, times[rows], freqs, amplitude


def miriad_waterfall(path, baseline=None, pol=None):
    """As `uvh5_waterfall`, for the MIRIAD data set at `path` (aipy)."""
    import aipy

    uv = aipy.miriad.UV(path)
    try:
        nchan, sfreq, sdf = int(uv["nchan"]), float(uv["sfreq"]), float(uv["sdf"])
        inttime = float(uv["inttime"])
        baselines, pols, times, rows = [], [], [], {}
        for (_, t, (i, j)), spectrum in uv.all():
            pair, name = (int(i), int(j)), _pol_name(uv["pol"])
            baselines.append(pair)
            pols.append(name)
            times.append(float(t))
            rows.setdefault((pair, name), []).append(
                (float(t), np.ma.filled(np.abs(spectrum).astype(float), np.nan)))
    finally:
        del uv
    if not rows:
        raise QuickLookError("the data set holds no visibilities")
    baselines, pols = _ordered_unique(baselines), _ordered_unique(pols)
    chosen = _choose(baselines, baseline)
    pol = pols[0] if pol is None else pol
    if (chosen, pol) not in rows:
        raise QuickLookError("the file has no polarization %s for baseline %d-%d (it has %s)"
                             % ((pol,) + chosen + (", ".join(pols),)))
    picked = sorted(rows[(chosen, pol)], key=lambda r: r[0])
    freqs = (sfreq + sdf * np.arange(nchan)) * 1e9  # MIRIAD gives GHz
    summary = _summary(sorted({a for b in baselines for a in b}), len(baselines), freqs,
                       inttime, pols, np.array(times))
    return (summary, baselines, pols, chosen, pol, np.array([r[0] for r in picked]), freqs,
            np.vstack([r[1] for r in picked]))


def _summary(antennas, n_baselines, freqs, inttime, pols, times):
    """The header summary shown beside a waterfall (frequencies in MHz,
    times in JD, integration time in s; the span, in minutes, is from the
    first integration's time to the last's, as an observation's start and
    stop are)."""
    start, stop = float(np.min(times)), float(np.max(times))
    return {"n_antennas": len(antennas), "n_baselines": n_baselines,
            "n_channels": int(freqs.size), "freq_min_mhz": float(freqs.min()) / 1e6,
            "freq_max_mhz": float(freqs.max()) / 1e6,
            "channel_width_khz": (float(abs(freqs[1] - freqs[0])) / 1e3
                                  if freqs.size > 1 else None),
            "integration_s": inttime, "polarizations": list(pols),
            "n_times": int(np.unique(times).size), "start_jd": start, "stop_jd": stop,
            "span_minutes": (stop - start) * 1440.0}


def render(times, freqs, amplitude, title, inttime):
    """A PNG (bytes) of IMAGE_SIZE pixels: amplitude (colour) against
    frequency (MHz, x) and time (minutes since the first integration, y;
    each row an integration of `inttime` seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(IMAGE_SIZE[0] / DPI, IMAGE_SIZE[1] / DPI), dpi=DPI)
    ax = fig.add_subplot()
    minutes = (times - times[0]) * 1440.0
    extent = (freqs[0] / 1e6, freqs[-1] / 1e6, (minutes[-1] if minutes.size else 0)
              + inttime / 60.0, 0)
    image = ax.imshow(amplitude, aspect="auto", interpolation="nearest", extent=extent,
                      cmap="viridis")
    fig.colorbar(image, ax=ax, label="amplitude (correlator units)")
    ax.set_xlabel("frequency (MHz)")
    ax.set_ylabel("minutes after JD %.5f" % times[0])
    ax.set_title(title)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


def look(kind, source, baseline=None, pol=None):
    """Runs in the reader process: `{summary, baselines, pols, baseline,
    pol, png}` of the data set `source` ('uvh5': a path or file object;
    'miriad': a folder). Raises QuickLookError."""
    read = uvh5_waterfall if kind == "uvh5" else miriad_waterfall
    try:
        summary, baselines, pols, chosen, pol, times, freqs, amplitude = read(
            source, baseline, pol)
        if not (np.all(np.isfinite(freqs)) and np.all(np.isfinite(times))
                and math.isfinite(summary["integration_s"])):
            raise QuickLookError("its times, frequencies or integration time are not all "
                                 "finite numbers")
        png = render(times, freqs, amplitude, "baseline %d-%d, %s" % (chosen + (pol,)),
                     summary["integration_s"])
    except (QuickLookError, MemoryError):
        raise
    except Exception as e:  # what the readers (and the drawing) raise for bad data varies
        raise QuickLookError("cannot read the data: %s" % str(e)[:300]) from None
    return {"summary": summary, "baselines": baselines[:LISTED_BASELINES], "pols": pols,
            "baseline": chosen, "pol": pol, "png": png}


_cache = collections.OrderedDict()
_cache_lock = threading.Lock()


_drawing = collections.Counter()  # caller -> looks being read for it now


def cached(key, compute, caller):
    """`compute()`, remembered under `key` (the last CACHE_ENTRIES kept),
    and so is the QuickLookError it raises: a file that cannot be looked at
    is not read again for each request. One look at a time is read for
    each `caller` (a source name); another is refused with QuickLookError
    meanwhile, so that nobody's requests can hold all the threads."""
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            value = _cache[key]
            if isinstance(value, QuickLookError):
                raise value
            return value
        if _drawing[caller]:
            raise QuickLookError("another quick look of yours is being drawn; reload the page "
                                 "in a moment")
        _drawing[caller] += 1
    try:
        value = compute()
    except QuickLookError as e:
        value = e
    finally:
        with _cache_lock:
            _drawing[caller] -= 1
            if not _drawing[caller]:
                del _drawing[caller]
    with _cache_lock:
        _cache[key] = value
        while len(_cache) > CACHE_ENTRIES:
            _cache.popitem(last=False)
    if isinstance(value, QuickLookError):
        raise value
    return value
