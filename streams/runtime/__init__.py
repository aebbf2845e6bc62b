"""The stream-job kit: what every platform job runs on (Kafka clients, transactions, tables, the
batch loop, status files)."""
