"""The configuration file: validation, defaults, and its documentation."""

import configparser
import os

import pytest

import settings
from stores import ssh as sshfs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "[server]\nsecret_key = s\n[database]\nurl = sqlite:///x.db\n"


def test_defaults_are_filled_in():
    config = settings.parse(BASE)
    assert config.server["port"] == 21106 and config.server["threads"] == 16
    # Clients that stop reading downloads from a store on another host hold
    # at most its SSH sessions, never every HTTP thread.
    assert config.server["threads"] > sshfs.SSHConnection.MAX_CHANNELS
    assert config.librarian["obsid_inference_mode"] == "none"
    assert config.librarian["permissions_mode"] == "readonly"
    assert config.librarian["standing_order_mode"] == "normal"


@pytest.mark.parametrize("extra,message", [
    ("[server]\ncolour = blue\n", "unknown key 'colour' in section [server]"),
    ("[serverz]\nport = 1\n", "unknown section [serverz]"),
    ("[store:]\npath_prefix = x\n", "unknown section [store:]"),
    ("[librarian]\nobsid_inference_mode = guess\n", "bad value 'guess' for obsid_inference_mode"),
    ("[store:a]\navailable = perhaps\n", "bad value 'perhaps' for available in [store:a]"),
    ("[store:a]\navailable = true\n", "missing key path_prefix in section [store:a]"),
    ("[source:x]\nauthenticator = a\nlevel = god\n", "bad value 'god' for level in [source:x]"),
    ("[server]\nbuffered_body_bytes = 1000\n",
     "[server] buffered_body_bytes (1000) must be at least max_body_bytes (33554432)"),
])
def test_bad_configuration_names_the_key(extra, message):
    text = BASE.replace("[server]\n", "[server]\n" + extra.split("\n", 1)[1]) \
        if extra.startswith("[server]") else BASE + extra
    with pytest.raises(settings.ConfigError) as e:
        settings.parse(text)
    assert message in str(e.value)


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_bad_port_is_refused(port):
    with pytest.raises(settings.ConfigError, match="bad value %r for port" % port):
        settings.parse(BASE.replace("secret_key = s", "secret_key = s\nport = %s" % port))


def test_missing_secret_key_and_database_are_refused():
    with pytest.raises(settings.ConfigError, match="missing key secret_key in section"):
        settings.parse("[database]\nurl = sqlite:///x.db\n")
    with pytest.raises(settings.ConfigError, match="missing key url in section \\[database\\]"):
        settings.parse("[server]\nsecret_key = s\n")
    with pytest.raises(settings.ConfigError, match="bad value 'mysql://x' for url"):
        settings.parse("[server]\nsecret_key = s\n[database]\nurl = mysql://x\n")


def test_example_config_is_valid_and_documents_every_key():
    path = os.path.join(ROOT, "config.example.ini")
    config = settings.load(path)
    assert config.stores["local"]["path_prefix"] == "var/store"
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    with open(path) as f:
        text = f.read()
    parser.read_string(text)
    for section, keys in settings.SCHEMA.items():
        for key in keys:
            assert ("\n%s = " % key in text) or ("\n# %s = " % key in text), \
                "config.example.ini does not document %s in [%s]" % (key, section)


def test_config_path_falls_back_to_environment_then_cwd(monkeypatch):
    monkeypatch.delenv("LIBRARIAN_CONFIG_PATH", raising=False)
    assert settings.find_config_path(None) == "librarian.ini"
    monkeypatch.setenv("LIBRARIAN_CONFIG_PATH", "/etc/lib.ini")
    assert settings.find_config_path(None) == "/etc/lib.ini"
    assert settings.find_config_path("given.ini") == "given.ini"


def test_a_source_gives_exactly_one_of_authenticator_and_its_hash():
    from argon2 import PasswordHasher

    hashed = PasswordHasher().hash("s3cret")
    config = settings.parse(BASE + "[source:v1]\nauthenticator_hash = %s\nlevel = read-only\n"
                            % hashed)
    assert config.sources["v1"] == {"authenticator": None, "authenticator_hash": hashed,
                                    "level": "read-only"}
    for body in ("authenticator = a\nauthenticator_hash = %s\n" % hashed, ""):
        with pytest.raises(settings.ConfigError, match=r"\[source:x\] needs exactly one of "
                           "authenticator .* and authenticator_hash"):
            settings.parse(BASE + "[source:x]\n%slevel = admin\n" % body)
    with pytest.raises(settings.ConfigError, match="bad value 'plaintext' for authenticator_hash "
                       r"in \[source:x\]: expected an Argon2 hash"):
        settings.parse(BASE + "[source:x]\nauthenticator_hash = plaintext\nlevel = admin\n")


def test_chown_command_is_split_into_words_as_a_shell_would():
    config = settings.parse(BASE + "[staging]\nchown_command = sudo -n 'my chown'\n")
    assert config.staging["chown_command"] == ["sudo", "-n", "my chown"]
    assert settings.parse(BASE).staging["chown_command"] is None
    with pytest.raises(settings.ConfigError, match="bad value .* for chown_command in "
                       r"\[staging\]: No closing quotation"):
        settings.parse(BASE + "[staging]\nchown_command = sudo 'unclosed\n")
