"""Sessions and the deletion interlock, through the API, on SQLite and
PostgreSQL. The deletion policy is tested here alone, as the original had
it (`deletion_min_other_copies = 0`); the other copies it also needs by
default are tested in test_integrity and test_remote_instances."""

import json
import os
import subprocess

import pytest

import models
from conftest import ctx, api, config_text, free_port


@pytest.fixture
def config_path(tmp_path, db_url, store_dir):
    path = tmp_path / "librarian.ini"
    path.write_text(config_text(db_url, store_dir, port=free_port(),
                                extra="[librarian]\ndeletion_min_other_copies = 0\n"))
    return str(path)


# ---------------------------------------------------------------------------
# Sessions
# ---------------------------------------------------------------------------

MINUTE = 1.0 / 1440.0


def night(first_jd=2459000.1, n=60, step_minutes=10, gap_after=30, gap_hours=5):
    """Observations of a synthetic night: `n` of 10 minutes each (minus 1 s),
    one every `step_minutes`, with one gap of `gap_hours` after the first
    `gap_after`. The smallest gap is 10 minutes, so the threshold is 200
    minutes and only the big gap splits."""
    rows, jd = [], first_jd
    for i in range(n):
        if i == gap_after:
            jd += gap_hours / 24.0
        rows.append({"obsid": 1300000000 + i * 600 + (18000 if i >= gap_after else 0),
                     "start_time_jd": jd, "stop_time_jd": jd + step_minutes * MINUTE - 1 / 86400.0,
                     "start_lst_hr": (i * 0.167) % 24})
        jd += step_minutes * MINUTE
    return rows


def test_a_night_with_one_large_gap_gives_two_sessions(app, web):
    rows = night()
    models.Observation.insert_many(rows).execute()
    reply = api(web, "assign_observing_sessions", auth="appender")
    first, second = rows[:30], rows[30:]
    assert reply["new_sessions"] == [
        {"id": first[0]["obsid"], "start_time_jd": first[0]["start_time_jd"],
         "stop_time_jd": first[-1]["stop_time_jd"], "n_obs": 30},
        {"id": second[0]["obsid"], "start_time_jd": second[0]["start_time_jd"],
         "stop_time_jd": second[-1]["stop_time_jd"], "n_obs": 30}]
    assert reply["unclosed_obsids"] == []
    by_session = {}
    for obs in models.Observation.select():
        by_session.setdefault(obs.session_id, []).append(obs.obsid)
    assert sorted(by_session[first[0]["obsid"]]) == [r["obsid"] for r in first]
    assert sorted(by_session[second[0]["obsid"]]) == [r["obsid"] for r in second]
    # Nothing left to do the second time.
    assert api(web, "assign_observing_sessions")["new_sessions"] == []


def test_small_gaps_never_split_below_one_minute_and_jd_range_limits(app, web):
    # 1-second spacing: 20 x 1 s is under a minute, so the threshold is one
    # minute and a 2-minute gap splits.
    base = 2459100.5
    starts = [base + i / 86400.0 for i in range(5)] + [base + (4 + 120) / 86400.0 + i / 86400.0
                                                        for i in range(3)]
    models.Observation.insert_many([{"obsid": 1400000000 + i, "start_time_jd": s,
                                     "stop_time_jd": s + 0.5 / 86400.0}
                                    for i, s in enumerate(starts)]).execute()
    models.Observation.create(obsid=1500000000, start_time_jd=2459200.5,
                              stop_time_jd=2459200.6)
    reply = api(web, "assign_observing_sessions", minimum_start_jd=2459100,
                maximum_start_jd=2459101)
    assert [s["n_obs"] for s in reply["new_sessions"]] == [5, 3]
    assert models.Observation.get_by_id(1500000000).session_id is None


def test_observation_inside_an_existing_session_joins_it(app, web):
    models.ObservingSession.create(id=1600000000, start_time_jd=2459300.0,
                                   stop_time_jd=2459300.4)
    models.Observation.create(obsid=1600000500, start_time_jd=2459300.2,
                              stop_time_jd=2459300.21)
    reply = api(web, "assign_observing_sessions")
    assert reply["new_sessions"] == []
    assert models.Observation.get_by_id(1600000500).session_id == 1600000000


def test_run_ending_without_stop_time_is_reported_not_closed(app, web):
    models.Observation.insert_many([
        {"obsid": 1700000000, "start_time_jd": 2459400.0, "stop_time_jd": 2459400.01},
        {"obsid": 1700000900, "start_time_jd": 2459400.01, "stop_time_jd": None}]).execute()
    reply = api(web, "assign_observing_sessions")
    assert reply["new_sessions"] == []
    assert reply["unclosed_obsids"] == [1700000000, 1700000900]
    assert models.ObservingSession.select().count() == 0


def test_minimum_start_jd_must_be_a_number(app, web):
    msg = api(web, "assign_observing_sessions", status=400, minimum_start_jd="x")["message"]
    assert "'minimum_start_jd' must be a number" in msg
    assert api(web, "assign_observing_sessions", auth="reader", status=403)["success"] is False


def test_describe_session_without_event(app, web, store_dir):
    models.ObservingSession.create(id=1800000000, start_time_jd=2459500.0,
                                   stop_time_jd=2459500.1)
    models.Observation.insert_many([
        {"obsid": 1800000000, "start_time_jd": 2459500.0, "stop_time_jd": 2459500.01,
         "session": 1800000000},
        {"obsid": 1800000900, "start_time_jd": 2459500.02, "stop_time_jd": None,
         "session": 1800000000},
        {"obsid": 1800001800, "start_time_jd": 2459500.05, "stop_time_jd": 2459500.06,
         "session": 1800000000}]).execute()
    store = models.Store.get()
    md5 = "0" * 32
    for name, obsid in (("zen.2459500.0.xx.HH.uv", 1800000000),
                        ("zen.2459500.0.yy.HH.uv", 1800000000),
                        ("zen.2459500.1.xx.HH.uv", 1800000900),
                        ("zen.2459500.2.xx.HH.uv", 1800001800)):
        models.File.create(name=name, type="uv", create_time=models.utcnow(), size=1, md5=md5,
                           source="correlator", observation=obsid)
        models.FileInstance.create(store=store, parent_dirs="2459500", file=name)
    models.File.create(name="other.uv", type="uv", create_time=models.utcnow(), size=1, md5=md5,
                       source="someone-else", observation=1800000000)

    reply = api(web, "describe_session_without_event", auth="reader", source="correlator",
                event_type="rtp_notified")
    assert reply["any_matching"] is True and reply["session_id"] == 1800000000
    info = reply["info"]
    assert [(i["pol"], i["store_path"]) for i in info] == [
        ("xx", "2459500/zen.2459500.0.xx.HH.uv"), ("yy", "2459500/zen.2459500.0.yy.HH.uv"),
        ("xx", "2459500/zen.2459500.1.xx.HH.uv"), ("xx", "2459500/zen.2459500.2.xx.HH.uv")]
    assert info[0]["date"] == 2459500.0 and info[0]["length"] == pytest.approx(0.01)
    assert info[2]["length"] == pytest.approx(0.025)   # median spacing of 0.02 and 0.03
    assert info[0]["path_prefix"] == store_dir and info[0]["host"] == store.ssh_host

    for name in ("zen.2459500.0.xx.HH.uv", "zen.2459500.0.yy.HH.uv", "zen.2459500.1.xx.HH.uv",
                 "zen.2459500.2.xx.HH.uv"):
        api(web, "create_file_event", file_name=name, type="rtp_notified", payload={})
    reply = api(web, "describe_session_without_event", source="correlator",
                event_type="rtp_notified")
    assert reply == {"success": True, "any_matching": False}


# ---------------------------------------------------------------------------
# Deletion
# ---------------------------------------------------------------------------

def put(web, path, body=b"abc", **query):
    query.setdefault("null_obsid", "true")
    url = "/api/upload/%s?%s" % (path, "&".join("%s=%s" % kv for kv in query.items()))
    from conftest import bearer

    return web.put(url, body, headers=bearer(), content_type="application/octet-stream",
                   status=201).json


@pytest.fixture
def two_stores(app, web, tmp_path):
    """Stores `main` and `other`; file x.dat on both (main allowed, other
    disallowed) and y.dat on main only (disallowed)."""
    other = tmp_path / "other"
    os.makedirs(other)
    models.Store.create(name="other", ssh_host="localhost", path_prefix=str(other))
    put(web, "keep/x.dat", b"x-bytes", deletion_policy="allowed")
    # A second instance of x.dat, placed on `other` as a copy would be.
    os.makedirs(other / "k")
    with open(other / "k" / "x.dat", "wb") as f:
        f.write(b"x-bytes")
    models.FileInstance.create(store=models.Store.get(models.Store.name == "other"),
                               parent_dirs="k", file="x.dat")
    put(web, "y.dat", b"y-bytes")
    return other


def instances():
    return sorted((i.store.name, i.name, i.deletion_policy) for i in models.FileInstance.select())


def test_only_allowed_instances_are_deleted_bytes_then_record(two_stores, web, store_dir):
    reply = api(web, "delete_file_instances", auth="writer", file_name="x.dat")
    assert reply == {"success": True, "n_deleted": 1, "n_kept": 1, "n_error": 0}
    assert not os.path.exists(os.path.join(store_dir, "keep", "x.dat"))
    assert os.path.exists(two_stores / "k" / "x.dat")
    assert instances() == [("main", "y.dat", 0), ("other", "x.dat", 0)]
    event = models.FileEvent.select().where(models.FileEvent.type == "delete_instance").get()
    assert json.loads(event.payload) == {"store_name": "main", "parent_dirs": "keep"}
    reply = api(web, "delete_file_instances", file_name="y.dat")
    assert (reply["n_deleted"], reply["n_kept"]) == (0, 1)
    assert os.path.exists(os.path.join(store_dir, "y.dat"))


def test_noop_mode_reports_and_changes_nothing(two_stores, web, store_dir):
    reply = api(web, "delete_file_instances", file_name="x.dat", mode="noop")
    assert (reply["n_deleted"], reply["n_kept"], reply["n_error"]) == (1, 1, 0)
    assert os.path.exists(os.path.join(store_dir, "keep", "x.dat"))
    assert len(instances()) == 3
    assert "one of standard, noop" in api(web, "delete_file_instances", status=400,
                                          file_name="x.dat", mode="yolo")["message"]


def test_restrict_to_store_and_set_one_policy(two_stores, web, store_dir):
    api(web, "set_one_file_deletion_policy", auth="writer", file_name="x.dat",
        deletion_policy="allowed", restrict_to_store="other")
    reply = api(web, "delete_file_instances", file_name="x.dat", restrict_to_store="other")
    assert (reply["n_deleted"], reply["n_kept"]) == (1, 1)
    assert not os.path.exists(two_stores / "k" / "x.dat")
    assert os.path.exists(os.path.join(store_dir, "keep", "x.dat"))
    changed = models.FileEvent.get(models.FileEvent.type == "instance_deletion_policy_changed")
    assert json.loads(changed.payload) == {"store_name": "other", "parent_dirs": "k",
                                           "old_policy": "disallowed", "new_policy": "allowed"}
    assert "no store named 'nowhere'" in api(web, "delete_file_instances", status=400,
                                             file_name="x.dat",
                                             restrict_to_store="nowhere")["message"]
    assert api(web, "set_one_file_deletion_policy", auth="appender", status=403,
               file_name="x.dat", deletion_policy="allowed")["success"] is False
    assert "must be one of allowed, disallowed" in api(
        web, "set_one_file_deletion_policy", status=400, file_name="x.dat",
        deletion_policy="sure")["message"]


def test_delete_matching_query_gives_stats_per_file(two_stores, web, store_dir):
    api(web, "set_one_file_deletion_policy", file_name="y.dat", deletion_policy="allowed")
    reply = api(web, "delete_file_instances_matching_query",
                query='{"name-matches": "%.dat"}', mode="standard", restrict_to_store="main")
    assert reply["stats"] == {"x.dat": {"n_deleted": 1, "n_kept": 1, "n_error": 0},
                              "y.dat": {"n_deleted": 1, "n_kept": 0, "n_error": 0}}
    assert instances() == [("other", "x.dat", 0)]


def _freeze(path):
    """Make a directory refuse deletions, even to root (immutable flag)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
    else:
        os.chmod(path, 0o555)


def _thaw(path):
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    os.chmod(path, 0o755)


def test_bytes_that_cannot_be_removed_keep_their_record(two_stores, web, store_dir):
    keep = os.path.join(store_dir, "keep")
    _freeze(keep)
    try:
        reply = api(web, "delete_file_instances", file_name="x.dat")
        assert (reply["n_deleted"], reply["n_kept"], reply["n_error"]) == (0, 1, 1)
        assert os.path.exists(os.path.join(keep, "x.dat"))
        assert ("main", "x.dat", 1) in instances()
        assert not models.FileEvent.select().where(
            models.FileEvent.type == "delete_instance").exists()
    finally:
        _thaw(keep)


def test_policy_is_checked_again_at_the_moment_of_deletion(two_stores, web, store_dir):
    """A policy changed to disallowed after the instances were listed (a
    concurrent request) is obeyed."""
    import deletion

    stale = [i for i in deletion._instances("x.dat") if i.store.name == "main"][0]
    assert stale.deletion_policy == models.DELETION_ALLOWED
    api(web, "set_one_file_deletion_policy", file_name="x.dat", deletion_policy="disallowed",
        restrict_to_store="main")
    assert deletion._delete_one(ctx(), stale, "standard") == (
        "n_kept", "its deletion policy is disallowed")
    assert os.path.exists(os.path.join(store_dir, "keep", "x.dat"))
    assert ("main", "x.dat", 0) in instances()


def test_empty_mode_is_not_standard(two_stores, web):
    assert "one of standard, noop" in api(web, "delete_file_instances", status=400,
                                          file_name="x.dat", mode="")["message"]
    assert "one of standard, noop" in api(web, "delete_file_instances_matching_query",
                                          status=400, query='{"name-is-exactly": "none"}',
                                          mode="x")["message"]


def test_a_session_grows_to_cover_an_observation_that_joins_it(app, web):
    models.ObservingSession.create(id=1610000000, start_time_jd=2459310.0,
                                   stop_time_jd=2459310.4)
    models.Observation.create(obsid=1610000500, start_time_jd=2459310.39,
                              stop_time_jd=2459310.45)
    api(web, "assign_observing_sessions")
    assert models.ObservingSession.get_by_id(1610000000).stop_time_jd == 2459310.45


def test_pipeline_query_skips_sessions_whose_files_have_no_instance_here(app, web):
    models.ObservingSession.insert_many([
        {"id": 1900000000, "start_time_jd": 2459600.0, "stop_time_jd": 2459600.1},
        {"id": 1900100000, "start_time_jd": 2459601.0, "stop_time_jd": 2459601.1}]).execute()
    models.Observation.insert_many([
        {"obsid": 1900000000, "start_time_jd": 2459600.0, "stop_time_jd": 2459600.1,
         "session": 1900000000},
        {"obsid": 1900100000, "start_time_jd": 2459601.0, "stop_time_jd": 2459601.1,
         "session": 1900100000}]).execute()
    for name, obsid in (("zen.remote.xx.uv", 1900000000), ("zen.here.xx.uv", 1900100000)):
        models.File.create(name=name, type="uv", create_time=models.utcnow(), size=1,
                           md5="0" * 32, source="correlator", observation=obsid)
    models.FileInstance.create(store=models.Store.get(), parent_dirs="", file="zen.here.xx.uv")
    reply = api(web, "describe_session_without_event", source="correlator", event_type="e")
    assert reply["session_id"] == 1900100000 and len(reply["info"]) == 1


def test_record_sets_with_impossible_julian_dates_are_refused(app, web):
    reply = api(web, "initiate_upload", status=400, upload_size=1, observations={
        "x": {"obsid": 1700000000, "start_time_jd": -1e9, "stop_time_jd": -999999999.99}})
    assert "not a Julian Date of an observation" in reply["message"]
    assert models.Observation.select().count() == 0


def test_bulk_ingest_leaves_the_planner_statistics_fresh(app, web, monkeypatch):
    """After a record set large enough to move autovacuum's threshold, the
    tables have statistics (PostgreSQL: analysed; the suite's database runs
    with whatever autovacuum does, so the check is on our own ANALYZE)."""
    monkeypatch.setattr(models, "STATISTICS_SECONDS", 0.0)
    sid = 1234567890
    files = {"bulk.%d.uvh5" % i: {"name": "bulk.%d.uvh5" % i, "type": "uvh5",
                                  "create_time": 1577836800, "obsid": sid, "size": i,
                                  "md5": "%032x" % i} for i in range(1200)}
    records = {"sessions": {str(sid): {"id": sid, "start_time_jd": 2458000.5,
                                       "stop_time_jd": 2458000.6}},
               "observations": {str(sid): {"obsid": sid, "start_time_jd": 2458000.5,
                                           "session_id": sid}},
               "files": files}
    analysed = []
    real = models.refresh_statistics
    monkeypatch.setattr(models, "refresh_statistics", lambda: analysed.append(real()))
    api(web, "initiate_upload", upload_size=0, records_only=True, **records)
    assert models.File.select().where(models.File.name.startswith("bulk.")).count() == 1200
    if models.is_postgres():
        assert "file" in analysed[-1]
        (count,) = models.db.execute_sql(
            "SELECT reltuples FROM pg_class WHERE oid = 'file'::regclass").fetchone()
        assert count >= 1200
    else:
        assert analysed == [[]]
