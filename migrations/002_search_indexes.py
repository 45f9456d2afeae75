"""Indexes and a maintained counter for searches at millions of files.

- `file.num_instances`: how many instances a file has here, kept exact by
  triggers on `file_instance` (insert and delete), so that
  `num-instances-*` clauses read a column instead of counting (an anti-join
  over a million files took ~400 ms), with a partial index for the common
  "no instance here" question.
- PostgreSQL: `text_pattern_ops` index on `file.name`, so that a LIKE
  prefix (`zen.2458043.%`) is an index range under any collation. (SQLite
  uses the primary key for that, LIKE being case-sensitive there too.)
"""

import peewee as pw


def _is_postgres(database):
    return isinstance(getattr(database, "obj", database), pw.PostgresqlDatabase)


PG_TRIGGERS = """
CREATE FUNCTION file_instance_count() RETURNS trigger AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        UPDATE file SET num_instances = num_instances + 1 WHERE name = NEW.name;
        RETURN NEW;
    ELSIF TG_OP = 'DELETE' THEN
        UPDATE file SET num_instances = num_instances - 1 WHERE name = OLD.name;
        RETURN OLD;
    ELSE
        IF NEW.name <> OLD.name THEN
            UPDATE file SET num_instances = num_instances - 1 WHERE name = OLD.name;
            UPDATE file SET num_instances = num_instances + 1 WHERE name = NEW.name;
        END IF;
        RETURN NEW;
    END IF;
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER file_instance_count AFTER INSERT OR DELETE OR UPDATE OF name ON file_instance
    FOR EACH ROW EXECUTE FUNCTION file_instance_count();
"""

SQLITE_TRIGGERS = [
    """CREATE TRIGGER file_instance_added AFTER INSERT ON file_instance BEGIN
        UPDATE file SET num_instances = num_instances + 1 WHERE name = NEW.name; END""",
    """CREATE TRIGGER file_instance_removed AFTER DELETE ON file_instance BEGIN
        UPDATE file SET num_instances = num_instances - 1 WHERE name = OLD.name; END""",
    """CREATE TRIGGER file_instance_renamed AFTER UPDATE OF name ON file_instance
        WHEN NEW.name <> OLD.name BEGIN
        UPDATE file SET num_instances = num_instances - 1 WHERE name = OLD.name;
        UPDATE file SET num_instances = num_instances + 1 WHERE name = NEW.name; END""",
]


def migrate(migrator, database, fake=False, **kwargs):
    File = migrator.orm["file"]
    migrator.add_fields(File, num_instances=pw.IntegerField(default=0,
                                                            constraints=[pw.SQL("DEFAULT 0")]))
    migrator.sql("UPDATE file SET num_instances = (SELECT COUNT(*) FROM file_instance "
                 "WHERE file_instance.name = file.name)")
    migrator.sql("CREATE INDEX file_without_instances ON file (name) WHERE num_instances = 0")
    migrator.sql("CREATE INDEX file_num_instances ON file (num_instances)")
    if _is_postgres(database):
        migrator.sql("ALTER TABLE file ADD CONSTRAINT file_num_instances_check "
                     "CHECK (num_instances >= 0)")
        migrator.sql(PG_TRIGGERS)
        migrator.sql("CREATE INDEX file_name_pattern ON file (name text_pattern_ops)")
    else:
        for statement in SQLITE_TRIGGERS:
            migrator.sql(statement)


def rollback(migrator, database, fake=False, **kwargs):
    if _is_postgres(database):
        migrator.sql("DROP TRIGGER file_instance_count ON file_instance")
        migrator.sql("DROP FUNCTION file_instance_count()")
        migrator.sql("DROP INDEX file_name_pattern")
    else:
        for name in ("file_instance_added", "file_instance_removed", "file_instance_renamed"):
            migrator.sql("DROP TRIGGER %s" % name)
    migrator.sql("DROP INDEX file_without_instances")
    migrator.sql("DROP INDEX file_num_instances")
    migrator.remove_fields("file", "num_instances")
