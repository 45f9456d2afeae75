"""Standing orders, and the two task columns that let a sweep skip files
that already have a copy queued for an order (one SQL query per order)."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    @migrator.create_model
    class StandingOrder(pw.Model):
        id = pw.AutoField()
        name = pw.CharField(max_length=64, unique=True)
        search = pw.TextField()
        conn_name = pw.CharField(max_length=64)
        created = pw.DateTimeField()

        class Meta:
            table_name = "standing_order"

    Task = migrator.orm["task"]
    migrator.add_fields(Task, file_name=pw.CharField(max_length=256, null=True),
                        standing_order=pw.CharField(max_length=64, null=True))
    migrator.add_index(Task, "standing_order", "file_name")


def rollback(migrator, database, fake=False, **kwargs):
    migrator.drop_index("task", "standing_order", "file_name")
    migrator.remove_fields("task", "file_name", "standing_order")
    migrator.remove_model("standing_order")
