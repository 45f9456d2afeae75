"""A daily sample of each store's used and free space (bytes), for the
picture of its space over time (`metrics.StoreSample`)."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    Store = migrator.orm["store"]

    @migrator.create_model
    class StoreSample(pw.Model):
        id = pw.AutoField()
        store = pw.ForeignKeyField(Store, column_name="store", on_delete="CASCADE")
        day = pw.DateField()
        used_bytes = pw.BigIntegerField()
        free_bytes = pw.BigIntegerField()

        class Meta:
            table_name = "store_sample"
            indexes = ((("store", "day"), True),)


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("store_sample")
