"""The persistent task queue: claiming, retries with back-off, reclaiming
tasks of dead workers, and (on PostgreSQL) two worker processes never
running one task twice."""

import datetime
import os
import subprocess
import sys

import pytest

import models
import tasks
import task_support  # noqa: F401  (registers the test task kinds)
from conftest import ctx, ROOT


def test_a_task_runs_once_and_is_done(app, tmp_path):
    log = tmp_path / "log"
    task = tasks.enqueue(ctx(), "test_record", {"log": str(log)})
    assert tasks.run_until_empty(ctx()) == 1
    assert tasks.run_until_empty(ctx()) == 0
    done = tasks.Task.get_by_id(task.id)
    assert (done.state, done.attempts, done.last_error) == ("done", 1, None)
    assert log.read_text().split() == [str(task.id)]


def test_failures_retry_with_exponential_back_off_then_fail(app):
    task = tasks.enqueue(ctx(), "test_fail", {}, max_attempts=3)
    t0 = models.utcnow()
    assert tasks.run_until_empty(ctx(), now=t0) == 1
    row = tasks.Task.get_by_id(task.id)
    assert (row.state, row.attempts) == ("pending", 1)
    assert "remote end not answering" in row.last_error
    assert row.next_attempt >= t0 + datetime.timedelta(seconds=tasks.BASE_DELAY - 1)
    assert tasks.run_until_empty(ctx(), now=t0) == 0, "not due yet"
    later = t0 + datetime.timedelta(seconds=tasks.BASE_DELAY + 1)
    assert tasks.run_until_empty(ctx(), now=later) == 1
    row = tasks.Task.get_by_id(task.id)
    assert row.next_attempt >= later + datetime.timedelta(seconds=2 * tasks.BASE_DELAY - 2)
    much_later = later + datetime.timedelta(seconds=4 * tasks.BASE_DELAY)  # (before the checks)
    assert tasks.run_until_empty(ctx(), now=much_later) == 1
    row = tasks.Task.get_by_id(task.id)
    assert (row.state, row.attempts) == ("failed", 3)


def test_permanent_failures_are_not_retried(app):
    task = tasks.enqueue(ctx(), "test_fail", {"permanent": True})
    tasks.run_until_empty(ctx())
    row = tasks.Task.get_by_id(task.id)
    assert (row.state, row.attempts, row.last_error) == ("failed", 1, "bad arguments")


def test_back_off_is_capped():
    assert tasks.backoff(1) == tasks.BASE_DELAY
    assert tasks.backoff(3) == 4 * tasks.BASE_DELAY
    assert tasks.backoff(40) == tasks.MAX_DELAY


def test_a_task_whose_worker_died_is_reclaimed(app, tmp_path):
    task = tasks.enqueue(ctx(), "test_record", {"log": str(tmp_path / "log")})
    claimed = tasks.claim("dead-worker")
    assert claimed.id == task.id and claimed.state == "running"
    assert tasks.reclaim_stale() == 0, "its heartbeat is fresh"
    later = models.utcnow() + datetime.timedelta(seconds=tasks.STALE_SECONDS + 5)
    assert tasks.reclaim_stale(now=later) == 1
    assert tasks.run_until_empty(ctx(), now=later) == 1
    row = tasks.Task.get_by_id(task.id)
    assert (row.state, row.attempts) == ("done", 2)


def test_unknown_kinds_are_refused():
    with pytest.raises(ValueError, match="no handler"):
        tasks.enqueue(None, "make_coffee", {})


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_two_worker_processes_never_run_a_task_twice(app, config_path, tmp_path, db_url):
    log = tmp_path / "executions"
    with models.db.atomic():
        for _ in range(300):
            tasks.enqueue(ctx(), "test_record", {"log": str(log)})
    models.close_database()
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests"))
    cmd = [sys.executable, os.path.join(ROOT, "librarian.py"), "worker", "--config",
           config_path, "--once", "--handlers", "task_support"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for _ in range(2)]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    ran = log.read_text().split()
    assert len(ran) == 300 and len(set(ran)) == 300
    models.db.connect(reuse_if_open=True)
    assert tasks.Task.select().where(tasks.Task.state == "done").count() == 300
    workers = {t.worker for t in tasks.Task.select().where(tasks.Task.state == "done")}
    assert len(workers) == 2, "both processes took part"


@pytest.mark.parametrize("hour_utc,allowed", [(3, True), (7, False), (17, False), (19, True)])
def test_nighttime_mode_launches_only_at_night_at_the_telescope(app, hour_utc, allowed):
    """Johannesburg is UTC+2: 08:00-20:00 there is 06:00-18:00 UTC."""
    import standing

    config = app.config["librarian.settings"]
    config.librarian["standing_order_mode"] = "nighttime"
    when = datetime.datetime(2026, 6, 1, hour_utc, 30, tzinfo=datetime.timezone.utc)
    assert standing.launches_allowed(ctx(), when) is allowed
    config.librarian["standing_order_mode"] = "disabled"
    assert standing.launches_allowed(ctx(), when) is False


def test_a_sweep_is_one_query_per_order(app, monkeypatch):
    import copies
    import standing
    from conftest import QueryCounter

    monkeypatch.setattr(copies, "client_for", lambda ctx, name: None)
    for i in range(3):
        standing.create(ctx(), "order-%d" % i, '{"name-matches": "zen.%%", "size-greater-than": %d}'
                        % i, "penn")
    with QueryCounter() as counter:
        assert standing.sweep(ctx()) == {"order-0": 0, "order-1": 0, "order-2": 0}
    assert counter.count == 1 + 3, "the list of orders, then one query per order"


def test_a_sweep_goes_on_past_a_file_it_cannot_copy(app, web, store_dir, monkeypatch):
    import copies
    import standing
    from conftest import bearer

    monkeypatch.setattr(copies, "client_for", lambda ctx, name: None)
    for name in ("gone1.dat", "zok1.dat"):
        web.put("/api/upload/%s?null_obsid=true" % name, b"x", headers=bearer(), status=201,
                content_type="application/octet-stream")
    os.chmod(store_dir, 0o755)
    os.unlink(os.path.join(store_dir, "gone1.dat"))
    standing.create(ctx(), "all", '{"name-matches": "%.dat"}', "penn")
    assert standing.sweep(ctx()) == {"all": 1}
    assert [t.file_name for t in tasks.Task.select().where(
        tasks.Task.kind == "copy_to_librarian")] == ["zok1.dat"]


def test_remote_path_must_end_in_the_file_name(app, web, monkeypatch):
    import copies
    from conftest import api, bearer

    monkeypatch.setattr(copies, "client_for", lambda ctx, name: None)
    web.put("/api/upload/f1.dat?null_obsid=true", b"x", headers=bearer(), status=201,
            content_type="application/octet-stream")
    msg = api(web, "launch_file_copy", status=400, file_name="f1.dat", connection_name="b",
              remote_store_path="other.dat")["message"]
    assert "must end in the file's name" in msg


def test_a_copy_over_its_connections_copies_in_flight_waits_uncounted(app, monkeypatch):
    import copies

    context = ctx()
    monkeypatch.setitem(context.settings.connections, "peer",
                        {"url": "http://127.0.0.1:9/", "copies_in_flight": 1})
    ran = []

    @tasks.handler("test_copy_slot")
    def copy_slot(ctx_, task, args):
        with copies.slot(ctx_, "peer"):
            ran.append(task.id)

    task = tasks.enqueue(context, "test_copy_slot", {})
    t0 = models.utcnow()
    with copies.slot(context, "peer"):  # another copy to peer is in flight
        assert tasks.run_until_empty(context, now=t0) == 1
        row = tasks.Task.get_by_id(task.id)
        assert (row.state, row.attempts, row.last_error) == ("pending", 0, None)
        assert row.next_attempt == t0 + datetime.timedelta(seconds=copies.WAIT_FOR_SLOT_SECONDS)
        with copies.slot(context, "other"):  # other connections are not held up
            pass
    assert ran == []
    later = t0 + datetime.timedelta(seconds=2)
    assert tasks.run_until_empty(context, now=later) == 1
    row = tasks.Task.get_by_id(task.id)
    assert (row.state, row.attempts, ran) == ("done", 1, [task.id])


def test_an_idle_worker_takes_a_task_queued_here_at_once_and_one_due_soon_when_due(
        app, tmp_path):
    """Workers wait on the queue of their process, not a fixed sleep: with
    an idle interval of a minute, a task queued here runs within a second,
    and one queued to be due in 0.3 s runs when it is due."""
    import threading
    import time

    log = tmp_path / "log"
    stop = threading.Event()
    worker = threading.Thread(target=tasks.work, args=(ctx(), "w", stop), kwargs={"idle": 60})
    worker.start()
    try:
        time.sleep(0.3)  # idle now, for a minute unless something wakes it
        first = tasks.enqueue(ctx(), "test_record", {"log": str(log)})
        later = tasks.enqueue(ctx(), "test_record", {"log": str(log)}, delay=0.3)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and len(log.read_text().split()
                                                  if log.exists() else []) < 2:
            time.sleep(0.02)
        assert log.read_text().split() == [str(first.id), str(later.id)]
        assert tasks.Task.get_by_id(later.id).started >= tasks.Task.get_by_id(
            later.id).next_attempt
    finally:
        stop.set()
        worker.join(5)
    assert not worker.is_alive()  # stop is seen while idle
