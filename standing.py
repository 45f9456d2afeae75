"""Standing orders: saved file searches whose matches are copied, once
each, to another Librarian.

A sweep turns every order's matches into copy tasks, leaving out files that
already have the order's `standing_order_succeeded:NAME` event and files
with a copy for the order still queued or running: one SQL query per order.
Sweeps run as tasks: `standing_order_delay` seconds after an upload (so
that a burst of uploads makes one sweep) and every `standing_order_interval`
seconds. `standing_order_mode` is `normal`, `disabled` (no launches) or
`nighttime` (no launches from 08:00 to 20:00 in `[server]
telescope_timezone`).
"""

import datetime
import logging
import re
import zoneinfo

import peewee as pw

import copies
import search
import tasks
from models import BaseModel, File, FileEvent, LibrarianError, utcnow, write_transaction

log = logging.getLogger("librarian")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,38}$")  # event types hold 64 characters
SUCCEEDED = "standing_order_succeeded:"
DAY_HOURS = (8, 20)


class StandingOrder(BaseModel):
    """A saved file search and the connection its matches are copied to."""

    name = pw.CharField(max_length=64, unique=True)
    search = pw.TextField()
    conn_name = pw.CharField(max_length=64)
    created = pw.DateTimeField()

    class Meta:
        table_name = "standing_order"

    def to_dict(self):
        return {"name": self.name, "search": self.search, "conn_name": self.conn_name}


def _check(ctx, name, search_text, conn_name):
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise LibrarianError(400, "standing order name %r must be 1 to 39 letters, digits, "
                             "'.', '_' or '-'" % (name,))
    if search_text is not None:
        search.file_query(search_text)  # a SearchError names what is wrong
    if conn_name is not None:
        copies.client_for(ctx, conn_name)


def create(ctx, name, search_text, conn_name):
    """Save a new order; 400 on a bad name, search or connection, 409 on a
    taken name."""
    _check(ctx, name, search_text, conn_name)
    try:
        with write_transaction():
            order = StandingOrder.create(name=name, search=search_text, conn_name=conn_name,
                                         created=utcnow())
    except pw.IntegrityError:
        raise LibrarianError(409, "a standing order named %r exists already" % name) from None
    sweep_soon(ctx)
    return order


def get(name):
    order = StandingOrder.get_or_none(StandingOrder.name == name)
    if order is None:
        raise LibrarianError(400, "no standing order named %r" % name)
    return order


def update(ctx, name, search_text=None, conn_name=None):
    """Change an order's search and/or connection."""
    order = get(name)
    _check(ctx, name, search_text, conn_name)
    fields = {k: v for k, v in (("search", search_text), ("conn_name", conn_name))
              if v is not None}
    if fields:
        with write_transaction():
            StandingOrder.update(**fields).where(StandingOrder.id == order.id).execute()
        sweep_soon(ctx)


def delete(name):
    get(name)
    with write_transaction():
        StandingOrder.delete().where(StandingOrder.name == name).execute()


def launches_allowed(ctx, now_utc=None):
    """Whether the configured mode lets sweeps launch copies now."""
    mode = ctx.settings.librarian["standing_order_mode"]
    if mode == "disabled":
        return False
    if mode == "nighttime":
        zone = zoneinfo.ZoneInfo(ctx.settings.server["telescope_timezone"])
        now = (now_utc or datetime.datetime.now(datetime.timezone.utc)).astimezone(zone)
        return not DAY_HOURS[0] <= now.hour < DAY_HOURS[1]
    return True


def pending_for(order):
    """The files an order should copy now: matches that have an instance
    here, no success event for the order and no copy queued or running for
    it (one SQL statement)."""
    done = FileEvent.select(pw.SQL("1")).where((FileEvent.file == File.name)
                                               & (FileEvent.type == SUCCEEDED + order.name))
    queued = tasks.Task.select(pw.SQL("1")).where(
        (tasks.Task.standing_order == order.name) & (tasks.Task.file_name == File.name)
        & (tasks.Task.state.in_(("pending", "running"))))
    return (search.file_query(order.search).select(File.name)
            .where((File.num_instances > 0) & ~pw.fn.EXISTS(done) & ~pw.fn.EXISTS(queued)))


def sweep(ctx):
    """Queue the copies every order is owed; returns `{order: count}`."""
    if not launches_allowed(ctx):
        return {}
    queued = {}
    for order in StandingOrder.select().order_by(StandingOrder.name):
        queued[order.name] = 0
        # (The matches are read whole first: on SQLite, a cursor left open
        # while writing fails at once when another writer, such as the worker
        # that takes the first copy, is committing.)
        for f in list(pending_for(order)):
            try:
                copies.launch(ctx, f.name, order.conn_name, standing_order=order.name)
                queued[order.name] += 1
            except LibrarianError as e:  # one bad file must not stop the others
                log.warning("standing order %s: cannot copy %s: %s", order.name, f.name,
                            e.message)
    return queued


def schedule_sweep(ctx, delay):
    """Make sure a sweep runs within `delay` seconds: queue one unless a
    pending sweep is already due by then (a burst of uploads makes one)."""
    due_by = utcnow() + datetime.timedelta(seconds=delay)
    with write_transaction():
        exists = tasks.Task.select().where((tasks.Task.kind == "standing_order_sweep")
                                           & (tasks.Task.state == "pending")
                                           & (tasks.Task.next_attempt <= due_by)).exists()
        if not exists:
            tasks.enqueue(ctx, "standing_order_sweep", {}, delay=delay)


def sweep_soon(ctx):
    """Called when a file arrived or an order was made or changed: schedule
    a sweep after the batching delay, if there are orders at all."""
    if StandingOrder.select().exists():
        schedule_sweep(ctx, ctx.settings.librarian["standing_order_delay"])


def schedule_periodic(ctx):
    """Queue the next periodic sweep, if there are orders."""
    if StandingOrder.select().exists():
        schedule_sweep(ctx, ctx.settings.librarian["standing_order_interval"])


@tasks.handler("standing_order_sweep")
def sweep_task(ctx, task, args):
    """The sweep as a task; it schedules the next periodic one, whatever
    happens to this one."""
    try:
        sweep(ctx)
    finally:
        schedule_periodic(ctx)
