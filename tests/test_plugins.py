"""Backend and plugin loading: strict for the backend, tolerant for extension plugins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dra_core import BackendIdentity, FatalError, Inventory, hookimpl
from dra_core.plugins import HookError, PluginLoadError, from_objects, load
from tests.distributions import make_distribution

GOOD_BACKEND = """
from dra_core import BackendIdentity, Device, Inventory, hookimpl

@hookimpl
def dra_backend_identity():
    return BackendIdentity("good.example.com", "example.com", "good")

@hookimpl
def dra_discover(context):
    return Inventory(devices=(Device("dev-0"),))
"""


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    env.pop("DRA_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "dra_core", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_missing_backend_names_installed_ones(tmp_path):
    result = run_cli(tmp_path, "discover", "--backend", "nonesuch")
    assert result.returncode == 2
    assert "backend 'nonesuch' is not installed" in result.stderr
    assert "installed backends:" in result.stderr
    assert "fake" in result.stderr and "i915" in result.stderr


def test_broken_backend_names_distribution_version_and_cause(tmp_path):
    make_distribution(
        tmp_path,
        "broken-backend",
        "1.2.3",
        {"dra_core.backends": {"broken": "broken_backend"}},
        {"broken_backend": "import no_such_module_anywhere\n"},
    )
    result = run_cli(tmp_path, "discover", "--backend", "broken")
    assert result.returncode == 2, result.stderr
    assert "backend 'broken' from broken-backend 1.2.3 cannot be imported" in result.stderr
    assert "no_such_module_anywhere" in result.stderr
    assert "installed backends: broken, fake, i915" in result.stderr


def test_backend_registered_twice_is_refused(tmp_path):
    for dist in ("first-backend", "second-backend"):
        make_distribution(
            tmp_path,
            dist,
            "1.0",
            {"dra_core.backends": {"twin": "twin_mod"}},
            {"twin_mod": GOOD_BACKEND},
        )
    result = run_cli(tmp_path, "discover", "--backend", "twin")
    assert result.returncode == 2
    assert "registered by more than one distribution" in result.stderr
    assert "first-backend 1.0" in result.stderr and "second-backend 1.0" in result.stderr


def test_backends_lists_installed_distributions_and_broken_ones(tmp_path):
    make_distribution(
        tmp_path,
        "broken-backend",
        "0.9",
        {"dra_core.backends": {"broken": "broken_backend"}},
        {"broken_backend": "raise RuntimeError('boom at import')\n"},
    )
    result = run_cli(tmp_path, "backends")
    assert result.returncode == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines()}
    assert "dra-backend-fake" in lines["fake"] and "dra_discover" in lines["fake"]
    assert "dra-backend-i915" in lines["i915"] and "dra_prepare" in lines["i915"]
    assert "BROKEN: RuntimeError: boom at import" in lines["broken"]


def test_broken_extension_plugin_warns_or_fails_when_strict(tmp_path, monkeypatch):
    make_distribution(
        tmp_path,
        "good-backend",
        "1.0",
        {"dra_core.backends": {"good": "good_mod"}},
        {"good_mod": GOOD_BACKEND},
    )
    make_distribution(
        tmp_path,
        "bad-plugin",
        "0.1",
        {"dra_core.plugins": {"bad": "bad_plugin"}},
        {"bad_plugin": "raise ImportError('plugin dependency missing')\n"},
    )
    result = run_cli(tmp_path, "discover", "--backend", "good", "--node-name", "n1")
    assert result.returncode == 0, result.stderr
    assert "plugin 'bad' from bad-plugin 0.1 cannot be imported" in result.stderr
    assert "name: dev-0" in result.stdout
    monkeypatch.setenv("DRA_STRICT_PLUGINS", "1")
    strict = run_cli(tmp_path, "discover", "--backend", "good", "--node-name", "n1")
    assert strict.returncode == 2
    assert "plugin 'bad' from bad-plugin 0.1 cannot be imported" in strict.stderr


def test_hook_with_wrong_signature_is_refused():
    class Wrong:
        @hookimpl
        def dra_discover(self, context, surprise):  # 'surprise' is no argument of the spec
            return Inventory()

    with pytest.raises(PluginLoadError, match="plugin 'wrong' does not fit the dra-core contract"):
        from_objects("wrong", Wrong())


def test_hook_error_names_plugin_and_hook():
    class Backend:
        @hookimpl
        def dra_backend_identity(self):
            return BackendIdentity("x.example.com", "example.com", "x")

    class Attributes:
        @hookimpl
        def dra_device_attributes(self, device):
            raise ValueError("no attributes today")

    class Health:
        @hookimpl
        def dra_device_health(self, inventory):
            raise OSError("sensor gone")

    class Broken:
        @hookimpl
        def dra_discover(self, context):
            raise RuntimeError("sysfs unreadable")

    hooks = from_objects(
        "backend", Backend(), ("attrs", Attributes()), ("health", Health()), ("broken", Broken())
    )
    with pytest.raises(HookError) as info:
        hooks.discover(context=None)  # type: ignore[arg-type]
    assert info.value.plugin == "broken"
    assert str(info.value) == (
        "plugin 'broken' could not discover the devices: RuntimeError: sysfs unreadable"
    )
    assert (info.value.hook, info.value.backend) == ("dra_discover", "backend")
    # A failing health source is skipped, not fatal.
    assert hooks.device_health(Inventory(), context=None) == []  # type: ignore[arg-type]


def test_every_stop_hook_runs_when_one_raises_a_fatal_error():
    stopped: list[str] = []

    class Backend:
        @hookimpl
        def dra_backend_identity(self):
            return BackendIdentity("x.example.com", "example.com", "x")

        @hookimpl
        def dra_stop(self, context):
            stopped.append("backend")
            raise FatalError("the device table is corrupt")

    class Watcher:
        @hookimpl
        def dra_stop(self, context):
            stopped.append("watcher")
            raise OSError("already gone")  # logged; the others still stop

    class Exporter:
        @hookimpl
        def dra_stop(self, context):
            stopped.append("exporter")

    hooks = from_objects("backend", Backend(), ("watcher", Watcher()), ("exporter", Exporter()))
    with pytest.raises(HookError) as info:
        hooks.stop(context=None)  # type: ignore[arg-type]
    assert sorted(stopped) == ["backend", "exporter", "watcher"]
    assert info.value.plugin == "backend"
    assert isinstance(info.value.__cause__, FatalError)


def test_load_finds_installed_fake_backend():
    hooks = load("fake", plugins=False)
    assert hooks.backend == "fake"
    assert hooks.implemented("dra_prepare")
    with pytest.raises(PluginLoadError, match="installed backends: fake, i915"):
        load("nonesuch")


CLASS_BACKEND = """
import itertools
from dra_core import BackendIdentity, Device, Inventory, hookimpl

_made = itertools.count()


class Widgets:
    '''One instance per agent: the state lives on the instance, not in the module.'''

    def __init__(self):
        self.number = next(_made)
        self.node = None

    @hookimpl
    def dra_backend_identity(self):
        return BackendIdentity("widget.example.com", "example.com", "widget")

    @hookimpl
    def dra_start(self, context):
        self.node = context.node_name

    @hookimpl
    def dra_discover(self, context):
        return Inventory(devices=(Device(f"{self.node}-instance-{self.number}"),))


def make_widgets():
    return Widgets()


class Broken:
    def __init__(self):
        raise RuntimeError("no widget bus")
"""


def test_an_entry_point_naming_a_class_or_factory_gets_an_instance_per_agent(tmp_path):
    make_distribution(
        tmp_path,
        "widget-backend",
        "1.0",
        {
            "dra_core.backends": {
                "widget": "widget_backend:Widgets",
                "widget-factory": "widget_backend:make_widgets",
            }
        },
        {"widget_backend": CLASS_BACKEND},
    )
    for name in ("widget", "widget-factory"):
        result = run_cli(tmp_path, "discover", "--backend", name, "--node-name", "n1")
        assert result.returncode == 0, result.stderr
        assert "name: n1-instance-0" in result.stdout
    listed = run_cli(tmp_path, "backends")
    assert "dra_discover" in next(line for line in listed.stdout.splitlines() if " widget " in line)
    program = (
        "from dra_core.plugins import load\n"
        "from dra_core import NodeContext\n"
        "for node in ('a', 'b'):\n"
        "    hooks = load('widget', plugins=False)\n"
        "    context = NodeContext(node_name=node, driver_name='widget.example.com')\n"
        "    hooks.start(context)\n"
        "    print(hooks.discover(context).devices[0].name)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.getcwd()])}
    two = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, check=True
    )
    assert two.stdout.split() == ["a-instance-0", "b-instance-1"]


def test_a_backend_class_that_cannot_be_created_is_named(tmp_path):
    make_distribution(
        tmp_path,
        "widget-backend",
        "1.0",
        {"dra_core.backends": {"broken": "widget_backend:Broken"}},
        {"widget_backend": CLASS_BACKEND},
    )
    result = run_cli(tmp_path, "discover", "--backend", "broken")
    assert result.returncode == 2
    assert "backend 'broken' (widget_backend:Broken) could not be created" in result.stderr
    assert "RuntimeError: no widget bus" in result.stderr
