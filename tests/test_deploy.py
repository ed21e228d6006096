"""The deployment (``docker-compose.yml`` and ``deploy/``), proved without a Docker engine.

Two kinds of test:

- consistency: ``docker-compose config`` (Debian's docker-compose 1.29 validates and resolves the
  file without an engine) and the resolved services, the Dockerfile, nginx's and Prometheus's
  configs and the Grafana dashboard agree with each other and with the hub's real CLI, settings
  and metrics;
- end to end, where a Docker engine answers (tests/dockerfix.py): the compose file itself through
  testcontainers, image built, every service up and healthy, real clients through the published
  nginx port and Prometheus's API; see :func:`compose_in_docker`;
- end to end everywhere else (no engine, the default here): the compose topology as local
  processes. A private Redis, two ``hub serve`` built
  from the compose services' own ``command:`` and ``environment:`` (only the address, port and
  Redis URL changed), Debian's nginx running ``deploy/nginx.conf`` (only ports, host names and the
  paths an unprivileged run needs changed) and Prometheus running ``deploy/prometheus.yml`` (only
  the targets and the scrape interval changed). Real WebSocket clients go through nginx.

A missing system binary fails the test with the fix (``make sysdeps``); nothing is skipped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import dockerfix
import pytest
import yaml
from procfix import clean_env, free_port, wait_until
from prometheus_client import CollectorRegistry
from websockets.asyncio.client import ClientConnection, connect
from wshelp import run, within

from hub import cli
from hub.config import Settings
from hub.metrics import BROKER_COUNTERS, Metrics
from hub.redis.publisher import Publisher
from hub.tokens import mint_token
from workers.supervisor import Policy
from workers.worker import WORKER_HEADER

if TYPE_CHECKING:
    from redisfix import RedisServer

pytest_plugins = ["redisfix"]

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "deploy" / "Dockerfile"
NGINX_CONF = REPO / "deploy" / "nginx.conf"
PROMETHEUS_CONF = REPO / "deploy" / "prometheus.yml"
DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
HUB = str(Path(sys.executable).with_name("hub"))
#: What `docker compose up` needs from the operator's environment (the file requires both).
SECRETS = {
    "HUB_TOKEN_SECRET": "deploy-test-secret-0123456789abcdef",
    "HUB_API_KEY": "deploy-key-0123456789abcdef0123456789",
}
HEALTH_PATHS = {"/healthz", "/readyz"}
START_TIMEOUT = 30.0  # several helpers' suites share two cores: starting is slow, never fatal
READY = re.compile(r"worker \d+ ready: pid (\d+)")
T = TypeVar("T")


# --- helpers -------------------------------------------------------------------------------------


def binary(name: str, fallback: str) -> str:
    """The system binary the test drives; a missing one fails with how to install it."""
    found = shutil.which(name) or (fallback if os.access(fallback, os.X_OK) else None)
    if found is None:
        pytest.fail(
            f"{name} not found (looked on PATH and at {fallback}): run `make sysdeps` "
            "(scripts/system-deps.sh installs nginx, prometheus and docker-compose)",
            pytrace=False,
        )
    return found


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def answers(url: str) -> bool:
    try:
        return http_get(url)[0] == 200
    except OSError:
        return False


def replace_all(text: str, old: str, new: str) -> str:
    """``str.replace`` that fails when ``old`` is absent: a rewrite must rewrite something."""
    assert old in text, f"{old!r} not found"
    return text.replace(old, new)


# --- the compose file, resolved by docker-compose itself -----------------------------------------


@functools.cache
def compose() -> dict[str, Any]:
    """``docker-compose config``: the file validated, anchors merged, variables filled in."""
    done = subprocess.run(
        [binary("docker-compose", "/usr/bin/docker-compose"), "-f", str(COMPOSE), "config"],
        cwd=REPO,
        env=clean_env(**SECRETS),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"docker-compose config failed:\n{done.stderr}"
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def services() -> dict[str, dict[str, Any]]:
    return dict(compose()["services"])


def hub_services() -> dict[str, dict[str, Any]]:
    """The services built from deploy/Dockerfile, by name."""
    return {
        name: s
        for name, s in services().items()
        if Path(s.get("build", {}).get("dockerfile", "")).as_posix() == "deploy/Dockerfile"
    }


def env_names() -> set[str]:
    """Every ``HUB_*`` variable hub/config.py reads."""
    names = {f"HUB_{f.name.upper()}" for f in dataclasses.fields(Settings)}
    return (names - {"HUB_NAMESPACES"}) | {"HUB_CONFIG"}


def cli_settings(command: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """The settings ``command`` would serve with: the hub's own parser and loader, stopping just
    short of serving (``cmd_serve`` is swapped for one that returns the settings it built)."""
    assert command[0] == "hub", command
    for name in [k for k in os.environ if k.startswith("HUB_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, str(value))
    built: list[Settings] = []

    def fake_serve(args: Any) -> int:
        built.append(cli._settings(args))
        return 0

    monkeypatch.setattr(cli, "cmd_serve", fake_serve)
    code = cli.main(command[1:])
    assert code == 0, f"{command} with {env}: exit {code}"
    assert len(built) == 1, f"{command} does not run `hub serve`"
    return built[0]


def health_url(test: list[str] | str) -> urllib.parse.SplitResult:
    """The URL a healthcheck command requests."""
    text = test if isinstance(test, str) else " ".join(test)
    match = re.search(r"https?://[^\s'\"]+", text)
    assert match, f"no URL in healthcheck {test!r}"
    return urllib.parse.urlsplit(match.group(0))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    pairs = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            pairs.append((word.upper(), rest.strip()))
    return pairs


def final_stage() -> list[tuple[str, str]]:
    pairs = dockerfile()
    last = max(i for i, (word, _) in enumerate(pairs) if word == "FROM")
    return pairs[last:]


def docker_env(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for word, rest in stage:
        if word == "ENV":
            for item in shlex.split(rest):
                name, _, value = item.partition("=")
                env[name] = value
    return env


# --- nginx.conf, read just enough -----------------------------------------------------------------


def nginx_blocks(text: str) -> dict[str, list[list[str]]]:
    """Directives by enclosing block: ``{"http/upstream hub": [["server", "hub1:8765", ...]]}``."""
    text = re.sub(r"#[^\n]*", "", text)
    tokens = re.findall(r'"[^"]*"|[{};]|[^\s{};]+', text)
    blocks: dict[str, list[list[str]]] = {}
    stack: list[str] = []
    current: list[str] = []
    for token in tokens:
        if token == "{":
            stack.append(" ".join(current))
            current = []
        elif token == "}":
            stack.pop()
        elif token == ";":
            blocks.setdefault("/".join(stack), []).append(current)
            current = []
        else:
            current.append(token.strip('"'))
    assert not stack, "unbalanced braces in nginx.conf"
    return blocks


def directive(block: list[list[str]], name: str) -> list[list[str]]:
    return [d[1:] for d in block if d[0] == name]


def nginx_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)?", value)
    assert match, value
    return int(match.group(1)) * units[match.group(2) or "s"]


def upstream_servers() -> dict[str, list[str]]:
    blocks = nginx_blocks(NGINX_CONF.read_text())
    return {
        key.rpartition("upstream ")[2]: [d[0] for d in directive(block, "server")]
        for key, block in blocks.items()
        if key.startswith("http/upstream ")
    }


def hub_addresses() -> dict[str, str]:
    """``service:port`` of every hub service, the port from its own environment."""
    return {f"{name}:{s['environment']['HUB_PORT']}": name for name, s in hub_services().items()}


# --- consistency -------------------------------------------------------------------------------


def test_compose_file_validates_and_requires_the_secrets() -> None:
    tool = binary("docker-compose", "/usr/bin/docker-compose")
    argv = [tool, "-f", str(COMPOSE), "config", "-q"]
    ok = subprocess.run(argv, cwd=REPO, env=clean_env(**SECRETS), capture_output=True, timeout=60)
    assert ok.returncode == 0, ok.stderr.decode()
    # No default secret: without one, compose refuses and names the variable.
    bare = subprocess.run(argv, cwd=REPO, env=clean_env(), capture_output=True, timeout=60)
    assert bare.returncode != 0
    assert "HUB_TOKEN_SECRET" in bare.stderr.decode()
    names = set(services())
    assert {"redis", "nginx", "prometheus"} <= names, names
    assert len(hub_services()) >= 2, "two hub containers behind nginx"


def test_hub_services_use_real_settings_and_a_command_the_cli_accepts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    known = env_names()
    all_services = services()
    for name, service in hub_services().items():
        env = {k: str(v) for k, v in service["environment"].items()}
        unknown = {k for k in env if k.startswith("HUB_")} - known
        assert not unknown, f"{name}: the hub does not read {sorted(unknown)}"
        settings = cli_settings(service["command"], env, monkeypatch)
        assert settings.workers >= 2, f"{name}: several workers per container"
        assert not settings.insecure and settings.host == "0.0.0.0"
        redis = urllib.parse.urlsplit(settings.redis_url)
        assert redis.hostname in all_services and redis.port == 6379, settings.redis_url
        assert service["depends_on"][redis.hostname]["condition"] == "service_healthy"
        # Ports: exposed is what the hub listens on; so is what its healthcheck asks.
        assert [str(p) for p in service["expose"]] == [str(settings.port)]
        assert all(p["target"] == settings.port for p in service.get("ports", []))
        url = health_url(service["healthcheck"]["test"])
        assert (url.port, url.path) in {(settings.port, p) for p in HEALTH_PATHS}, url
        # Docker's SIGKILL comes after the drain and the supervisor's own kill grace.
        grace = nginx_seconds(service["stop_grace_period"])
        assert grace > settings.drain_seconds + Policy().kill_grace

        # The real CLI, in a real process, with the service's environment.
        done = subprocess.run(
            [HUB, "check-config"], env=clean_env(**env), capture_output=True, text=True, timeout=30
        )
        assert done.returncode == 0, done.stderr
        assert f"config ok: 0.0.0.0:{settings.port}  broker: redis://" in done.stdout
        assert "auth: jwt HS256" in done.stdout and "dev mode" not in done.stdout


def test_dockerfile_agrees_with_the_hub_and_compose(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = final_stage()
    words = [word for word, _ in stage]
    env = docker_env(stage)
    assert {k for k in env if k.startswith("HUB_")} <= env_names(), env
    port = int(env["HUB_PORT"])
    assert [rest for word, rest in stage if word == "EXPOSE"] == [str(port)]
    (health,) = [rest for word, rest in stage if word == "HEALTHCHECK"]
    url = health_url(health)
    assert url.port == port and url.path in HEALTH_PATHS, health
    users = [rest for word, rest in stage if word == "USER"]
    assert users and users[-1].partition(":")[0] not in ("root", "0"), "runs as root"
    assert words.index("USER") < words.index("CMD")
    (cmd,) = [rest for word, rest in stage if word == "CMD"]
    settings = cli_settings(json.loads(cmd), {**env, **SECRETS}, monkeypatch)
    assert settings.port == port and settings.host == "0.0.0.0"
    for name, service in hub_services().items():
        assert service["environment"]["HUB_PORT"] == str(port), name
        assert health_url(service["healthcheck"]["test"]) == url, f"{name}: another healthcheck"


def test_the_image_gets_every_package_and_the_build_context_only_those() -> None:
    """The build stage copies what ``pip install .`` needs; the ignore file lets exactly that in."""
    copied = {
        src.rstrip("/")
        for word, rest in dockerfile()
        if word == "COPY" and "--from" not in rest
        for src in shlex.split(rest)[:-1]
    }
    assert {"pyproject.toml", "README.md"} <= copied, copied
    for src in copied:
        assert (REPO / src).exists(), src
    with (REPO / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)
    for pattern in project["tool"]["setuptools"]["packages"]["find"]["include"]:
        assert pattern.removesuffix("*") in copied, f"package {pattern} not copied"
    ignore = (REPO / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "ignore everything, then let in what is copied"
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == copied, (allowed, copied)


def test_nginx_balances_websockets_over_every_hub_service() -> None:
    blocks = nginx_blocks(NGINX_CONF.read_text())
    (upstream,) = upstream_servers().items()
    upstream_name, servers = upstream
    assert sorted(servers) == sorted(hub_addresses()), servers
    (server,) = [key for key in blocks if key == "http/server"]
    (listen,) = directive(blocks[server], "listen")
    nginx = services()["nginx"]
    assert [p["target"] for p in nginx["ports"]] == [int(listen[0])]
    mounts = [v.split(":") for v in nginx["volumes"]]
    assert [str(NGINX_CONF), "/etc/nginx/nginx.conf", "ro"] in mounts, mounts
    for hub in hub_services():
        assert nginx["depends_on"][hub]["condition"] == "service_healthy"

    ws = blocks["http/server/location = /ws"]
    assert directive(ws, "proxy_pass") == [[f"http://{upstream_name}"]]
    headers = {d[0].lower(): d[1] for d in directive(ws, "proxy_set_header")}
    assert headers["upgrade"] == "$http_upgrade"
    assert headers["connection"] == "$connection_upgrade"
    version = directive(ws, "proxy_http_version") or directive(blocks[server], "proxy_http_version")
    assert version == [["1.1"]]
    # Idle WebSockets must outlive the hub's keepalive pings by far.
    defaults = Settings()
    for name in ("proxy_read_timeout", "proxy_send_timeout"):
        (value,) = directive(ws, name)
        assert nginx_seconds(value[0]) >= 10 * (defaults.ping_interval + defaults.ping_timeout)
    (mapping,) = [k for k in blocks if k.startswith("http/map $http_upgrade")]
    assert mapping.endswith("$connection_upgrade")
    assert "sticky" not in NGINX_CONF.read_text().split("#")[0]


def test_prometheus_scrapes_every_hub_service() -> None:
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    (job,) = config["scrape_configs"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(targets) == sorted(hub_addresses()), targets
    assert job.get("metrics_path", "/metrics") == "/metrics"
    prometheus = services()["prometheus"]
    mounts = [v.split(":") for v in prometheus["volumes"]]
    assert [str(PROMETHEUS_CONF), "/etc/prometheus/prometheus.yml", "ro"] in mounts, mounts
    for hub in hub_services():
        assert prometheus["depends_on"][hub]["condition"] == "service_healthy"


def test_every_dependency_waits_for_a_healthcheck() -> None:
    every = services()
    for name, service in every.items():
        assert "healthcheck" in service, f"{name}: no healthcheck"
        for needed, how in service.get("depends_on", {}).items():
            assert how["condition"] == "service_healthy", f"{name} -> {needed}"
            assert "healthcheck" in every[needed], needed


def real_metric_names() -> set[str]:
    """Every series name the hub can expose, from the metrics it really defines."""
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}
    names = {
        family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]
    }
    return names | {name + "_total" for _, name, _ in BROKER_COUNTERS}


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_uses_the_hubs_real_metric_names() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\bhub_[a-z_]+", e)}
    real = real_metric_names()
    assert used <= real, f"not hub metrics: {sorted(used - real)}"
    missing = {n.removesuffix("_total") for n in real} - {u.removesuffix("_total") for u in used}
    assert not {n for n in missing if not n.endswith(("_bucket", "_sum", "_count"))}, missing


# --- end to end --------------------------------------------------------------------------------


@dataclass
class HubProcess:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> set[int]:
        return {int(m.group(1)) for m in READY.finditer(self.log())}


@contextmanager
def process(
    argv: list[str], log_path: Path, env: dict[str, str], err_path: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process with its output in ``log_path`` (stderr too, unless ``err_path``);
    SIGTERM (then SIGKILL) on the way out."""
    with ExitStack() as files:
        log = files.enter_context(log_path.open("wb"))
        err = files.enter_context(err_path.open("wb")) if err_path else subprocess.STDOUT
        proc = subprocess.Popen(argv, stdout=log, stderr=err, env=env)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@contextmanager
def run_hub(name: str, service: dict[str, Any], redis_url: str, tmp: Path) -> Iterator[HubProcess]:
    """The compose service as a process: its command and environment, on a local address."""
    port = free_port()
    env = {k: str(v) for k, v in service["environment"].items()}
    env.update(HUB_HOST="127.0.0.1", HUB_PORT=str(port), HUB_REDIS_URL=redis_url)
    env["HUB_DRAIN_SECONDS"] = "1"  # a fast exit at the end of the test
    argv = [HUB, *service["command"][1:]]
    log_path = tmp / f"{name}.log"
    hub: HubProcess | None = None
    try:
        with process(argv, log_path, clean_env(**env, TMPDIR=str(tmp))) as proc:
            hub = HubProcess(name, proc, port, log_path)
            yield hub
    finally:
        for pid in hub.pids() if hub else ():  # never leave a worker behind
            if is_worker(pid):
                os.kill(pid, signal.SIGKILL)


def is_worker(pid: int) -> bool:
    """True while ``pid`` is still a hub worker (not gone, and not a reused pid)."""
    try:
        return b"workers.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def wait_ready(hub: HubProcess) -> None:
    wait_until(
        lambda: hub.proc.poll() is not None or " ready: ws://" in hub.log(),
        START_TIMEOUT,
        f"{hub.name} ready",
    )
    assert hub.proc.poll() is None, f"{hub.name} exited:\n{hub.log()}"


def nginx_config(tmp: Path, port: int, upstreams: dict[str, str]) -> str:
    """deploy/nginx.conf for this run: ports and host names, and the pid/temp paths."""
    text = replace_all(NGINX_CONF.read_text(), "listen 80;", f"listen 127.0.0.1:{port};")
    for address, local in upstreams.items():
        text = replace_all(text, f"server {address} ", f"server {local} ")
    text = replace_all(text, "/tmp/nginx", f"{tmp}/nginx")
    if os.geteuid() == 0:  # root would hand the workers to "nobody": keep them the test user's
        text = f"user {pwd.getpwuid(os.geteuid()).pw_name};\n{text}"
    return text


def prometheus_config(targets: dict[str, str]) -> str:
    """deploy/prometheus.yml for this run: local targets, a fast scrape interval."""
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    config["global"]["scrape_interval"] = "1s"
    for job in config["scrape_configs"]:
        for group in job["static_configs"]:
            group["targets"] = [targets[t] for t in group["targets"]]
    return yaml.safe_dump(config)


def promql(base: str, query: str) -> list[dict[str, Any]]:
    status, body = http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    answer = json.loads(body)
    assert status == 200 and answer["status"] == "success", (query, answer)
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def by_instance(base: str, query: str) -> dict[str, float]:
    return {r["metric"].get("instance", ""): float(r["value"][1]) for r in promql(base, query)}


def http_post(port: int, path: str, body: Any) -> tuple[int, int]:
    """POST to the publish API with the deployment's key: (status, pid of the worker)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        json.dumps(body).encode(),
        {"Content-Type": "application/json", "X-API-Key": SECRETS["HUB_API_KEY"]},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, int(response.headers[WORKER_HEADER])


async def ws_client(nginx_port: int, user: str) -> tuple[ClientConnection, int]:
    """A client through nginx, and the pid of the hub worker that took it."""
    token = mint_token(user, SECRETS["HUB_TOKEN_SECRET"])
    conn = await within(
        connect(
            f"ws://127.0.0.1:{nginx_port}/ws?token={token}",
            subprotocols=["hub.v1.json"],  # type: ignore[list-item]
            compression=None,
            proxy=None,
        ),
        15,
    )
    assert conn.response is not None
    return conn, int(conn.response.headers[WORKER_HEADER])


def compose_in_docker(tmp_path: Path) -> None:
    """The compose file itself, on a Docker engine through testcontainers.

    ``docker compose up --build --wait`` builds the image and starts every service in order,
    each waiting for the healthcheck of what it depends on. Then, through the ports the file
    publishes: clients connect through nginx until Prometheus sees both hubs holding some,
    publishes through nginx reach every client, one hub is stopped (it drains within its
    ``stop_grace_period``) and new clients and publishes go on through the other while
    Prometheus reports it down. (Worker pids are per container here, so which hub took a
    client is read from Prometheus, not from the X-Hub-Worker header.)
    """
    from testcontainers.compose import DockerCompose

    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in SECRETS.items()))
    stack = DockerCompose(
        REPO, compose_file_name=COMPOSE.name, build=True, wait=True, env_file=str(env_file)
    )
    job_name = yaml.safe_load(PROMETHEUS_CONF.read_text())["scrape_configs"][0]["job_name"]
    with stack:
        published = {
            name: stack.get_service_port(name, services()[name]["ports"][0]["target"])
            for name in ("nginx", "prometheus")
        }
        assert all(published.values()), published
        nginx_port = int(published["nginx"] or 0)
        base = f"http://127.0.0.1:{published['prometheus']}"
        instances = hub_addresses()  # Prometheus's targets: service:port -> service
        messages = [{"via": "nginx", "n": n} for n in range(4)]

        def spread() -> dict[str, float] | None:
            """Open connections by hub once all 8 are counted and each hub holds some."""
            held = by_instance(base, f'hub_connections{{job="{job_name}"}}')
            counted = sum(held.values()) == 8 and min(held.values(), default=0) > 0
            return held if counted else None

        async def main() -> None:
            clients: list[ClientConnection] = []
            try:
                for n in range(8):
                    clients.append((await ws_client(nginx_port, f"u{n}"))[0])
                for conn in clients:
                    await within(
                        conn.send(json.dumps({"op": "subscribe", "channel": "news", "id": 1}))
                    )
                    assert json.loads(await within(conn.recv())) == {"id": 1, "result": {}}
                # Prometheus scrapes every 15 s: both hubs hold some of the clients.
                held = await asyncio.to_thread(
                    wait_until, spread, 60, "prometheus sees clients on both hubs", 1.0
                )
                assert held is not None and set(held) == set(instances), held
                for m in messages:
                    status, _ = await asyncio.to_thread(
                        http_post, nginx_port, "/api/publish", {"channel": "news", "data": m}
                    )
                    assert status == 200
                for conn in clients:
                    got = [json.loads(await within(conn.recv())) for _ in messages]
                    assert got == [{"channel": "news", "data": m} for m in messages]
            finally:
                for conn in clients:
                    await within(conn.close())

        run(main, timeout=180)
        (stopped, stopped_name), (survivor, _) = sorted(instances.items())
        done = subprocess.run(
            [*stack.compose_command_property, "stop", stopped_name],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

        async def failover() -> None:
            for n in range(4):
                conn, _ = await ws_client(nginx_port, f"after{n}")
                await within(conn.close())
            status, _ = await asyncio.to_thread(
                http_post, nginx_port, "/api/publish", {"channel": "news", "data": "still up"}
            )
            assert status == 200

        run(failover, timeout=60)
        wait_until(
            lambda: by_instance(base, f'up{{job="{job_name}"}}') == {stopped: 0.0, survivor: 1.0},
            60,
            "prometheus sees the stopped hub down",
            1.0,
        )


# Where a Docker engine answers, the compose file runs there (building the image takes minutes).
@pytest.mark.timeout(900 if dockerfix.enabled() else 240)
def test_the_compose_topology_serves_through_nginx_and_is_scraped_by_prometheus(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Bounded waits add up on a loaded machine; the local path takes ~10 s when idle."""
    if dockerfix.enabled():
        compose_in_docker(tmp_path)
        return
    redis_server: RedisServer = request.getfixturevalue("redis_server")
    nginx_bin = binary("nginx", "/usr/sbin/nginx")
    prometheus_bin = binary("prometheus", "/usr/bin/prometheus")
    hubs_by_name = hub_services()
    job_name = yaml.safe_load(PROMETHEUS_CONF.read_text())["scrape_configs"][0]["job_name"]
    with ExitStack() as stack:
        hubs = [
            stack.enter_context(run_hub(name, service, redis_server.url, tmp_path))
            for name, service in hubs_by_name.items()
        ]
        local = {f"{h.name}:{hubs_by_name[h.name]['environment']['HUB_PORT']}": h for h in hubs}
        addresses = {address: f"127.0.0.1:{h.port}" for address, h in local.items()}

        nginx_port = free_port()
        (tmp_path / "nginx").mkdir()
        conf = tmp_path / "nginx" / "nginx.conf"
        conf.write_text(nginx_config(tmp_path, nginx_port, addresses))
        nginx_argv = [nginx_bin, "-p", str(tmp_path / "nginx"), "-c", str(conf)]
        nginx_argv += ["-e", str(tmp_path / "nginx" / "error.log"), "-g", "daemon off;"]
        checked = subprocess.run([*nginx_argv, "-t"], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr

        prom_port = free_port()
        prom_conf = tmp_path / "prometheus.yml"
        prom_conf.write_text(prometheus_config(addresses))
        prom_argv = [
            prometheus_bin,
            f"--config.file={prom_conf}",
            f"--storage.tsdb.path={tmp_path / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            "--log.level=warn",
        ]
        for hub in hubs:
            wait_ready(hub)
        access_log, error_log = tmp_path / "nginx-access.log", tmp_path / "nginx-error.log"
        nginx = stack.enter_context(process(nginx_argv, access_log, clean_env(), error_log))
        prometheus = stack.enter_context(
            process(prom_argv, tmp_path / "prometheus.log", clean_env())
        )
        base = f"http://127.0.0.1:{prom_port}"
        wait_until(
            lambda: nginx.poll() is not None or answers(f"http://127.0.0.1:{nginx_port}/healthz"),
            START_TIMEOUT,
            "nginx answers",
        )
        assert nginx.poll() is None, error_log.read_text()

        # The healthchecks compose runs in each hub container pass against the real hub.
        for address, hub in local.items():
            test = hubs_by_name[hub.name]["healthcheck"]["test"]
            assert test[:2] == ["CMD", "python"], test
            argv = [
                sys.executable,
                *(a.replace(address.split(":")[1], str(hub.port)) for a in test[2:]),
            ]
            done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            assert done.returncode == 0, f"{hub.name} healthcheck: {done.stderr}"

        pid_hub = {pid: h.name for h in hubs for pid in h.pids()}
        messages = [{"via": "nginx", "n": n} for n in range(4)]
        messages += [{"via": "redis", "n": n} for n in range(2)]

        async def main() -> dict[str, int]:
            clients: list[tuple[ClientConnection, int]] = []
            try:
                while len(clients) < 8 or len({pid_hub[p] for _, p in clients}) < len(hubs):
                    assert len(clients) < 24, "nginx sent every client to one hub"
                    clients.append(await ws_client(nginx_port, f"u{len(clients)}"))
                assert {pid for _, pid in clients} <= set(pid_hub), "a worker that never said ready"
                for conn, _ in clients:
                    await within(
                        conn.send(json.dumps({"op": "subscribe", "channel": "news", "id": 1}))
                    )
                    assert json.loads(await within(conn.recv())) == {"id": 1, "result": {}}

                def post(data: Any) -> str:
                    status, pid = http_post(
                        nginx_port, "/api/publish", {"channel": "news", "data": data}
                    )
                    assert status == 200
                    return pid_hub[pid]

                answered = [await asyncio.to_thread(post, m) for m in messages[:4]]
                publisher = Publisher(redis_server.url, prefix=Settings().redis_prefix)
                try:
                    for m in messages[4:]:
                        receivers = await asyncio.to_thread(publisher.publish, "news", m)
                        # One per worker process with a subscriber, across both hubs.
                        assert receivers == len({pid for _, pid in clients})
                finally:
                    publisher.close()
                for conn, _ in clients:
                    got = [json.loads(await within(conn.recv())) for _ in messages]
                    assert got == [{"channel": "news", "data": m} for m in messages]
                assert set(answered) <= {h.name for h in hubs}
                per_hub = {h.name: 0 for h in hubs}
                for _, pid in clients:
                    per_hub[pid_hub[pid]] += 1
                return per_hub
            finally:
                for conn, _ in clients:
                    await within(conn.close())

        per_hub = run(main, timeout=90)
        assert all(per_hub.values()), per_hub
        access = access_log.read_text()
        assert "GET /ws " in access and "token=" not in access, "tokens stay out of the log"

        # Prometheus scraped both hubs: up, and each hub's own counts (summed over its workers).
        wait_until(
            lambda: prometheus.poll() is not None or answers(f"{base}/-/ready"),
            START_TIMEOUT,
            "prometheus ready",
        )
        assert prometheus.poll() is None, (tmp_path / "prometheus.log").read_text()
        instance = {f"127.0.0.1:{h.port}": h.name for h in hubs}
        expected_delivered = {h: n * len(messages) for h, n in per_hub.items()}

        def scraped() -> bool:
            up = by_instance(base, f'up{{job="{job_name}"}}')
            series = f'hub_messages_delivered_total{{job="{job_name}", kind="channel"}}'
            delivered = by_instance(base, f"sum by (instance) ({series})")
            named = {instance.get(k, k): v for k, v in delivered.items()}
            return up == {i: 1.0 for i in instance} and named == expected_delivered

        wait_until(scraped, START_TIMEOUT, "prometheus has both hubs' series")
        accepted = by_instance(base, f'hub_connections_accepted_total{{job="{job_name}"}}')
        assert {instance[k]: v for k, v in accepted.items()} == per_hub
        # Every dashboard query is valid PromQL that Prometheus evaluates.
        for expr in dashboard_exprs():
            promql(base, expr.replace("$__rate_interval", "1m").replace("$instance", ".*"))
        assert promql(base, 'sum(up{job="hub"})')

        # One hub stops (drains, exits): nginx sends new clients and publishes to the other one,
        # and Prometheus reports the stopped one down.
        stopped, survivor = hubs
        stopped.proc.send_signal(signal.SIGTERM)
        assert stopped.proc.wait(15) == 0, stopped.log()

        async def failover() -> None:
            for n in range(4):
                conn, pid = await ws_client(nginx_port, f"after{n}")
                await within(conn.close())
                assert pid_hub.get(pid) == survivor.name, "nginx sent a client to a stopped hub"
            status, _ = await asyncio.to_thread(
                http_post, nginx_port, "/api/publish", {"channel": "news", "data": "still up"}
            )
            assert status == 200

        run(failover, timeout=60)
        down = {f"127.0.0.1:{stopped.port}": 0.0, f"127.0.0.1:{survivor.port}": 1.0}
        wait_until(
            lambda: by_instance(base, f'up{{job="{job_name}"}}') == down,
            START_TIMEOUT,
            "prometheus sees the stopped hub down",
        )
