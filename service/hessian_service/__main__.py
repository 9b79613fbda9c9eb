"""`python -m hessian_service` runs the seed reproduction."""

from .seed import main

raise SystemExit(main())
