"""The client's version and the API version (MAJOR.MINOR of hessian.v1) its stubs speak."""

__version__ = "0.2.0"
# minor 1: Predict, ServerInfo.api_version/client_version; minor 2: StartAndWatchRun
API_VERSION = "1.2"
