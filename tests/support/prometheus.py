# Throwaway Prometheus servers for integration tests: remote-write receivers
# and senders.
#
# Owns: finding the `prometheus` binary and the flag that turns on its
# remote-write receiver, writing a config, starting the server on a free
# loopback port in a temp dir, waiting for /-/ready, stopping it with a
# signal, and reading it back through the HTTP API (instant queries, series,
# label values). Knows nothing about the gateway.
#
# A receiver stores what is pushed to its /api/v1/write and scrapes nothing,
# so every series it holds came in by remote write. A sender scrapes itself
# every second and remote-writes what it stores to one URL, with a queue
# tuned to send within about a second instead of batching for long.
from __future__ import annotations

import functools
import json
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.net import free_port

DEFAULT_BINARY = "/usr/bin/prometheus"
DEFAULT_JOB = "mirrorgate-sender"
READY_PATH = "/-/ready"
# Since Prometheus 2.33 the receiver has its own flag; from 2.25 to 2.32 it
# was the feature flag `remote-write-receiver`.
RECEIVER_FLAG = "--web.enable-remote-write-receiver"
RECEIVER_FEATURE_FLAG = "--enable-feature=remote-write-receiver"

# The queue of a sender: send a batch at least every second, back off little,
# and keep shard count small on a small machine. Metadata sends are off: they
# are a second kind of request the receivers would see at random times.
SENDER_QUEUE: dict[str, object] = {
    "capacity": 2500,
    "min_shards": 1,
    "max_shards": 2,
    "max_samples_per_send": 500,
    "batch_send_deadline": "1s",
    "min_backoff": "30ms",
    "max_backoff": "1s",
}


class PrometheusError(RuntimeError):
    """A server could not be started, queried or stopped."""


def find_binary() -> str:
    """The path of the ``prometheus`` server binary.

    :raises PrometheusError: if it is neither on PATH nor at /usr/bin/prometheus.
    """
    found = shutil.which("prometheus")
    if found:
        return found
    if Path(DEFAULT_BINARY).exists():
        return DEFAULT_BINARY
    raise PrometheusError("no prometheus binary found (Debian package `prometheus`)")


@functools.cache
def receiver_flag(binary: str) -> str:
    """The command-line flag that enables the remote-write receiver of ``binary``.

    :raises PrometheusError: if its ``--help`` names neither form (older than 2.25).
    """
    result = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    text = result.stdout + result.stderr
    if RECEIVER_FLAG in text:
        return RECEIVER_FLAG
    if "remote-write-receiver" in text:
        return RECEIVER_FEATURE_FLAG
    raise PrometheusError(f"{binary} has no remote-write receiver (too old?)")


def sender_config(port: int, remote_write: str, job: str, interval: str) -> dict[str, Any]:
    """A config that scrapes the server itself as ``job`` and remote-writes to one URL."""
    return {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {
                "job_name": job,
                "scrape_interval": interval,
                "static_configs": [{"targets": [f"127.0.0.1:{port}"]}],
            }
        ],
        "remote_write": [
            {
                "url": remote_write,
                "remote_timeout": "5s",
                "queue_config": dict(SENDER_QUEUE),
                "metadata_config": {"send": False},
            }
        ],
    }


class Prometheus:
    """One throwaway Prometheus server: ``Prometheus(...).start()``, then ``close()``.

    :param name: a label used in the temp dir name and in errors.
    :param receiver: accept remote writes on ``/api/v1/write``.
    :param remote_write: scrape itself every ``interval`` as job ``job`` and
        remote-write everything it stores to this URL.
    :param workdir: where the config, data dir and log go; a fresh temp dir if None.
    :param keep: leave the temp dir behind on ``close()`` (for post-mortems).
    """

    def __init__(
        self,
        name: str = "prometheus",
        *,
        receiver: bool = False,
        remote_write: str | None = None,
        job: str = DEFAULT_JOB,
        interval: str = "1s",
        workdir: str | Path | None = None,
        keep: bool = False,
        start_timeout: float = 30.0,
        stop_timeout: float = 30.0,
    ) -> None:
        self.name = name
        self.receiver = receiver
        self.remote_write = remote_write
        self.job = job
        self.interval = interval
        self.keep = keep
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.binary = find_binary()
        self.base = Path(workdir or tempfile.mkdtemp(prefix=f"mirrorgate-{name}-"))
        self.config_path = self.base / "prometheus.yml"
        self.datadir = self.base / "data"
        self.log_path = self.base / "prometheus.log"
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._client = httpx.Client(timeout=10.0)

    def __repr__(self) -> str:
        mode = [m for m, on in (("receiver", self.receiver), ("sender", self.remote_write)) if on]
        if self.proc is None:
            state = "not started"
        elif self.proc.poll() is None:
            state = f"running pid={self.proc.pid} {self.host}:{self.port}"
        else:
            state = f"exited {self.proc.returncode}"
        return f"<Prometheus {self.name} {'+'.join(mode) or 'plain'} {state} dir={self.base}>"

    # -- life cycle ------------------------------------------------------------

    def start(self) -> Prometheus:
        """Start on a free port and wait until ``/-/ready`` answers 200.

        :raises PrometheusError: with the log tail if it exits or is not ready in time.
        """
        if self.running:
            raise PrometheusError(f"{self.name}: already running")
        self.base.mkdir(parents=True, exist_ok=True)
        last_error: PrometheusError | None = None
        for _attempt in range(3):  # a free port can be taken before we bind it
            self.port = free_port(self.host)
            self._write_config()
            self._spawn()
            try:
                self._wait_ready()
                return self
            except PrometheusError as exc:
                last_error = exc
                self._terminate()
                if "address already in use" not in str(exc):
                    break
        assert last_error is not None
        raise last_error

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit code; the data dir stays.

        A sender flushes its remote-write queue before it exits.

        :raises PrometheusError: if it has not exited after ``stop_timeout``
            seconds; it is then killed with SIGKILL.
        """
        if self.proc is None:
            raise PrometheusError(f"{self.name}: not started")
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise PrometheusError(
                        f"{self.name}: still running {self.stop_timeout}s after signal "
                        f"{sig}; killed:\n{self.log_tail()}"
                    ) from None
            return self.proc.returncode
        finally:
            self._close_log()

    def close(self) -> None:
        """Stop the server (killing it if need be) and delete the temp dir (unless ``keep``)."""
        try:
            if self.running:
                self.stop()
        finally:
            self._close_log()
            self._client.close()
            if not self.keep:
                shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Prometheus:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    # -- addresses -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The base URL of the web listener."""
        return f"http://{self.host}:{self.port}"

    @property
    def write_url(self) -> str:
        """The remote-write endpoint (answers only in receiver mode)."""
        return f"{self.url}/api/v1/write"

    # -- HTTP API --------------------------------------------------------------

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: the result vector as ``[{"metric": {...}, "value": [t, "v"]}]``.

        :param at: the evaluation time (Unix seconds); now if None. Pass the
            same ``at`` to two servers to compare them over the same window.
        :raises PrometheusError: if the query fails or does not give a vector.
        """
        params: dict[str, str] = {"query": expr}
        if at is not None:
            params["time"] = repr(at)
        data = self._api("/api/v1/query", params)
        if data.get("resultType") != "vector":
            raise PrometheusError(f"{self.name}: {expr!r} gave {data.get('resultType')}")
        result: list[dict[str, Any]] = data["result"]
        return result

    def query_values(self, expr: str, at: float | None = None) -> dict[frozenset[tuple[str, str]],
                                                                         float]:
        """An instant query as ``{frozenset(labels): value}``."""
        return {
            frozenset(r["metric"].items()): float(r["value"][1]) for r in self.query(expr, at)
        }

    def query_value(self, expr: str, at: float | None = None) -> float | None:
        """The value of a query that gives at most one sample; None if it gives none.

        :raises PrometheusError: if it gives more than one sample.
        """
        result = self.query(expr, at)
        if len(result) > 1:
            raise PrometheusError(f"{self.name}: {expr!r} gave {len(result)} samples")
        return float(result[0]["value"][1]) if result else None

    def series(self, match: str, start: float | None = None,
               end: float | None = None) -> list[dict[str, str]]:
        """The label sets of the series that ``match`` selects (whole history by default)."""
        params: dict[str, str] = {"match[]": match}
        if start is not None:
            params["start"] = repr(start)
        if end is not None:
            params["end"] = repr(end)
        result: list[dict[str, str]] = self._api("/api/v1/series", params)
        return result

    def label_values(self, name: str, match: str | None = None) -> list[str]:
        """Every value of label ``name``, optionally among the series ``match`` selects."""
        params = {"match[]": match} if match else {}
        result: list[str] = self._api(f"/api/v1/label/{name}/values", params)
        return result

    def metric_sum(self, name: str, **labels: str) -> float:
        """The live sum of every sample ``name`` the server exposes on its own
        ``/metrics`` whose labels include ``labels`` (not a query: no scrape lag).

        Counters are named as exposed, with ``_total``.
        """
        try:
            response = self._client.get(self.url + "/metrics")
            response.raise_for_status()
        except httpx.HTTPError as exc:
            raise PrometheusError(f"{self.name}: GET /metrics failed: {exc}") from exc
        want = set(labels.items())
        return sum(
            float(s.value)
            for family in text_string_to_metric_families(response.text)
            for s in family.samples
            if s.name == name and want <= set(s.labels.items())
        )

    # -- observation -----------------------------------------------------------

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:]) or "(empty log)"

    # -- internals -------------------------------------------------------------

    def _config(self) -> dict[str, Any]:
        if self.remote_write is None:
            return {"global": {"scrape_interval": self.interval}}
        return sender_config(self.port, self.remote_write, self.job, self.interval)

    def _write_config(self) -> None:
        # JSON is YAML, and needs no YAML library to write.
        self.config_path.write_text(json.dumps(self._config(), indent=2) + "\n")

    def _command(self) -> list[str]:
        command = [
            self.binary,
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.datadir}",
            f"--web.listen-address={self.host}:{self.port}",
        ]
        if self.receiver:
            command.append(receiver_flag(self.binary))
        return command

    def _spawn(self) -> None:
        self._close_log()
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_file = log
        self.proc = subprocess.Popen(
            self._command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.base,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.returncode is not None:
                raise PrometheusError(
                    f"{self.name}: exited with {self.returncode} before ready on "
                    f"{self.host}:{self.port}:\n{self.log_tail()}"
                )
            try:
                response = self._client.get(self.url + READY_PATH, timeout=1.0)
                if response.status_code == 200:
                    return
                last = f"{response.status_code} {response.text.strip()}"
            except httpx.HTTPError as exc:
                last = str(exc) or type(exc).__name__
            time.sleep(0.1)
        raise PrometheusError(
            f"{self.name}: not ready on {self.host}:{self.port} within "
            f"{self.start_timeout}s ({last}):\n{self.log_tail()}"
        )

    def _terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_log()

    def _api(self, path: str, params: Mapping[str, str]) -> Any:
        try:
            response = self._client.get(self.url + path, params=params)
        except httpx.HTTPError as exc:
            raise PrometheusError(f"{self.name}: GET {path} failed: {exc}") from exc
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or body.get("status") != "success":
            raise PrometheusError(
                f"{self.name}: GET {path} {dict(params)} -> {response.status_code}: "
                f"{body.get('error') or response.text[:200]}"
            )
        return body["data"]

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
