"""Start and stop a real `mtrank serve` on loopback for benchmarks and load tests."""

from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

MTRANK = str(Path(sys.executable).with_name("mtrank"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ensure_model(artifacts: Path, config: Path) -> None:
    """Train ``config`` into ``artifacts`` unless a LATEST model is already there."""
    if not (artifacts / "models" / "LATEST").is_file():
        print(f"no model under {artifacts}: training {config}", flush=True)
        subprocess.run([MTRANK, "train", "--config", str(config), "--artifacts", str(artifacts)], check=True)


def start_server(
    artifacts: Path, env_extra: dict[str, str], timeout: float = 120
) -> tuple[subprocess.Popen[bytes], str]:
    """`mtrank serve` on a free loopback port; returns once /readyz answers 200."""
    port = free_port()
    env = {**os.environ, "MTRANK_ARTIFACTS": str(artifacts), "MTRANK_LOG_LEVEL": "WARNING", **env_extra}
    proc = subprocess.Popen(
        [MTRANK, "serve", "--artifacts", str(artifacts), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mtrank serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"server did not become ready in {timeout:.0f} s")


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_locust(
    url: str,
    csv_prefix: Path,
    *,
    duration: int,
    users: int,
    rps: float,
    candidates: int,
    slo_p99_ms: float,
    html: Path | None = None,
) -> int:
    """A headless, time-bounded locust run of loadtest/locustfile.py; returns its verdict exit code."""
    root = Path(__file__).resolve().parents[1]
    cmd = [
        str(Path(sys.executable).with_name("locust")),
        *("-f", str(root / "loadtest" / "locustfile.py"), "--headless", "--only-summary"),
        *("-u", str(users), "-r", str(users), "-t", f"{duration}s", "--stop-timeout", "5"),
        *("--host", url, "--csv", str(csv_prefix), "--slo-p99-ms", str(slo_p99_ms)),
        *(("--html", str(html)) if html else ()),
    ]
    env = {
        **os.environ,
        "MTRANK_LOADTEST_CANDIDATES": str(candidates),
        "MTRANK_LOADTEST_USER_RPS": str(rps / users),
    }
    return subprocess.run(cmd, env=env, timeout=duration + 120, check=False).returncode


def aggregated_stats(csv_prefix: Path) -> dict[str, str]:
    """The "Aggregated" row of locust's <prefix>_stats.csv."""
    with csv_prefix.with_name(csv_prefix.name + "_stats.csv").open() as f:
        return next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
