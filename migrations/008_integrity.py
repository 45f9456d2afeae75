"""Integrity: when each instance's bytes were last read in full and what
that found (`file_instance.verified_at`, `verify_result`), and the copies
other Librarians hold (`remote_instance`); see `integrity`."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    FileInstance = migrator.orm["file_instance"]
    migrator.add_fields(FileInstance, verified_at=pw.DateTimeField(null=True),
                        verify_result=pw.CharField(max_length=16, null=True))
    migrator.add_index(FileInstance, "store", "verified_at")
    File = migrator.orm["file"]

    @migrator.create_model
    class RemoteInstance(pw.Model):
        id = pw.AutoField()
        file = pw.ForeignKeyField(File, column_name="name", on_delete="CASCADE")
        librarian = pw.CharField(max_length=64)
        store_name = pw.CharField(max_length=256)
        store_path = pw.CharField(max_length=1024)
        md5 = pw.CharField(max_length=32)
        size = pw.BigIntegerField()
        verified_at = pw.DateTimeField()
        confirmed_at = pw.DateTimeField(index=True)
        origin = pw.BooleanField(default=False)

        class Meta:
            table_name = "remote_instance"
            indexes = ((("file", "librarian"), True),)


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("remote_instance")
    migrator.drop_index("file_instance", "store", "verified_at")
    migrator.remove_fields("file_instance", "verified_at", "verify_result")
