"""A simulated fleet: many MQTT 5 devices over mTLS in one asyncio process.

- `protocol`: topics, the uplink envelope (`seq`, `ts`), PUBACK reason codes and the gmqtt
  client that reads them (a 0x10 answer is sent again, a refusal ends the message).
- `twin`: the device's side of its twin (desired deltas in, reported patches out).
- `ota`: OTA commands, A/B image slots, status reports and their files.
- `device`: one device (sensor readings, outbox, twin and updates on one MQTT client).
- `stats`: the counters a fleet shares.
- `fleet`: `run_fleet`, the whole fleet connected, run, drained and disconnected.
"""
