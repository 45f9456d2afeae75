"""Initial schema: stores, sessions, observations, files, instances, events,
sources (users) and issued staging directories.

A frozen copy of the models as they were when this migration landed; it does
not import models.py. Table and column names follow the existing HERA
deployment. Checks that need a regular expression are written per dialect.
"""

import peewee as pw


def _is_postgres(database):
    return isinstance(getattr(database, "obj", database), pw.PostgresqlDatabase)


def migrate(migrator, database, fake=False, **kwargs):
    if _is_postgres(database):
        md5_check = "md5 ~ '^[0-9a-f]{32}$'"
        no_slash = "strpos(name, '/') = 0"
    else:
        md5_check = "length(md5) = 32 AND md5 NOT GLOB '*[^0-9a-f]*'"
        no_slash = "instr(name, '/') = 0"

    @migrator.create_model
    class Store(pw.Model):
        id = pw.AutoField()
        name = pw.CharField(max_length=256, unique=True)
        ssh_host = pw.CharField(max_length=256)
        path_prefix = pw.CharField(max_length=1024)
        http_prefix = pw.CharField(max_length=1024, null=True)
        available = pw.BooleanField(default=True)

        class Meta:
            table_name = "store"
            constraints = [pw.Check("length(name) > 0")]

    @migrator.create_model
    class ObservingSession(pw.Model):
        id = pw.BigIntegerField(primary_key=True)
        start_time_jd = pw.DoubleField(index=True)
        stop_time_jd = pw.DoubleField(index=True)

        class Meta:
            table_name = "observing_session"
            constraints = [pw.Check("stop_time_jd >= start_time_jd")]

    @migrator.create_model
    class Observation(pw.Model):
        obsid = pw.BigIntegerField(primary_key=True)
        start_time_jd = pw.DoubleField(index=True)
        stop_time_jd = pw.DoubleField(null=True, index=True)
        start_lst_hr = pw.DoubleField(null=True, index=True)
        session = pw.ForeignKeyField(ObservingSession, null=True, column_name="session_id",
                                     on_delete="SET NULL")

        class Meta:
            table_name = "observation"
            constraints = [pw.Check("stop_time_jd IS NULL OR stop_time_jd >= start_time_jd"),
                           pw.Check("start_lst_hr IS NULL OR "
                                    "(start_lst_hr >= 0 AND start_lst_hr < 24)")]

    @migrator.create_model
    class File(pw.Model):
        name = pw.CharField(max_length=256, primary_key=True)
        type = pw.CharField(max_length=32, index=True)
        create_time = pw.DateTimeField(index=True)
        observation = pw.ForeignKeyField(Observation, null=True, column_name="obsid",
                                         on_delete="RESTRICT")
        size = pw.BigIntegerField(index=True)
        md5 = pw.CharField(max_length=32)
        source = pw.CharField(max_length=64, index=True)

        class Meta:
            table_name = "file"
            constraints = [pw.Check("size >= 0"), pw.Check(md5_check),
                           pw.Check("length(name) > 0 AND name <> '.' AND name <> '..' AND "
                                    + no_slash)]

    @migrator.create_model
    class FileInstance(pw.Model):
        store = pw.ForeignKeyField(Store, column_name="store", on_delete="RESTRICT")
        parent_dirs = pw.CharField(max_length=1024)
        file = pw.ForeignKeyField(File, column_name="name", on_delete="RESTRICT")
        deletion_policy = pw.IntegerField(default=0)

        class Meta:
            table_name = "file_instance"
            primary_key = pw.CompositeKey("store", "parent_dirs", "file")
            constraints = [pw.Check("deletion_policy IN (0, 1)")]

    @migrator.create_model
    class FileEvent(pw.Model):
        id = pw.AutoField()
        file = pw.ForeignKeyField(File, column_name="name", on_delete="RESTRICT")
        time = pw.DateTimeField(index=True)
        type = pw.CharField(max_length=64, index=True)
        payload = pw.TextField()

        class Meta:
            table_name = "file_event"

    @migrator.create_model
    class Source(pw.Model):
        id = pw.AutoField()
        name = pw.CharField(max_length=64, unique=True)
        lookup = pw.CharField(max_length=16, index=True)
        authenticator_hash = pw.CharField(max_length=256)
        level = pw.CharField(max_length=16)
        created = pw.DateTimeField()

        class Meta:
            table_name = "source"
            constraints = [pw.Check("level IN ('read-only', 'read-append', 'read-write', "
                                    "'admin')")]

    @migrator.create_model
    class StagingDir(pw.Model):
        id = pw.AutoField()
        store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
        path = pw.CharField(max_length=1024, unique=True)
        source = pw.CharField(max_length=64)
        created = pw.DateTimeField()

        class Meta:
            table_name = "staging_dir"


def rollback(migrator, database, fake=False, **kwargs):
    for name in ("staging_dir", "source", "file_event", "file_instance", "file",
                 "observation", "observing_session", "store"):
        migrator.remove_model(name)
