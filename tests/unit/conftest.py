"""Hypothesis profile for the unit tests.

Property tests assert behaviour, not speed: on a loaded 2-core CI machine the default deadline
and the too-slow health check fail tests whose logic is fine.
"""

from hypothesis import HealthCheck, settings

settings.register_profile(
    "fleetstream", deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("fleetstream")
