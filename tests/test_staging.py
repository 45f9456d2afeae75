"""Local-disk staging of search results, on SQLite and PostgreSQL."""

import os

import pytest

import tasks
from conftest import api, bearer


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
    assert tasks.run_until_empty() == 1
    assert sorted(os.listdir(dest)) == ["STAGING-SUCCEEDED", "one.txt", "two.txt"]
    assert (dest / "two.txt").read_bytes() == b"two!"
    # Again into the same place: the copies exist, so each is an error line.
    api(web, "search", search='{"name-matches": "%.txt"}', output_format="stage-the-files-json",
        stage_user="ann", stage_dest="night1")
    tasks.run_until_empty()
    lines = (dest / "STAGING-ERRORS").read_text().splitlines()
    assert len(lines) == 2 and lines[0].startswith("one.txt:")
    assert not (dest / "STAGING-SUCCEEDED").exists()


@pytest.mark.parametrize("user,subdir,message", [
    ("ann", "../../escape", "without '..'"), ("ann", "/abs", "relative"),
    ("../x", "d", "plain name"), ("ann", "link/inside", "outside the staging area")])
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
