"""`python -m hessian_service.server` runs the server (same as `hessian-server`)."""

from .app import main

raise SystemExit(main())
