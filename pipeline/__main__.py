"""``python -m pipeline ...``: see ``python -m pipeline --help``."""

from pipeline.cli import main

raise SystemExit(main())
