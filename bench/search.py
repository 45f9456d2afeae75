"""Benchmark: typical searches on a catalogue of a million files in
PostgreSQL.

    python bench/search.py [--pg postgresql://postgres@127.0.0.1:5432] [--keep] [--explain]

Builds (with COPY, in bounded chunks) 1,000 sessions, 100,000 observations,
1,000,000 files and 1,200,000 instances on two stores, plus events on a
tenth of the files, in a fresh database `librarian_bench`; then runs each
search seven times with results capped at 1,000 rows and prints the median
milliseconds and the number of results. Goal: every median under 200 ms.
`--explain` prints each search's plan.
"""

import argparse
import io
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psycopg2  # noqa: E402

import models  # noqa: E402
import search  # noqa: E402

N_SESSIONS, OBS_PER_SESSION, FILES_PER_OBS = 1000, 100, 10
FIRST_JD = 2458000.5
FIRST_OBSID = 1190000000
OBS_SECONDS = 600
DB_NAME = "librarian_bench"


def copy_rows(cur, table, columns, rows, chunk=200_000):
    """COPY rows (tuples) into `table`, `chunk` rows at a time."""
    buf, n = io.StringIO(), 0
    for row in rows:
        buf.write("\t".join("\\N" if v is None else str(v) for v in row) + "\n")
        n += 1
        if n % chunk == 0:
            buf.seek(0)
            cur.copy_expert("COPY %s (%s) FROM STDIN" % (table, ", ".join(columns)), buf)
            buf = io.StringIO()
    buf.seek(0)
    cur.copy_expert("COPY %s (%s) FROM STDIN" % (table, ", ".join(columns)), buf)
    return n


def observations():
    for s in range(N_SESSIONS):
        night_jd = FIRST_JD + s
        for k in range(OBS_PER_SESSION):
            start = night_jd + k * OBS_SECONDS / 86400.0
            obsid = FIRST_OBSID + s * 86400 + k * OBS_SECONDS
            lst = (s * 0.0657 + k * 0.1671) % 24.0
            yield obsid, start, start + (OBS_SECONDS - 1) / 86400.0, lst, \
                FIRST_OBSID + s * 86400


def file_rows():
    for s in range(N_SESSIONS):
        for k in range(OBS_PER_SESSION):
            obsid = FIRST_OBSID + s * 86400 + k * OBS_SECONDS
            jd = "%.5f" % (FIRST_JD + s + k * OBS_SECONDS / 86400.0)
            day, frac = jd.split(".")
            for j in range(FILES_PER_OBS):
                pol = ("xx", "yy", "xy", "yx", "xx", "yy", "xx", "yy", "xx", "yy")[j]
                kind = "uvh5" if j < 8 else "calfits"
                name = "zen.%s.%s.%s.HH%d.%s" % (day, frac, pol, j, kind)
                yield (name, kind, "2020-01-01 00:00:00", obsid, 1_000_000 + (obsid + j) % 977,
                       "%032x" % (obsid * 16 + j), "correlator")


def build(pg_base):
    admin = psycopg2.connect(pg_base + "/postgres")
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % DB_NAME)
        cur.execute("CREATE DATABASE %s" % DB_NAME)
    admin.close()
    url = "%s/%s" % (pg_base, DB_NAME)
    models.bind_database(url)
    from peewee_migrate import Router

    Router(models.db, migrate_dir=os.path.join(ROOT, "migrations")).run()
    models.close_database()

    t0 = time.perf_counter()
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("INSERT INTO store (name, ssh_host, path_prefix, available) VALUES "
                    "('onsite', 'pot1', '/data/a', true), ('offsite', 'nrao', '/data/b', true)")
        cur.execute("SELECT id FROM store ORDER BY name")
        offsite, onsite = [r[0] for r in cur.fetchall()]
        copy_rows(cur, "observing_session", ["id", "start_time_jd", "stop_time_jd"],
                  ((FIRST_OBSID + s * 86400, FIRST_JD + s,
                    FIRST_JD + s + (OBS_PER_SESSION * OBS_SECONDS - 1) / 86400.0)
                   for s in range(N_SESSIONS)))
        copy_rows(cur, "observation", ["obsid", "start_time_jd", "stop_time_jd", "start_lst_hr",
                                       "session_id"], observations())
        n_files = copy_rows(cur, "file", ["name", "type", "create_time", "obsid", "size", "md5",
                                          "source"], file_rows())
        # Files onsite, except 1% offloaded offsite and 1% known only by their records;
        # a fifth also offsite: 1.19M instances in all.
        copy_rows(cur, "file_instance", ["store", "parent_dirs", "name", "deletion_policy"],
                  ((onsite if i < 980_000 else offsite, f[0].split(".")[1], f[0], 0)
                   for i, f in enumerate(file_rows()) if i < 990_000))
        copy_rows(cur, "file_instance", ["store", "parent_dirs", "name", "deletion_policy"],
                  ((offsite, f[0].split(".")[1], f[0], 1) for i, f in enumerate(file_rows())
                   if i % 5 == 0 and i < 980_000 - 20_000))
        # The pipeline has seen the first 90% of the sessions.
        copy_rows(cur, "file_event", ["name", "time", "type", "payload"],
                  ((f[0], "2020-01-02 00:00:00", "rtp_notified", "{}")
                   for i, f in enumerate(file_rows()) if i % 10 == 0 and i < 900_000))
    with conn.cursor() as cur:
        conn.autocommit = True
        cur.execute("VACUUM ANALYZE")  # as autovacuum would have, in steady state
    conn.close()
    print("built %d files and their records in %.0f s" % (n_files, time.perf_counter() - t0))
    return url


def searches(first_obsid, first_jd, n_sessions, files_per_session=1000):
    """The ten typical searches, as (kind, label, query), for a catalogue
    of `n_sessions` nights from `first_jd` (sessions `first_obsid + s *
    86400`), laid out as `build` makes it; shared with `compare_v1.py`."""
    def night(fraction):
        return int(n_sessions * fraction)
    return [
        ("files", "name prefix", {"name-matches": "zen.%d.%%" % int(first_jd + night(0.5))}),
        ("files", "obsid range", {"obsid-in-range": [first_obsid + night(0.4) * 86400,
                                                     first_obsid + (night(0.4) + 1) * 86400]}),
        ("files", "LST range", {"start-lst-hr-in-range": [12.0, 12.05]}),
        ("files", "no instance here", {"num-instances-less-than": 1}),
        ("files", "obs-matches session", {"obs-matches": {
            "session-id-is-exactly": first_obsid + night(0.7) * 86400}}),
        ("files", "type and size", {"type-is-exactly": "calfits",
                                    "size-greater-than": 1_000_970}),
        ("files", "JD range, xx only", {"start-time-jd-in-range": [first_jd + night(0.6),
                                                                   first_jd + night(0.6) + 1],
                                        "name-matches": "%.xx.%"}),
        ("observations", "start JD range", {"start-time-jd-in-range": [
            first_jd + night(0.3), first_jd + night(0.3) + 2]}),
        ("sessions", "by num-files", {"num-files-greater-than": files_per_session - 1}),
        ("sessions", "no-file-has-event", {"no-file-has-event": "rtp_notified"}),
    ]


SEARCHES = searches(FIRST_OBSID, FIRST_JD, N_SESSIONS, OBS_PER_SESSION * FILES_PER_OBS)

QUERIES = {"files": search.file_query, "observations": search.observation_query,
           "sessions": search.session_query}


def run(url, explain):
    models.bind_database(url)
    print("%-12s %-22s %10s %8s" % ("kind", "search", "median ms", "results"))
    worst = 0.0
    for kind, label, query in SEARCHES:
        q = QUERIES[kind](json.dumps(query)).limit(1000)
        times, count = [], 0
        for _ in range(7):
            t0 = time.perf_counter()
            count = len(list(q.clone().tuples()))
            times.append((time.perf_counter() - t0) * 1000)
        median = statistics.median(times)
        worst = max(worst, median)
        print("%-12s %-22s %10.1f %8d" % (kind, label, median, count))
        if explain:
            sql, params = q.sql()
            for (line,) in models.db.execute_sql("EXPLAIN ANALYZE " + sql, params).fetchall():
                print("    " + line)
    print("slowest median: %.1f ms (goal < 200)" % worst)
    models.close_database()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--keep", action="store_true", help="keep the database afterwards")
    parser.add_argument("--reuse", action="store_true", help="reuse a kept database")
    parser.add_argument("--explain", action="store_true", help="print query plans")
    args = parser.parse_args()
    url = "%s/%s" % (args.pg, DB_NAME) if args.reuse else build(args.pg)
    try:
        run(url, args.explain)
    finally:
        if not args.keep:
            admin = psycopg2.connect(args.pg + "/postgres")
            admin.autocommit = True
            with admin.cursor() as cur:
                cur.execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % DB_NAME)
            admin.close()


if __name__ == "__main__":
    main()
