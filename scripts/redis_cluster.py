"""A throwaway local Redis Cluster (redis-server --cluster-enabled yes + redis-cli --cluster create)
on free loopback ports in a temporary folder, for the cluster tests and `make bench`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRedisCluster:
    """``masters`` primaries with ``replicas`` replicas each; no persistence. ``stop()`` kills
    every node; ``kill(port)`` one of them (a failover when it was a primary with a replica)."""

    def __init__(
        self, workdir: Path, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 1000
    ) -> None:
        self.workdir, self.masters, self.replicas = workdir, masters, replicas
        self.node_timeout_ms = node_timeout_ms
        self.ports: list[int] = []
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """A node to start from (clients discover the others)."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, socket_connect_timeout=2)

    def start(self, timeout: float = 30.0) -> LocalRedisCluster:
        exe, cli = shutil.which("redis-server"), shutil.which("redis-cli")
        if exe is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are needed for a local Redis Cluster")
        self.ports = [_free_port() for _ in range(self.masters * (1 + self.replicas))]
        for port in self.ports:
            bus = _free_port()  # the cluster bus (default port + 10000 may not exist)
            d = self.workdir / str(port)
            d.mkdir(parents=True, exist_ok=True)
            self.procs[port] = subprocess.Popen(
                [
                    exe,
                    *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(d)),
                    *("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"),
                    *("--cluster-port", str(bus)),
                    # a replica takes over however long ago it last heard from its primary
                    *("--cluster-replica-validity-factor", "0"),
                    *("--cluster-node-timeout", str(self.node_timeout_ms)),
                    *("--save", "", "--appendonly", "no"),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        for port in self.ports:
            self._wait(lambda p=port: bool(self.client(p).ping()), timeout, f"node {port}")
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout,
        )
        self.wait_ok(timeout)
        self._wait(self._replicas_linked, timeout, "the replicas to sync")
        return self

    def _replicas_linked(self) -> bool:
        linked = 0
        for p in self.alive():
            info = self.client(p).info("replication")
            linked += info.get("role") == "slave" and info.get("master_link_status") == "up"
        return linked == self.masters * self.replicas

    def _wait(self, check: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if check():  # type: ignore[operator]
                    return
            except (redis.RedisError, OSError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"local Redis Cluster: timed out waiting for {what}")
            time.sleep(0.1)

    def alive(self) -> list[int]:
        return [p for p, proc in self.procs.items() if proc.poll() is None]

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Until every live node says cluster_state:ok and sees every slot served by a live primary."""

        def ok() -> bool:
            alive = set(self.alive())
            for p in alive:
                c = self.client(p)
                if c.cluster("info").get("cluster_state") != "ok":
                    return False
                if not set(self.primaries(p)) <= alive:
                    return False
            return True

        self._wait(ok, timeout, "cluster_state ok")

    def primaries(self, port: int | None = None) -> list[int]:
        """Ports of the primaries serving slots, as one live node (``port``) sees them."""
        slots = self.client(port or self.alive()[0]).cluster("slots")
        return sorted({int(primary[1]) for _, _, primary, *_ in slots})

    def primary_of(self, key: str) -> int:
        slot = int(self.client(self.alive()[0]).cluster("keyslot", key))
        for start, end, primary, *_ in self.client(self.alive()[0]).cluster("slots"):
            if start <= slot <= end:
                return int(primary[1])
        raise RuntimeError(f"no node serves slot {slot}")

    def kill(self, port: int) -> None:
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
