"""Generated gRPC/protobuf stubs for hessian.v1 (`make proto`; never edit by hand)."""
