"""Consistency checks of the container files: Dockerfile, .dockerignore and docker-compose.yml against the
repository (paths, console script, pins, ports) and against each other (service names, mounts, ports)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DATA_FILES = ("video_features_basic_pure.csv", "user_features_pure.csv")


# --------------------------------------------------------------------------- Dockerfile parsing


@dataclass(frozen=True)
class Instruction:
    cmd: str  # upper-case keyword
    args: str
    stage: int  # index of the FROM this instruction belongs to


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with line continuations joined and comment lines dropped (default escape char)."""
    logical: list[str] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#") or (not line and not buf):
            continue  # comment lines are removed even inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    out: list[Instruction] = []
    stage = -1
    for line in logical:
        cmd, _, args = line.partition(" ")
        cmd = cmd.upper()
        if cmd == "FROM":
            stage += 1
        out.append(Instruction(cmd, args.strip(), stage))
    return out


def exec_form(args: str) -> list[str]:
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def split_flags(args: str) -> tuple[dict[str, str], list[str]]:
    """``--from=builder a b`` -> ({"from": "builder"}, ["a", "b"])."""
    words = shlex.split(args)
    flags = {}
    while words and words[0].startswith("--"):
        key, _, value = words.pop(0)[2:].partition("=")
        flags[key] = value
    return flags, words


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def _one(instrs: list[Instruction], cmd: str) -> Instruction:
    found = [i for i in instrs if i.cmd == cmd]
    assert len(found) == 1, f"expected exactly one {cmd} in the final stage, found {len(found)}"
    return found[0]


def _env_of(instrs: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in instrs:
        if ins.cmd == "ENV":
            for word in shlex.split(ins.args):
                key, sep, value = word.partition("=")
                assert sep, f"use ENV key=value, not the legacy form: {ins.args}"
                env[key] = value
    return env


def _arg_defaults(instrs: list[Instruction]) -> dict[str, str]:
    out = {}
    for ins in instrs:
        if ins.cmd == "ARG":
            key, _, value = shlex.split(ins.args)[0].partition("=")
            out[key] = value
    return out


def _exposed_port(final_stage: list[Instruction]) -> int:
    return int(_one(final_stage, "EXPOSE").args.split("/")[0])


def _healthcheck_argv(final_stage: list[Instruction]) -> list[str]:
    args = _one(final_stage, "HEALTHCHECK").args
    _, _, cmd = args.partition("CMD ")
    assert cmd, "HEALTHCHECK must run a command (HEALTHCHECK [options] CMD ...)"
    return exec_form(cmd)


def _dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip().strip("/") for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path.strip("/")).parts
    for pat in patterns:
        assert not pat.startswith("!"), "negated .dockerignore patterns are not handled by this test"
        for i in range(1, len(parts) + 1):
            if pat.startswith("**/"):
                if fnmatch.fnmatch(parts[i - 1], pat[3:]):
                    return True
            elif fnmatch.fnmatch("/".join(parts[:i]), pat):
                return True
    return False


# --------------------------------------------------------------------------- Dockerfile


DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")


def test_base_images_are_python_311_slim_pinned_by_digest_and_build_is_multi_stage(
    instructions: list[Instruction],
) -> None:
    froms = [i for i in instructions if i.cmd == "FROM"]
    assert len(froms) >= 2, "expected a multi-stage build (builder + runtime)"
    stage_names, bases = set(), set()
    for f in froms:
        words = f.args.split()
        image = next(w for w in words if not w.startswith("--"))
        if image not in stage_names:
            name, _, _ = image.partition("@")
            assert name == "python:3.11-slim" and DIGEST.search(image), f"base image {image!r} not pinned"
            bases.add(image)
        if len(words) >= 3 and words[-2].upper() == "AS":
            stage_names.add(words[-1])
    assert "builder" in stage_names
    assert len(bases) == 1, f"the stages use different base digests: {bases}"


def test_runtime_copies_the_builder_venv(final_stage: list[Instruction]) -> None:
    copies = [split_flags(i.args) for i in final_stage if i.cmd == "COPY"]
    assert ({"from": "builder"}, ["/opt/venv", "/opt/venv"]) in copies
    assert _env_of(final_stage)["PATH"].startswith("/opt/venv/bin:")


def test_runs_as_the_non_root_user_it_creates(final_stage: list[Instruction]) -> None:
    user = _one(final_stage, "USER").args.split(":")[0]
    assert user not in {"root", "0"}
    runs = " ".join(i.args for i in final_stage if i.cmd == "RUN")
    assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", runs), f"user {user!r} is never created"
    # USER comes after every RUN, so nothing later silently runs as root
    order = [i.cmd for i in final_stage]
    assert order.index("USER") > max(n for n, c in enumerate(order) if c == "RUN")


def test_runtime_env_points_at_the_container_mounts(final_stage: list[Instruction]) -> None:
    env = _env_of(final_stage)
    assert env["MTRANK_ARTIFACTS"] == "/artifacts"
    assert env["MTRANK_DATA_DIR"] == "/data"
    runs = " ".join(i.args for i in final_stage if i.cmd == "RUN")
    assert re.search(r"chown [^&;]*/artifacts", runs), "/artifacts must be writable by the service user"


def test_healthcheck_targets_readyz_on_the_exposed_port(final_stage: list[Instruction]) -> None:
    port = _exposed_port(final_stage)
    argv = _healthcheck_argv(final_stage)
    assert argv[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{port}/readyz" in argv[2]


class _Ready(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def readyz_server() -> Iterator[tuple[int, type[_Ready]]]:
    handler = type("Handler", (_Ready,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


def test_healthcheck_command_fails_unless_readyz_is_200(
    final_stage: list[Instruction], readyz_server: tuple[int, type[_Ready]]
) -> None:
    """Run the HEALTHCHECK's Python snippet (retargeted at a stub port) for 200, 503 and no server."""
    port, handler = readyz_server
    code = _healthcheck_argv(final_stage)[2]
    exposed = f"127.0.0.1:{_exposed_port(final_stage)}"

    def check(target: str) -> int:
        cmd = [sys.executable, "-c", code.replace(exposed, target)]
        return subprocess.run(cmd, capture_output=True, timeout=30).returncode

    assert check(f"127.0.0.1:{port}") == 0
    handler.status = 503
    assert check(f"127.0.0.1:{port}") != 0
    with closed_port() as free:
        assert check(f"127.0.0.1:{free}") != 0


@contextmanager
def closed_port() -> Iterator[int]:
    """A local port nothing listens on (bound, never listened, released on exit)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield int(sock.getsockname()[1])


def test_cmd_runs_the_mtrank_console_script_on_the_exposed_port(final_stage: list[Instruction]) -> None:
    argv = exec_form(_one(final_stage, "CMD").args)
    assert argv[0] in PYPROJECT["project"]["scripts"], f"{argv[0]!r} is not a [project.scripts] entry"
    assert argv[1] == "serve"
    assert argv[argv.index("--port") + 1] == str(_exposed_port(final_stage))
    assert argv[argv.index("--host") + 1] == "0.0.0.0"


def test_copy_sources_exist_and_are_not_dockerignored(instructions: list[Instruction]) -> None:
    patterns = _dockerignore_patterns()
    copied = []
    for ins in instructions:
        if ins.cmd not in {"COPY", "ADD"}:
            continue
        flags, words = split_flags(ins.args)
        if "from" in flags:
            continue
        for src in words[:-1]:
            copied.append(src)
            assert (ROOT / src).exists(), f"{ins.cmd} source {src!r} does not exist in the repository"
            assert not _ignored(src, patterns), f"{ins.cmd} source {src!r} is excluded by .dockerignore"
    assert copied


def test_dockerignore_excludes_local_state() -> None:
    patterns = _dockerignore_patterns()
    for path in (".venv", "artifacts", ".git", "model/__pycache__", ".pytest_cache", ".mypy_cache"):
        assert _ignored(path, patterns), f"{path} is not excluded from the build context"


def test_builder_copies_what_pip_install_needs(instructions: list[Instruction]) -> None:
    builder = [i for i in instructions if i.stage == 0]
    sources = {s.strip("/") for i in builder if i.cmd == "COPY" for s in split_flags(i.args)[1][:-1]}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    needed |= {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert needed <= sources, f"builder stage does not copy {needed - sources}"


def test_torch_is_the_pinned_cpu_wheel_by_default(instructions: list[Instruction]) -> None:
    pins = [d for d in PYPROJECT["project"]["dependencies"] if re.match(r"torch\b", d)]
    args = _arg_defaults(instructions)
    assert args["TORCH_SPEC"] in pins
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"  # PyTorch's CPU-only wheels
    builder = [i for i in instructions if i.stage == 0 and i.cmd == "RUN"]
    (install,) = [i.args for i in builder if "TORCH_SPEC" in i.args]
    assert re.search(r'pip install --index-url "\$\{TORCH_INDEX_URL\}" "\$\{TORCH_SPEC\}"', install), install
    # torch comes first: the later requirements install finds the pin satisfied (2.13.0+cpu == 2.13.0)
    later = [n for n, i in enumerate(builder) if "requirements.txt" in i.args]
    assert later and builder.index(next(i for i in builder if "TORCH_SPEC" in i.args)) < later[0]
    assert "index-url" not in COMPOSE_FILE.read_text()


def test_dependency_list_snippet_reads_pyproject(instructions: list[Instruction]) -> None:
    """Execute the builder's pyproject -> requirements one-liner, with and without extras."""
    run = next(i.args for i in instructions if i.cmd == "RUN" and "tomllib" in i.args)
    argv = shlex.split(run.split(" > ")[0])
    assert argv[:2] == ["python", "-c"]
    assert "INSTALL_EXTRAS" in _arg_defaults(instructions)

    def reqs(extras: str) -> list[str]:
        env = {**os.environ, "INSTALL_EXTRAS": extras}
        out = subprocess.run(
            [sys.executable, *argv[1:]], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        return out.stdout.splitlines()

    base = reqs("")
    assert base == PYPROJECT["project"]["dependencies"]
    assert reqs("dev") == base + PYPROJECT["project"]["optional-dependencies"]["dev"]


# --------------------------------------------------------------------------- docker-compose.yml


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    services: dict[str, Any] = compose["services"]
    return services


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def _argv(service: dict[str, Any]) -> list[str]:
    cmd = service["command"]
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def _script_commands(service: dict[str, Any]) -> list[list[str]]:
    """The `mtrank ...` invocations of a `sh -c "..."` service command, in order."""
    argv = _argv(service)
    assert argv[:2] == ["sh", "-c"], argv
    return [shlex.split(m) for m in re.findall(r"\bmtrank\b[^;&|{}]*", argv[2])]


def _mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    out = []
    for vol in service.get("volumes", []):
        assert isinstance(vol, str), "use the short volume syntax src:dst[:mode]"
        src, dst, *mode = vol.split(":")
        out.append((src, dst, mode[0] if mode else "rw"))
    return out


def _is_bind(src: str) -> bool:
    return src.startswith((".", "/", "~"))


def _option(argv: list[str], name: str) -> str:
    assert name in argv, f"{name} missing from {argv}"
    return argv[argv.index(name) + 1]


def test_compose_services(services: dict[str, Any]) -> None:
    assert {"redis", "api", "trainer", "locust"} <= set(services)
    image = services["redis"]["image"]
    assert image.partition("@")[0] == "redis:7-alpine" and DIGEST.search(image), f"{image} not pinned"
    assert "redis-cli ping" in " ".join(services["redis"]["healthcheck"]["test"])


def test_no_service_depends_on_one_outside_its_profiles(services: dict[str, Any]) -> None:
    """Compose refuses a dependency on a service whose profile is not active."""
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
            needed = set(services[dep].get("profiles", []))
            assert not needed or needed <= set(svc.get("profiles", [])), f"{name} -> {dep} ({needed})"


def test_images_built_from_this_dockerfile(services: dict[str, Any]) -> None:
    tags: dict[str, Any] = {}
    for name in ("api", "trainer", "locust"):
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"] / build.get("dockerfile", "Dockerfile")).resolve() == (
            DOCKERFILE
        )
        image = services[name]["image"]
        # one tag must mean one build: services built with different args need different tags
        assert tags.setdefault(image, build.get("args")) == build.get("args"), f"{image} built two ways"


def test_api_uses_redis_service_as_feature_store(services: dict[str, Any]) -> None:
    env = _env(services["api"])
    assert env["MTRANK_FEATURE_STORE"] == "redis"
    url = urlparse(env["MTRANK_REDIS_URL"])
    assert url.scheme == "redis" and url.hostname in services and url.hostname == "redis"
    assert url.port == 6379
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_api_is_one_replica_on_one_stable_port_with_the_dockerfile_healthcheck(
    services: dict[str, Any], final_stage: list[Instruction]
) -> None:
    api = services["api"]
    port = _exposed_port(final_stage)
    assert api.get("deploy", {}).get("replicas", 1) == 1  # a fixed host port: one replica
    (mapping,) = api["ports"]
    host, _, container = str(mapping).rpartition(":")
    assert container == str(port)
    default = re.fullmatch(r"\$\{MTRANK_HOST_PORT:-(\d+)\}", host)
    assert default and int(default.group(1)) == port, f"port mapping {mapping!r}: a fixed host port"
    assert api["healthcheck"]["test"] == ["CMD", *_healthcheck_argv(final_stage)]
    argv = _argv(api)
    assert argv[0] in PYPROJECT["project"]["scripts"] and argv[1] == "serve"
    assert _option(argv, "--port") == str(port)


def test_mounts_match_dockerfile_env_and_real_data(
    compose: dict[str, Any], services: dict[str, Any], final_stage: list[Instruction]
) -> None:
    image_env = _env_of(final_stage)
    declared = set(compose.get("volumes") or {})
    for name in ("api", "trainer", "locust"):
        env = {**image_env, **_env(services[name])}
        for src, dst, mode in _mounts(services[name]):
            if _is_bind(src):
                # data comes from a path inside the project (./data, see data/README.md), read-only
                data = (COMPOSE_FILE.parent / src).absolute()
                assert src.startswith("./") and ".." not in Path(src).parts, (
                    f"{name}: {src} leaves the project"
                )
                assert data.is_relative_to(ROOT) and Path(src).parts[0] == "data", src
                if data.is_dir():  # where the files were put (never in the repository)
                    for f in DATA_FILES:
                        assert (data / f).is_file(), f"{name}: {data} has no {f}"
                assert dst == env["MTRANK_DATA_DIR"] and mode == "ro"
            else:
                assert src in declared, f"{name}: named volume {src!r} is not declared"
                assert src == "artifacts" and dst == env["MTRANK_ARTIFACTS"]
    for svc in services.values():
        for src, _, _ in _mounts(svc):
            assert _is_bind(src) or src in declared
    api_mounts = {dst: mode for _, dst, mode in _mounts(services["api"])}
    trainer_mounts = {dst: mode for _, dst, mode in _mounts(services["trainer"])}
    assert "/artifacts" in api_mounts and trainer_mounts["/artifacts"] == "rw"  # the trainer writes models


def test_data_dir_is_ignored_by_git_and_docker_but_documented() -> None:
    assert (ROOT / "data" / "README.md").is_file()
    assert _ignored("data", _dockerignore_patterns())
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "/data/*" in ignored and "!/data/README.md" in ignored


def test_api_waits_for_a_successful_trainer_run(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert services["trainer"].get("restart", "no") == "no" and "profiles" not in services["trainer"]


def test_trainer_trains_then_materializes(services: dict[str, Any]) -> None:
    trainer = services["trainer"]
    script = _argv(trainer)[2]
    # trains only when there is no model yet, materializes every time
    assert re.search(r"\[ -f /artifacts/models/LATEST \] \|\| mtrank train", script), script
    steps = _script_commands(trainer)
    assert [s[:2] for s in steps] == [["mtrank", "train"], ["mtrank", "materialize"]]
    assert "mtrank" in PYPROJECT["project"]["scripts"]
    train, materialize = steps
    config = _option(train, "--config")
    assert (ROOT / config).is_file(), f"trainer config {config} does not exist in the repository"
    # the files the config reads are in the data directory the trainer gets mounted at $MTRANK_DATA_DIR
    data_cfg = tomllib.loads((ROOT / config).read_text())["data"]
    (data_src,) = [src for src, _, _ in _mounts(trainer) if _is_bind(src)]
    shared = ROOT.parent / "shared" / "data" / "kuairand-pure"  # what data/README.md says to put there
    for key in ("log", "users", "videos"):
        if key in data_cfg:
            for where in (COMPOSE_FILE.parent / data_src, shared):
                if where.is_dir():
                    assert (where / data_cfg[key]).is_file(), f"no data.{key} file in {where}"
    assert _option(train, "--artifacts") == _option(materialize, "--artifacts") == "/artifacts"
    assert urlparse(_option(materialize, "--redis-url")).hostname == "redis"
    assert trainer["depends_on"]["redis"]["condition"] == "service_healthy"


def test_locust_runs_the_locustfile_against_the_api_service(
    services: dict[str, Any], final_stage: list[Instruction]
) -> None:
    locust = services["locust"]
    assert locust["profiles"] == ["loadtest"]
    argv = _argv(locust)
    assert argv[0] == "locust" and "--headless" in argv
    assert (ROOT / _option(argv, "-f")).is_file()
    target = urlparse(_option(argv, "--host"))
    assert target.hostname == "api" and target.hostname in services
    assert target.port == _exposed_port(final_stage)
    assert locust["depends_on"]["api"]["condition"] == "service_healthy"
    # locust is a dev dependency: the image must be built with the dev extra
    extras = str(locust["build"]["args"]["INSTALL_EXTRAS"]).split(",")
    assert "dev" in extras
    assert any(r.startswith("locust") for r in PYPROJECT["project"]["optional-dependencies"]["dev"])


def test_pyyaml_is_a_dev_dependency() -> None:
    dev = {
        re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower()
        for r in PYPROJECT["project"]["optional-dependencies"]["dev"]
    }
    assert {"pyyaml", "types-pyyaml", "locust"} <= dev


# --------------------------------------------------------------------------- commands exist in the real CLI


def _cli_commands() -> dict[str, set[str]]:
    """{subcommand: its option names} of the `mtrank` typer app."""
    import typer

    from service.cli import app

    group = typer.main.get_command(app)
    return {
        name: {opt for p in cmd.params for opt in getattr(p, "opts", [])}
        for name, cmd in group.commands.items()  # type: ignore[attr-defined]
    }


def test_container_commands_exist_in_the_cli(
    services: dict[str, Any], final_stage: list[Instruction]
) -> None:
    invocations = [exec_form(_one(final_stage, "CMD").args), _argv(services["api"])]
    invocations += _script_commands(services["trainer"])
    commands = _cli_commands()
    for argv in invocations:
        assert argv[0] == "mtrank"
        sub = argv[1]
        assert sub in commands, f"`mtrank {sub}` is not a CLI command (have {sorted(commands)})"
        for word in argv[2:]:
            if word.startswith("--"):
                assert word in commands[sub], f"`mtrank {sub}` has no option {word}"
