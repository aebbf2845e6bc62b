"""The platform's HTTP API (`python -m infra.api.app`), its Kafka client and answer listeners.

- :mod:`infra.api.app`: the aiohttp application (middlewares, :class:`~infra.api.app.FleetApi`)
  and the process;
- :mod:`infra.api.routes`: the route table and its handlers, one module per resource;
- :mod:`infra.api.openapi`: the OpenAPI document, generated from the routes and the models;
- :mod:`infra.api.models`: the request and response bodies (pydantic);
- :mod:`infra.api.backend`: what the API reads and writes, on Kafka;
- :mod:`infra.api.client`: the platform's topics from outside the stream jobs (API, CLI, demo);
- :mod:`infra.api.answers`: answers to requests, read by one consumer per answers topic.

Bearer tokens are :mod:`streams.registry.tokens` (the SQL port verifies them too).
"""
