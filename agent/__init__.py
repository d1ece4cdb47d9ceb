"""edge-agent: a sensor gateway that acquires, cleans, fuses, infers and forwards over MQTT."""

__version__ = "0.1.0"
