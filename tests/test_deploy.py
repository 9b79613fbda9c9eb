"""The container deployment, checked without a Docker engine.

- docker-compose.yml validates against the Compose Specification schema (the copy the pinned
  `check-jsonschema` ships), and its cross-references hold (volumes, secrets, bind mounts,
  ports, Prometheus target, build args);
- the server starts exactly as the image's ENTRYPOINT/CMD with the image's ENV, the image's
  HEALTHCHECK command reports it healthy, and SIGTERM ends it cleanly (exit 0);
- the Dockerfile installs from the same requirement files and local packages as
  `make install`, in the same order, and copies everything it installs into the build;
- the health probe: 0 only for SERVING (a real gRPC health server, no mocks);
- the Kubernetes Deployment's CPU limit equals its request (the quota the server sizes its
  torch threads from).
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import pathlib
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent import futures

import grpc
import jsonschema
import pytest
import yaml
from deploy_files import (
    dockerignore_patterns,
    dockerignored,
    healthcheck,
    last_exec_form,
    make_target_commands,
    normalise_path,
    parse_dockerfile,
    pip_flags,
    pip_install_items,
    shell_commands,
    stage_env,
)
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from hessian_client import Client, Unauthenticated
from hessian_service import healthprobe

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text())
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SCHEMA = json.loads(
    importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    .joinpath("compose-spec.json")
    .read_text()
)
IMAGE_VENV_BIN = "/opt/venv/bin"
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
# HESSIAN_* variables read outside the server's flags: the engine's backend choice.
ENGINE_ENV = {"HESSIAN_BACKEND"}


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def schema_errors(document: object) -> list[str]:
    """Compose-spec violations of `document`, as 'path: message' lines."""
    validator = jsonschema.Draft202012Validator(SCHEMA)
    return [
        "/".join(map(str, e.absolute_path)) + ": " + e.message
        for e in validator.iter_errors(document)
    ]


def volume_mounts(service: dict) -> dict[str, str]:
    """source -> container path of a service's short-syntax volumes (mode dropped)."""
    return dict(tuple(v.split(":")[:2]) for v in service["volumes"])


@pytest.fixture(scope="module")
def server_env_vars() -> set[str]:
    """HESSIAN_<FLAG> for every flag `hessian-server --help` lists."""
    out = subprocess.run(
        [sys.executable, "-m", "hessian_service.server", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    flags = set(re.findall(r"--([a-z][a-z0-9-]+)", out)) - {"help"}
    assert {"address", "data-dir", "workers"} <= flags, out
    return {"HESSIAN_" + f.replace("-", "_").upper() for f in flags}


# --- docker-compose.yml ---------------------------------------------------------------


def test_compose_file_is_valid_compose_spec() -> None:
    assert schema_errors(COMPOSE) == []


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda c: c["services"]["hessian"]["healthcheck"].update(tset=["CMD", "true"]), "tset"),
        (lambda c: c["services"]["hessian"].update(ports="50051:50051"), "ports"),
        (lambda c: c["secrets"]["auth_token"].update(file=7), "file"),
        (lambda c: c.update(volume={"x": None}), "volume"),
    ],
)
def test_schema_rejects_broken_compose_files(mutate, fragment: str) -> None:
    broken = copy.deepcopy(COMPOSE)
    mutate(broken)
    errors = schema_errors(broken)
    assert errors and any(fragment in e for e in errors), errors


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed")
def test_docker_compose_config_accepts_every_profile() -> None:
    """Debian's docker-compose 1.29 resolves the file without an engine, when installed."""
    out = subprocess.run(
        ["docker-compose", "--profile", "gpu", "--profile", "monitoring", "config", "--services"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert set(out.stdout.split()) == {"hessian", "hessian-gpu", "prometheus"}


def test_compose_services_use_the_image_probe_volume_and_secret() -> None:
    _, probe = healthcheck(DOCKERFILE.final)
    for name in ("hessian", "hessian-gpu"):
        service = COMPOSE["services"][name]
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD" and test[1 : 1 + len(probe)] == probe, (name, test)
        mounts = volume_mounts(service)
        data_dir = service["environment"]["HESSIAN_DATA_DIR"]
        named = [src for src, dst in mounts.items() if dst == data_dir]
        assert named and named[0] in COMPOSE["volumes"], (name, mounts)
        assert service["secrets"] == ["auth_token"]
        assert service["environment"]["HESSIAN_AUTH_TOKEN_FILE"] == "/run/secrets/auth_token"
        assert service["init"] is True
    gpu = COMPOSE["services"]["hessian-gpu"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices and "gpu" in devices[0]["capabilities"]
    assert gpu["volumes"] != COMPOSE["services"]["hessian"]["volumes"], "one SQLite per server"


def test_every_server_service_gets_the_shared_environment() -> None:
    """A setting added where the README says (x-hessian-environment) reaches every server,
    the scale replicas too (their own `environment` once replaced it: a merge is shallow)."""
    shared = COMPOSE["x-hessian-environment"]
    servers = [n for n, s in COMPOSE["services"].items() if n.startswith("hessian")]
    assert sorted(servers) == ["hessian", "hessian-gpu", "hessian-replica"]
    for name in servers:
        environment = COMPOSE["services"][name]["environment"]
        assert {k: environment.get(k) for k in shared} == shared, name


def test_compose_secret_is_a_git_ignored_file() -> None:
    path = COMPOSE["secrets"]["auth_token"]["file"]
    assert normalise_path(path).startswith("secrets/")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", normalise_path(path)], cwd=ROOT, timeout=30
    )
    assert ignored.returncode == 0, f"{path} is not git-ignored: a real token could be committed"
    tracked = subprocess.run(
        ["git", "ls-files", "secrets"], cwd=ROOT, capture_output=True, text=True, timeout=30
    ).stdout.split()
    assert set(tracked) <= {"secrets/.gitignore"}, tracked


def test_compose_gpu_build_args_are_dockerfile_args_with_a_cuda_base() -> None:
    declared = set(DOCKERFILE.global_args)
    for stage in DOCKERFILE.stages:
        declared |= {a.partition("=")[0] for a in stage.args("ARG")}
    args = COMPOSE["services"]["hessian-gpu"]["build"]["args"]
    assert set(args) <= declared, set(args) - declared
    assert args["BUILDER_BASE"].startswith("nvidia/cuda:") and "devel" in args["BUILDER_BASE"]
    assert args["RUNTIME_BASE"].startswith("nvidia/cuda:")
    assert "/whl/cu" in args["TORCH_INDEX_URL"]
    assert [s.base for s in DOCKERFILE.stages] == ["${BUILDER_BASE}", "${RUNTIME_BASE}"]


def test_prometheus_profile_scrapes_the_metrics_port() -> None:
    prometheus = COMPOSE["services"]["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    mounts = volume_mounts(prometheus)
    config_path = next(a.split("=", 1)[1] for a in prometheus["command"] if "config.file" in a)
    host_file = next(src for src, dst in mounts.items() if dst == config_path)
    config = yaml.safe_load((ROOT / host_file).read_text())
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    metrics_port = COMPOSE["services"]["hessian"]["environment"]["HESSIAN_METRICS_PORT"]
    assert f"hessian:{metrics_port}" in targets
    exposed = " ".join(DOCKERFILE.final.args("EXPOSE")).split()
    assert metrics_port in exposed and "50051" in exposed
    published = [p.rsplit(":", 1)[1] for p in COMPOSE["services"]["hessian"]["ports"]]
    assert sorted(published) == sorted(exposed)


def cpu_quantity(text: str | int | float) -> float:
    """A Kubernetes CPU quantity in CPUs ("2", 2, "1500m")."""
    text = str(text)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def test_kubernetes_cpu_limit_equals_the_request_so_the_server_sees_a_quota() -> None:
    # without limits.cpu the pod has no CFS quota (cgroup cpu.max "max"), and the server's
    # thread policy sizes torch from the node's every core instead of the CPUs requested
    deployments = [
        doc
        for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc["kind"] == "Deployment"
    ]
    assert deployments
    for deployment in deployments:
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            resources = container["resources"]
            assert "cpu" in resources.get("limits", {}), f"{container['name']}: no CPU limit"
            limit, request = resources["limits"]["cpu"], resources["requests"]["cpu"]
            assert cpu_quantity(limit) == cpu_quantity(request), (limit, request)


def test_every_hessian_variable_is_a_server_flag(server_env_vars: set[str]) -> None:
    image_env = stage_env(DOCKERFILE.final, {})
    names = {k for k in image_env if k.startswith("HESSIAN_")}
    for service in ("hessian", "hessian-gpu"):
        names |= set(COMPOSE["services"][service]["environment"])
    unknown = names - server_env_vars - ENGINE_ENV
    assert not unknown, f"not server flags (typo?): {sorted(unknown)}"


# --- Dockerfile ---------------------------------------------------------------------


def pip_steps(lines: list[str]) -> list[tuple[list[str], set[str]]]:
    """(items, flags) of each pip install in shell command lines, in order."""
    steps = []
    for line in lines:
        for words in shell_commands(line):
            items = pip_install_items(words)
            if items is not None:
                steps.append((items, pip_flags(words)))
    return steps


def test_dockerfile_installs_what_make_install_installs() -> None:
    make_steps = pip_steps(make_target_commands((ROOT / "Makefile").read_text(), "install"))
    builder = DOCKERFILE.stages[0]
    docker_steps = pip_steps(builder.args("RUN"))
    make_items = [i for items, _ in make_steps for i in items]
    docker_items = [i for items, _ in docker_steps for i in items]
    assert "req:requirements/torch.txt" in make_items
    # The image carries no test tools: everything else is the same, in the same order.
    assert docker_items == [i for i in make_items if i != "req:requirements/dev.txt"]
    for items, flags in docker_steps + make_steps:
        if any(i.startswith("path:") for i in items):
            assert "--no-build-isolation" in flags, items
    torch_flags = next(f for items, f in docker_steps if "req:requirements/torch.txt" in items)
    assert "--index-url" in torch_flags
    assert any(a == f"TORCH_INDEX_URL={CPU_TORCH_INDEX}" for a in builder.args("ARG")), (
        builder.args("ARG")
    )


def test_dockerfile_copies_what_it_installs_and_dockerignore_keeps_it() -> None:
    builder = DOCKERFILE.stages[0]
    patterns = dockerignore_patterns((ROOT / ".dockerignore").read_text())
    copied: list[str] = []
    for keyword, text in builder.instructions:
        if keyword == "COPY":
            *sources, _dest = text.split()
            for src in sources:
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
                assert not dockerignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
                copied.append(normalise_path(src))
        elif keyword == "RUN":
            for words in shell_commands(text):
                for item in pip_install_items(words) or []:
                    kind, _, path = item.partition(":")
                    if kind == "req":
                        assert path in copied, f"{path} installed before it is copied"
                    elif kind == "path":
                        needed = "setup.py" if path == "." else path
                        assert needed in copied, f"{path} installed before it is copied"
    for secret_or_state in (".venv", "data", ".git", "secrets/auth_token", "build"):
        assert dockerignored(secret_or_state, patterns), secret_or_state


def test_every_run_instruction_is_valid_shell() -> None:
    for stage in DOCKERFILE.stages:
        for script in stage.args("RUN"):
            check = subprocess.run(["sh", "-n", "-c", script], capture_output=True, timeout=30)
            assert check.returncode == 0, (script, check.stderr)


def test_build_time_native_check_runs_here() -> None:
    """The builder's `python -c` extension check compiles and honours REQUIRE_NATIVE=0."""
    snippets = [
        words[words.index("-c") + 1]
        for script in DOCKERFILE.stages[0].args("RUN")
        for words in shell_commands(script)
        if words[:2] == ["python", "-c"]
    ]
    assert len(snippets) == 1 and "native_status" in snippets[0], snippets
    env = dict(os.environ, REQUIRE_NATIVE="0")
    out = subprocess.run(
        [sys.executable, "-c", snippets[0]], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("native backend:"), out.stdout


def test_final_stage_is_slim_unprivileged_and_signal_safe() -> None:
    final = DOCKERFILE.final
    assert final.args("USER") and final.args("USER")[-1] not in ("root", "0")
    copies = final.args("COPY")
    assert copies == ["--from=builder /opt/venv /opt/venv"], "only the built venv"
    assert not any("pip" in run or "g++" in run for run in final.args("RUN"))
    entrypoint = last_exec_form(final, "ENTRYPOINT")  # raises for a shell form
    assert entrypoint[:3] == ["python", "-m", "hessian_service.server"]
    assert final.args("STOPSIGNAL") == ["SIGTERM"]
    assert "/data" in " ".join(final.args("VOLUME"))


# --- the image's entry point, run here ------------------------------------------------


def image_environment(tmp: pathlib.Path, port: int, metrics_port: int) -> dict[str, str]:
    """The final stage's ENV, its paths mapped here, on a loopback address and free ports.

    /opt/venv -> this venv, /run/secrets/auth_token -> a fresh token file, /data -> a temp
    folder; everything else (backend, log settings, ...) is exactly the image's.
    """
    local_bin = str(pathlib.Path(sys.executable).parent)
    env = stage_env(DOCKERFILE.final, {"PATH": os.environ["PATH"]})
    assert env["PATH"].startswith(IMAGE_VENV_BIN + ":"), env["PATH"]
    env["PATH"] = local_bin + env["PATH"][len(IMAGE_VENV_BIN) :]
    assert env["HESSIAN_ADDRESS"].startswith("0.0.0.0:")
    assert env["HESSIAN_AUTH_TOKEN_FILE"] == "/run/secrets/auth_token", "the compose secret"
    token_file = tmp / "secrets" / "auth_token"
    token_file.parent.mkdir()
    token_file.write_text(secrets.token_urlsafe(32) + "\n")  # as `make secrets` writes it
    env.update(
        HESSIAN_ADDRESS=f"127.0.0.1:{port}",
        HESSIAN_DATA_DIR=str(tmp / "data"),
        HESSIAN_AUTH_TOKEN_FILE=str(token_file),
        HESSIAN_METRICS_PORT=str(metrics_port),
        HOME=str(tmp / "home"),
    )
    for key in ("LANG", "LC_ALL", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "SYSTEMROOT"):
        if key in os.environ:
            env.setdefault(key, os.environ[key])
    return env


def run_probe(command: list[str], env: dict[str, str], cwd: pathlib.Path) -> int:
    """Run the image's HEALTHCHECK command; its exit code."""
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=30).returncode


def check_running_container(env: dict[str, str]) -> None:
    """What a client and Prometheus see: auth on, the image's backend, metrics served."""
    address, token = env["HESSIAN_ADDRESS"], pathlib.Path(env["HESSIAN_AUTH_TOKEN_FILE"])
    with Client(address, timeout=10) as anonymous, pytest.raises(Unauthenticated):
        anonymous.info()
    with Client(address, token=token.read_text().strip(), timeout=10) as client:
        assert client.info().default_backend == env["HESSIAN_BACKEND"]
    url = f"http://127.0.0.1:{env['HESSIAN_METRICS_PORT']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        metrics = response.read().decode()
    assert re.search(r'hessian_rpcs_total\{[^}]*code="UNAUTHENTICATED"[^}]*\} 1\.0', metrics)


@pytest.mark.slow
def test_image_entry_point_serves_probes_healthy_and_stops_on_sigterm(
    tmp_path: pathlib.Path,
) -> None:
    port, metrics_port = free_port(), free_port()
    env = image_environment(tmp_path, port, metrics_port)
    (tmp_path / "home").mkdir()
    command = last_exec_form(DOCKERFILE.final, "ENTRYPOINT") + last_exec_form(
        DOCKERFILE.final, "CMD"
    )
    _, probe = healthcheck(DOCKERFILE.final)
    assert run_probe(probe, env, tmp_path / "home") == 1, "healthy before the server started"
    proc = subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path / "home",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        while run_probe(probe, env, tmp_path / "home") != 0:
            assert proc.poll() is None, f"server exited {proc.returncode}: {proc.stdout.read()}"
            assert time.monotonic() < deadline, "never became healthy"
            time.sleep(0.5)
        assert list((tmp_path / "data").iterdir()), "HESSIAN_DATA_DIR from ENV was not used"
        check_running_container(env)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, output
    assert "Traceback" not in output, output
    assert f"127.0.0.1:{port}" in output, output
    assert run_probe(probe, env, tmp_path / "home") == 1, "healthy after the server stopped"


# --- the health probe -----------------------------------------------------------------


@pytest.fixture
def health_server():
    """A real gRPC server with only the standard health service, on a free port."""
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(None)


def test_probe_is_healthy_only_while_serving(health_server, capsys) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthprobe.main(["--address", address]) == 0
    assert "SERVING" in capsys.readouterr().out
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert healthprobe.main(["--address", address]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err
    servicer.enter_graceful_shutdown()
    assert healthprobe.main(["--address", address]) == 1


def test_probe_reports_unknown_services_and_dead_ports(health_server, capsys) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert healthprobe.main(["--address", address, "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    started = time.monotonic()
    assert healthprobe.main(["--address", f"127.0.0.1:{free_port()}", "--timeout", "1"]) == 1
    assert time.monotonic() - started < 60  # a hang guard: the RPC deadline is 1 s
    assert re.search(r"UNAVAILABLE|DEADLINE_EXCEEDED", capsys.readouterr().err)


def test_probe_address_follows_the_server_setting(monkeypatch, health_server) -> None:
    servicer, address = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = address.rsplit(":", 1)[1]
    monkeypatch.setenv("HESSIAN_ADDRESS", f"0.0.0.0:{port}")
    assert healthprobe.main([]) == 0
    assert healthprobe.probe_address("[::]:7") == "[::1]:7"
    assert healthprobe.probe_address("db.internal:7") == "db.internal:7"
    for bad in ("no-port", "host:http"):
        with pytest.raises(ValueError, match="--address"):
            healthprobe.probe_address(bad)
        assert healthprobe.main(["--address", bad]) == 1
    assert healthprobe.main(["--timeout", "0"]) == 1


def openssl(*args: str, cwd: pathlib.Path) -> None:
    """Run openssl quietly, failing the test on error."""
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture
def tls_health_server(tmp_path: pathlib.Path):
    """A TLS gRPC health server whose certificate names only `hessian.internal`."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not on PATH")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=probe CA",
            cwd=tmp_path)  # fmt: skip
    openssl("req", *ec[:5], "-keyout", "server.key", "-out", "server.csr",
            "-subj", "/CN=hessian.internal", cwd=tmp_path)  # fmt: skip
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:hessian.internal\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
            cwd=tmp_path)  # fmt: skip
    credentials = grpc.ssl_server_credentials(
        [((tmp_path / "server.key").read_bytes(), (tmp_path / "server.pem").read_bytes())]
    )
    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield f"127.0.0.1:{port}", tmp_path / "ca.pem"
    server.stop(None)


def test_probe_verifies_a_tls_server_with_its_ca_and_name(
    tls_health_server, monkeypatch, capsys
) -> None:
    address, ca = tls_health_server
    base = ["--address", address, "--timeout", "2"]
    assert healthprobe.main([*base, "--ca-file", str(ca), "--server-name", "hessian.internal"]) == 0
    assert healthprobe.main([*base, "--ca-file", str(ca)]) == 1, "127.0.0.1 is not in the cert"
    assert healthprobe.main(base) == 1, "plaintext against a TLS port"
    assert healthprobe.main([*base, "--ca-file", str(ca.parent / "missing.pem")]) == 1
    assert "--ca-file" in capsys.readouterr().err
    monkeypatch.setenv("HESSIAN_TLS_CERT", "/run/secrets/server.pem")
    assert healthprobe.main(base) == 1
    assert "HESSIAN_CA_FILE" in capsys.readouterr().err
    monkeypatch.setenv("HESSIAN_CA_FILE", str(ca))
    monkeypatch.setenv("HESSIAN_PROBE_SERVER_NAME", "hessian.internal")
    assert healthprobe.main(base) == 0, "the container's way: everything from the environment"
