"""ResourceSlice publishing: building slice bodies from an inventory and keeping them in the API."""

from __future__ import annotations

from dra_core.slices.build import build_slices

__all__ = ("build_slices",)
