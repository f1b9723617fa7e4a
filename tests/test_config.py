"""Settings: every option declared once in `config.OPTIONS`, built by `build_settings` into one
frozen object, validated once; flags win over the environment, which wins over the default."""

import dataclasses
import math
from pathlib import Path
from typing import Any

import click
import pytest

from outbox_sync import config
from outbox_sync.cli import base as cli_base
from outbox_sync.cli import main
from outbox_sync.config import (
    API_KEY_ENV,
    DEFAULT_BATCH_SIZE,
    DEFAULT_COLLECTION,
    DEFAULT_DB,
    DEFAULT_EMBEDDED_PORT,
    DEFAULT_TIMEOUT_S,
    OPTIONS,
    Settings,
    build_settings,
    parse_address,
)
from outbox_sync.errors import ConfigError
from outbox_sync.mapping import SEQUENCES
from tests.support.cli import SETTING_PREFIXES, invoke, one_line

URL = "http://127.0.0.1:8108"


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)


def key_file(tmp_path: Path, text: str, mode: int = 0o600, name: str = "key") -> Path:
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return path


# -- the declarations -------------------------------------------------------------------------


def test_nothing_given_is_every_default_the_embedded_server() -> None:
    settings = build_settings({})
    assert settings == Settings(
        db_path=Path(DEFAULT_DB),
        typesense_urls=(),
        api_key=None,
        mappings=(SEQUENCES,),
        collection=None,
        timeout_s=DEFAULT_TIMEOUT_S,
        ca_file=None,
        embedded_port=DEFAULT_EMBEDDED_PORT,
        batch_size=DEFAULT_BATCH_SIZE,
        audit_every_s=24 * 3600,
        metrics_address=None,
    )
    assert settings.mappings[0].collection == DEFAULT_COLLECTION
    assert settings.embedded and settings.embedded_dir == Path("sequences.db.typesense")
    assert build_settings({option.name: None for option in OPTIONS}) == settings  # None: unset
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.collection = "other"  # type: ignore[misc]


def test_every_option_has_a_flag_an_environment_variable_and_help() -> None:
    assert len({option.name for option in OPTIONS}) == len(OPTIONS)
    assert len({option.env for option in OPTIONS}) == len(OPTIONS)
    for option in OPTIONS:
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env.startswith(SETTING_PREFIXES), option.env
        assert option.help.endswith(".") and len(option.help) > 20, option.name
        if option.bounds:
            assert option.type is int and option.bounds[0] <= option.default <= option.bounds[1]
        if option.default is not None:
            assert isinstance(option.default, option.type), option.name


def leaf_commands(group: click.Group) -> list[click.Command]:
    found: list[click.Command] = []
    for command in group.commands.values():
        found += leaf_commands(command) if isinstance(command, click.Group) else [command]
    return found


def test_every_command_takes_the_shared_options_and_run_the_daemons_too() -> None:
    """(`config` shows the daemon's settings too, so it takes them.)"""
    commands = leaf_commands(main)
    assert len(commands) >= 10
    for command in commands:
        options = {p.name: p for p in command.params if isinstance(p, click.Option)}
        for option in OPTIONS:
            if option.daemon_only and command.name not in ("run", "config"):
                assert option.name not in options, (command.name, option.name)
                continue
            made = options[option.name]
            assert made.opts == [option.flag] and made.envvar == option.env
            assert made.help is not None and made.help.startswith(option.help)
            assert f"env: {option.env}]" in made.help


# -- flags, environment, defaults through the CLI ---------------------------------------------


def option_values(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """For each option, a value to give in the environment and another as a flag."""
    ca_env, ca_flag = tmp_path / "ca-env.pem", tmp_path / "ca-flag.pem"
    ca_env.write_text("")
    ca_flag.write_text("")
    return {
        "db": ("env.db", "flag.db"),
        "typesense_url": ("http://env:1", "http://flag:2"),
        "api_key_file": (
            str(key_file(tmp_path, "env-key", name="k1")),
            str(key_file(tmp_path, "flag-key", name="k2")),
        ),
        "config": (str(config_file(tmp_path, "from_env")), str(config_file(tmp_path, "from_flag"))),
        "collection": ("from_env", "from_flag"),
        "timeout": ("3", "4.5"),
        "embedded_port": ("1001", "1002"),
        "ca_file": (str(ca_env), str(ca_flag)),
        "batch_size": ("7", "8"),
        "audit_every": ("1h", "90s"),
        "metrics_address": ("127.0.0.1:9001", "[::1]:9002"),
    }


def config_file(tmp_path: Path, collection: str) -> Path:
    """A configuration file of one mapping, onto `collection`."""
    path = tmp_path / f"{collection}.toml"
    path.write_text(
        f'[[sync]]\ntable = "t"\nkey = "k"\ncollection = "{collection}"\n'
        'fields = [{ name = "n", type = "string" }]\n'
    )
    return path


def settings_of(
    monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str]
) -> dict[str, Any]:
    """The settings `outbox-sync run ARGS` builds with this environment (it stops right there)."""
    built: list[Settings] = []

    def build(given: dict[str, Any], **options: Any) -> Settings:
        built.append(build_settings(given, **options))
        raise ConfigError("built")

    monkeypatch.setattr(cli_base, "build_settings", build)
    result = invoke(["run", *args], **env)
    assert result.exit_code == 1 and "built" in result.output, result.output
    values = dataclasses.asdict(built[0])
    values["mappings"] = [m["collection"] for m in values["mappings"]]  # whose file
    return values


def test_a_flag_wins_over_the_environment_which_wins_over_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = option_values(tmp_path)
    assert set(values) == {option.name for option in OPTIONS}
    env = {option.env: values[option.name][0] for option in OPTIONS}
    flags = [arg for option in OPTIONS for arg in (option.flag, values[option.name][1])]
    expected_env = {
        "db_path": Path("env.db"),
        "typesense_urls": ("http://env:1",),
        "api_key": "env-key",
        "mappings": ["from_env"],
        "collection": "from_env",
        "config_file": Path(values["config"][0]),
        "timeout_s": 3.0,
        "embedded_port": 1001,
        "ca_file": values["ca_file"][0],
        "batch_size": 7,
        "audit_every_s": 3600.0,
        "metrics_address": ("127.0.0.1", 9001),
    }
    expected_flags = {
        "db_path": Path("flag.db"),
        "typesense_urls": ("http://flag:2",),
        "api_key": "flag-key",
        "mappings": ["from_flag"],
        "collection": "from_flag",
        "config_file": Path(values["config"][1]),
        "timeout_s": 4.5,
        "embedded_port": 1002,
        "ca_file": values["ca_file"][1],
        "batch_size": 8,
        "audit_every_s": 90.0,
        "metrics_address": ("::1", 9002),
    }
    assert settings_of(monkeypatch, [], env) == expected_env
    assert settings_of(monkeypatch, flags, env) == expected_flags
    assert settings_of(monkeypatch, flags, {}) == expected_flags
    expected_defaults = dataclasses.asdict(build_settings({}))
    expected_defaults["mappings"] = [DEFAULT_COLLECTION]
    assert settings_of(monkeypatch, [], {}) == expected_defaults


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"typesense_url": "ftp://127.0.0.1:8108"}, "Typesense URL 'ftp://127.0.0.1:8108'"),
        ({"typesense_url": URL}, "no Typesense API key: set TYPESENSE_API_KEY or pass --api-key"),
        ({"collection": "a/b"}, "collection name 'a/b' must be"),
        ({"collection": "x" * 129}, "collection name"),
        ({"timeout": 0.0}, "--timeout must be a positive number of seconds"),
        ({"timeout": -1.0}, "--timeout must be"),
        ({"timeout": math.nan}, "--timeout must be"),
        ({"timeout": math.inf}, "--timeout must be"),
        ({"ca_file": "/no/such/ca.pem"}, "CA file /no/such/ca.pem does not exist"),
        ({"metrics_address": "localhost"}, "metrics address 'localhost' must look like"),
        ({"metrics_address": "127.0.0.1:0"}, "metrics address '127.0.0.1:0'"),
        ({"metrics_address": ":9464"}, "metrics address ':9464'"),
    ],
)
def test_a_bad_value_is_a_config_error_naming_the_option(
    given: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        build_settings(given)
    assert message in str(caught.value)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.bounds], ids=lambda o: o.name)
def test_integer_options_keep_within_their_bounds(option: config.Option) -> None:
    assert option.bounds is not None
    low, high = option.bounds
    for inside in (low, high):
        assert dataclasses.asdict(build_settings({option.name: inside}))[option.name] == inside
    for outside in (low - 1, high + 1):
        with pytest.raises(ConfigError, match=f"^{option.flag} must be in the range "):
            build_settings({option.name: outside})


def test_several_typesense_nodes_are_split_on_commas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "k")
    settings = build_settings({"typesense_url": f" {URL}, http://10.0.0.2:8108 ,"})
    assert settings.typesense_urls == (URL, "http://10.0.0.2:8108") and not settings.embedded


def test_metrics_addresses() -> None:
    assert parse_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_address("[::1]:9464") == ("::1", 9464)
    assert parse_address("0.0.0.0:65535") == ("0.0.0.0", 65535)
    for bad in ("127.0.0.1", "127.0.0.1:65536", "127.0.0.1:http", "[::1]:"):
        with pytest.raises(ConfigError, match=r"must look like 127\.0\.0\.1:9464"):
            parse_address(bad)


# -- the API key --------------------------------------------------------------------------------


def test_the_key_comes_from_the_file_before_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert build_settings({"typesense_url": URL}).api_key == "from-env"
    path = key_file(tmp_path, "  from-file\n")
    settings = build_settings({"typesense_url": URL, "api_key_file": str(path)})
    assert settings.api_key == "from-file"  # surrounding whitespace stripped
    assert "from-file" not in repr(settings)


@pytest.mark.parametrize(
    ("text", "mode", "message"),
    [
        ("key\n", 0o604, "is readable by other users: `chmod o-r {path}` first"),
        ("key\n", 0o644, "is readable by other users"),
        ("\n  \n", 0o600, "API key file {path} is empty"),
        (None, 0o600, "cannot read API key file {path}: No such file or directory"),
    ],
    ids=["other-readable", "world-readable", "empty", "missing"],
)
def test_the_api_key_file_rules(tmp_path: Path, text: str | None, mode: int, message: str) -> None:
    path = tmp_path / "key" if text is None else key_file(tmp_path, text, mode)
    with pytest.raises(ConfigError) as caught:
        build_settings({"typesense_url": URL, "api_key_file": str(path)})
    assert message.format(path=path) in str(caught.value)


def test_a_group_readable_key_file_is_accepted(tmp_path: Path) -> None:
    path = key_file(tmp_path, "k", 0o640)  # a service's group may share it
    assert build_settings({"api_key_file": str(path)}).api_key == "k"


@pytest.mark.parametrize(
    "key",
    ["s3cret\nX-Injected: 1", "s3cret\tx", "s3crét", "s3cret\x01x", "s3cret\x7fx"],
    ids=["newline", "tab", "non-ascii", "control", "del"],
)
def test_a_key_no_http_header_can_carry_is_refused_without_being_echoed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, key: str
) -> None:
    monkeypatch.setenv(API_KEY_ENV, key)
    with pytest.raises(ConfigError) as from_env:
        build_settings({"typesense_url": URL})
    path = key_file(tmp_path, key)
    with pytest.raises(ConfigError) as from_file:
        build_settings({"typesense_url": URL, "api_key_file": str(path)})
    for caught, source in ((from_env, API_KEY_ENV), (from_file, str(path))):
        message = str(caught.value)
        assert f"the Typesense API key (from {source}) holds a space" in message
        assert "s3cr" not in message


def test_a_key_with_inner_spaces_can_be_carried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(API_KEY_ENV, "two words")
    assert build_settings({"typesense_url": URL}).api_key == "two words"


@pytest.mark.parametrize(
    ("seconds", "text"), [(86400, "1d"), (3600, "1h"), (90, "90s"), (1.5, "1.5s"), (0, "0s")]
)
def test_a_duration_is_said_in_its_largest_whole_unit_and_reads_back(
    seconds: float, text: str
) -> None:
    assert config.format_duration(seconds) == text
    assert config.parse_duration(text) == seconds


# -- found by a hostile review: each was a traceback ---------------------------------------------


def test_an_api_key_file_that_is_not_utf8_is_one_line(tmp_path: Path, db_path: Path) -> None:
    key = tmp_path / "key"
    key.write_bytes(b"\xff\xfesecret\n")
    key.chmod(0o600)
    result = invoke(
        ["errors", "list"],
        None,
        db_path,
        TYPESENSE_URL="http://127.0.0.1:1",
        OUTBOX_SYNC_API_KEY_FILE=str(key),
    )
    assert one_line(result) == f"Error: API key file {key} is not UTF-8 text"


def test_a_config_file_that_is_not_utf8_is_one_line_exit_2(tmp_path: Path, db_path: Path) -> None:
    config_path = tmp_path / "outbox-sync.toml"
    config_path.write_bytes(b'db = "caf\xe9.db"\n')
    result = invoke(["errors", "list"], None, db_path, OUTBOX_SYNC_CONFIG=str(config_path))
    assert one_line(result) == f"Error: {config_path}: not UTF-8 (bad byte at offset 9)"
    assert result.exit_code == 2


def test_a_typesense_url_that_cannot_be_read_is_one_line(db_path: Path) -> None:
    result = invoke(
        ["errors", "list"], None, db_path, TYPESENSE_URL="http://[::1:8108", TYPESENSE_API_KEY="k"
    )
    assert "Typesense URL 'http://[::1:8108' cannot be read" in one_line(result)


@pytest.mark.parametrize(
    "setting",
    [
        'audit_every = "soon"',
        "timeout = -1",
        "embedded_port = 99999",
        'typesense_url = "ftp://x"',
        'metrics_address = "nowhere"',
    ],
)
def test_a_bad_setting_in_the_config_file_names_the_file_and_exits_2(
    tmp_path: Path, db_path: Path, setting: str
) -> None:
    """Checked after the merge, it was told as the flag the user never gave, exit 1 (found by
    a hostile review)."""
    config_path = tmp_path / "outbox-sync.toml"
    config_path.write_text(setting + "\n")
    name = setting.split(" = ")[0]
    result = invoke(["errors", "list"], None, db_path, OUTBOX_SYNC_CONFIG=str(config_path))
    assert one_line(result).startswith(f"Error: {config_path}: {name}: ")
    assert result.exit_code == 2
