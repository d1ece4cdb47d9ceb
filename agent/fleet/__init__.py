"""Fleet operations: what the cloud may change on a gateway, and how the gateway checks it.

``signing`` holds the one signature format shared by commands, model artifacts and firmware
images (ed25519 over a canonical JSON document with a domain tag). ``model_deploy`` takes models
sent by the cloud: ``chunks`` keeps a deploy on disk until it is whole, ``model_state`` which file
each model runs; ``deploy_client`` is the cloud side of it.

May import: the contracts, ``agent.config``, ``agent.pipeline`` types, ``models.manifest`` (when a
deploy is installed), and ``cryptography`` (only inside the functions
that sign or verify, so an agent with no signed traffic does not load it).
"""
