"""The OpenAPI 3 document of the API (API.md), generated from the operation
registry of `librarian.py` and from `RULES`, the constraints on arguments
by name, which `librarian.validate` enforces: the document and the server
cannot disagree.

Every operation is served for POST (a JSON body, or a form field `request`
holding JSON) and for GET (a query argument `request` holding JSON), as the
original Librarian serves them.
"""

from deletion import MODES
from models import DELETION_POLICIES, MAX_NAME_BYTES


JSON_SCHEMA_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean",
                     dict: "object", list: "array"}
ERROR_REPLY = {"description": "refused: success is false and message says why",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
# What any operation may answer besides success (API.md's error statuses).
ERROR_STATUSES = ("400", "401", "403", "404", "409", "413", "429", "503", "507")
SHORT_NAME = {"minLength": 1, "maxLength": 64}
STORE_PATH = {"minLength": 1, "maxLength": 1024}

# Constraints on arguments by name (JSON Schema keywords), for every
# operation that takes them; `librarian.validate` enforces them.
RULES = {
    "file_name": {"minLength": 1, "maxLength": MAX_NAME_BYTES},
    "dest_store_path": STORE_PATH, "remote_store_path": STORE_PATH,
    "store_name": SHORT_NAME, "restrict_to_store": SHORT_NAME,
    "source_store_name": SHORT_NAME, "dest_store_name": SHORT_NAME,
    "known_staging_store": SHORT_NAME, "connection_name": SHORT_NAME,
    "conn_name": SHORT_NAME, "name": SHORT_NAME, "type": SHORT_NAME, "event_type": SHORT_NAME,
    "source": SHORT_NAME,
    "deletion_policy": {"enum": sorted(DELETION_POLICIES)},
    "meta_mode": {"enum": ["direct", "infer"]},
    "mode": {"enum": list(MODES)},
    "upload_size": {"minimum": 0}, "limit": {"minimum": 0}, "offset": {"minimum": 0},
}
# (output_format's enum is added by `librarian`, from its search outputs.)


def check_rules(name, value, fail):
    """Call `fail(400, message)` when `value` breaks the rules of argument
    `name` (see RULES)."""
    rules = RULES.get(name, {})
    if "enum" in rules and value not in rules["enum"]:
        fail(400, "argument %r must be one of %s, got %s"
             % (name, ", ".join(rules["enum"]), repr(value)[:80]))
    if isinstance(value, str) and not rules.get("minLength", 0) <= len(value) \
            <= rules.get("maxLength", len(value)):
        fail(400, "argument %r must be %d to %d characters long, not %d"
             % (name, rules["minLength"], rules["maxLength"], len(value)))
    if "minimum" in rules and value < rules["minimum"]:
        fail(400, "argument %r may not be below %s" % (name, rules["minimum"]))


def operation_schema(spec):
    """JSON Schema of an operation's request object from its `validate` spec."""
    properties = {"authenticator": {"type": "string",
                                    "description": "or an Authorization: Bearer header"}}
    required = []
    for key, kind in spec.items():
        name = key.rstrip("?")
        properties[name] = dict({"type": JSON_SCHEMA_TYPES[kind]}, **RULES.get(name, {}))
        if kind is int:
            properties[name]["format"] = "int64"
        if not key.endswith("?"):
            required.append(name)
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


# A body over the bound is refused by waitress from the headers, in plain text.
TOO_LARGE = {"description": "the request body is over [server] max_body_bytes",
             "content": {"text/plain": {"schema": {"type": "string"}}}}


def error_replies():
    """Every error status an operation may answer with, and its body."""
    return {status: TOO_LARGE if status == "413" else ERROR_REPLY for status in ERROR_STATUSES}


def responses(success):
    """The responses of an operation: `success` for 200, errors otherwise."""
    return dict(error_replies(), **{"200": success})


SUCCESS = {"description": "success is true",
           "content": {"application/json": {"schema": {
               "type": "object", "required": ["success"],
               "properties": {"success": {"type": "boolean", "enum": [True]}}}}}}
TUS_HEADER = {"name": "Tus-Resumable", "in": "header", "required": True,
              "schema": {"type": "string", "enum": ["1.0.0"]}}
UPLOAD_ID = {"name": "upload_id", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"}}


def api_operations(operations):
    """The paths of `/api/NAME`, for POST and GET."""
    paths = {}
    for name, (func, level, spec) in sorted(operations.items()):
        summary = (func.__doc__ or name).strip().split("\n")[0]
        described = "Needs level %s or above." % level
        form = {"type": "object", "required": ["request"],
                "properties": {"request": {"type": "string",
                                           "description": "the request object as JSON text"}}}
        paths["/api/" + name] = {
            "post": {"operationId": name, "summary": summary, "description": described,
                     "requestBody": {"required": True, "content": {
                         "application/json": {"schema": operation_schema(spec)},
                         "application/x-www-form-urlencoded": {"schema": form}}},
                     "responses": responses(SUCCESS)},
            "get": {"operationId": name + "_get", "summary": summary,
                    "description": described + " The request object as JSON text in the "
                                   "query argument `request`.",
                    "parameters": [{"name": "request", "in": "query", "required": True,
                                    "content": {"application/json": {
                                        "schema": operation_schema(spec)}}}],
                    "responses": responses(SUCCESS)}}
    return paths


def transfer_paths():
    """The paths of streamed and resumable transfers (API.md section 2)."""
    errors = error_replies()
    return {
        "/api/upload/{dest_store_path}": {"put": {
            "operationId": "upload", "summary": "Single-request upload of a file or a "
                                                "directory tar, up to the body bound.",
            "description": "Needs level read-append. Body: the bytes, or a tar stream with "
                           "X-Librarian-Directory: tar. Larger bodies: /api/uploads.",
            "parameters": [
                {"name": "dest_store_path", "in": "path", "required": True,
                 "schema": dict({"type": "string"}, **STORE_PATH)},
                {"name": "md5", "in": "query", "schema": {"type": "string",
                                                           "pattern": "^[0-9a-f]{32}$"}},
                {"name": "deletion_policy", "in": "query", "schema": dict(
                    {"type": "string"}, **RULES["deletion_policy"])},
                {"name": "null_obsid", "in": "query", "schema": {"type": "boolean"}},
                {"name": "X-Librarian-Directory", "in": "header",
                 "schema": {"type": "string", "enum": ["tar"]}}],
            "requestBody": {"required": True, "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
            "responses": dict(errors, **{
                "201": {"description": "registered"},
                "200": {"description": "identical file already here (already_present); "
                                       "store_path says where"}})}},
        "/api/download/{name}": {"get": {
            "operationId": "download", "summary": "Streamed download (a directory as a tar).",
            "description": "Needs level read-only. Honours a single bytes Range on flat files.",
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": dict({"type": "string"}, **RULES["file_name"])}],
            "responses": dict(errors, **{
                "200": {"description": "the bytes; X-Librarian-MD5 header"},
                "206": {"description": "the asked range"},
                "416": {"description": "the range is beyond the file"}})}},
        "/api/uploads": {
            "options": {"operationId": "tus_options", "summary": "What the tus server offers.",
                        "responses": {"204": {"description": "Tus-Version, Tus-Extension, "
                                                             "Tus-Checksum-Algorithm"}}},
            "post": {"operationId": "tus_create", "summary": "Create a resumable upload (tus).",
                     "description": "Needs level read-append. Upload-Metadata keys: dest "
                                    "(required), md5, null_obsid, deletion_policy, directory.",
                     "parameters": [TUS_HEADER,
                                    {"name": "Upload-Length", "in": "header", "required": True,
                                     "schema": {"type": "integer", "minimum": 0}},
                                    {"name": "Upload-Metadata", "in": "header", "required": True,
                                     "schema": {"type": "string"}}],
                     "responses": dict(errors, **{"201": {"description": "Location: the "
                                                                         "upload's URL"},
                                                  "412": ERROR_REPLY})}},
        "/api/uploads/{upload_id}": {
            "head": {"operationId": "tus_offset", "summary": "The upload's offset.",
                     "parameters": [TUS_HEADER, UPLOAD_ID],
                     "responses": dict(errors, **{"200": {"description": "Upload-Offset"},
                                                  "412": ERROR_REPLY})},
            "patch": {"operationId": "tus_append", "summary": "Append a chunk at its offset.",
                      "parameters": [TUS_HEADER, UPLOAD_ID,
                                     {"name": "Upload-Offset", "in": "header", "required": True,
                                      "schema": {"type": "integer", "minimum": 0}},
                                     {"name": "Upload-Checksum", "in": "header",
                                      "schema": {"type": "string", "maxLength": 200}},
                                     {"name": "X-Librarian-MD5", "in": "header",
                                      "description": "the whole file's MD5, on the chunk "
                                                     "that completes the upload",
                                      "schema": {"type": "string",
                                                 "pattern": "^[0-9a-fA-F]{32}$"}}],
                      "requestBody": {"required": True, "content": {
                          "application/offset+octet-stream": {"schema": {
                              "type": "string", "format": "binary"}}}},
                      "responses": dict(errors, **{"204": {"description": "Upload-Offset"},
                                                   "412": ERROR_REPLY, "415": ERROR_REPLY,
                                                   "460": ERROR_REPLY})},
            "delete": {"operationId": "tus_terminate", "summary": "Abandon an upload.",
                       "parameters": [TUS_HEADER, UPLOAD_ID],
                       "responses": dict(errors, **{"204": {"description": "removed"},
                                                    "412": ERROR_REPLY})},
            "get": {"operationId": "upload_state", "summary": "The upload's state and, once "
                                                             "finished, its outcome.",
                    "parameters": [UPLOAD_ID],
                    "responses": responses(SUCCESS)}},
    }


def document(operations, version):
    """The OpenAPI 3 description of the API, built from the operation
    registry (`{name: (handler, level, spec)}`) and RULES."""
    paths = api_operations(operations)
    paths.update(transfer_paths())
    return {"openapi": "3.0.3",
            "info": {"title": "Librarian", "version": version},
            "paths": paths,
            "security": [{"bearer": []}],
            "components": {
                "schemas": {"Error": {"type": "object", "required": ["success", "message"],
                                      "properties": {"success": {"type": "boolean"},
                                                     "message": {"type": "string"}}}},
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
