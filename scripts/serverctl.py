"""Start and stop a real `mtrank serve` on loopback for benchmarks and load tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

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
    artifacts: Path,
    env_extra: dict[str, str],
    timeout: float = 180,
    workers: int = 1,
    source_tree: Path | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """`mtrank serve` on a free loopback port; returns once /readyz answers 200 (and, with
    ``workers``, once every worker serves a model). ``source_tree``: serve the code of another
    checkout (e.g. an earlier revision, for a before/after comparison) instead of this one."""
    port = free_port()
    env = {**os.environ, "MTRANK_ARTIFACTS": str(artifacts), "MTRANK_LOG_LEVEL": "WARNING", **env_extra}
    cmd = [
        MTRANK,
        "serve",
        "--artifacts",
        str(Path(artifacts).resolve()),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if workers != 1:
        cmd += ["--workers", str(workers)]
    if source_tree is not None:
        cmd = [sys.executable, "-m", "service.cli", *cmd[1:]]
        env["PYTHONPATH"] = str(source_tree)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, cwd=source_tree)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mtrank serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200 and (
                workers == 1 or _workers_serving(url) >= workers
            ):
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_server(proc)
    raise RuntimeError(f"server did not become ready in {timeout:.0f} s")


def _workers_serving(url: str) -> int:
    text = httpx.get(url + "/metrics", timeout=5).text
    return sum(
        1 for line in text.splitlines() if line.startswith("mtrank_model_info{") and line.endswith(" 1.0")
    )


def children(pid: int) -> list[int]:
    """Direct child processes (the workers of `mtrank serve --workers N`)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and its children."""
    return cpu_seconds(pid) + sum(cpu_seconds(c) for c in children(pid))


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its children."""
    return rss_mb(pid) + sum(rss_mb(c) for c in children(pid))


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
        "MTRANK_LOADTEST_SUMMARY": str(summary_path(csv_prefix)),
    }
    return subprocess.run(cmd, env=env, timeout=duration + 120, check=False).returncode


def summary_path(csv_prefix: Path) -> Path:
    return csv_prefix.with_name(csv_prefix.name + "_summary.json")


def final_stats(csv_prefix: Path) -> dict[str, Any]:
    """The run's final totals, written by the locustfile when it takes its verdict (locust's
    periodic <prefix>_stats.csv can miss the last second of traffic)."""
    stats: dict[str, Any] = json.loads(summary_path(csv_prefix).read_text())
    return stats


def delete_redis_keys(url: str, prefix: str) -> int:
    """Remove every key under ``prefix`` (what a script materialised); returns how many."""
    import redis

    r = redis.Redis.from_url(url)
    keys = list(r.scan_iter(match=prefix + "*", count=10000))
    for i in range(0, len(keys), 5000):
        r.delete(*keys[i : i + 5000])
    return len(keys)
