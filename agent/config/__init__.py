"""The configuration: one TOML file validated once into frozen pydantic models.

Owns the schema (``schema``), the cleaning settings per quantity (``cleaning``), environment
overrides (``env``) and the generated reference (``reference``). May import the top-level
contracts and ``drivers.registry`` (to name the known drivers); nothing else of the agent.
"""
