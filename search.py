"""The JSON search language (SEARCH.md) compiled to one SQL statement.

`file_query(text)`, `observation_query(text)` and `session_query(text)`
parse a search and return a Peewee `SelectQuery` over `File`,
`Observation` or `ObservingSession`; nothing runs until the caller iterates
it. Derived attributes (`num-files`, `total-size`, `num-obs`, `age`, ...)
are correlated sub-queries or joins inside that one statement, never a
Python loop over rows; `num-instances` reads `file.num_instances`, which
database triggers keep exact (migration 002).

Every clause compiles to an expression that is strictly TRUE or FALSE, never
SQL NULL: an attribute clause is `attr IS NOT NULL AND attr <op> value`, so a
record lacking the attribute matches none of its clauses, negated ones
included, and `none-of` (SQL NOT) still holds for it.

Errors are `SearchError` (a `LibrarianError` with status 400) naming the
clause and what was wrong. Payload values only ever reach SQL as bound
parameters (LIKE patterns included).
"""

import collections
import contextlib
import difflib
import json
import math
import re
import sqlite3
import threading
import time

import peewee as pw

from errors import Transient
from models import (File, FileEvent, FileInstance, LibrarianError, Observation,
                    ObservingSession, RemoteInstance, db, from_unix, is_postgres)

UNIX_EPOCH_JD = 2440587.5
SECONDS_PER_DAY = 86400.0
MAX_CLAUSES = 1000
MAX_DEPTH = 16  # SQLite's SQL parser overflows its stack at 23 levels of and/or
INT64 = (-2**63, 2**63 - 1)
# A JSON string, or a comment running from # to the end of its line.
STRING_OR_COMMENT_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"|#[^\n]*')


class SearchError(LibrarianError):
    """A search that cannot be compiled; the message names the clause."""

    def __init__(self, message):
        super().__init__(400, message)


# ---------------------------------------------------------------------------
# Parsing and payload types
# ---------------------------------------------------------------------------

def parse(text):
    """The clauses of a search: `#` comments removed, then JSON that must be
    an object. Returns a list of (clause, payload) pairs (repeated keys are
    all kept: they must all hold)."""
    if isinstance(text, (dict, list)):
        text = json.dumps(text)
    if not isinstance(text, str):
        raise SearchError("a search must be JSON text")
    stripped = strip_comments(text)
    if not stripped.strip():
        raise SearchError("the search is empty: give a JSON object of clauses, e.g. "
                          '{"name-matches": "zen.%"}')
    try:
        value = json.loads(stripped, object_pairs_hook=lambda pairs: ("object", pairs),
                           parse_constant=_refuse_constant)
    except RecursionError:
        raise SearchError("the search is nested too deeply") from None
    except ValueError as e:
        raise SearchError("the search is not valid JSON: %s" % e) from None
    if not (isinstance(value, tuple) and value[0] == "object"):
        raise SearchError("a search must be a JSON object of clauses")
    _check_size(value, 0, [0])
    return value[1]


def strip_comments(text):
    """`text` without its comments: a `#` outside a JSON string starts one
    that runs to the end of the line (a `#` inside a name stays)."""
    return STRING_OR_COMMENT_RE.sub(lambda m: m.group(0) if m.group(0).startswith('"') else "",
                                    text)


def _refuse_constant(name):
    raise ValueError("%s is not a number a search can use" % name)


def _check_size(value, depth, count):
    """Refuse searches deeper than MAX_DEPTH or with more than MAX_CLAUSES
    clauses in all (they would exhaust the SQL parser, not help anyone)."""
    if depth > MAX_DEPTH:
        raise SearchError("the search is nested deeper than %d levels" % MAX_DEPTH)
    if isinstance(value, tuple) and value and value[0] == "object":
        count[0] += len(value[1])
        if count[0] > MAX_CLAUSES:
            raise SearchError("the search has more than %d clauses" % MAX_CLAUSES)
        for _, sub in value[1]:
            _check_size(sub, depth + 1, count)
    elif isinstance(value, list):
        for sub in value:
            _check_size(sub, depth + 1, count)


def _describe(value):
    if isinstance(value, tuple) and value and value[0] == "object":
        return "an object"
    return json.dumps(value)


def _int(clause, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise SearchError("%s needs an integer, got %s" % (clause, _describe(value)))
    if not INT64[0] <= value <= INT64[1]:
        raise SearchError("%s needs a 64-bit integer; %s is out of range" % (clause, value))
    return value


def _float(clause, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchError("%s needs a number, got %s" % (clause, _describe(value)))
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise SearchError("%s needs a finite number" % clause)
    return number


def _str(clause, value):
    if not isinstance(value, str):
        raise SearchError("%s needs a string, got %s" % (clause, _describe(value)))
    if "\0" in value:
        raise SearchError("%s: the text may not contain a NUL character" % clause)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise SearchError("%s: the text is not valid Unicode" % clause) from None
    return value


def _pairs(clause, value):
    if not (isinstance(value, tuple) and value and value[0] == "object"):
        raise SearchError("%s needs an object of clauses, got %s" % (clause, _describe(value)))
    return value[1]


def _range(clause, value, cast):
    if not isinstance(value, list) or len(value) != 2:
        raise SearchError("%s needs a list [low, high], got %s" % (clause, _describe(value)))
    lo, hi = cast(clause, value[0]), cast(clause, value[1])
    return min(lo, hi), max(lo, hi)  # reversed bounds are swapped, as the original did


# ---------------------------------------------------------------------------
# Attribute clauses
# ---------------------------------------------------------------------------

TRUE = pw.SQL("1 = 1")
FALSE = pw.SQL("1 = 0")


def like(expr, pattern):
    """`expr LIKE pattern` with the pattern bound as a parameter, the same
    on both databases: `%` any run, `_` one character, no escape character
    (PostgreSQL's default backslash escape is switched off; SQLite has
    none), case-sensitive (a pragma set in `models.open_database` makes
    SQLite's so). A node list, because Peewee renders its LIKE operator as
    GLOB on SQLite."""
    if is_postgres():
        return pw.NodeList((expr, pw.SQL("LIKE"), pattern, pw.SQL("ESCAPE ''")))
    return pw.NodeList((expr, pw.SQL("LIKE"), pattern))


def _known(expr, nullable):
    return expr.is_null(False) if nullable else None


def _both(guard, cond):
    return cond if guard is None else (guard & cond)


def attribute_clause(clause, attr, kind, expr, nullable, payload):
    """Compile `ATTR-OP` for one attribute of type `kind` ('string', 'int',
    'float'); returns an expression, or None if OP is not one of the type's
    operators."""
    op = clause[len(attr) + 1:]
    guard = _known(expr, nullable)
    if kind == "string":
        cast = _str
        ops = {"is-exactly": lambda v: expr == v, "is-not": lambda v: expr != v,
               "matches": lambda v: like(expr, v)}
    else:
        cast = _int if kind == "int" else _float
        ops = {"greater-than": lambda v: expr > v, "less-than": lambda v: expr < v}
        if kind == "int":
            ops.update({"is-exactly": lambda v: expr == v, "is-not": lambda v: expr != v})
        if op in ("in-range", "not-in-range"):
            lo, hi = _range(clause, payload, cast)
            inside = (expr >= lo) & (expr <= hi)
            return _both(guard, inside if op == "in-range" else ~inside)
    if op not in ops:
        return None
    return _both(guard, ops[op](cast(clause, payload)))


def _now_unix():
    return time.time()


def _now_jd():
    return _now_unix() / SECONDS_PER_DAY + UNIX_EPOCH_JD


# ---------------------------------------------------------------------------
# The three kinds of record
# ---------------------------------------------------------------------------

JOIN_GROUP = 32  # clauses joined in one parenthesised list


def _join(conds, glue, empty):
    """`conds` joined by `glue` (' AND ' / ' OR '): in flat, parenthesised
    lists of at most JOIN_GROUP, lists of those lists beyond. (Nested
    binary expressions would nest SQL parentheses a hundred deep for a
    hundred clauses; one flat list of a thousand is an expression tree a
    thousand deep to SQLite, past its limit.) `empty` when there are none."""
    if not conds:
        return empty
    if len(conds) == 1:
        return conds[0]
    if len(conds) > JOIN_GROUP:
        return _join([_join(conds[i:i + JOIN_GROUP], glue, empty)
                      for i in range(0, len(conds), JOIN_GROUP)], glue, empty)
    return pw.NodeList([pw.NodeList((c,), parens=True) for c in conds], glue=glue, parens=True)


def _count(query):
    return query.select(pw.fn.COUNT(pw.SQL("*")))


class Kind:
    """A kind of record that can be searched: its model, its attributes
    (`name -> (type, expression, nullable)`) and its extra clauses."""

    model = None

    def attributes(self):
        raise NotImplementedError

    def extra(self, clause, payload):
        """Compile a clause that is not an attribute clause, or None."""
        return None

    def base(self):
        """The SELECT the conditions are applied to."""
        return self.model.select()

    def compile(self, pairs):
        """AND of the compiled (clause, payload) pairs (TRUE when none)."""
        return _join([self.clause(c, p) for c, p in pairs], " AND ", TRUE)

    def any_of(self, clause, payload):
        """OR of the sub-clauses of `payload` (FALSE when none)."""
        return _join([self.clause(c, p) for c, p in _pairs(clause, payload)], " OR ", FALSE)

    def clause(self, clause, payload):
        clause = ALIASES.get(type(self), {}).get(clause, clause)
        if clause == "and":
            return self.compile(_pairs(clause, payload))
        if clause == "or":
            return self.any_of(clause, payload)
        if clause == "none-of":
            return pw.NodeList((pw.SQL("NOT"), pw.NodeList((self.any_of(clause, payload),),
                                                           parens=True)))
        if clause == "always-true":
            return TRUE
        if clause == "always-false":
            return FALSE
        extra = self.extra(clause, payload)
        if extra is not None:
            return extra
        attrs = self.attributes()
        for attr in sorted(attrs, key=len, reverse=True):
            if clause.startswith(attr + "-"):
                kind, expr, nullable = attrs[attr]
                compiled = attribute_clause(clause, attr, kind, expr, nullable, payload)
                if compiled is not None:
                    return compiled
                raise SearchError("unknown clause %r%s: %s is %s attribute, whose clauses "
                                  "are %s" % (clause, self.guess(clause), attr, {
                                      "string": "a string", "int": "an integer",
                                      "float": "a float (no exact equality)"}[kind],
                                      ", ".join("%s-%s" % (attr, op) for op in OPERATORS[kind])))
        raise SearchError("unknown clause %r for %s search%s; its attributes are %s, and its "
                          "other clauses %s" % (
                              clause, self.label, self.guess(clause), ", ".join(sorted(attrs)),
                              ", ".join(EXTRA[type(self)] + GENERIC)))

    def guess(self, clause):
        """' (did you mean NAME?)' for the clause of this kind closest to
        the unknown `clause`, if one is close; else ''."""
        close = difflib.get_close_matches(clause, self.clause_names(), n=1, cutoff=0.8)
        return " (did you mean %s?)" % close[0] if close else ""

    def clause_names(self):
        """Every clause this kind of search takes (for suggestions)."""
        return ([attr + "-" + op for attr, (kind, _, _) in self.attributes().items()
                 for op in OPERATORS[kind]] + EXTRA[type(self)] + GENERIC
                + list(ALIASES.get(type(self), {})))

    def query(self, text):
        """The SELECT of the records matching search `text`."""
        return self.base().where(self.compile(parse(text)))


class FileKind(Kind):
    model = File
    label = "a file"

    def attributes(self):
        return {
            "name": ("string", File.name, False),
            "type": ("string", File.type, False),
            "source": ("string", File.source, False),
            "size": ("int", File.size, False),
            "obsid": ("int", File.observation, True),
            "num-instances": ("int", File.num_instances, False),
            "num-remote-instances": ("int", _count(RemoteInstance.select().where(
                RemoteInstance.file == File.name)), False),
            "start-time-jd": ("float", Observation.start_time_jd, True),
            "stop-time-jd": ("float", Observation.stop_time_jd, True),
            "start-lst-hr": ("float", Observation.start_lst_hr, True),
            "session-id": ("int", Observation.session, True),
        }

    def extra(self, clause, payload):
        if clause == "not-older-than":
            return File.create_time >= _days_ago(clause, payload)
        if clause == "not-newer-than":
            return File.create_time <= _days_ago(clause, payload)
        if clause == "obsid-is-null":
            return File.observation.is_null(True)
        if clause == "has-remote-instance-at":
            return pw.fn.EXISTS(RemoteInstance.select(pw.SQL("1")).where(
                (RemoteInstance.file == File.name)
                & (RemoteInstance.librarian == _str(clause, payload))))
        if clause == "obs-matches":
            matching = ObservationKind().embedded(clause, payload)
            return File.observation.is_null(False) & File.observation.in_(
                matching.select(Observation.obsid))
        return None

    def base(self):
        return (File.select().join(Observation, pw.JOIN.LEFT_OUTER,
                                   on=(File.observation == Observation.obsid)))


def _days_ago(clause, payload):
    """The UTC time (naive, whole seconds) `payload` days before now."""
    try:
        return from_unix(int(_now_unix() - _float(clause, payload) * SECONDS_PER_DAY))
    except (OverflowError, ValueError, OSError):
        raise SearchError("%s: %s days is out of range" % (clause, payload)) from None


class ObservationKind(Kind):
    model = Observation
    label = "an observation"

    def attributes(self):
        files = File.select().where(File.observation == Observation.obsid)
        return {
            "obsid": ("int", Observation.obsid, False),
            "start-time-jd": ("float", Observation.start_time_jd, False),
            "stop-time-jd": ("float", Observation.stop_time_jd, True),
            "start-lst-hr": ("float", Observation.start_lst_hr, True),
            "session-id": ("int", Observation.session, True),
            "duration": ("float", Observation.stop_time_jd - Observation.start_time_jd, True),
            "num-files": ("int", _count(files), False),
            "total-size": ("int", files.select(pw.fn.COALESCE(pw.fn.SUM(File.size), 0)), False),
        }

    def embedded(self, clause, payload):
        """The SELECT of observations matching an embedded search (the
        object payload of `obs-matches`)."""
        return self.base().where(self.compile(_pairs(clause, payload)))


class SessionKind(Kind):
    model = ObservingSession
    label = "a session"

    def attributes(self):
        S = ObservingSession
        obs = Observation.select().where(Observation.session == S.id)
        files = (File.select().join(Observation, on=(File.observation == Observation.obsid))
                 .where(Observation.session == S.id))
        return {
            "session-id": ("int", S.id, False),
            "start-time-jd": ("float", S.start_time_jd, False),
            "stop-time-jd": ("float", S.stop_time_jd, False),
            "duration": ("float", S.stop_time_jd - S.start_time_jd, False),
            "age": ("float", _now_jd() - S.stop_time_jd, False),
            "num-obs": ("int", _count(obs), False),
            "num-files": ("int", _count(files), False),
        }

    def extra(self, clause, payload):
        if clause == "no-file-has-event":
            event_type = _str(clause, payload)
            with_event = (FileEvent.select(pw.SQL("1"))
                          .join(File, on=(FileEvent.file == File.name))
                          .join(Observation, on=(File.observation == Observation.obsid))
                          .where((Observation.session == ObservingSession.id)
                                 & (FileEvent.type == event_type)))
            return ~pw.fn.EXISTS(with_event)
        return None


FILES, OBSERVATIONS, SESSIONS = FileKind(), ObservationKind(), SessionKind()

GENERIC = ["and", "or", "none-of", "always-true", "always-false"]
OPERATORS = {"string": ["is-exactly", "is-not", "matches"],
             "int": ["is-exactly", "is-not", "greater-than", "less-than", "in-range",
                     "not-in-range"],
             "float": ["greater-than", "less-than", "in-range", "not-in-range"]}
EXTRA = {FileKind: ["not-older-than", "not-newer-than", "obs-matches", "obsid-is-null",
                   "has-remote-instance-at"],
         ObservationKind: [], SessionKind: ["no-file-has-event"]}
# Other names of clauses that the original Librarian accepted (its search
# documentation uses them), so that saved searches keep working.
ALIASES = {FileKind: {"name-like": "name-matches", "source-is": "source-is-exactly"}}


def clause_names(kind):
    """[(attribute, type, [clauses])] and the extra clauses of a kind of
    record: the reference shown next to the search forms."""
    attrs = [(name, typ, ["%s-%s" % (name, op) for op in OPERATORS[typ]])
             for name, (typ, _, _) in kind.attributes().items()]
    return attrs, EXTRA[type(kind)] + GENERIC


def file_query(text):
    """Files matching search `text`, ordered by name. Raises SearchError."""
    return FILES.query(text).order_by(File.name)


def observation_query(text):
    """Observations matching search `text`, ordered by obsid."""
    return OBSERVATIONS.query(text).order_by(Observation.obsid)


def session_query(text):
    """Sessions matching search `text`, ordered by id."""
    return SESSIONS.query(text).order_by(ObservingSession.id)


def remote_instance_query(text):
    """Remote instances of the files matching search `text`, ordered by
    file name then Librarian, as one statement."""
    names = FILES.query(text).select(File.name)
    return (RemoteInstance.select().where(RemoteInstance.file.in_(names))
            .order_by(RemoteInstance.file, RemoteInstance.librarian))


def instance_query(text):
    """Instances (with their stores) of the files matching search `text`,
    ordered by file name then store, as one statement."""
    from models import Store

    names = FILES.query(text).select(File.name)
    return (FileInstance.select(FileInstance, Store).join(Store)
            .where(FileInstance.file.in_(names))
            .order_by(FileInstance.file, Store.name, FileInstance.parent_dirs))


# ---------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------

_running = collections.Counter()  # caller -> searches running now, in this process
_running_lock = threading.Lock()


def limited_by(settings, caller):
    """`limited` for the source named `caller` under `[server]
    search_timeout_seconds` and `searches_per_caller` of `settings`: the
    one way every search of a caller is run (API, web pages, staging)."""
    return limited(caller, settings.server["search_timeout_seconds"],
                   settings.server["searches_per_caller"])


@contextlib.contextmanager
def limited(caller, seconds, per_caller):
    """Run the block's queries (materialise them inside it) in a transaction
    whose statements may take `seconds` in all: PostgreSQL's
    `statement_timeout`, SQLite's progress handler, which interrupts the
    statement. At most `per_caller` blocks of one caller (a source name)
    run at once. Raises `LibrarianError` 429 beyond that, and 503 naming
    `[server] search_timeout_seconds` when the time runs out."""
    with _running_lock:
        if _running[caller] >= per_caller:
            raise LibrarianError(429, "%s runs %d searches already, the most [server] "
                                 "searches_per_caller allows; wait for one to end"
                                 % (caller, _running[caller]))
        _running[caller] += 1
    try:
        with db.atomic():
            if is_postgres():
                db.execute_sql("SET LOCAL statement_timeout = %d" % max(1, seconds * 1000))
                yield
            else:
                deadline = time.monotonic() + seconds
                conn = db.connection()
                conn.set_progress_handler(lambda: time.monotonic() > deadline, 10000)
                try:
                    yield
                finally:
                    conn.set_progress_handler(None, 0)
    except (pw.OperationalError, sqlite3.OperationalError) as e:  # raw: from a cursor's rows
        text = str(e).lower()
        if "interrupted" not in text and "statement timeout" not in text:
            raise
        raise Transient("the search took longer than the %g s [server] search_timeout_seconds "
                        "allows; narrow it" % seconds) from None
    finally:
        with _running_lock:
            _running[caller] -= 1
            if not _running[caller]:
                del _running[caller]
