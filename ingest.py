"""Turning bytes on a store into catalogue records, all or nothing.

Every way a file arrives (streamed upload, the two-step staging protocol,
`register_instances`, later copies from other Librarians) ends in
`register_staged`, or `prepare_in_place` + `register_prepared` for bytes
already in place: metadata is gathered first, with no lock held (records
sent along, or read from the data, or inferred from similar names), then the
File, its Observation if new, the FileInstance and a `create_instance` event
are written in one transaction, and the bytes are moved into place inside
that transaction (`stores.StoreAccess.commit`, under an intent that a
settle undoes if the process dies). The database and the disks never
disagree.

Imports nothing from Bottle; errors are `models.LibrarianError`.
"""

import logging
import math
import posixpath
import stat

import peewee as pw

import uvmeta
from models import (DELETION_POLICIES, db, File, FileEvent, FileInstance, LibrarianError,
                    Observation, ObservingSession, check_file_name, check_md5, from_unix,
                    is_postgres, note_rows_written, short, utcnow)
from stores import intents, split_store_path

log = logging.getLogger("librarian")

MAX_TYPE_CHARS = 32            # file.type column
MAX_PARENT_DIRS_CHARS = 1024   # file_instance.parent_dirs column
INT64 = (-2**63, 2**63 - 1)


# ---------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------

# How to say that a file has no observation, in every caller's words (the
# web upload form shows its own in place of this text).
SAY_NULL_OBSID = "null_obsid; --null-obsid in the client"


def infer_obsid_from_name(name, mode):
    """The obsid of a new file whose data carry none, by configuration
    `obsid_inference_mode`: `hera` copies the obsid of existing files whose
    names share the first three dot-separated fields (`zen.2458043.12552`)
    and refuses unless exactly one candidate exists; `none` refuses.
    Raises `LibrarianError(400)`."""
    if mode != "hera":
        raise LibrarianError(400, "cannot determine the obsid of %r from its data; if the file "
                             "has no observation, say so (%s)" % (name, SAY_NULL_OBSID))
    bits = name.split(".")
    if len(bits) < 4:
        raise LibrarianError(400, "cannot infer the obsid of %r: a HERA name has at least "
                             "four dot-separated fields" % name)
    prefix = ".".join(bits[:3]) + "."
    candidates = [row.obsid for row in
                  File.select(File.observation).distinct()
                  .where(File.name.startswith(prefix) & File.observation.is_null(False))
                  .limit(2)]
    if len(candidates) != 1:
        raise LibrarianError(400, "cannot infer the obsid of %r: %s files named %s* with an "
                             "obsid" % (name, "no" if not candidates else "several obsids among",
                                        prefix))
    return candidates[0]


def gather_observation(store, abs_path, name, *, null_obsid, inference_mode):
    """(obsid or None, observation metadata dict or None) for new bytes at
    `abs_path` on `store` (a `stores.StoreAccess`) that will be called
    `name`. Raises `LibrarianError(400)` when the data cannot be read, or
    the obsid is missing without `null_obsid`, or present with it."""
    try:
        meta = store.read_observation(abs_path)
    except uvmeta.MetadataError as e:
        if null_obsid:  # as the original: data that cannot be read carry no obsid
            return None, None
        raise LibrarianError(400, "%s: %s; if it has no observation, say so (%s)"
                             % (name, e, SAY_NULL_OBSID)) from None
    if null_obsid:
        if meta is not None:
            raise LibrarianError(400, "%s was sent with null_obsid but its data carry obsid %d"
                                 % (name, meta["obsid"]))
        return None, None
    if meta is not None:
        return meta["obsid"], meta
    return infer_obsid_from_name(name, inference_mode), None


def refuse_unknown_obsid_early(store_path, is_dir, null_obsid, inference_mode):
    """Refuse (400) before any byte is sent an upload that would be refused
    after the last: a flat file that no reader reads (not `.uvh5`), not
    known here already, sent without `null_obsid` while obsids are not
    inferred from names. (A directory's kind is seen only in its bytes.)"""
    name = split_store_path(store_path)[1]
    if null_obsid or is_dir or inference_mode != "none" or name.endswith(".uvh5"):
        return
    if File.get_or_none(File.name == name) is None:
        infer_obsid_from_name(name, inference_mode)  # raises, as at the end


def stated_observation(store, abs_path, name, obsid):
    """(obsid, metadata or None) for a file whose caller stated its obsid:
    the Observation must be known already or readable from the data, and
    the data may not contradict the caller. Raises `LibrarianError(400)`."""
    try:
        meta = store.read_observation(abs_path)
    except uvmeta.MetadataError:
        meta = None
    if meta is not None and meta["obsid"] != obsid:
        raise LibrarianError(400, "%s: stated obsid %d but its data carry %d"
                             % (name, obsid, meta["obsid"]))
    if meta is None and Observation.get_or_none(Observation.obsid == obsid) is None:
        raise LibrarianError(400, "%s: obsid %d is not a known observation and its data do "
                             "not describe it" % (name, obsid))
    return obsid, meta


def ensure_observation(meta):
    """Insert the Observation described by `meta` unless it exists; a known
    one that has no session yet is attached to `meta`'s session (sessions
    are assigned at the source after a first copy, and re-sent with the
    next). Raises `LibrarianError` 400 on invalid records, 409 when the
    known observation belongs to another session."""
    try:
        with db.atomic():
            Observation.insert(obsid=meta["obsid"], start_time_jd=meta["start_time_jd"],
                               stop_time_jd=meta.get("stop_time_jd"),
                               start_lst_hr=meta.get("start_lst_hr"),
                               session=meta.get("session_id")).execute()
        return
    except pw.IntegrityError:
        existing = Observation.get_or_none(Observation.obsid == meta["obsid"])
    if existing is None:
        raise LibrarianError(400, "observation %r is not valid: %s" % (
            meta["obsid"], "its times are out of order" if meta.get("session_id") is None
            else "unknown session %r, or times out of order" % meta["session_id"]))
    session_id = meta.get("session_id")
    if session_id is None or existing.session_id == session_id:
        return
    if existing.session_id is not None:
        raise LibrarianError(409, "observation %d belongs to session %d here, not %d"
                             % (existing.obsid, existing.session_id, session_id))
    session = ObservingSession.get_or_none(ObservingSession.id == session_id)
    if session is None:
        raise LibrarianError(400, "observation %d names session %d, which is not known here "
                             "(send it in the record set's sessions)" % (existing.obsid,
                                                                       session_id))
    if not session.start_time_jd <= existing.start_time_jd <= session.stop_time_jd:
        raise LibrarianError(409, "observation %d starts at JD %.6f, outside session %d (JD "
                             "%.6f to %.6f)" % (existing.obsid, existing.start_time_jd,
                                                session.id, session.start_time_jd,
                                                session.stop_time_jd))
    Observation.update(session=session_id).where(
        (Observation.obsid == existing.obsid) & Observation.session.is_null()).execute()


def different_file(known):
    """The 409 for bytes or a record that differ from the known File
    `known` of the same name."""
    return LibrarianError(409, "a different file named %r is already registered (size %d, "
                          "md5 %s)" % (known.name, known.size, known.md5))


def insert_file(record, source):
    """Insert a File from `record` (`name, type, create_time (datetime),
    obsid, size, md5`) unless an identical one exists. Returns True when it
    was new. Raises `LibrarianError(409)` when a File of that name differs
    in size or md5."""
    try:
        with db.atomic():
            File.insert(name=record["name"], type=record["type"],
                        create_time=record["create_time"], observation=record["obsid"],
                        size=record["size"], md5=record["md5"], source=source).execute()
        return True
    except pw.IntegrityError:
        existing = File.get_or_none(File.name == record["name"])
        if existing is None:
            raise LibrarianError(400, "file %r refers to unknown observation %r"
                                 % (record["name"], record["obsid"])) from None
        if existing.size != record["size"] or existing.md5 != record["md5"]:
            raise different_file(existing) from None
        return False


# ---------------------------------------------------------------------------
# Record sets sent by another Librarian
# ---------------------------------------------------------------------------

def _need(rec, key, types, where, nullable=False):
    """`rec[key]` checked: one of `types`, a 64-bit integer, a finite
    number, text without NUL; 400 naming the record and key otherwise."""
    if not isinstance(rec, dict):
        raise LibrarianError(400, "%s must be an object, got %s" % (where, type(rec).__name__))
    if key not in rec:
        raise LibrarianError(400, "%s lacks %r" % (where, key))
    value = rec[key]
    if value is None and nullable:
        return None
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        raise LibrarianError(400, "%s has a %r of the wrong type" % (where, key))
    if isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise LibrarianError(400, "%s has a %r out of the 64-bit range" % (where, key))
    if isinstance(value, float) and not math.isfinite(value):
        raise LibrarianError(400, "%s has a %r that is not finite" % (where, key))
    if isinstance(value, str) and ("\0" in value or len(value) > 256):
        raise LibrarianError(400, "%s has a %r with a NUL or over 256 characters" % (where, key))
    return float(value) if float in types else value


def _jd(rec, key, where, nullable=False):
    """A Julian Date field of a record: a number within the plausible range
    of observation dates (1858 to 2406)."""
    value = _need(rec, key, (int, float), where, nullable)
    if value is not None and not uvmeta.PLAUSIBLE_JD[0] <= value <= uvmeta.PLAUSIBLE_JD[1]:
        raise LibrarianError(400, "%s has a %s of %r, not a Julian Date of an observation"
                             % (where, key, value))
    return value


def _unix_time(seconds, where):
    try:
        return from_unix(seconds)
    except (OverflowError, ValueError, OSError):
        raise LibrarianError(400, "%s has a create_time out of range" % where) from None


BATCH_ROWS = 500  # rows per INSERT: 7 columns each stays far below SQLite's 32,766 parameters


def _batches(rows):
    for i in range(0, len(rows), BATCH_ROWS):
        yield rows[i:i + BATCH_ROWS]


def _session_row(key, rec):
    """A session record checked as the table's constraints would (an
    INSERT that ignores conflicts must not meet a CHECK)."""
    where = "session %s" % key
    row = {"id": _need(rec, "id", (int,), where),
           "start_time_jd": _jd(rec, "start_time_jd", where),
           "stop_time_jd": _jd(rec, "stop_time_jd", where)}
    if row["stop_time_jd"] < row["start_time_jd"]:
        raise LibrarianError(400, "%s is not a valid session (does it stop before it "
                             "starts?)" % where)
    return row


def _observation_row(key, rec):
    where = "observation %s" % key
    obsid = _need(rec, "obsid", (int,), where)
    optional = {"stop_time_jd": lambda: _jd(rec, "stop_time_jd", where, True),
                "start_lst_hr": lambda: _need(rec, "start_lst_hr", (int, float), where, True),
                "session_id": lambda: _need(rec, "session_id", (int,), where, True)}
    row = {k: (get() if k in rec else None) for k, get in optional.items()}
    row.update(obsid=obsid, start_time_jd=_jd(rec, "start_time_jd", where))
    if row["stop_time_jd"] is not None and row["stop_time_jd"] < row["start_time_jd"]:
        raise LibrarianError(400, "observation %r is not valid: its times are out of order"
                             % obsid)
    lst = row["start_lst_hr"]
    if lst is not None and not 0 <= lst < 24:
        raise LibrarianError(400, "%s has a start_lst_hr of %r, not an hour from 0 to 24"
                             % (where, lst))
    return row


def _renamed(rows, key, field):
    """`rows` with `key` given as the model's `field` name, for insert_many."""
    return [{(field if k == key else k): v for k, v in r.items()} for r in rows]


def _file_row(key, rec, source):
    where = "file %s" % key
    size = _need(rec, "size", (int,), where)
    if size < 0:
        raise LibrarianError(400, "%s has a negative size" % where)
    if len(_need(rec, "type", (str,), where)) > MAX_TYPE_CHARS:
        raise LibrarianError(400, "%s has a type longer than %d characters"
                             % (where, MAX_TYPE_CHARS))
    return {"name": check_file_name(_need(rec, "name", (str,), where)),
            "type": _need(rec, "type", (str,), where),
            "create_time": _unix_time(_need(rec, "create_time", (int,), where), where),
            "obsid": _need(rec, "obsid", (int,), where, True),
            "size": size, "md5": check_md5(_need(rec, "md5", (str,), where)), "source": source}


def _missing(model, key, wanted):
    """The values of `wanted` that are not a `key` of a `model` row."""
    wanted = {v for v in wanted if v is not None}
    if not wanted:
        return set()
    return wanted - {v for (v,) in model.select(key).where(key.in_(list(wanted))).tuples()}


def _ingest_observations(rows):
    """Insert the observations not yet known, a batch per statement; a known
    one whose record names a session goes through `ensure_observation` (it
    may need that session attached, or conflict with another)."""
    for batch in _batches(rows):
        unknown = _missing(ObservingSession, ObservingSession.id,
                           (r["session_id"] for r in batch))
        for r in batch:
            if r["session_id"] in unknown:
                raise LibrarianError(400, "observation %d names session %d, which is not known "
                                     "here (send it in the record set's sessions)"
                                     % (r["obsid"], r["session_id"]))
        Observation.insert_many(_renamed(batch, "session_id", "session")) \
            .on_conflict_ignore().execute()
        note_rows_written("observation", len(batch))
        stored = dict(Observation.select(Observation.obsid, Observation.session).where(
            Observation.obsid.in_([r["obsid"] for r in batch])).tuples())
        for r in batch:
            if r["session_id"] is not None and stored.get(r["obsid"]) != r["session_id"]:
                ensure_observation(r)


def _ingest_files(rows):
    """Insert the files not yet known, a batch per statement; 409 for a name
    already registered with another size or MD5."""
    for batch in _batches(rows):
        for obsid in _missing(Observation, Observation.obsid, (r["obsid"] for r in batch)):
            name = next(r["name"] for r in batch if r["obsid"] == obsid)
            raise LibrarianError(400, "file %r refers to unknown observation %r" % (name, obsid))
        File.insert_many(_renamed(batch, "obsid", "observation")).on_conflict_ignore().execute()
        note_rows_written("file", len(batch))
        stored = {name: (size, md5) for name, size, md5 in
                  File.select(File.name, File.size, File.md5)
                  .where(File.name.in_([r["name"] for r in batch])).tuples()}
        for r in batch:
            size, md5 = stored[r["name"]]
            if (size, md5) != (r["size"], r["md5"]):
                raise different_file(File(name=r["name"], size=size, md5=md5))


def ingest_record_sets(files, observations, sessions, source):
    """Create the records of a record set (API.md, `initiate_upload`) that
    are not yet known, sessions first: every record is checked first (400
    naming the record and field), then inserted `BATCH_ROWS` at a time.
    Identical re-sends are no-ops; a File that conflicts with a known one is
    refused (409), a known observation already in another session too.
    Call inside a transaction (a refusal leaves nothing half-written)."""
    session_rows = [_session_row(k, rec) for k, rec in (sessions or {}).items()]
    observation_rows = [_observation_row(k, rec) for k, rec in (observations or {}).items()]
    file_rows = [_file_row(k, rec, source) for k, rec in (files or {}).items()]
    for batch in _batches(session_rows):
        ObservingSession.insert_many(batch).on_conflict_ignore().execute()
        note_rows_written("observing_session", len(batch))
    _ingest_observations(observation_rows)
    _ingest_files(file_rows)


# ---------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------

def policy_code(deletion_policy):
    """The stored code of a deletion policy name; 400 on anything else."""
    if deletion_policy is None:
        return DELETION_POLICIES["disallowed"]
    if deletion_policy not in DELETION_POLICIES:
        raise LibrarianError(400, "deletion_policy must be 'allowed' or 'disallowed', got %r"
                             % (deletion_policy,))
    return DELETION_POLICIES[deletion_policy]


def instance_containing(store_row, parent_dirs):
    """The FileInstance on the store whose file or directory contains the
    folder `parent_dirs` (one of its ancestors, checked in one query), or
    None."""
    parts = parent_dirs.split("/") if parent_dirs else []
    cond = None
    for i in range(len(parts)):
        c = (FileInstance.parent_dirs == "/".join(parts[:i])) & (FileInstance.file == parts[i])
        cond = c if cond is None else (cond | c)
    if cond is None:
        return None
    return FileInstance.select().where((FileInstance.store == store_row) & cond).first()


def check_no_instance_inside(store, store_path):
    """Refuse (409) registering a folder that holds registered instances:
    their bytes would then belong to two records (and deleting the folder
    would take them without their interlock)."""
    inside = FileInstance.select().where(
        (FileInstance.store == store.row)
        & ((FileInstance.parent_dirs == store_path)
           | (pw.fn.SUBSTR(FileInstance.parent_dirs, 1, len(store_path) + 1)
              == store_path + "/"))).first()  # not LIKE: '_' and '%' are plain here
    if inside is not None:
        raise LibrarianError(409, "%s holds the registered file %s on store %r; a folder with "
                             "registered files inside cannot be registered itself"
                             % (store_path, inside.store_path, store.name))


def check_destination(store, store_path):
    """`(parent_dirs, name)` of a store path that a new file may take on
    `store`: the path rules, the lengths the records hold, and not inside
    a registered file or directory. Checked when an upload is announced
    (before any byte is sent) and again when it is registered. Raises
    `LibrarianError(400)`."""
    parent_dirs, name = split_store_path(store_path)
    if len(uvmeta.file_type(name)) > MAX_TYPE_CHARS:
        raise LibrarianError(400, "the type of %s (the text after its last dot) is longer than "
                             "%d characters" % (short(name), MAX_TYPE_CHARS))
    if len(parent_dirs) > MAX_PARENT_DIRS_CHARS:
        raise LibrarianError(400, "the folders of %s are longer than %d characters"
                             % (short(store_path), MAX_PARENT_DIRS_CHARS))
    check_not_inside_instance(store, parent_dirs)
    return parent_dirs, name


def check_not_inside_instance(store, parent_dirs):
    """Refuse (409) a store path that would put bytes inside a registered
    file or directory."""
    inside = instance_containing(store.row, parent_dirs)
    if inside is not None:
        raise LibrarianError(409, "%s is inside the registered file %s on store %r; "
                             "registered files never change"
                             % (parent_dirs, inside.store_path, store.name))


def observation_of(store, abs_data, name, *, meta_mode, null_obsid, inference_mode,
                   stated_obsid=None):
    """(obsid, observation metadata or None) for new bytes, read before the
    registration transaction so that no lock is held while data are read.
    In `direct` mode the records came with the request: (None, None)."""
    if meta_mode == "direct":
        return None, None
    if stated_obsid is not None:
        return stated_observation(store, abs_data, name, stated_obsid)
    return gather_observation(store, abs_data, name, null_obsid=null_obsid,
                              inference_mode=inference_mode)


def _register(store, store_path, size, md5, *, source, deletion_policy, meta_mode, obsid,
              meta, claim=None, another_copy=False):
    """Write the records of one arriving file (call inside a transaction);
    see `register_staged`. Returns the result dict, with `move` saying
    whether its bytes go to `store_path`. A known, identical file is a
    no-op when the instance at `store_path` is there already, or, unless
    `another_copy` (bytes already in place elsewhere become a further
    instance), when an instance elsewhere has its bytes (looked at here,
    under the transaction's lock); an instance at
    `store_path` whose bytes are lost is healed."""
    policy = policy_code(deletion_policy)
    if claim is not None:
        claim()
    parent_dirs, name = check_destination(store, store_path)
    if meta_mode == "direct":
        existing = File.get_or_none(File.name == name)
        if existing is None:
            raise LibrarianError(400, "meta_mode is direct but no record of %r was sent"
                                 % name)
        if existing.size != size or existing.md5 != md5:
            raise LibrarianError(400, "the bytes of %r (size %d, md5 %s) do not match its "
                                 "record (size %d, md5 %s)" % (name, size, md5,
                                                               existing.size, existing.md5))
        new_file, obsid = False, existing.obsid
    else:
        if meta is not None:
            ensure_observation(meta)
        new_file = insert_file({"name": name, "type": uvmeta.file_type(name),
                                "create_time": utcnow(), "obsid": obsid, "size": size,
                                "md5": md5}, source)
        if not new_file:
            obsid = File.get(File.name == name).obsid
    done = {"created": True, "move": True, "name": name, "obsid": obsid,
            "store_path": "/".join(p for p in (parent_dirs, name) if p)}
    if not new_file:
        exact = FileInstance.select().where(
            (FileInstance.file == name) & (FileInstance.store == store.row)
            & (FileInstance.parent_dirs == parent_dirs))
        if is_postgres():
            exact = exact.for_update()  # a deletion's unrecord waits, or went first
        exact = exact.exists()
        if intents.deleting(store.row, store_path):
            raise LibrarianError(409, "%s on store %r is being deleted; send it again once "
                                 "that is done" % (store_path, store.name))
        if exact and not store.exists(store_path):
            FileEvent.record(name, "heal_instance",
                             {"store_name": store.name, "parent_dirs": parent_dirs})
            (FileInstance.update(verified_at=utcnow(), verify_result="ok")
             .where((FileInstance.file == name) & (FileInstance.store == store.row)
                    & (FileInstance.parent_dirs == parent_dirs)).execute())
            return dict(done, healed=True)
        if exact or (not another_copy and _has_present_instance(store.registry, name)):
            return {"created": False, "move": False, "name": name, "obsid": obsid}
    # Its MD5 was just computed from the bytes: verified at ingest.
    FileInstance.create(store=store.row, parent_dirs=parent_dirs, file=name,
                        deletion_policy=policy, verified_at=utcnow(), verify_result="ok")
    FileEvent.record(name, "create_instance",
                     {"store_name": store.name, "parent_dirs": parent_dirs})
    return done


def register_staged(store, abs_staged, store_path, *, source, deletion_policy=None,
                    meta_mode="infer", null_obsid=False, inference_mode="none",
                    readonly=True, expected_md5=None, size=None, md5=None, claim=None,
                    another_copy=False, recorded=None):
    """Register the file or directory staged at `abs_staged` (out of any
    client's reach: in a staging folder of this process) as `store_path`
    on `store` (a `stores.StoreAccess`) and move it there, in one commit.

    `size`/`md5` are those computed while receiving (computed here when
    None); `expected_md5` is what the sender claimed (400 on mismatch).
    `meta_mode` is `infer` (read the data, or infer from the name) or
    `direct` (a File record was sent before and must match). Bytes
    identical to a known file are never read for metadata (no flag the
    first upload needed is needed again) and heal its instance at
    `store_path` if that one's bytes are lost. Returns a dict `{created,
    name, obsid, size, md5}`; `created` is False when an identical file
    already had an instance (the staged bytes are then left for the
    caller to clean up). `claim`, if given, runs first inside the
    transaction (used to consume an issued staging directory exactly
    once). `another_copy`: add this instance even if the file has others
    (offload). `recorded(result)`, if given, runs inside the transaction
    after the records are written, with the result: what must commit with
    them (a resumable upload's outcome). Raises `LibrarianError` (400, 409:
    also when the bytes changed while they were checked)."""
    _, name = split_store_path(store_path)
    store.check_tree(abs_staged)
    before = store.signature(abs_staged)
    if size is None or md5 is None:
        size, md5 = store.checksum(abs_staged)
    if expected_md5 is not None and check_md5(expected_md5) != md5:
        raise LibrarianError(400, "md5 mismatch: the sender said %s but the received bytes "
                             "have %s" % (expected_md5.lower(), md5))
    known = File.get_or_none(File.name == name)
    if known is not None and (known.size, known.md5) == (size, md5):
        obsid, meta = known.obsid, None
    elif known is not None and meta_mode != "direct":  # the name, not its metadata
        raise different_file(known)
    else:
        obsid, meta = observation_of(store, abs_staged, name, meta_mode=meta_mode,
                                     null_obsid=null_obsid, inference_mode=inference_mode)
    if store.signature(abs_staged) != before:
        raise LibrarianError(409, "%s changed while it was being checked; complete it once it "
                             "is written" % name)

    def record():
        result = _register(store, store_path, size, md5, source=source,
                           deletion_policy=deletion_policy, meta_mode=meta_mode, obsid=obsid,
                           meta=meta, claim=claim, another_copy=another_copy)
        result.update(size=size, md5=md5)
        if recorded is not None:
            recorded(result)
        return result
    return store.commit(abs_staged, store_path, record, readonly=readonly)


def _has_present_instance(registry, name):
    """Whether some instance of the file has its bytes (a store that cannot
    be reached counts as having them: never a needless second copy)."""
    from stores import StoreUnreachable

    try:
        return registry.present_instance(name)[0] is not None
    except StoreUnreachable:
        return True


def prepare_in_place(store, abs_path, *, size, md5, null_obsid=False, inference_mode="none",
                     obsid=None):
    """Check bytes already at their final place on `store` against what the
    caller stated (size first, from `stat`, then md5; None: not stated,
    found here) and read their metadata. No database lock is held. Returns
    the keyword arguments of `register_prepared`. Raises
    `LibrarianError(400)`."""
    if not posixpath.isabs(abs_path):
        raise LibrarianError(400, "%s is not an absolute path on store %r" % (abs_path,
                                                                              store.name))
    store_path = store.relative(posixpath.normpath(abs_path))
    if store_path == "." or store_path.startswith("../"):
        raise LibrarianError(400, "%s is not inside store %r (%s)" % (abs_path, store.name,
                                                                     store.prefix))
    _, name = split_store_path(store_path)
    real = store.resolve(store_path)
    try:
        st = store.stat(real)
    except (FileNotFoundError, NotADirectoryError):
        raise LibrarianError(400, "%s does not exist on store %r" % (abs_path, store.name)) \
            from None
    store.check_tree(real)
    if stat.S_ISDIR(st.st_mode):
        check_no_instance_inside(store, store_path)
    md5 = check_md5(md5) if md5 is not None else None
    if size is not None and stat.S_ISREG(st.st_mode) and st.st_size != size:
        raise LibrarianError(400, "%s has %d bytes, not %d as stated"
                             % (abs_path, st.st_size, size))
    actual_size, actual_md5 = store.checksum(real)
    if (size, md5) != (actual_size, actual_md5) and (size, md5) != (None, None):
        raise LibrarianError(400, "%s has size %d and md5 %s, not %s and %s as stated"
                             % (abs_path, actual_size, actual_md5, size, md5))
    size, md5 = actual_size, actual_md5
    found_obsid, meta = observation_of(store, real, name, meta_mode="infer",
                                       null_obsid=null_obsid, inference_mode=inference_mode,
                                       stated_obsid=obsid)
    return {"store_path": store_path, "size": size, "md5": md5, "obsid": found_obsid,
            "meta": meta, "abs_path": real}


def register_prepared(store, prepared, *, source):
    """Record bytes checked by `prepare_in_place` (call inside a
    transaction to register several at once)."""
    result = _register(store, prepared["store_path"], prepared["size"], prepared["md5"],
                       source=source, deletion_policy=None, meta_mode="infer",
                       obsid=prepared["obsid"], meta=prepared["meta"], another_copy=True)
    result.pop("move")
    return result
