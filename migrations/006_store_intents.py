"""Store intents: what a process is about to do to a store's bytes (receive
into a staging folder, take a pre-staged file, commit staged bytes to their
place, delete an instance), recorded before the first byte moves and
removed when it is settled, with the owning process and its heartbeat; see
`stores.intents`. And each task attempt's error, kept (`task.errors`)."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    Store = migrator.orm["store"]

    @migrator.create_model
    class StoreIntent(pw.Model):
        id = pw.AutoField()
        kind = pw.CharField(max_length=16)
        store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
        staging = pw.CharField(max_length=1024, null=True)
        store_path = pw.CharField(max_length=1024, null=True)
        owner = pw.CharField(max_length=128, index=True)
        detail = pw.TextField(null=True)
        heartbeat = pw.DateTimeField()
        created = pw.DateTimeField()

        class Meta:
            table_name = "store_intent"

    Task = migrator.orm["task"]
    migrator.add_fields(Task, errors=pw.TextField(null=True))


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_fields("task", "errors")
    migrator.remove_model("store_intent")
