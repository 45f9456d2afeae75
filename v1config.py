"""The original (v1) Librarian's configuration file as ours: its
`server-config.json` (and the connections of `~/.hl_client.cfg`) written as
an INI file with every setting that has a counterpart in
`config.example.ini` (`convert_config`, behind `librarian.py
adopt-v1-config`). Keys without one become comments saying why. Sources
are written with an Argon2 hash of their authenticator only.
"""

import json
import os
import re
import shlex

import models
from adopt import AdoptError, database_url
from settings import choice, redact_url


def load_commented_json(text, path):
    """The object in `text`: JSON as operators write server-config.json,
    following the original's sample: `#` comments (whole lines, or after a
    value) outside strings, and trailing commas. Comments become spaces, so
    that errors point at the right place. Raises `AdoptError` naming `path`,
    line and column for anything else that is not JSON, or a top level that
    is not an object."""
    out, last, in_string, i = [], None, False, 0
    while i < len(text):
        ch = text[i]
        if in_string:
            if ch == "\\":
                out.append(text[i:i + 2])
                i += 2
                continue
            in_string = ch != '"'
        elif ch == "#":
            end = text.find("\n", i)
            end = len(text) if end < 0 else end
            out.append(" " * (end - i))
            i = end
            continue
        elif ch in "}]" and last is not None and out[last] == ",":
            out[last] = " "  # a trailing comma
        elif ch == '"':
            in_string = True
        out.append(ch)
        if not ch.isspace():
            last = len(out) - 1
        i += 1
    try:
        value = json.loads("".join(out))
    except json.JSONDecodeError as e:
        raise AdoptError("%s: line %d, column %d: %s" % (path, e.lineno, e.colno, e.msg)) \
            from None
    if not isinstance(value, dict):
        raise AdoptError("%s: expected a JSON object at the top" % path)
    return value


NOT_CARRIED = {
    "server": "this server always runs waitress ([server] threads: its HTTP threads)",
    "n_server_processes": "one process serves HTTP here; run more workers with `librarian.py "
                          "worker` ([server] workers)",
    "report_to_mandc": "reporting to HERA M&C is not part of this server",
    "flask_debug": "there is no Flask debug mode here (log_level = DEBUG logs more)",
    "SQLALCHEMY_TRACK_MODIFICATIONS": "an SQLAlchemy setting; this server uses Peewee",
    "_ignore_me_dummy": "a placeholder of the original's sample file",
    "local_disk_staging.ssh_host": "staging here always writes to this host's file system",
    "local_disk_staging.displayed_dest": "the web pages here do not name the staging area",
    "local_disk_staging.username_placeholder": "the web pages here do not ask for a user name",
}
SECTION_NAME_RE = re.compile(r"^[^\]\s:][^\]\n\r]{0,63}$")


def _v1_text(value):
    if not isinstance(value, str) or not value.strip() or "\n" in value or "\r" in value:
        raise ValueError("expected one line of text")
    return value.strip()


def _v1_secret(value):
    """An authenticator exactly as the original compared it (to be hashed:
    spaces at its ends are part of it)."""
    if not isinstance(value, str) or not value or "\n" in value or "\r" in value:
        raise ValueError("expected one line of text")
    return value


def _v1_ini_secret(value):
    """An authenticator written as an INI value, which cannot keep spaces
    at its ends."""
    if _v1_secret(value) != value.strip():
        raise ValueError("has spaces at its ends, which an INI value cannot keep")
    return value


def _v1_int(low, high, why=""):
    def cast(value):
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError("expected a whole number from %d to %d%s" % (low, high, why))
        return value
    return cast


def _v1_log_level(value):
    if str(value).lower() not in ("debug", "info", "warning", "error"):
        raise ValueError("expected debug, info, warning or error (the original used info)")
    return value.upper()


def _v1_words(value):
    if not isinstance(value, list) or not value or not all(
            isinstance(w, str) and "\n" not in w and "\r" not in w for w in value):
        raise ValueError("expected a list of words (each without line breaks)")
    return shlex.join(value)


def _v1_bool(value):
    if not isinstance(value, bool):
        raise ValueError("expected true or false")
    return str(value).lower()


def _v1_url(value):
    if not _v1_text(value).startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return value


# v1 key -> ("section.key" here, cast raising ValueError with the reason)
TOP_KEYS = {
    "SECRET_KEY": ("server.secret_key", _v1_text),
    "displayed_site_name": ("server.displayed_site_name", _v1_text),
    "host": ("server.host", _v1_text),
    "port": ("server.port", _v1_int(1, 65535)),
    "log_level": ("server.log_level", _v1_log_level),
    "n_worker_threads": ("server.workers", _v1_int(0, 64, "; [server] workers keeps its "
                                                        "default")),
    "standing_order_mode": ("librarian.standing_order_mode",
                            choice("normal", "disabled", "nighttime")),
    "permissions_mode": ("librarian.permissions_mode", choice("readonly", "unchanged")),
    "obsid_inference_mode": ("librarian.obsid_inference_mode", choice("none", "hera")),
}
STAGING_KEYS = {"dest_prefix": ("staging.dest_prefix", _v1_text),
                "chown_command": ("staging.chown_command", _v1_words)}
STORE_KEYS = {"path_prefix": ("path_prefix", _v1_text), "ssh_host": ("ssh_host", _v1_text),
              "available": ("available", _v1_bool)}
CONNECTION_KEYS = {"url": ("url", _v1_url), "authenticator": ("authenticator", _v1_ini_secret)}


class _Ini:
    """INI sections being written, and the keys that were not carried over."""

    def __init__(self):
        self.sections, self.skipped = {}, []

    def set(self, target, value):
        section, key = target.split(".", 1)
        self.sections.setdefault(section, []).append("%s = %s" % (key, value))

    def note(self, section, comment):
        self.sections.setdefault(section, [])[:0] = ["# " + c for c in comment.split("\n")]

    def skip(self, key, why, value=None, show=True):
        shown = json.dumps(value, ensure_ascii=False) if show else "..."
        self.skipped.append("#   %s = %s: %s" % (key, shown if len(shown) <= 60
                                                 else shown[:57] + "...", why))

    def carry(self, prefix, spec, keys, section=None, show=True, handled=()):
        """Write the keys of the v1 object `spec` that `keys` maps (v1 key
        -> (target, cast)), into `section` if given; skip the others but
        `handled` with the reason (values hidden unless `show`: they may be
        secrets). Returns the targets written."""
        if not isinstance(spec, dict):
            self.skip(prefix.rstrip("."), "expected an object", spec, show)
            return set()
        written = set()
        for key, value in spec.items():
            try:
                if key not in keys and key not in handled:
                    raise ValueError(NOT_CARRIED.get(prefix + key, "not known to this server"))
                if key in keys:
                    target, cast = keys[key]
                    self.set(target if section is None else section + "." + target,
                             cast(value))
                    written.add(target)
            except ValueError as e:
                self.skip(prefix + key, str(e), value, show)
        return written

    def entries(self, prefix, spec, name_re, kind, required, keys, show=False):
        """[kind:NAME] sections from the v1 object `spec` of named objects;
        an entry with a bad name or without the `required` keys is skipped.
        Returns the names written."""
        if spec is not None and not isinstance(spec, dict):
            self.skip(prefix.rstrip("."), "expected an object", spec, show)
        written = []
        for name, entry in (spec or {}).items() if isinstance(spec, dict) else ():
            section = "%s:%s" % (kind, name)
            if not name_re.match(name):
                self.skip(prefix + name, "not a usable %s name here" % kind, show=False)
            elif not isinstance(entry, dict):
                self.skip(prefix + name, "expected an object", show=False)
            elif {keys[r][0] for r in required} <= self.carry(prefix + name + ".", entry, keys,
                                                              section, show):
                written.append(name)
            else:
                self.sections.pop(section, None)
                self.skip(prefix + name, "needs %s" % " and ".join(required), show=False)
        return written

    def text(self, header):
        out = header + ["#", "# Not carried over from the original:"] + \
            (self.skipped or ["#   (nothing)"])
        for section, lines in self.sections.items():
            out += ["", "[%s]" % section] + lines
        return "\n".join(out) + "\n"


def convert_config(v1, level, connections=None, names=("server-config.json", None),
                   database=None, admins=()):
    """The INI text (our `config.example.ini` keys) for the v1 server
    configuration `v1` (a dict, as `load_commented_json` returns it).

    `level` is given to every source but those in `admins`, which get
    `admin` (the original had no levels); each
    source's authenticator is written as its Argon2 hash. `connections` is
    the `connections` object of a `~/.hl_client.cfg`; `names` the two
    files' paths, for the header; `database` our database URL when it is
    not v1's own (adoption needs a fresh one). Keys with no counterpart
    here become comments saying why. Raises `AdoptError` on an unusable
    database URI or bad level, or if the result would not load."""
    import secrets

    from argon2 import PasswordHasher

    import settings

    if level not in models.LEVELS:
        raise AdoptError("level must be one of %s, got %r" % (", ".join(models.LEVELS), level))
    uri = v1.get("SQLALCHEMY_DATABASE_URI")
    if not isinstance(uri, str):
        raise AdoptError("%s has no SQLALCHEMY_DATABASE_URI" % names[0])
    v1_url = database_url(uri, "SQLALCHEMY_DATABASE_URI")

    ini = _Ini()
    written = ini.carry("", v1, TOP_KEYS, handled=("SQLALCHEMY_DATABASE_URI",
                                                   "local_disk_staging", "add-stores", "sources"))
    ini.note("librarian", "While the original still serves this site, set standing_order_mode "
             "= disabled:\nboth would copy the same files (adopted standing orders run at "
             "once).")
    if "server.secret_key" not in written:
        ini.set("server.secret_key", secrets.token_hex(32))
        ini.note("server", "The original had no usable SECRET_KEY: a new random one.")
    ini.set("database.url", database_url(database) if database else v1_url)
    ini.note("database", "A fresh database for `librarian.py migrate`, then `librarian.py "
             "adopt-v1 --from %s`." % redact_url(v1_url) if database else
             "The original's own database (SQLALCHEMY_DATABASE_URI). adopt-v1 copies it into "
             "a fresh,\nmigrated database: create one, put its URL here (or use "
             "--database-url), then\n  librarian.py migrate --config THIS\n"
             "  librarian.py adopt-v1 --from %s --config THIS" % redact_url(v1_url))
    if "local_disk_staging" in v1:
        ini.carry("local_disk_staging.", v1["local_disk_staging"], STAGING_KEYS)
    ini.entries("add-stores.", v1.get("add-stores"), models.STORE_NAME_RE, "store",
                ("path_prefix",), STORE_KEYS, show=True)
    hasher = PasswordHasher()
    source_keys = {"authenticator": ("authenticator_hash", lambda v: hasher.hash(_v1_secret(v)))}
    for name in ini.entries("sources.", v1.get("sources"), SECTION_NAME_RE, "source",
                            ("authenticator",), source_keys):
        ini.set("source:%s.level" % name, "admin" if name in admins else level)
        ini.note("source:" + name, "The original let every source do everything; the level "
                 "is adopt-v1-config's %s (change it here: it applies at the next start)."
                 % ("--admin" if name in admins else "--level"))
    missing = sorted(set(admins) - set(v1.get("sources") or {}))
    if missing:
        raise AdoptError("--admin names %s, not among the sources of %s"
                         % (", ".join(missing), names[0]))
    ini.entries("connections.", connections, SECTION_NAME_RE, "connection",
                ("url", "authenticator"), CONNECTION_KEYS)

    header = ["# Converted by `librarian.py adopt-v1-config` from %s%s on %sZ." % (
        names[0], " and connections of %s" % names[1] if names[1] else "",
        models.utcnow().isoformat()), "# config.example.ini documents every key."]
    text = ini.text(header)
    try:
        settings.parse(text)
    except settings.ConfigError as e:
        raise AdoptError("the converted configuration would not load: %s" % e) from None
    return text


def read_config_files(config_path, client_path):
    """(v1 server configuration, connections or None, client path used) from
    the files; `client_path` None means $HL_CLIENT_CFG or ~/.hl_client.cfg
    if it exists. Raises `AdoptError` naming a file that cannot be read."""
    explicit = client_path is not None
    client_path = client_path or os.path.expanduser(os.environ.get("HL_CLIENT_CFG")
                                                    or "~/.hl_client.cfg")

    def read(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise AdoptError("cannot read %s: %s" % (path, getattr(e, "strerror", e))) from None

    v1 = load_commented_json(read(config_path), config_path)
    if not explicit and not os.path.exists(client_path):
        return v1, None, None
    client = load_commented_json(read(client_path), client_path)
    return v1, client.get("connections", {}), client_path
