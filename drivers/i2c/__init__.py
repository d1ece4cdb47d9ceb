"""I2C sensor drivers: BME280, INA219 and ADS1115, on one worker thread per bus.

Each chip module holds the pure decoding, a blocking register I/O class that takes any
smbus2-compatible bus, the async sensor, and ``build(cfg, ctx)`` for the driver registry.
"""
