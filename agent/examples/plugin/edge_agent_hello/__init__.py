"""An example edge-agent driver plugin: a counter sensor registered under the entry-point
group ``edge_agent.drivers``. It may import ``drivers.base``, ``agent.clock`` and
``agent.readings`` (the driver contract) and pydantic; nothing else of the agent."""
