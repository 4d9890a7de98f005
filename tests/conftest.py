"""Hypothesis profiles: ``hexatlas`` (the default run: few examples, derandomized, so it is
fast and repeatable) and ``slow`` (``pytest --hypothesis-profile=slow``; ``make test-all``)."""

from __future__ import annotations

try:
    from hypothesis import HealthCheck, settings
except ImportError:  # the property tests skip themselves without it
    pass
else:
    # The atlas fixtures are session-scoped and read-only, so sharing them across examples is safe.
    common = {"deadline": None, "database": None, "suppress_health_check": [HealthCheck.function_scoped_fixture]}
    settings.register_profile("hexatlas", max_examples=60, derandomize=True, **common)
    settings.register_profile("slow", max_examples=2000, **common)
    settings.load_profile("hexatlas")
