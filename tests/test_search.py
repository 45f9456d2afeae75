"""The search language on a catalogue whose answers are known by
construction, through the `search` operation, on SQLite and PostgreSQL."""

import datetime
import json

import pytest

import models
import search
from conftest import QueryCounter, api

A, B, C = "zen.1000.a.uv", "zen.1000.b.uvh5", "zen.1001.a.uv"
BIG, NOTES, OLD = "zen_2000_x.uv", "notes%.txt", "obs3000.dat"
ALL = {A, B, C, BIG, NOTES, OLD}


@pytest.fixture
def catalogue(app, tmp_path):
    """Two stores, two sessions, four observations (one without a stop time
    or LST, one without a session), six files (one without an observation,
    one ten days old, one of 1 TiB, two without instances)."""
    main = models.Store.get(models.Store.name == "main")
    second = models.Store.create(name="second", ssh_host="h2", path_prefix=str(tmp_path / "s2"))
    models.ObservingSession.insert_many([
        {"id": 1000, "start_time_jd": 2458000.0, "stop_time_jd": 2458000.5},
        {"id": 2000, "start_time_jd": 2458001.0, "stop_time_jd": 2458001.5}]).execute()
    models.Observation.insert_many([
        {"obsid": 1000, "start_time_jd": 2458000.1, "stop_time_jd": 2458000.2,
         "start_lst_hr": 1.0, "session": 1000},
        {"obsid": 1001, "start_time_jd": 2458000.3, "stop_time_jd": 2458000.4,
         "start_lst_hr": 2.0, "session": 1000},
        {"obsid": 2000, "start_time_jd": 2458001.1, "stop_time_jd": None,
         "start_lst_hr": None, "session": 2000},
        {"obsid": 3000, "start_time_jd": 2458002.0, "stop_time_jd": 2458002.1,
         "start_lst_hr": 23.5, "session": None}]).execute()
    now = models.utcnow()
    md5 = "d41d8cd98f00b204e9800998ecf8427e"

    def f(name, type, obsid, size, source="rtp", age_days=0):
        return {"name": name, "type": type, "observation": obsid, "size": size, "md5": md5,
                "source": source, "create_time": now - datetime.timedelta(days=age_days)}

    models.File.insert_many([
        f(A, "uv", 1000, 100), f(B, "uvh5", 1000, 200), f(C, "uv", 1001, 300),
        f(BIG, "uv", 2000, 2**40), f(NOTES, "txt", None, 5, source="ann"),
        f(OLD, "dat", 3000, 7, source="ann", age_days=10)]).execute()
    models.FileInstance.insert_many([
        {"store": main, "parent_dirs": "d", "file": A},
        {"store": second, "parent_dirs": "d", "file": A},
        {"store": main, "parent_dirs": "", "file": B},
        {"store": main, "parent_dirs": "x/y", "file": C},
        {"store": second, "parent_dirs": "", "file": NOTES}]).execute()
    models.FileEvent.record(C, "qa", {"ok": True})
    return app


def names(web, query, **extra):
    text = query if isinstance(query, str) else json.dumps(query)
    reply = api(web, "search", auth="reader", search=text, output_format="file-listing-json",
                **extra)
    return {r["name"] for r in reply["results"]}


FILE_CASES = [
    ({"name-is-exactly": A}, {A}),
    ({"name-is-not": A}, ALL - {A}),
    ({"name-matches": "zen.1000.%"}, {A, B}),
    ({"name-matches": "zen_1000%"}, {A, B}),            # _ is one character
    ({"name-matches": "zen.100_.a.uv"}, {A, C}),
    ({"name-matches": "notes%.txt"}, {NOTES}),
    ({"name-matches": "ZEN.%"}, set()),                 # LIKE is case-sensitive
    ({"type-is-exactly": "uv"}, {A, C, BIG}),
    ({"source-is-not": "ann"}, {A, B, C, BIG}),
    ({"size-greater-than": 299}, {C, BIG}),
    ({"size-less-than": 100}, {NOTES, OLD}),
    ({"size-in-range": [100, 200]}, {A, B}),            # inclusive ends
    ({"size-not-in-range": [100, 200]}, ALL - {A, B}),
    ({"size-is-exactly": 2**40}, {BIG}),
    ({"obsid-is-exactly": 1000}, {A, B}),
    ({"obsid-is-not": 1000}, {C, BIG, OLD}),            # NULL obsid matches neither
    ({"obsid-in-range": [1000, 2000]}, {A, B, C, BIG}),
    ({"num-instances-is-exactly": 2}, {A}),
    ({"num-instances-less-than": 1}, {BIG, OLD}),
    ({"num-instances-greater-than": 0}, {A, B, C, NOTES}),
    ({"num-instances-greater-than": 1}, {A}),
    ({"num-instances-in-range": [1, 1]}, {B, C, NOTES}),
    ({"start-time-jd-in-range": [2458000.1, 2458000.3]}, {A, B, C}),
    ({"start-time-jd-greater-than": 2458001}, {BIG, OLD}),   # an int where a float goes
    ({"stop-time-jd-less-than": 2458000.25}, {A, B}),
    ({"stop-time-jd-not-in-range": [2458000.0, 2458000.5]}, {OLD}),
    ({"start-lst-hr-in-range": [0.5, 2.0]}, {A, B, C}),
    ({"start-lst-hr-greater-than": 23}, {OLD}),
    ({"session-id-is-exactly": 1000}, {A, B, C}),
    ({"session-id-is-not": 1000}, {BIG}),
    ({"not-older-than": 1}, ALL - {OLD}),
    ({"not-newer-than": 5}, {OLD}),
    ({"obs-matches": {"session-id-is-exactly": 1000}}, {A, B, C}),
    ({"obs-matches": {"num-files-greater-than": 1}}, {A, B}),
    ({"obsid-is-null": ""}, {NOTES}),
    ({"or": {}}, set()),
    ({"or": {"name-is-exactly": A, "size-is-exactly": 5}}, {A, NOTES}),
    ({"and": {"type-is-exactly": "uv", "size-less-than": 200}}, {A}),
    ({"none-of": {"obsid-is-exactly": 1000}}, ALL - {A, B}),
    ({"none-of": {"stop-time-jd-less-than": 2458000.25}}, ALL - {A, B}),
    ({"none-of": {"none-of": {"obsid-is-exactly": 1000}}}, {A, B}),
    ({"none-of": {}}, ALL),
    ({"always-true": None}, ALL),
    ({"always-false": 1}, set()),
    ({"type-is-exactly": "uv", "obsid-is-not": 1001}, {A, BIG}),
]


@pytest.mark.parametrize("query,expected", FILE_CASES, ids=[json.dumps(q) for q, _ in FILE_CASES])
def test_file_clause(catalogue, web, query, expected):
    assert names(web, query) == expected


def test_comments_and_repeated_keys(catalogue, web):
    text = ('{"type-is-exactly": "uv",   # only MIRIAD-ish\n'
            ' "type-is-exactly": "uv", "size-less-than": 200}  # and small')
    assert names(web, text) == {A}


def test_results_are_ordered_and_paginated(catalogue, web):
    reply = api(web, "search", search='{"always-true": 0}', output_format="file-listing-json")
    assert [r["name"] for r in reply["results"]] == sorted(ALL)
    page = api(web, "search", search='{"always-true": 0}', output_format="file-listing-json",
               limit=2, offset=1)
    assert [r["name"] for r in page["results"]] == sorted(ALL)[1:3]
    assert set(reply["results"][0]) == {"name", "type", "create_time", "obsid", "size", "md5"}


ERROR_CASES = [
    ('{"colour-is-exactly": "red"}', "unknown clause 'colour-is-exactly'"),
    ('{"nmae-matches": "zen.%"}', "unknown clause 'nmae-matches' for a file search "
                                  "(did you mean name-matches?); its attributes are "),
    ('{"obs-matches": {"start-time-jd-greather-than": 1}}',
     "did you mean start-time-jd-greater-than?"),
    ('{"name-greater-than": "a"}', "name is a string attribute, whose clauses are "
                                   "name-is-exactly, name-is-not, name-matches"),
    ('{"size-greater-than": "5"}', 'size-greater-than needs an integer, got "5"'),
    ('{"size-greater-than": 5.0}', "size-greater-than needs an integer, got 5.0"),
    ('{"size-greater-than": true}', "size-greater-than needs an integer, got true"),
    ('{"start-time-jd-greater-than": "x"}', "start-time-jd-greater-than needs a number"),
    ('{"start-time-jd-is-exactly": 2458000.1}', "start-time-jd is a float (no exact equality)"),
    ('{"name-matches": 5}', "name-matches needs a string, got 5"),
    ('{"size-in-range": [1]}', "size-in-range needs a list [low, high]"),
    ('{"and": [1]}', "and needs an object of clauses"),
    ('{"or": {"bogus": 1}}', "unknown clause 'bogus' for a file search"),
    ('{"obs-matches": {"name-matches": "x"}}', "unknown clause 'name-matches' for an "
                                               "observation search"),
    ('{"size-greater-than": 99999999999999999999999}', "64-bit integer"),
    ('{"start-time-jd-greater-than": NaN}', "not a number a search can use"),
    ('{"start-time-jd-greater-than": 1e400}', "needs a finite number"),
    ('{"not-older-than": 1e300}', "out of range"),
    ('{"name-is-exactly": "\\ud800"}', "not valid Unicode"),
    ('{"name-is-exactly": "a\\u0000"}', "NUL"),
    ('{"and": ' * 40 + "{}" + "}" * 40, "nested deeper than 16"),
    ('{"name-is-exactly": "a"', "not valid JSON"),
    ('["name-is-exactly"]', "must be a JSON object"),
    ("# only a comment", "the search is empty"),
]


@pytest.mark.parametrize("text,message", ERROR_CASES, ids=[t for t, _ in ERROR_CASES])
def test_bad_searches_are_400_naming_the_clause(catalogue, web, text, message):
    import re

    reply = api(web, "search", auth="reader", status=400, search=text,
                output_format="file-listing-json")
    assert reply["success"] is False
    assert re.search(message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                     .replace("?", r"\?"),
                     reply["message"]), reply["message"]


def test_the_deepest_search_allowed_runs_on_both_databases(catalogue, web):
    query = {"name-matches": "%"}
    for i in range(search.MAX_DEPTH - 1):  # each level an object of two clauses
        query = {"name-matches": "nothing-%d" % i, ("or" if i % 2 else "and"): query}
    api(web, "search", auth="reader", search=json.dumps(query),
        output_format="file-listing-json")
    api(web, "search", auth="reader", search=json.dumps({"or": query}), status=400,
        output_format="file-listing-json")


@pytest.mark.parametrize("fmt", ["file-listing-json", "instance-listing-json",
                                 "remote-instance-listing-json"])
def test_the_most_clauses_allowed_run_on_both_databases(catalogue, web, fmt):
    many = "{%s}" % ", ".join('"obsid-greater-than": %d' % i for i in range(search.MAX_CLAUSES - 2))
    api(web, "search", auth="reader", search=many, output_format=fmt)
    ors = '{"or": {%s}}' % ", ".join('"name-matches": "x%d%%"' % i
                                     for i in range(search.MAX_CLAUSES - 1))
    api(web, "search", auth="reader", search=ors, output_format=fmt)


def test_hash_inside_a_string_is_not_a_comment(catalogue, web):
    models.File.create(name="form #1.txt", type="txt", create_time=models.utcnow(), size=1,
                       md5="0" * 32, source="t")
    assert names(web, '{"name-matches": "%#%"}  # names with a hash') == {"form #1.txt"}


def test_backslash_is_not_an_escape_in_like(catalogue, web):
    models.File.create(name="a_b\\c.txt", type="txt", create_time=models.utcnow(), size=1,
                       md5="0" * 32, source="t")
    assert names(web, {"name-matches": "a_b\\%"}) == {"a_b\\c.txt"}
    assert names(web, {"name-matches": "%\\"}) == set()


def test_a_hundred_alternatives_are_fine(catalogue, web):
    text = json.dumps({"or": {"name-is-exactly": A}})[:-2] + "".join(
        ', "name-is-exactly": "n%d"' % i for i in range(150)) + "}}"
    assert names(web, text) == {A}


def test_like_patterns_never_reach_sql_as_text(catalogue, web):
    assert names(web, {"name-matches": "x' OR '1'='1"}) == set()
    assert models.File.select().count() == 6


def test_observation_and_session_searches(catalogue, web):
    def run(fmt, query, key):
        reply = api(web, "search", search=json.dumps(query), output_format=fmt)
        return [r[key] for r in reply["results"]]

    obs = "obs-listing-json"
    assert run(obs, {"duration-greater-than": 0.05}, "obsid") == [1000, 1001, 3000]
    assert run(obs, {"num-files-is-exactly": 2}, "obsid") == [1000]
    assert run(obs, {"total-size-greater-than": 1000}, "obsid") == [2000]
    assert run(obs, {"start-lst-hr-less-than": 1.5}, "obsid") == [1000]
    assert run(obs, {"session-id-is-not": 1000}, "obsid") == [2000]
    ses = "session-listing-json"
    assert run(ses, {"num-obs-is-exactly": 2}, "id") == [1000]
    assert run(ses, {"num-files-greater-than": 2}, "id") == [1000]
    assert run(ses, {"age-greater-than": 365}, "id") == [1000, 2000]
    assert run(ses, {"duration-in-range": [0.5, 0.5]}, "id") == [1000, 2000]
    assert run(ses, {"no-file-has-event": "qa"}, "id") == [2000]
    assert run(ses, {"session-id-is-exactly": 2000}, "id") == [2000]
    reply = api(web, "search", search='{"obsid-is-exactly": 3000}', output_format=obs)
    assert reply["results"] == [{"obsid": 3000, "start_time_jd": 2458002.0,
                                 "stop_time_jd": 2458002.1, "start_lst_hr": 23.5,
                                 "session_id": None}]


def test_instance_listing(catalogue, web, tmp_path, store_dir):
    reply = api(web, "search", search=json.dumps({"name-is-exactly": A}),
                output_format="instance-listing-json")
    assert reply["results"] == [
        {"store_name": "main", "store_ssh_host": models.Store.get_by_id(1).ssh_host,
         "parent_dirs": "d", "name": A, "deletion_policy": "disallowed",
         "full_path_on_store": store_dir + "/d/" + A, "verified_at": None,
         "verify_result": None},
        {"store_name": "second", "store_ssh_host": "h2", "parent_dirs": "d", "name": A,
         "deletion_policy": "disallowed", "full_path_on_store": str(tmp_path / "s2") + "/d/" + A,
         "verified_at": None, "verify_result": None}]


def test_bad_output_format_and_staging_not_yet(catalogue, web):
    msg = api(web, "search", status=400, search="{}", output_format="csv")["message"]
    assert "'output_format' must be one of" in msg
    msg = api(web, "search", status=400, search="{}",
              output_format="stage-the-files-json")["message"]
    assert "staging is not configured" in msg


@pytest.mark.parametrize("fmt,query", [
    ("file-listing-json", {"obs-matches": {"num-files-greater-than": 1},
                           "num-instances-greater-than": 1, "none-of": {"size-less-than": 3}}),
    ("instance-listing-json", {"session-id-is-exactly": 1000}),
    ("obs-listing-json", {"total-size-greater-than": 1, "duration-less-than": 1}),
    ("session-listing-json", {"no-file-has-event": "qa", "num-files-greater-than": 0,
                              "age-greater-than": 1}),
])
def test_each_search_is_one_sql_statement(catalogue, fmt, query):
    import librarian

    make_query, to_dict = librarian.SEARCH_OUTPUTS[fmt]
    with QueryCounter() as counter:
        results = [to_dict(r) for r in make_query(json.dumps(query))]
    assert results, "the query should match something"
    assert counter.count == 1
