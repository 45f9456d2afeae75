"""The context a serving or working process acts in, built once by
`librarian.setup` and passed to routes and task handlers: its settings
(`settings.Settings`) and its stores (`stores.StoreRegistry`: their
transports and shared SSH connections). Nothing else holds configuration in
module globals."""

import bottle

from stores import StoreRegistry


class Context:
    """`settings`, and `stores` (a `StoreRegistry` of its `[store:*]`
    sections)."""

    def __init__(self, settings):
        self.settings = settings
        self.stores = StoreRegistry(settings.stores)

    def open_store(self, row):
        """The `stores.StoreAccess` of a `models.Store` record."""
        return self.stores.open(row)

    def close(self):
        self.stores.close()


def of_request():
    """The context of the app serving the current request."""
    return bottle.request.app.config["librarian.context"]
