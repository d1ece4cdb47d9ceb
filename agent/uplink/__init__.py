"""The MQTT side: one connection, the forwarder that drains the outbox, and cloud commands.

``connection`` runs one broker connection (PUBACK reason codes, liveness) and ``connector``
opens it (TLS from ``tls``), ``forwarder`` publishes live rows and replays the backlog,
``commands`` parses and runs cloud commands and ``replies`` answers them on a connection,
``reach`` probes the broker's port, ``poison`` counts refusals, ``backoff`` paces reconnects,
``loadgen`` is a load generator for benchmarks. May import the top-level contracts,
``agent.config``, ``agent.feed`` and ``agent.outbox``.
"""
