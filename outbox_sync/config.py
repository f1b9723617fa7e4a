"""Settings: every option declared once (`OPTIONS`: flag, environment variable, default, help),
built into one frozen object and validated once. The CLI makes its flags from the declarations;
a flag wins over the environment, which wins over the default."""

import math
import os
import re
import stat
from collections.abc import Iterator
from collections.abc import Mapping as Mapping_
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from outbox_sync import config_file as config_file_
from outbox_sync.config_file import COLLECTION_NAME
from outbox_sync.errors import ConfigError
from outbox_sync.mapping import SEQUENCES, Mapping

# Typesense: a 10k-document import takes ~0.3 s here; 10 s leaves room for a busy server
# without letting a hung one stall the loop for long.
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_EMBEDDED_PORT = 8108
DEFAULT_DB = "./sequences.db"
DEFAULT_COLLECTION = "sequences"
# Entries per batch. One import of 5,000 documents costs ~0.1 s here and reaches most of
# Typesense's throughput (docs/performance.md); larger batches only add latency.
DEFAULT_BATCH_SIZE = 5000
MAX_BATCH_SIZE = 50_000
API_KEY_ENV = "TYPESENSE_API_KEY"
# Visible ASCII, inner spaces allowed: what an HTTP header value can be.
HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def parse_node(url: str) -> dict[str, Any]:
    """`http://host:port` -> the client's node dict; ConfigError on anything else. The URL is
    echoed in the message only without what may be a secret (user and password)."""
    try:
        parts = urlsplit(url.strip())
    except ValueError as error:  # e.g. an IPv6 address without its closing bracket
        raise ConfigError(f"Typesense URL {url!r} cannot be read: {error}") from None
    if parts.username or parts.password:
        shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        raise ConfigError(
            f"Typesense URL {shown!r} must not carry credentials: give the API key in "
            "TYPESENSE_API_KEY or --api-key-file"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"Typesense URL {url!r} must look like http://127.0.0.1:8108")
    if parts.query or parts.fragment:
        raise ConfigError(f"Typesense URL {url!r} must not carry a query or a #")
    try:
        port = parts.port or 8108
    except ValueError:
        raise ConfigError(f"Typesense URL {url!r} has an invalid port") from None
    return {
        "host": parts.hostname,
        "port": port,
        "protocol": parts.scheme,
        "path": parts.path.rstrip("/"),
    }


@dataclass(frozen=True)
class Option:
    """One setting as people give it: `--flag` (from `name`) and its environment variable."""

    name: str
    env: str
    help: str
    default: Any = None
    type: type = str
    metavar: str | None = None
    bounds: tuple[int, int] | None = None  # of an integer
    daemon_only: bool = False  # an option of `run` alone
    file: bool = False  # names a file: shells complete file names

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS = (
    Option(
        "config",
        "OUTBOX_SYNC_CONFIG",
        "TOML file with [[sync]] mappings of your own tables, and settings (flags and variables "
        "win over it). Unset: the built-in mapping of `sequences`.",
        metavar="FILE",
        file=True,
    ),
    Option("db", "OUTBOX_SYNC_DB", "SQLite database file.", DEFAULT_DB, metavar="PATH", file=True),
    Option(
        "typesense_url",
        "TYPESENSE_URL",
        "Typesense node URL, or several comma-separated nodes of a cluster. Unset: the embedded "
        "Typesense on 127.0.0.1, which `run` starts (needs the 'embedded' extra) and the other "
        "commands reach while it runs.",
        metavar="URL[,URL...]",
    ),
    Option(
        "api_key_file",
        "OUTBOX_SYNC_API_KEY_FILE",
        f"File holding the Typesense API key; otherwise the key is read from {API_KEY_ENV}. "
        "Never pass the key itself on the command line.",
        metavar="PATH",
        file=True,
    ),
    Option(
        "collection",
        "OUTBOX_SYNC_COLLECTION",
        "Typesense collection: of the built-in mapping; with --config, the mapping the command "
        "works on (default: all of them).",
        metavar="NAME",
    ),
    Option(
        "timeout",
        "OUTBOX_SYNC_TIMEOUT",
        "Timeout of one Typesense request, in seconds.",
        DEFAULT_TIMEOUT_S,
        float,
        "SECONDS",
    ),
    Option(
        "embedded_port",
        "OUTBOX_SYNC_EMBEDDED_PORT",
        "Port of the embedded Typesense on 127.0.0.1, used when no --typesense-url is set.",
        DEFAULT_EMBEDDED_PORT,
        int,
        "PORT",
        bounds=(1, 65535),
    ),
    Option(
        "ca_file",
        "OUTBOX_SYNC_CA_FILE",
        "CA bundle to verify an https Typesense with.",
        metavar="PATH",
        file=True,
    ),
    Option(
        "batch_size",
        "OUTBOX_SYNC_BATCH_SIZE",
        (
            "Outbox entries applied per batch, at most: fewer while rows are large (a batch "
            "holds about 16 MiB of documents, and a request no more)."
        ),
        DEFAULT_BATCH_SIZE,
        int,
        "N",
        bounds=(1, MAX_BATCH_SIZE),
        daemon_only=True,
    ),
    Option(
        "audit_every",
        "OUTBOX_SYNC_AUDIT_EVERY",
        "Audit Typesense against SQLite at start and this often (30m, 24h, 7d), in the "
        "background, repairing what differs; 0 turns these audits off (the ones after an "
        "outage or a trigger repair still run).",
        "24h",
        metavar="DURATION",
        daemon_only=True,
    ),
    Option(
        "metrics_address",
        "OUTBOX_SYNC_METRICS_ADDRESS",
        "Serve Prometheus /metrics and /healthz there, e.g. 127.0.0.1:9464. Off by default; "
        "bind a non-loopback host only where the network is yours.",
        metavar="HOST:PORT",
        daemon_only=True,
    ),
)


@dataclass(frozen=True)
class Settings:
    db_path: Path
    typesense_urls: tuple[str, ...]  # empty: the embedded server
    api_key: str | None = field(repr=False)
    mappings: tuple[Mapping, ...] = (SEQUENCES,)
    collection: str | None = None  # the one collection asked for (None: every mapping's)
    config_file: Path | None = None
    timeout_s: float = DEFAULT_TIMEOUT_S
    ca_file: str | None = None
    embedded_port: int = DEFAULT_EMBEDDED_PORT
    batch_size: int = DEFAULT_BATCH_SIZE
    audit_every_s: float = 24 * 3600.0
    metrics_address: tuple[str, int] | None = None

    @property
    def embedded(self) -> bool:
        return not self.typesense_urls

    @property
    def selected(self) -> tuple[Mapping, ...]:
        """The mappings a command works on: the one of --collection, or all."""
        if self.collection is None:
            return self.mappings
        return tuple(m for m in self.mappings if m.collection == self.collection)

    @property
    def embedded_dir(self) -> Path:
        """The embedded server's data, next to the database."""
        return self.db_path.parent / (self.db_path.name + ".typesense")


def read_api_key_file(path: Path) -> str:
    """The key in `path`, refusing a file that other users can read."""
    try:
        mode = path.stat().st_mode
        key = path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"cannot read API key file {path}: {error.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"API key file {path} is not UTF-8 text") from None
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"API key file {path} is readable by other users: `chmod o-r {path}` first"
        )
    if not key:
        raise ConfigError(f"API key file {path} is empty")
    return key


DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?")
SECONDS_PER_UNIT = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, what: str = "duration") -> float:
    """`90s`, `10m`, `24h`, `7d`, `2w` (a bare number: seconds) -> seconds; ConfigError
    naming `what` otherwise."""
    match = DURATION.fullmatch(text.strip())
    seconds = float(match[1]) * SECONDS_PER_UNIT[match[2] or "s"] if match else math.inf
    if not math.isfinite(seconds):
        raise ConfigError(f"{what} {text!r} must be a duration such as 90s, 10m, 24h or 7d")
    return seconds


def format_duration(seconds: float) -> str:
    """The largest unit that says `seconds` whole (86400: `1d`, 90: `90s`), for
    parse_duration to read back."""
    for unit in ("w", "d", "h", "m", "s"):
        if seconds and seconds % SECONDS_PER_UNIT[unit] == 0:
            return f"{seconds / SECONDS_PER_UNIT[unit]:g}{unit}"
    return f"{seconds:g}s"


def parse_address(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) -> (host, port); ConfigError otherwise."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"metrics address {address!r} must look like 127.0.0.1:9464")
    return host, int(port)


def build_settings(given: Mapping_[str, Any], *, key_needed: bool = True) -> Settings:
    """Settings from option values by name (from flags or the environment) over the
    configuration file's; an option that is absent or None takes its default. Raises
    ConfigError naming what is wrong; a Typesense URL without an API key too, unless
    `key_needed` is False (a command that never asks Typesense)."""
    values = {option.name: option.default for option in OPTIONS}
    config_file = given.get("config")
    mappings: tuple[Mapping, ...] = ()
    from_file: dict[str, Any] = {}
    if config_file:
        in_file = {o.name: o.type for o in OPTIONS if o.name not in ("config", "collection")}
        from_file, mappings = config_file_.load(Path(config_file), in_file)
        values.update(from_file)
    values.update({name: value for name, value in given.items() if value is not None})
    in_file_only = {name for name in from_file if given.get(name) is None}

    @contextmanager
    def checking(name: str) -> Iterator[None]:
        """A bad value the configuration file gave is the file's mistake: named so, exit 2."""
        try:
            yield
        except ConfigError as error:
            if name not in in_file_only or isinstance(error, config_file_.ConfigFileError):
                raise
            raise config_file_.ConfigFileError(f"{config_file}: {name}: {error}") from None

    urls = tuple(url.strip() for url in (values["typesense_url"] or "").split(",") if url.strip())
    with checking("typesense_url"):
        for url in urls:
            parse_node(url)  # raises ConfigError with the URL in it
    api_key = _api_key(values["api_key_file"])
    if urls and not api_key and key_needed:
        raise ConfigError(
            f"no Typesense API key: set {API_KEY_ENV} or pass --api-key-file "
            "(never the key itself on the command line)"
        )
    collection = values["collection"]
    if collection is not None and not COLLECTION_NAME.fullmatch(collection):
        raise ConfigError(
            f"collection name {collection!r} must be 1-128 letters, digits, '_', '-' or '.'"
        )
    if not mappings:  # the built-in mapping, under the collection asked for
        mappings = (replace(SEQUENCES, collection=collection or DEFAULT_COLLECTION),)
    elif collection is not None and collection not in {m.collection for m in mappings}:
        known = ", ".join(m.collection for m in mappings)
        raise ConfigError(
            f"no mapping of {config_file} writes to collection {collection!r} ({known})"
        )
    with checking("timeout"):
        if not math.isfinite(values["timeout"]) or values["timeout"] <= 0:
            raise ConfigError("--timeout must be a positive number of seconds")
    for option in OPTIONS:
        with checking(option.name):
            if option.bounds and not option.bounds[0] <= values[option.name] <= option.bounds[1]:
                raise ConfigError(f"{option.flag} must be in the range {option.bounds}")
    with checking("ca_file"):
        if values["ca_file"] and not Path(values["ca_file"]).is_file():
            raise ConfigError(f"CA file {values['ca_file']} does not exist")
    with checking("audit_every"):
        audit_every_s = parse_duration(values["audit_every"], "--audit-every")
    metrics = values["metrics_address"]
    with checking("metrics_address"):
        metrics_address = parse_address(metrics) if metrics else None
    return Settings(
        db_path=Path(values["db"]),
        typesense_urls=urls,
        api_key=api_key,
        mappings=mappings,
        collection=collection,
        config_file=Path(config_file) if config_file else None,
        timeout_s=values["timeout"],
        ca_file=values["ca_file"],
        embedded_port=values["embedded_port"],
        batch_size=values["batch_size"],
        audit_every_s=audit_every_s,
        metrics_address=metrics_address,
    )


def _api_key(key_file: str | None) -> str | None:
    """The key from the key file, else from the environment; refused (never echoed) when an
    HTTP header cannot carry it: httpx would put it in its error message."""
    key = read_api_key_file(Path(key_file)) if key_file else os.environ.get(API_KEY_ENV) or None
    if key is not None and not HEADER_SAFE_KEY.fullmatch(key):
        raise ConfigError(
            f"the Typesense API key (from {key_file or API_KEY_ENV}) holds a space, a control "
            "or a non-ASCII character, which an HTTP header cannot carry: check for a stray "
            "newline or quote"
        )
    return key
