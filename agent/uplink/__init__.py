"""The MQTT side: one connection, the forwarder that drains the outbox, and cloud commands.

``connection`` opens the broker connection (TLS from ``tls``, PUBACK reason codes),
``forwarder`` publishes live rows and replays the backlog, ``commands`` parses and runs cloud
commands and ``replies`` answers them on a connection, ``reach`` probes the broker's port,
``backoff`` paces reconnects, ``loadgen`` is a load generator for benchmarks. May
import the top-level contracts, ``agent.config``, ``agent.feed`` and ``agent.outbox``.
"""
