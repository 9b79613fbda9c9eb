"""The checked-in wire stubs are exactly what `make proto` generates from protos/."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
STUBS = ROOT / "client" / "hessian_client" / "proto"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_proto", ROOT / "protos" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checked_in_stubs_match_a_fresh_generation(tmp_path):
    written = _generator().generate(tmp_path)
    fresh = {p.name: p.read_bytes() for p in written}
    checked_in = {p.name: p.read_bytes() for p in STUBS.iterdir() if p.is_file()}
    assert sorted(fresh) == sorted(checked_in), "stub files differ: run `make proto`"
    stale = [name for name in fresh if fresh[name] != checked_in[name]]
    assert not stale, f"stale stubs (run `make proto`): {stale}"


def test_every_proto_has_stubs():
    protos = sorted(p.stem for p in (ROOT / "protos" / "hessian" / "v1").glob("*.proto"))
    assert protos == ["optimize", "problem", "service", "tensor"]
    for stem in protos:
        assert (STUBS / f"{stem}_pb2.py").is_file()
        assert (STUBS / f"{stem}_pb2_grpc.py").is_file()
