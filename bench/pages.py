"""Benchmark: how long each web page takes with a catalogue of 100,000
files (SQLite), rendered through the WSGI app in-process.

    python bench/pages.py [--files 100000]

Prints the median of five renders per page and the slowest page. Goal:
every page under 100 ms.
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import webtest  # noqa: E402

import librarian  # noqa: E402
import models  # noqa: E402
import settings  # noqa: E402

FILES_PER_OBS, OBS_PER_SESSION = 10, 50


def build(n_files, work):
    config_path = os.path.join(work, "librarian.ini")
    with open(config_path, "w") as f:
        f.write("[server]\nsecret_key = bench\nlog_level = WARNING\n[database]\n"
                "url = sqlite:///%s\n[store:main]\npath_prefix = %s\n"
                "[source:bench]\nauthenticator = bench-secret\nlevel = admin\n"
                % (os.path.join(work, "db.sqlite"), os.path.join(work, "store")))
    app = librarian.setup(settings.load(config_path))
    with models.db.connection_context():
        librarian.migration_router().run()
    librarian.startup(app)
    n_obs = n_files // FILES_PER_OBS
    first = 1190000000
    with models.db.connection_context(), models.db.atomic():
        sessions = [{"id": first + s * 86400, "start_time_jd": 2458000.5 + s,
                     "stop_time_jd": 2458000.9 + s} for s in range(n_obs // OBS_PER_SESSION)]
        models.ObservingSession.insert_many(sessions).execute()
        obs = [{"obsid": first + (i // OBS_PER_SESSION) * 86400 + (i % OBS_PER_SESSION) * 600,
                "start_time_jd": 2458000.5 + i // OBS_PER_SESSION + (i % OBS_PER_SESSION) / 144,
                "stop_time_jd": 2458000.5 + i // OBS_PER_SESSION + (i % OBS_PER_SESSION + 1) / 144,
                "start_lst_hr": (i * 0.1) % 24, "session": first + (i // OBS_PER_SESSION) * 86400}
               for i in range(n_obs)]
        for i in range(0, len(obs), 5000):
            models.Observation.insert_many(obs[i:i + 5000]).execute()
        now = datetime.datetime(2026, 1, 1)
        store = models.Store.get()
        for start in range(0, n_files, 5000):
            files = [{"name": "zen.%d.%05d.xx.uvh5" % (o["obsid"], j), "type": "uvh5",
                      "create_time": now, "observation": o["obsid"], "size": 10**9 + k,
                      "md5": "%032x" % k, "source": "bench"}
                     for k in range(start, min(start + 5000, n_files))
                     for o, j in [(obs[k // FILES_PER_OBS], k % FILES_PER_OBS)]]
            models.File.insert_many(files).execute()
            models.FileInstance.insert_many([{"store": store, "parent_dirs": "d",
                                              "file": f["name"]} for f in files]).execute()
    return app, obs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="librarian-pages-") as work:
        t0 = time.perf_counter()
        app, obs = build(args.files, work)
        print("built %d files in %.0f s" % (args.files, time.perf_counter() - t0))
        web = webtest.TestApp(app)
        web.post("/login", {"authenticator": "bench-secret", "next": "/"})
        some_obs = obs[len(obs) // 2]
        name = "zen.%d.%05d.xx.uvh5" % (some_obs["obsid"], 3)
        pages = [
            ("GET", "/", None), ("GET", "/files/" + name, None),
            ("GET", "/observations", None), ("GET", "/observations?page=100", None),
            ("GET", "/observations/%d" % some_obs["obsid"], None),
            ("GET", "/sessions/recent", None), ("GET", "/sessions/all?page=2", None),
            ("GET", "/sessions/%d" % some_obs["session"], None),
            ("GET", "/stores", None), ("GET", "/stores/main", None),
            ("GET", "/search-files", None), ("GET", "/upload", None),
            ("POST", "/search", {"type": "files", "search": '{"name-matches": "zen.11904%"}',
                                 "output_format": "List of files"}),
            ("POST", "/search", {"type": "obs", "search": '{"start-lst-hr-in-range": [1, 2]}',
                                 "output_format": "List of observations"}),
            ("POST", "/search", {"type": "sessions", "search": '{"num-files-greater-than": 1}',
                                 "output_format": "List of sessions"}),
        ]
        worst = (0.0, "")
        print("%-55s %10s" % ("page", "median ms"))
        for method, url, form in pages:
            times = []
            for _ in range(5):
                t = time.perf_counter()
                (web.post(url, form) if method == "POST" else web.get(url))
                times.append((time.perf_counter() - t) * 1000)
            median = statistics.median(times)
            label = "%s %s%s" % (method, url, " " + form["search"] if form else "")
            worst = max(worst, (median, label))
            print("%-55s %10.1f" % (label[:55], median))
        print("slowest page: %.1f ms, %s (goal < 100)" % worst)


if __name__ == "__main__":
    main()
