"""Resumable uploads by the tus 1.0 protocol: core, creation, checksum and
termination (https://tus.io/protocols/resumable-upload).

A caller creates an upload (`POST /api/uploads`, `Upload-Length` and the
`Upload-Metadata` keys `dest` (the store path), and optionally `md5`,
`null_obsid`, `deletion_policy`, `directory` = `tar`); the server picks the
store, writes the `models.Upload` row, then makes its staging folder, which
the row holds (no settle or staging clean-up touches it while the row
exists). Each `PATCH` appends one chunk at `Upload-Offset`: a request body
is bounded by `[server] max_body_bytes` and held in memory by waitress,
written to staging once, its `Upload-Checksum` checked (and its share of
the file's MD5 computed) by pool threads beside the write; a chunk that
fails its checksum does not advance the offset. A `HEAD` gives the
current offset after a dropped connection. The chunk that completes the
upload also verifies and registers it, exactly as
a single-request upload is (a directory arrives as a tar, unpacked then);
`GET` answers the outcome as JSON. Uploads untouched for `[server]
upload_expiry_hours` are removed with their staging (`expire`).

Writes are serialised per upload by a compare-and-set in the database: the
row's `writer` is claimed for the process (`models.this_process`) when the
offset matches and no live process holds it, so two requests for one
upload, in any processes, never write at once; a claim left by a dead
process, or by a request of this process that could not end it (the
database away), is free again, and whatever its interrupted write left
beyond the offset is cut off by the next write.

This module imports nothing from Bottle: the routes in `librarian` parse
headers and call these functions; errors are `errors.LibrarianError`.
"""

import base64
import binascii
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import logging
import mmap
import posixpath
import threading
import uuid
import zlib

import peewee as pw

import ingest
import models
from errors import ChecksumMismatch, Conflict, LibrarianError, NotFound, Refused, short
from models import Upload, this_process, utcnow
from stores import intents, split_store_path

log = logging.getLogger("librarian")

TUS_VERSION = "1.0.0"
EXTENSIONS = "creation,checksum,termination"


def _crc32(data):
    """CRC-32 (zlib's, as gzip and PNG use it) as 4 big-endian bytes: what
    `Upload-Checksum: crc32` carries. A transfer check, several times
    faster than a cryptographic hash; the whole file's MD5 still decides."""
    return zlib.crc32(data).to_bytes(4, "big")


# Upload-Checksum algorithm -> function of the chunk's bytes giving its digest bytes.
CHECKSUMS = {"crc32": _crc32, "md5": lambda d: hashlib.md5(d).digest(),
             "sha1": lambda d: hashlib.sha1(d).digest(),
             "sha256": lambda d: hashlib.sha256(d).digest()}
MD5_HEADER = "X-Librarian-MD5"  # the whole file's MD5, on the chunk that completes it
METADATA_KEYS = {"dest", "md5", "null_obsid", "deletion_policy", "directory", "filename",
                 "filetype"}  # filename, filetype: what browser clients send; ignored
PARTIAL = "upload.partial"  # the bytes so far, in the upload's staging folder

_writing_here = set()  # ids of the uploads a request of this process is writing
_writing_lock = threading.Lock()
_digests = {}  # upload id -> RunningMD5 of a flat upload appended to here
_digests_lock = threading.Lock()
_hashers = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="md5")


class RunningMD5:
    """The MD5 of a flat upload's first `offset` bytes. Each chunk is hashed
    by a pool thread while the request ends and the next chunk arrives
    (hashlib releases the GIL), one chunk at a time in order; `hexdigest`
    waits for what is pending."""

    def __init__(self, digest, offset):
        self.digest, self.offset, self.pending = digest, offset, None

    def feed(self, data):
        self.wait()
        self.pending = _hashers.submit(self.digest.update, data)
        self.offset += len(data)

    def wait(self):
        if self.pending is not None:
            self.pending.result()
            self.pending = None

    def hexdigest(self):
        self.wait()
        return self.digest.hexdigest()


def parse_metadata(header):
    """The `Upload-Metadata` header (comma-separated `key base64value`) as
    a dict of text; 400 on a malformed pair or an unknown key."""
    meta = {}
    for pair in filter(None, (p.strip() for p in (header or "").split(","))):
        key, _, value = pair.partition(" ")
        if key not in METADATA_KEYS:
            raise Refused("unknown Upload-Metadata key %s; known: %s"
                          % (short(key), ", ".join(sorted(METADATA_KEYS))))
        try:
            meta[key] = base64.b64decode(value.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise Refused("Upload-Metadata %s is not base64 of UTF-8 text" % key) from None
    return meta


def _flag(meta, key):
    value = meta.get(key, "false").lower()
    if value not in ("true", "false", "1", "0", ""):
        raise Refused("Upload-Metadata %s must be true or false" % key)
    return value in ("true", "1")


def check_request(length, meta):
    """Check an upload's declared length and metadata before any store is
    chosen; returns the row's fields. 400 naming what is wrong."""
    if length is None or length < 0:
        raise Refused("Upload-Length must be given, a whole number of bytes")
    dest = meta.get("dest")
    if not dest:
        raise Refused("Upload-Metadata must name dest, the store path to upload to")
    split_store_path(dest)  # the file name's rules
    md5 = models.check_md5(meta["md5"]) if meta.get("md5") else None
    ingest.policy_code(meta.get("deletion_policy"))
    directory = meta.get("directory")
    if directory not in (None, "", "tar"):
        raise Refused("Upload-Metadata directory must be 'tar'")
    return dict(dest_store_path=dest, length=length, md5=md5, is_tar=bool(directory),
                null_obsid=_flag(meta, "null_obsid"),
                deletion_policy=meta.get("deletion_policy"))


def create(store, source, fields, limit, inference_mode):
    """Record a new upload of `fields` (from `check_request`) by `source`
    (its name) on `store` (a `stores.StoreAccess` that had room for it),
    then make its staging folder; returns the Upload row. Whatever would
    refuse it after its last byte and can be known now is refused first
    (its destination; an obsid that cannot be known, `inference_mode` being
    `[librarian] obsid_inference_mode`). The reservation
    is checked once the row is in (`check_open_uploads` with `limit`, and
    the store's room), so that requests at once cannot all pass a check
    made before any of them was recorded: 429 or 400, the row gone."""
    store.resolve(fields["dest_store_path"])  # a path leaving the store: refused now
    ingest.check_destination(store, fields["dest_store_path"])  # not after the last byte
    ingest.refuse_unknown_obsid_early(fields["dest_store_path"], fields["is_tar"],
                                      fields["null_obsid"], inference_mode)
    upload_id = uuid.uuid4().hex
    now = utcnow()
    staging = posixpath.join(store.staging_root(), upload_id)
    with models.write_transaction():
        row = Upload.create(id=upload_id, source=source, store=store.row, staging=staging,
                            created=now, updated=now, **fields)
    try:
        check_open_uploads(source, limit, besides=upload_id)
        free = store.free_space()
        if free is not None and free < reserved(store.row):
            raise Refused("store %s has no room for %d more bytes: other uploads begun at "
                          "the same time took it" % (store.name, row.length))
        store.new_upload_dir(staging)
    except BaseException:
        with models.write_transaction():
            row.delete_instance()
        raise
    return row


def reserved(store_row):
    """Bytes that unfinished uploads to the store will still write."""
    total = (Upload.select(pw.fn.SUM(Upload.length - Upload.offset))
             .where((Upload.store == store_row) & Upload.outcome.is_null()).scalar())
    return int(total or 0)


def check_open_uploads(source, limit, besides=None):
    """429 when `source` (a name) has `limit` unfinished uploads already,
    not counting the upload `besides` (an id)."""
    n = Upload.select().where((Upload.source == source) & Upload.outcome.is_null()
                              & (Upload.id != (besides or ""))).count()
    if n >= limit:
        raise LibrarianError(429, "%s has %d unfinished uploads, the most [server] "
                             "uploads_per_caller allows; finish or abandon (DELETE) some"
                             % (source, n))


def find(upload_id, source):
    """The Upload `upload_id` of `source` (a models.Source; an admin sees
    every one); 404 otherwise, so that nobody learns of others' uploads."""
    row = Upload.get_or_none(Upload.id == upload_id) if len(upload_id) == 32 else None
    if row is None or not row.source or (  # no source: orphaned, for expiry alone
            row.source != source.name and not source.allows("admin")):
        raise NotFound("no upload %s" % short(upload_id))
    return row


def receive(stream, length):
    """Read a chunk of `length` bytes from the request body `stream` into a
    new anonymous mmap: one copy from waitress's buffer, page-aligned for
    `LocalFS.write_at`'s direct I/O, and its memory goes back to the system
    when the last reference (the running MD5's) is dropped. Returns (the
    chunk, the number of bytes the body had: less than `length` when it
    ended early)."""
    if length == 0:
        return b"", 0
    chunk = mmap.mmap(-1, length)
    view, got = memoryview(chunk), 0
    while got < length:
        if hasattr(stream, "readinto"):  # waitress's buffer: no copy in between
            n = stream.readinto(view[got:])
        else:  # PEP 3333 promises only read()
            block = stream.read(min(length - got, 1 << 20))
            n = len(block)
            view[got:got + n] = block
        if not n:
            break
        got += n
    view.release()
    return chunk, got


def parse_checksum(checksum_header):
    """(algorithm, digest bytes) of an `Upload-Checksum` header
    (`algorithm base64digest`), or None without one; 400 when it is
    malformed or names an algorithm not offered."""
    if checksum_header is None:
        return None
    algorithm, _, value = checksum_header.strip().partition(" ")
    if algorithm not in CHECKSUMS:
        raise Refused("Upload-Checksum algorithm %s is not supported; supported: %s"
                      % (short(algorithm), ", ".join(CHECKSUMS)))
    try:
        expected = base64.b64decode(value.strip(), validate=True)
    except binascii.Error:
        raise Refused("Upload-Checksum is not `algorithm base64digest`") from None
    return algorithm, expected


def check_chunk(data, checksum):
    """Refuse (460 by `ChecksumMismatch`) a chunk whose checksum (from
    `parse_checksum`) does not match."""
    algorithm, expected = checksum
    if CHECKSUMS[algorithm](data) != expected:
        raise ChecksumMismatch("the chunk's %s differs from its Upload-Checksum; send it again"
                               % algorithm)


def expected_md5(row, end, final_md5):
    """The MD5 (hex) the upload `row` must have, if any: declared at its
    creation, or sent in `MD5_HEADER` with the chunk that ends at byte
    `end` = its length (a client that hashes as it sends knows it only
    then). 400 for the header on another chunk, malformed, or differing
    from the declared one."""
    if final_md5 is None:
        return row.md5
    if end != row.length:
        raise Refused("send %s only with the chunk that completes the upload" % MD5_HEADER)
    final_md5 = models.check_md5(final_md5)
    if row.md5 and row.md5 != final_md5:
        raise Refused("%s %s differs from the MD5 the upload was created with, %s"
                      % (MD5_HEADER, final_md5, row.md5))
    return final_md5


def _renew():
    """Renew the claims of the uploads this process is writing (a long last
    chunk must not look abandoned to another host); in the heartbeat's
    transaction (`intents.RENEWALS`). A claim whose request has ended is not
    renewed, even if ending it in the database failed."""
    with _writing_lock:
        ids = list(_writing_here)
    if ids:
        (Upload.update(updated=utcnow())
         .where((Upload.writer == this_process()) & Upload.id.in_(ids)).execute())


intents.RENEWALS.append(_renew)


@contextlib.contextmanager
def claimed(row, offset):
    """Claim `row` for this process at `offset` (compare-and-set) for the
    block, which gets the fresh row; 409 when the offset is not the
    upload's or a live request is writing it. Afterwards the claim is
    this process's no longer, also when the block could not end it in the
    database (gone away meanwhile): `_writing` then counts it as free."""
    with _writing_lock:  # first among this process's requests...
        if row.id in _writing_here:
            raise Conflict("upload %s is being written by another request" % row.id)
        _writing_here.add(row.id)
    try:
        yield _claim(row, offset)  # ...then among all processes
    finally:
        with _writing_lock:
            _writing_here.discard(row.id)


def _claim(row, offset):
    """The database's half of `claimed`; returns the fresh row."""
    me = this_process()
    with models.write_transaction():
        fresh = Upload.get_or_none(Upload.id == row.id)
        if fresh is None:
            raise NotFound("upload %s was removed" % row.id)
        _check_offset(offset, fresh)
        if fresh.writer != me and _writing(fresh):  # (no request of ours holds it)
            raise Conflict("upload %s is being written by another request" % row.id)
        n = (Upload.update(writer=me, updated=utcnow())
             .where((Upload.id == row.id) & (Upload.offset == offset)
                    & ((Upload.writer.is_null()) | (Upload.writer == fresh.writer)))
             .execute())
    if n != 1:
        raise Conflict("upload %s is being written by another request" % row.id)
    return fresh


def _check_offset(offset, row):
    """409 unless `offset` is the upload `row`'s offset."""
    if row.offset != offset:
        raise Conflict("Upload-Offset %d is not the upload's offset, %d (ask with HEAD)"
                       % (offset, row.offset))


def _writing(row):
    """Whether a live request holds the upload's claim: one of this process
    still at work (a claim whose request ended without ending it, the
    database away, is free); one of another process of this host that runs;
    or of another host whose heartbeat (`updated`, renewed by `_renew`) is
    within the intents' lease."""
    if row.writer == this_process():
        return row.id in _writing_here
    return bool(row.writer) and not intents.is_gone(row.writer, row.updated)


def release(row, offset=None, outcome=None):
    """End this process's claim, recording the new offset and outcome."""
    fields = {"writer": None, "updated": utcnow()}
    if offset is not None:
        fields["offset"] = offset
    if outcome is not None:
        fields["outcome"] = json.dumps(outcome)
    with models.write_transaction():
        Upload.update(**fields).where((Upload.id == row.id)
                                      & (Upload.writer == this_process())).execute()


def append(store, row, offset, data, finish, checksum=None):
    """Write the chunk `data` at `offset` of the upload `row` (on `store`),
    and when it is the last, call `finish(staged_path, size, md5,
    recorded)`, which verifies and registers, calling `recorded(status,
    reply)` inside the registration's transaction: the upload's outcome
    commits with the file's records, so a process killed between the two
    leaves no finished upload that claims to be unfinished. The chunk's
    `checksum` (`parse_checksum`) is checked while it is written; a
    mismatch leaves the offset as it was (what was written
    beyond it is cut off by the next write). Returns the new offset.
    Raises `LibrarianError`: 460 for a damaged chunk, 409 for a wrong
    offset or a concurrent writer, 400 for bytes beyond the length, or
    what `finish` raised (recorded as the outcome too)."""
    if row.outcome is not None:
        raise Conflict("upload %s is finished; GET it for the outcome" % row.id)
    if offset + len(data) > row.length:
        raise Refused("the chunk ends at byte %d, beyond the upload's length %d"
                      % (offset + len(data), row.length))
    if not data and offset < row.length:  # nothing to write, and no sign of life for `expire`
        _check_offset(offset, row)
        return offset
    with claimed(row, offset) as row:
        return _append(store, row, offset, data, finish, checksum)


def _append(store, row, offset, data, finish, checksum):
    """`append` for a claimed `row`."""
    partial = posixpath.join(row.staging, PARTIAL)
    digest = None
    try:
        if offset + len(data) == row.length:
            _undo_completion(store, row, partial)
        digest = None if row.is_tar else _running_md5(store, row, partial, offset)
        verified = _hashers.submit(check_chunk, data, checksum) if checksum else None
        store.write_at(partial, offset, data)
        if verified is not None:
            verified.result()
        new_offset = offset + len(data)
        if digest is not None:
            digest.feed(data)
            with _digests_lock:
                _digests[row.id] = digest
        if new_offset < row.length:
            release(row, new_offset)
            return new_offset
        _complete(store, row, partial, digest, finish)
        intents.crash_point("upload:finished")
    except ChecksumMismatch:
        if digest is not None:  # still the MD5 of the bytes before the offset
            with _digests_lock:
                _digests[row.id] = digest
        release(row)
        raise
    except LibrarianError as e:
        if row.offset + len(data) == row.length:
            outcome = {"success": False, "status": e.status, "message": e.message[:600]}
            release(row, row.length, outcome)
            store.remove_upload_dir(row.staging)
        else:
            release(row)
        raise
    except BaseException:
        release(row)
        raise
    store.remove_upload_dir(row.staging)
    return row.length


def _staged(row):
    """The path in the upload's staging folder that its completed bytes
    take before they are registered (the file's or directory's name)."""
    return posixpath.join(row.staging, split_store_path(row.dest_store_path)[1])


def _undo_completion(store, row, partial):
    """Before the last chunk is written again, undo what a completion that
    did not end (a crash, an unexpected error) left in the staging folder:
    the flat file renamed from the partial (or put back there by a settle)
    becomes the partial again; a directory unpacked beside its tar goes."""
    staged = _staged(row)
    if not store.exists_at(staged):
        return
    if row.is_tar:
        store.remove_staged(staged)
    elif not store.exists_at(partial):
        store.rename_staged(staged, partial)


def _running_md5(store, row, partial, offset):
    """The MD5 of the first `offset` bytes: kept here from the previous
    chunk, else (another process took them) read back from staging."""
    with _digests_lock:
        digest = _digests.pop(row.id, None)
    if digest is not None and digest.offset == offset:
        return digest
    return RunningMD5(store.md5_of_prefix(partial, offset) if offset else hashlib.md5(), offset)


def _complete(store, row, partial, digest, finish):
    """Turn the complete bytes into the staged item (a directory unpacked
    from its tar) and `finish` it, recording the outcome with it."""
    with _digests_lock:
        _digests.pop(row.id, None)
    staged = _staged(row)
    if row.is_tar:
        size, md5 = store.unpack(partial, staged, posixpath.basename(staged))
    else:
        store.rename_staged(partial, staged)
        size, md5 = row.length, digest.hexdigest()

    def recorded(status, reply):
        n = (Upload.update(writer=None, offset=row.length, updated=utcnow(),
                           outcome=json.dumps(dict(reply, success=True, status=status)))
             .where((Upload.id == row.id) & (Upload.writer == this_process())).execute())
        if n != 1:  # rolls the registration back: the claim was lost
            raise Conflict("upload %s is no longer this request's to finish" % row.id)
    finish(staged, size, md5, recorded)


def outcome_of(row):
    """The upload's state as JSON-able dict: offset and length, and once
    finished the reply of its registration (or its error)."""
    state = {"id": row.id, "dest_store_path": row.dest_store_path, "length": row.length,
             "offset": row.offset, "finished": row.outcome is not None}
    if row.outcome is not None:
        state["outcome"] = json.loads(row.outcome)
    return state


def terminate(store, row):
    """Remove an upload and its staging (tus termination); 409 while a live
    process writes it."""
    with claimed(row, row.offset), models.write_transaction():
        row.delete_instance()
    store.remove_upload_dir(row.staging)


def expire(context, hours):
    """Remove uploads untouched for `hours` (and their staging) that no
    live process is writing; returns how many."""
    cutoff = utcnow() - datetime.timedelta(hours=hours)
    removed = 0
    for row in Upload.select().where(Upload.updated < cutoff):
        if _writing(row):
            continue
        with models.write_transaction():
            n = Upload.delete().where((Upload.id == row.id)
                                      & (Upload.updated == row.updated)).execute()
        if n:
            removed += 1
            context.open_store(row.store).remove_upload_dir(row.staging)
            if row.outcome is None:
                log.info("removed the abandoned upload %s of %s for %s", row.id, row.source,
                         row.dest_store_path)
    return removed
