pytest_plugins = [
    "tests.controlplane.fixtures",
    "tests.realnode.fixtures",
    "tests.deploy.fixtures",
    "tests.cdicheck",
    "pytester",  # tests of the pytest plugin run pytest themselves
]
