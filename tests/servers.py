"""Real servers for end-to-end tests: BentoML on a free port, PostgreSQL, Prometheus.

Nothing here is mocked: ``ServiceProcess`` runs ``bentoml serve`` in a subprocess exactly as
``make serve`` does, with its own registry copy, data folder and BentoML home.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENTOML = Path(sys.executable).parent / "bentoml"


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, parents before children (from /proc)."""
    pids = [root]
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                pids += [int(c) for c in (task / "children").read_text().split()]
    return pids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServiceProcess:
    registry: Path
    data_dir: Path
    env: dict[str, str] = field(default_factory=dict)
    workers: int = 2
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / f"serve-{self.port}.log"

    def environment(self) -> dict[str, str]:
        return {
            **os.environ,
            "REFIT_REGISTRY_PATH": str(self.registry),
            "REFIT_DATA_DIR": str(self.data_dir),
            "REFIT_WORKERS": str(self.workers),
            "REFIT_SWAP_POLL_INTERVAL_S": "0.5",
            "BENTOML_HOME": str(self.data_dir / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "True",
            **self.env,
        }

    def start(self, wait_ready: bool = True, timeout: float = 120) -> ServiceProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BENTOML), "serve", ".", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT, env=self.environment(), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        want = "/readyz" if wait_ready else "/livez"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + want, timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not {want} after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the server and every worker (each worker runs in a session of its own, so
        signalling the server's process group would leave them serving)."""
        assert self.proc is not None
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)


def wait_for(predicate, timeout: float, interval: float = 0.25, what: str = "condition"):
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def copy_registry(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


# -- PostgreSQL ------------------------------------------------------------------------------------

PG_USER = "refit_test"
PG_PASSWORD = "refit_test"


def postgres_url(database: str) -> tuple[str | None, str]:
    """Start the machine's PostgreSQL 15 cluster and create a fresh database.

    Returns ``(url, "")`` or ``(None, reason)`` when PostgreSQL cannot be started here.
    """
    if shutil.which("pg_ctlcluster") is None:
        return None, "pg_ctlcluster not found (PostgreSQL 15 is not installed)"
    start = subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", "15", "main", "start"],
        capture_output=True, text=True,
    )
    if start.returncode not in (0, 2) and "already running" not in start.stderr:
        return None, f"pg_ctlcluster failed: {start.stderr.strip()}"
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    statements = [
        f"DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname='{PG_USER}') THEN "
        f"CREATE ROLE {PG_USER} LOGIN PASSWORD '{PG_PASSWORD}' CREATEDB; END IF; END$$;",
        f"DROP DATABASE IF EXISTS {database};",
        f"CREATE DATABASE {database} OWNER {PG_USER};",
    ]
    for _ in range(30):
        ready = subprocess.run(
            [*as_postgres, "psql", "-qAtc", "select 1"], capture_output=True, text=True
        )
        if ready.returncode == 0:
            break
        time.sleep(0.5)
    else:
        return None, f"PostgreSQL did not accept connections: {ready.stderr.strip()}"
    for statement in statements:
        done = subprocess.run(
            [*as_postgres, "psql", "-qAtc", statement], capture_output=True, text=True
        )
        if done.returncode != 0:
            return None, f"psql failed: {done.stderr.strip()}"
    return f"postgresql+psycopg://{PG_USER}:{PG_PASSWORD}@127.0.0.1:5432/{database}", ""


# -- Prometheus ------------------------------------------------------------------------------------


@dataclass
class PrometheusProcess:
    """Debian's Prometheus server scraping one target every second."""

    folder: Path
    target: str  # host:port
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> PrometheusProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: refit\n    metrics_path: /metrics\n"
            f"    static_configs:\n      - targets: ['{self.target}']\n"
        )
        log = (self.folder / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [shutil.which("prometheus") or "prometheus", f"--config.file={config}",
             f"--storage.tsdb.path={self.folder / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError((self.folder / "prometheus.log").read_text()[-3000:])
            try:
                if httpx.get(self.url + "/-/ready", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("prometheus did not become ready")

    def query(self, expr: str) -> dict:
        response = httpx.get(self.url + "/api/v1/query", params={"query": expr}, timeout=10)
        return response.json()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


@dataclass
class PrivatePostgres:
    """A PostgreSQL 15 cluster of the test's own, in a temporary folder on a free port.

    Unlike the machine's shared cluster, it can be stopped and started mid-test (an outage)
    without disturbing anyone else. Runs as the ``postgres`` user when the tests run as root.
    """

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="refit-pg-")))
    """Its own folder under /tmp: pytest's temporary folders are closed to the postgres user."""
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*as_postgres, *args], capture_output=True, text=True, check=check)

    def init(self) -> PrivatePostgres | None:
        """Create and start the cluster; None when PostgreSQL's binaries are not here."""
        bins = Path("/usr/lib/postgresql/15/bin")
        if not (bins / "initdb").exists():
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(str(bins / "initdb"), "-D", str(self.folder / "data"), "-A", "trust", "-U",
                  "postgres", "--no-sync")
        self.start()
        return self

    def start(self) -> None:
        self._run(
            "/usr/lib/postgresql/15/bin/pg_ctl", "-D", str(self.folder / "data"), "-w", "-l",
            str(self.folder / "postgres.log"), "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync=off",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run("/usr/lib/postgresql/15/bin/pg_ctl", "-D", str(self.folder / "data"), "-m",
                  mode, "-w", "stop", check=False)

    def remove(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


# -- HAProxy ---------------------------------------------------------------------------------------


@dataclass
class HAProxyProcess:
    """Debian's HAProxy balancing HTTP over backends, health-checked on ``/readyz``.

    Backends the check finds unready get no traffic; a request whose connection to a backend
    fails (or closes with no response) is retried on another one. ``drain(name)`` and
    ``enable(name)`` go through HAProxy's runtime API, as a Kubernetes Service removes and adds an
    endpoint.
    """

    folder: Path
    backends: dict[str, int]  # server name -> port on 127.0.0.1
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socket_path(self) -> Path:
        return self.folder / "admin.sock"

    def config(self) -> str:
        servers = "".join(
            f"  server {name} 127.0.0.1:{port} check\n" for name, port in self.backends.items()
        )
        return (
            "global\n"
            f"  stats socket {self.socket_path} mode 600 level admin\n"
            "  maxconn 1024\n"
            "defaults\n"
            "  mode http\n"
            "  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n"
            "  retries 3\n  option redispatch 1\n"
            "  retry-on conn-failure empty-response\n"
            "frontend refit\n"
            f"  bind 127.0.0.1:{self.port}\n"
            "  default_backend replicas\n"
            "backend replicas\n"
            "  balance roundrobin\n"
            "  option httpchk GET /readyz\n"
            "  http-check expect status 200\n"
            "  default-server inter 500ms fall 2 rise 2\n"
            + servers
        )

    def start(self, timeout: float = 30) -> HAProxyProcess:
        self.folder.mkdir(parents=True, exist_ok=True)
        config = self.folder / "haproxy.cfg"
        config.write_text(self.config())
        log = (self.folder / "haproxy.log").open("ab")
        self.proc = subprocess.Popen(
            [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        wait_for(lambda: self.proc.poll() is not None or self.up() == set(self.backends),
                 timeout, what="haproxy to see every backend up")
        if self.proc.poll() is not None:
            raise RuntimeError((self.folder / "haproxy.log").read_text()[-3000:])
        return self

    def command(self, line: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self) -> dict[str, dict[str, str]]:
        """Per backend server, HAProxy's view (``status``: UP, DOWN, MAINT, ...; ``scur``:
        requests in flight)."""
        lines = self.command("show stat").splitlines()
        header = lines[0].lstrip("# ").split(",")
        rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:] if line]
        return {row["svname"]: row for row in rows
                if row.get("pxname") == "replicas" and row["svname"] in self.backends}

    def up(self) -> set[str]:
        try:
            return {name for name, row in self.states().items() if row["status"] == "UP"}
        except OSError:
            return set()

    def drain(self, name: str, timeout: float = 30) -> None:
        """Send ``name`` no new requests and wait for those in flight on it to finish."""
        self.command(f"set server replicas/{name} state maint")
        wait_for(lambda: self.states()[name]["scur"] == "0", timeout,
                 what=f"requests in flight on {name} to finish")

    def enable(self, name: str, timeout: float = 30) -> None:
        """Give ``name`` traffic again once its health check passes."""
        self.command(f"set server replicas/{name} state ready")
        wait_for(lambda: name in self.up(), timeout, what=f"haproxy to see {name} up")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
