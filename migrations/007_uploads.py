"""Resumable uploads (tus 1.0): one row per upload in progress or recently
finished; see `uploads`. And the folders that stagings made, with the
source that asked (`staging_destination`)."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    Store = migrator.orm["store"]

    @migrator.create_model
    class Upload(pw.Model):
        id = pw.CharField(max_length=32, primary_key=True)
        source = pw.CharField(max_length=64)
        store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
        staging = pw.CharField(max_length=1024)
        dest_store_path = pw.CharField(max_length=1024)
        length = pw.BigIntegerField()
        offset = pw.BigIntegerField(default=0)
        md5 = pw.CharField(max_length=32, null=True)
        is_tar = pw.BooleanField(default=False)
        null_obsid = pw.BooleanField(default=False)
        deletion_policy = pw.CharField(max_length=16, null=True)
        writer = pw.CharField(max_length=128, null=True)
        outcome = pw.TextField(null=True)
        created = pw.DateTimeField()
        updated = pw.DateTimeField(index=True)

        class Meta:
            table_name = "upload"

    @migrator.create_model
    class StagingDestination(pw.Model):
        id = pw.AutoField()
        path = pw.CharField(max_length=1024, unique=True)
        source = pw.CharField(max_length=64)
        created = pw.DateTimeField()

        class Meta:
            table_name = "staging_destination"


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("staging_destination")
    migrator.remove_model("upload")
