"""The ``dra-core`` command: run the node agent, list backends, discover, check a node
(doctor), inspect checkpoints, render manifests, serve the admission webhook.

Backends add their own options (``--sysfs-root`` and the like) to ``run``, ``discover`` and
``doctor``; the backend is therefore chosen first (``--backend`` or ``DRA_BACKEND``), then the
full command line is parsed with its options.

Modules that only some commands need are imported by those commands, so that ``run`` starts
serving the kubelet without waiting for them.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from dra_core._version import __version__
from dra_core.logs import configure_logging

__all__ = ("main",)

BACKEND_ENV = "DRA_BACKEND"
#: The most read of the configuration file (``--config``): a mistaken path (a FIFO, a device,
#: a huge file) fails at once rather than hanging or filling memory.
_CONFIG_FILE_LIMIT = 1 << 20

_DESCRIPTION = """\
dra-core runs a Kubernetes Dynamic Resource Allocation (DRA) driver on a node: it registers
with the kubelet, publishes the node's devices as ResourceSlices, and prepares devices for pods.
A backend (installed separately, e.g. dra-backend-i915 or dra-backend-fake) knows the hardware.
"""


class CliError(Exception):
    """A problem the user can fix; printed without a traceback, exit status 2."""


def _env(name: str | None, default: Any = None) -> Any:
    """The default of a flag: environment variable ``name`` when set and not empty, else
    ``default``. Every environment variable the CLI reads is read here; argparse converts a
    text default with the flag's type, so a bad value is refused as the flag's would be."""
    return (os.environ.get(name) if name else None) or default


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_setting(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    default: Any,
    help: str,
    env: str | None = None,
    **kwargs: Any,
) -> None:
    """Add ``flag`` with ``default`` (a settings class's own; None: ``help`` says what not
    giving it means), overridden by environment variable ``env``; the help names both."""
    notes = [f"env {env}"] if env else []
    if default is not None:
        notes.append(f"default {_shown(default)}")
    parser.add_argument(
        flag,
        default=_env(env, default),
        help=f"{help} ({'; '.join(notes)})" if notes else help,
        **kwargs,
    )


def _add_agent_setting(
    parser: argparse.ArgumentParser, flag: str, *, help: str, env: str | None = None, **kwargs: Any
) -> None:
    """A flag that sets the `AgentSettings` field of its name, with that field's default."""
    from dra_core.runtime import AgentSettings

    default = getattr(AgentSettings, flag.removeprefix("--").replace("-", "_"))
    _add_setting(parser, flag, default=default, help=help, env=env, **kwargs)


def _absolute(value: str | Path, flag: str) -> Path:
    """``value`` made absolute against the working directory; an empty one is refused.

    Sockets, CDI host paths and the paths handed to the kubelet must not depend on the
    directory the agent was started in.
    """
    if not str(value).strip():
        msg = f"{flag} is empty; give a directory or file path (relative ones are fine)"
        raise CliError(msg)
    return Path(os.path.normpath(Path(value).absolute()))  # symlinks kept, as given


def _seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        msg = f"{text!r} is not a positive number of seconds"
        raise argparse.ArgumentTypeError(msg)
    return value


def _add_backend_argument(parser: argparse.ArgumentParser) -> None:
    _add_setting(
        parser,
        "--backend",
        default=None,
        env=BACKEND_ENV,
        help="the backend to load by entry-point name, e.g. 'fake' or 'i915' ('dra-core "
        "backends' lists the installed ones)",
    )


def _add_node_arguments(parser: argparse.ArgumentParser) -> None:
    """The node, driver name and configuration file, as ``run`` takes them."""
    _add_setting(
        parser,
        "--node-name",
        default=socket.gethostname(),  # a DaemonSet passes NODE_NAME; a shell has its host's
        env="NODE_NAME",
        help="the Kubernetes node this agent serves",
    )
    _add_driver_name(parser)
    _add_setting(
        parser,
        "--config",
        type=Path,
        default=None,
        env="DRA_CONFIG",
        help="YAML file whose 'backend' section is passed to the backend",
    )


def _add_driver_name(parser: argparse.ArgumentParser) -> None:
    _add_agent_setting(
        parser,
        "--driver-name",
        env="DRA_DRIVER_NAME",
        help="the driver name to serve instead of the backend's own; the sockets, "
        "ResourceSlices, DeviceClasses and the webhook all use it",
    )


def _add_directories(parser: argparse.ArgumentParser) -> None:
    """The kubelet's and the container runtime's directories the agent uses."""
    for flag, env, what in (
        (
            "--registration-dir",
            "DRA_REGISTRATION_DIR",
            "the kubelet's plugin registration directory",
        ),
        (
            "--plugins-dir",
            "DRA_PLUGINS_DIR",
            "parent of the driver's socket and checkpoint directory",
        ),
        ("--cdi-dir", "DRA_CDI_DIR", "dynamic CDI spec directory the container runtime reads"),
    ):
        _add_agent_setting(parser, flag, env=env, help=what)


def _add_kubeconfig(parser: argparse.ArgumentParser) -> None:
    _add_agent_setting(
        parser,
        "--kubeconfig",
        env="KUBECONFIG",
        help="kubeconfig file; without one, the in-cluster service account",
    )


def _add_rate_arguments(parser: argparse.ArgumentParser) -> None:
    """``--kube-api-qps`` and ``--kube-api-burst``: the client-side bound on API requests."""
    from dra_core.kube.ratelimit import BURST_ENV, QPS_ENV, parse_burst, parse_qps

    def checked(parse: Callable[[str], object]) -> Callable[[str], object]:
        def convert(text: str) -> object:
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        return convert

    _add_agent_setting(
        parser,
        "--kube-api-qps",
        metavar="QPS",
        type=checked(parse_qps),
        env=QPS_ENV,
        help="API requests a second the agent sends at most, after a burst of "
        "--kube-api-burst; 0 disables the limit; the default is the kubelet's",
    )
    _add_agent_setting(
        parser,
        "--kube-api-burst",
        metavar="N",
        type=checked(parse_burst),
        env=BURST_ENV,
        help="API requests the agent may send at once after a quiet period; the default is "
        "the kubelet's",
    )


def _add_release_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """``--kubernetes-version`` and ``--feature-gates``: the API server to answer for."""
    parser.add_argument(
        "--kubernetes-version",
        metavar="VERSION",
        help=f"the API server's release (e.g. v1.34.4): {what}",
    )
    parser.add_argument(
        "--feature-gates",
        metavar="NAME=BOOL,...",
        default="",
        help="the API server's --feature-gates, where they differ from its release's defaults "
        "(needs --kubernetes-version)",
    )


def _release_gates(args: argparse.Namespace) -> dict[str, bool] | None:
    """The DRA gates on in the API server ``--kubernetes-version`` names, or None without it."""
    from dra_core.releases import ReleaseError, gates_on, parse_feature_gates

    if args.feature_gates and not args.kubernetes_version:
        raise CliError("--feature-gates needs --kubernetes-version (the gates' defaults)")
    if not args.kubernetes_version:
        return None
    try:
        return gates_on(args.kubernetes_version, parse_feature_gates(args.feature_gates))
    except ReleaseError as exc:
        raise CliError(str(exc)) from None


def _add_backend_options(parser: argparse.ArgumentParser, backend_options: Sequence[Any]) -> None:
    """The loaded backend's options (``--NAME``, default from its environment variable)."""
    group = parser.add_argument_group("backend options")
    for option in backend_options:
        default = _env(option.env, option.default)
        env_note = f" (env {option.env})" if option.env else ""
        group.add_argument(f"--{option.name}", default=default, help=option.help + env_note)


def _add_runtime_files(parser: argparse.ArgumentParser) -> None:
    """The container runtime's files and socket that doctor reads. Their defaults are the
    doctor's settings, whose modules are slow to import: added only when doctor runs."""
    from dra_core.doctor import DEFAULT_RUNTIME_SOCKETS, DoctorSettings

    _add_setting(
        parser,
        "--containerd-config",
        default=DoctorSettings.containerd_config,
        help="containerd's configuration file",
    )
    _add_setting(
        parser,
        "--crio-config",
        default=DoctorSettings.crio_config,
        help="CRI-O's configuration file; its .d directory of drop-ins is read too",
    )
    _add_setting(
        parser,
        "--runtime-socket",
        default=DoctorSettings.runtime_socket,
        help="the container runtime's CRI socket, asked for its version and configuration; "
        f"without one, {', then '.join(map(str, DEFAULT_RUNTIME_SOCKETS))}, if present",
    )


def _add_webhook_address(parser: argparse.ArgumentParser) -> None:
    """Where the webhook listens. The defaults are the webhook's own, whose module is slow to
    import: added only when the webhook runs."""
    from dra_core.webhook import Webhook

    defaults = inspect.signature(Webhook).parameters
    _add_setting(
        parser,
        "--port",
        type=int,
        default=defaults["port"].default,
        env="DRA_WEBHOOK_PORT",
        help="port to listen on",
    )
    _add_setting(
        parser,
        "--host",
        default=defaults["host"].default,
        env="DRA_WEBHOOK_HOST",
        help="address to listen on, 0.0.0.0 for all; the Deployment sets the pod IP, which the "
        "API server reaches through the Service",
    )


#: The commands that take the backend's options.
_WITH_BACKEND_OPTIONS = ("run", "discover", "doctor", "demo", "render")


def _build_parser(
    backend_options: Sequence[Any] = (), command: str | None = None
) -> argparse.ArgumentParser:
    """The parser; ``backend_options`` and ``command`` (when known) add their own flags."""
    parser, commands = _command_parsers()
    _add_late_flags(commands, command, backend_options)
    return parser


def _add_late_flags(
    commands: Mapping[str, argparse.ArgumentParser],
    command: str | None,
    backend_options: Sequence[Any],
) -> None:
    """Add the flags known only once the command line's command and backend are: the backend's
    options, and the flags whose defaults live in modules slow to import (doctor's, the
    webhook's), added only when their command runs so that the others start without them."""
    for name in _WITH_BACKEND_OPTIONS:
        _add_backend_options(commands[name], backend_options)
    if command == "doctor":
        _add_runtime_files(commands["doctor"])
    elif command == "webhook":
        _add_webhook_address(commands["webhook"])


def _command_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser without the late flags (`_add_late_flags`), and its commands' parsers."""
    parser = argparse.ArgumentParser(
        prog="dra-core",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"dra-core {__version__}")
    logging_defaults = inspect.signature(configure_logging).parameters
    _add_setting(
        parser,
        "--log-level",
        default=logging_defaults["level"].default,
        env="DRA_LOG_LEVEL",
        help="DEBUG, INFO, WARNING or ERROR",
    )
    _add_setting(
        parser,
        "--log-format",
        choices=("plain", "json"),
        default=logging_defaults["fmt"].default,
        env="DRA_LOG_FORMAT",
        help="plain text for people, JSON lines for log pipelines",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run the node agent until SIGTERM",
        description="Run the node agent: register with the kubelet, publish ResourceSlices, "
        "prepare and unprepare claims. Stops cleanly on SIGTERM; prepared devices stay "
        "prepared across restarts.",
    )
    _add_backend_argument(run)
    _add_node_arguments(run)
    _add_kubeconfig(run)
    _add_rate_arguments(run)
    _add_directories(run)
    _add_agent_setting(
        run,
        "--instance-id",
        env="DRA_INSTANCE_ID",
        help="per-instance socket names for rolling updates, usually the pod UID; needs "
        "kubelet 1.33 or later",
    )
    _add_agent_setting(
        run,
        "--http-port",
        type=int,
        env="DRA_HTTP_PORT",
        help="port of /healthz and /metrics; 0 disables",
    )
    _add_agent_setting(
        run,
        "--http-host",
        env="DRA_HTTP_HOST",
        help="address /healthz and /metrics listen on, 0.0.0.0 for all; the kubelet probes "
        "the pod IP, which the DaemonSet sets from status.podIP",
    )
    _add_agent_setting(
        run,
        "--poll-interval",
        type=_seconds,
        env="DRA_POLL_INTERVAL",
        help="seconds between rediscoveries and health checks",
    )
    _add_agent_setting(
        run,
        "--reconcile-interval",
        type=_seconds,
        env="DRA_RECONCILE_INTERVAL",
        help="seconds between reconciliations of prepared claims with the API server; "
        "retried sooner while the API server is unreachable",
    )
    _add_agent_setting(
        run,
        "--prepare-timeout",
        type=_seconds,
        env="DRA_PREPARE_TIMEOUT",
        help="seconds a backend may take to prepare or unprepare a claim, check its allocation "
        "or decode its config before that claim fails",
    )
    _add_agent_setting(
        run,
        "--discovery-timeout",
        type=_seconds,
        env="DRA_DISCOVERY_TIMEOUT",
        help="seconds a backend may take to discover devices or check their health before that "
        "round is skipped, keeping what was published",
    )
    _add_agent_setting(
        run,
        "--backend-stuck-seconds",
        type=_seconds,
        env="DRA_BACKEND_STUCK_SECONDS",
        help="a backend call that timed out and still runs this many seconds after it began "
        "makes /healthz fail, so that the agent is restarted",
    )
    run.add_argument(
        "--no-publish",
        dest="publish",
        action="store_false",
        help="do not publish ResourceSlices (local experiments without a cluster)",
    )

    discover = commands.add_parser(
        "discover",
        help="print the devices and ResourceSlices this node would publish",
        description="Discover this node's devices with the chosen backend and print them, and "
        "the ResourceSlices that would be published, as YAML. Needs no cluster.",
    )
    _add_backend_argument(discover)
    _add_node_arguments(discover)
    _add_release_arguments(
        discover,
        "the slices are printed as the agent publishes them there: without the devices it "
        "leaves out for a feature gate that is off (named in a comment), with counter sets in "
        "the layout of that release. Default: every field, counter sets in slices of their "
        "own (1.35 and later with the DRA gates on)",
    )

    doctor = commands.add_parser(
        "doctor",
        help="check this node and its cluster for what the agent needs, and say what to fix",
        description="Check what the agent needs on this node and in its cluster: the API "
        "server serves resource.k8s.io/v1 and keeps the fields of partitionable devices, "
        "consumable capacity and device taints (asked with a dry-run create, nothing is "
        "stored); the kubelet's DRA API version; containerd or CRI-O with CDI enabled and "
        "reading the agent's CDI directory; the kubelet's plugin directories and the CDI "
        "directory writable; and the backend's own checks. Takes the same flags and "
        "environment variables as run. Prints a mark per check (ok, warn, FAIL, skip), what "
        "was found and the fix; exits 1 when a check failed (warnings do not fail), 0 "
        "otherwise. Without a kubeconfig or an in-cluster service account the API checks are "
        "skipped.",
    )
    _add_backend_argument(doctor)
    _add_node_arguments(doctor)
    _add_kubeconfig(doctor)
    _add_directories(doctor)
    doctor.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="text for people (default), or JSON",
    )

    demo = commands.add_parser(
        "demo",
        help="run the whole DRA flow locally against a real control plane",
        description="Start a local Kubernetes control plane (etcd, kube-apiserver, "
        "kube-scheduler, kube-controller-manager; built from their Go modules on first use "
        "and cached, or taken from DRA_TEST_BINARIES), run the node agent on a backend "
        "against it, schedule a pod with a ResourceClaim, prepare and unprepare it through "
        "the agent's kubelet socket, and clean up. The backend's options are those of "
        "'dra-core run' (see 'dra-core demo --backend NAME --help').",
    )
    _add_setting(
        demo,
        "--backend",
        default="fake",
        env=BACKEND_ENV,
        help="the backend to demonstrate (fake needs no hardware)",
    )
    _add_driver_name(demo)

    backends = commands.add_parser(
        "backends",
        help="list installed backends and extension plugins",
        description="List the installed backends (entry-point group dra_core.backends) and "
        "extension plugins (dra_core.plugins) with their distribution, version and hooks.",
    )
    backends.add_argument("--json", action="store_true", help="print JSON instead of a table")

    render = commands.add_parser(
        "render",
        help="print the DeviceClasses of a backend as YAML",
        description="Render the DeviceClasses users request this backend's devices with.",
    )
    _add_backend_argument(render)
    _add_driver_name(render)
    _add_release_arguments(
        render,
        "only the classes it accepts with its default feature "
        "gates (and --feature-gates) are printed, the others are named in a comment with the "
        "gate they need. Default: every class",
    )

    webhook = commands.add_parser(
        "webhook",
        help="run the validating admission webhook for the backend's opaque configs",
        description="Serve a validating admission webhook (admission.k8s.io/v1) on POST "
        "/validate: ResourceClaims, ResourceClaimTemplates and DeviceClasses whose opaque "
        "config entries name this driver are decoded with the backend, and rejected with the "
        "decoder's message when invalid, so a typo fails at kubectl apply instead of at "
        "prepare. Also serves /healthz and /metrics. HTTPS with --tls-cert-file and "
        "--tls-key-file; plain HTTP only with --insecure. Runs until SIGTERM.",
    )
    _add_backend_argument(webhook)
    _add_driver_name(webhook)
    for flag, env, what in (
        (
            "--tls-cert-file",
            "DRA_WEBHOOK_TLS_CERT_FILE",
            "PEM server certificate, reloaded when it changes",
        ),
        ("--tls-key-file", "DRA_WEBHOOK_TLS_KEY_FILE", "PEM private key of the certificate"),
    ):
        _add_setting(webhook, flag, type=Path, default=None, env=env, help=what)
    webhook.add_argument(
        "--insecure",
        action="store_true",
        default=_env("DRA_WEBHOOK_INSECURE") == "1",
        help="serve plain HTTP without TLS, for local tests only; the API server calls "
        "webhooks over HTTPS (env DRA_WEBHOOK_INSECURE=1)",
    )

    checkpoint = commands.add_parser(
        "checkpoint",
        help="inspect or repair the checkpoint of prepared claims",
        description="The checkpoint records which claims are prepared on this node. A corrupt "
        "checkpoint stops the agent; inspect shows what is in it, repair keeps every record "
        "that can be read and saves the damaged file beside it.",
    )
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    from dra_core.checkpoint import FILE_NAME
    from dra_core.runtime import AgentSettings

    for action, text in (
        ("inspect", "show the checkpoint's state and records"),
        ("repair", "salvage readable records into a valid checkpoint"),
    ):
        sub = checkpoint_commands.add_parser(action, help=text, description=text)
        sub.add_argument(
            "--path",
            type=Path,
            required=True,
            help=f"the checkpoint file, <plugins dir>/<driver>/{FILE_NAME} (e.g. "
            f"{AgentSettings.plugins_dir}/gpu.intel.com/{FILE_NAME})",
        )
    return parser, dict(commands.choices)


def _load_hooks(name: str | None, backends: Mapping[str, object]) -> Any:
    from dra_core.plugins import from_objects, load  # only commands that need a backend

    if not name:
        msg = f"no backend chosen: pass --backend NAME or set {BACKEND_ENV}"
        raise CliError(msg)
    if name in backends:
        return from_objects(name, backends[name])
    return load(name)


def _options(args: argparse.Namespace, hooks: Any) -> dict[str, str | None]:
    """The backend's option values; paths (``BackendOption.path``) made absolute."""
    values: dict[str, str | None] = {}
    for option in hooks.backend_options():
        key = option.name.replace("-", "_")
        value = getattr(args, key)
        if value is not None and option.path:
            value = str(_absolute(value, f"--{option.name}"))
        values[key] = value
    return values


def _backend_config(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    import yaml

    from dra_core.fileio import read_regular_text

    try:
        data = yaml.safe_load(read_regular_text(path, _CONFIG_FILE_LIMIT)) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, RecursionError) as exc:
        msg = f"cannot read the configuration file {path}: {exc}"
        raise CliError(msg) from None
    section = data.get("backend", {}) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        msg = f"{path}: 'backend' must be a mapping"
        raise CliError(msg)
    return section


#: The settings fields that are paths: made absolute, so that sockets, CDI host paths and the
#: paths handed to the kubelet do not depend on the directory the agent was started in.
_PATH_FIELDS = (
    "registration_dir",
    "plugins_dir",
    "cdi_dir",
    "containerd_config",
    "crio_config",
    "runtime_socket",
)
_Settings = TypeVar("_Settings")


def _settings(cls: Callable[..., _Settings], args: argparse.Namespace, hooks: Any) -> _Settings:
    """``cls`` (`AgentSettings`, `DoctorSettings`) from the flags: each field with a flag of
    its name takes the flag's value (None: the field's own default), paths made absolute; and
    the backend's options and configuration file."""
    values: dict[str, Any] = {}
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        value = getattr(args, field.name, None)
        if value is not None:
            if field.name in _PATH_FIELDS:
                value = _absolute(value, "--" + field.name.replace("_", "-"))
            values[field.name] = value
    values["backend_options"] = _options(args, hooks)
    values["backend_config"] = _backend_config(args.config)
    return cls(**values)


def _cmd_run(args: argparse.Namespace, hooks: Any) -> int:
    from dra_core.kubelet.server import KubeletPluginError
    from dra_core.runtime import Agent, AgentSettings

    if args.kube_api_qps > 0 and args.kube_api_burst < 1:
        msg = (
            "--kube-api-burst must be at least 1 when --kube-api-qps is set "
            "(or set --kube-api-qps 0 to disable the limit)"
        )
        raise CliError(msg)
    settings = _settings(AgentSettings, args, hooks)
    try:
        Agent(settings, hooks).run()
    except (KubeletPluginError, OSError) as exc:
        msg = (
            f"the node agent cannot start: {exc} (--registration-dir "
            f"{settings.registration_dir}, --plugins-dir {settings.plugins_dir}, --cdi-dir "
            f"{settings.cdi_dir})"
        )
        raise CliError(msg) from None
    return 0


def _cmd_discover(args: argparse.Namespace, hooks: Any) -> int:
    import yaml

    from dra_core.health import HealthTracker
    from dra_core.hookspecs import NodeContext
    from dra_core.kubelet.health import HealthBoard
    from dra_core.model import validate_inventory
    from dra_core.runtime import resolve_identity
    from dra_core.slices.build import build_slices
    from dra_core.slices.features import ALL_KEPT, release_features, safe_inventory

    gates = _release_gates(args)
    server = ALL_KEPT if gates is None else release_features(args.kubernetes_version, gates)
    driver = resolve_identity(hooks, args.driver_name).driver_name
    context = NodeContext(
        node_name=args.node_name,
        driver_name=driver,
        options=_options(args, hooks),
        config=_backend_config(args.config),
    )
    hooks.start(context)
    try:
        inventory = hooks.discover(context)
        validate_inventory(inventory)
        health = hooks.device_health(inventory, context)
    finally:
        hooks.stop(context)
    # As the agent publishes: unhealthy devices tainted, then what the server cannot take out.
    tainted = HealthTracker(driver, args.node_name, HealthBoard()).update(inventory, health)
    published, left_out = safe_inventory(tainted, server)
    slices = build_slices(
        driver,
        args.node_name,
        args.node_name,
        published,
        generation=1,
        **server.layout,
        validated=True,  # above, as discovered
    )
    unhealthy = {h.device: h.message for h in health if not h.healthy}
    print(
        f"# driver {driver} on node {args.node_name}: {len(published.devices)} devices, "
        f"{len(published.counter_sets)} counter sets, {len(slices)} ResourceSlices"
        + (f"; unhealthy: {unhealthy}" if unhealthy else "")
    )
    for entry in left_out:
        changed = [f"not published: {', '.join(entry.devices)}"] if entry.devices else []
        if entry.exclusive:
            changed.append(f"published as exclusive devices: {', '.join(entry.exclusive)}")
        print(f"# Left out: {entry.feature.why}: {'; '.join(changed)}")
    yaml.safe_dump_all(slices, sys.stdout, sort_keys=False)
    return 0


def _cmd_doctor(args: argparse.Namespace, hooks: Any) -> int:
    from dra_core.doctor import DoctorSettings, run_doctor

    report = run_doctor(_settings(DoctorSettings, args, hooks), hooks)
    if args.output == "json":
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.render_text())
    return report.exit_code


def _cmd_demo(args: argparse.Namespace, hooks: Any) -> int:
    from dra_core.demo import DemoError, run_demo
    from dra_core.testing.controlplane import ControlPlaneError

    try:
        run_demo(hooks, backend_options=_options(args, hooks), driver_name=args.driver_name)
    except (DemoError, ControlPlaneError) as exc:
        msg = f"the demo failed: {exc}"
        raise CliError(msg) from None
    return 0


def _cmd_webhook(args: argparse.Namespace, hooks: Any) -> int:
    from dra_core.runtime import resolve_identity
    from dra_core.webhook import TlsFiles, Webhook, serve

    tls = None
    if args.insecure:
        if args.tls_cert_file or args.tls_key_file:
            msg = "--insecure serves plain HTTP; do not pass --tls-cert-file or --tls-key-file"
            raise CliError(msg)
    elif not (args.tls_cert_file and args.tls_key_file):
        msg = (
            "the webhook serves HTTPS: pass --tls-cert-file and --tls-key-file "
            "(or --insecure for plain HTTP in local tests)"
        )
        raise CliError(msg)
    else:
        try:
            tls = TlsFiles(args.tls_cert_file, args.tls_key_file)
        except (OSError, ValueError) as exc:
            msg = f"cannot load the TLS certificate {args.tls_cert_file}: {exc}"
            raise CliError(msg) from None
    driver = resolve_identity(hooks, args.driver_name).driver_name
    try:
        webhook = Webhook(hooks, driver, host=args.host, port=args.port, tls=tls)
    except OSError as exc:
        msg = f"cannot listen on {args.host} port {args.port}: {exc}"
        raise CliError(msg) from None
    serve(webhook)
    return 0


def _cmd_render(args: argparse.Namespace, hooks: Any) -> int:
    import yaml

    from dra_core.manifests import device_class_manifests, select_classes
    from dra_core.runtime import resolve_identity

    identity = resolve_identity(hooks, args.driver_name)
    command = f"dra-core render --backend {hooks.backend}"
    if args.driver_name is not None:
        command += f" --driver-name {args.driver_name}"
    classes = hooks.device_classes(identity, _options(args, hooks))
    notes = []
    gates = _release_gates(args)
    if gates is not None:
        command += f" --kubernetes-version {args.kubernetes_version}"
        if args.feature_gates:
            command += f" --feature-gates {args.feature_gates}"
        classes, left_out = select_classes(classes, gates)
        for out in left_out:
            why = "; ".join(
                _gate_state(g, args.kubernetes_version, args.feature_gates) for g in out.gates
            )
            notes.append(
                f"# Left out: {out.spec.name} ({why}); the API server refuses its selector. "
                f"With the gate on in the API server, render with --feature-gates "
                f"{','.join(f'{g}=true' for g in out.gates)}."
            )
    print(
        f"# The DeviceClasses of the {hooks.backend} backend (driver {identity.driver_name}).\n"
        f"# Generated by `{command}`; do not edit."
    )
    for note in notes:
        print(note)
        print(note.removeprefix("# "), file=sys.stderr)
    yaml.safe_dump_all(device_class_manifests(classes), sys.stdout, sort_keys=False)
    return 0


def _gate_state(gate: str, version: str, overrides: str) -> str:
    """Why ``gate`` is off: turned off, or off by default in ``version`` (and since when on)."""
    from dra_core.releases import default_on_since, parse_feature_gates

    if gate in parse_feature_gates(overrides):
        return f"feature gate {gate} turned off by --feature-gates"
    since = default_on_since(gate)
    later = f", on by default from 1.{since}" if since is not None else ""
    return f"feature gate {gate} off by default in Kubernetes {version}{later}"


def _cmd_backends(args: argparse.Namespace) -> int:
    from dra_core.plugins import installed_backends, installed_plugins

    rows = [("backend", i) for i in installed_backends(with_hooks=True)]
    rows += [("plugin", i) for i in installed_plugins(with_hooks=True)]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "kind": kind,
                        "name": i.name,
                        "distribution": i.distribution,
                        "version": i.version,
                        "entry_point": i.value,
                        "hooks": list(i.hooks),
                        "error": i.error,
                    }
                    for kind, i in rows
                ],
                indent=2,
            )
        )
        return 0
    if not rows:
        print(
            "no backends installed (pip install dra-backend-fake, or backends/fake from the "
            "source tree)"
        )
        return 1
    for kind, info in rows:
        state = f"BROKEN: {info.error}" if info.error else ", ".join(info.hooks)
        print(f"{kind:8} {info.name:12} {info.origin:28} {state}")
    return 0


def _cmd_checkpoint(args: argparse.Namespace) -> int:
    from dra_core.checkpoint.repair import inspect as inspect_checkpoint
    from dra_core.checkpoint.repair import render_inspect, render_repair
    from dra_core.checkpoint.repair import repair as repair_checkpoint

    if args.checkpoint_command == "inspect":
        inspected = inspect_checkpoint(args.path)
        print(render_inspect(inspected))
        return 0 if inspected.ok else 1
    if args.checkpoint_command == "repair":
        print(f"repairing {args.path} ...", file=sys.stderr)
        print(render_repair(repair_checkpoint(args.path)))
        return 0
    msg = "checkpoint needs an action: inspect or repair"
    raise CliError(msg)


_WITH_BACKEND: dict[str, Callable[[argparse.Namespace, Any], int]] = {
    "run": _cmd_run,
    "discover": _cmd_discover,
    "doctor": _cmd_doctor,
    "render": _cmd_render,
    "demo": _cmd_demo,
    "webhook": _cmd_webhook,
}
_WITHOUT_BACKEND: dict[str, Callable[[argparse.Namespace], int]] = {
    "backends": _cmd_backends,
    "checkpoint": _cmd_checkpoint,
}


def main(argv: Sequence[str] | None = None, *, backends: Mapping[str, object] | None = None) -> int:
    """Entry point of ``dra-core``; returns the exit status.

    ``backends`` maps backend names to backend objects (as `dra_core.plugins.from_objects`
    takes them) used instead of the installed backends of those names: for a program that runs
    ``dra-core`` with a backend built in it, e.g. a test's agent process whose backend writes to
    a fake kernel (see `dra_core.testing.agent.RunningAgent.argv`).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    backends = backends or {}
    from dra_core.checkpoint import CheckpointError
    from dra_core.errors import FatalError
    from dra_core.model import ModelError
    from dra_core.plugins import HookError, PluginLoadError

    try:
        hooks = None
        backend_options: Sequence[Any] = ()
        # The backend adds options, so find the command and backend before the full parse.
        quiet = [a for a in argv if a not in ("-h", "--help", "--version")]
        parser, commands = _command_parsers()
        known, _ = parser.parse_known_args(quiet)
        backend = getattr(known, "backend", None)
        if known.command in _WITH_BACKEND and backend:
            hooks = _load_hooks(backend, backends)
            backend_options = hooks.backend_options()
        _add_late_flags(commands, known.command, backend_options)
        args = parser.parse_args(argv)
        configure_logging(args.log_level, args.log_format)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command in _WITHOUT_BACKEND:
            return _WITHOUT_BACKEND[args.command](args)
        if hooks is None:
            hooks = _load_hooks(args.backend, backends)
        return _WITH_BACKEND[args.command](args, hooks)
    except (CliError, PluginLoadError, HookError, CheckpointError, ModelError, FatalError) as exc:
        print(f"dra-core: error: {exc}", file=sys.stderr)
        return 2
