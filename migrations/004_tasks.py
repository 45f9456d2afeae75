"""The persistent task queue: background work that survives restarts."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    @migrator.create_model
    class Task(pw.Model):
        id = pw.AutoField()
        kind = pw.CharField(max_length=64)
        args = pw.TextField()
        state = pw.CharField(max_length=16, default="pending")
        attempts = pw.IntegerField(default=0)
        max_attempts = pw.IntegerField(default=5)
        next_attempt = pw.DateTimeField()
        created = pw.DateTimeField()
        started = pw.DateTimeField(null=True)
        finished = pw.DateTimeField(null=True)
        heartbeat = pw.DateTimeField(null=True)
        worker = pw.CharField(max_length=128, null=True)
        last_error = pw.TextField(null=True)
        progress_bytes = pw.BigIntegerField(default=0)

        class Meta:
            table_name = "task"
            indexes = ((("state", "next_attempt"), False),)
            constraints = [pw.Check("state IN ('pending', 'running', 'done', 'failed')"),
                           pw.Check("attempts >= 0"), pw.Check("progress_bytes >= 0")]


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("task")
