"""Run statuses and stop reasons: one enum each, matched to the wire's by name, and what a
real SQLite store hands back is typed with them."""

from __future__ import annotations

import pytest
import torch
from hessian_client.proto import optimize_pb2, service_pb2
from hessian_service.engine.errors import ValidationError
from hessian_service.engine.records import StepRecord, StopReason
from hessian_service.server import codec
from hessian_service.store import RunRow, RunStatus, SQLiteRunStore, StoredCheckpoint


def test_every_wire_run_status_has_exactly_one_run_status_of_its_name():
    wire = {v for v in service_pb2.RunStatus.values() if v}
    assert {codec.status_value(s) for s in RunStatus} == wire
    for value in wire:
        status = codec.status_from_wire(value, "status[0]")
        assert service_pb2.RunStatus.Name(value) == "RUN_STATUS_" + status.name


def test_every_wire_stop_reason_has_exactly_one_stop_reason_of_its_name():
    wire = {v for v in optimize_pb2.StopReason.values() if v}
    assert {codec.stop_reason_value(r) for r in StopReason} == wire
    assert codec.stop_reason_value("") == 0 and codec.stop_reason_value("no such") == 0


@pytest.mark.parametrize("value", [0, 99])
def test_a_status_filter_outside_the_enum_is_refused_naming_the_field(value):
    with pytest.raises(ValidationError) as info:
        codec.status_from_wire(value, "status[2]")
    assert info.value.field == "status[2]"


def test_a_stored_row_comes_back_with_its_status_and_stop_reason_as_enums(tmp_path):
    store = SQLiteRunStore(tmp_path)
    try:
        store.put_problem("p", b"")
        params = torch.zeros(2, dtype=torch.float64)
        checkpoint = StoredCheckpoint(0, "float64", [2], params.numpy().tobytes())
        store.create_run(RunRow("r-1", "p", {"options": {}, "stopping": {}}), checkpoint)
        store.update_run("r-1", status=RunStatus.FINISHED, stop_reason=StopReason.SHUTDOWN)
        store.create_run(RunRow("r-2", "p", {"options": {}, "stopping": {}}), checkpoint)
        store.update_run("r-2", status="FAILED", stop_reason="a damaged value")
        one, two = store.get_run("r-1"), store.get_run("r-2")
    finally:
        store.close()
    assert one.status is RunStatus.FINISHED and one.stop_reason is StopReason.SHUTDOWN
    assert two.status is RunStatus.FAILED and two.stop_reason == "a damaged value"
    assert codec.stop_reason_value(two.stop_reason) == 0


def test_a_run_info_shows_the_live_record_of_a_run_executing_here():
    spec = {"options": {"method": "newton"}, "stopping": {"max_iterations": 9}}
    row = RunRow("r-1", "p", spec, status="RUNNING", num_records=3)
    row.last_record = StepRecord(iteration=2, loss=5.0)
    stored = codec.run_to_wire(row)
    assert (stored.num_records, stored.last_record.iteration, stored.last_record.loss) == (3, 2, 5)
    live = codec.run_to_wire(row, StepRecord(iteration=6, loss=1.5))
    assert (live.num_records, live.last_record.iteration, live.last_record.loss) == (7, 6, 1.5)
    assert live.status == service_pb2.RUN_STATUS_RUNNING and live.stopping.max_iterations == 9
    assert live.method == optimize_pb2.METHOD_NEWTON
