"""The scaled-out deployment, checked offline: the compose profile `scale` (PostgreSQL,
3 replicas, Envoy) and its cross-references, Envoy's routing to the replicas with gRPC
health checks, and the Kubernetes manifests' structure (selectors match, probes use gRPC
health on the serving port, the DSN comes from a Secret, the Service is headless) and their
validity against the real Kubernetes JSON schemas (strict: unknown fields are errors), which
`kubernetes-validate` ships per Kubernetes version, so no network is needed."""

from __future__ import annotations

import copy
import pathlib
import subprocess

import kubernetes_validate
import pytest
import yaml
from deploy_files import normalise_path

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
ENVOY = yaml.safe_load((ROOT / "deploy" / "envoy.yaml").read_text())
K8S = [
    doc
    for path in sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
    for doc in yaml.safe_load_all(path.read_text())
    if doc
]
SECRET_EXAMPLE = yaml.safe_load((ROOT / "deploy/kubernetes/examples/secret.yaml").read_text())
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").rglob("*.yaml"))
# The oldest Kubernetes the manifests support (gRPC probes are GA from 1.27) and the newest
# whose schemas the pinned kubernetes-validate ships.
K8S_VERSIONS = ("1.27", kubernetes_validate.latest_version())
SERVICES = COMPOSE["services"]


def _server_flags() -> set[str]:
    from hessian_service.server import ServerConfig

    return {"HESSIAN_" + f.upper() for f in ServerConfig.__dataclass_fields__}


def _kind(kind: str) -> dict:
    (doc,) = [d for d in K8S if d["kind"] == kind]
    return doc


def test_scale_profile_postgres_is_the_official_image_with_a_volume_and_healthcheck():
    pg = SERVICES["postgres"]
    assert pg["profiles"] == ["scale"]
    assert pg["image"].split(":")[0] == "postgres" and pg["image"].split(":")[1].startswith("15")
    source, target = pg["volumes"][0].split(":")[:2]
    assert source in COMPOSE["volumes"] and target == "/var/lib/postgresql/data"
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    secret_path = pg["environment"]["POSTGRES_PASSWORD_FILE"]
    assert secret_path == "/run/secrets/" + pg["secrets"][0]


def test_scale_replicas_share_postgres_and_read_its_password_from_the_secret():
    rep = SERVICES["hessian-replica"]
    env = rep["environment"]
    assert rep["profiles"] == ["scale"] and rep["deploy"]["replicas"] == 3
    assert set(env) <= _server_flags() | {"HESSIAN_BACKEND"}, set(env) - _server_flags()
    dsn = env["HESSIAN_STORE"]
    assert dsn.startswith("postgresql://") and "@postgres:5432/" in dsn
    user = dsn.removeprefix("postgresql://").split("@")[0]
    assert ":" not in user, "no password in the DSN: it comes from the secret file"
    assert user == SERVICES["postgres"]["environment"]["POSTGRES_USER"]
    assert dsn.rsplit("/", 1)[1] == SERVICES["postgres"]["environment"]["POSTGRES_DB"]
    password_file = env["HESSIAN_STORE_PASSWORD_FILE"]
    assert password_file == "/run/secrets/postgres_password"
    assert "postgres_password" in rep["secrets"]
    assert rep["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ports" not in rep, "replicas are reached through Envoy, not one host port each"
    path = COMPOSE["secrets"]["postgres_password"]["file"]
    ignored = subprocess.run(["git", "check-ignore", "-q", normalise_path(path)], cwd=ROOT)
    assert ignored.returncode == 0, f"{path} is not git-ignored"
    assert "secrets/postgres_password" in (ROOT / "Makefile").read_text()


def test_envoy_routes_grpc_to_every_replica_with_health_checks():
    envoy = SERVICES["envoy"]
    mount = envoy["volumes"][0].split(":")
    assert normalise_path(mount[0]) == "deploy/envoy.yaml" and mount[1] == envoy["command"][-1]
    assert envoy["depends_on"]["hessian-replica"]["condition"] == "service_healthy"
    (listener,) = ENVOY["static_resources"]["listeners"]
    port = listener["address"]["socket_address"]["port_value"]
    assert any(p.endswith(f":{port}") for p in envoy["ports"])
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    route = manager["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s", "a WatchRun stream may outlive any fixed timeout"
    (cluster,) = ENVOY["static_resources"]["clusters"]
    assert route["cluster"] == cluster["name"]
    assert cluster["type"] == "STRICT_DNS" and cluster["lb_policy"] == "ROUND_ROBIN"
    options = cluster["typed_extension_protocol_options"]
    (http,) = options.values()
    assert "http2_protocol_options" in http["explicit_http_config"], "gRPC needs HTTP/2 upstream"
    (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address = endpoint["endpoint"]["address"]["socket_address"]
    replica_port = SERVICES["hessian-replica"]["environment"]["HESSIAN_ADDRESS"].rsplit(":", 1)[1]
    assert address["address"] == "hessian-replica" and str(address["port_value"]) == replica_port
    assert "grpc_health_check" in cluster["health_checks"][0]


def test_kubernetes_objects_have_api_versions_and_names():
    kinds = {(d["apiVersion"], d["kind"]) for d in K8S}
    assert kinds == {
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("policy/v1", "PodDisruptionBudget"),
    }
    assert all(d["metadata"]["name"] == "hessian" for d in K8S)


def test_kubernetes_selectors_match_the_pods():
    deployment = _kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        _kind("Service")["spec"]["selector"],
        _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items(), (selector, labels)
    pdb = _kind("PodDisruptionBudget")["spec"]
    assert 0 < pdb["minAvailable"] < deployment["spec"]["replicas"]


def test_kubernetes_probes_use_grpc_health_on_the_serving_port():
    (container,) = _kind("Deployment")["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    serving = int(env["HESSIAN_ADDRESS"]["value"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["grpc"] == serving
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == serving, probe
    assert container["livenessProbe"]["initialDelaySeconds"] >= 30  # torch import, migration
    service_port = _kind("Service")["spec"]["ports"][0]
    assert service_port["targetPort"] == "grpc" and service_port["port"] == serving


def test_kubernetes_service_is_headless_and_the_dsn_comes_from_a_secret():
    assert _kind("Service")["spec"]["clusterIP"] == "None"
    spec = _kind("Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert set(env) <= _server_flags(), set(env) - _server_flags()
    ref = env["HESSIAN_STORE"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == SECRET_EXAMPLE["metadata"]["name"]
    assert ref["key"] in SECRET_EXAMPLE["stringData"]
    assert SECRET_EXAMPLE["stringData"][ref["key"]].startswith("postgresql://")
    assert env["HESSIAN_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    (volume,) = spec["volumes"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    token = env["HESSIAN_AUTH_TOKEN_FILE"]["value"]
    keys = [i["path"] for i in volume["secret"]["items"]]
    assert token.startswith(mount["mountPath"] + "/") and token.rsplit("/", 1)[1] in keys
    assert volume["secret"]["secretName"] == ref["name"]
    assert spec["securityContext"]["runAsNonRoot"] is True


def k8s_schema_errors(doc: dict, version: str) -> list[str]:
    """The strict Kubernetes `version` schema's verdict on `doc`, as 'path: message' lines.

    An unknown kind or apiVersion raises SchemaNotFoundError: nothing passes unchecked.
    """
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [".".join(map(str, e.absolute_path)) + ": " + e.message]
    return []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_kubernetes_manifests_validate_against_the_kubernetes_schemas(path, version):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path}: no objects"
    for doc in docs:
        assert k8s_schema_errors(doc, version) == [], (path.name, doc["kind"])


def _container(doc: dict) -> dict:
    return doc["spec"]["template"]["spec"]["containers"][0]


def _store_env(doc: dict) -> dict:
    return next(e for e in _container(doc)["env"] if e["name"] == "HESSIAN_STORE")


@pytest.mark.parametrize(
    "kind, mutate, path, fragment",
    [
        (
            "Deployment",
            lambda d: _container(d)["readinessProbe"]["grpc"].update(prot=50051),
            "spec.template.spec.containers.0.readinessProbe.grpc",
            "'prot' was unexpected",
        ),
        (
            "Deployment",
            lambda d: d["spec"].update(replicas="3"),
            "spec.replicas",
            "is not of type 'integer'",
        ),
        (
            "Deployment",
            lambda d: _store_env(d)["valueFrom"]["secretKeyRef"].pop("key"),
            "spec.template.spec.containers.0.env.",
            "'key' is a required property",
        ),
        (
            "Service",
            lambda d: d["spec"]["ports"][0].update(port="50051"),
            "spec.ports.0.port",
            "is not of type 'integer'",
        ),
        (
            "PodDisruptionBudget",
            lambda d: d["spec"].update(minAvailabe=2),
            "spec",
            "'minAvailabe' was unexpected",
        ),
    ],
)
def test_kubernetes_schemas_reject_broken_manifests(kind, mutate, path, fragment):
    broken = copy.deepcopy(_kind(kind))
    mutate(broken)
    for version in K8S_VERSIONS:
        (error,) = k8s_schema_errors(broken, version)
        where, _, message = error.partition(": ")
        assert where.startswith(path) and fragment in message, (version, error)


def test_kubernetes_schemas_refuse_an_api_the_version_removed():
    """policy/v1beta1 PodDisruptionBudget was removed in 1.25: no schema, no silent pass."""
    old = dict(_kind("PodDisruptionBudget"), apiVersion="policy/v1beta1")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        k8s_schema_errors(old, K8S_VERSIONS[0])
