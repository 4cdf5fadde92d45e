"""``dra-core doctor``: check a node and its cluster for what the agent needs, and say what to fix.

The checks, in the order they are reported:

- **API server**: reachable with the agent's credentials (``--kubeconfig``, ``$KUBECONFIG`` or
  the in-cluster service account, as ``run``); serves ``resource.k8s.io/v1``; accepts a
  ResourceSlice of this node and driver (a server-side dry run, ``dryRun=All``: nothing is
  stored); and keeps the fields of each optional feature (partitionable devices, consumable
  capacity, device taints). The features are found by asking the server, not from its
  version, as the agent does (`dra_core.slices.features`: one dry-run create, two on 1.34
  with partitionable devices on). A feature whose fields are dropped warns, naming the
  devices of this node the agent leaves out because of it.
- **kubelet**: the Node object of this node exists and its kubelet speaks the DRA gRPC API
  ``v1`` (1.34 and later) or ``v1beta1`` (1.32, 1.33).
- **container runtime**: containerd or CRI-O, its version (from its CRI socket when there is
  one, else from the Node), CDI enabled, and the agent's CDI directory among the directories
  the runtime reads specs from (from the runtime itself through its socket when it answers,
  else from its configuration files).
- **directories**: the kubelet's plugin registration and plugin directories exist and are
  writable, and the CDI directory is (or can be created).
- **backend**: the backend's and extension plugins' own checks (hook ``dra_doctor_checks``),
  and a discovery as ``dra-core discover`` does it.

Checks that need the API server are skipped, with the reason, when there is no kubeconfig and
no in-cluster configuration. Nothing on the node or in the cluster is changed. Each check is
``ok``, ``warn`` (works, but something is missing or will bite later), ``fail`` (the agent or
some claims will not work) or ``skip``; :attr:`DoctorReport.exit_code` is 1 when any failed.

The checks live by what they check (`cluster`, `runtime`, `directories`); `report` holds the
settings, the report and `run_doctor`, which runs them all.
"""

from dra_core.doctor.cluster import api_checks, kubelet_version_check
from dra_core.doctor.directories import directory_checks
from dra_core.doctor.report import DoctorReport, DoctorSettings, Section, run_doctor
from dra_core.doctor.runtime import (
    DEFAULT_CDI_SPEC_DIRS,
    DEFAULT_CONTAINERD_CONFIG,
    DEFAULT_CRIO_CONFIG,
    DEFAULT_RUNTIME_SOCKETS,
    RuntimeInfo,
    query_runtime,
    runtime_checks,
)
from dra_core.slices.features import FEATURES, Feature

__all__ = (
    "DEFAULT_CDI_SPEC_DIRS",
    "DEFAULT_CONTAINERD_CONFIG",
    "DEFAULT_CRIO_CONFIG",
    "DEFAULT_RUNTIME_SOCKETS",
    "FEATURES",
    "DoctorReport",
    "DoctorSettings",
    "Feature",
    "RuntimeInfo",
    "Section",
    "api_checks",
    "directory_checks",
    "kubelet_version_check",
    "query_runtime",
    "run_doctor",
    "runtime_checks",
)
