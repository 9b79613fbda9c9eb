"""The client's version and the API version (MAJOR.MINOR of hessian.v1) its stubs speak."""

__version__ = "0.2.0"
API_VERSION = "1.1"
