"""Benchmark: two Librarians side by side, driven through the original
(v1) protocol only, so that it works against any Librarian.

    python bench/compare_v1.py URL_V1 URL_OURS [--auth-v1 A] [--auth-ours B]
        [--files 100000] [--seconds 10] [--rounds 2] [--pid-v1 PID] [--pid-ours PID]

URL_V1 may be `-` (our figures alone). URL_OURS may be `serve:sqlite` or
`serve:postgresql`: the benchmark then starts `librarian.py serve` itself on
a new temporary database and store. Servers must run on this host (a small
file is put into the staging folder they name, so that
`locate_file_instance` finds an instance).

For each server, in the same run: record ingest (a catalogue of `--files`
files, 10 per observation and 100 observations per session, sent as
`initiate_upload` record sets of 1,000 files, printing files/s); the ten
searches of `bench/search.py` scaled to the catalogue (median of five, ms);
then `ping` and `locate_file_instance` at 8 concurrent keep-alive
connections (2 processes x 4 threads) for `--seconds`, alternating between
the servers for `--rounds` rounds (requests/s and p99 ms); and the server's
resident memory (with `--pid-*`, or for a server it started). Each figure is
printed with ratio ours / original (for times, original / ours: above 1 is
ours faster). Goals (issue 15): ping and locate >= 2x, p99 < 50 ms; ingest
>= 10x; searches >= 3x in sum; memory no higher than the original's.
"""

import argparse
import http.client
import json
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _bench(name):
    """Another benchmark script as a module (bench/ is not a package, and
    bench/search.py would shadow the project's search module)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_" + name,
                                                  os.path.join(ROOT, "bench", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


searches = _bench("search").searches
free_port, memory_kb = _bench("upload").free_port, _bench("upload").memory_kb

FILES_PER_OBS, OBS_PER_SESSION, OBS_SECONDS = 10, 100, 600
GPS_EPOCH_JD = 2444244.5  # 1980-01-06, the GPS epoch (leap seconds ignored: a benchmark)


class V1:
    """A v1-protocol caller of one Librarian (`POST /api/OP`, form field
    `request` holding JSON with the authenticator)."""

    def __init__(self, url, authenticator):
        parts = urllib.parse.urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.base = parts.path.rstrip("/")
        self.authenticator = authenticator
        self.conn = None

    def body(self, op, **args):
        return self.base + "/api/" + op, urllib.parse.urlencode(
            {"request": json.dumps(dict(args, authenticator=self.authenticator))})

    def call(self, op, timeout=600, **args):
        """The reply object; raises RuntimeError on a refusal."""
        path, body = self.body(op, **args)
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            self.conn.request("POST", path, body, {
                "Content-Type": "application/x-www-form-urlencoded"})
            reply = self.conn.getresponse()
            data = reply.read()
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            raise
        try:
            result = json.loads(data)
        except ValueError:
            raise RuntimeError("%s: HTTP %d %r" % (op, reply.status, data[:200])) from None
        if not result.get("success"):
            raise RuntimeError("%s: %s" % (op, result.get("message")))
        return result


def catalogue(n_files, tag):
    """Record sets of 1,000 files each (with their observations and
    sessions), on nights chosen at random so that runs do not collide;
    returns (record sets, first obsid, first JD, number of sessions)."""
    n_sessions = max(1, n_files // (FILES_PER_OBS * OBS_PER_SESSION))
    first_day = random.randrange(0, 3000)
    first_jd = 2458000.5 + first_day
    first_obsid = int((first_jd - GPS_EPOCH_JD) * 86400)
    sets, files, observations, sessions = [], {}, {}, {}
    for s in range(n_sessions):
        sid = first_obsid + s * 86400
        sessions[str(sid)] = {"id": sid, "start_time_jd": first_jd + s,
                              "stop_time_jd": first_jd + s + OBS_PER_SESSION * OBS_SECONDS / 86400}
        for k in range(OBS_PER_SESSION):
            obsid, jd = sid + k * OBS_SECONDS, first_jd + s + k * OBS_SECONDS / 86400
            observations[str(obsid)] = {"obsid": obsid, "start_time_jd": jd,
                                        "stop_time_jd": jd + (OBS_SECONDS - 1) / 86400,
                                        "start_lst_hr": (s * 0.0657 + k * 0.1671) % 24,
                                        "session_id": sid}
            day, frac = ("%.5f" % jd).split(".")
            for j in range(FILES_PER_OBS):
                pol = ("xx", "yy", "xy", "yx")[j % 4]
                kind = "uvh5" if j < 8 else "calfits"
                name = "zen.%s.%s.%s.%s%d.%s" % (day, frac, pol, tag, j, kind)
                files[name] = {"name": name, "type": kind, "create_time": 1577836800,
                               "obsid": obsid, "size": 1_000_000 + (obsid + j) % 977,
                               "md5": "%032x" % (obsid * 16 + j)}
            if len(files) >= 1000:
                sets.append({"files": files, "observations": observations,
                             "sessions": sessions})
                files, observations, sessions = {}, {}, {}
    if files or observations or sessions:
        sets.append({"files": files, "observations": observations, "sessions": sessions})
    return sets, first_obsid, first_jd, n_sessions


def ingest(lib, sets):
    """Send every record set; files per second."""
    n = sum(len(s["files"]) for s in sets)
    t0 = time.perf_counter()
    for s in sets:
        lib.call("initiate_upload", upload_size=0, **s)
    return n / (time.perf_counter() - t0)


def place_one_file(lib, tag, obsid, jd):
    """Register a small file through staging (its bytes written into the
    staging folder the server names, on this host); returns its name."""
    name = "bench.%s.uvh5" % tag
    data = os.urandom(4096)
    import hashlib

    records = {"files": {name: {"name": name, "type": "uvh5", "create_time": 1577836800,
                                "obsid": obsid, "size": len(data),
                                "md5": hashlib.md5(data).hexdigest()}}}
    reply = lib.call("initiate_upload", upload_size=len(data), **records)
    staging = os.path.join(reply["path_prefix"], reply["staging_dir"])
    with open(os.path.join(staging, name), "wb") as f:
        f.write(data)
    lib.call("complete_upload", store_name=reply["name"], staging_dir=reply["staging_dir"],
             dest_store_path="bench/" + name, meta_mode="direct", deletion_policy="allowed")
    return name


def run_searches(lib, queries):
    """[(label, median ms or None, results)] for each search, five runs."""
    formats = {"files": "file-listing-json", "observations": "obs-listing-json",
               "sessions": "session-listing-json"}
    out = []
    for kind, label, query in queries:
        times, count = [], None
        try:
            for _ in range(5):
                t0 = time.perf_counter()
                reply = lib.call("search", search=json.dumps(query), output_format=formats[kind])
                times.append((time.perf_counter() - t0) * 1000)
                count = len(reply["results"])
        except RuntimeError as e:
            print("    %s: %s" % (label, str(e)[:120]))
            out.append((label, None, None))
            continue
        out.append((label, statistics.median(times), count))
    return out


def _load_thread(url, auth, op, args, deadline, latencies):
    lib = V1(url, auth)
    path, body = lib.body(op, **args)
    conn = http.client.HTTPConnection(lib.host, lib.port, timeout=30)
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            conn.request("POST", path, body, headers)
            reply = conn.getresponse()
            data = reply.read()
            ok = reply.status == 200 and b'"success": true' in data.replace(b'"success":true',
                                                                            b'"success": true')
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = http.client.HTTPConnection(lib.host, lib.port, timeout=30)
            ok = False
        latencies.append((time.perf_counter() - t0) * 1000 if ok else -1.0)


def _load_process(url, auth, op, args, seconds, threads, queue):
    deadline = time.monotonic() + seconds
    latencies = []
    workers = [threading.Thread(target=_load_thread,
                                args=(url, auth, op, args, deadline, latencies))
               for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    queue.put(latencies)


def load(url, auth, op, args, seconds, processes=2, threads=4):
    """(requests/s, p99 ms, failures) of `op` at processes x threads
    keep-alive connections for `seconds`."""
    queue = multiprocessing.Queue()
    procs = [multiprocessing.Process(target=_load_process,
                                     args=(url, auth, op, args, seconds, threads, queue))
             for _ in range(processes)]
    for p in procs:
        p.start()
    latencies = [x for _ in procs for x in queue.get()]
    for p in procs:
        p.join()
    good = sorted(x for x in latencies if x >= 0)
    p99 = good[int(len(good) * 0.99) - 1] if good else float("nan")
    return len(good) / seconds, p99, len(latencies) - len(good)


class OwnServer:
    """`librarian.py serve` on a temporary database (SQLite or a new
    PostgreSQL database) and store, for `serve:KIND`."""

    def __init__(self, kind, pg="postgresql://postgres@127.0.0.1:5432"):
        self.work = tempfile.mkdtemp(prefix="compare_v1.")
        self.pg, self.dbname = pg, None
        if kind == "postgresql":
            import psycopg2

            self.dbname = "compare_v1_%d" % os.getpid()
            admin = psycopg2.connect(pg + "/postgres")
            admin.autocommit = True
            admin.cursor().execute("CREATE DATABASE %s" % self.dbname)
            admin.close()
            db = "%s/%s" % (pg, self.dbname)
        else:
            db = "sqlite:///" + os.path.join(self.work, "librarian.db")
        self.auth = "bench-" + os.urandom(8).hex()
        port = free_port()
        config = os.path.join(self.work, "librarian.ini")
        os.makedirs(os.path.join(self.work, "store"))
        with open(config, "w") as f:
            f.write("[server]\nport = %d\nsecret_key = %s\nlog_level = warning\n\n"
                    "[database]\nurl = %s\n\n[store:main]\npath_prefix = %s\n\n"
                    "[source:bench]\nauthenticator = %s\nlevel = admin\n"
                    % (port, os.urandom(16).hex(), db, os.path.join(self.work, "store"),
                       self.auth))
        py = sys.executable
        subprocess.run([py, os.path.join(ROOT, "librarian.py"), "migrate", "--config", config],
                       check=True, stdout=subprocess.DEVNULL)
        self.log = open(os.path.join(self.work, "server.log"), "wb")
        self.proc = subprocess.Popen([py, os.path.join(ROOT, "librarian.py"), "serve",
                                      "--config", config], stdout=self.log,
                                     stderr=subprocess.STDOUT)
        self.url = "http://127.0.0.1:%d/" % port
        for _ in range(300):
            try:
                V1(self.url, self.auth).call("ping", timeout=2)
                return
            except (OSError, RuntimeError):
                time.sleep(0.1)
        raise SystemExit("our server did not start; see %s" % self.log.name)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()
        if self.dbname:
            import psycopg2

            admin = psycopg2.connect(self.pg + "/postgres")
            admin.autocommit = True
            admin.cursor().execute("DROP DATABASE IF EXISTS %s WITH (FORCE)" % self.dbname)
            admin.close()
        import shutil

        shutil.rmtree(self.work, ignore_errors=True)


def ratio(ours, theirs, higher_is_better=True):
    if ours is None or theirs is None or not theirs or not ours:
        return "-"
    return "%.2fx" % (ours / theirs if higher_is_better else theirs / ours)


def fmt(value, spec):
    return "-" if value is None else spec % value


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url_v1", help="the original Librarian's URL, or - for none")
    parser.add_argument("url_ours", help="our Librarian's URL, or serve:sqlite / serve:postgresql")
    parser.add_argument("--auth-v1", default=os.environ.get("LIBRARIAN_V1_AUTH", ""))
    parser.add_argument("--auth-ours", default=os.environ.get("LIBRARIAN_AUTH", ""))
    parser.add_argument("--files", type=int, default=100_000, help="catalogue size")
    parser.add_argument("--seconds", type=float, default=10.0, help="per load measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternations of the load")
    parser.add_argument("--pid-v1", type=int, help="the original server's process id")
    parser.add_argument("--pid-ours", type=int, help="our server's process id")
    args = parser.parse_args()

    own = None
    if args.url_ours.startswith("serve:"):
        own = OwnServer(args.url_ours.split(":", 1)[1])
        args.url_ours, args.auth_ours, args.pid_ours = own.url, own.auth, own.proc.pid
    servers = [("ours", args.url_ours, args.auth_ours, args.pid_ours)]
    if args.url_v1 != "-":
        servers.insert(0, ("original", args.url_v1, args.auth_v1, args.pid_v1))
    tag = os.urandom(3).hex()
    sets, first_obsid, first_jd, n_sessions = catalogue(args.files, tag)
    queries = searches(first_obsid, first_jd, n_sessions)
    figures = {}
    try:
        for label, url, auth, pid in servers:
            lib = V1(url, auth)
            f = figures[label] = {}
            f["ingest"] = ingest(lib, sets)
            print("%s: ingested %d files at %.0f files/s" % (label, args.files, f["ingest"]))
            f["searches"] = run_searches(lib, queries)
            f["located"] = place_one_file(lib, tag, first_obsid, first_jd)
            f["rss_ingest"] = memory_kb(pid, "VmRSS") / 1024 if pid else None
        for op in ("ping", "locate_file_instance"):
            for label, url, auth, pid in servers:
                figures[label][op] = []
            for _ in range(args.rounds):
                for label, url, auth, pid in servers:
                    op_args = {"file_name": figures[label]["located"]} if op != "ping" else {}
                    figures[label][op].append(load(url, auth, op, op_args, args.seconds))
        for label, url, auth, pid in servers:
            f = figures[label]
            f["rss_load"] = memory_kb(pid, "VmRSS") / 1024 if pid else None
            f["rss_peak"] = memory_kb(pid, "VmHWM") / 1024 if pid else None
        report(figures, queries, args)
    finally:
        if own:
            own.stop()


def report(figures, queries, args):
    ours, theirs = figures["ours"], figures.get("original", {})
    print("\n%-36s %12s %12s %8s" % ("figure", "original", "ours", "ratio"))

    def line(name, key_value, spec, higher=True):
        o, t = key_value(ours), key_value(theirs) if theirs else None
        print("%-36s %12s %12s %8s" % (name, fmt(t, spec), fmt(o, spec), ratio(o, t, higher)))

    line("record ingest (files/s)", lambda f: f["ingest"], "%.0f")
    for i, (_, label, _) in enumerate(queries):
        line("search: %s (ms)" % label, lambda f: f["searches"][i][1], "%.1f", False)

    def total(f):
        ms = [m for _, m, _ in f["searches"]]
        return None if None in ms else sum(ms)
    line("ten searches, sum of medians (ms)", total, "%.0f", False)
    for op in ("ping", "locate_file_instance"):
        line("%s req/s" % op,
             lambda f: statistics.median(r[0] for r in f[op]), "%.0f")
        line("%s p99 ms" % op, lambda f: max(r[1] for r in f[op]), "%.1f", False)
        line("%s failed requests" % op, lambda f: sum(r[2] for r in f[op]), "%d", False)
    line("RSS after ingest (MB)", lambda f: f["rss_ingest"], "%.0f", False)
    line("RSS after load (MB)", lambda f: f["rss_load"], "%.0f", False)
    line("peak RSS (MB)", lambda f: f["rss_peak"], "%.0f", False)
    print("\n%d files, %.0f s per load measurement, %d rounds; goals: ping and locate >= 2x with "
          "p99 < 50 ms, ingest >= 10x, searches >= 3x in sum, memory <= the original's"
          % (args.files, args.seconds, args.rounds))


if __name__ == "__main__":
    main()
