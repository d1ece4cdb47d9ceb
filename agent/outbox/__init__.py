"""The durable store-and-forward outbox between the pipeline and the uplink.

``rows`` is the plain data (message classes, rows, batches, the drop policy); ``db`` is the
SQLite layer (schema, bounds, seq reserve, corruption reset); ``store`` is the ``Outbox`` the
pipeline writes to and the uplink reads from. May import the top-level contracts,
``agent.config`` and ``agent.feed``; never the uplink.
"""
