pytest_plugins = [
    "tests.controlplane.fixtures",
    "tests.realnode.fixtures",
    "tests.deploy.fixtures",
    "tests.cdicheck",
]
