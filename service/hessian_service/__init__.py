"""Second-order optimisation service: engine, native hot path, gRPC server and store."""

__version__ = "0.1.0"
