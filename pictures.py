"""Pictures of the archive for the web pages, drawn with matplotlib (Agg)
as PNG (by the pages, in the reader process): the data ingested per night
with the archive's total over time (home page), the observing sessions'
nights with their LST coverage (sessions page), and a store's used and
free space over time (its page, from the daily `metrics.StoreSample`s).
Each picture's numbers come from one function (`volume_by_night`,
`session_coverage`, `store_history`) that the tests check against a
catalogue built for the purpose; each page gives them in words as the
image's text alternative.

A night is the telescope's local night: the local date at the evening it
began (times from local noon to the next noon belong to it), in `[server]
telescope_timezone`.
"""

import datetime
import io
import zoneinfo

import peewee as pw

from models import File, Observation, ObservingSession, unix_seconds_sql

SIDEREAL_PER_SOLAR = 1.00273790935  # sidereal hours per solar hour
UNIX_EPOCH_JD = 2440587.5
SIZE = (720, 300)  # pixels of each picture
DPI = 80


def night_of(moment_utc, zone):
    """The local night (a date) of a naive UTC datetime at `zone`."""
    local = moment_utc.replace(tzinfo=datetime.timezone.utc).astimezone(zoneinfo.ZoneInfo(zone))
    return (local - datetime.timedelta(hours=12)).date()


def _offset_seconds(zone):
    """The zone's UTC offset now, in seconds (the nights of a zone that
    keeps one offset, as observatories' do, are exact)."""
    return int(datetime.datetime.now(zoneinfo.ZoneInfo(zone)).utcoffset().total_seconds())


def volume_by_night(zone):
    """[(night, bytes of the files registered that night)], oldest first,
    for nights with files; one grouped statement on either database."""
    night = pw.fn.FLOOR((unix_seconds_sql(File.create_time) + (_offset_seconds(zone) - 43200))
                        / 86400.0)
    rows = list(File.select(night.alias("night"), pw.fn.SUM(File.size))
                .group_by(night).order_by(night).tuples())  # (all read: no cursor left open)
    epoch, out = datetime.date(1970, 1, 1), []
    for n, total in rows:
        try:
            out.append((epoch + datetime.timedelta(days=int(n)), int(total)))
        except (OverflowError, ValueError):  # a create time a record set made up (year 1)
            continue
    return out


def session_coverage(zone):
    """[(night, start JD, stop JD, start LST h, stop LST h)] of each session,
    oldest first. The start LST is the first observation's; the stop LST
    follows from the session's length in sidereal time (mod 24)."""
    first_lst = (Observation.select(Observation.start_lst_hr)
                 .where(Observation.session == ObservingSession.id)
                 .order_by(Observation.start_time_jd).limit(1))
    rows = list(ObservingSession.select(ObservingSession.start_time_jd,
                                        ObservingSession.stop_time_jd, first_lst.alias("lst"))
                .order_by(ObservingSession.start_time_jd).tuples())
    out = []
    for start, stop, lst in rows:
        try:
            moment = datetime.datetime(1970, 1, 1) + datetime.timedelta(
                days=start - UNIX_EPOCH_JD)
        except (OverflowError, ValueError):  # a JD no calendar date has
            continue
        stop_lst = None if lst is None else (
            lst + (stop - start) * 24.0 * SIDEREAL_PER_SOLAR) % 24.0
        out.append((night_of(moment, zone), start, stop, lst, stop_lst))
    return out


def store_history(store_row):
    """[(day, used bytes, free bytes)] of a store's daily samples, oldest
    first."""
    from metrics import StoreSample

    return list(StoreSample.select(StoreSample.day, StoreSample.used_bytes,
                                   StoreSample.free_bytes)
                .where(StoreSample.store == store_row).order_by(StoreSample.day).tuples())


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    return Figure(figsize=(SIZE[0] / DPI, SIZE[1] / DPI), dpi=DPI)


def _png(fig):
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=DPI)
    return out.getvalue()


def _unit(largest):
    """(divisor, name) of the decimal unit in which `largest` bytes reads
    as a number from 1 to 1000."""
    for divisor, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if largest >= divisor:
            return divisor, name
    return 1.0, "bytes"


def _days_axis(ax, days):
    """Dates on the x axis, days only (never hours), with room on each side
    (a day, or a thirtieth of the span), so that a single day is a visible
    bar and the first and last are not cut in half."""
    import matplotlib.dates as mdates

    first, last = min(days), max(days)
    room = datetime.timedelta(days=max(1, (last - first).days // 30))
    ax.set_xlim(first - room, last + room)
    span = (last - first).days + 2
    ax.xaxis.set_major_locator(mdates.DayLocator(interval=max(1, span // 6)))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m-%d"))
    for label in ax.get_xticklabels():
        label.set_rotation(20)
        label.set_horizontalalignment("right")


def _empty(fig, ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()
    return _png(fig)


def volume_png(nights):
    """Bars of the bytes registered per night and, on a second axis, the
    archive's total after each night; `nights` from `volume_by_night`."""
    fig = _figure()
    ax = fig.add_subplot()
    if not nights:
        return _empty(fig, ax, "no files yet")
    days = [n for n, _ in nights]
    divisor, unit = _unit(max(b for _, b in nights))
    ax.bar(days, [b / divisor for _, b in nights], width=0.8, color="#3b6ea5")
    ax.set_ylabel("%s per night" % unit)
    running, cumulative = 0, []
    for _, b in nights:
        running += b
        cumulative.append(running)
    total_divisor, total_unit = _unit(running)
    total = ax.twinx()
    total.plot(days, [c / total_divisor for c in cumulative], "o-", color="#c0392b",
               drawstyle="steps-post", markersize=4)
    total.set_ylabel("archive total (%s)" % total_unit, color="#c0392b")
    total.set_ylim(bottom=0)
    _days_axis(ax, days)
    ax.set_title("Data registered per night (bars) and the archive's total (line)")
    return _png(fig)


def timeline_png(coverage):
    """Each session as a vertical bar over its night (x) covering its LST
    range (y, hours, wrapping at 24); `coverage` from `session_coverage`.
    Bars are drawn a fixed width in points, so that a short session on a
    long axis stays visible."""
    fig = _figure()
    ax = fig.add_subplot()
    spans = [c for c in coverage if c[3] is not None]
    if not spans:
        return _empty(fig, ax, "no sessions with observations yet")
    for night, _, _, lst0, lst1 in spans:
        pieces = [(lst0, lst1)] if lst1 >= lst0 else [(lst0, 24.0), (0.0, lst1)]
        for low, high in pieces:
            ax.vlines(night, low, max(high, low + 0.5), linewidth=6, color="#2e8b57")
    ax.set_ylim(0, 24)
    ax.set_yticks(range(0, 25, 4))
    ax.set_ylabel("LST (hours)")
    _days_axis(ax, [c[0] for c in spans])
    ax.set_title("Observing sessions: nights and LST coverage")
    return _png(fig)


def space_png(history):
    """Used and free space of a store by day, as stacked bars; `history`
    from `store_history`."""
    fig = _figure()
    ax = fig.add_subplot()
    if not history:
        return _empty(fig, ax, "no daily samples yet")
    days = [d for d, _, _ in history]
    divisor, unit = _unit(max(u + f for _, u, f in history))
    used = [u / divisor for _, u, _ in history]
    ax.bar(days, used, width=0.8, color="#3b6ea5", label="used")
    ax.bar(days, [f / divisor for _, _, f in history], bottom=used, width=0.8,
           color="#c9d6e3", label="free")
    ax.set_ylabel(unit)
    ax.legend(loc="upper left")
    _days_axis(ax, days)
    ax.set_title("Used and free space by day")
    return _png(fig)


def describe_space(history):
    """The text alternative of `space_png`."""
    if not history:
        return "No daily samples of this store's space yet."
    day, used, free = history[-1]
    return ("Used and free space on %d days from %s to %s; on %s, %s used and %s free."
            % (len(history), history[0][0], day, day, _bytes(used), _bytes(free)))


def describe_volume(nights):
    """The text alternative of `volume_png`."""
    if not nights:
        return "No files have been registered yet."
    busiest = max(nights, key=lambda n: n[1])
    return ("Data ingested per night on %d nights from %s to %s; the most, %s, on the night "
            "of %s; the archive holds %s in all." % (
                len(nights), nights[0][0], nights[-1][0], _bytes(busiest[1]), busiest[0],
                _bytes(sum(b for _, b in nights))))


def describe_timeline(coverage):
    """The text alternative of `timeline_png`."""
    if not coverage:
        return "No observing sessions yet."
    return "%d observing sessions on %d nights from %s to %s." % (
        len(coverage), len({c[0] for c in coverage}), coverage[0][0], coverage[-1][0])


def _bytes(n):
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return ("%d %s" if unit == "bytes" else "%.1f %s") % (n, unit)
        n /= 1000.0


# The pictures of the archive by name (/pictures/NAME.png): (its numbers from
# a time zone, their text alternative, their PNG).
ARCHIVE = {"volume": (volume_by_night, describe_volume, volume_png),
           "sessions": (session_coverage, describe_timeline, timeline_png)}
