"""``python -m tokenlimit``: the command line (see ``tokenlimit._cli``)."""

from tokenlimit._cli import main

raise SystemExit(main())
