"""``edge-agent demo``: the whole pipeline on emulated devices, with an embedded broker.

``run`` starts the agent on ``examples/demo.toml`` and prints the feed as the cloud sees it;
``broker`` is the embedded MQTT broker used when none is given. May import the runtime.
"""
