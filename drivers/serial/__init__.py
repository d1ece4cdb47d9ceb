"""Serial-line sensors: an OPS243-A radar, PZEM-004T energy meters, a PMS5003 dust sensor.

One module per layer::

    port.py            open by path (/dev/serial/by-id/...), chunked asyncio reads, errors
    modbus.py          Modbus-RTU CRC, request builders, resynchronising frame parsers
    pzem004t.py        PZEM registers -> values; one shared bus per port; the sensor
    pms5003.py         PMS5003 frames -> values; the streaming sensor
    ops243_reports.py  OPS243 output lines (every firmware dialect) -> speeds in m/s
    vehicles.py        speed reports -> vehicles (pure, host-side)
    ops243.py          radar configuration handshake and the vehicle-counting sensor
    cli.py             ``serial ports``, ``serial sniff``, ``pzem reset-energy``

With ``port = "emulated"`` each driver starts its emulator from ``drivers.emulated`` on a pty.
"""
