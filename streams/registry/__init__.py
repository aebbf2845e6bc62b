"""The device registry and the authority model (the registry + RBAC capability).

- ``rbac``: Organization -> Project -> group -> device, roles, and the one ``authorize``;
- ``devices``: the registry's records, commands, transitions and audit records (pure);
- ``agent``: the registry agent the hot-path worker runs in its transactions.
"""
