"""Generated protobuf and gRPC code of the kubelet APIs dra-core serves, and of the two CRI
calls ``dra-core doctor`` makes to the container runtime (``cri_v1.proto``).

The ``.proto`` files here are the project's own, written from the wire facts of the upstream
APIs (same packages, services, messages and field numbers). Regenerate the ``*_pb2*`` modules
with ``python scripts/gen_protos.py``; never edit them by hand.
"""
