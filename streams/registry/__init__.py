"""The device registry and the authority model (the registry + RBAC capability).

- ``rbac``: Organization -> Project -> group -> device, roles, and the one ``authorize``;
- ``devices``: the registry's records, commands, transitions and audit records (pure);
- ``agent``: the registry agent the hot-path worker runs in its transactions.
- ``tokens``: the platform's bearer tokens (who a caller is), signed with its Ed25519 key;
- ``query_access``: who may use the SQL port (tokens, ``telemetry.read`` grants followed from
  ``rbac.grants``), the cold worker's query-port authenticator.
"""
