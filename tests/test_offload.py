"""Offload between two stores of one Librarian, on SQLite and PostgreSQL."""

import json
import os

import models
import tasks
from conftest import ctx, api, bearer, store_contents, the_task


def test_offload_empties_a_store_and_then_shuts_it_down(app, web, store_dir, tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    models.Store.create(name="other", ssh_host="localhost", path_prefix=str(other_dir))
    for path, body in (("a/one.dat", b"one"), ("b/two.dat", b"two" * 1000)):
        web.put("/api/upload/%s?null_obsid=true" % path, body, headers=bearer(), status=201,
                content_type="application/octet-stream")
    models.Store.update(available=False).where(models.Store.name == "other").execute()

    reply = api(web, "initiate_offload", auth="writer", source_store_name="main",
                dest_store_name="other")
    assert reply == {"success": True, "outcome": "task-launched", "instance-count": 2}
    assert tasks.run_until_empty(ctx()) == 1
    assert store_contents(str(other_dir))[0] == {"a/one.dat", "b/two.dat"}
    rows = sorted((i.store.name, i.name, i.deletion_policy) for i in models.FileInstance.select())
    assert rows == [("main", "one.dat", 1), ("main", "two.dat", 1),
                    ("other", "one.dat", 0), ("other", "two.dat", 0)]
    changed = models.FileEvent.get((models.FileEvent.file == "one.dat") & (
        models.FileEvent.type == "instance_deletion_policy_changed"))
    assert json.loads(changed.payload)["context"] == "offload"

    # Nothing is sole on main any more: the next offload shuts it down.
    reply = api(web, "initiate_offload", source_store_name="main", dest_store_name="other")
    assert reply["outcome"] == "store-shut-down"
    assert models.Store.get(models.Store.name == "main").available is False
    # The copies on main may now be deleted deliberately.
    stats = api(web, "delete_file_instances_matching_query", query='{"always-true": 0}',
                restrict_to_store="main")["stats"]
    assert all(s["n_deleted"] == 1 for s in stats.values())
    assert store_contents(store_dir)[0] == set()
    assert os.path.exists(other_dir / "b" / "two.dat")


def test_offload_requests_are_checked(app, web):
    assert "same store" in api(web, "initiate_offload", status=400, source_store_name="main",
                               dest_store_name="main")["message"]
    assert "no store named" in api(web, "initiate_offload", status=400,
                                   source_store_name="main",
                                   dest_store_name="nowhere")["message"]
    assert api(web, "initiate_offload", auth="appender", status=403, source_store_name="main",
               dest_store_name="x")["success"] is False


def test_a_missing_file_does_not_stop_the_rest_and_offloads_do_not_overlap(app, web, store_dir,
                                                                          tmp_path):
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    models.Store.create(name="other", ssh_host="localhost", path_prefix=str(other_dir))
    for name in ("a.dat", "b.dat", "c.dat"):
        web.put("/api/upload/%s?null_obsid=true" % name, name.encode(), headers=bearer(),
                status=201, content_type="application/octet-stream")
    os.chmod(store_dir, 0o755)
    os.unlink(os.path.join(store_dir, "b.dat"))
    api(web, "initiate_offload", source_store_name="main", dest_store_name="other")
    assert "already queued" in api(web, "initiate_offload", status=409,
                                   source_store_name="main",
                                   dest_store_name="other")["message"]
    tasks.run_until_empty(ctx())
    assert store_contents(str(other_dir)) == ({"a.dat", "c.dat"}, [])
    task = the_task()
    assert task.state == "failed" and "b.dat" in task.last_error
