"""The local control interface: a Unix socket served by the agent, used by the CLI.

``server`` answers requests against a running agent (seen through a small protocol, so it does
not import the runtime), ``requests`` validates what a client may ask, ``client`` is the CLI's
side of the socket, ``view`` renders status, ``tail`` fans live readings out to subscribers.
May import ``agent.aio`` and ``agent.queues``.
"""
