"""edge-agent: a sensor gateway that acquires, cleans, fuses, infers and forwards over MQTT.

The data flows through the subpackages in this order::

    drivers/ -> supervisor -> pipeline/ (clean, windows, fuse, infer) -> feed/ -> outbox/ -> uplink/

Top-level modules are the contracts and primitives every stage shares (``readings``, ``clock``,
``aio``, ``queues``, ``logs``, ``sdnotify``) and the assembly (``supervisor``, ``generation``,
``runtime``). ``docs/architecture.md`` draws the package map and what each may import.
"""

__version__ = "0.1.0"
