"""`python -m muonkit` runs the command line."""

from muonkit.cli import main

raise SystemExit(main())
