"""What the cloud receives: the versioned message formats and the sharing policy.

``messages`` builds and encodes every feed message (the JSON Schemas in ``docs/`` come from
it); ``sharing`` decides per stream and audience what leaves the gateway, with the field
paths and rules of ``fields``. May import the
top-level contracts, ``agent.config`` and ``agent.pipeline.derived``; no I/O.
"""
