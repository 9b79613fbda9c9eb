"""Start a run here and watch it from a second process (any machine that reaches the server
could do the same with the run id: `hessian watch RUN_ID`)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from hessian_client import Client, problems

with Client() as client:
    run = client.start_run(
        problems.rosenbrock(dim=4),
        np.full(4, -1.0),
        method="newton",
        step_policy="levenberg_marquardt",
        stopping={"max_iterations": 200},
        name="watched",
    )
    print(f"started {run.id}; a second process watches it")
    watcher = subprocess.run(
        [sys.executable, "-m", "hessian_client", "--address", client.address,
         "watch", run.id, "--json"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    *records, final = [json.loads(line) for line in watcher.stdout.splitlines()]
    mine = run.records()
    same = [r["loss"] for r in records] == [r.loss for r in mine]
    print(f"the watcher saw {len(records)} records and the final status {final['status']}")
    print(f"same records as this process: {same}")
