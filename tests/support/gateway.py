# The real gateway as a subprocess, for integration tests and benchmarks.
#
# Owns: writing a config file, starting `python -m gateway run --config FILE`,
# waiting for its listener, reading its Prometheus metrics from the admin
# listener, and stopping it with a signal. Knows the CLI and config contract
# of design.md §6 and §7, and nothing of the gateway's internals.
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path
from typing import IO

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import wait_listening

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_ADMIN = "127.0.0.1:9930"

MetricKey = tuple[str, frozenset[tuple[str, str]]]


class GatewayError(RuntimeError):
    """The gateway did not start, did not answer, or did not stop in time."""


class GatewayProcess:
    """One gateway process running ``config_text``.

    :param config_text: the whole TOML config (design.md §6).
    :param workdir: where the config and log files go; a fresh temp dir if None.
    :param env: extra environment variables (for ``${VAR}`` in the config).
    """

    def __init__(
        self,
        config_text: str,
        *,
        workdir: str | Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config_text = config_text
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="mirrorgate-gw-"))
        self.config_path = self.workdir / "mirrorgate.toml"
        self.log_path = self.workdir / "gateway.log"
        self.extra_env = dict(env or {})
        config = tomllib.loads(config_text)
        self.admin = str(config.get("admin", {}).get("listen", DEFAULT_ADMIN))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    def __repr__(self) -> str:
        if self.proc is None:
            state = "not started"
        elif self.proc.poll() is None:
            state = f"running pid={self.proc.pid}"
        else:
            state = f"exited {self.proc.returncode}"
        return f"<GatewayProcess {state} admin={self.admin} config={self.config_path}>"

    # -- life cycle ------------------------------------------------------------

    def start(self) -> GatewayProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p
        )
        env.update(self.extra_env)
        log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self._log_file = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=REPO_ROOT,
            env=env,
        )
        return self

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise GatewayError("gateway not started")
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def wait_ready(self, port: int, timeout: float = 15, host: str = "127.0.0.1") -> None:
        """Poll until ``host:port`` accepts a TCP connection.

        :raises GatewayError: with the log tail if the process exits first or
            the port does not open within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise GatewayError(
                    f"gateway exited with {self.returncode} before listening on "
                    f"{host}:{port}:\n{self.log_tail()}"
                )
            if wait_listening(host, port, timeout=0.2):
                return
        raise GatewayError(
            f"gateway not listening on {host}:{port} after {timeout}s:\n{self.log_tail()}"
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 35.0) -> int:
        """Send ``sig`` and wait for the exit code (negative: killed by a signal).

        :raises GatewayError: if it has not exited after ``timeout`` seconds;
            it is then killed with SIGKILL.
        """
        if self.proc is None:
            raise GatewayError("gateway not started")
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise GatewayError(
                        f"gateway still running {timeout}s after signal {sig}; killed:\n"
                        f"{self.log_tail()}"
                    ) from None
            return self.proc.returncode
        finally:
            self._close_log()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self._close_log()
            return
        try:
            self.stop()
        except GatewayError:
            if exc_type is None:
                raise  # do not mask the test's own failure with ours

    # -- observation -----------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(empty log)"

    def metrics_text(self, timeout: float = 5.0) -> str:
        try:
            response = httpx.get(f"http://{self.admin}/metrics", timeout=timeout)
        except httpx.HTTPError as exc:
            raise GatewayError(f"admin /metrics unreachable at {self.admin}: {exc}") from exc
        response.raise_for_status()
        return response.text

    def metrics(self) -> dict[MetricKey, float]:
        """Every sample of ``/metrics`` as {(sample name, frozenset(labels)): value}.

        Sample names are as exposed: counters end in ``_total``, histograms
        give ``_bucket`` (with ``le``), ``_sum`` and ``_count``.
        """
        samples: dict[MetricKey, float] = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = float(s.value)
        return samples

    def sample(self, name: str, **labels: str) -> float:
        """The value of sample ``name`` with exactly ``labels``; 0.0 if absent."""
        return self.metrics().get((name, frozenset(labels.items())), 0.0)

    def sample_sum(self, name: str, **labels: str) -> float:
        """The sum of every sample ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.metrics().items() if n == name and want <= set(ls))

    # -- internals -------------------------------------------------------------

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
