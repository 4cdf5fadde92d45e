pytest_plugins = ["tests.controlplane.fixtures", "tests.cdicheck"]
