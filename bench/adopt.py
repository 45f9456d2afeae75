"""Benchmark: adopt an original (v1) Librarian's PostgreSQL database of a
million files into a fresh, migrated one.

    python bench/adopt.py [--pg postgresql://postgres@127.0.0.1:5432] [--files 1000000]
                          [--instances 1200000] [--events 3000000] [--batch 20000] [--keep]

Builds, in SQL (`generate_series`), a database `librarian_bench_v1` in the
v1 schema (tests/v1site.py, from V1-SITE.md, revision 464899566429): three
stores, a session per 1,000 files, an observation per 10, the files (1 % of
them without an obsid), their instances (all on one store, the first
fifth again on a second with deletion policy 1) and their events (a few
payloads not JSON). Then runs `librarian.py adopt-v1` into a fresh
database `librarian_bench_adopt` as a child process, sampling its resident
memory from /proc, and prints seconds and rows/s per table and in all, and
the memory at 10 %, 50 % and 100 % of the run. Goal: under 5 minutes on
two cores, memory flat.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import psycopg2  # noqa: E402

import v1site  # noqa: E402
from upload import memory_kb  # noqa: E402

V1_DB, OUR_DB = "librarian_bench_v1", "librarian_bench_adopt"
FIRST_JD, FIRST_OBSID = 2458000, 1190000000
OBS_PER_SESSION, FILES_PER_OBS = 100, 10

# File i: session s, observation k of it, file j of that; every 100th has no obsid.
S = "(i / %d)" % (OBS_PER_SESSION * FILES_PER_OBS)
K = "((i / %d) %% %d)" % (FILES_PER_OBS, OBS_PER_SESSION)
OBSID = "(%d + %s * 86400 + %s * 600)" % (FIRST_OBSID, S, K)
NAME = ("(CASE WHEN i %% 100 = 99 THEN 'misc.' || i || '.txt' ELSE 'zen.' || (%d + %s) || '.' "
        "|| lpad((%s * 600)::text, 5, '0') || '.HH' || (i %% %d) || '.uvh5' END)"
        % (FIRST_JD, S, K, FILES_PER_OBS))


def build_v1(cur, files, instances, events):
    """Fill the (empty) v1 schema; returns the rows made per table."""
    v1site.create(cur)
    sessions = -(-files // (OBS_PER_SESSION * FILES_PER_OBS))
    cur.execute("INSERT INTO store VALUES (1, 'onsite', 'pot1.karoo', '/data/onsite', NULL, "
                "true), (2, 'offsite', 'nrao.example.org', '/lustre/hera', "
                "'http://nrao.example.org/hera', true), (3, 'old', 'pot0', '/data/old', NULL, "
                "false)")
    cur.execute("INSERT INTO observing_session SELECT %d + s * 86400, %d.5 + s, %d.5 + s + "
                "%d / 86400.0 FROM generate_series(0, %d) s"
                % (FIRST_OBSID, FIRST_JD, FIRST_JD, OBS_PER_SESSION * 600 - 1, sessions - 1))
    cur.execute("INSERT INTO observation SELECT %d + s * 86400 + k * 600, %d.5 + s + k * 600 / "
                "86400.0, %d.5 + s + (k * 600 + 599) / 86400.0, mod((s * 0.0657 + k * 0.1671)"
                "::numeric, 24)::float8, %d + s * 86400 FROM generate_series(0, %d) s, "
                "generate_series(0, %d) k" % (FIRST_OBSID, FIRST_JD, FIRST_JD, FIRST_OBSID,
                                              sessions - 1, OBS_PER_SESSION - 1))
    cur.execute("INSERT INTO file SELECT %s, CASE WHEN i %% 100 = 99 THEN 'txt' ELSE 'uvh5' END, "
                "timestamp '2018-01-01' + i * interval '7 seconds', CASE WHEN i %% 100 = 99 "
                "THEN NULL ELSE %s END, 1000000 + i %% 977, md5(i::text), 'RTP' "
                "FROM generate_series(0, %d) i" % (NAME, OBSID, files - 1))
    second = max(instances - files, 0)
    cur.execute("INSERT INTO file_instance SELECT 1, (%d + %s)::text, %s, 0 FROM "
                "generate_series(0, %d) i" % (FIRST_JD, S, NAME, min(files, instances) - 1))
    cur.execute("INSERT INTO file_instance SELECT 2, (%d + %s)::text, %s, 1 FROM "
                "generate_series(0, %d) i" % (FIRST_JD, S, NAME, second - 1))
    cur.execute("INSERT INTO file_event SELECT e + 1, %s, timestamp '2018-01-01' + i * interval "
                "'7 seconds' + (e / %d) * interval '1.000123 seconds', (ARRAY['create_instance', "
                "'rtp_notified', 'qa_checked'])[1 + e / %d %% 3], CASE WHEN e %% 100000 = 7 THEN "
                "'legacy text ' || e WHEN e / %d %% 3 = 0 THEN '{\"store_name\": \"onsite\"}' "
                "ELSE '{\"score\": ' || (e %% 1000) / 1000.0 || '}' END FROM (SELECT e, e %% %d "
                "AS i FROM generate_series(0, %d) e) x"
                % (NAME, files, files, files, files, events - 1))
    cur.execute("INSERT INTO standing_order VALUES (1, 'to-nrao', '{\"name-matches\": "
                "\"zen.%%\"}', 'nrao'), (2, 'qa', '{\"type-is-exactly\": \"uvh5\"}', 'penn')")
    return {"store": 3, "observing_session": sessions, "observation": sessions * OBS_PER_SESSION,
            "file": files, "file_instance": instances, "file_event": events,
            "standing_order": 2}


def admin(pg, *statements):
    conn = psycopg2.connect(pg + "/postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
    conn.close()


def run_adoption(config, v1_url, batch):
    """Run `adopt-v1` as a child; returns (report, [(seconds, RSS kB)])."""
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "librarian.py"), "adopt-v1",
                             "--from", v1_url, "--config", config, "--json", "--batch",
                             str(batch)], stdout=subprocess.PIPE)
    start, samples = time.monotonic(), []
    while proc.poll() is None:
        try:
            rss = memory_kb(proc.pid, "VmRSS")  # 0 once it has exited
            if rss:
                samples.append((time.monotonic() - start, rss))
        except OSError:
            break
        time.sleep(0.25)
    out = proc.stdout.read()
    if proc.wait() not in (0, 1):
        raise SystemExit("adopt-v1 failed with status %d" % proc.returncode)
    return json.loads(out), samples


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432")
    parser.add_argument("--files", type=int, default=1_000_000)
    parser.add_argument("--instances", type=int, default=1_200_000)
    parser.add_argument("--events", type=int, default=3_000_000)
    parser.add_argument("--batch", type=int, default=20_000, help="rows per transaction")
    parser.add_argument("--keep", action="store_true", help="keep both databases")
    args = parser.parse_args()
    if not args.files <= args.instances <= 2 * args.files:
        parser.error("--instances must lie between --files and twice --files")

    drop = ["DROP DATABASE IF EXISTS %s WITH (FORCE)" % n for n in (V1_DB, OUR_DB)]
    admin(args.pg, *drop, "CREATE DATABASE %s" % V1_DB, "CREATE DATABASE %s" % OUR_DB)
    v1_url, our_url = "%s/%s" % (args.pg, V1_DB), "%s/%s" % (args.pg, OUR_DB)
    try:
        t0 = time.perf_counter()
        conn = psycopg2.connect(v1_url)
        with conn, conn.cursor() as cur:
            made = build_v1(cur, args.files, args.instances, args.events)
        conn.autocommit = True
        conn.cursor().execute("VACUUM ANALYZE")
        conn.close()
        print("built the v1 database (%s) in %.0f s" % (", ".join(
            "%s %d" % kv for kv in made.items()), time.perf_counter() - t0), flush=True)

        with tempfile.TemporaryDirectory(prefix="librarian-bench-adopt-") as work:
            config = os.path.join(work, "librarian.ini")
            with open(config, "w") as f:
                f.write("[server]\nsecret_key = bench\nlog_level = WARNING\n"
                        "[database]\nurl = %s\n" % our_url)
            subprocess.run([sys.executable, os.path.join(ROOT, "librarian.py"), "migrate",
                            "--config", config], check=True, capture_output=True)
            report, samples = run_adoption(config, v1_url, args.batch)
        show(report, samples, made)
    finally:
        if not args.keep:
            admin(args.pg, *drop)


def show(report, samples, made):
    total = report["seconds"]
    print("%-18s %10s %10s %9s %10s" % ("table", "read", "written", "seconds", "rows/s"))
    rows = 0
    for table, t in report["tables"].items():
        rows += t["read"]
        assert t["read"] == made[table], (table, t["read"], made[table])
        print("%-18s %10d %10d %9.1f %10.0f" % (table, t["read"], t["written"], t["seconds"],
                                                t["read"] / t["seconds"] if t["seconds"] else 0))
    print("%-18s %10d %10d %9.1f %10.0f" % ("all", rows, sum(
        t["written"] for t in report["tables"].values()), total, rows / total))
    print("refused %d, converted %d (payloads that were not JSON), num_instances corrected %d"
          % (sum(t["refused"] for t in report["tables"].values()),
             sum(t["converted"] for t in report["tables"].values()),
             report["num_instances_corrected"]))
    if samples:
        span = samples[-1][0]

        def rss_at(fraction):
            return next(kb for s, kb in samples if s >= fraction * span) / 1024

        print("adopting process RSS: %.0f MB at 10 %%, %.0f MB at 50 %%, %.0f MB at 100 %%; "
              "peak %.0f MB (goal: flat)" % (rss_at(0.1), rss_at(0.5), rss_at(1.0),
                                             max(kb for _, kb in samples) / 1024))
    full = all(made[t] >= n for t, n in (("file", 1_000_000), ("file_instance", 1_200_000),
                                         ("file_event", 3_000_000)))
    print("total %.0f s (goal, at 1,000,000 files, 1,200,000 instances and 3,000,000 events: "
          "< 300 s on two cores): %s" % (total, ("met" if total < 300 else "MISSED") if full
                                         else "not measured at this size"))


if __name__ == "__main__":
    main()
