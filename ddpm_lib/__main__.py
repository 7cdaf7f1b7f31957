"""``python -m ddpm_lib train|sample …`` (see ``ddpm_lib.cli``)."""

from .cli import main

raise SystemExit(main())
