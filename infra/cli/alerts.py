"""`fleet alerts`: alert rules (data on alerts.rules) and the alerts they raise."""

from __future__ import annotations

import typer

from infra.cli.common import console, fail, hot_client, print_records

app = typer.Typer(help="Alert rules (data on alerts.rules) and the alerts they raise.")


@app.command("rules")
def alerts_rules(
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """The alert rules in force."""
    from streams.hot.alerts import rule_to_record

    rules = [rule_to_record(r) for r in hot_client().rules().values()]
    columns = ("rule_id", "scope_type", "scope", "metric", "kind", "threshold", "clear_threshold")
    print_records("alert rules", (*columns, "severity"), rules, as_json)


@app.command("add")
def alerts_add(
    rule_id: str = typer.Argument(..., help="Rule id (adding it again replaces the rule)."),
    kind: str = typer.Option(..., help="above, below, rate_of_change or missing_heartbeat."),
    metric: str = typer.Option("", help="Telemetry metric, e.g. temperature."),
    threshold: float = typer.Option(0.0, help="Raise past this value (per second for rates)."),
    clear: float = typer.Option(None, help="Resolve back past this value (hysteresis band)."),
    group: str = typer.Option(
        None, help="Scope: a device group, by path: org/<o>/project/<p>/group/<g>."
    ),
    device: str = typer.Option(None, help="Scope: one device."),
    window: float = typer.Option(None, help="rate_of_change: longest gap between readings, s."),
    heartbeat: float = typer.Option(None, help="missing_heartbeat: silence before raising, s."),
    severity: str = typer.Option("warning", help="info, warning or critical."),
) -> None:
    """Add or replace an alert rule."""
    from streams.hot.alerts import AlertRule, RuleKind, ScopeType, Severity
    from streams.registry.rbac import Level, Resource

    if (group is None) == (device is None):
        raise fail(ValueError("give exactly one of --group and --device"))
    try:
        if group is not None and Resource.parse(group).level is not Level.group:
            raise ValueError(
                f"--group takes a group's path (org/<o>/project/<p>/group/<g>): {group}"
            )
        rule = AlertRule(
            rule_id=rule_id,
            scope_type=ScopeType.group if group is not None else ScopeType.device,
            scope=group if group is not None else device,
            metric=metric,
            kind=RuleKind(kind),
            threshold=threshold,
            clear_threshold=clear,
            window_s=window,
            heartbeat_s=heartbeat,
            severity=Severity(severity),
        )
    except ValueError as exc:
        raise fail(exc) from exc
    hot_client().put_rule(rule)
    console.print(f"rule {rule_id} stored")


@app.command("rm")
def alerts_rm(rule_id: str = typer.Argument(..., help="Rule id.")) -> None:
    """Delete an alert rule (a tombstone on alerts.rules)."""
    hot_client().delete_rule(rule_id)
    console.print(f"rule {rule_id} deleted")


@app.command("list")
def alerts_list(
    since_minutes: float = typer.Option(60.0, help="Alerts of the last N minutes."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Alert lifecycle records (raised, resolved) on the `alerts` topic."""
    import time

    from streams.hot.alerts import alert_to_record

    since = int((time.time() - since_minutes * 60) * 1000)
    events = [alert_to_record(e) for e in hot_client().alerts(since)]
    columns = ("ts", "device_id", "rule_id", "status", "metric", "value", "severity")
    print_records("alerts", columns, events, as_json)
