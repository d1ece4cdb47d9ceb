"""The local web face of the agent: a read-only status page with live updates (server-sent
events), and Prometheus text on `/metrics`, on one small asyncio HTTP server. It sees the agent
through a protocol and may import the contracts, `agent.aio`, `agent.queues`, `agent.config` and
`agent.control.tail`."""
