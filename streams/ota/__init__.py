"""Governed OTA rollouts (the OTA capability).

- ``artifacts``: the artifact record, its signature and the device's check, content storage;
- ``plan``: how a rollout proceeds (:class:`~streams.ota.plan.RolloutPlan`) and its cohorts;
- ``model``: a rollout's states and its record (Avro ``Rollout``, ``ota.rollouts``);
- ``events``: what a rollout reacts to, and the commands and audit records it produces;
- ``working`` and ``rollout``: the pure state machine (:func:`streams.ota.rollout.run`);
- ``summary``: a rollout as operators read it;
- ``worker``: the controller, a thin transactional loop around the state machine.
"""
