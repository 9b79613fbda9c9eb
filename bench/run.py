"""Run the benchmark sections and write them into BENCHMARKS.md.

Each module `bench/bench_<name>.py` defines `TITLE` and `run() -> str` (a markdown body).
`--only NAME` reruns one section and keeps the others as they are in the file.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import re
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import machine  # noqa: E402

HEADER = """# Benchmarks

Produced by `make bench` (`python bench/run.py`). Each section names the machine it ran
on; numbers are medians of repeated runs, peers measured side by side in the same run.
"""


def sections() -> list[str]:
    """Names of the benchmark modules, in file order."""
    return sorted(p.stem.removeprefix("bench_") for p in HERE.glob("bench_*.py"))


def render(name: str) -> str:
    """Run one section and wrap it in markers so it can be replaced alone later."""
    module = importlib.import_module(f"bench_{name}")
    body = module.run()
    return (
        f"<!-- section:{name} -->\n## {module.TITLE}\n\nMachine: {machine()}\n\n{body.strip()}\n"
        f"<!-- /section:{name} -->\n"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", default="BENCHMARKS.md")
    parser.add_argument("--only", action="append", choices=sections())
    args = parser.parse_args()
    path = pathlib.Path(args.output)
    text = path.read_text() if path.exists() else HEADER
    for name in args.only or sections():
        print(f"== {name}", flush=True)
        block = render(name)
        print(block, flush=True)
        pattern = re.compile(rf"<!-- section:{name} -->.*?<!-- /section:{name} -->\n", re.DOTALL)
        if pattern.search(text):
            text = pattern.sub(lambda _m, b=block: b, text)
        else:
            text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
