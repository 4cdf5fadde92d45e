"""Generated protobuf and gRPC code of the kubelet APIs dra-core serves.

The ``.proto`` files here are the project's own, written from the wire facts of the kubelet
APIs (same packages, services, messages and field numbers). Regenerate the ``*_pb2*`` modules
with ``python scripts/gen_protos.py``; never edit them by hand.
"""
