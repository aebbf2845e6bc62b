"""The fleet dashboard: a live page served by the API (``GET /dashboard``) and the demo's
self-contained HTML report (``fleet demo --report``), drawn with the vendored Apache ECharts."""
