"""Client of the Librarian: the `LibrarianClient` class and the `librarian`
command.

Connections are read from `~/.hl_client.cfg` (JSON), as the existing HERA
client does:

    {"connections": {"NAME": {"url": "http://host:21106/", "authenticator": "..."}}}

Operations of the existing protocol are POSTed as a form field `request`
holding a JSON object (API.md section 1); uploads and downloads use the
streamed `PUT /api/upload/...` and `GET /api/download/...` of section 2.

This module also holds the checksum definition shared by every Librarian
(`path_md5`), so that client and server compute it in one way. It depends
on `requests`, `tqdm` and (for `upload --via-ssh`) `paramiko`; `pip
install .` installs it alone.
"""

import argparse
import base64
import bisect
import hashlib
import io
import json
import os
import posixpath
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from urllib.parse import quote, urljoin

import requests

CHUNK = 1 << 20
TUS_VERSION = "1.0.0"
UPLOAD_CHUNK = 64 << 20  # most bytes per request of a resumable upload (and the server's bound)
RESUME_ATTEMPTS = 8      # dropped connections or server errors in a row an upload survives
RESUME_DELAY = 0.5       # seconds before the first resumption; doubling, up to 30
CONFIG_PATH = os.path.join("~", ".hl_client.cfg")
TIMEOUT = (30, 3600)  # seconds: connect, and between bytes


class RPCError(Exception):
    """A refused or failed request; the message is the server's (or says
    why the server could not be reached)."""

    def __init__(self, operation, message, status=None):
        super().__init__("%s: %s" % (operation, message))
        self.operation = operation
        self.message = message
        self.status = status


# ---------------------------------------------------------------------------
# The shared checksum definition
# ---------------------------------------------------------------------------

def md5sum_line(md5_hex, relpath):
    """One line of GNU `md5sum` output for `./relpath`, as bytes; names with
    a backslash or newline are escaped the way md5sum escapes them."""
    path = b"./" + os.fsencode(relpath)
    if b"\\" in path or b"\n" in path:
        path = path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n")
        return b"\\" + md5_hex.encode() + b"  " + path + b"\n"
    return md5_hex.encode() + b"  " + path + b"\n"


def directory_digest(entries):
    """MD5 (hex) of a directory from `(relative_path, md5_hex)` pairs: the
    MD5 of what `cd DIR && find . ! -type d -print0 | LC_ALL=C sort -z |
    xargs -0 -n1 md5sum` prints (paths sorted by their bytes)."""
    digest = hashlib.md5()
    for relpath, md5_hex in sorted(entries, key=lambda e: os.fsencode(e[0])):
        digest.update(md5sum_line(md5_hex, relpath))
    return digest.hexdigest()


def file_md5(path):
    """(size in bytes, MD5 hex) of a flat file, read in chunks."""
    digest = hashlib.md5()
    size = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            size += len(chunk)
            digest.update(chunk)
    return size, digest.hexdigest()


def walk_files(root):
    """Relative paths of the non-directory entries under `root`, as `find .
    ! -type d` lists them (symbolic links to directories included, not
    followed)."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in filenames + links:
            yield name if rel == "." else os.path.join(rel, name)


def file_type(name):
    """The type of a file: the text after the last dot of its name ('' when
    there is none)."""
    return name.rsplit(".", 1)[1] if "." in name else ""


def path_md5(path):
    """(size, md5) of a flat file or of a directory by the shared
    definition (size of a directory = sum of its files' sizes)."""
    if os.path.isdir(path) and not os.path.islink(path):
        entries, total = [], 0
        for rel in walk_files(path):
            size, md5 = file_md5(os.path.join(path, rel))
            total += size
            entries.append((rel, md5))
        return total, directory_digest(entries)
    return file_md5(path)


# ---------------------------------------------------------------------------
# The client
# ---------------------------------------------------------------------------

def load_connection(conn_name, config_path=None):
    """`{url, authenticator}` of connection `conn_name` in the client
    configuration file. Raises `RPCError` naming what is missing."""
    path = os.path.expanduser(config_path or os.environ.get("HL_CLIENT_CFG") or CONFIG_PATH)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as e:
        raise RPCError("config", "cannot read %s: %s" % (path, e.strerror)) from None
    except ValueError as e:
        raise RPCError("config", "%s is not valid JSON: %s" % (path, e)) from None
    try:
        conn = config["connections"][conn_name]
        url, authenticator = conn["url"], conn["authenticator"]
    except (KeyError, TypeError):
        raise RPCError("config", "no connection %r with url and authenticator in %s"
                       % (conn_name, path)) from None
    if not isinstance(url, str) or not isinstance(authenticator, str):
        raise RPCError("config", "connection %r in %s: url and authenticator must be strings"
                       % (conn_name, path))
    return {"url": url, "authenticator": authenticator}


class LibrarianClient:
    """Talks to one Librarian. `LibrarianClient("NAME")` reads connection
    NAME from `~/.hl_client.cfg`; `conn_config={"url", "authenticator"}`
    gives it directly. Every method raises `RPCError` on refusal."""

    def __init__(self, conn_name=None, conn_config=None, config_path=None):
        if conn_config is None:
            conn_config = load_connection(conn_name, config_path)
        self.conn_name = conn_name
        self.url = conn_config["url"].rstrip("/") + "/"
        self.authenticator = conn_config["authenticator"]
        self.session = requests.Session()

    # -- transport --------------------------------------------------------

    def _reply(self, operation, resp):
        try:
            body = resp.json()
        except ValueError:
            raise RPCError(operation, "HTTP %d with a reply that is not JSON"
                           % resp.status_code, resp.status_code) from None
        if not isinstance(body, dict) or not body.get("success"):
            message = body.get("message") if isinstance(body, dict) else None
            raise RPCError(operation, message or "HTTP %d" % resp.status_code, resp.status_code)
        return body

    def _send(self, operation, method, url, **kwargs):
        try:
            return self.session.request(method, url, timeout=TIMEOUT, **kwargs)
        except requests.RequestException as e:
            raise self._unreachable(operation, e) from None

    def _unreachable(self, operation, error):
        """The RPCError for a server that could not be reached: the URL and
        the reason in a few words (requests' own text nests three errors)."""
        return RPCError(operation, "cannot reach %s: %s" % (self.url, unreachable_reason(error)))

    def _do_http_post(self, operation, **kwargs):
        """Call `/api/<operation>` with the existing protocol; arguments
        that are None are left out. Returns the reply object."""
        payload = {k: v for k, v in kwargs.items() if v is not None}
        payload["authenticator"] = self.authenticator
        resp = self._send(operation, "POST", self.url + "api/" + operation,
                          data={"request": json.dumps(payload)})
        return self._reply(operation, resp)

    def _auth_header(self):
        return {"Authorization": "Bearer " + self.authenticator}

    # -- operations of the existing protocol ---------------------------------

    def ping(self):
        return self._do_http_post("ping")

    def probe_stores(self):
        return self._do_http_post("probe_stores")["stores"]

    def create_file_event(self, file_name, type, **payload):
        return self.add_file_event(file_name, type, payload)

    def add_file_event(self, file_name, type, payload):
        """Record an event; `payload` is a dict (any keys, `type` included)."""
        return self._do_http_post("create_file_event", file_name=file_name, type=type,
                                  payload=payload)

    def locate_file_instance(self, file_name):
        return self._do_http_post("locate_file_instance", file_name=file_name)

    def initiate_upload(self, upload_size, known_staging_store=None, known_staging_subdir=None,
                        files=None, observations=None, sessions=None, records_only=None):
        """`records_only` (our addition): only ingest the record sets; no
        staging folder is made (the bytes follow as an upload)."""
        return self._do_http_post("initiate_upload", upload_size=upload_size,
                                  known_staging_store=known_staging_store,
                                  known_staging_subdir=known_staging_subdir, files=files,
                                  observations=observations, sessions=sessions,
                                  records_only=records_only)

    def complete_upload(self, store_name, staging_dir, dest_store_path, meta_mode,
                        deletion_policy="disallowed", staging_was_known=False, null_obsid=False):
        return self._do_http_post("complete_upload", store_name=store_name,
                                  staging_dir=staging_dir, dest_store_path=dest_store_path,
                                  meta_mode=meta_mode, deletion_policy=deletion_policy,
                                  staging_was_known=staging_was_known, null_obsid=null_obsid)

    def register_instances(self, store_name, file_info, null_obsid=False):
        return self._do_http_post("register_instances", store_name=store_name,
                                  file_info=file_info, null_obsid=null_obsid)

    def search(self, search, output_format, limit=None, offset=None):
        """Run a search (text or dict); returns the list of records."""
        if not isinstance(search, str):
            search = json.dumps(search)
        return self._do_http_post("search", search=search, output_format=output_format,
                                  limit=limit, offset=offset)["results"]

    def search_files(self, search, limit=None, offset=None):
        return self.search(search, "file-listing-json", limit, offset)

    def search_instances(self, search, limit=None, offset=None):
        return self.search(search, "instance-listing-json", limit, offset)

    def search_observations(self, search, limit=None, offset=None):
        return self.search(search, "obs-listing-json", limit, offset)

    def search_sessions(self, search, limit=None, offset=None):
        return self.search(search, "session-listing-json", limit, offset)

    def assign_observing_sessions(self, minimum_start_jd=None, maximum_start_jd=None):
        return self._do_http_post("assign_observing_sessions",
                                  minimum_start_jd=minimum_start_jd,
                                  maximum_start_jd=maximum_start_jd)

    def describe_session_without_event(self, source, event_type):
        return self._do_http_post("describe_session_without_event", source=source,
                                  event_type=event_type)

    def set_one_file_deletion_policy(self, file_name, deletion_policy, restrict_to_store=None):
        return self._do_http_post("set_one_file_deletion_policy", file_name=file_name,
                                  deletion_policy=deletion_policy,
                                  restrict_to_store=restrict_to_store)

    def delete_file_instances(self, file_name, mode="standard", restrict_to_store=None):
        return self._do_http_post("delete_file_instances", file_name=file_name, mode=mode,
                                  restrict_to_store=restrict_to_store)

    def delete_file_instances_matching_query(self, query, mode="standard",
                                             restrict_to_store=None):
        return self._do_http_post("delete_file_instances_matching_query", query=query,
                                  mode=mode, restrict_to_store=restrict_to_store)

    def stage_files(self, search, dest, user=None):
        """Ask the Librarian to copy the files a search matches to `dest`
        under its staging area; returns `{destination, n_instances,
        n_bytes}`."""
        if not isinstance(search, str):
            search = json.dumps(search)
        try:
            return self._do_http_post("search", search=search,
                                      output_format="stage-the-files-json", stage_user=user,
                                      stage_dest=dest)
        except RPCError as e:  # named as the caller asked it, not by the operation it rides
            raise RPCError("stage-files", e.message, e.status) from None

    def verify_file(self, file_name, here_only=None, recompute=None):
        """Our addition: recompute every copy of a file, here and (unless
        `here_only`) at the other Librarians holding one; `recompute` False
        reports the last verifications. Returns `{copies: [{librarian,
        store_name, store_path, ok, result, md5, size, verified_at}]}`."""
        return self._do_http_post("verify_file", file_name=file_name, here_only=here_only,
                                  recompute=recompute)

    def copy_held(self, file_name, store_name, store_path):
        """Our addition: tell the Librarian we sent a file to that we hold a
        copy of it (verified as we read it) on our store at that path."""
        return self._do_http_post("copy_held", file_name=file_name, store_name=store_name,
                                  store_path=store_path)

    def copy_gone(self, file_name):
        """Our addition: tell the Librarian a file came from that our last
        copy of it is gone."""
        return self._do_http_post("copy_gone", file_name=file_name)

    def launch_file_copy(self, file_name, connection_name, remote_store_path=None,
                         known_staging_store=None, known_staging_subdir=None):
        return self._do_http_post("launch_file_copy", file_name=file_name,
                                  connection_name=connection_name,
                                  remote_store_path=remote_store_path,
                                  known_staging_store=known_staging_store,
                                  known_staging_subdir=known_staging_subdir)

    def initiate_offload(self, source_store_name, dest_store_name):
        return self._do_http_post("initiate_offload", source_store_name=source_store_name,
                                  dest_store_name=dest_store_name)

    def create_standing_order(self, name, search, conn_name):
        return self._do_http_post("create_standing_order", name=name, search=search,
                                  conn_name=conn_name)

    def update_standing_order(self, name, search=None, conn_name=None):
        return self._do_http_post("update_standing_order", name=name, search=search,
                                  conn_name=conn_name)

    def delete_standing_order(self, name):
        return self._do_http_post("delete_standing_order", name=name)

    def list_standing_orders(self):
        return self._do_http_post("list_standing_orders")["standing_orders"]

    def offers_streamed_upload(self):
        """Whether the server takes bytes over HTTP (our addition, described
        by its OpenAPI document); a server of the original kind does not,
        and takes them only by the two-step protocol over SSH. Raises
        `RPCError` when the server cannot be asked."""
        resp = self._send("openapi", "GET", self.url + "api/openapi.json")
        if resp.status_code in (404, 405):
            return False
        try:
            paths = resp.json()["paths"] if resp.status_code == 200 else None
        except (ValueError, KeyError, TypeError):
            paths = None
        if paths is None:
            raise RPCError("openapi", "HTTP %d for the API description" % resp.status_code,
                           resp.status_code)
        return "/api/upload/{dest_store_path}" in paths

    # -- streamed transfers ---------------------------------------------------

    def upload(self, local_path, dest_store_path, null_obsid=False, deletion_policy="disallowed",
               progress=None, chunk_size=None):
        """Send a file or a directory (as a tar) to `dest_store_path` as a
        resumable upload (see `upload_stream`). A flat file's MD5 is
        computed as its chunks are read and sent with the last one; a
        directory's (the shared definition, over its files) first. Either
        way the server refuses bytes that differ from it. Returns the
        server's reply `{name, store_name, store_path, size, md5, obsid}`
        plus `created` (False when the identical file was there)."""
        local_path = local_path.rstrip("/") or local_path
        if not (os.path.isfile(local_path) or os.path.isdir(local_path)):
            raise RPCError("upload", "%s is not a file or a directory" % local_path)
        parts = dest_store_path.split("/")
        if not dest_store_path or dest_store_path.endswith("/") or ".." in parts:
            raise RPCError("upload", "destination %r must be a relative path ending in the "
                           "file's name, without '..'" % dest_store_path)
        if os.path.isdir(local_path):
            md5 = path_md5(local_path)[1]
            stream = TarView(local_path, posixpath.basename(dest_store_path))
            signature = md5
        else:
            md5 = None
            stream = open(local_path, "rb")
            st = os.fstat(stream.fileno())
            signature = [os.path.abspath(local_path), st.st_size, st.st_mtime_ns, st.st_ino]
        memo = UploadMemo()
        caller = hashlib.sha256(self.authenticator.encode("utf-8")).hexdigest()[:16]
        key = [self.url, dest_store_path, caller, signature, bool(null_obsid), deletion_policy]
        for stale, url in memo.others(key):  # of bytes since changed: they hold space and a slot
            self._abandon(url)
            memo.put(stale, None)
        try:
            with stream:
                reply = self.upload_stream(
                    stream, md5, dest_store_path, os.path.isdir(local_path), null_obsid,
                    deletion_policy, progress, chunk_size, resume_url=memo.get(key),
                    on_created=lambda url: memo.put(key, url))
        except RPCError as e:
            if e.status is not None and e.status < 500:  # refused: sending again starts afresh
                memo.put(key, None)
            raise
        memo.put(key, None)
        return reply

    def _abandon(self, url):
        """Remove an unfinished upload on the server (tus termination), if
        it is still there; failures are left to the server's expiry."""
        try:
            self.session.request("DELETE", url, timeout=TIMEOUT, headers=dict(
                self._auth_header(), **{"Tus-Resumable": TUS_VERSION}))
        except requests.RequestException:
            pass

    def upload_stream(self, stream, md5, dest_store_path, is_dir=False, null_obsid=False,
                      deletion_policy="disallowed", progress=None, chunk_size=None,
                      resume_url=None, on_created=None):
        """Send the bytes of a seekable binary `stream` (a directory as a
        tar stream with `is_dir`) whose MD5 by the shared definition is
        `md5` (None for a flat stream: computed as it is read, sent with the
        last chunk), by the tus 1.0 resumable-upload protocol (core,
        creation, checksum; https://tus.io/protocols/resumable-upload):
        chunks of `chunk_size` bytes (at most the server's body bound), each
        with its CRC-32; after a dropped connection or a server error the offset is
        asked for with HEAD and the upload goes on from there, up to
        RESUME_ATTEMPTS times in a row. `progress(n_bytes)` is called after
        each chunk. With `resume_url` (an upload of the same bytes begun
        earlier, which `on_created(url)` was given), the upload goes on
        from the server's offset there, if the server still knows it;
        `on_created(None)` says when the server has answered the outcome
        (nothing is left to resume). Creating the upload and asking its
        outcome are tried again like the chunks.
        Returns the reply as `upload` does; raises `RPCError`.

        (Our own loop rather than the `tuspy` package: that one sets no
        timeouts, so a server gone silent would hang a pipeline forever.
        The server is tested against tuspy as an existing tus client.)"""
        length = stream.seek(0, os.SEEK_END)
        if md5 is None and (is_dir or length == 0):
            md5 = hashlib.md5().hexdigest() if length == 0 else None
            if md5 is None:
                raise ValueError("a directory's MD5 must be given (path_md5)")
        chunk_size = min(chunk_size or UPLOAD_CHUNK, self._body_bound())
        meta = {"dest": dest_store_path, "deletion_policy": deletion_policy}
        if md5:
            meta["md5"] = md5
        if null_obsid:
            meta["null_obsid"] = "true"
        if is_dir:
            meta["directory"] = "tar"
        headers = dict(self._auth_header(), **{"Tus-Resumable": TUS_VERSION})
        url, offset = resume_url, None
        if resume_url:
            offset = self._tus_offset(resume_url, headers, None, missing=None)
        if offset is None:
            resp = self._retrying("upload", "POST", self.url + "api/uploads", headers=dict(
                headers, **{"Upload-Length": str(length),
                            "Upload-Metadata": _tus_metadata(meta)}))
            if resp.status_code != 201:
                self._reply("upload", resp)  # raises with the server's message
            url, offset = urljoin(self.url, resp.headers["Location"]), 0
            if on_created:
                on_created(url)
        with ChunkReader(stream, length, chunk_size, hash_md5=md5 is None) as chunks:
            try:
                reply = self._send_chunks(url, headers, offset, length, chunks, progress)
            finally:
                if on_created and chunks.finished:
                    on_created(None)  # the server is done with it: nothing to resume
            sent = md5 or chunks.whole_md5()
        if reply.get("md5") != sent:
            raise RPCError("upload", "the server registered MD5 %s, but the bytes sent have %s"
                           % (reply.get("md5"), sent))
        return reply

    def _retrying(self, operation, method, url, **kwargs):
        """`_send`, tried again after a dropped connection or a server error
        (5xx: also a server too busy to take a body now), up to
        RESUME_ATTEMPTS times with growing pauses; returns the last answer."""
        for failures in range(RESUME_ATTEMPTS + 1):
            try:
                resp = self.session.request(method, url, timeout=TIMEOUT, **kwargs)
                if resp.status_code < 500 or failures == RESUME_ATTEMPTS:
                    return resp
            except requests.RequestException as e:
                if failures == RESUME_ATTEMPTS:
                    raise self._unreachable(operation, e) from None
            time.sleep(min(30.0, RESUME_DELAY * 2 ** (failures + 1)))

    def _send_chunks(self, url, headers, offset, length, chunks, progress):
        """PATCH the chunks from `offset` on (see `upload_stream`), then GET
        the outcome; returns the reply."""
        failures = 0
        while offset < length:
            chunk, digest, final_md5 = chunks.at(offset)
            resp = self._send_chunk(url, headers, offset, chunk, digest, final_md5)
            if resp is not None and resp.status_code == 204:
                offset, failures = int(resp.headers["Upload-Offset"]), 0
                if progress:
                    progress(len(chunk))
                continue
            if resp is not None and resp.status_code < 500 and resp.status_code not in (409, 460):
                self._reply("upload", resp)  # refused: raises with the server's message
            failures += 1
            if failures > RESUME_ATTEMPTS:
                raise RPCError("upload", "gave up after %d failed attempts to send bytes %d on "
                               "to %s; sending the same file again goes on from there (the "
                               "server keeps what it has for a day)" % (failures, offset,
                                                                        self.url))
            time.sleep(min(30.0, RESUME_DELAY * 2 ** failures))
            offset = self._tus_offset(url, headers, offset)
        outcome = self._reply("upload", self._retrying("upload", "GET", url, headers=headers))
        chunks.finished = True
        outcome = outcome.get("outcome") or {}
        if not outcome.get("success"):
            raise RPCError("upload", outcome.get("message", "the upload did not finish"),
                           outcome.get("status"))
        reply = {k: v for k, v in outcome.items() if k not in ("success", "status")}
        reply["created"] = outcome["status"] == 201
        return reply

    def _send_chunk(self, url, headers, offset, chunk, digest, final_md5=None):
        """PATCH one chunk with its CRC-32 (base64) and, on the last chunk
        of a stream hashed as it was read, the whole MD5 (the server's
        X-Librarian-MD5); None when the connection failed."""
        headers = dict(headers, **{"Upload-Offset": str(offset),
                                   "Upload-Checksum": "crc32 " + digest,
                                   "Content-Type": "application/offset+octet-stream"})
        if final_md5:
            headers["X-Librarian-MD5"] = final_md5
        try:
            return self.session.request("PATCH", url, data=chunk, timeout=TIMEOUT,
                                        headers=headers)
        except requests.RequestException:
            return None

    def _tus_offset(self, url, headers, offset, missing=RPCError):
        """The upload's offset on the server (HEAD), or `offset` when it
        cannot be asked now; when the server no longer knows the upload,
        `missing` (raised if it is RPCError, else returned)."""
        try:
            resp = self.session.request("HEAD", url, headers=headers, timeout=TIMEOUT)
        except requests.RequestException:
            return offset
        if resp.status_code == 404:
            if missing is RPCError:
                raise RPCError("upload", "the server no longer knows the upload %s" % url, 404)
            return missing
        return int(resp.headers.get("Upload-Offset", offset))

    def _body_bound(self):
        """The largest request body the server reads (its tus OPTIONS)."""
        resp = self._retrying("upload", "OPTIONS", self.url + "api/uploads")
        if resp.status_code >= 400 or "Tus-Version" not in resp.headers:
            raise RPCError("upload", "the server at %s takes no uploads over HTTP (HTTP %d); "
                           "use --via-ssh" % (self.url, resp.status_code), resp.status_code)
        return int(resp.headers.get("X-Librarian-Max-Body", 16 << 20))  # (not ours: be modest)

    def upload_via_ssh(self, local_path, dest_store_path, ssh=None, use_rsync=False,
                       null_obsid=False, deletion_policy="disallowed", progress=None):
        """The two-step protocol: `initiate_upload` names a store and a
        staging directory on its host; the bytes are copied there over SSH
        (SFTP through paramiko, or `rsync -e ssh` with `use_rsync`); then
        `complete_upload` has the server check and register them. `ssh` is
        an `SSHOptions` (port, user, key, known_hosts). The file's record is
        read back and compared with the local MD5. Returns `{name,
        store_name, store_path, size, md5, obsid, created}` (`created`
        False: the identical file was already in the archive, at the place
        named); raises `RPCError`."""
        local_path = local_path.rstrip("/") or local_path
        if not (os.path.isfile(local_path) or os.path.isdir(local_path)):
            raise RPCError("upload", "%s is not a file or a directory" % local_path)
        name = dest_store_path.rstrip("/").rsplit("/", 1)[-1]
        size, md5 = path_md5(local_path)
        info = self.initiate_upload(size)
        # staging_dir is relative to the store's prefix (the existing protocol).
        remote = posixpath.join(info["path_prefix"], info["staging_dir"], name)
        ssh = ssh or SSHOptions()
        # The server says which port it reaches the store host on.
        ssh = SSHOptions(ssh.port or info.get("ssh_port"), ssh.user, ssh.key, ssh.known_hosts)
        where = "store %s (host %s port %s)" % (info["name"], info["ssh_host"], ssh.port or 22)
        try:
            if use_rsync:
                _rsync_copy(local_path, info["ssh_host"], remote, ssh)
            else:
                _sftp_copy(local_path, info["ssh_host"], remote, ssh, progress)
        except subprocess.CalledProcessError as e:
            raise RPCError("upload", "rsync to %s failed: %s" % (
                where, e.stderr.decode(errors="replace").strip())) from None
        except Exception as e:  # paramiko's and socket errors
            raise RPCError("upload", "copying to %s failed: %s"
                           % (where, ssh_failure_reason(e))) from None
        reply = self.complete_upload(info["name"], info["staging_dir"], dest_store_path, "infer",
                                     deletion_policy=deletion_policy, null_obsid=null_obsid)
        if "store_path" not in reply:  # a server that does not say where the file is
            record = self.search_files({"name-is-exactly": name})[0]
            reply = {"store_name": info["name"], "store_path": dest_store_path,
                     "size": record["size"], "md5": record["md5"], "obsid": record["obsid"]}
        if reply["md5"] != md5:
            raise RPCError("upload", "%s was registered with md5 %s, but the local copy has %s"
                           % (name, reply["md5"], md5))
        return {"name": name, "store_name": reply["store_name"], "store_path": reply["store_path"],
                "size": reply["size"], "md5": reply["md5"], "obsid": reply["obsid"],
                "created": not reply.get("already_present", False)}

    def download(self, file_name, dest_path, progress=None):
        """Fetch `file_name` to `dest_path` (a directory arrives as a tar and
        is unpacked there). The result is checked against the server's MD5
        and appears at `dest_path` only when complete. Returns (size, md5)."""
        resp = self._send("download", "GET", self.url + "api/download/" + quote(file_name),
                          headers=self._auth_header(), stream=True)
        if resp.status_code != 200:
            self._reply("download", resp)
        expected = resp.headers.get("X-Librarian-MD5")
        is_tar = resp.headers.get("Content-Type", "").startswith("application/x-tar")
        parent = os.path.dirname(os.path.abspath(dest_path))
        if os.path.lexists(dest_path):
            raise RPCError("download", "%s exists already" % dest_path)
        with tempfile.TemporaryDirectory(dir=parent, prefix=".librarian-download-") as tmp:
            chunks = _counting(resp.iter_content(CHUNK), progress)
            if is_tar:
                staged = os.path.join(tmp, file_name)
                _unpack_tar(_IterReader(chunks), tmp, file_name)
            else:
                staged = os.path.join(tmp, "data")
                with open(staged, "wb") as out:
                    for chunk in chunks:
                        out.write(chunk)
            size, md5 = path_md5(staged)
            if expected and md5 != expected:
                raise RPCError("download", "%s arrived with md5 %s, but the server says %s"
                               % (file_name, md5, expected))
            os.rename(staged, dest_path)
        return size, md5


def unreachable_reason(error):
    """Why a request (a `requests.RequestException`) got no answer, in a
    few words: the system's reason for a refused or failed connection
    ('Connection refused', 'Name or service not known'), or a timeout."""
    import re

    if isinstance(error, requests.Timeout):
        return "no answer within %d s" % (TIMEOUT[0] if isinstance(
            error, requests.ConnectTimeout) else TIMEOUT[1])
    text = str(error)
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", text)
    if found:
        return found.group(1).strip().rstrip(".")
    if "RemoteDisconnected" in text or "Connection aborted" in text:
        return "the connection was closed before an answer"
    return text[:200]


def ssh_failure_reason(e):
    """A short description of why an SSH connection failed (paramiko's
    and socket errors), as the server and the client report it."""
    import paramiko

    if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError):
        errors = list(e.errors.values())
        if errors and all(isinstance(x, ConnectionRefusedError) for x in errors):
            return "connection refused"
        return "cannot connect (%s)" % "; ".join(str(x) for x in errors)
    if isinstance(e, paramiko.AuthenticationException):
        return "authentication failed (%s)" % e
    if isinstance(e, paramiko.BadHostKeyException):
        return "its host key does not match the known_hosts entry"
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    if isinstance(e, EOFError):
        return "the connection was closed"
    return str(e) or type(e).__name__


class SSHOptions:
    """How the client logs in to a store host: `port` (None: 22 or
    ~/.ssh/config for rsync), `user`, `key` (private key file) and
    `known_hosts` (file; default ~/.ssh/known_hosts; unknown hosts are
    refused)."""

    def __init__(self, port=None, user=None, key=None, known_hosts=None):
        self.port, self.user, self.key, self.known_hosts = port, user, key, known_hosts

    def ssh_command(self):
        """The `ssh` command line rsync runs (`-e`)."""
        words = ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes"]
        if self.port:
            words += ["-p", str(self.port)]
        if self.user:
            words += ["-l", self.user]
        if self.key:
            words += ["-i", os.path.expanduser(self.key), "-o", "IdentitiesOnly=yes"]
        if self.known_hosts:
            words += ["-o", "UserKnownHostsFile=" + os.path.expanduser(self.known_hosts)]
        return shlex.join(words)


def _sftp_copy(local_path, host, remote, ssh, progress):
    """Copy a file or a directory tree to `host:remote` (a new path) by SFTP."""
    import paramiko

    client = paramiko.SSHClient()
    known_hosts = os.path.expanduser(ssh.known_hosts or "~/.ssh/known_hosts")
    if not os.path.isfile(known_hosts):
        raise OSError("the known_hosts file %s does not exist (give one with --known-hosts)"
                      % known_hosts)
    client.load_host_keys(known_hosts)
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key = os.path.expanduser(ssh.key) if ssh.key else None
    client.connect(host, port=ssh.port or 22, username=ssh.user, key_filename=key,
                   look_for_keys=key is None, allow_agent=key is None, timeout=30)
    def put(sftp, src, dest):
        """One file; `progress` gets the bytes sent since its last call."""
        sent = [0]

        def report(n, total):
            if progress:
                progress(n - sent[0])
            sent[0] = n

        sftp.put(src, dest, callback=report)

    try:
        sftp = client.open_sftp()
        if os.path.isfile(local_path):
            put(sftp, local_path, remote)
            return
        sftp.mkdir(remote)
        for dirpath, dirnames, filenames in os.walk(local_path):
            rel = os.path.relpath(dirpath, local_path)
            here = remote if rel == "." else remote + "/" + rel.replace(os.sep, "/")
            for d in sorted(dirnames):
                sftp.mkdir(here + "/" + d)
            for f in sorted(filenames):
                put(sftp, os.path.join(dirpath, f), here + "/" + f)
    finally:
        client.close()


def _rsync_copy(local_path, host, remote, ssh):
    """Copy a file or a directory tree to `host:remote` with rsync over ssh.
    rsync protects the remote path's spaces and quotes itself (3.2.4+: the
    arguments are not split by the remote shell)."""
    if shutil.which("rsync") is None:
        raise OSError("rsync is not installed here; leave out --rsync to copy by SFTP")
    target = host + ":" + remote
    source = local_path + ("/" if os.path.isdir(local_path) else "")
    subprocess.run(["rsync", "-rt", "--partial-dir=.rsync-partial", "-e", ssh.ssh_command(),
                    source, target], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.PIPE)


class UploadMemo:
    """The URLs of this user's unfinished uploads, by (server, destination,
    MD5, size), in `$XDG_CACHE_HOME/librarian/uploads.json` (default
    ~/.cache): sending the same file again, after an interruption, goes on
    with the server's partial upload instead of starting over, as the web
    form does. Best effort: a memo that cannot be read or written is
    simply not used."""

    def __init__(self):
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        self.path = os.path.join(cache, "librarian", "uploads.json")

    def _load(self):
        try:
            with open(self.path) as f:
                memo = json.load(f)
            return memo if isinstance(memo, dict) else {}
        except (OSError, ValueError):
            return {}

    def get(self, key):
        return self._load().get(json.dumps(key))

    def others(self, key):
        """(key, url) of the uploads remembered for the same server,
        destination and caller as `key` but other bytes or options."""
        found = []
        for text, url in self._load().items():
            try:
                other = json.loads(text)
            except ValueError:
                continue
            if isinstance(other, list) and other[:3] == key[:3] and other != key:
                found.append((other, url))
        return found

    def put(self, key, url):
        """Remember `url` for `key` (None: forget it)."""
        memo = self._load()
        if url is None and json.dumps(key) not in memo:
            return
        if url is None:
            del memo[json.dumps(key)]
        else:
            memo[json.dumps(key)] = url
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = "%s.%d" % (self.path, os.getpid())
            with open(tmp, "w") as f:
                json.dump(memo, f)
            os.replace(tmp, self.path)
        except OSError:
            pass


class ChunkReader:
    """The chunks of a seekable stream of `length` bytes with their CRC-32
    (base64, tus's Upload-Checksum), each read by a thread of its own while
    the previous one is on the wire. Only that thread touches the stream.
    With `hash_md5`, the stream's MD5 is computed on the way, in order (a
    resumption past bytes not read here reads them first), and given with
    the last chunk."""

    def __init__(self, stream, length, size, hash_md5=False):
        self.stream, self.length, self.size = stream, length, size
        self.pool, self.ahead = None, None
        self.digest, self.hashed = (hashlib.md5() if hash_md5 else None), 0
        self.finished = False  # set once the server has answered the upload's outcome

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-reader")
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True, cancel_futures=True)

    def md5(self):
        """The stream's MD5 (hex) once every byte was read, else None."""
        if self.digest is None or self.hashed < self.length:
            return None
        return self.digest.hexdigest()

    def whole_md5(self):
        """The stream's MD5 (hex), reading what no chunk read (an upload
        resumed after its last byte was sent); None without `hash_md5`."""
        if self.digest is None:
            return None
        self.pool.submit(self._hash_up_to, self.length).result()  # the reader's thread
        return self.md5()

    def _hash_up_to(self, offset):
        self.stream.seek(self.hashed)
        while self.hashed < offset:
            block = self.stream.read(min(CHUNK, offset - self.hashed))
            if not block:
                raise OSError("the stream ended at byte %d of %d" % (self.hashed, self.length))
            self.digest.update(block)
            self.hashed += len(block)

    def _read(self, offset):
        if self.digest is not None and self.hashed < offset:
            self._hash_up_to(offset)  # going on from an earlier upload's offset
        self.stream.seek(offset)
        chunk = self.stream.read(min(self.size, self.length - offset))
        if self.digest is not None and offset == self.hashed:
            self.digest.update(chunk)
            self.hashed += len(chunk)
        final = self.md5() if offset + len(chunk) == self.length else None
        crc = base64.b64encode(zlib.crc32(chunk).to_bytes(4, "big")).decode("ascii")
        return offset, chunk, crc, final

    def at(self, offset):
        """(chunk, its CRC-32, the stream's MD5 when the chunk is the last
        and the MD5 is computed here, else None) starting at byte `offset`;
        the next chunk is read meanwhile."""
        if self.ahead is None or self.ahead.result()[0] != offset:
            self.ahead = self.pool.submit(self._read, offset)
        _, chunk, digest, final = self.ahead.result()
        following = offset + len(chunk)
        self.ahead = self.pool.submit(self._read, following) if following < self.length else None
        return chunk, digest, final


def _tus_metadata(fields):
    """tus's Upload-Metadata: `key base64(value)` pairs, comma-separated."""
    return ",".join("%s %s" % (k, base64.b64encode(v.encode("utf-8")).decode("ascii"))
                    for k, v in fields.items())


class TarView(io.RawIOBase):
    """A directory as a seekable, read-only tar stream (PAX; members sorted
    under the top folder `name`, owner and modes normalised), made of the
    members' headers and the files' own bytes: an upload can start again at
    any offset, and nothing is copied to a temporary file. Raises OSError
    when a file changes size while it is read."""

    def __init__(self, path, name):
        self.parts, self.length, self.pos = [], 0, 0  # parts: (start, size, bytes or path)
        for arcname, full, st in _tree_entries(path, name):
            ti = tarfile.TarInfo(arcname)
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname = int(st.st_mtime), 0, 0, "", ""
            if full is None:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
            else:
                ti.type, ti.mode, ti.size = tarfile.REGTYPE, 0o644, st.st_size
            self._add(ti.tobuf(tarfile.PAX_FORMAT))
            if full is not None:
                self._add(full, st.st_size)
                self._add(b"\0" * (-st.st_size % tarfile.BLOCKSIZE))
        self._add(b"\0" * (2 * tarfile.BLOCKSIZE))
        self._add(b"\0" * (-self.length % tarfile.RECORDSIZE))

    def _add(self, item, size=None):
        size = len(item) if size is None else size
        if size:
            self.parts.append((self.length, size, item))
            self.length += size

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=os.SEEK_SET):
        self.pos = {os.SEEK_SET: 0, os.SEEK_CUR: self.pos, os.SEEK_END: self.length}[whence] \
            + offset
        return self.pos

    def tell(self):
        return self.pos

    def read(self, n=-1):
        end = self.length if n is None or n < 0 else min(self.length, self.pos + n)
        out = []
        i = bisect.bisect_right([p[0] for p in self.parts], self.pos) - 1
        while self.pos < end:
            start, size, item = self.parts[i]
            lo, hi = self.pos - start, min(size, end - start)
            if isinstance(item, bytes):
                out.append(item[lo:hi])
            else:
                with open(item, "rb") as f:
                    f.seek(lo)
                    data = f.read(hi - lo)
                if len(data) != hi - lo:
                    raise OSError("%s changed while it was sent" % item)
                out.append(data)
            self.pos += hi - lo
            i += 1
        return b"".join(out)


def _tree_entries(path, name):
    """(arcname, full path or None for a folder, lstat) of a directory and
    everything under it, folders before their contents, sorted by name;
    links and special files are refused (OSError)."""
    stack = [(name, path)]
    while stack:
        arcname, full = stack.pop()
        st = os.lstat(full)
        if stat.S_ISDIR(st.st_mode):
            yield arcname, None, st
            stack.extend((arcname + "/" + e, os.path.join(full, e))
                         for e in sorted(os.listdir(full), reverse=True))
        elif stat.S_ISREG(st.st_mode):
            yield arcname, full, st
        else:
            raise OSError("%s is a link or special file; only regular files and directories "
                          "can be stored" % full)


def _counting(chunks, progress):
    for chunk in chunks:
        if progress:
            progress(len(chunk))
        yield chunk


class _IterReader:
    """A minimal file-like reader over an iterator of byte chunks."""

    def __init__(self, chunks):
        self.chunks = iter(chunks)
        self.buffer = b""

    def read(self, n=-1):
        while n < 0 or len(self.buffer) < n:
            chunk = next(self.chunks, None)
            if chunk is None:
                break
            self.buffer += chunk
        if n < 0:
            out, self.buffer = self.buffer, b""
        else:
            out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out


def _unpack_tar(reader, dest, name):
    """Unpack a downloaded tar whose members all sit under `name`/."""
    with tarfile.open(fileobj=reader, mode="r|") as tar:
        for member in tar:
            top = member.name.split("/", 1)[0]
            if top != name:
                raise RPCError("download", "tar member %r is not under %r" % (member.name, name))
            tar.extract(member, dest, filter="data")


# ---------------------------------------------------------------------------
# The `librarian` command
# ---------------------------------------------------------------------------

def _progress_bar(total, label):
    """A tqdm progress callback on a terminal, None otherwise."""
    if not sys.stderr.isatty():
        return None, None
    from tqdm import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
               file=sys.stderr)
    return bar.update, bar


def cmd_upload(client, args):
    size, _ = (os.path.getsize(args.local_path), None) if os.path.isfile(args.local_path) \
        else (None, None)
    callback, bar = _progress_bar(size, os.path.basename(args.local_path.rstrip("/")))
    try:
        if args.via_ssh or args.rsync:
            ssh = SSHOptions(args.ssh_port, args.ssh_user, args.ssh_key, args.known_hosts)
            reply = client.upload_via_ssh(args.local_path, args.dest_store_path, ssh=ssh,
                                          use_rsync=args.rsync, null_obsid=args.null_obsid,
                                          deletion_policy=args.deletion, progress=callback)
        else:
            reply = client.upload(args.local_path, args.dest_store_path,
                                  null_obsid=args.null_obsid, deletion_policy=args.deletion,
                                  progress=callback)
    finally:
        if bar:
            bar.close()
    obsid = "no obsid" if reply["obsid"] is None else "obsid %d" % reply["obsid"]
    print("%s: %s bytes, md5 %s, %s, on store %s at %s%s"
          % (reply["name"], reply["size"], reply["md5"], obsid, reply["store_name"],
             reply["store_path"], "" if reply.get("created", True) else
             " (the identical file was already in the archive there; nothing changed)"))


def cmd_locate_file(client, args):
    reply = client.locate_file_instance(args.file_name)
    print("%s:%s" % (reply["store_ssh_host"], reply["full_path_on_store"]))


def cmd_download(client, args):
    dest = args.dest or args.file_name
    callback, bar = _progress_bar(None, args.file_name)
    try:
        size, md5 = client.download(args.file_name, dest, progress=callback)
    finally:
        if bar:
            bar.close()
    print("%s: %d bytes, md5 %s" % (dest, size, md5))


def _event_value(text):
    """Values of `key=value` event arguments: JSON when it parses (numbers,
    booleans, null, quoted strings), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def cmd_add_file_event(client, args):
    payload = {}
    for item in args.key_values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError("event arguments are key=value, got %r" % item)
        payload[key] = _event_value(value)
    name = os.path.basename(args.file_path.rstrip("/"))
    client.add_file_event(name, args.event_type, payload)
    print("%s: event %s recorded" % (name, args.event_type))


def _search_text(text):
    """A search given on the command line (`-`: read from stdin), checked
    to be JSON early (as it is, or without `#` comments) so that a typo is
    a usage error, not a round trip."""
    if text == "-":
        text = sys.stdin.read()
    try:
        json.loads(text)
    except ValueError:
        try:
            json.loads("\n".join(line.split("#", 1)[0] for line in text.splitlines()))
        except ValueError as e:
            raise UsageError("the search is not valid JSON: %s" % e) from None
    return text


def _print_table(header, rows, what):
    """`rows` (tuples of text) under `header`, in aligned columns on
    stdout, and how many there are (`what`: the singular noun) on stderr."""
    table = [header] + rows
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    sys.stdout.flush()
    print("%d %s%s" % (len(rows), what, "" if len(rows) == 1 else "s"), file=sys.stderr)
    sys.stderr.flush()


def _or_dash(value, fmt="%s"):
    return "-" if value is None else fmt % value


def _file_row(f):
    return (f["name"], str(f["size"]), _or_dash(f["obsid"]), f["type"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(f["create_time"])))


def _obs_row(o):
    return (str(o["obsid"]), "%.5f" % o["start_time_jd"], _or_dash(o["stop_time_jd"], "%.5f"),
            _or_dash(o["start_lst_hr"], "%.4f"), _or_dash(o["session_id"]))


def _session_row(s):
    return (str(s["id"]), "%.5f" % s["start_time_jd"], "%.5f" % s["stop_time_jd"],
            "%.2f" % ((s["stop_time_jd"] - s["start_time_jd"]) * 24))


# command -> (output format, the field --names/--ids prints, the noun, the
# table's header, a record's row)
SEARCH_COMMANDS = {
    "search-files": ("file-listing-json", "name", "file",
                     ("NAME", "SIZE", "OBSID", "TYPE", "CREATED (UTC)"), _file_row),
    "search-obs": ("obs-listing-json", "obsid", "observation",
                   ("OBSID", "START JD", "STOP JD", "START LST (h)", "SESSION"), _obs_row),
    "search-sessions": ("session-listing-json", "id", "session",
                        ("SESSION", "START JD", "STOP JD", "HOURS"), _session_row),
}


def cmd_search(client, args):
    """search-files, search-obs, search-sessions: a table of what the
    search finds (its count on stderr), or only the names or ids."""
    fmt, key, noun, header, row = SEARCH_COMMANDS[args.command]
    found = client.search(_search_text(args.search), fmt, limit=args.limit, offset=args.offset)
    if args.only:
        for record in found:
            print(record[key])
        return
    _print_table(header, [row(r) for r in found], noun)


def cmd_assign_sessions(client, args):
    reply = client.assign_observing_sessions(args.min_start_jd, args.max_start_jd)
    for s in reply["new_sessions"]:
        print("session %d: JD %.5f to %.5f, %d observation(s)"
              % (s["id"], s["start_time_jd"], s["stop_time_jd"], s["n_obs"]))
    if not reply["new_sessions"]:
        print("no new sessions")
    unclosed = reply.get("unclosed_obsids") or []
    if unclosed:
        print("left without a session (their run ends in an observation with no stop time): "
              "%s" % " ".join(str(o) for o in unclosed))


def cmd_set_deletion_policy(client, args):
    client.set_one_file_deletion_policy(args.file_name, args.policy,
                                        restrict_to_store=args.store)
    print("%s: deletion policy of one instance set to %s" % (args.file_name, args.policy))


def cmd_delete_files(client, args):
    query = _search_text(args.search)
    mode = "noop" if args.noop else "standard"
    if mode == "standard" and not args.yes:
        preview = client.delete_file_instances_matching_query(query, mode="noop",
                                                              restrict_to_store=args.store)
        count = sum(s["n_deleted"] for s in preview["stats"].values())
        print("%d instance%s of %d matching file%s may be deleted%s."
              % (count, "" if count == 1 else "s", len(preview["stats"]),
                 "" if len(preview["stats"]) == 1 else "s",
                 " on store %s" % args.store if args.store else ""))
        if count == 0:
            return
        if not sys.stdin.isatty():
            raise RPCError("delete-files", "not deleting without confirmation: run on a "
                           "terminal, or pass --yes")
        if input("Delete them? Type 'yes' to proceed: ").strip() != "yes":
            print("nothing deleted")
            return
    reply = client.delete_file_instances_matching_query(query, mode=mode,
                                                        restrict_to_store=args.store)
    for name, stats in sorted(reply["stats"].items()) if args.noop else ():
        for inst in stats.get("instances", []):  # servers like this one say why
            print("%s %s on store %s at %s: %s" % ("delete" if inst["action"] == "delete"
                                                   else "keep  ", name, inst["store_name"],
                                                   inst["store_path"], inst["reason"]))
    totals = {k: sum(s[k] for s in reply["stats"].values())
              for k in ("n_deleted", "n_kept", "n_error")}
    print("%s%d deleted, %d kept, %d errors" % ("noop: would have " if args.noop else "",
                                                totals["n_deleted"], totals["n_kept"],
                                                totals["n_error"]))
    if totals["n_error"]:
        raise RPCError("delete-files", "%d instance(s) could not be deleted; see the server log"
                       % totals["n_error"])


def cmd_add_obs(client, args):
    file_info = {}
    for path in args.paths:
        full = os.path.abspath(path)
        if not os.path.exists(full):
            raise UsageError("no such file or directory: %s" % path)
        size, md5 = path_md5(full)
        file_info[full] = {"size": size, "md5": md5, "type": file_type(os.path.basename(full))}
    client.register_instances(args.store_name, file_info, null_obsid=args.null_obsid)
    print("registered %d file%s on store %s" % (len(file_info), "" if len(file_info) == 1
                                                else "s", args.store_name))


def cmd_describe_session(client, args):
    reply = client.describe_session_without_event(args.source, args.event_type)
    if not reply["any_matching"]:
        print("no session has files from %s lacking event %s" % (args.source, args.event_type))
        return
    print("session %d: files from %s without an event %s" % (reply["session_id"], args.source,
                                                           args.event_type))
    print("  %-15s %-4s %-9s %s" % ("START JD", "POL", "LENGTH", "HOST:PATH"))
    for i in reply["info"]:
        print("  %-15.5f %-4s %-9s %s:%s/%s" % (i["date"], i["pol"] or "-",
                                               "%.1f min" % (i["length"] * 1440), i["host"],
                                               i["path_prefix"], i["store_path"]))


def wait_for_staging(destination, timeout=None, poll=2.0):
    """Wait until a staging's marker file appears in `destination` (which
    this host must see); returns the error lines (empty on success)."""
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        if os.path.exists(os.path.join(destination, "STAGING-SUCCEEDED")):
            return []
        errors = os.path.join(destination, "STAGING-ERRORS")
        if os.path.exists(errors):
            with open(errors, encoding="utf-8") as f:
                return f.read().splitlines()
        if deadline and time.monotonic() > deadline:
            raise RPCError("stage-files", "still staging into %s after %d s"
                           % (destination, timeout))
        time.sleep(poll)


def cmd_stage_files(client, args):
    reply = client.stage_files(_search_text(args.search), args.dest, user=args.user)
    print("staging %d file(s), %d bytes, into %s" % (reply["n_instances"], reply["n_bytes"],
                                                    reply["destination"]))
    if args.wait:
        errors = wait_for_staging(reply["destination"], timeout=args.timeout)
        if errors:
            for line in errors:
                print("error: %s" % line, file=sys.stderr)
            raise RPCError("stage-files", "%d file(s) could not be staged" % len(errors))
        print("done")


def check_connections(config_path=None):
    """Ping every connection of the client configuration and list its
    stores; returns the number that failed."""
    path = os.path.expanduser(config_path or os.environ.get("HL_CLIENT_CFG") or CONFIG_PATH)
    try:
        with open(path, encoding="utf-8") as f:
            names = list(json.load(f).get("connections", {}))
    except (OSError, ValueError, AttributeError) as e:
        raise RPCError("check-connections", "cannot read %s: %s" % (path, e)) from None
    failed = 0
    for name in names:
        try:
            client = LibrarianClient(name, config_path=config_path)
            client.ping()
            stores = client.probe_stores()
            print("%s (%s): answers; stores: %s" % (name, client.url, ", ".join(
                "%s on %s" % (s["name"], s["ssh_host"]) for s in stores) or "none available"))
        except RPCError as e:
            failed += 1
            print("%s: FAILED: %s" % (name, e.message))
    return failed


def cmd_verify(client, args):
    """Print one line per copy; exit status 1 when any copy is not good."""
    name = os.path.basename(args.file_name.rstrip("/"))
    copies = client.verify_file(name, here_only=args.here_only or None)["copies"]
    if not copies:
        raise RPCError("verify", "%s has no copies anywhere the Librarian knows of" % name)
    for c in copies:
        print("%-4s %s: %s on store %s at %s%s%s" % (
            "ok" if c["ok"] else "BAD", c["librarian"], c["result"], c["store_name"],
            c.get("store_path"), "" if c["size"] is None else ", %d bytes" % c["size"],
            "" if c["md5"] is None else ", md5 %s" % c["md5"]))
    bad = [c for c in copies if not c["ok"]]
    if bad:
        raise RPCError("verify", "%d of %d copies of %s are not good" % (len(bad), len(copies),
                                                                        name))


def cmd_launch_copy(client, args):
    client.launch_file_copy(os.path.basename(args.file_name.rstrip("/")), args.connection,
                            remote_store_path=args.remote_path)
    print("copy of %s to %s queued" % (args.file_name, args.connection))


def cmd_initiate_offload(client, args):
    reply = client.initiate_offload(args.source_store, args.dest_store)
    if reply["outcome"] == "store-shut-down":
        print("store %s holds no sole copies any more; it is now unavailable"
              % args.source_store)
    else:
        print("offload of %d instance(s) from %s to %s queued"
              % (reply["instance-count"], args.source_store, args.dest_store))


class UsageError(Exception):
    """Bad command-line input (exit status 2)."""


def build_parser():
    parser = argparse.ArgumentParser(prog="librarian",
                                     description="Command-line client of the Librarian.")
    parser.add_argument("--config", help="client config (default ~/.hl_client.cfg)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("upload", help="upload a file or a directory (streamed)")
    p.add_argument("conn_name")
    p.add_argument("local_path")
    p.add_argument("dest_store_path", help="path on the store, ending in the file's name")
    p.add_argument("--null-obsid", action="store_true",
                   help="the file has no observation (needed when none can be read)")
    p.add_argument("--deletion", choices=("disallowed", "allowed"), default="disallowed",
                   help="deletion policy of the new instance (default: disallowed)")
    g = p.add_argument_group("two-step upload over SSH (the server tells which store host)")
    g.add_argument("--via-ssh", action="store_true",
                   help="copy into the store's staging directory by SFTP, then register")
    g.add_argument("--rsync", action="store_true",
                   help="like --via-ssh, copying with rsync over ssh")
    g.add_argument("--ssh-port", type=int, help="SSH port of the store host (default 22)")
    g.add_argument("--ssh-user", help="user on the store host (default: yours)")
    g.add_argument("--ssh-key", help="private key file (default: your usual keys)")
    g.add_argument("--known-hosts", help="known_hosts file (default ~/.ssh/known_hosts)")
    p.set_defaults(func=cmd_upload)

    p = sub.add_parser("locate-file", help="print host:path of an instance of a file")
    p.add_argument("conn_name")
    p.add_argument("file_name")
    p.set_defaults(func=cmd_locate_file)

    p = sub.add_parser("download", help="fetch a file (a directory is unpacked)")
    p.add_argument("conn_name")
    p.add_argument("file_name")
    p.add_argument("dest", nargs="?", help="where to put it (default: ./FILE_NAME)")
    p.set_defaults(func=cmd_download)

    for command, kind, example, only in (
            ("search-files", "files", '{"name-matches": "zen.2458043.%%"}',
             ("--names", "print only names, one per line")),
            ("search-obs", "observations", '{"start-lst-hr-in-range": [18.0, 18.5]}',
             ("--ids", "print only obsids, one per line")),
            ("search-sessions", "observing sessions", '{"start-time-jd-greater-than": '
             '2458000}', ("--ids", "print only session ids, one per line"))):
        p = sub.add_parser(command, help="search %s with the JSON search language" % kind)
        p.add_argument("conn_name")
        p.add_argument("search", help="the search (JSON; - reads it from stdin), e.g. '%s'"
                       % example)
        p.add_argument(only[0], dest="only", action="store_true", help=only[1])
        p.add_argument("--limit", type=int, help="at most this many results")
        p.add_argument("--offset", type=int, help="skip this many results first")
        p.set_defaults(func=cmd_search)

    p = sub.add_parser("assign-sessions", help="group observations into sessions")
    p.add_argument("conn_name")
    p.add_argument("--min-start-jd", type=float, help="only observations starting at or after")
    p.add_argument("--max-start-jd", type=float, help="only observations starting at or before")
    p.set_defaults(func=cmd_assign_sessions)

    p = sub.add_parser("set-file-deletion-policy",
                       help="allow or disallow deleting one instance of a file")
    p.add_argument("conn_name")
    p.add_argument("file_name")
    p.add_argument("policy", choices=("allowed", "disallowed"))
    p.add_argument("--store", help="the instance on this store")
    p.set_defaults(func=cmd_set_deletion_policy)

    p = sub.add_parser("delete-files",
                       help="delete the instances of matching files whose policy allows it")
    p.add_argument("conn_name")
    p.add_argument("search", help="the file search (JSON; - reads it from stdin)")
    p.add_argument("--store", help="only instances on this store")
    p.add_argument("--noop", action="store_true", help="only report what would be deleted")
    p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=cmd_delete_files)

    p = sub.add_parser("add-obs", help="register files already on a store (run on its host)")
    p.add_argument("conn_name")
    p.add_argument("store_name")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--null-obsid", action="store_true", help="the files have no observation")
    p.set_defaults(func=cmd_add_obs)

    p = sub.add_parser("describe-session",
                       help="describe the files of a session lacking an event (pipelines)")
    p.add_argument("conn_name")
    p.add_argument("source", help="source of the files, e.g. the correlator's")
    p.add_argument("event_type")
    p.set_defaults(func=cmd_describe_session)

    p = sub.add_parser("launch-copy", help="copy a file to another Librarian (queued)")
    p.add_argument("conn_name", help="the Librarian that has the file")
    p.add_argument("file_name")
    p.add_argument("connection", help="that Librarian's name for the destination")
    p.add_argument("--remote-path", help="store path at the destination (default: the same)")
    p.set_defaults(func=cmd_launch_copy)

    p = sub.add_parser("stage-files", help="copy matching files to the staging area")
    p.add_argument("conn_name")
    p.add_argument("search", help="the file search (JSON; - reads it from stdin)")
    p.add_argument("dest", help="folder under your part of the staging area")
    p.add_argument("--user", help="staging area of this user (default: your source name)")
    p.add_argument("--wait", action="store_true", help="wait until it is done (this host "
                   "must see the staging area)")
    p.add_argument("--timeout", type=float, help="with --wait: give up after this many s")
    p.set_defaults(func=cmd_stage_files)

    p = sub.add_parser("check-connections",
                       help="ping every connection in the client configuration")
    p.set_defaults(func=None)

    p = sub.add_parser("initiate-offload",
                       help="move the sole copies on one store to another (queued)")
    p.add_argument("conn_name")
    p.add_argument("source_store")
    p.add_argument("dest_store")
    p.set_defaults(func=cmd_initiate_offload)

    p = sub.add_parser("verify", help="recompute the MD5 of every copy of a file, here and at "
                       "the other Librarians holding one")
    p.add_argument("conn_name")
    p.add_argument("file_name", help="the file (its basename is used)")
    p.add_argument("--here-only", action="store_true",
                   help="only the copies on this Librarian's own stores")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("add-file-event", help="record an event about a file")
    p.add_argument("conn_name")
    p.add_argument("file_path", help="the file (its basename is used)")
    p.add_argument("event_type")
    p.add_argument("key_values", nargs="*", metavar="KEY=VALUE")
    p.set_defaults(func=cmd_add_file_event)
    _fill_help(parser)
    return parser


# What the arguments many commands share mean (by their names), for --help.
ARGUMENT_HELP = {
    "conn_name": "a connection of the client configuration (~/.hl_client.cfg)",
    "local_path": "the file or directory to send",
    "file_name": "the file's name in the archive",
    "policy": "disallowed or allowed",
    "store_name": "the store the paths are on (as the server names it)",
    "paths": "paths on that store, absolute, of files already there",
    "event_type": "an event type (e.g. rtp_notified)",
    "source_store": "the store whose sole copies move",
    "dest_store": "the store they move to",
    "key_values": "the event's payload, as KEY=VALUE pairs (VALUE read as JSON if it is)",
}


def _fill_help(parser):
    """Give every argument of `parser` and its commands without help text
    the shared one of ARGUMENT_HELP (KeyError names any still missing)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                _fill_help(command)
        elif action.help is None:
            action.help = ARGUMENT_HELP[action.dest]


def main(argv=None):
    """Run the `librarian` command; returns 0 on success, 1 when the
    Librarian refused or could not be reached, 2 on bad usage."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if args.command == "check-connections":
            return 1 if check_connections(args.config) else 0
        client = LibrarianClient(args.conn_name, config_path=args.config)
        args.func(client, args)
    except UsageError as e:
        print("librarian: %s" % e, file=sys.stderr)
        return 2
    except RPCError as e:
        print("librarian: %s" % e, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("librarian: interrupted" + (
            "; the same command again goes on from where the upload stopped"
            if args.command == "upload" else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
