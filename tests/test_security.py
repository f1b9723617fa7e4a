"""Security: the API key stays secret in every output, key files readable by others are refused,
HTTPS to Typesense is verified (with --ca-file for a private CA), and every input that reaches a
URL path or SQL is validated or parameterised."""

import ast
import datetime
import ipaddress
import json
import shutil
import signal
import ssl
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from outbox_sync import sync_errors
from outbox_sync.db import Database
from outbox_sync.localserver import LocalTypesense, free_port
from outbox_sync.mapping import SEQUENCES
from tests.support.app import ROW_SQL, app_connection, insert_rows, make_row, sqlite_documents
from tests.support.cli import ROOT, invoke, run_module, without_settings
from tests.support.daemon import Daemon, children
from tests.support.typesense import API_KEY, Server, export
from tests.support.wait import wait_until

# A key no server knows: for runs that must fail (wrong key, unreachable server).
WRONG_KEY = "wr0ng-k3y-5ecret-7d1e"


def proc_file(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


def scrape(address: str) -> str:
    metrics = httpx.get(f"http://{address}/metrics", timeout=10).text
    health = httpx.get(f"http://{address}/healthz", timeout=10).text
    return metrics + health


class Outputs:
    """Everything a run showed to anyone, gathered to be searched for the key."""

    def __init__(self) -> None:
        self.parts: dict[str, bytes] = {}

    def add(self, name: str, data: str | bytes) -> None:
        self.parts[name] = data.encode() if isinstance(data, str) else data

    def add_files(self, name: str, directory: Path) -> None:
        """Every file a run left: logs, the database, its -wal, the lock file."""
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                self.add(f"{name}:{path.name}", path.read_bytes())

    def holding(self, secret: str) -> list[str]:
        return [name for name, data in self.parts.items() if secret.encode() in data]


@pytest.mark.slow
def test_the_api_key_never_appears_in_any_output(
    tmp_path: Path,
    db_path: Path,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    typesense_server: Server,
    collection: str,
) -> None:
    outputs = Outputs()
    key = typesense_server.api_key
    conn = app_connection(db_path)
    insert_rows(conn, range(1, 6))
    conn.execute(ROW_SQL, make_row(6, sequence_number=2**31))  # a sync error
    conn.execute(ROW_SQL, make_row(7, comment="c" * 70_000))  # another
    debug = ["--log-level", "debug"]

    # 1. the right key, bad rows, metrics served and scraped, debug logs
    metrics = f"127.0.0.1:{free_port()}"
    verbose = {"OUTBOX_SYNC_LOG_LEVEL": "debug"}
    daemon = start_daemon("--metrics-address", metrics, env=daemon_env | verbose)
    wait_until(
        lambda: Database(db_path).counts(SEQUENCES)["sync_errors_open"] == 2, what="the sync"
    )
    outputs.add("metrics", scrape(metrics))
    assert key.encode() in proc_file(daemon.process.pid, "environ")  # given there: only
    outputs.add("daemon cmdline", proc_file(daemon.process.pid, "cmdline"))  # its user reads it
    for command in (["status"], ["status", "--json"], ["errors", "list", "--all", "--json"]):
        result = run_module([*debug, *command], daemon_env)
        assert result.returncode == 0, result.stderr
        outputs.add(" ".join(command), result.stdout + result.stderr)
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert sync_errors.find(Database(db_path))  # the errors are there, for the search below

    # 2. a wrong key: refused at once, with one clear line
    wrong = daemon_env | {"TYPESENSE_API_KEY": WRONG_KEY}
    refused = start_daemon(env=wrong | verbose)
    assert refused.wait(30) == 1
    assert "refused the API key" in refused.output()
    status = run_module(["status", "--json"], wrong)
    outputs.add("status, wrong key", status.stdout + status.stderr)

    # 3. an unreachable server: paused, metrics and health say so
    unreachable = wrong | {"TYPESENSE_URL": f"http://127.0.0.1:{free_port()}"}
    metrics = f"127.0.0.1:{free_port()}"
    paused = start_daemon("--metrics-address", metrics, env=unreachable | verbose)
    wait_until(lambda: paused.logged("sync_paused"), what="the outage")
    outputs.add("metrics, unreachable", scrape(metrics))
    outputs.add("cmdline, unreachable", proc_file(paused.process.pid, "cmdline"))
    assert WRONG_KEY.encode() in proc_file(paused.process.pid, "environ")
    for command in (["status"], ["status", "--json"]):
        result = run_module([*debug, *command], unreachable)
        outputs.add(f"{command}, unreachable", result.stdout + result.stderr)
    paused.process.send_signal(signal.SIGTERM)
    assert paused.wait() == 0

    outputs.add_files("run", tmp_path)  # daemon logs, app.db, its -wal
    assert len(outputs.parts) > 10
    assert outputs.holding(key) == []
    assert outputs.holding(WRONG_KEY) == []


@pytest.mark.slow
def test_the_embedded_servers_key_is_not_on_any_command_line(
    tmp_path: Path, start_daemon: Callable[..., Daemon]
) -> None:
    db_path = tmp_path / "sequences.db"
    env = without_settings(OUTBOX_SYNC_DB=str(db_path), OUTBOX_SYNC_EMBEDDED_PORT=str(free_port()))
    assert run_module(["init"], env).returncode == 0
    daemon = start_daemon(env=env)
    wait_until(lambda: daemon.logged("started"), what="the embedded server")
    key = (tmp_path / "sequences.db.typesense" / "api-key").read_text().strip()
    [server] = children(daemon.process.pid)
    assert b"typesense-server" in proc_file(server, "cmdline")
    assert key.encode() not in proc_file(server, "cmdline")  # `ps` shows it to every user
    assert key.encode() not in proc_file(daemon.process.pid, "cmdline")
    assert key not in daemon.output()
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.wait() == 0


@pytest.mark.parametrize(
    "key",
    ["s3cret\nX-Injected: 1", "s3cret ", "s3crét", "s3cret\t"],
    ids=["newline", "trailing-space", "non-ascii", "tab"],
)
def test_an_api_key_no_http_header_can_carry_is_refused_without_showing_it(
    db_path: Path, typesense_server: Server, key: str
) -> None:
    # httpx would refuse to send it, with the key in its message ("Illegal header value
    # b's3cret\\n...'"), which log redaction cannot recognise: refuse it up front instead.
    env = {"TYPESENSE_URL": typesense_server.url, "TYPESENSE_API_KEY": key}
    for command in (["status", "--json"], ["run", "--once"]):
        result = invoke([*command, "--db", str(db_path)], **env)
        assert result.exit_code == 1, result.output
        assert "API key" in result.output and "s3cr" not in result.output
        assert "Traceback" not in result.output


def test_a_key_file_readable_by_others_stops_run(
    tmp_path: Path, db_path: Path, typesense_server: Server
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    key_file.chmod(0o604)
    env = {"TYPESENSE_URL": typesense_server.url}
    args = ["run", "--once", "--db", str(db_path), "--api-key-file", str(key_file)]
    result = invoke(args, **env)
    assert result.exit_code == 1
    assert f"API key file {key_file} is readable by other users" in result.output
    assert API_KEY not in result.output


# -- HTTPS --------------------------------------------------------------------------------------


def make_certificate(directory: Path, name: str, hosts: tuple[str, ...]) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for `hosts` (names or IP addresses), and its
    key: with the `cryptography` package, else the `openssl` command."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        if not shutil.which("openssl"):
            pytest.skip("neither the cryptography package nor openssl to make a certificate")
        names = ",".join(f"IP:{h}" if h[0].isdigit() else f"DNS:{h}" for h in hosts)
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN={name}",
                "-addext",
                f"subjectAltName={names}",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        return cert, key
    private = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h)
        for h in hosts
    ]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key.chmod(0o600)
    return cert, key


class TlsTypesense(LocalTypesense):
    """The real server, answering HTTPS only, with a certificate of our own."""

    def __init__(self, data_dir: Path, cert: Path, key: Path) -> None:
        super().__init__(
            data_dir,
            api_key=API_KEY,
            extra_args=(f"--ssl-certificate={cert}", f"--ssl-certificate-key={key}"),
        )
        self.cert = cert
        self.context = ssl.create_default_context(cafile=str(cert))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def wait_ready(
        self, timeout_s: float = 60, heartbeat: Callable[[], None] = lambda: None
    ) -> None:
        def ready() -> bool:
            heartbeat()
            assert self.process is not None and self.process.poll() is None, "server exited"
            try:
                response = httpx.get(f"{self.url}/health", verify=self.context, timeout=1)
                return bool(response.json().get("ok"))
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s, "the HTTPS Typesense")


@pytest.fixture(scope="module")
def tls_typesense(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsTypesense]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = make_certificate(directory, "typesense", ("localhost", "127.0.0.1"))
    with TlsTypesense(directory / "server", cert, key) as server:
        yield server


def https_env(daemon_env: dict[str, str], server: TlsTypesense) -> dict[str, str]:
    return daemon_env | {"TYPESENSE_URL": server.url, "OUTBOX_SYNC_TIMEOUT": "5"}


@pytest.mark.slow
def test_https_with_the_ca_file_syncs(
    db_path: Path,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    tls_typesense: TlsTypesense,
    collection: str,
    tmp_path: Path,
) -> None:
    insert_rows(db_path, range(1, 21))
    env = https_env(daemon_env, tls_typesense) | {"OUTBOX_SYNC_CA_FILE": str(tls_typesense.cert)}
    daemon = start_daemon("--once", env=env)
    assert daemon.wait(60) == 0, daemon.output()
    server = Server(tls_typesense.url, API_KEY)
    documents = export(server, collection, verify=tls_typesense.context)
    assert documents == sqlite_documents(db_path)


@pytest.mark.slow
@pytest.mark.parametrize("ca", ["system CAs", "another CA"])
def test_an_unverifiable_certificate_stops_the_daemon_with_one_clear_line(
    db_path: Path,
    daemon_env: dict[str, str],
    start_daemon: Callable[..., Daemon],
    tls_typesense: TlsTypesense,
    tmp_path: Path,
    ca: str,
) -> None:
    # A configuration problem, not an outage: no endless backoff.
    app_connection(db_path).execute(ROW_SQL, make_row(1))
    env = https_env(daemon_env, tls_typesense)
    if ca == "another CA":
        other, _ = make_certificate(tmp_path, "other", ("localhost", "127.0.0.1"))
        env |= {"OUTBOX_SYNC_CA_FILE": str(other)}
    daemon = start_daemon(env=env)
    assert daemon.wait(30) == 1
    [line] = [x for x in daemon.output().splitlines() if not x.startswith("{")]
    assert line.startswith("Error: ") and "certificate" in line and "--ca-file" in line
    assert not daemon.logged("sync_paused")
    assert Database(db_path).counts(SEQUENCES)["pending"] == 1
    status = run_module(["status", "--json"], env)
    assert status.returncode == 0
    assert "certificate" in json.loads(status.stdout)["typesense_error"]


# -- inputs that reach URL paths and SQL ---------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        *[
            ("--collection", name, "collection name")
            for name in (
                "a/b",
                "../admin",
                "..",
                "x?action=delete",
                "x#y",
                "x y",
                "%2e%2e",
                "",
                "a" * 129,
                "ünï",
                "x\n",
                ".hidden",
                "-x",
            )
        ],
        *[
            ("--typesense-url", url, "Typesense URL")
            for url in (
                "ftp://127.0.0.1:8108",
                "http://user:pass@127.0.0.1:8108",
                "http://127.0.0.1:8108/?x=1",
                "http://127.0.0.1:8108/#x",
                "http://127.0.0.1:99999",
                "127.0.0.1:8108",
                "http://",
            )
        ],
        *[("--timeout", value, "--timeout") for value in ("0", "-1", "nan", "inf")],
        ("--ca-file", "/no/such/ca.pem", "CA file /no/such/ca.pem does not exist"),
    ],
)
def test_every_connection_option_is_validated(
    db_path: Path, option: str, value: str, message: str
) -> None:
    env = {"TYPESENSE_URL": "http://127.0.0.1:1", "TYPESENSE_API_KEY": "k"}
    result = invoke(["status", "--db", str(db_path), option, value], **env)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--metrics-address", "localhost"], "metrics address 'localhost' must look like"),
        (["--metrics-address", "127.0.0.1:99999"], "must look like 127.0.0.1:9464"),
        (["--metrics-address", "127.0.0.1:http"], "must look like 127.0.0.1:9464"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--batch-size", "50001"], "Invalid value for '--batch-size'"),
        (["--embedded-port", "0"], "Invalid value for '--embedded-port'"),
    ],
)
def test_every_run_option_is_validated(
    db_path: Path, typesense_server: Server, args: list[str], message: str
) -> None:
    env = {"TYPESENSE_URL": typesense_server.url, "TYPESENSE_API_KEY": "k"}
    result = invoke(["run", "--once", "--db", str(db_path), *args], **env)
    assert result.exit_code != 0
    assert message in result.output and "Traceback" not in result.output


SQL_CALLS = {"execute", "executemany", "executescript", "fetch_raw", "fetch"}
# Arguments that are SQL text by contract (table and column names, a fixed condition), never a
# value: the paging helper and the functions naming a table take them.
SQL_TEXT_ARGUMENTS = {"table", "order_by", "columns", "where"}
# Mappings are configuration, checked when loaded and by SQLite before use, their names quoted
# by quote_identifier: the SQL they compile to may be interpolated (a row's values never are).
CONFIGURATION = {"mapping", "mappings", "field_", "dependency", "dep", "bound"}


def interpolated_names(value: ast.AST) -> set[str]:
    """The names an f-string part uses, except inside quote_identifier(...)."""
    if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "quote_identifier":
        return set()
    names = {value.id} if isinstance(value, ast.Name) else set()
    for child in ast.iter_child_nodes(value):
        names |= interpolated_names(child)
    return names


def test_no_sql_is_built_from_a_function_argument() -> None:
    """SQL text may interpolate constants (column lists, a WHERE of fixed conditions), quoted
    names and the SQL a mapping compiles to, never a value that came in as an argument: values
    go through `?` parameters."""
    offenders = []
    for path in sorted((ROOT / "outbox_sync").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for function in ast.walk(tree):
            if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            arguments = {a.arg for a in [*function.args.args, *function.args.kwonlyargs]}
            arguments -= {"self", *SQL_TEXT_ARGUMENTS, *CONFIGURATION}
            for call in ast.walk(function):
                if not (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr in SQL_CALLS
                    and call.args
                ):
                    continue
                sql = call.args[0]
                formatted = isinstance(sql, ast.Call) and getattr(sql.func, "attr", "") == "format"
                if formatted or (isinstance(sql, ast.BinOp) and isinstance(sql.op, ast.Mod)):
                    offenders.append(f"{path.name}:{call.lineno} builds SQL with % or format")
                for value in ast.walk(sql):
                    if isinstance(value, ast.FormattedValue):
                        names = interpolated_names(value.value) & arguments
                        if names:
                            offenders.append(
                                f"{path.name}:{call.lineno} puts {sorted(names)} into SQL text"
                            )
    assert offenders == []
