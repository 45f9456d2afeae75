"""An original (v1) Librarian's database, for the adoption tests and
bench/adopt.py: its schema as V1-SITE.md lists it (and its alembic
revisions define it), on PostgreSQL or SQLite, at revision 464899566429.

On SQLite, times are text as SQLAlchemy writes them
('YYYY-MM-DD HH:MM:SS.ffffff') and booleans 0/1.
"""

V1_REVISION = "464899566429"

SCHEMA = [
    "CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL PRIMARY KEY)",
    """CREATE TABLE observing_session (id BIGINT NOT NULL PRIMARY KEY,
        start_time_jd DOUBLE PRECISION NOT NULL, stop_time_jd DOUBLE PRECISION NOT NULL)""",
    """CREATE TABLE standing_order (id INTEGER NOT NULL PRIMARY KEY,
        name VARCHAR(64) NOT NULL UNIQUE, search TEXT NOT NULL, conn_name VARCHAR(64) NOT NULL)""",
    """CREATE TABLE store (id BIGINT NOT NULL PRIMARY KEY, name VARCHAR(256) NOT NULL UNIQUE,
        ssh_host VARCHAR(256) NOT NULL, path_prefix VARCHAR(256) NOT NULL,
        http_prefix VARCHAR(256), available BOOLEAN NOT NULL)""",
    """CREATE TABLE observation (obsid BIGINT NOT NULL PRIMARY KEY,
        start_time_jd DOUBLE PRECISION NOT NULL, stop_time_jd DOUBLE PRECISION,
        start_lst_hr DOUBLE PRECISION, session_id BIGINT REFERENCES observing_session (id))""",
    """CREATE TABLE file (name VARCHAR(256) NOT NULL PRIMARY KEY, type VARCHAR(32) NOT NULL,
        create_time TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        obsid BIGINT REFERENCES observation (obsid), size BIGINT NOT NULL,
        md5 VARCHAR(32) NOT NULL, source VARCHAR(64) NOT NULL)""",
    """CREATE TABLE file_event (id BIGINT NOT NULL PRIMARY KEY,
        name VARCHAR(256) REFERENCES file (name), time TIMESTAMP WITHOUT TIME ZONE NOT NULL,
        type VARCHAR(64), payload TEXT)""",
    """CREATE TABLE file_instance (store BIGINT NOT NULL REFERENCES store (id),
        parent_dirs VARCHAR(128) NOT NULL, name VARCHAR(256) NOT NULL REFERENCES file (name),
        deletion_policy INTEGER DEFAULT '0' NOT NULL, PRIMARY KEY (store, parent_dirs, name))""",
    "CREATE INDEX file_event_name ON file_event (name)",
    "CREATE INDEX file_instance_name ON file_instance (name)",
    "INSERT INTO alembic_version (version_num) VALUES ('%s')" % V1_REVISION,
]

COLUMNS = {
    "store": ("id", "name", "ssh_host", "path_prefix", "http_prefix", "available"),
    "observing_session": ("id", "start_time_jd", "stop_time_jd"),
    "observation": ("obsid", "start_time_jd", "stop_time_jd", "start_lst_hr", "session_id"),
    "file": ("name", "type", "create_time", "obsid", "size", "md5", "source"),
    "file_instance": ("store", "parent_dirs", "name", "deletion_policy"),
    "file_event": ("id", "name", "time", "type", "payload"),
    "standing_order": ("id", "name", "search", "conn_name"),
}


def create(cursor):
    """Create the v1 tables, indexes and revision with a DB-API cursor."""
    for statement in SCHEMA:
        cursor.execute(statement)


def insert(cursor, table, rows, param="%s"):
    """Insert rows (tuples in COLUMNS order) into a v1 table; `param` is
    the driver's placeholder ('%s' for psycopg2, '?' for sqlite3)."""
    cols = COLUMNS[table]
    cursor.executemany("INSERT INTO %s (%s) VALUES (%s)" % (table, ", ".join(cols),
                                                          ", ".join([param] * len(cols))), rows)
