"""The server's INI configuration: reading, validating and casting it once.

`load(path)` returns a `Settings` object whose attributes are already of
the right type; any unknown section or key, missing required key or bad
value raises `ConfigError` with a message that names it. Every key is
documented in `config.example.ini`, which a test checks against `SCHEMA`.
"""

import configparser
import functools
import math
import os
import re
import shlex
import socket

from models import LEVELS, STORE_NAME_RE, check_authenticator_hash

DEFAULT_PORT = 21106


class ConfigError(Exception):
    """The configuration is unusable; the message names the key."""


def _bool(value):
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _port(value):
    port = int(value)
    if not 0 < port < 65536:
        raise ValueError("expected a TCP port between 1 and 65535")
    return port


def _positive_int(value):
    n = int(value)
    if n < 1:
        raise ValueError("expected a whole number of at least 1")
    return n


def _positive_float(value):
    x = float(value)
    if not (x > 0 and math.isfinite(x)):
        raise ValueError("expected a finite number above 0")
    return x


def _url(value):
    if not value.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


def _non_negative_int(value):
    n = int(value)
    if n < 0:
        raise ValueError("expected a whole number of at least 0")
    return n


def _fraction(value):
    x = float(value)
    if not 0 < x <= 1:
        raise ValueError("expected a fraction above 0 and at most 1")
    return x


def choice(*allowed):
    """A cast accepting only the values `allowed` (ValueError naming them)."""
    def cast(value):
        if value not in allowed:
            raise ValueError("expected one of %s" % ", ".join(allowed))
        return value
    return cast


def _log_level(value):
    return choice("DEBUG", "INFO", "WARNING", "ERROR")(value.upper())


def _timezone(value):
    import zoneinfo

    try:
        zoneinfo.ZoneInfo(value)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ValueError("expected an IANA time zone such as Africa/Johannesburg") from None
    return value


def _db_url(value):
    if not value.startswith(("sqlite:///", "postgresql://", "postgres://")):
        raise ValueError("expected sqlite:///PATH or postgresql://USER@HOST:PORT/DB")
    return value


def _words(value):
    words = value.split()
    if not words:
        raise ValueError("expected one or more names")
    return words


def _command(value):
    words = shlex.split(value)
    if not words:
        raise ValueError("expected a command")
    return words


def _nonempty(value):
    if not value.strip():
        raise ValueError("may not be empty")
    return value.strip()


# section -> key -> (cast, default); a default of REQUIRED must be given.
REQUIRED = object()
SCHEMA = {
    "server": {
        "host": (_nonempty, "127.0.0.1"),
        "port": (_port, DEFAULT_PORT),
        "secret_key": (_nonempty, REQUIRED),
        "displayed_site_name": (_nonempty, "Librarian"),
        "log_level": (_log_level, "INFO"),
        "threads": (_positive_int, 16),
        "telescope_timezone": (_timezone, "Africa/Johannesburg"),
        "workers": (_non_negative_int, 1),
        "task_retry_seconds": (_positive_float, 10.0),
        "task_max_attempts": (_positive_int, 5),
        "protocol_additions": (_bool, True),
        "max_body_bytes": (_positive_int, 32 << 20),
        "buffered_body_bytes": (_positive_int, 256 << 20),
        "upload_expiry_hours": (_positive_float, 24.0),
        "uploads_per_caller": (_positive_int, 100),
        "connection_limit": (_positive_int, 1000),
        "channel_timeout": (_positive_float, 60.0),
        "send_timeout": (_positive_float, 60.0),
        "search_timeout_seconds": (_positive_float, 30.0),
        "searches_per_caller": (_positive_int, 4),
        "reader_memory_bytes": (_positive_int, 2 << 30),
        "reader_seconds": (_positive_float, 60.0),
        "metrics_public": (_bool, True),
    },
    "database": {
        "url": (_db_url, REQUIRED),
    },
    "librarian": {
        "obsid_inference_mode": (choice("none", "hera"), "none"),
        "permissions_mode": (choice("readonly", "unchanged"), "readonly"),
        "standing_order_mode": (choice("normal", "disabled", "nighttime"), "normal"),
        "standing_order_delay": (_positive_float, 60.0),
        "standing_order_interval": (_positive_float, 600.0),
        "scrub_bytes_per_second": (_non_negative_int, 50_000_000),
        "scrub_period_days": (_positive_float, 30.0),
        "deletion_min_other_copies": (_non_negative_int, 1),
        "remote_verify_max_age_days": (_positive_float, 30.0),
        "remote_confirm_hours": (_positive_float, 24.0),
        "alert_webhook_url": (_url, None),
        "store_full_fraction": (_fraction, 0.95),
        "reconcile_interval_hours": (_positive_float, 24.0),
    },
    "store:*": {
        "path_prefix": (_nonempty, REQUIRED),
        "ssh_host": (_nonempty, None),
        "available": (_bool, True),
        "transport": (choice("local", "ssh"), None),
        "ssh_user": (_nonempty, None),
        "ssh_port": (_port, 22),
        "ssh_key": (_nonempty, None),
        "known_hosts": (_nonempty, None),
        "ssh_timeout": (_positive_float, 15.0),
        "scrub_bytes_per_second": (_non_negative_int, None),
    },
    "staging": {
        "dest_prefix": (_nonempty, None),
        "chown_command": (_command, None),
        "chown_timeout": (_positive_float, 600.0),
    },
    "connection:*": {
        "url": (_url, REQUIRED),
        "authenticator": (_nonempty, REQUIRED),
        "ssh_user": (_nonempty, None),
        "ssh_port": (_port, 22),
        "ssh_key": (_nonempty, None),
        "known_hosts": (_nonempty, None),
        "ssh_timeout": (_positive_float, 15.0),
        "ssh_hosts": (_words, None),
        "source": (_nonempty, None),
        "copies_in_flight": (_positive_int, 2),
    },
    "rolling_deletion:*": {
        "store": (_nonempty, REQUIRED),
        "older_than_days": (_positive_float, REQUIRED),
        "min_other_copies": (_positive_int, 1),
        "every_hours": (_positive_float, 24.0),
        "noop": (_bool, False),
    },
    "source:*": {
        # Exactly one of the two (checked in `parse`).
        "authenticator": (_nonempty, None),
        "authenticator_hash": (check_authenticator_hash, None),
        "level": (choice(*LEVELS), REQUIRED),
    },
}


class Settings:
    """Validated configuration. Attributes: `server`, `database`,
    `librarian` (dicts of cast values), `stores`, `sources` and
    `connections` (dicts from NAME to dicts), `path` (the file it came
    from, or None), `database_shown` (the database URL without its
    password, for messages)."""

    def __init__(self, sections, path=None):
        self.path = path
        self.server = sections["server"]
        self.database = sections["database"]
        self.librarian = sections["librarian"]
        self.stores = sections["store:*"]
        self.sources = sections["source:*"]
        self.connections = sections["connection:*"]
        self.rolling_deletions = sections["rolling_deletion:*"]
        self.staging = sections["staging"]
        self.database_shown = redact_url(self.database["url"])  # for messages: no password


def _cast_section(label, schema, items):
    out = {}
    for key, raw in items.items():
        if key not in schema:
            raise ConfigError("unknown key %r in section [%s]" % (key, label))
        cast = schema[key][0]
        try:
            out[key] = cast(raw)
        except ValueError as e:
            raise ConfigError("bad value %r for %s in [%s]: %s" % (raw, key, label, e)) from None
    for key, (cast, default) in schema.items():
        if key not in out:
            if default is REQUIRED:
                raise ConfigError("missing key %s in section [%s]" % (key, label))
            out[key] = default
    return out


def parse(text, path=None):
    """Validate INI `text`; returns `Settings`. Raises `ConfigError`."""
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    parser.optionxform = str  # keys are case-sensitive, as documented
    try:
        parser.read_string(text, source=path or "<config>")
    except configparser.Error as e:
        raise ConfigError("cannot parse configuration: %s" % e) from None

    sections = {"store:*": {}, "source:*": {}, "connection:*": {}, "rolling_deletion:*": {}}
    for label in parser.sections():
        items = dict(parser.items(label))
        if ":" in label:
            kind, _, name = label.partition(":")
            key = kind + ":*"
            if key not in SCHEMA or not name:
                raise ConfigError("unknown section [%s]" % label)
            if kind == "store" and not STORE_NAME_RE.match(name):
                raise ConfigError("bad store name in [%s]: use 1 to 64 letters, digits, '.', "
                                  "'_' or '-'" % label)
            sections[key][name] = _cast_section(label, SCHEMA[key], items)
        elif label in SCHEMA:
            sections[label] = _cast_section(label, SCHEMA[label], items)
        else:
            raise ConfigError("unknown section [%s]" % label)
    for label in ("server", "database", "librarian", "staging"):
        if label not in sections:
            sections[label] = _cast_section(label, SCHEMA[label], {})
    server = sections["server"]
    if server["buffered_body_bytes"] < server["max_body_bytes"]:
        raise ConfigError("[server] buffered_body_bytes (%d) must be at least max_body_bytes (%d)"
                          % (server["buffered_body_bytes"], server["max_body_bytes"]))
    for name, source in sections["source:*"].items():
        if (source["authenticator"] is None) == (source["authenticator_hash"] is None):
            raise ConfigError("[source:%s] needs exactly one of authenticator (the secret "
                              "itself) and authenticator_hash (its Argon2 hash)" % name)
    for name, store in sections["store:*"].items():
        if store["ssh_host"] is None:
            store["ssh_host"] = socket.gethostname()
        remote = store["transport"] == "ssh" or (store["transport"] is None
                                                  and not names_this_host(store["ssh_host"]))
        if remote and not store["path_prefix"].startswith("/"):
            raise ConfigError("[store:%s] path_prefix must be an absolute path on %s when "
                              "transport = ssh" % (name, store["ssh_host"]))
    return Settings(sections, path)


def redact_url(url):
    """`url` without the password it may hold (`user:PASSWORD@`, or a
    `password=` argument), for messages and logs."""
    url = re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", url)
    return re.sub(r"(?i)([?&]password=)[^&]*", r"\1***", url)


@functools.lru_cache(maxsize=256)
def names_this_host(host):
    """Whether `host` is a name of the host this server runs on (a store
    there is reached directly unless `transport = ssh`). Kept per process:
    `getfqdn` may ask the resolver, and stores are opened per request."""
    return host in ("localhost", "127.0.0.1", "::1", socket.gethostname(), socket.getfqdn())


def find_config_path(given=None):
    """The configuration file to use: `given`, else `$LIBRARIAN_CONFIG_PATH`,
    else `./librarian.ini`."""
    return given or os.environ.get("LIBRARIAN_CONFIG_PATH") or "librarian.ini"


def load(path):
    """Read and validate the file at `path`; raises `ConfigError` if it is
    missing or invalid."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError("cannot read configuration file %s: %s" % (path, e.strerror)) from None
    return parse(text, path)
