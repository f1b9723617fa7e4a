"""The configuration file: TOML (`--config FILE`, or OUTBOX_SYNC_CONFIG) with settings and one or
more `[[sync]]` mappings. Every mistake is one line naming the file, the entry and the key.

    db = "app.db"                        # any setting of `outbox-sync run --help`, by its name

    [[sync]]
    table = "characters"
    key = "slug"
    collection = "characters"
    where = "deleted_at IS NULL"
    fields = [{ name = "name", type = "string" }, ...]

    [[sync.depends_on]]
    table = "character_tags"
    key = "slug"
"""

import json
import re
import tomllib
from collections.abc import Mapping as Lookup
from pathlib import Path
from typing import Any

from outbox_sync.errors import ConfigError
from outbox_sync.mapping import IDENTIFIER, TYPES, Dependency, Field, Mapping

# Typesense accepts more, but a name that needs escaping in a URL path is a mistake.
COLLECTION_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
ENTRY_KEYS: dict[str, type] = {
    "name": str,
    "table": str,
    "key": str,
    "collection": str,
    "where": str,
    "fields": list,
    "depends_on": list,
    "default_sorting_field": str,
}
REQUIRED = ("table", "key", "collection", "fields")
FIELD_KEYS: dict[str, type] = {
    "name": str,
    "type": str,
    "column": str,
    "sql": str,
    "facet": bool,
    "sort": bool,
    "optional": bool,
    "index": bool,
    "infix": bool,
    "locale": str,
}
DEPENDENCY_KEYS: dict[str, type] = {"table": str, "key": str}
NUMERIC = ("int32", "int64", "float")


class ConfigFileError(ConfigError):
    """A mistake in the configuration file (a usage error: exit status 2)."""


def load(path: Path, settings: Lookup[str, type]) -> tuple[dict[str, Any], tuple[Mapping, ...]]:
    """(settings given in the file, its mappings). `settings`: the names the file may set, with
    their types."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as error:
        raise ConfigFileError(f"cannot read configuration file {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigFileError(f"{path}: not valid TOML: {error}") from None
    except UnicodeDecodeError as error:
        raise ConfigFileError(f"{path}: not UTF-8 (bad byte at offset {error.start})") from None
    entries = data.pop("sync", None)
    values = {}
    for name, value in data.items():
        if name not in settings:
            known = ", ".join(sorted(settings))
            raise ConfigFileError(f"{path}: unknown key {name!r} (settings: {known}; [[sync]])")
        values[name] = _typed(f"{path}: {name}", value, settings[name])
    if entries is None:
        return values, ()
    if not isinstance(entries, list) or not entries:
        raise ConfigFileError(f"{path}: sync: expected one or more [[sync]] tables")
    mappings = tuple(_mapping(path, n, entry) for n, entry in enumerate(entries, 1))
    _check_unique(path, mappings)
    return values, mappings


def _typed(where: str, value: Any, kind: type) -> Any:
    if kind is float and type(value) is int:
        return float(value)
    if type(value) is not kind:
        raise ConfigFileError(
            f"{where}: expected {_kind_name(kind)}, got {_kind_name(type(value))}"
        )
    return value


def _kind_name(kind: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        bool: "true or false",
        list: "an array",
        dict: "a table",
    }.get(kind, kind.__name__)


def _table(where: str, value: Any, keys: Lookup[str, type]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ConfigFileError(f"{where}: expected a table, got {_kind_name(type(value))}")
    for key, item in value.items():
        if key not in keys:
            raise ConfigFileError(f"{where}: unknown key {key!r} (known: {', '.join(keys)})")
        _typed(f"{where}: {key}", item, keys[key])
    return value


def _mapping(path: Path, number: int, entry: Any) -> Mapping:
    origin = f"{path}, [[sync]] {number}"
    if isinstance(entry, dict) and isinstance(entry.get("table"), str):
        origin += f" (table {entry['table']})"
    if isinstance(entry, dict) and isinstance(entry.get("fields"), dict):
        raise ConfigFileError(
            f"{origin}: fields: expected an array of tables, one per field, got a table: write "
            f"fields = [{_fields_hint(entry['fields'])}]"
        )
    _table(origin, entry, ENTRY_KEYS)
    for key in REQUIRED:
        if key not in entry:
            raise ConfigFileError(f"{origin}: {key}: missing")
    for key in ("table", "key"):
        if not entry[key] or "\0" in entry[key]:
            raise ConfigFileError(f"{origin}: {key}: must be a name")
    if not COLLECTION_NAME.fullmatch(entry["collection"]):
        raise ConfigFileError(
            f"{origin}: collection: {entry['collection']!r} must be 1-128 letters, digits, "
            "'_', '-' or '.'"
        )
    if not entry["fields"]:
        raise ConfigFileError(f"{origin}: fields: at least one field")
    fields = tuple(_field(f"{origin}: fields[{i}]", item) for i, item in enumerate(entry["fields"]))
    names = [f.name for f in fields]
    if duplicate := next((n for n in names if names.count(n) > 1), None):
        raise ConfigFileError(f"{origin}: fields: {duplicate!r} is there twice")
    depends = []
    for i, item in enumerate(entry.get("depends_on", [])):
        given = _table(f"{origin}: depends_on[{i}]", item, DEPENDENCY_KEYS)
        if not given.get("table") or not given.get("key"):
            raise ConfigFileError(f"{origin}: depends_on[{i}]: needs table and key")
        depends.append(Dependency(**given))
    sorting = entry.get("default_sorting_field")
    if sorting is not None:
        field_ = next((f for f in fields if f.name == sorting), None)
        if field_ is None or field_.type not in NUMERIC or field_.optional:
            raise ConfigFileError(
                f"{origin}: default_sorting_field: {sorting!r} must name a required numeric field"
            )
    return Mapping(
        table=entry["table"],
        key=entry["key"],
        collection=entry["collection"],
        fields=fields,
        where=entry.get("where"),
        depends_on=tuple(depends),
        default_sorting_field=sorting,
        name=entry.get("name", ""),
        origin=origin,
    )


def toml_value(value: Any) -> str:
    """A value as TOML writes it: JSON's, but for strings, whose characters outside the BMP
    json.dumps writes as surrogate pairs, which TOML refuses."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return json.dumps(value)


def toml_inline_table(items: Lookup[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in items.items()) + " }"


def _fields_hint(given: dict[str, Any]) -> str:
    """`fields` as it should be written, from the table a user may try first: `name = "type"`
    pairs, or a `[sync.fields.NAME]` table each."""
    items = [
        {"name": name, **(v if isinstance(v, dict) else {"type": v})} for name, v in given.items()
    ]
    if not items or not all(type(v) in (str, bool, int) for i in items for v in i.values()):
        return '{ name = "title", type = "string" }, ...'
    return ", ".join(map(toml_inline_table, items))


def _field(where: str, item: Any) -> Field:
    if isinstance(item, dict) and isinstance(item.get("name"), str):
        where = f"{where} ({item['name']})"
    _table(where, item, FIELD_KEYS)
    for key in ("name", "type"):
        if key not in item:
            raise ConfigFileError(f"{where}: {key}: missing")
    if not IDENTIFIER.fullmatch(item["name"]) or item["name"] == "id":
        raise ConfigFileError(
            f"{where}: name: must be letters, digits and '_' (not starting with a digit), not id"
        )
    if item["type"] not in TYPES:
        raise ConfigFileError(
            f"{where}: type: unknown Typesense type {item['type']!r} (one of {', '.join(TYPES)})"
        )
    if "column" in item and "sql" in item:
        raise ConfigFileError(f"{where}: column and sql: give one or the other")
    return Field(**item)


def _check_unique(path: Path, mappings: tuple[Mapping, ...]) -> None:
    for attribute, what in (("collection", "collection"), ("name", "name")):
        seen: dict[str, Mapping] = {}
        for mapping in mappings:
            value = getattr(mapping, attribute)
            if value in seen:
                hint = "" if what == "collection" else ' (give each a name = "...")'
                raise ConfigFileError(
                    f"{mapping.origin}: {what}: {value!r} is also the {what} of "
                    f"{seen[value].origin.removeprefix(f'{path}, ')}{hint}"
                )
            seen[value] = mapping
    owners: dict[str, Mapping] = {}
    for mapping in mappings:
        for trigger in mapping.triggers():
            other = owners.setdefault(trigger.name, mapping)
            if other is not mapping:
                raise ConfigFileError(
                    f"{mapping.origin}: name: its trigger {trigger.name} is also one of "
                    f'{other.origin.removeprefix(f"{path}, ")} (give one a name = "...")'
                )
