"""End to end: real `librarian.py serve` processes on loopback ports, the
real client library and `librarian` command, concurrency and broken
connections."""

import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
import requests

import librarian_client
import models
from conftest import AUTH, MIRIAD, ROOT, UVH5, bearer, need_data, store_contents
from reference import miriad_reference, shell_md5, shell_size, uvh5_reference


def run_cli(client_config, *argv):
    return librarian_client.main(["--config", client_config, *argv])


def test_serve_refuses_an_unmigrated_database(tmp_path):
    from conftest import config_text, free_port

    path = tmp_path / "fresh.ini"
    path.write_text(config_text("sqlite:///%s" % (tmp_path / "empty.db"), str(tmp_path / "s"),
                                port=free_port()))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "serve",
                           "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    every = sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "migrations"))
                   if n[:3].isdigit() and n.endswith(".py"))
    assert every[:2] == ["001_initial", "002_search_indexes"]
    assert "is not migrated (pending: %s)" % ", ".join(every) in proc.stderr
    assert "librarian.py migrate --config" in proc.stderr


def test_serve_names_a_bad_config_key(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[server]\nsecret_key = s\nprot = 80\n[database]\nurl = sqlite:///x.db\n")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "serve",
                           "--config", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown key 'prot' in section [server]" in proc.stderr


def test_client_uploads_locates_downloads_and_adds_events(server, client_config, tmp_path,
                                                          capsys):
    need_data()
    assert run_cli(client_config, "upload", "appender", UVH5,
                   "2458432/zen.2458432.34569.uvh5") == 0
    assert run_cli(client_config, "upload", "appender", MIRIAD + "/",
                   "2458043/zen.2458043.12552.xx.HH.uvA") == 0
    out = capsys.readouterr().out
    assert "zen.2458432.34569.uvh5: %d bytes, md5 %s, obsid %d" % (
        shell_size(UVH5), shell_md5(UVH5), uvh5_reference(UVH5)["obsid"]) in out
    assert "zen.2458043.12552.xx.HH.uvA: %d bytes, md5 %s, obsid %d" % (
        shell_size(MIRIAD), shell_md5(MIRIAD), miriad_reference(MIRIAD)["obsid"]) in out

    assert run_cli(client_config, "locate-file", "reader", "zen.2458043.12552.xx.HH.uvA") == 0
    located = capsys.readouterr().out.strip()
    assert located.endswith("/2458043/zen.2458043.12552.xx.HH.uvA")
    assert os.path.isdir(located.split(":", 1)[1])

    dest = tmp_path / "dl"
    dest.mkdir()
    assert run_cli(client_config, "download", "reader", "zen.2458043.12552.xx.HH.uvA",
                   str(dest / "copy.uvA")) == 0
    assert run_cli(client_config, "download", "reader", "zen.2458432.34569.uvh5",
                   str(dest / "copy.uvh5")) == 0
    assert shell_md5(str(dest / "copy.uvA")) == shell_md5(MIRIAD)
    with open(UVH5, "rb") as a, open(dest / "copy.uvh5", "rb") as b:
        assert a.read() == b.read()

    assert run_cli(client_config, "add-file-event", "appender", UVH5, "qa", "score=0.9",
                   "who=ann") == 0
    client = librarian_client.LibrarianClient("admin", config_path=client_config)
    assert client.ping()["message"] == "hello"


def test_client_errors_are_one_line_and_exit_codes(server, client_config, tmp_path, capsys):
    src = tmp_path / "notes.txt"
    src.write_text("no obsid here")
    assert run_cli(client_config, "upload", "appender", str(src), "notes.txt") == 1
    err = capsys.readouterr().err
    assert err.startswith("librarian: upload: cannot determine the obsid of 'notes.txt'")
    assert err.count("\n") == 1
    assert run_cli(client_config, "upload", "reader", str(src), "notes.txt",
                   "--null-obsid") == 1
    assert "needs level read-append" in capsys.readouterr().err
    assert run_cli(client_config, "upload", "appender", str(src), "notes.txt", "--null-obsid",
                   "--deletion", "allowed") == 0
    assert run_cli(client_config, "locate-file", "nobody", "notes.txt") == 1
    assert "no connection 'nobody'" in capsys.readouterr().err
    assert run_cli(client_config, "add-file-event", "appender", "notes.txt", "t", "novalue") == 2
    assert run_cli(client_config, "frobnicate") == 2
    assert run_cli(client_config, "download", "reader", "missing.dat",
                   str(tmp_path / "m")) == 1
    assert "no file named 'missing.dat'" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_unreachable_server_is_a_clear_error(tmp_path, capsys):
    import json

    from conftest import free_port

    url = "http://127.0.0.1:%d/" % free_port()
    cfg = tmp_path / "c.cfg"
    cfg.write_text(json.dumps({"connections": {"x": {"url": url, "authenticator": "a"},
                                               "y": {"url": "http://no-such-host.invalid/",
                                                     "authenticator": "a"}}}))
    assert librarian_client.main(["--config", str(cfg), "locate-file", "x", "f"]) == 1
    assert capsys.readouterr().err == ("librarian: locate_file_instance: cannot reach %s: "
                                       "Connection refused\n" % url)
    assert librarian_client.main(["--config", str(cfg), "search-files", "y", "{}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("librarian: search: cannot reach http://no-such-host.invalid/: ")
    assert err.count("\n") == 1 and len(err) < 150, err


def test_concurrent_uploads_register_each_name_once_without_orphans(server, store_dir):
    bodies = {"f%02d.dat" % i: os.urandom(200_000) for i in range(10)}
    same = os.urandom(300_000)
    results = []

    def upload(name, body):
        resp = requests.put(server.url + "api/upload/c/" + name, data=body,
                            params={"null_obsid": "true"},
                            headers={"Authorization": "Bearer " + AUTH["appender"]}, timeout=60)
        results.append((name, resp.status_code))

    threads = [threading.Thread(target=upload, args=item) for item in bodies.items()]
    threads += [threading.Thread(target=upload, args=("same.dat", same)) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(code for name, code in results if name == "same.dat")
    assert statuses == [200, 200, 200, 200, 201]
    assert all(code == 201 for name, code in results if name != "same.dat")
    models.db.connect(reuse_if_open=True)
    assert models.File.select().count() == 11
    assert models.FileInstance.select().count() == 11
    assert models.FileEvent.select().count() == 11
    files, staging = store_contents(store_dir)
    assert files == {"c/" + n for n in bodies} | {"c/same.dat"}
    assert staging == []
    with open(os.path.join(store_dir, "c", "same.dat"), "rb") as f:
        assert hashlib.md5(f.read()).digest() == hashlib.md5(same).digest()


def test_client_disconnect_mid_upload_leaves_nothing(server, store_dir):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(b"PUT /api/upload/cut.dat?null_obsid=true HTTP/1.1\r\nHost: x\r\n"
                     b"Authorization: Bearer " + AUTH["appender"].encode() +
                     b"\r\nContent-Length: 5000000\r\n\r\n")
        sock.sendall(os.urandom(1_000_000))
    time.sleep(1.0)
    # The server is still healthy and nothing of the cut upload exists.
    resp = requests.post(server.url + "api/ping",
                         data={"request": '{"authenticator": "%s"}' % AUTH["reader"]}, timeout=10)
    assert resp.json()["success"] is True
    models.db.connect(reuse_if_open=True)
    assert models.File.select().count() == 0
    files, staging = store_contents(store_dir)
    assert files == set() and staging == []


@pytest.mark.parametrize("level", ["reader", "not-a-secret"])
def test_two_step_refused_for_wrong_authenticator_or_level(server, level):
    client = librarian_client.LibrarianClient(conn_config={"url": server.url,
                                                           "authenticator": AUTH.get(level,
                                                                                     level)})
    with pytest.raises(librarian_client.RPCError) as e:
        client.initiate_upload(10)
    assert e.value.status == (403 if level == "reader" else 400)


def test_catalogue_commands_of_the_client(server, client_config, store_dir, capsys,
                                          monkeypatch):
    need_data()
    assert run_cli(client_config, "upload", "appender", UVH5, "a/zen.2458432.34569.uvh5",
                   "--deletion", "allowed") == 0
    assert run_cli(client_config, "upload", "appender", MIRIAD,
                   "b/zen.2458043.12552.xx.HH.uvA") == 0
    capsys.readouterr()

    assert run_cli(client_config, "search-files", "reader", '{"name-matches": "zen.%"}',
                   "--names") == 0
    assert capsys.readouterr().out.split() == ["zen.2458043.12552.xx.HH.uvA",
                                               "zen.2458432.34569.uvh5"]
    assert run_cli(client_config, "search-files", "reader", '{"type-is-exactly": "uvh5"}') == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAME", "SIZE", "OBSID", "TYPE", "CREATED", "(UTC)"]
    assert table[1].split()[:4] == ["zen.2458432.34569.uvh5", str(shell_size(UVH5)),
                                    "1225829886", "uvh5"]
    assert run_cli(client_config, "search-files", "reader", '{"name-matches": ') == 2

    assert run_cli(client_config, "assign-sessions", "appender") == 0
    out = capsys.readouterr().out
    assert "session 1192201262:" in out and "session 1225829886:" in out

    assert run_cli(client_config, "describe-session", "reader", "appender", "seen") == 0
    out = capsys.readouterr().out
    assert out.startswith("session 1192201262:") and "xx" in out

    # Observations and sessions, as files: a table, or only their ids.
    uvh5 = uvh5_reference(UVH5)
    assert run_cli(client_config, "search-obs", "reader", '{"obsid-is-exactly": 1225829886}') == 0
    captured = capsys.readouterr()
    table = captured.out.splitlines()
    assert table[0].split() == ["OBSID", "START", "JD", "STOP", "JD", "START", "LST", "(h)",
                                "SESSION"]
    assert table[1].split() == ["1225829886", "%.5f" % uvh5["start_time_jd"],
                                "%.5f" % uvh5["stop_time_jd"], "%.4f" % uvh5["start_lst_hr"],
                                "1225829886"]
    assert captured.err == "1 observation\n"
    assert run_cli(client_config, "search-obs", "reader", '{"start-time-jd-greater-than": 0}',
                   "--ids") == 0
    assert capsys.readouterr().out.split() == ["1192201262", "1225829886"]
    assert run_cli(client_config, "search-sessions", "reader",
                   '{"session-id-is-exactly": 1225829886}') == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == ["1225829886", "%.5f" % uvh5["start_time_jd"],
                       "%.5f" % uvh5["stop_time_jd"]]
    assert float(row[3]) == pytest.approx((uvh5["stop_time_jd"] - uvh5["start_time_jd"]) * 24,
                                          abs=0.01)
    monkeypatch.setattr("sys.stdin", io.StringIO('{"always-true": 0}  # every session'))
    assert run_cli(client_config, "search-sessions", "reader", "-", "--ids") == 0
    assert capsys.readouterr().out.split() == ["1192201262", "1225829886"]
    assert run_cli(client_config, "search-obs", "reader", '{"obsid-is-exactley": 1}') == 1
    assert "did you mean obsid-is-exactly?" in capsys.readouterr().err

    # Deletion: the sole copy of a file is never deleted (deletion_min_other_copies = 1),
    # and --noop says so for each instance.
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    assert run_cli(client_config, "delete-files", "writer", '{"name-matches": "zen.%"}') == 0
    assert "0 instances of 2 matching files may be deleted" in capsys.readouterr().out
    assert run_cli(client_config, "delete-files", "writer", '{"name-matches": "zen.%"}',
                   "--noop") == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "keep   zen.2458043.12552.xx.HH.uvA on store main at b/zen.2458043.12552.xx.HH.uvA: "
        "its deletion policy is disallowed",
        "keep   zen.2458432.34569.uvh5 on store main at a/zen.2458432.34569.uvh5: "
        "it is the last good copy known anywhere",
        "noop: would have 0 deleted, 2 kept, 0 errors"]
    assert run_cli(client_config, "delete-files", "appender", '{"name-matches": "zen.%"}',
                   "--yes") == 1
    assert "needs level read-write" in capsys.readouterr().err
    assert run_cli(client_config, "delete-files", "writer", '{"name-matches": "zen.%"}',
                   "--yes") == 0
    assert "0 deleted, 2 kept, 0 errors" in capsys.readouterr().out
    assert os.path.exists(os.path.join(store_dir, "a", "zen.2458432.34569.uvh5"))

    assert run_cli(client_config, "set-file-deletion-policy", "writer",
                   "zen.2458043.12552.xx.HH.uvA", "allowed") == 0
    models.db.connect(reuse_if_open=True)
    assert models.FileInstance.get().deletion_policy == models.DELETION_ALLOWED


def test_add_obs_registers_files_already_on_the_store(server, client_config, store_dir,
                                                      capsys):
    need_data()
    import shutil

    dest = os.path.join(store_dir, "pre", "zen.2458043.12552.xx.HH.uvA")
    shutil.copytree(MIRIAD, dest)
    assert run_cli(client_config, "add-obs", "appender", "main", dest) == 0
    assert "registered 1 file on store main" in capsys.readouterr().out
    models.db.connect(reuse_if_open=True)
    record = models.File.get()
    assert (record.md5, record.obsid, record.type) == (shell_md5(MIRIAD), 1192201262, "uvA")
    assert run_cli(client_config, "add-obs", "appender", "main", "/nonexistent/x.uv") == 2


@pytest.mark.parametrize("dest,message", [("a/../b.txt", "without '..'"), ("", "ending in"),
                                          ("dir/", "ending in")])
def test_client_refuses_bad_destinations_before_sending(tmp_path, dest, message):
    src = tmp_path / "f.txt"
    src.write_text("x")
    client = librarian_client.LibrarianClient(conn_config={"url": "http://127.0.0.1:9/",
                                                           "authenticator": "a"})
    with pytest.raises(librarian_client.RPCError, match=message):
        client.upload(str(src), dest)


def test_client_refuses_to_upload_a_fifo(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    client = librarian_client.LibrarianClient(conn_config={"url": "http://127.0.0.1:9/",
                                                           "authenticator": "a"})
    with pytest.raises(librarian_client.RPCError, match="not a file or a directory"):
        client.upload(str(fifo), "pipe")


def test_client_config_with_a_non_string_url_is_a_clear_error(tmp_path):
    cfg = tmp_path / "c.cfg"
    cfg.write_text('{"connections": {"x": {"url": 5, "authenticator": "a"}}}')
    with pytest.raises(librarian_client.RPCError, match="must be strings"):
        librarian_client.LibrarianClient("x", config_path=str(cfg))


def test_sigterm_stops_the_header_reader_process_too(server):
    """The reader of data headers runs in a child process; a server stopped
    with SIGTERM must not leave it behind."""
    need_data()
    from sshd import _descendants

    with open(UVH5, "rb") as f:
        resp = requests.put(server.url + "api/upload/zen.2458432.34569.uvh5", data=f,
                            headers=bearer(), timeout=60)
    assert resp.status_code == 201, resp.text
    children = _descendants(server.proc.pid)
    assert children, "reading the header started a reader process"
    server.stop()
    deadline = time.monotonic() + 10
    while any(os.path.exists("/proc/%d" % pid) for pid in children):
        assert time.monotonic() < deadline, "reader processes outlived the server"
        time.sleep(0.1)


def test_every_argument_of_the_client_has_help_text():
    import argparse

    def missing(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for command, sub in action.choices.items():
                    yield from missing(sub, command)
            elif not action.help:
                yield name, action.dest

    parser = librarian_client.build_parser()
    assert list(missing(parser, "librarian")) == []
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert {"search-files", "search-obs", "search-sessions"} <= set(commands.choices)
    assert "~/.hl_client.cfg" in commands.choices["upload"].format_help()
