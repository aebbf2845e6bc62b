"""Row filters of the SQL port (pure): grants' scopes -> additional_table_filters, policies."""

from __future__ import annotations

from sinks.clickhouse import ReadLimits
from sinks.row_filters import (
    FILTERED_TABLES,
    NO_ROW,
    ReadScope,
    row_policies,
    table_filters,
    tenant_filter,
)
from sinks.warehouse_tables import TENANT_TABLES


def test_each_scope_is_a_condition_on_the_tenant_columns() -> None:
    scopes = [("o", "p", "g", "d"), ("acme",), ("globex", "p")]
    assert tenant_filter(scopes) == (
        "(org = 'acme') OR (org = 'globex' AND project = 'p') OR "
        "(org = 'o' AND project = 'p' AND `group` = 'g' AND device_id = 'd')"
    )
    assert tenant_filter([]) == "0"  # no grant, no row
    assert tenant_filter([("it's",)]) == "(org = 'it\\'s')"  # quoted, never pasted


def test_every_tenant_table_is_filtered_under_both_of_its_names() -> None:
    assert TENANT_TABLES | {"telemetry_1m", "telemetry_1m_mv"} <= FILTERED_TABLES
    value = table_filters([("acme",)])
    for table in FILTERED_TABLES:
        assert f"'{table}': '(org = \\'acme\\')'" in value
        assert f"'default.{table}': " in value


def test_filters_and_final_are_set_before_readonly() -> None:
    settings = ReadLimits().settings(embedded=True, scope=ReadScope((("acme",),), final=False))
    names = list(settings)
    assert names[-1] == "readonly"
    assert settings["readonly"] == 1
    assert names.index("additional_table_filters") < names.index("readonly")
    assert settings["final"] == 0
    assert "additional_table_filters" not in ReadLimits().settings(embedded=True)
    assert "'0'" in ReadLimits().settings(embedded=True, scope=NO_ROW)["additional_table_filters"]


def test_row_policies_for_a_server() -> None:
    policies = row_policies("analyst_acme", [("acme", "plant")])
    assert len(policies) == len(TENANT_TABLES) + 1
    assert (
        "CREATE ROW POLICY OR REPLACE `fleet_telemetry_analyst_acme` ON default.telemetry "
        "FOR SELECT USING (org = 'acme' AND project = 'plant') TO `analyst_acme`"
    ) in policies
