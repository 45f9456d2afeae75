"""The last reconciliation of each store with the catalogue (see
`reconcile`): when it finished, how long it took, and its report as JSON."""

import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    Store = migrator.orm["store"]

    @migrator.create_model
    class ReconcileReport(pw.Model):
        id = pw.AutoField()
        store = pw.ForeignKeyField(Store, column_name="store", unique=True, on_delete="CASCADE")
        finished = pw.DateTimeField()
        seconds = pw.FloatField()
        report = pw.TextField()

        class Meta:
            table_name = "reconcile_report"


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model("reconcile_report")
