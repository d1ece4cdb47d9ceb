"""The durable store-and-forward outbox between the pipeline and the uplink.

``db`` is the SQLite layer (schema, bounds, drop classes, seq reserve); ``store`` is the
``Outbox`` the pipeline writes to and the uplink reads from. May import the top-level
contracts, ``agent.config`` and ``agent.feed``; never the uplink.
"""
