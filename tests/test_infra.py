"""Deployment files under infra/ are valid and wired together consistently, checked offline.

Contract: every YAML file parses; the compose file validates against the Compose Specification
schema (vendored by check-jsonschema) and every built-in Kubernetes kind against the Kubernetes
OpenAPI schemas in strict mode (vendored by kubernetes-validate). On top of the schemas, the
checks below pin down what the schemas cannot see: Redis persists with AOF and never evicts,
SeaweedFS runs without telemetry, the worker's grace period sits between the shard-time budget
and the visibility timeout, each worker pod gets exactly one GPU, and KEDA scales the worker
Deployment on backlog + in-flight shards from a metric that exists even at zero workers.
"""

from __future__ import annotations

import copy
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

INFRA = Path(__file__).resolve().parents[1] / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
KUBERNETES_VERSION = "1.30"
# Custom resources whose CRD schemas are not vendored anywhere offline; field checks cover them.
CUSTOM_KINDS = {"ScaledObject", "PodMonitor"}
WORKER = "cola-batch-worker"

Doc = dict[str, Any]


def _manifest_paths() -> list[Path]:
    return sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def _k8s_docs() -> list[Doc]:
    docs = []
    for path in _manifest_paths():
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _one(kind: str, name: str) -> Doc:
    found = [d for d in _k8s_docs() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


def _compose() -> Doc:
    return yaml.safe_load(COMPOSE.read_text())


def _seconds(duration: str | int) -> int:
    """Compose durations such as '30m', '1h30m', '90s' or a bare number of seconds."""
    if isinstance(duration, int):
        return duration
    parts = re.findall(r"(\d+)(h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def _flag(command: list[str], name: str) -> str:
    """Value of `--name value` or `-name=value` in an argv list."""
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} missing from {command}")


def _container_env(container: Doc) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom first, then env."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env |= _one("ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            secret = _one("Secret", source["secretRef"]["name"])
            env |= secret.get("stringData", {})
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], var["value"])
    return env


def _budget(annotated: Doc) -> int:
    return int(annotated["metadata"]["annotations"]["cola-batch/shard-time-budget-seconds"])


# --- every file -----------------------------------------------------------------------------


def test_every_yaml_file_parses_and_every_manifest_names_itself() -> None:
    assert isinstance(_compose()["services"], dict)
    assert len(_manifest_paths()) >= 8
    for doc in _k8s_docs():
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert doc["metadata"].get("name"), doc


def test_kustomization_lists_exactly_the_manifests_that_exist() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert all((K8S / name).is_file() for name in listed)
    assert set(listed) == {p.name for p in _manifest_paths()}
    images = {i["name"] for i in kustomization["images"]}
    for doc in _k8s_docs():
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            if c["image"].startswith("cola-batch"):
                assert c["image"].split(":")[0] in images


def test_every_cola_batch_variable_set_is_a_setting_the_service_reads() -> None:
    """Settings ignore unknown COLA_BATCH_* variables, so a misspelt one would be lost silently."""
    from cola_batch.settings import Settings

    known = {"COLA_BATCH_" + field.upper() for field in Settings.model_fields}
    names = set(_compose()["x-cola-env"])
    for doc in _k8s_docs():
        names |= set(doc.get("data", {})) | set(doc.get("stringData", {}))
        for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            names |= {var["name"] for var in c.get("env", [])}
    used = {n for n in names if n.startswith("COLA_BATCH_")}
    assert len(used) >= 5
    assert used <= known, used - known


# --- compose --------------------------------------------------------------------------------


def _compose_validator() -> jsonschema.protocols.Validator:
    vendor = resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendor.joinpath("compose-spec.json").read_text())
    return jsonschema.Draft202012Validator(schema)


def test_compose_file_matches_the_compose_specification() -> None:
    validator = _compose_validator()
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(_compose())]
    assert errors == []
    # The schema bites: a misspelt key is an error, so a clean result above means something.
    broken = _compose()
    broken["services"]["redis"]["stop_grace_periode"] = "1m"
    assert not validator.is_valid(broken)


def test_compose_redis_uses_aof_and_refuses_to_evict() -> None:
    command = _compose()["services"]["redis"]["command"]
    assert _flag(command, "--appendonly") == "yes"
    assert _flag(command, "--appendfsync") == "everysec"
    assert _flag(command, "--maxmemory-policy") == "noeviction"
    assert _flag(command, "--requirepass")


def test_compose_seaweedfs_serves_s3_without_telemetry_and_with_credentials() -> None:
    services = _compose()["services"]
    command = services["seaweedfs"]["command"]
    assert command[0] == "server" and "-s3" in command
    assert "-master.telemetry=false" in command
    config_path = _flag(command, "-s3.config")
    mounts = dict(v.split(":")[:2][::-1] for v in services["seaweedfs"]["volumes"])
    identities = json.loads((INFRA / mounts[config_path]).read_text())["identities"]
    keys = {c["accessKey"] for ident in identities for c in ident["credentials"]}
    env = services["worker-cpu"]["environment"]
    assert re.fullmatch(r"\$\{AWS_ACCESS_KEY_ID:-(.+)\}", env["AWS_ACCESS_KEY_ID"])[1] in keys
    assert env["AWS_ENDPOINT_URL"] == f"http://seaweedfs:{_flag(command, '-s3.port')}"
    init = services["bucket-init"]
    assert init["restart"] == "no"
    assert init["depends_on"]["seaweedfs"]["condition"] == "service_healthy"
    assert "s3.bucket.create" in init["command"][0]


def _compose_workers() -> dict[str, Doc]:
    services = _compose()["services"]
    return {n: s for n, s in services.items() if s.get("command", [None])[0] == "worker"}


def test_compose_workers_drain_a_shard_before_the_visibility_timeout() -> None:
    compose = _compose()
    budget = compose["x-cola-batch-sizing"]["shard_time_budget_seconds"]
    workers = _compose_workers()
    assert set(workers) == {"worker", "worker-cpu"}
    for name, service in workers.items():
        grace = _seconds(service["stop_grace_period"])
        visibility = int(service["environment"]["COLA_BATCH_VISIBILITY_TIMEOUT_S"])
        assert budget < grace < visibility, name
        assert service["stop_signal"] == "SIGTERM"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["depends_on"]["bucket-init"]["condition"] == (
            "service_completed_successfully"
        )
        assert service["environment"]["COLA_BATCH_REDIS_URL"].endswith("@redis:6379/0")
        for var in ("COLA_BATCH_MAX_ATTEMPTS", "COLA_BATCH_SHARD_SIZE", "AWS_REGION"):
            assert var in service["environment"]
        assert _flag(service["command"], "--queue") == "cola-batch"
        assert _flag(service["command"], "--model") == "/models/cola_dlm"


def test_compose_gpu_profile_reserves_gpus_and_cpu_profile_scales_by_replicas() -> None:
    workers = _compose_workers()
    gpu = workers["worker"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    # One container forks one process per GPU; replicas with `count: 1` would share GPU 0.
    assert gpu["deploy"]["replicas"] == 1 and device["count"] == "all"
    assert _flag(gpu["command"], "--gpus")
    cpu = workers["worker-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert "replicas" in cpu["deploy"] and "resources" not in cpu["deploy"]
    assert "--gpus" not in cpu["command"]


# --- Dockerfiles ----------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]


@pytest.mark.parametrize(
    ("name", "base"),
    [("Dockerfile", "nvidia/cuda:12"), ("Dockerfile.cpu", "python:3.11-slim")],
)
def test_dockerfile_runs_cola_batch_as_non_root_and_stops_softly(name: str, base: str) -> None:
    path = INFRA / "docker" / name
    steps = _instructions(path)
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    bases = [re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], a.split()[0])
             for op, a in steps if op == "FROM"]
    assert bases and all(b.startswith(base) for b in bases)
    final = [a for op, a in steps if op == "USER"][-1]
    assert final.split(":")[0] not in {"root", "0"}
    assert ("STOPSIGNAL", "SIGTERM") in steps
    entrypoint = json.loads([a for op, a in steps if op == "ENTRYPOINT"][-1])
    assert entrypoint[-1] == "cola-batch"
    assert ("EXPOSE", "9300") in steps
    runs = " ".join(a for op, a in steps if op == "RUN")
    if name == "Dockerfile.cpu":
        assert "-c constraints-cpu.txt ." in runs
    else:
        assert runs.index('"torch==${TORCH_VERSION}"') < runs.index("pip install .")
    # Everything COPY'd from the build context exists and is not excluded by the dockerignore.
    ignore = (path.parent / f"{name}.dockerignore").read_text().splitlines()
    for op, arg in steps:
        if op == "COPY" and not arg.startswith("--from"):
            for src in arg.split()[:-1]:
                assert (INFRA.parent / src).exists(), src
                assert f"!{src.rstrip('/')}" in {i.rstrip("/") for i in ignore}, src


# --- Kubernetes -----------------------------------------------------------------------------


def test_builtin_kinds_match_the_kubernetes_schema_in_strict_mode() -> None:
    custom = set()
    for doc in _k8s_docs():
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            custom.add(doc["kind"])
    assert custom == CUSTOM_KINDS
    # Strict mode rejects unknown fields, e.g. a misspelt grace period that would silently
    # fall back to the 30 s default and SIGKILL shards mid-run.
    broken = copy.deepcopy(_one("Deployment", WORKER))
    broken["spec"]["template"]["spec"]["terminationGracePeriod"] = 1800
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_workloads_select_their_own_pods_and_run_as_non_root() -> None:
    for doc in _k8s_docs():
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        template = doc["spec"]["template"]
        selector = doc["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items()
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        for c in template["spec"]["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False


def _worker_container() -> Doc:
    (container,) = _one("Deployment", WORKER)["spec"]["template"]["spec"]["containers"]
    return container


def test_worker_pod_gets_exactly_one_gpu_and_pins_to_it() -> None:
    container = _worker_container()
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    args = container["args"]
    assert args[0] == "worker"
    assert _flag(args, "--gpus") == "0"
    assert _flag(args, "--queue") == "cola-batch"
    assert _flag(args, "--model").startswith("/models/")
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True
    # KEDA owns the replica count; a fixed one would fight it on every apply.
    assert "replicas" not in _one("Deployment", WORKER)["spec"]


def test_worker_grace_period_sits_between_shard_budget_and_visibility_timeout() -> None:
    deployment = _one("Deployment", WORKER)
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = _container_env(_worker_container())
    assert _budget(deployment) < grace < int(env["COLA_BATCH_VISIBILITY_TIMEOUT_S"])
    assert "lifecycle" not in _worker_container()  # a preStop hook would eat the grace period


def test_worker_env_is_complete_and_points_at_the_redis_service() -> None:
    env = _container_env(_worker_container())
    for var in ("COLA_BATCH_REDIS_URL", "COLA_BATCH_VISIBILITY_TIMEOUT_S",
                "COLA_BATCH_MAX_ATTEMPTS", "COLA_BATCH_SHARD_SIZE", "COLA_BATCH_API_TOKEN",
                "COLA_BATCH_METRICS_PORT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                "AWS_REGION"):
        assert env.get(var), var
    url = re.fullmatch(r"redis://:([^@]+)@([\w.-]+):(\d+)/\d+", env["COLA_BATCH_REDIS_URL"])
    assert url and url[1] == env["REDIS_PASSWORD"]
    service = _one("Service", url[2])
    assert int(url[3]) in {p["port"] for p in service["spec"]["ports"]}


def test_worker_probes_use_the_metrics_port_and_allow_for_model_load() -> None:
    container = _worker_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["metrics"] == int(_container_env(container)["COLA_BATCH_METRICS_PORT"]) == 9300
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/metrics" and get["port"] == "metrics", probe
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    annotations = _one("Deployment", WORKER)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9300"


def test_redis_statefulset_persists_with_aof_and_refuses_to_evict() -> None:
    conf = _one("ConfigMap", "redis-config")["data"]["redis.conf"]
    settings = dict(ln.split(None, 1) for ln in conf.splitlines() if ln and ln[0] != "#")
    assert settings["appendonly"] == "yes"
    assert settings["appendfsync"] == "everysec"
    assert settings["maxmemory-policy"] == "noeviction"
    redis = _one("StatefulSet", "redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert "/etc/redis/redis.conf" in container["args"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == settings["dir"]
    assert mounts["config"] == "/etc/redis"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "data"
    selector = _one("Service", "redis")["spec"]["selector"]
    assert selector.items() <= redis["spec"]["template"]["metadata"]["labels"].items()


def test_keda_scales_the_worker_deployment_on_backlog_from_zero() -> None:
    scaled = _one("ScaledObject", WORKER)
    spec = scaled["spec"]
    target = spec["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", WORKER)
    _one("Deployment", target["name"])
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    triggers = spec["triggers"]
    assert triggers and all(t["type"] == "prometheus" for t in triggers)
    for trigger in triggers:
        query = trigger["metadata"]["query"]
        assert "cola_batch_backlog_shards" in query
        # Every pod exports the same queue gauge: summing would count the backlog once per pod.
        assert query.startswith("max(") and "sum" not in query
        assert float(trigger["metadata"]["activationThreshold"]) == 0
        assert float(trigger["metadata"]["threshold"]) >= 1
        assert trigger["metadata"]["ignoreNullValues"] == "false"


def test_keda_never_scales_down_faster_than_a_shard_runs() -> None:
    budget = _budget(_one("Deployment", WORKER))
    spec = _one("ScaledObject", WORKER)["spec"]
    assert spec["cooldownPeriod"] > budget
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > budget
    assert spec["fallback"]["replicas"] >= 1


def test_backlog_metric_has_a_source_when_no_worker_runs() -> None:
    """At zero workers only an always-on exporter can report backlog, or KEDA never wakes up."""
    exporter = _one("Deployment", "cola-batch-exporter")
    assert exporter["spec"]["replicas"] >= 1
    (container,) = exporter["spec"]["template"]["spec"]["containers"]
    assert container["args"][0] == "exporter"
    assert _flag(container["args"], "--queue") == "cola-batch"
    assert {p["name"] for p in container["ports"]} == {"metrics"}
    monitor = _one("PodMonitor", "cola-batch")["spec"]
    selector = monitor["selector"]["matchLabels"]
    assert {e["port"] for e in monitor["podMetricsEndpoints"]} == {"metrics"}
    for name in (WORKER, "cola-batch-exporter"):
        labels = _one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name


def test_only_cola_batch_pods_may_reach_redis() -> None:
    policy = _one("NetworkPolicy", "redis-clients")["spec"]
    redis_labels = _one("StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
    (rule,) = policy["ingress"]
    allowed = rule["from"][0]["podSelector"]["matchLabels"]
    for name in (WORKER, "cola-batch-exporter"):
        labels = _one("Deployment", name)["spec"]["template"]["metadata"]["labels"]
        assert allowed.items() <= labels.items(), name
