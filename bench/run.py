"""Run the benchmark sections and write them into BENCHMARKS.md.

Each module `bench/bench_<name>.py` defines `TITLE` and `run() -> str` (a markdown body).
`--only NAME` reruns one section and keeps the others as they are in the file. `--loaded`
runs each section while a CPU burner spins on every core and writes it as `NAME_loaded`, so
the file holds a quiet and a loaded variant side by side. Every section reports the load
other processes put on the machine before and after it, and says so when that moved by more
than 1 (the section's numbers are then unreliable).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import QUICK, CpuBurner, OthersLoad, load_line, machine, quick  # noqa: E402

HEADER = """# Benchmarks

Produced by `make bench` (`python bench/run.py`, quiet) and `python bench/run.py --loaded`
(sections suffixed `_loaded`: a CPU burner spins on every core meanwhile). Each section names
the machine it ran on and the load other processes put on it; numbers are medians of repeated
runs, compared calls timed interleaved in the same rounds, every verdict computed in the run.
"""


def sections() -> list[str]:
    """Names of the benchmark modules, in file order."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def render(name: str, load: OthersLoad, burner: CpuBurner | None) -> tuple[str, str]:
    """Run one section (the caller keeps the burner running when given); its marker name and
    its markdown, wrapped in markers so it can be replaced alone later."""
    module = importlib.import_module(f"bench_{name}")
    title, marker = module.TITLE, name
    before, kernel_before = load.value, os.getloadavg()[0]
    body = module.run()
    after, kernel_after = load.value, os.getloadavg()[0]
    if burner:
        title += f" (loaded: {burner.processes} CPU burners)"
        marker += "_loaded"
    report = load_line(before, after, (kernel_before, kernel_after))
    quick_note = "\n\n**Smoke run** (HESSIAN_BENCH_QUICK=1): reduced sizes and repeats." * QUICK
    return marker, (
        f"<!-- section:{marker} -->\n## {title}\n\nMachine: {machine()}\n\n{report}{quick_note}"
        f"\n\n{body.strip()}\n<!-- /section:{marker} -->\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--only", action="append", choices=sections())
    parser.add_argument(
        "--loaded", action="store_true", help="run under a CPU burner, as NAME_loaded sections"
    )
    args = parser.parse_args()
    path = pathlib.Path(args.output)
    text = path.read_text() if path.exists() else ""
    first = text.find("<!-- section:")
    text = HEADER + ("\n" + text[first:] if first >= 0 else "")  # the header is this file's
    burner = CpuBurner() if args.loaded else None
    common.VARIANT = "_loaded" if args.loaded else ""
    load = OthersLoad()
    # One burner across every section: the load average settles once, not once per section.
    burning = burner.running(load, settle_s=quick(150.0, 0.0)) if burner else None
    try:
        with burning or contextlib.nullcontext():
            for name in args.only or sections():
                print(f"== {name}", flush=True)
                marker, block = render(name, load, burner)
                print(block, flush=True)
                pattern = re.compile(
                    rf"<!-- section:{marker} -->.*?<!-- /section:{marker} -->\n", re.DOTALL
                )
                if pattern.search(text):
                    text = pattern.sub(lambda _m, b=block: b, text)
                else:
                    text = text.rstrip("\n") + "\n\n" + block
                path.write_text(text)
    finally:
        load.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
