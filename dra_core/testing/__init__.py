"""The test kit of dra-core, for its own tests and for backend authors (``dra-core[testing]``).

``plugin``: the pytest plugin (control plane, ready Node, agent, kubelet, real node fixtures);
``agent``: a node agent started for a test; ``scenario``: Nodes, DeviceClasses, claims, pods
and waits; ``kubelet``: the kubelet's side of the agent's sockets; ``fakeapi``: an in-memory
API server for unit tests; ``conformance``: the conformance suite for backends; ``startup``:
an agent's start up to the kubelet's registration, on its own;
``controlplane`` and ``node``: the real control plane and node behind the fixtures.
"""
