"""Settings: one frozen object built from flags and environment variables, validated once."""

import math
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from outbox_sync.errors import ConfigError
from outbox_sync.localserver import DEFAULT_EMBEDDED_PORT
from outbox_sync.typesense_index import DEFAULT_TIMEOUT_S, parse_node

DEFAULT_DB = "./sequences.db"
DEFAULT_COLLECTION = "sequences"
API_KEY_ENV = "TYPESENSE_API_KEY"
# Typesense accepts more, but a name that needs escaping in a URL path is a mistake.
COLLECTION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Visible ASCII, inner spaces allowed: what an HTTP header value can be.
HEADER_SAFE_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


@dataclass(frozen=True)
class Settings:
    db_path: Path
    typesense_urls: tuple[str, ...]  # empty: start the embedded server
    api_key: str | None = field(repr=False)
    collection: str = DEFAULT_COLLECTION
    timeout_s: float = DEFAULT_TIMEOUT_S
    ca_file: str | None = None
    embedded_port: int = DEFAULT_EMBEDDED_PORT

    @property
    def embedded(self) -> bool:
        return not self.typesense_urls

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
    if mode & stat.S_IROTH:
        raise ConfigError(
            f"API key file {path} is readable by other users: `chmod o-r {path}` first"
        )
    if not key:
        raise ConfigError(f"API key file {path} is empty")
    return key


def build_settings(
    *,
    db: str,
    typesense_url: str | None,
    api_key_file: str | None,
    collection: str,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    ca_file: str | None = None,
    embedded_port: int = DEFAULT_EMBEDDED_PORT,
) -> Settings:
    urls = tuple(url.strip() for url in (typesense_url or "").split(",") if url.strip())
    for url in urls:
        parse_node(url)  # raises ConfigError with the URL in it
    if api_key_file:
        api_key: str | None = read_api_key_file(Path(api_key_file))
    else:
        api_key = os.environ.get(API_KEY_ENV) or None
    if api_key is not None and not HEADER_SAFE_KEY.fullmatch(api_key):
        # Never echo it: httpx would refuse to send it with the key in its message.
        raise ConfigError(
            f"the Typesense API key (from {api_key_file or API_KEY_ENV}) holds a space, a control "
            "or a non-ASCII character, which an HTTP header cannot carry: check for a stray "
            "newline or quote"
        )
    if urls and not api_key:
        raise ConfigError(
            f"no Typesense API key: set {API_KEY_ENV} or pass --api-key-file "
            "(never the key itself on the command line)"
        )
    if not COLLECTION_NAME.fullmatch(collection):
        raise ConfigError(
            f"collection name {collection!r} must be 1-128 letters, digits, '_', '-' or '.'"
        )
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError(f"CA file {ca_file} does not exist")
    return Settings(
        db_path=Path(db),
        typesense_urls=urls,
        api_key=api_key,
        collection=collection,
        timeout_s=timeout_s,
        ca_file=ca_file,
        embedded_port=embedded_port,
    )
