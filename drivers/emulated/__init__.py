"""Emulators that behave like the real devices: register maps (I2C) and pty devices (serial)."""
