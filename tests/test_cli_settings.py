"""One settings tree and one identity.

The flags of ``dra-core run`` and ``doctor`` take their defaults (and the defaults their help
shows) from the settings classes, and every command that names the driver serves the name
``--driver-name`` gives it: sockets, ResourceSlices, DeviceClasses, the webhook, the demo.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import signal
import subprocess
import sys
import time
from http.client import HTTPConnection
from pathlib import Path

import pytest
import yaml

from dra_core import plugins
from dra_core.cli import _build_parser
from dra_core.doctor import DoctorSettings
from dra_core.runtime import Agent, AgentSettings
from dra_core.watchdog import HookLimits
from dra_core.webhook import Webhook
from tests.test_webhook import admission_review, claim, opaque

DEFAULT_DRIVER = "fake.dra-core.dev"
OTHER = "other.example.com"


@pytest.fixture
def no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flags at their defaults: no environment variable a flag reads is set."""
    for name in list(os.environ):
        if name.startswith("DRA_") or name in ("NODE_NAME", "KUBECONFIG"):
            monkeypatch.delenv(name)


def command_flags(command: str) -> dict[str, argparse.Action]:
    """The flags of ``dra-core COMMAND`` by destination."""
    parser = _build_parser(command=command)
    (commands,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: a for a in commands.choices[command]._actions}


def dra_core(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "dra_core", *args],
        cwd=cwd, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


# ------------------------------------------------------------------------- one settings tree
def defaults_of(settings: type) -> dict[str, object]:
    """The defaults a settings class declares: a dataclass's fields, else its keywords."""
    if dataclasses.is_dataclass(settings):
        fields = {f.name: f.default for f in dataclasses.fields(settings)}
    else:
        fields = {n: p.default for n, p in inspect.signature(settings).parameters.items()}
    return {
        name: default
        for name, default in fields.items()
        if default not in (dataclasses.MISSING, inspect.Parameter.empty)
    }


@pytest.mark.parametrize(
    ("settings", "command"),
    [(AgentSettings, "run"), (DoctorSettings, "doctor"), (Webhook, "webhook")],
)
@pytest.mark.usefixtures("no_environment")
def test_each_flag_defaults_to_its_settings_field(settings: type, command: str) -> None:
    flags = command_flags(command)
    checked = []
    for name, default in defaults_of(settings).items():
        if name not in flags:
            continue  # no flag sets it
        flag = flags[name]
        if isinstance(flag, argparse._StoreFalseAction):  # --no-publish sets publish
            assert flag.default is default is True, name
        else:
            assert flag.default == default, f"{flag.option_strings}: {flag.default!r}"
            shown = f"{default:g}" if isinstance(default, float) else str(default)
            if default is not None:
                assert f"default {shown})" in " ".join(str(flag.help).split()), flag.help
        checked.append(name)
    assert len(checked) >= 2, f"{command} has flags for the settings: {checked}"


@pytest.mark.usefixtures("no_environment")
def test_the_default_time_limits_are_the_watchdogs() -> None:
    agent = Agent(AgentSettings(node_name="n"), plugins.load("fake"))
    assert agent.hooks.watchdog.limits == HookLimits()


def test_an_environment_variable_is_converted_and_checked_as_its_flag(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DRA_POLL_INTERVAL", "2.5")
    monkeypatch.setenv("DRA_CDI_DIR", "/somewhere/cdi")
    args = _build_parser().parse_args(["run"])
    assert args.poll_interval == 2.5
    assert args.cdi_dir == "/somewhere/cdi"
    assert _build_parser().parse_args(["run", "--poll-interval", "7"]).poll_interval == 7.0
    result = subprocess.run(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--no-publish"],
        cwd=tmp_path, env={**os.environ, "DRA_POLL_INTERVAL": "0"}, capture_output=True,
        text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "--poll-interval: '0' is not a positive number of seconds" in result.stderr


# ------------------------------------------------------------------------------ one identity
def test_render_uses_the_given_driver_name_everywhere() -> None:
    result = dra_core("render", "--backend", "fake", "--driver-name", OTHER)
    assert result.returncode == 0, result.stderr
    assert DEFAULT_DRIVER not in result.stdout
    assert f"--driver-name {OTHER}" in result.stdout.splitlines()[1]
    classes = list(yaml.safe_load_all(result.stdout))
    assert classes
    for body in classes:
        for selector in body["spec"]["selectors"]:
            assert f'device.driver == "{OTHER}"' in selector["cel"]["expression"]


def test_discover_uses_the_given_driver_name_everywhere() -> None:
    result = dra_core("discover", "--backend", "fake", "--driver-name", OTHER, "--node-name", "n")
    assert result.returncode == 0, result.stderr
    assert DEFAULT_DRIVER not in result.stdout
    slices = list(yaml.safe_load_all(result.stdout))
    assert slices and all(s["spec"]["driver"] == OTHER for s in slices)


def test_run_serves_the_given_driver_name(tmp_path: Path) -> None:
    from dra_core.testing.kubelet import FakeKubelet

    agent = subprocess.Popen(
        [sys.executable, "-m", "dra_core", "run", "--backend", "fake", "--no-publish",
         "--http-port", "0", "--registration-dir", "reg", "--plugins-dir", "plugins",
         "--cdi-dir", "cdi", "--driver-name", OTHER],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        socket = tmp_path / "reg" / f"{OTHER}-reg.sock"
        deadline = time.monotonic() + 30
        while not socket.exists():
            assert agent.poll() is None, agent.stdout.read() if agent.stdout else ""
            assert time.monotonic() < deadline, "no registration socket within 30 s"
            time.sleep(0.1)
        with FakeKubelet(socket) as kubelet:
            info = kubelet.register()
        assert info.name == OTHER
        assert info.endpoint == str(tmp_path / "plugins" / OTHER / "dra.sock")
    finally:
        agent.send_signal(signal.SIGTERM)
        output, _ = agent.communicate(timeout=30)
    assert agent.returncode == 0, output
    assert not (tmp_path / "plugins" / DEFAULT_DRIVER).exists()


def test_the_webhook_checks_the_configs_of_the_given_driver_name(tmp_path: Path) -> None:
    from dra_core.testing.controlplane import free_port

    port = free_port()
    webhook = subprocess.Popen(
        [sys.executable, "-m", "dra_core", "webhook", "--backend", "fake", "--driver-name",
         OTHER, "--insecure", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    def decide(driver: str) -> dict:
        review = admission_review(claim([opaque({"no_such_field": 1}, driver=driver)]))
        conn = HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request(
                "POST", "/validate", json.dumps(review), {"Content-Type": "application/json"}
            )
            return json.loads(conn.getresponse().read())["response"]
        finally:
            conn.close()

    try:
        deadline = time.monotonic() + 30
        while True:
            assert webhook.poll() is None, webhook.stdout.read() if webhook.stdout else ""
            try:
                ours = decide(OTHER)
                break
            except OSError:
                assert time.monotonic() < deadline, "the webhook did not answer within 30 s"
                time.sleep(0.1)
        assert ours["allowed"] is False
        assert "no_such_field" in ours["status"]["message"]
        assert decide(DEFAULT_DRIVER)["allowed"] is True, "another driver's config is not ours"
    finally:
        webhook.send_signal(signal.SIGTERM)
        webhook.communicate(timeout=30)


@pytest.mark.parametrize(
    "command",
    [
        ["run", "--no-publish", "--http-port", "0", "--registration-dir", "reg",
         "--plugins-dir", "plugins", "--cdi-dir", "cdi"],
        ["discover"],
        ["doctor"],
        ["render"],
        ["webhook", "--insecure", "--port", "0"],
        ["demo"],
    ],
    ids=lambda command: command[0],
)  # fmt: skip
def test_every_command_refuses_a_bad_driver_name_alike(tmp_path: Path, command: list[str]) -> None:
    result = dra_core(
        command[0], "--backend", "fake", "--driver-name", "Bad_Name", *command[1:], cwd=tmp_path
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert (
        "dra-core: error: driver name 'Bad_Name' is not a lower-case DNS subdomain" in result.stderr
    )
    assert "pass a valid --driver-name (env DRA_DRIVER_NAME)" in result.stderr


@pytest.mark.controlplane
def test_the_demo_uses_the_given_driver_name() -> None:
    from dra_core.demo import run_demo

    lines: list[str] = []
    run_demo(plugins.load("fake"), say=lines.append, driver_name=OTHER)
    text = "\n".join(lines)
    assert f"DeviceClasses: {OTHER}, " in text
    assert f"driver {OTHER}" in text
    assert "published " in text, "the agent's slices were found under the given name"
