"""The web interface: HTML pages for people, on the existing deployment's
URLs.

Every page needs a logged-in session (see `webauth`); a page above the
person's level renders a page that says so. Lists are capped and paginated
(`?page=N`, `PAGE_SIZE` rows). State changes are POSTed forms carrying the
session's CSRF token, answered with a redirect. Markup lives in `views/`;
numbers are formatted here the way astronomers read them (sizes in human
units with exact bytes on hover, JD with five decimals, LST in hours).
"""

import datetime
import os
import re
import urllib.parse
import zoneinfo

import bottle
import peewee as pw
from bottle import HTTPError, redirect, request, response, template

import copies
import metrics
import models
import reconcile
import search
import staging
import standing
import tasks
import webauth
from models import (File, FileEvent, FileInstance, LibrarianError, Observation,
                    ObservingSession, RemoteInstance, Store)
from context import of_request

PAGE_SIZE = 50
RECENT = 10
UNIX_EPOCH_JD = 2440587.5

SAMPLE_SEARCHES = {
    "files": '{"name-matches": "zen.2458043.%", "num-instances-greater-than": 0}',
    "obs": '{"start-lst-hr-in-range": [18.0, 18.5]}',
    "sessions": '{"num-files-greater-than": 0}',
}
KINDS = {"files": search.FILES, "obs": search.OBSERVATIONS, "sessions": search.SESSIONS}
OUTPUT_FORMATS = {
    "files": ("List of files", "Raw text with file names", "Raw text with full instance paths"),
    "obs": ("List of observations",),
    "sessions": ("List of sessions",),
}


# ---------------------------------------------------------------------------
# Formatting for templates
# ---------------------------------------------------------------------------

def human_size(n):
    """'1.2 GiB' style text for a byte count (None -> '-')."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return ("%d %s" % (value, unit)) if unit == "B" else ("%.1f %s" % (value, unit))
        value /= 1024


def fmt_jd(jd):
    return "-" if jd is None else "%.5f" % jd


def jd_to_utc(jd):
    """Calendar UTC of a JD, to the second (no leap-second bookkeeping);
    '-' for none or for one outside the calendar."""
    if jd is None:
        return "-"
    try:
        dt = datetime.datetime(1970, 1, 1) + datetime.timedelta(days=jd - UNIX_EPOCH_JD)
    except (OverflowError, ValueError):
        return "-"
    return dt.strftime("%Y-%m-%d %H:%M:%S")


def fmt_lst(hours):
    return "-" if hours is None else "%.4f h" % hours


def fmt_time(dt):
    return dt.strftime("%Y-%m-%d %H:%M:%S") if dt else "-"


def fmt_days(days):
    """A duration given in days, in minutes below a day."""
    if days is None:
        return "-"
    return "%.1f min" % (days * 1440) if abs(days) < 1 else "%.3f d" % days


def fill_percent(total, used, free):
    """How full a store is, in percent, as `df` and the health page count
    it (`metrics.fill`), or None."""
    from stores.ssh import DiskUsage

    fraction = metrics.fill(DiskUsage(total, used, free)) if used is not None else None
    return None if fraction is None else 100.0 * fraction


HELPERS = {"human_size": human_size, "fmt_jd": fmt_jd, "jd_to_utc": jd_to_utc,
           "fill_percent": fill_percent,
           "fmt_lst": fmt_lst, "fmt_time": fmt_time, "fmt_days": fmt_days,
           "quote": lambda s: urllib.parse.quote(str(s), safe=""), "PAGE_SIZE": PAGE_SIZE}


# ---------------------------------------------------------------------------
# Page plumbing
# ---------------------------------------------------------------------------

def settings():
    return request.app.config["librarian.settings"]


def render(name, title, status=200, **values):
    """Render `views/NAME.tpl` inside the layout, with the helpers, the
    logged-in source and its CSRF token."""
    response.status = status
    source = values.pop("source", None) or webauth.session_source()
    return template(name, title=title, me=source, csrf=webauth.csrf_token(),
                    site_name=settings().server["displayed_site_name"], query_for=query_for,
                    **HELPERS, **values)


def query_for(page):
    """The current request's fields (query, and form on a POST) with
    `page` replaced: links to the neighbouring pages of a list."""
    fields = {k: v for k, v in request.query.decode().allitems() if k != "page"}
    if request.method == "POST":
        fields.update((k, v) for k, v in request.forms.decode().allitems()
                      if k not in ("page", "csrf_token"))
    fields["page"] = str(page)
    return urllib.parse.urlencode(fields)


def person(level="read-only"):
    """The logged-in source with at least `level`. Without a session:
    redirect to the login page, which comes back here afterwards. With too
    low a level: a page that says so (403)."""
    source = webauth.session_source()
    if source is None:
        redirect("/login?next=" + urllib.parse.quote(request.fullpath +
                                                     ("?" + request.query_string
                                                      if request.query_string else "")))
    if not source.allows(level):
        raise bottle.HTTPResponse(render("denied", "Not allowed", status=403, source=source,
                                         level=level), status=403)
    return source


def check_form_csrf():
    webauth.check_csrf(request.forms.getunicode("csrf_token"))


MAX_PAGE = 100000


def page_number():
    """The `page` query argument, within [1, MAX_PAGE]."""
    try:
        page = int(request.query.get("page", "1"))
    except ValueError:
        page = 1
    return min(max(page, 1), MAX_PAGE)


def paginate(query):
    """(rows of the current page, page number, whether there is a next
    page): fetches one row more than a page to know."""
    page = page_number()
    rows = list(query.limit(PAGE_SIZE + 1).offset((page - 1) * PAGE_SIZE))
    return rows[:PAGE_SIZE], page, len(rows) > PAGE_SIZE


SAFE_NEXT_RE = re.compile(r"^/(?![/\\])[^\x00-\x20\x7f\\]*$")


def safe_next(target):
    """`target` if it is a path on this site, else '/': it must start with
    one slash and hold no whitespace, control character or backslash
    (browsers and URL joiners drop some of those, turning `/\t/evil` into
    `//evil`)."""
    if isinstance(target, str) and SAFE_NEXT_RE.match(target):
        return target
    return "/"


def in_int64(n):
    return -2**63 <= n < 2**63


def store_usage(row):
    """(capacity, used, free) bytes of a store's file system, or Nones."""
    try:
        usage = of_request().open_store(row).disk_usage()
    except (OSError, LibrarianError):
        return None, None, None
    return usage.total, usage.used, usage.free


# ---------------------------------------------------------------------------
# Log in and out, home
# ---------------------------------------------------------------------------

def login_form():
    return render("login", "Log in", next=safe_next(request.query.get("next")), error=None,
                  login_token=webauth.login_csrf_token())


def login():
    webauth.check_login_csrf(request.forms.getunicode("login_token"))
    authenticator = request.forms.getunicode("authenticator") or ""
    target = safe_next(request.forms.getunicode("next"))
    source = request.app.config["librarian.auth_cache"].find(authenticator) \
        if authenticator else None
    if source is None:
        return render("login", "Log in", status=401, next=target,
                      error="That authenticator is not known here.",
                      login_token=webauth.login_csrf_token())
    webauth.start_session(source)
    redirect(target)


def logout():
    webauth.end_session()
    redirect("/login")


def home():
    source = person()
    zone = settings().server["telescope_timezone"]
    now = datetime.datetime.now(datetime.timezone.utc)
    sessions = (ObservingSession.select().order_by(ObservingSession.start_time_jd.desc())
                .limit(RECENT))
    files = File.select().order_by(File.create_time.desc(), File.name).limit(RECENT)
    stores = [(s, store_usage(s)) for s in Store.select().order_by(Store.name)]
    import librarian

    return render("home", settings().server["displayed_site_name"], source=source,
                  volume_alt=picture_alt("volume"),
                  version=librarian.__version__, now_utc=now.strftime("%Y-%m-%d %H:%M:%S"),
                  now_site=now.astimezone(zoneinfo.ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M:%S"),
                  zone=zone, sessions=list(sessions), files=list(files), stores=stores)


# ---------------------------------------------------------------------------
# Files, observations, sessions
# ---------------------------------------------------------------------------

def file_page(name):
    person()
    record = (File.select(File, Observation)
              .join(Observation, pw.JOIN.LEFT_OUTER, on=(File.observation == Observation.obsid))
              .where(File.name == name).first())
    if record is None:
        raise HTTPError(404, "No file named %r is known here." % name)
    instances = (FileInstance.select(FileInstance, Store).join(Store)
                 .where(FileInstance.file == name).order_by(Store.name))
    events = (FileEvent.select().where(FileEvent.file == name)
              .order_by(FileEvent.time.desc(), FileEvent.id.desc()).limit(PAGE_SIZE))
    remote = RemoteInstance.select().where(RemoteInstance.file == name) \
        .order_by(RemoteInstance.librarian)
    choice = quick_look_choice()
    look, why = quick_look(record, *choice)
    return render("file", name, file=record, instances=list(instances), events=list(events),
                  remote_instances=list(remote), look=look, no_look=why,
                  look_query="" if why else look_query(*choice))  # (why: the default shown)


def look_query(baseline, pol):
    """The query text of a quick-look choice (`quick_look_choice` reads it)."""
    query = {"baseline": "%d-%d" % baseline if baseline else None, "pol": pol}
    return urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})


def add_file_event(name):
    """POST /files/<name>/events (read-append and up, CSRF-checked): the
    form's event `type` and `payload` (a JSON object, empty for none) go
    into the file's log, by the API's rule (`models.record_caller_event`)."""
    person("read-append")
    check_form_csrf()
    import librarian

    text = (request.forms.getunicode("payload") or "").strip() or "{}"
    payload = librarian.parse_json(text, "the payload")  # the API's rules (depth, constants)
    if not isinstance(payload, dict):
        raise HTTPError(400, "The payload must be a JSON object, as {\"score\": 0.9}.")
    try:
        models.record_caller_event(name, (request.forms.getunicode("type") or "").strip(),
                                   payload)
    except LibrarianError as e:
        raise HTTPError(e.status, e.message[:1].upper() + e.message[1:] + ".") from None
    redirect("/files/" + urllib.parse.quote(name, safe="") + "#events")


def quick_look_choice():
    """(baseline as (ant1, ant2) or None, polarization or None) asked for
    in the query (`baseline=A-B`, `pol=xx`); 400 when malformed."""
    baseline, pol = request.query.get("baseline") or None, request.query.get("pol") or None
    if baseline is not None:
        match = re.fullmatch(r"(\d{1,9})-(\d{1,9})", baseline)
        if match is None:
            raise HTTPError(400, "baseline must be two antenna numbers, as 12-13")
        baseline = (int(match.group(1)), int(match.group(2)))
    if pol is not None and not re.fullmatch(r"[a-zA-Z]{1,4}|-?\d{1,2}", pol):
        raise HTTPError(400, "pol must be a polarization name, as xx")
    return baseline, pol


def quick_look(file, baseline, pol):
    """(the quick look of a file as `quicklook.look` gives it, or None; and
    when None, the reason in words) from a present instance here, cached by
    MD5 and choice: the second view reads nothing."""
    import quicklook
    import uvmeta

    try:
        inst, store, path = of_request().stores.present_instance(file.name)
    except LibrarianError as e:
        return None, "No quick look: %s" % e.message
    if inst is None:
        return None, "No quick look: no copy of the file is here."
    caller = webauth.session_source().name

    def looked(baseline, pol):
        return quicklook.cached((file.md5, baseline, pol),
                                lambda: store.quick_look(path, baseline, pol), caller)
    try:
        try:
            look, why = looked(baseline, pol), None
        except quicklook.QuickLookError as e:
            if baseline is None and pol is None:
                raise
            # What the file has instead, with the form to choose among it.
            look, why = looked(None, None), "%s; the default is shown." % e
            why = why[:1].upper() + why[1:]
    except (quicklook.QuickLookError, uvmeta.MetadataError) as e:
        return None, "No quick look: %s." % str(e).rstrip(".")
    except LibrarianError as e:
        return None, "No quick look: %s" % e.message
    if look is None:
        return None, "No quick look: this file is not visibility data (UVH5 or MIRIAD)."
    return look, why


PICTURE_SECONDS = 60.0  # a picture of the archive is drawn again at most this often
_pictures = {}  # name -> [monotonic time of its numbers, numbers, text alternative, PNG]


def _picture(name):
    """The cache entry of the picture `name` (of `pictures.ARCHIVE`): its
    numbers, read at most every PICTURE_SECONDS."""
    import time

    import pictures

    entry = _pictures.get(name)
    if entry is None or time.monotonic() - entry[0] > PICTURE_SECONDS:
        read, describe, _ = pictures.ARCHIVE[name]
        numbers = read(settings().server["telescope_timezone"])
        entry = _pictures[name] = [time.monotonic(), numbers, describe(numbers), None]
    return entry


def picture_alt(name):
    """The text alternative of the picture `name`, for its page."""
    return _picture(name)[2]


def picture_png(name):
    """GET /pictures/<name>.png: a picture of the archive, drawn by the
    reader process (matplotlib stays out of the server's memory)."""
    import pictures
    import uvmeta

    person()
    if name not in pictures.ARCHIVE:
        raise HTTPError(404, "No picture named %r." % name)
    entry = _picture(name)
    if entry[3] is None:
        entry[3] = uvmeta.run_reader("picture", pictures.ARCHIVE[name][2], entry[1])
    response.content_type = "image/png"
    response.set_header("Cache-Control", "private, max-age=%d" % PICTURE_SECONDS)
    return entry[3]


def waterfall_png(name):
    """GET /files/<name>/waterfall.png: the quick look's picture."""
    person()
    record = File.get_or_none(File.name == name)
    if record is None:
        raise HTTPError(404, "No file named %r is known here." % name)
    look, why = quick_look(record, *quick_look_choice())
    if look is None or why:
        raise HTTPError(404, why)
    response.content_type = "image/png"
    response.set_header("Cache-Control", "private, max-age=86400")  # a file's bytes never change
    return look["png"]


def observation_rows(query):
    """Observations with their file count and total size (bytes), in one
    statement (`n_files`, `size` on each row)."""
    files = File.select().where(File.observation == Observation.obsid)
    return query.select(Observation, files.select(pw.fn.COUNT(pw.SQL("*"))).alias("n_files"),
                        files.select(pw.fn.COALESCE(pw.fn.SUM(File.size), 0)).alias("size"))


def observations():
    person()
    rows, page, more = paginate(observation_rows(
        Observation.select().order_by(Observation.start_time_jd.desc(), Observation.obsid)))
    return render("observations", "Observations", observations=rows, page=page, more=more)


def observation_page(obsid):
    person()
    obs = Observation.get_or_none(Observation.obsid == obsid) if in_int64(obsid) else None
    if obs is None:
        raise HTTPError(404, "No observation %d is known here." % obsid)
    files = File.select().where(File.observation == obsid).order_by(File.name).limit(500)
    return render("observation", "Observation %d" % obsid, obs=obs, files=list(files))


def session_rows(query):
    """Sessions with their observation and file counts and total size, in
    one statement."""
    n_obs = (Observation.select(pw.fn.COUNT(pw.SQL("*")))
             .where(Observation.session == ObservingSession.id))
    files = (File.select().join(Observation, on=(File.observation == Observation.obsid))
             .where(Observation.session == ObservingSession.id))
    return query.select(ObservingSession, n_obs.alias("n_obs"),
                        files.select(pw.fn.COUNT(pw.SQL("*"))).alias("n_files"),
                        files.select(pw.fn.COALESCE(pw.fn.SUM(File.size), 0)).alias("size"))


def sessions_recent():
    person()
    rows = session_rows(ObservingSession.select()
                        .order_by(ObservingSession.start_time_jd.desc()).limit(30))
    return render("sessions", "Recent sessions", sessions=list(rows), page=1, more=False,
                  all_link=True, timeline_alt=picture_alt("sessions"))


def sessions_all():
    person()
    rows, page, more = paginate(session_rows(ObservingSession.select()
                                             .order_by(ObservingSession.start_time_jd.desc())))
    return render("sessions", "All sessions", sessions=rows, page=page, more=more,
                  all_link=False, timeline_alt=picture_alt("sessions"))


def session_page(session_id):
    person()
    found = list(session_rows(ObservingSession.select()
                              .where(ObservingSession.id == session_id))) \
        if in_int64(session_id) else []
    if not found:
        raise HTTPError(404, "No session %d is known here." % session_id)
    obs = observation_rows(Observation.select().where(Observation.session == session_id)
                           .order_by(Observation.start_time_jd).limit(1000))
    files = (File.select().join(Observation, on=(File.observation == Observation.obsid))
             .where(Observation.session == session_id)
             .order_by(Observation.start_time_jd, File.name).limit(1000))
    local = (File.select(pw.fn.COUNT(pw.SQL("*")))
             .join(Observation, on=(File.observation == Observation.obsid))
             .where((Observation.session == session_id) & (File.num_instances > 0)).scalar())
    return render("session", "Session %d" % session_id, session=found[0],
                  observations=list(obs), files=list(files), n_local=local)


# ---------------------------------------------------------------------------
# Stores
# ---------------------------------------------------------------------------

def stores_page():
    person()
    rows = [(s, store_usage(s)) for s in Store.select().order_by(Store.name)]
    return render("stores", "Stores", stores=rows)


def store_page(name):
    person()
    row = Store.get_or_none(Store.name == name)
    if row is None:
        raise HTTPError(404, "No store named %r is known here." % name)
    count, size = (FileInstance.select(pw.fn.COUNT(pw.SQL("*")),
                                       pw.fn.COALESCE(pw.fn.SUM(File.size), 0))
                   .join(File).where(FileInstance.store == row).tuples().get())
    import pictures

    return render("store", "Store " + name, store=row, usage=store_usage(row), n_instances=count,
                  instance_bytes=size, access=of_request().stores.describe_access(row),
                  problem=of_request().open_store(row).problem(),
                  space_alt=pictures.describe_space(pictures.store_history(row)))


def store_space_png(name):
    """GET /stores/<name>/space.png: the store's space over time, drawn by
    the reader process."""
    import pictures
    import uvmeta

    person()
    history = pictures.store_history(store_or_404(name))
    response.content_type = "image/png"
    return uvmeta.run_reader("picture", pictures.space_png, history)


def store_or_404(name):
    row = Store.get_or_none(Store.name == name)
    if row is None:
        raise HTTPError(404, "No store named %r is known here." % name)
    return row


def reconcile_page(name):
    """The store's last reconciliation (`reconcile`): counts, and the first
    `reconcile.KEPT` entries of each list."""
    person()
    row = store_or_404(name)
    states = [t.state for t in reconcile.queued(name)]
    return render("reconcile", "Reconciliation of " + name, store=row,
                  report=reconcile.last_report(row), kinds=reconcile.KINDS,
                  state="running" if "running" in states else "pending" if states else None,
                  interval=settings().librarian["reconcile_interval_hours"])


def reconcile_now(name):
    """POST: queue a reconciliation of the store now."""
    person("admin")
    check_form_csrf()
    store_or_404(name)
    reconcile.run_now(of_request(), name)
    redirect("/stores/%s/reconcile" % urllib.parse.quote(name, safe=""))


def set_store_availability(name, available):
    person("admin")
    check_form_csrf()
    with models.write_transaction():
        changed = Store.update(available=available).where(Store.name == name).execute()
    if not changed:
        raise HTTPError(404, "No store named %r is known here." % name)
    redirect("/stores/" + urllib.parse.quote(name, safe=""))


# ---------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------

def search_form(kind):
    def handler():
        person()
        return render("search", "Search " + {"files": "files", "obs": "observations",
                                             "sessions": "sessions"}[kind],
                      kind=kind, text=SAMPLE_SEARCHES[kind], formats=OUTPUT_FORMATS[kind],
                      error=None, clauses=search.clause_names(KINDS[kind]))
    return handler


def run_search():
    """/search: the search forms' target (GET or POST; fields `type`,
    `search`, `output_format`, and `page`)."""
    source = person()
    fields = request.forms if request.method == "POST" else request.query
    kind = fields.getunicode("type") or "files"
    text = fields.getunicode("search") or ""
    fmt = fields.getunicode("output_format") or OUTPUT_FORMATS.get(kind, ("",))[0]
    if kind not in OUTPUT_FORMATS:
        raise HTTPError(400, "type must be files, obs or sessions, not %r" % kind)
    if fmt not in OUTPUT_FORMATS[kind]:
        raise HTTPError(400, "output_format %r does not go with type %r" % (fmt, kind))
    try:
        with search.limited_by(settings(), source.name):
            return search_results(kind, text, fmt)
    except LibrarianError as e:
        if e.status != 400:
            raise HTTPError(e.status, e.message)
        return render("search", "Search", status=400, kind=kind, text=text,
                      formats=OUTPUT_FORMATS[kind], error=e.message,
                      clauses=search.clause_names(KINDS[kind]))


def search_results(kind, text, fmt):
    """The page of a search's results (`run_search`)."""
    if kind == "files":
        return file_results(text, fmt)
    if kind == "obs":
        query = search.observation_query(text)
        rows, page, more = paginate(observation_rows(query))
        return render("results_obs", "Observations found", observations=rows, page=page,
                      more=more, text=text, count=count_of(query))
    query = search.session_query(text)
    rows, page, more = paginate(session_rows(query))
    return render("results_sessions", "Sessions found", sessions=rows, page=page,
                  more=more, text=text, count=count_of(query))


def count_of(query):
    """How many rows a search matches (one COUNT statement)."""
    return query.order_by().count()


def file_results(text, fmt):
    query = search.file_query(text)
    if fmt == "Raw text with file names":
        response.content_type = "text/plain; charset=utf-8"
        return "".join(f.name + "\n" for f in query.select(File.name).limit(100000))
    if fmt == "Raw text with full instance paths":
        response.content_type = "text/plain; charset=utf-8"
        return "".join("%s:%s\n" % (i.store.ssh_host, i.full_path_on_store)
                       for i in search.instance_query(text).limit(100000))
    totals = query.select(pw.fn.COUNT(pw.SQL("*")), pw.fn.COALESCE(pw.fn.SUM(File.size), 0))
    count, size = (int(v) for v in totals.order_by().tuples().get())
    rows, page, more = paginate(query)
    return render("results_files", "Files found", files=rows, page=page, more=more, text=text,
                  count=count, total_size=size,
                  staging=bool(settings().staging["dest_prefix"]))


# ---------------------------------------------------------------------------
# Upload
# ---------------------------------------------------------------------------

def upload_page():
    person("read-append")
    chunk = settings().server["max_body_bytes"]
    import ingest

    return render("upload", "Upload", chunk=chunk, chunk_mib="%g MiB" % (chunk / 2**20),
                  say_null_obsid=ingest.SAY_NULL_OBSID)


STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def static(name):
    """/static/NAME: the vendored scripts (see static/)."""
    return bottle.static_file(name, root=STATIC, mimetype="auto")


# ---------------------------------------------------------------------------
# Tasks and standing orders
# ---------------------------------------------------------------------------

def tasks_page():
    person()
    Task = tasks.Task
    now = models.utcnow()

    def rows(state, order, limit):
        return list(Task.select().where(Task.state == state).order_by(*order).limit(limit))

    running = rows("running", (Task.started,), PAGE_SIZE)
    rates = {t.id: (t.progress_bytes / max((now - t.started).total_seconds(), 1.0))
             for t in running if t.started}
    return render("tasks", "Tasks", pending=rows("pending", (Task.next_attempt, Task.id),
                                                 PAGE_SIZE),
                  running=running, rates=rates,
                  done=rows("done", (Task.finished.desc(),), RECENT * 2),
                  failed=rows("failed", (Task.finished.desc(),), RECENT * 2))


def task_action(task_id, action):
    source = person("admin")
    check_form_csrf()
    Task = tasks.Task
    now = models.utcnow()
    with models.write_transaction():
        if action == "retry":
            changed = (Task.update(state="pending", next_attempt=now, attempts=0, finished=None)
                       .where((Task.id == task_id) & Task.state.in_(("failed", "pending")))
                       .execute())
        else:
            changed = None
    if action == "cancel":
        changed = tasks.cancel(of_request(), task_id, source.name)
    if not changed:
        raise HTTPError(409, "Task %d is not in a state that allows %s." % (task_id, action))
    redirect("/tasks")


def standing_orders_page():
    person()
    orders = standing.StandingOrder.select().order_by(standing.StandingOrder.name)
    return render("standing_orders", "Standing orders", orders=list(orders), error=None,
                  form={"name": "", "search": SAMPLE_SEARCHES["files"], "conn_name": ""},
                  mode=settings().librarian["standing_order_mode"])


def standing_order_page(name):
    person()
    order = standing.StandingOrder.get_or_none(standing.StandingOrder.name == name)
    if order is None:
        raise HTTPError(404, "No standing order named %r." % name)
    return render("standing_order", "Standing order " + name, order=order, error=None)


def standing_order_form(name=None):
    """POST /standing-orders (create) or /standing-orders/<name> (update)."""
    person("admin")
    check_form_csrf()
    fields = {k: request.forms.getunicode(k) or "" for k in ("name", "search", "conn_name")}
    try:
        if name is None:
            standing.create(of_request(), fields["name"], fields["search"],
                            fields["conn_name"])
            name = fields["name"]
        else:
            standing.update(of_request(), name, fields["search"] or None, fields["conn_name"] or None)
    except LibrarianError as e:
        if name is None or standing.StandingOrder.get_or_none(
                standing.StandingOrder.name == name) is None:
            orders = standing.StandingOrder.select().order_by(standing.StandingOrder.name)
            return render("standing_orders", "Standing orders", status=400, orders=list(orders),
                          error=e.message, form=fields,
                          mode=settings().librarian["standing_order_mode"])
        order = standing.get(name)
        return render("standing_order", "Standing order " + name, status=400, order=order,
                      error=e.message)
    redirect("/standing-orders/" + urllib.parse.quote(name, safe=""))


def connectivity_page():
    """Each connection pinged (with its stores), and each store's
    reachability and free space."""
    person()
    connections = [copies.check_connection(of_request(), n)
                   for n in copies.connection_names(of_request())]
    stores = [(s, of_request().open_store(s).problem(), store_usage(s))
              for s in Store.select().order_by(Store.name)]
    return render("connectivity", "Connectivity", connections=connections, stores=stores)


def stage_form():
    """POST /stage from the file search results: stage the search's files
    under the person's part of the staging area."""
    source = person("read-write")
    check_form_csrf()
    try:
        reply = staging.launch(of_request(), request.forms.getunicode("search") or "",
                               source.name,
                               request.forms.getunicode("dest") or "", source)
    except LibrarianError as e:
        raise HTTPError(e.status, e.message)
    return render("staged", "Staging", reply=reply)


def standing_order_delete(name):
    person("admin")
    check_form_csrf()
    try:
        standing.delete(name)
    except LibrarianError as e:
        raise HTTPError(404, e.message)
    redirect("/standing-orders")


# ---------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------

NAV = [("/", "Home", "read-only"), ("/search-files", "Files", "read-only"),
       ("/observations", "Observations", "read-only"), ("/sessions/recent", "Sessions", "read-only"),
       ("/stores", "Stores", "read-only"), ("/tasks", "Tasks", "read-only"),
       ("/standing-orders", "Standing orders", "read-only"),
       ("/connectivity", "Connectivity", "read-only"),
       ("/health", "Health", "read-only"),
       ("/upload", "Upload", "read-append")]


def favicon():
    response.status = 204
    return ""


def install(app):
    """Add the pages' routes to `app`."""
    app.route("/favicon.ico", "GET", favicon)
    app.route("/static/<name:re:[A-Za-z0-9._-]+>", "GET", static)
    app.route("/login", "GET", login_form)
    app.route("/login", "POST", login)
    app.route("/logout", "GET", logout)
    app.route("/", "GET", home)
    app.route("/files/<name>", "GET", file_page)
    app.route("/files/<name>/waterfall.png", "GET", waterfall_png)
    app.route("/files/<name>/events", "POST", add_file_event)
    app.route("/pictures/<name>.png", "GET", picture_png)
    app.route("/stores/<name>/space.png", "GET", store_space_png)
    app.route("/observations", "GET", observations)
    app.route("/observations/<obsid:int>", "GET", observation_page)
    app.route("/sessions/recent", "GET", sessions_recent)
    app.route("/sessions/all", "GET", sessions_all)
    app.route("/sessions/<session_id:int>", "GET", session_page)
    app.route("/stores", "GET", stores_page)
    app.route("/stores/<name>", "GET", store_page)
    app.route("/stores/<name>/reconcile", "GET", reconcile_page)
    app.route("/stores/<name>/reconcile", "POST", reconcile_now)
    app.route("/stores/<name>/make-available", "POST",
              lambda name: set_store_availability(name, True))
    app.route("/stores/<name>/make-unavailable", "POST",
              lambda name: set_store_availability(name, False))
    app.route("/search-files", "GET", search_form("files"))
    app.route("/search-obs", "GET", search_form("obs"))
    app.route("/search-sessions", "GET", search_form("sessions"))
    app.route("/search", ["GET", "POST"], run_search)
    app.route("/upload", "GET", upload_page)
    app.route("/stage", "POST", stage_form)
    app.route("/connectivity", "GET", connectivity_page)
    app.route("/health", "GET", metrics.health_page)
    app.route("/tasks", "GET", tasks_page)
    app.route("/tasks/<task_id:int>/retry", "POST", lambda task_id: task_action(task_id, "retry"))
    app.route("/tasks/<task_id:int>/cancel", "POST",
              lambda task_id: task_action(task_id, "cancel"))
    app.route("/standing-orders", "GET", standing_orders_page)
    app.route("/standing-orders", "POST", standing_order_form)
    app.route("/standing-orders/<name>", "GET", standing_order_page)
    app.route("/standing-orders/<name>", "POST", standing_order_form)
    app.route("/standing-orders/<name>/delete", "POST", standing_order_delete)
    bottle.SimpleTemplate.defaults["nav"] = NAV
