"""The hot path: alert rules and device twins (pure cores), their processor and the hot job."""
