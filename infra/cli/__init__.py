"""`fleet`, the operator's command line: `app` wires the command groups into one typer app.

- `stack`: up, down, status, bridge
- `devices`: provision, and `fleet device` (suspend, revoke, activate)
- `demo`: simulate, demo
- `sql`: sql
- `access`: token, grant
- `twin`, `alerts`, `ota` (with `ota artifact`), `jobs`: their groups
- `common`: the consoles, settings, errors and clients the groups share
"""
