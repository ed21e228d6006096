"""``deploy/kubernetes/``, proved without a cluster.

- schema: every built-in object validates (strictly: no unknown field) against the Kubernetes
  API's own JSON schemas, which the ``kubernetes-validate`` package carries, for the oldest and
  the newest version it knows; the ServiceMonitor (a CRD, no schema there) and the kustomization
  are checked field by field;
- consistency: every env name is one the hub reads, the command is one its CLI accepts, every
  probe path and port and the metrics port are the ones those settings serve, selectors select,
  and the shutdown timings add up (preStop + drain + the supervisor's kill grace fit in the grace
  period);
- behaviour: the pod's command and environment (the Secret filled in from a private Redis, the
  address made local) run as a real process; each probe answers as the kubelet expects, and
  SIGTERM drains a connected client with 1001 and exits in time.
"""

from __future__ import annotations

import copy
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

import kubernetes_validate.utils as schemas
import pytest
import yaml
from procfix import clean_env, free_port, wait_until
from test_deploy import SECRETS, cli_settings, env_names
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from wshelp import run, within

from hub.tokens import mint_token
from workers.supervisor import Policy

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

REPO = Path(__file__).resolve().parent.parent
KUBE = REPO / "deploy" / "kubernetes"
HUB = str(Path(sys.executable).with_name("hub"))
#: Not applied by the kustomization: the Secret is the operator's, the ServiceMonitor needs a CRD.
APPLIED_APART = {"secret.example.yaml", "servicemonitor.yaml"}


def versions() -> list[str]:
    known = sorted(set(schemas.all_versions()), key=lambda v: tuple(map(int, v.split("."))))
    return [known[0], known[-1]]


def manifests() -> dict[str, dict[str, Any]]:
    """Every object by kind (one of each here), from every file."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in found, f"a second {doc['kind']} in {path.name}"
            found[doc["kind"]] = doc
    return found


def container() -> dict[str, Any]:
    (hub,) = manifests()["Deployment"]["spec"]["template"]["spec"]["containers"]
    return dict(hub)


def secret_values(**changes: str) -> dict[str, str]:
    """The Secret's keys, filled in as an operator would (``changes`` on top)."""
    keys = manifests()["Secret"]["stringData"]
    filled = {
        "token-secret": SECRETS["HUB_TOKEN_SECRET"],
        "api-key": SECRETS["HUB_API_KEY"],
        "redis-url": "redis://redis.example.internal:6379/0",
    }
    assert set(keys) == set(filled), keys
    return {**filled, **changes}


def pod_env(secret: dict[str, str]) -> dict[str, str]:
    """The container's environment as the kubelet builds it: values, and secretKeyRefs read from
    the Secret named ``hub``."""
    env = {}
    for item in container()["env"]:
        if "value" in item:
            env[item["name"]] = str(item["value"])
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == manifests()["Secret"]["metadata"]["name"], ref
            env[item["name"]] = secret[ref["key"]]
    return env


def container_port(name_or_number: str | int) -> int:
    """A probe's or a Service's port: a container port's name, or a number."""
    if isinstance(name_or_number, int):
        return name_or_number
    ports = {p["name"]: p["containerPort"] for p in container()["ports"]}
    return int(ports[name_or_number])


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- schema ------------------------------------------------------------------------------------


def test_every_object_validates_against_the_kubernetes_api_schemas() -> None:
    found = manifests()
    assert {"Deployment", "Service", "PodDisruptionBudget", "Secret"} <= set(found), set(found)
    for kind, doc in found.items():
        if kind in ("Kustomization", "ServiceMonitor"):
            continue
        for version in versions():
            schemas.validate(doc, version, strict=True)


def test_the_schema_check_catches_a_mistake() -> None:
    """The check above can fail: a misspelt field and a wrong type are both refused."""
    deployment = manifests()["Deployment"]
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["replicas"] = "three"
    for broken in (typo, wrong_type):
        with pytest.raises(schemas.ValidationError):
            schemas.validate(broken, versions()[-1], strict=True)


def test_kustomization_and_service_monitor() -> None:
    found = manifests()
    kustomization = found["Kustomization"]
    assert kustomization["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    listed = set(kustomization["resources"])
    files = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == files - APPLIED_APART, listed

    monitor = found["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(monitor["spec"]) == {"selector", "endpoints"}
    service = found["Service"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}, endpoint
        assert endpoint["port"] in names and endpoint["path"] == "/metrics"
        assert re.fullmatch(r"\d+s", endpoint["interval"])


# --- consistency -------------------------------------------------------------------------------


def test_the_pod_uses_real_settings_probes_and_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = container()
    env = pod_env(secret_values())
    assert set(env) <= env_names(), set(env) - env_names()
    settings = cli_settings(hub["command"], env, monkeypatch)
    assert not settings.insecure and settings.host == "0.0.0.0"
    assert settings.redis_url and settings.api_key and settings.token_secret
    assert settings.workers >= 2

    (http,) = [p for p in hub["ports"] if p["name"] == "http"]
    assert http["containerPort"] == settings.port
    assert hub["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert hub["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert hub["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container_port(hub[probe]["httpGet"]["port"]) == settings.port, probe

    # Metrics: where the hub serves /metrics, whichever way Prometheus finds it.
    metrics_port = getattr(settings, "metrics_port", None) or settings.port
    found = manifests()
    (metrics,) = [p for p in found["Service"]["spec"]["ports"] if p["name"] == "metrics"]
    assert container_port(metrics["targetPort"]) == metrics_port
    annotations = found["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"
    (http_service,) = [p for p in found["Service"]["spec"]["ports"] if p["name"] == "http"]
    assert container_port(http_service["targetPort"]) == settings.port


def test_shutdown_timings_add_up(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = container()
    settings = cli_settings(hub["command"], pod_env(secret_values()), monkeypatch)
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    command = hub["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    pre_stop = float(command[1])
    assert pre_stop > 0, "endpoints need a moment to drop the pod before it stops accepting"
    # The kubelet's clock starts at preStop; SIGKILL must come after the supervisor's own.
    assert pod["terminationGracePeriodSeconds"] > (
        pre_stop + settings.drain_seconds + Policy().kill_grace
    )


def test_selectors_rollout_and_disruption_budget() -> None:
    found = manifests()
    deployment = found["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
    assert selects(found["Service"]["spec"]["selector"], labels)
    assert selects(found["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"], labels)
    replicas = deployment["spec"]["replicas"]
    assert replicas >= 2, "one pod draining must leave another"
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    budget = found["PodDisruptionBudget"]["spec"]
    # A budget that allows no disruption at all would block every node drain.
    assert 1 <= budget["maxUnavailable"] < replicas, budget


def test_the_pod_runs_as_the_images_user_on_a_read_only_root() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    uid = re.search(r"useradd [^\n]*--uid (\d+)", dockerfile)
    assert uid, "the Dockerfile's user"
    pod = manifests()["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == int(uid.group(1))
    hub = container()
    assert hub["securityContext"]["readOnlyRootFilesystem"] is True
    assert hub["securityContext"]["allowPrivilegeEscalation"] is False
    # The supervisor's metrics directory needs a writable /tmp.
    (tmp,) = [m for m in hub["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert hub["image"] == compose["x-hub"]["image"], "the image docker-compose builds"


@pytest.mark.parametrize("key", ["token-secret", "api-key", "redis-url"])
def test_the_secret_left_empty_is_refused(key: str) -> None:
    """Applying secret.example.yaml unfilled gives a pod that says what is missing, not a hub
    without auth or without its API key."""
    assert manifests()["Secret"]["stringData"][key] == ""
    env = pod_env(secret_values(**{key: ""}))
    done = subprocess.run(
        [HUB, "check-config"], env=clean_env(**env), capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 2, done.stdout
    named = {"token-secret": "token_secret", "api-key": "api_key", "redis-url": "redis_url"}
    assert named[key] in done.stderr, done.stderr


# --- behaviour ---------------------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:  # not listening yet (or any more): what a probe counts as a failure
        return 0, b""


def test_the_pod_answers_its_probes_and_drains_on_sigterm(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    hub = container()
    port = free_port()
    env = pod_env(secret_values(**{"redis-url": redis_server.url}))
    metrics_port = free_port()
    # The pod's addresses, made local.
    env.update(HUB_HOST="127.0.0.1", HUB_PORT=str(port), HUB_METRICS_PORT=str(metrics_port))
    log_path = tmp_path / "pod.log"
    argv = [HUB, *hub["command"][1:]]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, env=clean_env(**env, TMPDIR=str(tmp_path)), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            path = hub[probe]["httpGet"]["path"]
            wait_until(
                lambda path=path: proc.poll() is not None or get(port, path)[0] == 200,  # type: ignore[misc]
                30,
                f"{probe} {path} answers 200",
                interval=0.1,
            )
            assert proc.poll() is None, log_path.read_text()
        status, body = get(metrics_port, "/metrics")
        assert status == 200 and b"hub_connections " in body
        assert get(port, "/metrics")[0] == 404, "the public port must not show the counters"

        grace = manifests()["Deployment"]["spec"]["template"]["spec"][
            "terminationGracePeriodSeconds"
        ]
        pre_stop = float(hub["lifecycle"]["preStop"]["exec"]["command"][1])

        async def drained() -> int | None:
            token = mint_token("pod-user", SECRETS["HUB_TOKEN_SECRET"])
            url = f"ws://127.0.0.1:{port}/ws?token={token}"
            async with connect(url, subprotocols=["hub.v1.json"], proxy=None) as conn:  # type: ignore[list-item]
                proc.send_signal(signal.SIGTERM)  # what the kubelet sends once preStop is done
                with pytest.raises(ConnectionClosed):
                    while True:
                        await within(conn.recv(), grace)
                return conn.close_code

        assert run(drained, timeout=grace) == 1001
        assert proc.wait(grace - pre_stop) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
