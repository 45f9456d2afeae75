"""The existing protocol's operations (API.md section 1) through the WSGI
app: payload forms, strict types, error shape, levels, and the two-step
upload protocol."""

import json
import os
import shutil

import pytest

import models
from conftest import AUTH, MIRIAD, UVH5, api, bearer, need_data, store_contents
from reference import shell_md5, shell_size, uvh5_reference


# ---------------------------------------------------------------------------
# Protocol shape
# ---------------------------------------------------------------------------

def test_ping_in_form_query_and_json_body_forms(web):
    assert api(web, "ping", auth="reader") == {"success": True, "message": "hello"}
    payload = json.dumps({"authenticator": AUTH["reader"]})
    assert web.get("/api/ping", {"request": payload}).json["message"] == "hello"
    resp = web.post("/api/ping", "{}", headers=dict(bearer("reader")),
                    content_type="application/json")
    assert resp.json == {"success": True, "message": "hello"}
    assert resp.content_type == "application/json"


@pytest.mark.parametrize("body,message", [
    ({}, "no request payload"),
    ({"request": "{not json"}, "not valid JSON"),
    ({"request": "[1, 2]"}, "must be a JSON object"),
    ({"request": "{}"}, "no authenticator given"),
    ({"request": '{"authenticator": "wrong"}'}, "unknown authenticator"),
    ({"request": '{"authenticator": 5}'}, "the authenticator must be a string"),
])
def test_malformed_requests_get_400_with_message(web, body, message):
    resp = web.post("/api/ping", body, status=400)
    assert resp.json["success"] is False
    assert message in resp.json["message"]


def test_unknown_operation_and_unknown_route_are_json_errors(web):
    assert "unknown operation 'nope'" in api(web, "nope", status=404)["message"]
    resp = web.get("/api/nothing/here", status=404)
    assert resp.json["success"] is False and "/api/nothing/here" in resp.json["message"]
    resp = web.delete("/api/ping", status=405)
    assert resp.json["success"] is False


def test_arguments_are_strictly_typed(web):
    put_file(web, "typed.dat")
    msg = api(web, "locate_file_instance", status=400, file_name=5)["message"]
    assert msg == "argument 'file_name' must be a string, got 5"
    for bad in ("5", 5.0, True):
        msg = api(web, "initiate_upload", status=400, upload_size=bad)["message"]
        assert "argument 'upload_size' must be an integer" in msg
    msg = api(web, "create_file_event", status=400, file_name="typed.dat", type="t",
              payload=[1])["message"]
    assert "'payload' must be an object" in msg
    msg = api(web, "complete_upload", status=400, store_name="main", staging_dir="/x",
              dest_store_path="x", meta_mode="infer", null_obsid="yes")["message"]
    assert "'null_obsid' must be a boolean" in msg


def test_missing_and_unknown_arguments_are_named(web):
    assert api(web, "locate_file_instance", status=400)["message"] == \
        "missing argument 'file_name'"
    # Our own operations refuse unknown arguments...
    msg = api(web, "list_standing_orders", status=400, colour="blue", size=3)["message"]
    assert msg == "unknown arguments 'colour', 'size'"


def test_the_originals_operations_ignore_unknown_arguments_and_log_them(web, caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="librarian"):
        assert api(web, "ping", colour="blue", size=3)["message"] == "hello"
    assert "ignoring unknown arguments 'colour', 'size'" in caplog.text


def test_internal_errors_carry_no_traceback(web, app, monkeypatch):
    import librarian

    def explode(source, args):
        raise RuntimeError("secret internals")

    monkeypatch.setitem(librarian.OPERATIONS, "ping", (explode, "read-only", {}))
    resp = api(web, "ping", status=500)
    assert resp == {"success": False, "message": "internal error; see the server log"}


def test_levels_are_enforced_with_403(web):
    put_file(web, "levels.dat")
    reply = api(web, "create_file_event", auth="reader", status=403, file_name="levels.dat",
                type="note", payload={})
    assert reply["success"] is False and "needs level read-append" in reply["message"]
    api(web, "create_file_event", auth="appender", file_name="levels.dat", type="note",
        payload={"k": 1})


# ---------------------------------------------------------------------------
# Operations
# ---------------------------------------------------------------------------

def put_file(web, name, body=b"abc", **query):
    query.setdefault("null_obsid", "true")
    url = "/api/upload/%s?%s" % (name, "&".join("%s=%s" % kv for kv in query.items()))
    return web.put(url, body, headers=bearer(), content_type="application/octet-stream",
                   status=201).json


def test_probe_stores_lists_available_stores_only(web, tmp_path):
    models.Store.create(name="off", ssh_host="elsewhere", path_prefix=str(tmp_path / "off"),
                        available=False)
    stores = api(web, "probe_stores", auth="reader")["stores"]
    assert [s["name"] for s in stores] == ["main"]
    assert set(stores[0]) == {"name", "path_prefix", "ssh_host"}


def test_locate_file_instance(web, store_dir):
    put_file(web, "sub/dir/located.dat")
    reply = api(web, "locate_file_instance", auth="reader", file_name="located.dat")
    assert reply["store_name"] == "main"
    assert reply["store_path"] == "sub/dir/located.dat"
    assert reply["full_path_on_store"] == os.path.join(store_dir, "sub/dir/located.dat")
    assert api(web, "locate_file_instance", status=400,
               file_name="missing.dat")["message"] == "no file named 'missing.dat'"


def test_create_file_event_appends_to_the_log(web):
    put_file(web, "ev.dat")
    api(web, "create_file_event", file_name="ev.dat", type="qa_done", payload={"score": 0.5})
    events = list(models.FileEvent.select().where(models.FileEvent.type == "qa_done"))
    assert len(events) == 1 and json.loads(events[0].payload) == {"score": 0.5}
    assert "no file named" in api(web, "create_file_event", status=400, file_name="nope",
                                  type="x", payload={})["message"]


# ---------------------------------------------------------------------------
# The two-step protocol and record sets
# ---------------------------------------------------------------------------

def test_two_step_upload_of_the_miriad_data_set(web, store_dir):
    need_data()
    reply = api(web, "initiate_upload", auth="appender", upload_size=shell_size(MIRIAD))
    assert reply["name"] == "main" and reply["path_prefix"] == store_dir
    staging = reply["staging_dir"]
    assert staging.startswith(".staging/")  # relative to path_prefix, as the client expects
    shutil.copytree(MIRIAD, os.path.join(store_dir, staging, "zen.2458043.12552.xx.HH.uvA"))
    api(web, "complete_upload", auth="appender", store_name="main", staging_dir=staging,
        dest_store_path="2458043/zen.2458043.12552.xx.HH.uvA", meta_mode="infer")
    record = models.File.get_by_id("zen.2458043.12552.xx.HH.uvA")
    assert (record.md5, record.size, record.obsid) == (shell_md5(MIRIAD), shell_size(MIRIAD),
                                                        1192201262)
    assert not os.path.exists(os.path.join(store_dir, staging))
    # A staging directory is accepted once.
    msg = api(web, "complete_upload", status=400, store_name="main", staging_dir=staging,
              dest_store_path="2458043/zen.2458043.12552.xx.HH.uvA", meta_mode="infer")
    assert "was not issued by this server" in msg["message"]


def test_complete_upload_refuses_a_directory_it_did_not_issue(web, store_dir, tmp_path):
    rogue = tmp_path / "rogue"
    rogue.mkdir()
    (rogue / "x.dat").write_bytes(b"abc")
    msg = api(web, "complete_upload", status=400, store_name="main", staging_dir=str(rogue),
              dest_store_path="x.dat", meta_mode="infer", null_obsid=True)["message"]
    assert "must be relative to the store's path_prefix" in msg
    os.makedirs(os.path.join(store_dir, ".staging", "rogue"))
    shutil.copy(rogue / "x.dat", os.path.join(store_dir, ".staging", "rogue"))
    msg = api(web, "complete_upload", status=400, store_name="main", staging_dir=".staging/rogue",
              dest_store_path="x.dat", meta_mode="infer", null_obsid=True)["message"]
    assert "was not issued" in msg
    assert models.File.select().count() == 0


def test_complete_upload_failure_keeps_the_staging_dir_for_a_retry(web, store_dir):
    staging = api(web, "initiate_upload", upload_size=3)["staging_dir"]
    with open(os.path.join(store_dir, staging, "retry.dat"), "wb") as f:
        f.write(b"abc")
    msg = api(web, "complete_upload", status=400, store_name="main", staging_dir=staging,
              dest_store_path="retry.dat", meta_mode="infer")["message"]
    assert "null_obsid" in msg
    api(web, "complete_upload", store_name="main", staging_dir=staging,
        dest_store_path="retry.dat", meta_mode="infer", null_obsid=True)
    files, left = store_contents(store_dir)
    assert files == {"retry.dat"} and left == []


def record_set(name="zen.2458432.34569.uvh5", md5=None, size=None, create_time=1541794668):
    want = uvh5_reference(UVH5)
    return {
        "sessions": {"1225829886": {"id": 1225829886, "start_time_jd": want["start_time_jd"],
                                    "stop_time_jd": want["stop_time_jd"]}},
        "observations": {str(want["obsid"]): {
            "obsid": want["obsid"], "start_time_jd": want["start_time_jd"],
            "stop_time_jd": want["stop_time_jd"], "start_lst_hr": want["start_lst_hr"],
            "session_id": 1225829886}},
        "files": {name: {"name": name, "type": "uvh5", "create_time": create_time,
                         "obsid": want["obsid"], "size": size or shell_size(UVH5),
                         "md5": md5 or shell_md5(UVH5)}},
    }


def test_record_sets_with_direct_meta_mode_round_trip_create_time(web, store_dir, monkeypatch):
    need_data()
    import time

    monkeypatch.setenv("TZ", "America/Los_Angeles")
    time.tzset()
    try:
        reply = api(web, "initiate_upload", upload_size=shell_size(UVH5), **record_set())
        again = api(web, "initiate_upload", upload_size=shell_size(UVH5), **record_set())
        shutil.rmtree(os.path.join(store_dir, again["staging_dir"]))
        shutil.copy(UVH5, os.path.join(store_dir, reply["staging_dir"], "zen.2458432.34569.uvh5"))
        api(web, "complete_upload", store_name="main", staging_dir=reply["staging_dir"],
            dest_store_path="zen.2458432.34569.uvh5", meta_mode="direct")
        record = models.File.get_by_id("zen.2458432.34569.uvh5")
        assert record.to_dict()["create_time"] == 1541794668
        assert models.Observation.get_by_id(1225829886).session_id == 1225829886
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_conflicting_file_record_is_refused(web):
    need_data()
    api(web, "initiate_upload", upload_size=1, **record_set())
    reply = api(web, "initiate_upload", upload_size=1, status=409,
                **record_set(md5="0" * 32))
    assert "different file named 'zen.2458432.34569.uvh5'" in reply["message"]


def test_direct_mode_refuses_bytes_that_do_not_match_the_record(web, store_dir):
    need_data()
    reply = api(web, "initiate_upload", upload_size=1, **record_set(name="zen.x.y.uvh5"))
    with open(os.path.join(store_dir, reply["staging_dir"], "zen.x.y.uvh5"), "wb") as f:
        f.write(b"not the bytes")
    msg = api(web, "complete_upload", status=400, store_name="main",
              staging_dir=reply["staging_dir"], dest_store_path="zen.x.y.uvh5",
              meta_mode="direct")["message"]
    assert "do not match its record" in msg
    assert models.FileInstance.select().count() == 0


def test_record_with_bad_types_or_names_is_refused(web):
    need_data()
    sets = record_set()
    sets["files"]["zen.2458432.34569.uvh5"]["create_time"] = "yesterday"
    assert "'create_time' of the wrong type" in api(web, "initiate_upload", upload_size=1,
                                                    status=400, **sets)["message"]
    sets = record_set(name="a/b")
    assert "may not contain '/'" in api(web, "initiate_upload", upload_size=1, status=400,
                                        **sets)["message"]
    assert models.File.select().count() == 0


def test_register_instances_of_files_already_on_the_store(web, store_dir):
    need_data()
    dest = os.path.join(store_dir, "pre", "zen.2458432.34569.uvh5")
    os.makedirs(os.path.dirname(dest))
    shutil.copy(UVH5, dest)
    info = {dest: {"size": shell_size(UVH5), "md5": shell_md5(UVH5), "type": "uvh5"}}
    api(web, "register_instances", auth="appender", store_name="main", file_info=info)
    inst = models.FileInstance.get()
    assert (inst.name, inst.parent_dirs) == ("zen.2458432.34569.uvh5", "pre")
    assert models.File.get().obsid == 1225829886


def test_register_instances_checks_the_stated_checksum(web, store_dir):
    dest = os.path.join(store_dir, "claimed.dat")
    with open(dest, "wb") as f:
        f.write(b"abc")
    info = {dest: {"size": 3, "md5": "0" * 32, "type": "dat"}}
    msg = api(web, "register_instances", status=400, store_name="main", file_info=info,
              null_obsid=True)["message"]
    assert "not 3 and 00000000000000000000000000000000 as stated" in msg
    msg = api(web, "register_instances", status=400, store_name="main", null_obsid=True,
              file_info={"/etc/hostname": {"size": 3, "md5": "0" * 32, "type": "x"}})["message"]
    assert "is not inside store 'main'" in msg
    assert models.File.select().count() == 0


def test_hera_inference_copies_obsid_of_a_sibling_file(app, web):
    need_data()
    with open(UVH5, "rb") as f:
        put_file(web, "zen.2458432.34569.uvh5", f.read(), null_obsid="false")
    app.config["librarian.settings"].librarian["obsid_inference_mode"] = "hera"
    reply = put_file(web, "zen.2458432.34569.xx.HH.calfits", b"cal", null_obsid="false")
    assert reply["obsid"] == 1225829886
    msg = web.put("/api/upload/zen.2458999.1.calfits", b"cal", headers=bearer(),
                  status=400).json["message"]
    assert "no files named zen.2458999.1.*" in msg


def test_openapi_document_matches_what_the_server_enforces(web):
    import librarian

    doc = web.get("/api/openapi.json").json
    assert doc["openapi"].startswith("3.")
    ops = {p[len("/api/"):]: v["post"] for p, v in doc["paths"].items()
           if "post" in v and p != "/api/uploads"}
    assert set(ops) == set(librarian.OPERATIONS)
    # every operation is also served for GET, as documented
    assert all("get" in doc["paths"]["/api/" + name] for name in ops)
    reply = web.get("/api/ping", {"request": json.dumps({"authenticator": AUTH["reader"]})}).json
    assert reply["success"]
    # enums and lengths are documented and enforced alike
    mode = ops["delete_file_instances"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["mode"]
    assert mode["enum"] == ["standard", "noop"]
    assert "one of standard, noop" in api(web, "delete_file_instances", status=400,
                                          file_name="x", mode="later")["message"]
    name = ops["locate_file_instance"]["requestBody"]["content"]["application/json"][
        "schema"]["properties"]["file_name"]
    assert name["maxLength"] == 256
    assert "1 to 256 characters" in api(web, "locate_file_instance", status=400,
                                        file_name="n" * 257)["message"]
    for name, op in ops.items():
        schema = op["requestBody"]["content"]["application/json"]["schema"]
        for arg in schema.get("required", []):
            payload = {a: None for a in schema.get("required", []) if a != arg}
            reply = api(web, name, status=400, **{k: v for k, v in payload.items()})
            assert "missing argument" in reply["message"]
        # Every documented argument is accepted by name (no "unknown argument").
        probe = {a: {"integer": -1, "number": 0.5, "string": "", "boolean": False,
                     "object": {}, "array": []}[s["type"]]
                 for a, s in schema["properties"].items() if a != "authenticator"}
        resp = web.post("/api/" + name, {"request": json.dumps(
            dict(probe, authenticator=AUTH["admin"]))}, expect_errors=True)
        assert "unknown argument" not in resp.json.get("message", "")


def test_register_instances_adds_a_second_copy_of_a_known_file(web, store_dir):
    put_file(web, "a/copy.dat", b"same bytes")
    other = os.path.join(store_dir, "b", "copy.dat")
    os.makedirs(os.path.dirname(other))
    with open(other, "wb") as f:
        f.write(b"same bytes")
    from librarian_client import path_md5

    size, md5 = path_md5(other)
    info = {other: {"size": size, "md5": md5}}
    api(web, "register_instances", store_name="main", file_info=info, null_obsid=True)
    api(web, "register_instances", store_name="main", file_info=info, null_obsid=True)
    assert sorted(i.parent_dirs for i in models.FileInstance.select()) == ["a", "b"]
    assert models.File.get().num_instances == 2
