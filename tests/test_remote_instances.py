"""Copies other Librarians hold, between real servers on loopback ports:
recorded after a copy with the receiver's own checksum, searchable, shown,
forgotten when the peer deletes its copy, recomputed by `verify_file`,
counted for deletion, and used to repair a file that has no good copy
here any more."""

import json
import os

import pytest

from conftest import AUTH
from test_copies import call, events, files_on, make_librarian, wait_for

import librarian_client

NAME = "zen.2459000.5.dat"


def connection(to, source):
    return ("[connection:%s]\nurl = %s\nauthenticator = %s\nsource = %s\n"
            % (to[0], to[1].url, AUTH["writer"], source))


@pytest.fixture
def sites(tmp_path):
    """Two Librarians that know each other: each calls the other as its
    `writer` source. Yields (site_a, a_dir, site_b, b_dir)."""
    extra = "[librarian]\ndeletion_min_other_copies = 1\n"
    b, b_dir = make_librarian(tmp_path, "site_b", extra=extra)
    a, a_dir = make_librarian(tmp_path, "site_a", extra=extra + connection(("site_b", b),
                                                                             "writer"))
    with open(b.config_path, "a") as f:
        f.write(connection(("site_a", a), "writer"))
    a.start()
    b.start()
    yield a, a_dir, b, b_dir
    a.stop()
    b.stop()


def upload(server, body, policy="allowed"):
    path = os.path.join(os.path.dirname(server.config_path), NAME)
    with open(path, "wb") as f:
        f.write(body)
    client = librarian_client.LibrarianClient(conn_config={"url": server.url,
                                                           "authenticator": AUTH["admin"]})
    client.upload(path, "2459000/" + NAME, null_obsid=True, deletion_policy=policy)


def copied(a, b):
    call(a, "launch_file_copy", who="writer", file_name=NAME, connection_name="site_b")
    return wait_for(lambda: call(a, "search", search=json.dumps({"name-is-exactly": NAME}),
                                 output_format="remote-instance-listing-json")["results"])


def test_a_copy_records_the_receivers_checksum_and_is_forgotten_when_it_deletes(sites):
    a, a_dir, b, b_dir = sites
    body = os.urandom(200000)
    upload(a, body)
    remote = copied(a, b)
    md5 = files_on(a, {"name-is-exactly": NAME})[0]["md5"]
    assert [(r["librarian"], r["store_name"], r["store_path"], r["md5"], r["size"])
            for r in remote] == [("site_b", "main", "2459000/" + NAME, md5, len(body))]
    # Searchable by count and by Librarian, shown on the file page.
    assert files_on(a, {"num-remote-instances-is-exactly": 1})[0]["name"] == NAME
    assert files_on(a, {"num-remote-instances-greater-than": 0, "has-remote-instance-at":
                        "site_b"})[0]["name"] == NAME
    assert files_on(a, {"has-remote-instance-at": "elsewhere"}) == []
    assert files_on(a, {"num-remote-instances-less-than": 1}) == []

    # verify_file: both copies recomputed, the peer's by the peer.
    copies = call(a, "verify_file", who="writer", file_name=NAME)["copies"]
    assert sorted((c["librarian"], c["ok"], c["md5"], c["size"]) for c in copies) == [
        ("Test", True, md5, len(body)), ("site_b", True, md5, len(body))]
    assert [c["store_path"] for c in copies if c["librarian"] == "site_b"] == [
        "2459000/" + NAME]

    # The receiver recorded where the file came from.
    origin = wait_for(lambda: call(b, "search", search=json.dumps({"name-is-exactly": NAME}),
                                   output_format="remote-instance-listing-json")["results"])
    assert [(r["librarian"], r["store_path"], r["md5"]) for r in origin] == [
        ("site_a", "2459000/" + NAME, md5)]

    # The copy it came from is shown but never counted there: the peer may not
    # delete its copy on the sender's word (each counting the other, both could).
    call(b, "set_one_file_deletion_policy", who="writer", file_name=NAME,
         deletion_policy="allowed")
    noop = call(b, "delete_file_instances", who="writer", file_name=NAME, mode="noop")
    assert noop["instances"][0]["reason"] == "it is the last good copy known anywhere"
    # With the original's rule there, the peer deletes it, and tells the
    # sender, which forgets it.
    b.stop()
    text = open(b.config_path).read().replace("deletion_min_other_copies = 1",
                                              "deletion_min_other_copies = 0")
    open(b.config_path, "w").write(text)
    b.start()
    assert call(b, "delete_file_instances", who="writer", file_name=NAME)["n_deleted"] == 1
    assert call(a, "search", search=json.dumps({"name-is-exactly": NAME}),
                output_format="remote-instance-listing-json")["results"] == []
    assert files_on(a, {"num-remote-instances-is-exactly": 0})[0]["name"] == NAME


def test_deletion_counts_a_verified_remote_copy(sites):
    a, a_dir, b, b_dir = sites
    upload(a, os.urandom(50000))
    noop = call(a, "delete_file_instances", who="writer", file_name=NAME, mode="noop")
    assert noop["instances"][0]["action"] == "keep"
    copied(a, b)
    noop = call(a, "delete_file_instances", who="writer", file_name=NAME, mode="noop")
    assert noop["instances"] == [{"store_name": "main", "store_path": "2459000/" + NAME,
                                  "action": "delete", "reason": "allowed, and safe elsewhere"}]
    assert call(a, "delete_file_instances", who="writer", file_name=NAME)["n_deleted"] == 1
    # The peer was told: for it, its copy is now the last good one known anywhere.
    call(b, "set_one_file_deletion_policy", who="writer", file_name=NAME,
         deletion_policy="allowed")
    reply = call(b, "delete_file_instances", who="writer", file_name=NAME, mode="noop")
    assert reply["instances"][0]["reason"] == "it is the last good copy known anywhere"


def test_a_file_with_no_good_copy_here_is_fetched_back_from_the_peer(sites):
    a, a_dir, b, b_dir = sites
    body = os.urandom(300000)
    upload(a, body)
    copied(a, b)
    path = a_dir / "store" / "2459000" / NAME
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(b"XXXX")
    copies = call(a, "verify_file", who="writer", file_name=NAME)["copies"]
    assert [c["ok"] for c in copies if c["librarian"] == "Test"] == [False]
    wait_for(lambda: any(t == "instance_repaired" for t, _ in events(a_dir, NAME)))
    with open(path, "rb") as f:
        assert f.read() == body
    repaired = [p for t, p in events(a_dir, NAME) if t == "instance_repaired"]
    assert repaired[0]["from"] == "Librarian site_b"


def test_a_forged_or_stale_remote_copy_makes_no_deletion_safe(sites):
    a, a_dir, b, b_dir = sites
    upload(a, os.urandom(40000))
    # A Librarian's word that it sent us the file (copy_held) is not a copy
    # that makes ours deletable.
    forged = call(a, "copy_held", who="writer", file_name=NAME, store_name="nowhere",
                  store_path="x/" + NAME)
    assert forged["recorded"] == 1
    noop = call(a, "delete_file_instances", who="writer", file_name=NAME, mode="noop")
    assert noop["instances"][0]["reason"] == "it is the last good copy known anywhere"
    # A copy we sent counts only while its Librarian confirms it when asked.
    call(a, "launch_file_copy", who="writer", file_name=NAME, connection_name="site_b")
    wait_for(lambda: [r for r in call(a, "search", search=json.dumps({"name-is-exactly": NAME}),
                                      output_format="remote-instance-listing-json")["results"]
                      if not r["origin"]])
    noop = call(a, "delete_file_instances", who="writer", file_name=NAME, mode="noop")
    assert noop["instances"][0]["action"] == "delete"
    b.stop()
    noop = call(a, "delete_file_instances", who="writer", file_name=NAME, mode="noop")
    assert noop["instances"][0]["reason"] == "it is the last good copy known anywhere"
    b.start()
