"""The schema: constraints enforced by the database itself, authenticators,
and the admin commands."""

import datetime
import hashlib
import hmac
import os

import peewee as pw
import pytest

import librarian
import models
import settings
from conftest import AUTH, api


def raw_file(**overrides):
    row = {"name": "f.dat", "type": "dat", "create_time": models.utcnow(), "size": 1,
           "md5": "d41d8cd98f00b204e9800998ecf8427e", "source": "test"}
    row.update(overrides)
    return row


@pytest.mark.parametrize("overrides", [
    {"md5": "D41D8CD98F00B204E9800998ECF8427E"},   # upper case
    {"md5": "d41d8cd98f00b204e9800998ecf8427"},    # 31 digits
    {"md5": "g41d8cd98f00b204e9800998ecf8427e"},   # not hex
    {"size": -1},
    {"name": "a/b"},
    {"name": ".."},
    {"name": ""},
    {"observation": 12345},                          # unknown observation
], ids=["upper", "short", "nothex", "negative", "slash", "dotdot", "empty", "fk"])
def test_database_refuses_invalid_files_even_without_python_checks(app, overrides):
    with pytest.raises(pw.IntegrityError):
        with models.db.atomic():
            models.File.insert(**raw_file(**overrides)).execute()
    assert models.File.select().count() == 0


def test_sizes_are_64_bit_and_names_unique(app):
    models.File.insert(**raw_file(size=5 * 2**40)).execute()
    assert models.File.get().size == 5 * 2**40
    with pytest.raises(pw.IntegrityError):
        with models.db.atomic():
            models.File.insert(**raw_file()).execute()


def test_instances_need_a_known_store_and_file_and_a_valid_policy(app):
    models.File.insert(**raw_file()).execute()
    store = models.Store.get()
    for bad in ({"store": 999}, {"file": "nope"}, {"deletion_policy": 7}):
        row = dict({"store": store.id, "parent_dirs": "", "file": "f.dat"}, **bad)
        with pytest.raises(pw.IntegrityError):
            with models.db.atomic():
                models.FileInstance.insert(**row).execute()


def test_observation_times_are_checked(app):
    with pytest.raises(pw.IntegrityError):
        with models.db.atomic():
            models.Observation.insert(obsid=1, start_time_jd=2458000.5,
                                      stop_time_jd=2458000.4).execute()
    with pytest.raises(pw.IntegrityError):
        with models.db.atomic():
            models.Observation.insert(obsid=1, start_time_jd=2458000.5,
                                      start_lst_hr=24.5).execute()


@pytest.mark.chosen_secrets
def test_authenticators_are_stored_hashed_and_verified(app):
    admin = models.Source.get(models.Source.name == "admin")
    assert AUTH["admin"] not in admin.authenticator_hash
    assert admin.authenticator_hash.startswith("$argon2")
    assert models.find_source(AUTH["admin"]).name == "admin"
    assert models.find_source("admin-secreT") is None
    assert models.find_source("") is None


def test_a_source_made_from_a_hash_alone_is_found_by_its_authenticator(app):
    from argon2 import PasswordHasher

    made = models.create_source("v1user", None, "read-append",
                                authenticator_hash=PasswordHasher().hash("from v1"))
    assert made.lookup == ""
    assert models.find_source("from v1").name == "v1user"
    assert models.find_source(AUTH["admin"]).name == "admin"   # the lookup path still works
    assert models.find_source("from v2") is None
    with pytest.raises(models.LibrarianError, match="exactly one of"):
        models.create_source("both", "x", "admin", authenticator_hash=made.authenticator_hash)
    with pytest.raises(models.LibrarianError, match="authenticator hash of 'bad': expected an "
                       "Argon2 hash"):
        models.create_source("bad", None, "admin", authenticator_hash="secret")


def test_event_payloads_that_are_not_objects_still_list(app):
    models.File.insert(**raw_file()).execute()
    for text, value in (("null", None), ("[1, 2]", [1, 2]), ('"ok"', "ok"), ("not json", "not json"),
                        ('{"\u00e9": 1}', {"\u00e9": 1})):
        event = models.FileEvent.create(file="f.dat", time=models.utcnow(), type="t", payload=text)
        assert event.to_dict()["payload"] == value


def test_levels_order():
    reader = models.Source(level="read-only")
    writer = models.Source(level="read-write")
    assert writer.allows("read-append") and writer.allows("read-only")
    assert not writer.allows("admin") and not reader.allows("read-append")


def test_unix_times_round_trip_exactly():
    for t in (0, 1541794668, 2**31 + 7):
        assert models.to_unix(models.from_unix(t)) == t
    assert models.from_unix(0) == datetime.datetime(1970, 1, 1)


def test_add_user_and_add_store_commands(app, config_path, web, tmp_path, capsys):
    models.db.close()
    assert librarian.main(["add-user", "pipeline", "--level", "read-append",
                           "--config", config_path]) == 0
    authenticator = capsys.readouterr().out.strip().splitlines()[-1]
    new_store = tmp_path / "second"
    assert librarian.main(["add-store", "second", str(new_store), "--config", config_path]) == 0
    assert os.path.isdir(new_store)
    assert api(web, "ping", auth=authenticator)["message"] == "hello"
    names = [s["name"] for s in api(web, "probe_stores")["stores"]]
    assert names == ["main", "second"]
    with pytest.raises(SystemExit, match="already exists"):
        librarian.main(["add-user", "pipeline", "--config", config_path])
    assert librarian.main(["remove-user", "pipeline", "--config", config_path]) == 0
    assert "unknown authenticator" in api(web, "ping", auth=authenticator, status=400)["message"]
    with pytest.raises(SystemExit, match="no source named pipeline"):
        librarian.main(["remove-user", "pipeline", "--config", config_path])
    with pytest.raises(SystemExit, match=r"given by \[source:reader\]"):
        librarian.main(["remove-user", "reader", "--config", config_path])
    assert api(web, "ping", auth="reader")["success"]


def test_num_instances_is_kept_exact_by_the_database(app, tmp_path):
    models.File.insert(**raw_file()).execute()
    main = models.Store.get()
    other = models.Store.create(name="other", ssh_host="localhost", path_prefix=str(tmp_path))

    def count():
        return models.File.get().num_instances

    models.FileInstance.create(store=main, parent_dirs="a", file="f.dat")
    models.FileInstance.create(store=other, parent_dirs="", file="f.dat")
    assert count() == 2
    models.FileInstance.delete().where(models.FileInstance.store == main).execute()
    assert count() == 1
    with pytest.raises(pw.IntegrityError):   # a failed insert changes nothing
        with models.db.atomic():
            models.FileInstance.create(store=other, parent_dirs="", file="f.dat")
    assert count() == 1 == models.FileInstance.select().count()


@pytest.mark.parametrize("name", ["", "a/b", ".x", "x" * 65])
def test_add_store_refuses_bad_names(app, config_path, name):
    models.db.close()
    with pytest.raises(SystemExit, match="store name"):
        librarian.main(["add-store", name, "/tmp/x", "--config", config_path])


@pytest.mark.chosen_secrets
def test_an_issued_authenticator_is_stored_by_its_keyed_hash(app):
    """An authenticator in the server's own form (256 random bits) is found
    by one keyed hash; nothing stored is an unkeyed hash of any secret."""
    issued = models.new_authenticator()
    assert models.ISSUED_RE.match(issued) and len(issued) == 47
    made = models.create_source("pipeline", issued, "read-append")
    assert made.authenticator_hash == models.KEYED
    key = models.authenticator_key()
    assert len(key) == 32
    assert made.lookup == hmac.new(key, issued.encode(), hashlib.sha256).hexdigest()
    assert models.find_source(issued).name == "pipeline"
    assert models.find_source(models.new_authenticator()) is None
    assert models.find_source(issued[:-1] + ("A" if issued[-1] != "A" else "B")) is None
    # a chosen secret has no lookup at all: only its salted Argon2 hash
    unkeyed = {hashlib.sha256(s.encode()).hexdigest()[:16] for s in AUTH.values()}
    for source in models.Source.select():
        assert source.lookup not in unkeyed
        if source.name != "pipeline":
            assert source.lookup == "" and source.authenticator_hash.startswith("$argon2")


@pytest.mark.chosen_secrets
def test_argon2_runs_once_per_process_for_a_chosen_secret(app, web, monkeypatch):
    """After the first call, a chosen secret is recognised from memory; a
    changed hash (the secret replaced) is noticed at the next call."""
    from argon2 import PasswordHasher

    calls = []
    real = PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "verify",
                        lambda self, h, p: calls.append(p) or real(self, h, p))
    for _ in range(20):
        api(web, "ping", auth="reader")
    assert calls == ["reader-secret"] * _position("reader")  # the first call only
    models.Source.update(authenticator_hash=PasswordHasher().hash("replaced")).where(
        models.Source.name == "reader").execute()
    reply = api(web, "ping", auth="reader", status=400)
    assert "unknown authenticator" in reply["message"]
    assert api(web, "ping", auth="replaced")["success"]


@pytest.mark.chosen_secrets
def test_an_authenticator_changed_in_the_configuration_replaces_the_recorded_one(
        app, config_path, caplog):
    """Both kinds (a chosen secret, an issued one) and a configured hash:
    the section's word wins at start-up, with a warning; unchanged ones are
    left alone."""
    from argon2 import PasswordHasher

    issued = models.new_authenticator()
    hashed = PasswordHasher().hash("from a hash")
    text = open(config_path).read().replace("authenticator = reader-secret",
                                            "authenticator = " + issued)
    text = text.replace("authenticator = writer-secret", "authenticator_hash = " + hashed)
    admin_before = models.Source.get(models.Source.name == "admin").authenticator_hash
    with caplog.at_level("WARNING", logger="librarian"):
        librarian.sync_config_records(settings.parse(text, config_path))
    assert models.find_source(issued).name == "reader"
    assert models.find_source("reader-secret") is None
    assert models.find_source("from a hash").name == "writer"
    assert models.Source.get(models.Source.name == "admin").authenticator_hash == admin_before
    changed = [r.getMessage() for r in caplog.records if "replaces the one" in r.getMessage()]
    assert len(changed) == 2 and "source reader" in changed[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="librarian"):
        librarian.sync_config_records(settings.parse(text, config_path))  # again: no change
    assert not [r for r in caplog.records if "replaces the one" in r.getMessage()]


@pytest.mark.chosen_secrets
def test_one_argon2_check_for_a_secret_brought_at_once(app, monkeypatch):
    """Eight workers bringing the same unknown secret at once (a pipeline
    after a restart) wait for one Argon2 check; a flood of guesses that
    finds Argon2 busy gets 503, not a worker each for ever."""
    import threading
    import time

    from argon2 import PasswordHasher

    from webauth import AuthCache

    calls = []
    real = PasswordHasher.verify

    def slow_verify(self, h, p):
        calls.append(p)
        time.sleep(0.05)
        return real(self, h, p)

    monkeypatch.setattr(PasswordHasher, "verify", slow_verify)
    cache, found, errors = AuthCache(), [], []

    def find(secret):
        try:
            found.append(cache.find(secret))
        except models.LibrarianError as e:
            errors.append(e)

    workers = [threading.Thread(target=find, args=("reader-secret",)) for _ in range(8)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert [s.name for s in found] == ["reader"] * 8 and not errors
    assert calls == ["reader-secret"] * _position("reader")

    monkeypatch.setattr(models, "ARGON2_WAIT_SECONDS", 0.01)
    for _ in range(2):
        models.ARGON2_AT_ONCE.acquire()  # two checks already running
    try:
        find("a-guess")
    finally:
        for _ in range(2):
            models.ARGON2_AT_ONCE.release()
    assert errors and errors[0].status == 503 and "at once" in errors[0].message
    assert cache.find("reader-secret").name == "reader"  # still known: no Argon2 needed


@pytest.mark.chosen_secrets
def test_a_flood_of_guesses_holds_few_workers_and_a_stale_secret_costs_argon2_once(
        app, monkeypatch):
    """Beyond ARGON2_SEARCHES requests searching the chosen secrets, an
    unknown secret is refused with 503 at once (no Argon2, no wait), while
    issued and already recognised authenticators still work; a wrong secret
    brought again costs no Argon2 until the chosen secrets change."""
    from argon2 import PasswordHasher

    from webauth import AuthCache

    calls = []
    real = PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "verify",
                        lambda self, h, p: calls.append(p) or real(self, h, p))
    cache, issued = AuthCache(), models.new_authenticator()
    models.create_source("pipeline", issued, "read-write")
    assert cache.find("reader-secret").name == "reader"
    held = 0
    while models.ARGON2_SEARCHES.acquire(blocking=False):  # the searches a flood holds
        held += 1
    try:
        assert held == 4
        calls.clear()
        with pytest.raises(models.LibrarianError) as refused:
            cache.find("a-guess")
        assert refused.value.status == 503 and calls == []
        assert cache.find("reader-secret").name == "reader"
        assert cache.find(issued).name == "pipeline"
    finally:
        for _ in range(held):
            models.ARGON2_SEARCHES.release()

    calls.clear()
    assert cache.find("stale-secret") is None
    assert len(calls) == len(models.chosen_secret_sources())
    assert cache.find("stale-secret") is None and cache.find("stale-secret") is None
    assert len(calls) == len(models.chosen_secret_sources())  # none for the retries
    models.create_source("late", "stale-secret", "read-only")  # now it is someone's
    assert cache.find("stale-secret").name == "late"


@pytest.mark.chosen_secrets
def test_one_address_checks_one_unknown_secret_at_a_time(app, monkeypatch):
    """A flood from one address holds one Argon2 search: its next guess is
    refused at once, while a person's first call from elsewhere is checked."""
    from argon2 import PasswordHasher

    from webauth import AuthCache

    calls = []
    real = PasswordHasher.verify
    monkeypatch.setattr(PasswordHasher, "verify",
                        lambda self, h, p: calls.append(p) or real(self, h, p))
    cache = AuthCache()
    cache.searching.add("192.0.2.7")  # a search of that address in progress
    with pytest.raises(models.LibrarianError) as refused:
        cache.find("a-guess", "192.0.2.7")
    assert refused.value.status == 503 and "192.0.2.7" in refused.value.message
    assert calls == []
    assert cache.find("reader-secret", "198.51.100.1").name == "reader"
    assert cache.searching == {"192.0.2.7"}  # the other's search ended


def test_an_issued_authenticator_is_known_to_the_body_budget_only_while_it_authenticates(
        app, monkeypatch):
    import webauth

    cache, issued = webauth.AuthCache(), models.new_authenticator()
    models.create_source("pipeline", issued, "read-write")
    assert not cache.recognises("Bearer " + issued)  # not seen yet
    assert cache.find(issued).name == "pipeline"
    assert cache.recognises("Bearer " + issued) and not cache.recognises(issued)
    monkeypatch.setattr(webauth, "BEARER_SECONDS", 0.0)  # (a removed source: no more finds)
    assert not cache.recognises("Bearer " + issued)


def _position(name):
    """How many Argon2 checks finding `name` takes: its place among the
    sources with an Argon2 hash, in id order."""
    names = [s.name for s in models.Source.select().order_by(models.Source.id)
             if s.authenticator_hash != models.KEYED]
    return names.index(name) + 1


def test_migration_010_keeps_every_source_working_without_reissue(config_path):
    """A catalogue made before 010 (Argon2 hashes, unsalted SHA-256 lookup
    prefixes, a source adopted by its hash alone) migrates: the prefixes are
    gone, a key is made, and each old authenticator still works."""
    from argon2 import PasswordHasher

    from webauth import AuthCache

    librarian.setup(settings.load(config_path))
    try:
        with models.db.connection_context():
            librarian.migration_router().run("009_reconcile")
            now = datetime.datetime(2026, 1, 1)
            models.db.execute_sql(
                "INSERT INTO source (name, lookup, authenticator_hash, level, created) "
                "VALUES (%s, %s, %s, %s, %s), (%s, %s, %s, %s, %s)".replace(
                    "%s", models.db.param),
                ["pipeline", hashlib.sha256(b"old-issued").hexdigest()[:16],
                 PasswordHasher().hash("old-issued"), "read-write", now,
                 "adopted", "", PasswordHasher().hash("chosen by a person"), "read-only", now])
            librarian.migration_router().run()
            assert {s.lookup for s in models.Source.select()} == {""}
            assert len(models.authenticator_key()) == 32
            cache = AuthCache()
            assert cache.find("old-issued").name == "pipeline"
            assert cache.find("chosen by a person").name == "adopted"
            assert cache.find("old-issued-not") is None
    finally:
        models.close_database()


def test_an_md5_or_authenticator_with_a_trailing_newline_is_not_one():
    """`$` would match before a final newline; the column holds 32 characters."""
    with pytest.raises(models.LibrarianError):
        models.check_md5("d41d8cd98f00b204e9800998ecf8427e\n")
    assert models.check_md5("D41D8CD98F00B204E9800998ECF8427E") == "d41d8cd98f00b204e9800998ecf8427e"
    assert not models.ISSUED_RE.match(models.new_authenticator() + "\n")


def test_listings_read_as_tuples_are_the_records_to_dict_gives(app):
    """Search listings are built from tuples (`listed`); each must be what
    the model's own `to_dict` says, whatever is null or set."""
    m = models
    session = m.ObservingSession.create(id=1234567890, start_time_jd=2459000.1,
                                        stop_time_jd=2459000.2)
    m.Observation.create(obsid=1234567890, start_time_jd=2459000.1, stop_time_jd=2459000.15,
                         start_lst_hr=3.5, session=session)
    m.Observation.create(obsid=1234567999, start_time_jd=2459000.3)
    m.File.insert(**raw_file(obsid=1234567890)).execute()
    m.File.insert(**raw_file(name="g.txt", type="txt", create_time=datetime.datetime(
        2026, 5, 1, 12, 0, 59, 999999))).execute()  # its fraction is dropped, not rounded
    store = m.Store.get()
    m.FileInstance.create(store=store, parent_dirs="a/b", file="f.dat", deletion_policy=1,
                          verified_at=datetime.datetime(2026, 5, 1, 12), verify_result="ok")
    m.FileInstance.create(store=store, parent_dirs="", file="g.txt")
    instances = m.FileInstance.select(m.FileInstance, m.Store).join(m.Store) \
        .order_by(m.FileInstance.file)
    observations = m.Observation.select().order_by(m.Observation.obsid)
    for query in (m.ObservingSession.select(), observations,
                  m.File.select().order_by(m.File.name), instances):
        listed = list(query.model.listed(query))
        assert listed == [row.to_dict() for row in query] and len(listed) >= 1
    assert list(m.FileInstance.listed(instances))[0]["full_path_on_store"] == \
        store.path_prefix.rstrip("/") + "/a/b/f.dat"


def test_a_reusable_query_gives_what_the_query_gives_with_other_values(app, tmp_path):
    """Built once per database, run with other values: the same models,
    joins and constants as the query built afresh; a value that does not
    reach the SQL as one parameter is refused."""
    m = models
    main = m.Store.get()
    other = m.Store.create(name="other", ssh_host="localhost", path_prefix=str(tmp_path))
    for name in ("a.dat", "b.dat"):
        m.File.insert(**raw_file(name=name)).execute()
        m.FileInstance.create(store=main, parent_dirs="x", file=name)
    m.FileInstance.create(store=other, parent_dirs="", file="b.dat", verify_result="missing")
    m.FileInstance.create(store=other, parent_dirs="y", file="a.dat", verify_result="ok")

    def build(name):
        return (m.FileInstance.select(m.FileInstance, m.Store).join(m.Store)
                .where((m.FileInstance.file == name) & m.FileInstance.in_service())
                .order_by(m.Store.name))
    reusable = m.Reusable(build)
    for name in ("a.dat", "b.dat", "a.dat", "none.dat"):
        got = [(i.store.name, i.store_path, i.verify_result) for i in reusable.rows(name)]
        assert got == [(i.store.name, i.store_path, i.verify_result) for i in build(name)]
    assert len(list(reusable.rows("a.dat"))) == 2 and len(list(reusable.rows("b.dat"))) == 1
    assert m.source_where(m.Source.name, "reader").level == "read-only"
    assert m.source_where(m.Source.name, "nobody") is None
    with pytest.raises(ValueError, match="one parameter"):
        m.Reusable(lambda v: m.File.select().where(m.File.name.startswith(v))).first("a")
