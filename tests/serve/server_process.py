"""`kiln serve` as a real subprocess on a free loopback port, and small raw-HTTP helpers to talk to it.

Not a test module: tests/serve/test_server.py imports it (pytest puts this dir on sys.path).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

# One Prometheus sample line: name, optional {labels}, value
# (https://prometheus.io/docs/instrumenting/exposition_formats/)
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="[^"]*"'
SAMPLE = re.compile(rf"^[a-zA-Z_:][a-zA-Z0-9_:]*(\{{{LABEL}(,{LABEL})*\}})? (-?[0-9.eE+-]+|\+Inf|-Inf|NaN)$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m kiln serve PATH --host 127.0.0.1 --port P ...`, logging to a file beside the cache dir."""

    def __init__(self, path: Path, workdir: Path, *args: str, api_key: str | None = None, env: dict | None = None):
        self.path, self.args, self.api_key, self.env = Path(path), list(args), api_key, env or {}
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.health_seen: list[int] = []  # statuses /health answered while the server came up

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def start(self, timeout: float = 120.0) -> "ServerProcess":
        """Start, and wait until GET /health answers 200 (retrying on another port if this one was taken)."""
        for _ in range(3):
            self.port = free_port()
            cmd = [sys.executable, "-m", "kiln", "serve", str(self.path), "--host", "127.0.0.1",
                   "--port", str(self.port), *self.args]
            if self.api_key:
                cmd += ["--api-key", self.api_key]
            env = {**os.environ, "KILN_CACHE_DIR": str(self.workdir / "kiln_cache"), "PYTHONUNBUFFERED": "1",
                   **self.env}
            with open(self.log_path, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
            if self._wait_healthy(timeout):
                return self
            if "address already in use" not in self.log_tail().lower():
                break
        self.stop()
        raise RuntimeError(f"kiln serve did not become healthy within {timeout}s; log:\n{self.log_tail()}")

    def _wait_healthy(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                status = self.request("GET", "/health", timeout=2)[0]
            except OSError:  # not listening yet
                status = None
            if status is not None:
                self.health_seen.append(status)
            if status == 200:
                return True
            time.sleep(0.05)
        return False

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    # ---- raw HTTP ---------------------------------------------------------------------------------

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None,
                auth: bool = True, timeout: float = 60):
        """(status, headers, parsed JSON or text) of one request; HTTP errors are returned, not raised."""
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
        if auth and self.api_key and "Authorization" not in headers:
            headers["Authorization"] = f"Bearer {self.api_key}"
        req = urllib.request.Request(self.url + path, data=body, headers=headers, method=method)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, resp_headers, data = r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            status, resp_headers, data = e.code, dict(e.headers), e.read()
        text = data.decode()
        try:
            return status, resp_headers, json.loads(text)
        except ValueError:
            return status, resp_headers, text

    def metrics_text(self) -> str:
        status, _, text = self.request("GET", "/metrics")
        assert status == 200, text
        return text

    def metric_values(self) -> dict[str, float]:
        """Every sample of /metrics by its name with labels (e.g. 'kiln_requests_running')."""
        values = {}
        for line in self.metrics_text().splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                values[key] = float(value)
        return values

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """Poll /metrics until nothing runs, waits or holds KV-cache blocks (aborts land between two steps);
        returns what is still busy."""
        deadline = time.monotonic() + timeout
        while True:
            values = self.metric_values()
            busy = {k: values[k] for k in ("kiln_requests_running", "kiln_requests_waiting",
                                           "kiln_kv_cache_sequences", "kiln_kv_cache_usage_ratio") if values[k] != 0}
            if not busy or time.monotonic() > deadline:
                return busy
            time.sleep(0.1)

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS in /proc status")
