"""The data stages between a Reading and a published message: clean, window, fuse, infer.

``filters`` and ``clean`` flag readings, ``clocksync`` holds them while the clock is unsynced,
``windows`` and ``fuse`` aggregate them into wall-clock windows, ``derived`` computes traffic
and energy channels, ``features`` rolls windows up into model inputs and ``infer`` runs the
ONNX models. No I/O but model files. May import the top-level contracts, ``agent.config`` and
``models.manifest``; never the outbox, the uplink or the runtime.
"""
