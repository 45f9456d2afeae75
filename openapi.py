"""The OpenAPI 3 document of the JSON API (API.md section 2), generated
from the operation registry of `librarian.py`."""


JSON_SCHEMA_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean",
                     dict: "object", list: "array"}
ERROR_REPLY = {"description": "refused: success is false and message says why",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def operation_schema(spec):
    """JSON Schema of an operation's request object from its `validate` spec."""
    properties = {"authenticator": {"type": "string",
                                    "description": "or an Authorization: Bearer header"}}
    required = []
    for key, kind in spec.items():
        name = key.rstrip("?")
        properties[name] = {"type": JSON_SCHEMA_TYPES[kind]}
        if not key.endswith("?"):
            required.append(name)
    schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


def document(operations, version):
    """The OpenAPI 3 description of `/api/`, built from the operation
    registry (`{name: (handler, level, spec)}`) so that it cannot drift
    from what the validator enforces."""
    paths = {}
    for name, (func, level, spec) in sorted(operations.items()):
        form = {"type": "object", "required": ["request"],
                "properties": {"request": {"type": "string",
                                           "description": "the request object as JSON text"}}}
        paths["/api/" + name] = {"post": {
            "operationId": name, "summary": (func.__doc__ or name).strip().split("\n")[0],
            "description": "Needs level %s or above." % level,
            "requestBody": {"required": True, "content": {
                "application/json": {"schema": operation_schema(spec)},
                "application/x-www-form-urlencoded": {"schema": form}}},
            "responses": {"200": {"description": "success is true",
                                  "content": {"application/json": {"schema": {
                                      "type": "object", "required": ["success"]}}}},
                          "400": ERROR_REPLY, "403": ERROR_REPLY}}}
    paths["/api/upload/{dest_store_path}"] = {"put": {
        "operationId": "upload", "summary": "Streamed upload of a file or a directory tar.",
        "description": "Needs level read-append. Body: the bytes, or a tar stream with "
                       "X-Librarian-Directory: tar.",
        "parameters": [
            {"name": "dest_store_path", "in": "path", "required": True,
             "schema": {"type": "string"}},
            {"name": "md5", "in": "query", "schema": {"type": "string"}},
            {"name": "deletion_policy", "in": "query",
             "schema": {"type": "string", "enum": ["allowed", "disallowed"]}},
            {"name": "null_obsid", "in": "query", "schema": {"type": "boolean"}}],
        "requestBody": {"required": True, "content": {
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
        "responses": {"201": {"description": "registered"},
                      "200": {"description": "identical file already here (already_present); "
                                             "store_path says where"},
                      "400": ERROR_REPLY, "403": ERROR_REPLY,
                      "409": ERROR_REPLY}}}
    paths["/api/download/{name}"] = {"get": {
        "operationId": "download", "summary": "Streamed download (a directory as a tar).",
        "description": "Needs level read-only. Honours Range on flat files.",
        "parameters": [{"name": "name", "in": "path", "required": True,
                        "schema": {"type": "string"}}],
        "responses": {"200": {"description": "the bytes; X-Librarian-MD5 header"},
                      "206": {"description": "the asked range"},
                      "400": ERROR_REPLY}}}
    return {"openapi": "3.0.3",
            "info": {"title": "Librarian", "version": version},
            "paths": paths,
            "components": {
                "schemas": {"Error": {"type": "object", "required": ["success", "message"],
                                      "properties": {"success": {"type": "boolean"},
                                                     "message": {"type": "string"}}}},
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}}
