"""Staging folders that hold a file taken from an operator's pre-staged
folder: where it came from (`origin`, a store path) and which process took
it (`owner`, "host:pid:start"), so that only the bytes of a process that
died are put back, and never on the word of a file in the folder. And the
server's own secrets (`server_secret`), such as the key that signs the
markers in staging folders: kept with the catalogue, so that a change of the
configuration never makes the server disown what it wrote."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    StagingDir = migrator.orm["staging_dir"]
    migrator.add_fields(StagingDir, origin=pw.CharField(max_length=1024, null=True),
                        owner=pw.CharField(max_length=128, null=True))

    @migrator.create_model
    class ServerSecret(pw.Model):
        name = pw.CharField(max_length=64, primary_key=True)
        value = pw.CharField(max_length=128)

        class Meta:
            table_name = "server_secret"


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("server_secret")
    migrator.remove_fields("staging_dir", "origin", "owner")
