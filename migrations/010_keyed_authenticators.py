"""Authenticators this server issues are stored by a keyed fast hash
(`source.lookup` = HMAC-SHA256 under `server_key` 'authenticator'); the
unsalted SHA-256 prefixes that `lookup` held for Argon2-hashed secrets
are dropped (for a secret a person chose, such a prefix undid Argon2).
Existing sources keep their Argon2 hashes and go on working unchanged."""

import secrets

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    @migrator.create_model
    class ServerKey(pw.Model):
        id = pw.AutoField()
        name = pw.CharField(max_length=64, unique=True)
        value = pw.CharField(max_length=128)

        class Meta:
            table_name = "server_key"

    Source = migrator.orm["source"]
    migrator.change_fields(Source, lookup=pw.CharField(max_length=64, index=True))
    migrator.sql("INSERT INTO server_key (name, value) VALUES ('authenticator', '%s')"
                 % secrets.token_hex(32))
    migrator.sql("UPDATE source SET lookup = ''")


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("server_key")
