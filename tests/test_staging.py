"""Local-disk staging of search results, on SQLite and PostgreSQL."""

import os
import stat
import subprocess
import time

import getpass

import pytest

import tasks
import models
from conftest import ctx, api, bearer, the_task

USER = getpass.getuser()  # a user of this system, as chown_command needs


@pytest.fixture
def staged(app, web, tmp_path):
    prefix = tmp_path / "staging-area"
    prefix.mkdir()
    app.config["librarian.settings"].staging["dest_prefix"] = str(prefix)
    for path, body in (("a/one.txt", b"one"), ("b/two.txt", b"two!")):
        web.put("/api/upload/%s?null_obsid=true" % path, body, headers=bearer(), status=201,
                content_type="application/octet-stream")
    return prefix


def test_staging_copies_the_matches_and_leaves_markers(staged, web):
    reply = api(web, "search", auth="writer", search='{"name-matches": "%.txt"}',
                output_format="stage-the-files-json", stage_user="ann", stage_dest="night1")
    dest = staged / "ann" / "night1"
    assert reply == {"success": True, "destination": str(dest), "n_instances": 2, "n_bytes": 7}
    assert os.listdir(dest) == ["STAGING-IN-PROGRESS"]
    assert "in progress" in api(web, "search", status=409, search="{}",
                                output_format="stage-the-files-json", stage_user="ann",
                                stage_dest="night1")["message"]
    assert tasks.run_until_empty(ctx()) == 1
    # Each file keeps its folders on the store, as the original's pipelines expect.
    assert sorted(os.listdir(dest)) == ["STAGING-SUCCEEDED", "a", "b"]
    assert (dest / "b" / "two.txt").read_bytes() == b"two!"
    finished = float((dest / "STAGING-SUCCEEDED").read_text())
    assert abs(finished - time.time()) < 60
    # Folders are shared (group-writable, setgid) and copies the user's to change.
    assert stat.S_IMODE(os.stat(dest / "a").st_mode) & 0o2030 == 0o2030  # g+wx, setgid
    assert os.stat(dest / "a" / "one.txt").st_mode & 0o220 == 0o220
    # Again into the same place: the copies exist, so each is an error line.
    api(web, "search", search='{"name-matches": "%.txt"}', output_format="stage-the-files-json",
        stage_user="ann", stage_dest="night1")
    tasks.run_until_empty(ctx())
    lines = (dest / "STAGING-ERRORS").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("one.txt:")
    assert not (dest / "STAGING-SUCCEEDED").exists()


def test_staging_into_an_absolute_folder_as_the_deployed_client_asks(staged, web, tmp_path):
    target = staged / "lustre" / "ann" / "run7"
    reply = api(web, "search", auth="writer", search='{"name-matches": "one.%"}',
                output_format="stage-the-files-json", stage_user="ann",
                stage_dest=str(target), type="instances-stores")
    assert reply["destination"] == str(target) and reply["n_instances"] == 1
    tasks.run_until_empty(ctx())
    assert (target / "a" / "one.txt").read_bytes() == b"one"
    assert (target / "STAGING-SUCCEEDED").exists()
    for outside in (str(tmp_path / "elsewhere"), str(staged), str(staged) + "-evil/x"):
        msg = api(web, "search", status=400, search="{}", output_format="stage-the-files-json",
                  stage_user="ann", stage_dest=outside)["message"]
        assert "not a folder inside the staging area" in msg
    assert not (tmp_path / "elsewhere").exists()


def test_a_chown_command_hands_the_copies_to_the_user(staged, app, web, tmp_path):
    log = tmp_path / "chown.log"
    script = tmp_path / "fake-chown"
    script.write_text('#!/bin/sh\necho "$@" > %s\n' % log)
    script.chmod(0o755)
    app.config["librarian.settings"].staging["chown_command"] = [str(script), "--as-root"]
    msg = api(web, "search", status=400, search='{"name-matches": "%.txt"}',
              output_format="stage-the-files-json", stage_user="no-such-user-here",
              stage_dest="handed")["message"]
    assert "not a user of this system" in msg
    api(web, "search", search='{"name-matches": "%.txt"}', output_format="stage-the-files-json",
        stage_user=USER, stage_dest="handed")
    tasks.run_until_empty(ctx())
    dest = staged / USER / "handed"
    assert log.read_text().split() == ["--as-root", "-u", USER, "-R", "-d", str(dest)]
    assert (dest / "STAGING-SUCCEEDED").exists()
    script.write_text("#!/bin/sh\necho no such user >&2\nexit 3\n")
    api(web, "search", search='{"name-matches": "%.txt"}', output_format="stage-the-files-json",
        stage_user=USER, stage_dest="handed-again")
    tasks.run_until_empty(ctx())
    errors = (staged / USER / "handed-again" / "STAGING-ERRORS").read_text()
    assert "fake-chown exited with 3: no such user" in errors


@pytest.mark.parametrize("user,subdir,message", [
    ("ann", "../../escape", "without '..'"), ("ann", "/abs", "not a folder inside"),
    ("../x", "d", "plain name"), ("ann", "link/inside", "not a folder inside the staging")])
def test_staging_refuses_escapes(staged, web, tmp_path, user, subdir, message):
    outside = tmp_path / "outside"
    outside.mkdir()
    (staged / "ann").mkdir(exist_ok=True)
    if not (staged / "ann" / "link").exists():
        os.symlink(outside, staged / "ann" / "link")
    reply = api(web, "search", status=400, search="{}", output_format="stage-the-files-json",
                stage_user=user, stage_dest=subdir)
    assert message in reply["message"]
    assert os.listdir(outside) == []


def test_staging_needs_read_write(staged, web):
    assert api(web, "search", auth="appender", status=403, search="{}",
               output_format="stage-the-files-json", stage_dest="x")["success"] is False


def test_client_stage_files_waits_for_the_result(tmp_path, capsys):
    import json

    import librarian_client
    from conftest import AUTH
    from test_copies import make_librarian, put_bytes

    area = tmp_path / "area"
    area.mkdir()
    server, _ = make_librarian(tmp_path, "lib", extra="[staging]\ndest_prefix = %s\n" % area)
    server.start()
    try:
        put_bytes(server, "x/a.txt", b"aaa")
        cfg = tmp_path / "c.cfg"
        cfg.write_text(json.dumps({"connections": {"l": {"url": server.url,
                                                         "authenticator": AUTH["writer"]}}}))
        code = librarian_client.main(["--config", str(cfg), "stage-files", "l",
                                      '{"name-is-exactly": "a.txt"}', "run1", "--wait",
                                      "--timeout", "60"])
        assert code == 0
        out = capsys.readouterr().out
        assert "staging 1 file(s), 3 bytes" in out and out.strip().endswith("done")
        assert (area / "writer" / "run1" / "x" / "a.txt").read_bytes() == b"aaa"
    finally:
        server.stop()


def test_staging_form_under_file_search_results(staged, web):
    from test_pages import login_as

    login_as(web, "writer")
    page = web.post("/search", {"type": "files", "search": '{"name-is-exactly": "one.txt"}',
                                "output_format": "List of files"})
    form = [f for f in page.forms.values() if f.action == "/stage"][0]
    form["dest"] = "from-web"
    assert "into <code>%s</code>" % (staged / "writer" / "from-web") in form.submit().text
    tasks.run_until_empty(ctx())
    assert sorted(os.listdir(staged / "writer" / "from-web")) == ["STAGING-SUCCEEDED", "a"]
    login_as(web, "reader")
    page = web.post("/search", {"type": "files", "search": "{}", "output_format": "List of files"})
    assert "/stage" not in page.text


def test_markers_are_never_written_through_links(staged, web, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    trap = staged / "admin" / "trap"
    trap.mkdir(parents=True)
    os.symlink(outside / "PWNED", trap / "STAGING-SUCCEEDED")
    api(web, "search", search='{"name-is-exactly": "one.txt"}',
        output_format="stage-the-files-json", stage_dest="trap")
    tasks.run_until_empty(ctx())
    assert os.listdir(outside) == []
    assert (trap / "STAGING-SUCCEEDED").is_file() and not (trap / "STAGING-SUCCEEDED").is_symlink()


def test_a_destination_swapped_for_a_link_gets_nothing(staged, web, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    api(web, "search", search='{"name-is-exactly": "one.txt"}',
        output_format="stage-the-files-json", stage_dest="kdir")
    kdir = staged / "admin" / "kdir"
    os.rename(kdir, staged / "admin" / "kdir.orig")
    os.symlink(outside, kdir)
    tasks.run_until_empty(ctx())
    assert os.listdir(outside) == []
    task = the_task()
    assert task.state == "failed" and "staging area" in task.last_error


def test_cancelling_a_staging_releases_its_folder(staged, web):
    api(web, "search", search="{}", output_format="stage-the-files-json", stage_dest="cancelme")
    task = the_task()
    assert tasks.cancel(ctx(), task.id, "admin") is True
    dest = staged / "admin" / "cancelme"
    assert sorted(os.listdir(dest)) == ["STAGING-ERRORS"]
    assert "cancelled" in (dest / "STAGING-ERRORS").read_text()
    api(web, "search", search="{}", output_format="stage-the-files-json", stage_dest="cancelme")


def test_a_link_swapped_in_during_a_staging_leads_nowhere(staged, web, tmp_path, monkeypatch):
    """The staging area is shared (group-writable): a folder swapped for a
    link while a staging runs must not lead the copies, or mode changes,
    out of it."""
    import staging

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "secret.ini").write_text("x")
    os.chmod(victim / "secret.ini", 0o600)
    api(web, "search", search='{"name-matches": "%.txt"}', output_format="stage-the-files-json",
        stage_user="ann", stage_dest="swap")
    dest = staged / "ann" / "swap"
    real_enter = staging.enter

    def planted_then_enter(fd, name, create):
        if name == "b":  # someone in the group plants "b" as a link just before
            os.symlink(victim, dest / "b")
        return real_enter(fd, name, create)

    monkeypatch.setattr(staging, "enter", planted_then_enter)
    tasks.run_until_empty(ctx())
    assert sorted(os.listdir(victim)) == ["secret.ini"]
    assert os.stat(victim / "secret.ini").st_mode & 0o777 == 0o600
    assert "two.txt" in (dest / "STAGING-ERRORS").read_text()
    assert (dest / "a" / "one.txt").read_bytes() == b"one"


def test_a_chown_command_never_hands_over_someone_elses_folder(staged, app, web, tmp_path):
    script = tmp_path / "fake-chown"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o755)
    app.config["librarian.settings"].staging["chown_command"] = [str(script)]
    theirs = staged / "bob"
    theirs.mkdir()
    os.chown(theirs, 4242, 4242)
    msg = api(web, "search", status=400, search="{}", output_format="stage-the-files-json",
              stage_user=USER, stage_dest=str(theirs))["message"]
    assert "belongs to another user" in msg
    assert os.listdir(theirs) == []
    # A new folder inside it is the caller's.
    api(web, "search", search='{"name-matches": "one.%"}', output_format="stage-the-files-json",
        stage_user=USER, stage_dest=str(theirs / "mine"))


def test_a_chown_command_that_floods_or_hangs_is_bounded(staged, app, web, tmp_path):
    script = tmp_path / "fake-chown"
    script.write_text("#!/bin/sh\nhead -c 50000000 /dev/zero | tr '\\0' x\nexit 2\n")
    script.chmod(0o755)
    settings = app.config["librarian.settings"]
    settings.staging["chown_command"] = [str(script)]
    api(web, "search", search='{"name-matches": "one.%"}', output_format="stage-the-files-json",
        stage_user=USER, stage_dest="flood")
    tasks.run_until_empty(ctx())
    errors = (staged / USER / "flood" / "STAGING-ERRORS").read_text()
    assert "exited with 2" in errors and len(errors) < 1000
    child = "sleep 30.%d" % os.getpid()  # (its own: tests run side by side)
    script.write_text("#!/bin/sh\n%s &\nyes\n" % child)  # and a child that outlives it
    settings.staging["chown_timeout"] = 0.5
    started = time.monotonic()
    api(web, "search", search='{"name-matches": "one.%"}', output_format="stage-the-files-json",
        stage_user=USER, stage_dest="hang")
    tasks.run_until_empty(ctx())
    assert time.monotonic() - started < 15
    assert "did not finish within 0.5 s" in (staged / USER / "hang" / "STAGING-ERRORS").read_text()
    time.sleep(0.2)
    assert subprocess.run(["pgrep", "-f", child], capture_output=True).returncode == 1


def test_the_hand_over_never_follows_a_folder_swapped_after_the_copies(staged, app, web,
                                                                       tmp_path, monkeypatch):
    import staging

    log = tmp_path / "chown.log"
    script = tmp_path / "fake-chown"
    script.write_text('#!/bin/sh\necho "$@" > %s\n' % log)
    script.chmod(0o755)
    app.config["librarian.settings"].staging["chown_command"] = [str(script)]
    victim = tmp_path / "victim"
    (victim / "b").mkdir(parents=True)
    api(web, "search", search='{"name-matches": "one.%"}', output_format="stage-the-files-json",
        stage_user=USER, stage_dest="a/b")
    real_stage_one = staging.stage_one

    def stage_then_swap(context, dest_fd, file):
        size = real_stage_one(context, dest_fd, file)
        os.rename(staged / USER / "a", staged / USER / "a.moved")
        os.symlink(victim, staged / USER / "a")
        return size

    monkeypatch.setattr(staging, "stage_one", stage_then_swap)
    tasks.run_until_empty(ctx())
    assert not log.exists()
    errors = (staged / USER / "a.moved" / "b" / "STAGING-ERRORS").read_text()
    assert "no longer the folder staged into" in errors


def test_a_staging_never_writes_into_another_sources_folders(staged, web):
    """A folder a staging made is its source's: another read-write source
    may stage neither into it, nor above it, nor below it."""
    models.create_source("writer2", "writer2-secret", "read-write")
    api(web, "search", auth="writer", search='{"name-matches": "one.%"}',
        output_format="stage-the-files-json", stage_user="ann", stage_dest="night/data")
    for dest in ("night/data", "night/data/sub", "night"):
        reply = api(web, "search", auth="writer2-secret", status=403,
                    search='{"name-matches": "two.%"}', output_format="stage-the-files-json",
                    stage_user="ann", stage_dest=dest)
        assert "another source" in reply["message"], dest
    api(web, "search", auth="writer2-secret", search='{"name-matches": "two.%"}',
        output_format="stage-the-files-json", stage_user="ann", stage_dest="elsewhere")
    assert tasks.run_until_empty(ctx()) == 2
    assert not (staged / "ann" / "night" / "data" / "b").exists()


def test_the_client_names_stage_files_when_staging_is_off(client_config, capsys):
    import librarian_client

    assert librarian_client.main(["--config", client_config, "stage-files", "writer", "{}",
                                  "run1"]) == 1
    assert capsys.readouterr().err.startswith(
        "librarian: stage-files: staging is not configured on this Librarian")


def test_init_config_writes_a_staging_area(tmp_path):
    import librarian
    import settings

    path = tmp_path / "var" / "librarian.ini"
    assert librarian.main(["init-config", str(path)]) == 0
    config = settings.load(str(path))
    assert config.staging["dest_prefix"] == str(tmp_path / "var" / "staging")
    assert (tmp_path / "var" / "staging").is_dir()


def test_the_staging_search_is_bounded_like_any_other(staged, app, web, monkeypatch):
    """Its time limit and the caller's share of searches at once."""
    with models.write_transaction():
        models.File.insert_many(
            [{"name": "f%05d.txt" % i, "type": "txt", "create_time": models.utcnow(),
              "size": 1, "md5": "0" * 32, "source": "x", "num_instances": 1}
             for i in range(3000)]).execute()
    ors = '{"or": {%s}}' % ", ".join('"name-matches": "%%%d%%%d%%%d%%"' % (i, i + 1, i + 2)
                                     for i in range(300))
    server = app.config["librarian.settings"].server
    monkeypatch.setitem(server, "search_timeout_seconds", 0.001)
    reply = api(web, "search", auth="writer", status=503, search=ors,
                output_format="stage-the-files-json", stage_dest="slow")
    assert "search_timeout_seconds" in reply["message"]
    monkeypatch.setitem(server, "search_timeout_seconds", 30)
    monkeypatch.setitem(server, "searches_per_caller", 0)  # as if its share were running
    reply = api(web, "search", auth="writer", status=429, search="{}",
                output_format="stage-the-files-json", stage_dest="again")
    assert "searches_per_caller" in reply["message"]
    assert not os.path.exists(staged / "writer" / "slow")
