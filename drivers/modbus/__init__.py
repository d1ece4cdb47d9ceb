"""The generic Modbus driver: device profiles as data, register decoding, request planning, an
RTU line shared by many units, Modbus TCP connections shared by unit ids, and the sensor.

May import ``drivers.base``, ``drivers.serial`` (RTU framing, the serial port) and the
``agent`` contracts; never its emulator (``drivers.emulated.modbus``).
"""
