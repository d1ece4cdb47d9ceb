"""Fleet operations: what the cloud may change on a gateway, and how the gateway checks it.

``signing`` holds the one signature format shared by commands, model artifacts and firmware
images (ed25519 over a canonical JSON document with a domain tag).

May import: the contracts, ``agent.config``, and ``cryptography`` (only inside the functions
that sign or verify, so an agent with no signed traffic does not load it).
"""
