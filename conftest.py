"""Settings every test directory shares (the project's own tests and the backends')."""

from hypothesis import HealthCheck, settings

# Property-based tests run with a bounded budget: enough examples to find a crash on any
# input surface, few enough that the unit tests stay fast on two cores. No per-example
# deadline: a shared CI machine makes timings noisy, and pytest-timeout bounds each test.
settings.register_profile(
    "dra-core",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)
settings.load_profile("dra-core")
