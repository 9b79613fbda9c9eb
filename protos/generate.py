"""Generate the Python wire stubs from protos/hessian/v1/*.proto (used by `make proto`).

grpcio-tools writes `from hessian.v1 import x_pb2`; the stubs live flat in the client's
package `hessian_client.proto`, so those imports are rewritten to relative ones, and the
module name the classes are built under (their __module__, which pickle imports them by)
to `hessian_client.proto.x_pb2`. The output is deterministic: a test regenerates into a
temporary folder and compares.

    python protos/generate.py [OUT_DIR]   (default client/hessian_client/proto)
"""

from __future__ import annotations

import pathlib
import re
import sys
import tempfile

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_OUT = ROOT / "client" / "hessian_client" / "proto"
PACKAGE_DIR = pathlib.Path("hessian") / "v1"
INIT = '"""Generated gRPC/protobuf stubs for hessian.v1 (`make proto`; never edit by hand)."""\n'
IMPORT = re.compile(r"^from hessian\.v1 import (\w+_pb2)", re.MULTILINE)
MODULE = re.compile(r"(BuildTopDescriptorsAndMessages\(DESCRIPTOR, )'hessian\.v1\.(\w+_pb2)'")


def proto_files() -> list[pathlib.Path]:
    """The .proto sources, sorted."""
    return sorted((HERE / PACKAGE_DIR).glob("*.proto"))


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Write the stubs (and the package __init__) into `out_dir`; return the files written."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{HERE}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(HERE)) for p in proto_files()),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed")
        for src in sorted((pathlib.Path(tmp) / PACKAGE_DIR).iterdir()):
            text = IMPORT.sub(r"from . import \1", src.read_text())
            text = MODULE.sub(r"\1'hessian_client.proto.\2'", text)
            dest = out_dir / src.name
            dest.write_text(text)
            written.append(dest)
    init = out_dir / "__init__.py"
    init.write_text(INIT)
    written.append(init)
    return written


def main(argv: list[str]) -> int:
    """Command-line entry point."""
    out = pathlib.Path(argv[0]) if argv else DEFAULT_OUT
    if out.exists() and out == DEFAULT_OUT:
        for stale in out.glob("*_pb2*.py*"):
            stale.unlink()
    for path in generate(out):
        print(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
