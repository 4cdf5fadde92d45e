"""Test helpers for dra-core and for backend authors (fakes of the kubelet and friends)."""
