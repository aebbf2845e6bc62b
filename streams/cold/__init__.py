"""The cold path: Kafka batches decoded and loaded into the warehouse, committed after the write."""
