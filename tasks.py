"""Background work on a persistent queue: the `task` table.

A task has a `kind` (a registered handler), JSON `args`, a state (pending,
running, done, failed), attempts and the time of its next attempt. Workers
(threads of `librarian.py serve`, or `librarian.py worker` processes, on
this host or another, against one PostgreSQL database) claim tasks
atomically: on PostgreSQL with `SELECT ... FOR UPDATE SKIP LOCKED`, on
SQLite inside a write transaction (SQLite serialises writers, so run one
worker process there). A running task's worker heartbeats; a task whose
heartbeat is older than the timeout (its worker died) is put back to
pending. A failure is retried after an exponential back-off (`BASE_DELAY *
2**(attempts-1)`, capped at `MAX_DELAY` seconds) until `max_attempts`, then
the task is failed with its last error.

Handlers: `@handler("kind")` on `func(ctx, task, args)` (ctx: the
process's `context.Context`); `task.report(bytes)`
records progress. Whether a failure is retried is `errors.is_retryable`'s
decision: `Permanent` and the other kinds that retrying cannot fix fail
the task at once. Each attempt's error is kept (`errors`).
"""

import datetime
import json
import logging
import socket
import threading
import time
import traceback

import peewee as pw

import alerts
from errors import LibrarianError, is_retryable
from models import (BaseModel, db, is_postgres, process_is_gone, this_process, utcnow,
                    write_transaction)

log = logging.getLogger("librarian")

STATES = ("pending", "running", "done", "failed")
BASE_DELAY = 10.0        # seconds before the first retry
MAX_DELAY = 3600.0       # seconds: the back-off never waits longer
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 120.0    # a running task without a heartbeat this long is reclaimed
IDLE_SECONDS = 2.0       # an idle worker looks again at least this often (other processes' tasks)
SOON_SECONDS = 0.05      # after a task was queued here, the first look again if it was not seen

HANDLERS = {}
CANCEL_HOOKS = {}


def on_cancel(kind):
    """Register `func(ctx, args)` to run when a pending task of `kind` is
    cancelled (to release what its launch took, e.g. a staging lock)."""
    def register(func):
        CANCEL_HOOKS[kind] = func
        return func
    return register


def cancel(ctx, task_id, by):
    """Cancel a pending task (it becomes failed); True if it was pending."""
    with write_transaction():
        task = Task.get_or_none((Task.id == task_id) & (Task.state == "pending"))
        if task is None:
            return False
        (Task.update(state="failed", finished=utcnow(), last_error="cancelled by %s" % by)
         .where(Task.id == task_id).execute())
    hook = CANCEL_HOOKS.get(task.kind)
    if hook is not None:
        hook(ctx, json.loads(task.args))
    return True


class Deferred(Exception):
    """Raised by a handler that cannot start now (a limit of in-flight
    work): the task goes back to pending for `seconds`, the attempt not
    counted."""

    def __init__(self, seconds, why):
        super().__init__(why)
        self.seconds = seconds


def postpone(task, seconds, now=None):
    """Put a claimed task back to pending, due in `seconds`, uncounted."""
    now = now or utcnow()
    with write_transaction():
        (Task.update(state="pending", worker=None, attempts=Task.attempts - 1,
                     next_attempt=now + datetime.timedelta(seconds=seconds))
         .where((Task.id == task.id) & (Task.state == "running")).execute())


class Permanent(LibrarianError):
    """A failure that retrying cannot fix (bad arguments, unknown file)."""
    status = 400


def handler(kind):
    """Register `func(task, args)` as the handler of tasks of `kind`."""
    def register(func):
        HANDLERS[kind] = func
        return func
    return register


class Task(BaseModel):
    """One unit of background work; see the module docstring."""

    kind = pw.CharField(max_length=64)
    args = pw.TextField()
    state = pw.CharField(max_length=16, default="pending")
    attempts = pw.IntegerField(default=0)
    max_attempts = pw.IntegerField(default=5)
    next_attempt = pw.DateTimeField()
    created = pw.DateTimeField()
    started = pw.DateTimeField(null=True)
    finished = pw.DateTimeField(null=True)
    heartbeat = pw.DateTimeField(null=True)
    worker = pw.CharField(max_length=128, null=True)
    last_error = pw.TextField(null=True)
    errors = pw.TextField(null=True)  # every attempt's error, one per line
    progress_bytes = pw.BigIntegerField(default=0)
    # For copies: which file, and for which standing order (if any).
    file_name = pw.CharField(max_length=256, null=True)
    standing_order = pw.CharField(max_length=64, null=True)

    class Meta:
        table_name = "task"

    def remember(self, **values):
        """Keep `values` in the task's args for its later attempts (a copy's
        upload URL, so that a copy tried again resumes its upload)."""
        self.args = json.dumps(dict(json.loads(self.args), **values), sort_keys=True)
        with write_transaction():
            Task.update(args=self.args).where(Task.id == self.id).execute()

    def report(self, progress_bytes):
        """Record how many bytes of the work are done (and that the worker
        is alive)."""
        (Task.update(progress_bytes=progress_bytes, heartbeat=utcnow())
         .where(Task.id == self.id).execute())


def enqueue(ctx, kind, args, max_attempts=None, delay=0.0, file_name=None,
            standing_order=None):
    """Add a pending task of `kind` with JSON-able `args`, due in `delay`
    seconds, with `max_attempts` (default: the context's `[server]
    task_max_attempts`); returns it. Raises ValueError for an unknown kind."""
    if kind not in HANDLERS:
        raise ValueError("no handler for task kind %r" % kind)
    max_attempts = max_attempts or ctx.settings.server["task_max_attempts"]
    now = utcnow()
    task = Task.create(kind=kind, args=json.dumps(args), max_attempts=max_attempts,
                       next_attempt=now + datetime.timedelta(seconds=delay), created=now,
                       file_name=file_name, standing_order=standing_order)
    _nudge()
    return task


# Idle workers of this process wait on this for a task queued here (`_nudge`)
# instead of sleeping IDLE_SECONDS: a copy or a sweep starts at once.
_queued = threading.Condition()
_queued_count = [0]


def _nudge():
    """Wake this process's idle workers: a task was queued."""
    with _queued:
        _queued_count[0] += 1
        _queued.notify_all()


def _pause(stop, seen, seconds):
    """Wait up to `seconds` for a task queued here after `seen` (a count of
    `_nudge` calls) or for `stop`; returns (the count now, whether it
    changed). (`stop` is looked at every 0.25 s: nobody nudges for it.)"""
    deadline = time.monotonic() + seconds
    with _queued:
        while _queued_count[0] == seen and not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            _queued.wait(min(left, 0.25))
        return _queued_count[0], _queued_count[0] != seen


def next_due_seconds(now=None):
    """Seconds until the earliest pending task is due (0 when one is due
    now), or None when none is pending."""
    first = (Task.select(Task.next_attempt).where(Task.state == "pending")
             .order_by(Task.next_attempt).first())
    if first is None:
        return None
    return max(0.0, (first.next_attempt - (now or utcnow())).total_seconds())


def active_args(kind):
    """The args (dicts) of the tasks of `kind` pending or running: what the
    periodic chains look at before queueing a run of their own."""
    return [json.loads(a) for (a,) in Task.select(Task.args).where(
        (Task.kind == kind) & Task.state.in_(("pending", "running"))).tuples()]


def backoff(attempts, base=BASE_DELAY):
    """Seconds to wait before attempt `attempts + 1` (attempts >= 1), the
    first retry after `base` seconds."""
    return min(base * 2 ** (attempts - 1), MAX_DELAY)


def reclaim_stale(now=None):
    """Put back to pending the running tasks whose worker stopped
    heartbeating; returns how many."""
    now = now or utcnow()
    cutoff = now - datetime.timedelta(seconds=STALE_SECONDS)
    with write_transaction():
        return (Task.update(state="pending", worker=None, next_attempt=now,
                            last_error="worker stopped heartbeating; reclaimed")
                .where((Task.state == "running") & (Task.heartbeat < cutoff)).execute())


def reclaim_dead_local_workers():
    """Put back to pending the running tasks of workers on this host whose
    process is gone (a server killed and restarted resumes its work at
    once, instead of after STALE_SECONDS); returns how many."""
    prefix = socket.gethostname() + ":"
    dead = [task.id for task in Task.select(Task.id, Task.worker).where(
        (Task.state == "running") & Task.worker.startswith(prefix))
        if process_is_gone(task.worker)]
    if not dead:
        return 0
    with write_transaction():
        return (Task.update(state="pending", worker=None, next_attempt=utcnow(),
                            last_error="its worker process died; reclaimed")
                .where(Task.id.in_(dead) & (Task.state == "running")).execute())


def claim(worker_name, now=None):
    """Atomically take the next due pending task for `worker_name`, mark it
    running and count the attempt; None when there is none."""
    now = now or utcnow()
    due = (Task.state == "pending") & (Task.next_attempt <= now)
    if not Task.select().where(due).exists():
        return None  # the common case: look without taking SQLite's write lock
    with write_transaction():
        query = Task.select().where(due).order_by(Task.next_attempt, Task.id).limit(1)
        if is_postgres():
            query = query.for_update("FOR UPDATE SKIP LOCKED")
        task = query.first()
        if task is None:
            return None
        (Task.update(state="running", worker=worker_name, started=now, heartbeat=now,
                     attempts=Task.attempts + 1).where(Task.id == task.id).execute())
    return Task.get_by_id(task.id)


def finish(task, error=None, permanent=False, now=None, base_delay=BASE_DELAY):
    """Record the outcome of a claimed task: done, or a retry after the
    back-off (counted from `now`), or failed once attempts are exhausted or
    the error is permanent. Every attempt's error is kept in `errors`.
    Returns the new state."""
    now = now or utcnow()
    if error is None:
        fields = {"state": "done", "finished": now, "last_error": None}
    elif permanent or task.attempts >= task.max_attempts:
        fields = {"state": "failed", "finished": now, "last_error": error}
    else:
        fields = {"state": "pending", "last_error": error, "worker": None,
                  "next_attempt": now + datetime.timedelta(
                      seconds=backoff(task.attempts, base_delay))}
    if error is not None:
        line = "attempt %d at %s: %s" % (task.attempts, now.strftime("%Y-%m-%d %H:%M:%S"),
                                         " ".join(error.split())[:2000])
        fields["errors"] = task.errors + "\n" + line if task.errors else line
    with write_transaction():
        (Task.update(**fields)
         .where((Task.id == task.id) & (Task.state == "running")).execute())
    return fields["state"]


def run_one(ctx, task, now=None):
    """Run a claimed task's handler (`handler(ctx, task, args)`) with a
    heartbeat thread beside it, and record the outcome (`now`: the clock to
    count back-offs from)."""
    stop = threading.Event()
    base_delay = ctx.settings.server["task_retry_seconds"]

    def beat():
        while not stop.wait(HEARTBEAT_SECONDS):
            with db.connection_context():
                Task.update(heartbeat=utcnow()).where(Task.id == task.id).execute()

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        HANDLERS[task.kind](ctx, task, json.loads(task.args))
    except Deferred as e:
        postpone(task, e.seconds, now=now)
    except Exception as e:
        if is_retryable(e):  # the one place that decides whether a task tries again
            log.warning("task %d (%s) failed: %s\n%s", task.id, task.kind, e,
                        traceback.format_exc())
            state = finish(task, "%s: %s" % (type(e).__name__, e), now=now,
                           base_delay=base_delay)
        else:
            state = finish(task, str(e), permanent=True, now=now)
        if state == "failed":
            alerts.send(ctx, "task_failed", "task %d (%s%s) failed for good: %s" % (
                task.id, task.kind, " of " + task.file_name if task.file_name else "", e),
                task_id=task.id, task_kind=task.kind, file_name=task.file_name)
    else:
        finish(task, now=now)
    finally:
        stop.set()
        beater.join()


def worker_name(index):
    return "%s:%d" % (this_process(), index)


def work(ctx, name, stop, idle=IDLE_SECONDS):
    """A worker's loop: reclaim stale tasks (now and then), claim, run;
    until `stop` (an Event) is set. Idle, it waits until the next pending
    task is due, a task is queued in this process, or `idle` seconds have
    passed (tasks queued by other processes); after a task was queued here
    it looks again soon (the queueing transaction may not have committed
    when it woke), backing off to `idle`."""
    last_reclaim, seen, pause = 0.0, _queued_count[0], idle
    while not stop.is_set():
        due = None
        try:
            with db.connection_context():
                if time.monotonic() - last_reclaim > STALE_SECONDS / 2:
                    reclaim_stale()
                    last_reclaim = time.monotonic()
                due = next_due_seconds()  # (one indexed query when idle)
                task = claim(name) if due == 0 else None
                if task is not None:
                    run_one(ctx, task)
                    continue
        except Exception:
            log.error("worker %s: %s", name, traceback.format_exc())
        wait = pause if due is None else max(SOON_SECONDS, min(pause, due))
        seen, nudged = _pause(stop, seen, wait)
        pause = SOON_SECONDS if nudged else min(idle, pause * 2)


def start_workers(ctx, n, stop):
    """Start `n` worker threads; returns them."""
    threads = [threading.Thread(target=work, args=(ctx, worker_name(i), stop), daemon=True,
                                name="librarian-worker-%d" % i) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def run_until_empty(ctx, name="inline", now=None):
    """Run due tasks in this thread until none is left (tests, and the
    `worker --once` command). Returns how many ran."""
    count = 0
    while True:
        task = claim(name, now)
        if task is None:
            return count
        run_one(ctx, task, now)
        count += 1

