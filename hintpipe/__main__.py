"""``python -m hintpipe``: the command line."""

from hintpipe.cli import main

raise SystemExit(main())
