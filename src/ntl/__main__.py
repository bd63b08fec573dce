"""``python -m ntl`` == the ``ntl`` command."""

from .cli import main

raise SystemExit(main())
