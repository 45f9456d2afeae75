"""Server-side records of web sessions, so that logging out (or expiry)
ends a session for good, whatever copy of its cookie survives."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    @migrator.create_model
    class WebSession(pw.Model):
        token_hash = pw.CharField(max_length=64, primary_key=True)
        source = pw.CharField(max_length=64, index=True)
        created = pw.DateTimeField()
        expires = pw.DateTimeField(index=True)

        class Meta:
            table_name = "web_session"


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("web_session")
