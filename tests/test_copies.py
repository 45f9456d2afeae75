"""Copies between two real Librarians on loopback ports (each with its own
SQLite database and store): records, bytes and events on both sides, and a
receiver that is down when the copy starts."""

import json
import os
import re
import sqlite3
import subprocess
import sys
import time

import pytest
import requests

from conftest import (AUTH, MIRIAD, ROOT, UVH5, Server, config_text, free_port, need_data,
                      store_contents)
from reference import shell_md5

import librarian_client


def make_librarian(tmp_path, name, extra=""):
    base = tmp_path / name
    base.mkdir()
    (base / "store").mkdir()
    path = base / "librarian.ini"
    text = config_text("sqlite:///%s" % (base / "db.sqlite"), str(base / "store"),
                       port=free_port(), extra=extra)
    path.write_text(text.replace("[server]\n", "[server]\ntask_retry_seconds = 1\n", 1))
    subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate", "--config",
                    str(path)], check=True, capture_output=True)
    return Server(str(path)), base


def call(server, operation, who="admin", **args):
    resp = requests.post(server.url + "api/" + operation, json=args, timeout=60,
                         headers={"Authorization": "Bearer " + AUTH[who]})
    return resp.json()


def wait_for(predicate, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out waiting")


def events(base, name):
    with sqlite3.connect(base / "db.sqlite") as conn:
        return [(t, json.loads(p)) for t, p in conn.execute(
            "SELECT type, payload FROM file_event WHERE name = ? ORDER BY id", (name,))]


def files_on(server, query):
    return call(server, "search", search=json.dumps(query),
                output_format="file-listing-json")["results"]


@pytest.fixture
def pair(tmp_path):
    receiver, receiver_dir = make_librarian(tmp_path, "receiver")
    sender, sender_dir = make_librarian(
        tmp_path, "sender", extra="[connection:receiver]\nurl = %s\nauthenticator = %s\n"
        % (receiver.url, AUTH["writer"]))
    receiver.start()
    sender.start()
    yield sender, sender_dir, receiver, receiver_dir
    sender.stop()
    receiver.stop()


def upload(server, path, dest, null_obsid=None):
    client = librarian_client.LibrarianClient(conn_config={"url": server.url,
                                                           "authenticator": AUTH["admin"]})
    assert client.upload(path, dest, null_obsid=bool(null_obsid))["created"]


def test_a_copy_arrives_with_its_records_and_both_sides_log_it(pair):
    need_data()
    sender, sender_dir, receiver, receiver_dir = pair
    upload(sender, UVH5, "2458432/zen.2458432.34569.uvh5")
    call(sender, "assign_observing_sessions")
    reply = call(sender, "launch_file_copy", who="writer", file_name="zen.2458432.34569.uvh5",
                 connection_name="receiver")
    assert reply == {"success": True}
    there = wait_for(lambda: files_on(receiver, {"name-matches": "zen.%",
                                                 "num-instances-greater-than": 0}))
    here = files_on(sender, {"name-matches": "zen.%"})
    assert there == here, "same record: name, type, create_time, obsid, size, md5"
    assert shell_md5(str(receiver_dir / "store" / "2458432" / "zen.2458432.34569.uvh5")) \
        == shell_md5(UVH5)
    obs = call(receiver, "search", search='{"obsid-is-exactly": 1225829886}',
               output_format="obs-listing-json")["results"]
    assert obs[0]["session_id"] == 1225829886
    done = wait_for(lambda: [e for e in events(sender_dir, "zen.2458432.34569.uvh5")
                             if e[0] == "copy_finished"])
    payload = done[0][1]
    assert payload["error_code"] == 0 and payload["connection_name"] == "receiver"
    assert payload["remote_store_path"] == "2458432/zen.2458432.34569.uvh5"
    assert payload["duration"] >= 0 and payload["average_rate"] is not None
    assert [t for t, _ in events(sender_dir, "zen.2458432.34569.uvh5")] == [
        "create_instance", "launch_copy", "copy_finished"]
    assert [t for t, _ in events(receiver_dir, "zen.2458432.34569.uvh5")] == ["create_instance"]
    # Again: the receiver has the identical file, so the copy succeeds at once.
    call(sender, "launch_file_copy", who="writer", file_name="zen.2458432.34569.uvh5",
         connection_name="receiver", remote_store_path="elsewhere/zen.2458432.34569.uvh5")
    wait_for(lambda: len([e for e in events(sender_dir, "zen.2458432.34569.uvh5")
                          if e[0] == "copy_finished"]) == 2)
    assert not (receiver_dir / "store" / "elsewhere").exists()


def test_a_copy_of_bytes_that_differ_from_the_record_is_refused_and_marks_them_corrupt(pair):
    """The sender does not hash what it sends: the receiver does, refuses,
    and the sender then verifies its instance and takes it out of service."""
    sender, sender_dir, receiver, receiver_dir = pair
    put_bytes(sender, "flip/flip.dat", b"good bytes " * 1000)
    stored = sender_dir / "store" / "flip" / "flip.dat"
    os.chmod(stored, 0o644)
    stored.write_bytes(b"evil bytes " * 1000)  # same size, other bytes
    call(sender, "launch_file_copy", who="writer", file_name="flip.dat",
         connection_name="receiver")
    done = wait_for(lambda: [p for t, p in events(sender_dir, "flip.dat")
                             if t == "copy_finished"])
    assert done[0]["error_code"] != 0 and "do not match the file's record" in \
        done[0]["error_message"]
    assert "instance_corrupt" in [t for t, _ in events(sender_dir, "flip.dat")]
    assert not files_on(receiver, {"name-matches": "flip.dat", "num-instances-greater-than": 0})
    assert not (receiver_dir / "store" / "flip").exists()


def test_a_copy_to_a_receiver_that_is_down_is_retried_until_it_is_up(pair):
    need_data()
    sender, sender_dir, receiver, receiver_dir = pair
    receiver.stop()
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(MIRIAD, arcname="zen.2458043.12552.xx.HH.uvA")
    resp = requests.put(sender.url + "api/upload/m/zen.2458043.12552.xx.HH.uvA",
                        data=buf.getvalue(), headers={"Authorization": "Bearer " + AUTH["admin"],
                                                      "X-Librarian-Directory": "tar"},
                        timeout=60)
    assert resp.status_code == 201
    call(sender, "launch_file_copy", file_name="zen.2458043.12552.xx.HH.uvA",
         connection_name="receiver")

    def failed_once():
        with sqlite3.connect(sender_dir / "db.sqlite") as conn:
            return conn.execute("SELECT attempts, state, last_error FROM task WHERE kind = 'copy_to_librarian'").fetchone()

    row = wait_for(lambda: (failed_once() or (0,))[0] >= 1 and failed_once()[2] is not None
                   and failed_once())
    assert row[1] in ("pending", "running") and "cannot reach" in row[2]
    receiver.start()
    wait_for(lambda: files_on(receiver, {"name-matches": "zen.%",
                                         "num-instances-greater-than": 0}), seconds=90)
    assert shell_md5(str(receiver_dir / "store" / "m" / "zen.2458043.12552.xx.HH.uvA")) == \
        shell_md5(MIRIAD)
    with sqlite3.connect(sender_dir / "db.sqlite") as conn:
        state, attempts = conn.execute("SELECT state, attempts FROM task WHERE kind = 'copy_to_librarian'").fetchone()
    assert state == "done" and attempts >= 2


def test_launch_refuses_unknown_files_and_connections(pair):
    sender = pair[0]
    assert "no file named" in call(sender, "launch_file_copy", file_name="nope",
                                   connection_name="receiver")["message"]
    requests.put(sender.url + "api/upload/n.txt", data=b"x", params={"null_obsid": "true"},
                 headers={"Authorization": "Bearer " + AUTH["admin"]}, timeout=30)
    msg = call(sender, "launch_file_copy", file_name="n.txt", connection_name="mars")["message"]
    assert "no connection named 'mars'" in msg
    assert "needs level read-write" in call(sender, "launch_file_copy", who="appender",
                                            file_name="n.txt",
                                            connection_name="receiver")["message"]


@pytest.fixture
def trio(tmp_path, request):
    """A sender with standing orders to two receivers."""
    mode = getattr(request, "param", "normal")
    r1, r1_dir = make_librarian(tmp_path, "r1")
    r2, r2_dir = make_librarian(tmp_path, "r2")
    sender, sender_dir = make_librarian(
        tmp_path, "sender",
        extra="[librarian]\nstanding_order_mode = %s\nstanding_order_delay = 0.5\n"
              "[connection:r1]\nurl = %s\nauthenticator = %s\n"
              "[connection:r2]\nurl = %s\nauthenticator = %s\n"
              % (mode, r1.url, AUTH["writer"], r2.url, AUTH["writer"]))
    for s in (r1, r2, sender):
        s.start()
    yield sender, sender_dir, (r1, r1_dir), (r2, r2_dir)
    for s in (sender, r1, r2):
        s.stop()


def names_on(server):
    return sorted(f["name"] for f in files_on(server, {"num-instances-greater-than": 0}))


def put_bytes(server, dest, body):
    resp = requests.put(server.url + "api/upload/" + dest, data=body,
                        params={"null_obsid": "true"},
                        headers={"Authorization": "Bearer " + AUTH["admin"]}, timeout=60)
    assert resp.status_code == 201, resp.text


def test_standing_orders_copy_matching_new_files_exactly_once(trio):
    need_data()
    sender, sender_dir, (r1, r1_dir), (r2, r2_dir) = trio
    assert call(sender, "create_standing_order", name="uvh5-to-r1",
                search='{"type-is-exactly": "uvh5"}', conn_name="r1")["success"]
    assert call(sender, "create_standing_order", name="notes-to-r2",
                search='{"type-is-exactly": "txt"}', conn_name="r2")["success"]
    assert "needs level admin" in call(sender, "create_standing_order", who="writer", name="x",
                                       search="{}", conn_name="r1")["message"]
    upload(sender, UVH5, "zen.2458432.34569.uvh5")
    put_bytes(sender, "notes/a.txt", b"first note")
    put_bytes(sender, "other/b.dat", b"matches no order")
    wait_for(lambda: names_on(r1) == ["zen.2458432.34569.uvh5"] and names_on(r2) == ["a.txt"])
    put_bytes(sender, "notes/c.txt", b"a later note")
    wait_for(lambda: names_on(r2) == ["a.txt", "c.txt"])
    time.sleep(2)  # let any further sweeps run: nothing is sent twice
    assert names_on(r1) == ["zen.2458432.34569.uvh5"]
    for name, order in (("zen.2458432.34569.uvh5", "uvh5-to-r1"), ("a.txt", "notes-to-r2"),
                        ("c.txt", "notes-to-r2")):
        kinds = [t for t, _ in events(sender_dir, name)]
        assert kinds.count("launch_copy") == 1, kinds
        assert kinds.count("standing_order_succeeded:" + order) == 1, kinds
    assert [t for t, _ in events(sender_dir, "b.dat")] == ["create_instance"]
    listed = call(sender, "list_standing_orders", who="reader")["standing_orders"]
    assert [o["name"] for o in listed] == ["notes-to-r2", "uvh5-to-r1"]
    # An order made after its files arrived copies them within the batching
    # delay, not at the next periodic sweep (ten minutes away).
    call(sender, "create_standing_order", name="dat-to-r1", search='{"name-is-exactly": "b.dat"}',
         conn_name="r1")
    wait_for(lambda: "b.dat" in names_on(r1), seconds=30)


@pytest.mark.parametrize("trio", ["disabled"], indirect=True)
def test_nothing_is_launched_in_disabled_mode(trio):
    sender, sender_dir, (r1, r1_dir), _ = trio
    call(sender, "create_standing_order", name="all-to-r1", search='{"always-true": 0}',
         conn_name="r1")
    put_bytes(sender, "d/x.txt", b"x")
    time.sleep(3)
    assert names_on(r1) == []
    assert [t for t, _ in events(sender_dir, "x.txt")] == ["create_instance"]


def test_standing_order_requests_are_checked(pair):
    sender = pair[0]
    assert "unknown clause" in call(sender, "create_standing_order", name="bad",
                                    search='{"colour-is": 1}', conn_name="receiver")["message"]
    assert "no connection named 'mars'" in call(sender, "create_standing_order", name="bad",
                                                search="{}", conn_name="mars")["message"]
    assert "name" in call(sender, "create_standing_order", name="a b", search="{}",
                          conn_name="receiver")["message"]
    call(sender, "create_standing_order", name="ok", search="{}", conn_name="receiver")
    assert "exists already" in call(sender, "create_standing_order", name="ok", search="{}",
                                    conn_name="receiver")["message"]
    call(sender, "update_standing_order", name="ok", search='{"size-greater-than": 5}')
    assert call(sender, "list_standing_orders")["standing_orders"][0]["search"] == \
        '{"size-greater-than": 5}'
    call(sender, "delete_standing_order", name="ok")
    assert call(sender, "list_standing_orders")["standing_orders"] == []
    assert "no standing order named" in call(sender, "delete_standing_order",
                                             name="ok")["message"]


def test_a_sender_killed_mid_copy_resumes_after_restart(pair, tmp_path):
    """SIGKILL the sender while a large file is on the wire; after a restart
    the copy is sent again and arrives exactly once, with no orphan bytes."""
    import signal

    sender, sender_dir, receiver, receiver_dir = pair
    big = tmp_path / "big.dat"
    with open(big, "wb") as f:
        block = os.urandom(1 << 20)
        for _ in range(768):
            f.write(block)
    upload(sender, str(big), "big/big.dat", null_obsid="true")

    def progress():
        with sqlite3.connect(sender_dir / "db.sqlite") as conn:
            row = conn.execute("SELECT progress_bytes FROM task WHERE kind = 'copy_to_librarian'").fetchone()
        return row and row[0] >= (64 << 20)

    call(sender, "launch_file_copy", file_name="big.dat", connection_name="receiver")
    wait_for(progress, seconds=60)
    sender.proc.send_signal(signal.SIGKILL)
    sender.proc.wait(10)
    sender.log.close()
    assert names_on(receiver) == []
    sender.start()
    wait_for(lambda: names_on(receiver) == ["big.dat"], seconds=120)
    assert shell_md5(str(receiver_dir / "store" / "big" / "big.dat")) == shell_md5(str(big))
    files, _ = store_contents(str(receiver_dir / "store"))
    assert files == {"big/big.dat"}
    # The only things in staging are the empty directories initiate_upload issued (swept
    # after a day): no bytes.
    leftovers = [os.path.join(d, f) for d, _, fs in os.walk(receiver_dir / "store" / ".staging")
                 for f in fs]
    assert leftovers == []
    kinds = [t for t, _ in events(sender_dir, "big.dat")]
    assert kinds.count("launch_copy") == 1 and kinds.count("copy_finished") == 1
    with sqlite3.connect(sender_dir / "db.sqlite") as conn:
        state, attempts = conn.execute("SELECT state, attempts FROM task WHERE kind = 'copy_to_librarian'").fetchone()
    assert state == "done" and attempts == 2


def test_client_launch_copy_and_initiate_offload(pair, tmp_path, capsys):
    import librarian_client

    sender, sender_dir, receiver, _ = pair
    cfg = tmp_path / "c.cfg"
    cfg.write_text(json.dumps({"connections": {"s": {"url": sender.url,
                                                     "authenticator": AUTH["writer"]}}}))
    put_bytes(sender, "n/note.txt", b"a note")
    assert librarian_client.main(["--config", str(cfg), "launch-copy", "s", "note.txt",
                                  "receiver"]) == 0
    assert "copy of note.txt to receiver queued" in capsys.readouterr().out
    wait_for(lambda: names_on(receiver) == ["note.txt"])
    assert librarian_client.main(["--config", str(cfg), "initiate-offload", "s", "main",
                                  "nowhere"]) == 1
    assert "no store named 'nowhere'" in capsys.readouterr().err


def test_connectivity_check_in_the_client_and_on_the_web(pair, tmp_path, capsys):
    import librarian_client
    import webtest  # noqa: F401

    sender, _, receiver, _ = pair
    cfg = tmp_path / "c.cfg"
    cfg.write_text(json.dumps({"connections": {
        "up": {"url": sender.url, "authenticator": AUTH["reader"]},
        "down": {"url": "http://127.0.0.1:%d/" % free_port(), "authenticator": "x"}}}))
    assert librarian_client.main(["--config", str(cfg), "check-connections"]) == 1
    out = capsys.readouterr().out
    assert "up (%s): answers; stores: main on" % sender.url in out
    assert "down: FAILED: " in out and "cannot reach" in out

    session = requests.Session()
    form = session.get(sender.url + "login", timeout=30).text
    token = re.search(r'name="login_token" value="([^"]+)"', form).group(1)
    session.post(sender.url + "login", data={"authenticator": AUTH["reader"], "next": "/",
                                             "login_token": token}, timeout=30)
    page = session.get(sender.url + "connectivity", timeout=60).text
    assert "receiver" in page and "main (" in page and ">yes<" in page
    receiver.stop()
    page = session.get(sender.url + "connectivity", timeout=60).text
    assert "no: " in page and "cannot reach" in page
