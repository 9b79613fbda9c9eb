"""The gRPC adapter: decode -> engine -> encode. No maths lives here."""

from .app import ServerHandle, build_server, main
from .config import ServerConfig

__all__ = ["ServerConfig", "ServerHandle", "build_server", "main"]
