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

import functools
import json
import operator
import re
import time

import peewee as pw

from models import (File, FileEvent, FileInstance, LibrarianError, Observation,
                    ObservingSession, from_unix)

UNIX_EPOCH_JD = 2440587.5
SECONDS_PER_DAY = 86400.0
COMMENT_RE = re.compile(r"#[^\n]*")


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
    stripped = COMMENT_RE.sub("", text)
    if not stripped.strip():
        raise SearchError("the search is empty: give a JSON object of clauses, e.g. "
                          '{"name-matches": "zen.%"}')
    try:
        value = json.loads(stripped, object_pairs_hook=lambda pairs: ("object", pairs))
    except ValueError as e:
        raise SearchError("the search is not valid JSON: %s" % e) from None
    if not (isinstance(value, tuple) and value[0] == "object"):
        raise SearchError("a search must be a JSON object of clauses")
    return value[1]


def _describe(value):
    if isinstance(value, tuple) and value and value[0] == "object":
        return "an object"
    return json.dumps(value)


def _int(clause, value):
    if isinstance(value, bool) or not isinstance(value, int):
        raise SearchError("%s needs an integer, got %s" % (clause, _describe(value)))
    return value


def _float(clause, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchError("%s needs a number, got %s" % (clause, _describe(value)))
    return float(value)


def _str(clause, value):
    if not isinstance(value, str):
        raise SearchError("%s needs a string, got %s" % (clause, _describe(value)))
    return value


def _pairs(clause, value):
    if not (isinstance(value, tuple) and value and value[0] == "object"):
        raise SearchError("%s needs an object of clauses, got %s" % (clause, _describe(value)))
    return value[1]


def _range(clause, value, cast):
    if not isinstance(value, list) or len(value) != 2:
        raise SearchError("%s needs a list [low, high], got %s" % (clause, _describe(value)))
    lo, hi = cast(clause, value[0]), cast(clause, value[1])
    if lo > hi:
        raise SearchError("%s has low %s above high %s" % (clause, value[0], value[1]))
    return lo, hi


# ---------------------------------------------------------------------------
# Attribute clauses
# ---------------------------------------------------------------------------

TRUE = pw.SQL("1 = 1")
FALSE = pw.SQL("1 = 0")


def like(expr, pattern):
    """`expr LIKE pattern` with the pattern bound as a parameter. Written as
    a node list because Peewee renders its LIKE operator as GLOB on SQLite;
    SQLite's LIKE is made case-sensitive (as PostgreSQL's) by a pragma set
    in `models.open_database`."""
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

def _join(conds, op, empty):
    """Fold expressions with `op` (and/or); `empty` when there are none."""
    return functools.reduce(op, conds) if conds else empty


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
        return _join([self.clause(c, p) for c, p in pairs], operator.and_, TRUE)

    def any_of(self, clause, payload):
        """OR of the sub-clauses of `payload` (FALSE when none)."""
        return _join([self.clause(c, p) for c, p in _pairs(clause, payload)], operator.or_,
                     FALSE)

    def clause(self, clause, payload):
        if clause == "and":
            return self.compile(_pairs(clause, payload))
        if clause == "or":
            return self.any_of(clause, payload)
        if clause == "none-of":
            return ~self.any_of(clause, payload)
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
                raise SearchError("unknown clause %r: %s is %s attribute" % (
                    clause, attr, {"string": "a string", "int": "an integer",
                                   "float": "a float (no exact equality)"}[kind]))
        raise SearchError("unknown clause %r for a %s search" % (clause, self.label))

    def query(self, text):
        """The SELECT of the records matching search `text`."""
        return self.base().where(self.compile(parse(text)))


class FileKind(Kind):
    model = File
    label = "file"

    def attributes(self):
        return {
            "name": ("string", File.name, False),
            "type": ("string", File.type, False),
            "source": ("string", File.source, False),
            "size": ("int", File.size, False),
            "obsid": ("int", File.observation, True),
            "num-instances": ("int", File.num_instances, False),
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
    return from_unix(int(_now_unix() - _float(clause, payload) * SECONDS_PER_DAY))


class ObservationKind(Kind):
    model = Observation
    label = "observation"

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
    label = "session"

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


def file_query(text):
    """Files matching search `text`, ordered by name. Raises SearchError."""
    return FILES.query(text).order_by(File.name)


def observation_query(text):
    """Observations matching search `text`, ordered by obsid."""
    return OBSERVATIONS.query(text).order_by(Observation.obsid)


def session_query(text):
    """Sessions matching search `text`, ordered by id."""
    return SESSIONS.query(text).order_by(ObservingSession.id)


def instance_query(text):
    """Instances (with their stores) of the files matching search `text`,
    ordered by file name then store, as one statement."""
    from models import Store

    names = FILES.query(text).select(File.name)
    return (FileInstance.select(FileInstance, Store).join(Store)
            .where(FileInstance.file.in_(names))
            .order_by(FileInstance.file, Store.name, FileInstance.parent_dirs))
