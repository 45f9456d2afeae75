"""Observing sessions: grouping a night's observations, and the pipeline's
"describe a session whose files lack event E" query.

Grouping (`assign_observing_sessions`): observations without a session first
join an existing session whose span contains their start. The others are
sorted by start time and split wherever the gap between consecutive starts
exceeds 20 times the smallest gap, that threshold clamped to [1 minute,
half a day]; each run becomes a session whose id is its first obsid, from
its first start to the latest stop. A run whose last observation has no stop
time cannot be closed: it is left without a session and reported.
"""

import re
import statistics

import peewee as pw

from models import (File, FileEvent, FileInstance, LibrarianError, Observation,
                    ObservingSession, Store, db, is_postgres, write_transaction)

GAP_FACTOR = 20
MIN_THRESHOLD_DAYS = 1.0 / 1440.0   # one minute
MAX_THRESHOLD_DAYS = 0.5            # half a day
ASSIGN_LOCK = 0x5e55  # PostgreSQL advisory lock key of session assignment
POL_RE = re.compile(r"^[xyne]{2}$")


def gap_threshold(starts):
    """The gap (days) above which a new session starts, from the sorted
    start JDs; None with fewer than two starts."""
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    if not gaps:
        return None
    return min(max(GAP_FACTOR * min(gaps), MIN_THRESHOLD_DAYS), MAX_THRESHOLD_DAYS)


def split_runs(observations):
    """Split observations sorted by start into runs at the large gaps."""
    starts = [o.start_time_jd for o in observations]
    threshold = gap_threshold(starts)
    runs, current = [], []
    for i, obs in enumerate(observations):
        if current and starts[i] - starts[i - 1] > threshold:
            runs.append(current)
            current = []
        current.append(obs)
    if current:
        runs.append(current)
    return runs


def assign_observing_sessions(minimum_start_jd=None, maximum_start_jd=None):
    """Give session-less observations (optionally only those starting in
    [minimum_start_jd, maximum_start_jd], JD) a session. Returns
    `(new_sessions, unclosed)`: `[{id, start_time_jd, stop_time_jd, n_obs}]`
    and the obsids left without a session because their run's last
    observation has no stop time."""
    cond = Observation.session.is_null(True)
    if minimum_start_jd is not None:
        cond &= Observation.start_time_jd >= minimum_start_jd
    if maximum_start_jd is not None:
        cond &= Observation.start_time_jd <= maximum_start_jd
    S = ObservingSession.alias()
    containing = (S.select(S.id)
                  .where((S.start_time_jd <= Observation.start_time_jd)
                         & (Observation.start_time_jd <= S.stop_time_jd))
                  .order_by(S.start_time_jd).limit(1))
    new_sessions, unclosed = [], []
    with write_transaction():
        if is_postgres():  # one assignment at a time (SQLite's write lock does this there)
            db.execute_sql("SELECT pg_advisory_xact_lock(%s)", (ASSIGN_LOCK,))
        Observation.update(session=containing).where(cond & pw.fn.EXISTS(containing)).execute()
        # A session grows to cover the stop of an observation that joined it.
        latest = (Observation.select(pw.fn.MAX(Observation.stop_time_jd))
                  .where(Observation.session == ObservingSession.id))
        (ObservingSession.update(stop_time_jd=latest)
         .where(latest > ObservingSession.stop_time_jd).execute())
        rest = list(Observation.select().where(cond)
                    .order_by(Observation.start_time_jd, Observation.obsid))
        for run in split_runs(rest):
            if run[-1].stop_time_jd is None:
                unclosed.extend(o.obsid for o in run)
                continue
            stop = max(o.stop_time_jd for o in run if o.stop_time_jd is not None)
            session = {"id": run[0].obsid, "start_time_jd": run[0].start_time_jd,
                       "stop_time_jd": stop}
            try:
                with db.atomic():
                    ObservingSession.insert(**session).execute()
            except pw.IntegrityError:
                raise LibrarianError(409, "a session with id %d exists already but does not "
                                     "contain observation %d" % (run[0].obsid, run[0].obsid)) \
                    from None
            (Observation.update(session=run[0].obsid)
             .where(Observation.obsid.in_([o.obsid for o in run])).execute())
            new_sessions.append(dict(session, n_obs=len(run)))
    return new_sessions, unclosed


def polarization(name):
    """The polarization part of a HERA-style name (`zen.JD.xx.HH.uvA` ->
    'xx'): the first dot-separated field of two letters among x, y, n, e;
    None if there is none."""
    for part in name.split("."):
        if POL_RE.match(part):
            return part
    return None


def describe_session_without_event(source, event_type):
    """The pipeline query (API.md): pick the earliest session that has a
    file from `source` with an instance here and lacking an event of
    `event_type`, and describe that
    session's files from `source` (one line per file name, earliest first):
    `{date (start JD), pol, store_path, path_prefix, host, length (days)}`.
    Returns None when no session matches. An observation without a stop
    time gets the median spacing of the session's starts as its length."""
    done = FileEvent.select(FileEvent.file).where(FileEvent.type == event_type)
    first = (File.select(Observation.session)
             .join(Observation, on=(File.observation == Observation.obsid))
             .where(Observation.session.is_null(False) & (File.source == source)
                    & (File.num_instances > 0) & File.name.not_in(done))
             .order_by(Observation.start_time_jd, File.name).limit(1).scalar())
    if first is None:
        return None
    starts = sorted(o.start_time_jd for o in
                    Observation.select(Observation.start_time_jd)
                    .where(Observation.session == first))
    spacing = statistics.median([b - a for a, b in zip(starts, starts[1:])]) \
        if len(starts) > 1 else 0.0
    rows = (FileInstance.select(FileInstance, File, Observation, Store)
            .join(File, on=(FileInstance.file == File.name))
            .join(Observation, on=(File.observation == Observation.obsid))
            .switch(FileInstance).join(Store)
            .where((Observation.session == first) & (File.source == source))
            .order_by(Observation.start_time_jd, File.name, Store.name))
    info, seen = [], set()
    for inst in rows:
        if inst.name in seen:
            continue
        seen.add(inst.name)
        obs = inst.file.observation
        length = (obs.stop_time_jd - obs.start_time_jd) if obs.stop_time_jd is not None \
            else spacing
        info.append({"date": obs.start_time_jd, "pol": polarization(inst.name),
                     "store_path": inst.store_path, "path_prefix": inst.store.path_prefix,
                     "host": inst.store.ssh_host, "length": length})
    return {"session_id": first, "info": info}
