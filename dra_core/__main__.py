"""``python -m dra_core`` runs the ``dra-core`` command."""

from dra_core.cli import main

raise SystemExit(main())
