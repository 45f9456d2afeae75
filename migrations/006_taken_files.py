"""Staging folders that hold a file taken from an operator's pre-staged
folder: where it came from (`origin`, a store path) and which process took
it (`owner`, "host:pid"), so that only the bytes of a process that died are
put back, and never on the word of a file in the folder."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    StagingDir = migrator.orm["staging_dir"]
    migrator.add_fields(StagingDir, origin=pw.CharField(max_length=1024, null=True),
                        owner=pw.CharField(max_length=128, null=True))


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_fields("staging_dir", "origin", "owner")
