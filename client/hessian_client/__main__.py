"""`python -m hessian_client` runs the `hessian` CLI."""

from .cli import main

raise SystemExit(main())
