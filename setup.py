"""Installs `hessian_service` from service/ (the native extension is added by csrc/)."""

from setuptools import find_packages, setup

setup(
    name="hessian-service",
    version="0.1.0",
    description="Second-order optimisation as a gRPC service",
    python_requires=">=3.11",
    package_dir={"": "service"},
    packages=find_packages("service"),
    install_requires=["torch>=2.3", "numpy>=1.26"],
    entry_points={"console_scripts": ["hessian-server=hessian_service.server:main"]},
)
