"""`python -m omi_cli`: the same as the `omi-server` command."""

from omi_cli.main import main

raise SystemExit(main())
