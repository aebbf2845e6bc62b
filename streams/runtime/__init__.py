"""The stream-job kit: what every platform job runs on.

- ``clients``: :class:`KafkaConfig` (bootstrap servers, registry URL, client id) and the one
  place consumer, table-reader, producer and transactional-producer configs are built.
- ``records``: :class:`SourceRecord` (one Kafka record) and :class:`DeadLetter` (the shape of
  every ``dlq.*`` topic: original key and bytes, headers error/detail/source/topic/partition/
  offset).
- ``spec``: a declarative job, :class:`JobSpec` (name, group, inputs, outputs, tables,
  dead-letter topic, state factory, a pure ``process(state, batch) -> outputs``), with
  :class:`TableSpec`, :class:`Batch`, :class:`Input`, :class:`Output`, :class:`TableRecord`.
- ``job``: :class:`TransactionalJob`, the one loop running every transactional job spec on
  Kafka (one transaction per batch), with :class:`JobOptions`.
- ``loader``: :class:`LoaderSpec` / :class:`LoadSource` and :class:`LoaderLoop`, the one loop
  running every loader job (batch, store, then commit), with :class:`LoadPath`.
- ``tables``: :class:`GlobalTables` (one reader for a process's global tables; its
  one-topic case :class:`GlobalTable`), :class:`ChangelogReader`, their error channel
  (:class:`TableErrors`, :class:`UnreadableRecord`).
- ``transactions``: :class:`Transactions` and the error classification (transient vs fatal).
- ``loop``: :class:`BatchLoop` (start, step, recover after transient errors, back-off).
- ``source``: :class:`BatchSource`, batches of N records or T seconds for loaders.
- ``status``: status files (`fleet status` reads them).
- ``process``: a process's life around its worker (signals, logging).
- ``testing``: :class:`JobHarness` / :func:`run_job`, a job spec on in-memory records.
"""
