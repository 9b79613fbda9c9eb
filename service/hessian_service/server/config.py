"""Server configuration: one frozen dataclass built from flags, each also an environment variable.

Precedence: flag, then HESSIAN_<NAME> (e.g. HESSIAN_MAX_PARAMS), then the default here.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

MiB = 1024**2


@dataclass(frozen=True)
class ServerConfig:
    """Everything `hessian-server` can be told; limits are enforced before work is done."""

    address: str = "127.0.0.1:50051"
    data_dir: str = "./data"
    workers: int = 2
    rpc_threads: int = 64
    max_message_bytes: int = 64 * MiB
    max_params: int = 1_000_000
    dense_budget_bytes: int = 2 * 1024 * MiB
    max_iterations: int = 1_000_000
    max_concurrent_runs: int = 64
    checkpoint_every: int = 100
    commit_every_records: int = 256
    commit_interval_ms: int = 200
    grace_seconds: float = 10.0
    default_backend: str = ""
    log_level: str = "INFO"

    @property
    def problem_cache_size(self) -> int:
        """How many built objectives stay in memory, keyed by problem id."""
        return 64

    def validated(self) -> ServerConfig:
        """Check ranges; raise ValueError naming the flag."""
        for name in (
            "workers",
            "rpc_threads",
            "max_message_bytes",
            "max_params",
            "dense_budget_bytes",
            "max_iterations",
            "max_concurrent_runs",
            "checkpoint_every",
            "commit_every_records",
            "commit_interval_ms",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
        if self.default_backend not in ("", "auto", "native", "autograd"):
            raise ValueError("--default-backend must be auto, native or autograd")
        return self

    @classmethod
    def from_args(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> ServerConfig:
        """Parse flags (falling back to HESSIAN_* environment variables, then defaults)."""
        env = os.environ if environ is None else environ
        parser = argparse.ArgumentParser(
            prog="hessian-server", description="Second-order optimisation gRPC server"
        )
        for f in fields(cls):
            flag = "--" + f.name.replace("_", "-")
            var = "HESSIAN_" + f.name.upper()
            kind: Any = type(f.default)
            default = kind(env[var]) if var in env else f.default
            parser.add_argument(
                flag, type=kind, default=default, help=f"(env {var}, default {f.default!r})"
            )
        args = parser.parse_args(argv)
        return cls(**vars(args)).validated()
