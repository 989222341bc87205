"""`python -m vit_helpers train | download | bench`: see vit_helpers/cli.py."""

from vit_helpers.cli import main

raise SystemExit(main())
