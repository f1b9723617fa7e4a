"""Mappings: which table syncs to which collection, and how a row becomes a document.

A mapping names a table, the column holding each record's key, a collection, and fields (a
column of the same name, another column, or an SQL expression), each with a Typesense type.
Rows are validated on our side, so the index holds exactly what SQLite holds and the error in
`sync_errors` names the field: a value of the wrong type is refused, never guessed.

Each mapping compiles to SQL that SQLite answers with the finished JSON line of every valid row
(`line_sql`): the daemon's hot path only joins bytes. `document`/`line` do the same in Python:
the reference the SQL is tested against (tests/test_mapping.py, with `verdict_sql`, the same
judgement in SQL), and what judges the rows SQLite leaves out (invalid ones, text that is not
UTF-8, arrays with escapes), with the message that names the field. One value at a time, both
are in values.py.
"""

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from outbox_sync.errors import InvalidRecordError
from outbox_sync.values import (
    INT64,
    MAX_ID_BYTES,
    RawText,
    check_sql,
    decode,
    describe,
    encode,
    json_value,
    json_value_sql,
    jsonable,
    key_check_sql,
    quote_identifier,
    sql_text,
)

SCALARS = ("string", "int32", "int64", "float", "bool")
TYPES = (*SCALARS, *(f"{t}[]" for t in SCALARS))
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BUILT_IN = "the built-in mapping"  # the origin of the mapping no file declares
# A JSON path no document has (field names are identifiers): json_remove leaves it be, where
# a NULL path would make the whole line NULL.
NO_PATH = "'$.\"' || char(1) || '\"'"


# A row as `Database.read_rows` reads it: (key, SQLite's line, ()), or, for a row left to the
# Python mapper, (key, None, its raw values: the key, then one per field).
Found = tuple[Any, bytes | None, Sequence[Any]]


@dataclass(frozen=True)
class Field:
    """One field of the documents: a Typesense type, and where its value comes from."""

    name: str
    type: str
    column: str | None = None  # default: the column of the field's name
    sql: str | None = None  # an SQL expression over the table's row, instead of a column
    facet: bool = False
    sort: bool | None = None  # None: Typesense's default for the type
    optional: bool = False
    index: bool = True
    infix: bool = False
    locale: str = ""
    # Whether the value may be made by SQLite's JSON functions (an `sql` field, a VIRTUAL
    # generated column), whose subtype json_object keeps; `schema.bind` clears it for a column
    # as stored, sparing its text a copy (`json_value_sql`).
    from_json: bool = True

    @property
    def source(self) -> str:
        """The SQL that reads the value."""
        return f"({self.sql})" if self.sql else quote_identifier(self.column or self.name)

    @property
    def element(self) -> str:
        return self.type.removesuffix("[]")

    @property
    def array(self) -> bool:
        return self.type.endswith("[]")

    def schema(self) -> dict[str, Any]:
        """The field as the collection declares it (the keys we set)."""
        declared: dict[str, Any] = {"name": self.name, "type": self.type}
        for key in ("facet", "optional", "infix"):
            if getattr(self, key):
                declared[key] = True
        if self.sort is not None:
            declared["sort"] = self.sort
        if not self.index:
            declared["index"] = False
        if self.locale:
            declared["locale"] = self.locale
        return declared


@dataclass(frozen=True)
class Dependency:
    """A table whose rows feed a mapping's documents (e.g. through an `sql` field): a change of
    one of its rows re-syncs the document whose key its `key` column holds."""

    table: str
    key: str


@dataclass(frozen=True)
class Mapping:
    table: str
    key: str
    collection: str
    fields: tuple[Field, ...]
    where: str | None = None
    depends_on: tuple[Dependency, ...] = ()
    default_sorting_field: str | None = None
    name: str = ""  # how outbox rows name the mapping: the table's name unless given
    # "integer" or "text", as the key column's declared type says ("": its table was gone)
    key_kind: str = "integer"
    origin: str = BUILT_IN  # for messages: "config.toml, [[sync]] 2"

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", self.table)

    # -- the collection -------------------------------------------------------------------------

    def collection_schema(self, name: str) -> dict[str, Any]:
        """The body that creates the collection (`id` is implicit and always a string)."""
        schema: dict[str, Any] = {"name": name, "fields": [f.schema() for f in self.fields]}
        if self.default_sorting_field:
            schema["default_sorting_field"] = self.default_sorting_field
        return schema

    def against(self, declared: Sequence[dict[str, Any]]) -> tuple["Mapping", list[str]]:
        """This mapping as an existing collection's fields let it be, and what keeps them from
        taking our documents. A collection is used as it is when it differs only where values
        can still be checked against it: int32 for int64 or the reverse (the collection's
        range is the one checked), or a required field the mapping allows NULL in (a NULL is
        then a validation error naming the field)."""
        actual = {f["name"]: f for f in declared}
        problems, fields = [], []
        for wanted in self.fields:
            field_ = actual.get(wanted.name)
            if field_ is None:
                problems.append(f"field {wanted.name} is missing")
                fields.append(wanted)
                continue
            kind = str(field_.get("type"))
            compatible = {kind, wanted.type} <= {"int32", "int64"} or {
                kind,
                wanted.type,
            } <= {"int32[]", "int64[]"}
            if kind != wanted.type and not compatible:
                problems.append(f"field {wanted.name} has type={kind!r}, expected {wanted.type!r}")
            for key, value in wanted.schema().items():
                if key not in ("name", "type", "optional") and field_.get(key) != value:
                    problems.append(
                        f"field {wanted.name} has {key}={field_.get(key)!r}, expected {value!r}"
                    )
            if not field_.get("optional", False) and wanted.optional:
                wanted = replace(wanted, optional=False)  # NULL: a validation error
            elif field_.get("optional", False) and not wanted.optional:
                pass  # the collection allows more than we send
            fields.append(replace(wanted, type=kind if compatible else wanted.type))
        ours = {f.name for f in self.fields}
        for name, field_ in actual.items():
            if name not in ours and name not in (".*", "id") and not field_.get("optional"):
                problems.append(
                    f"field {name} is required by the collection but the mapping has none"
                )
        return replace(self, fields=tuple(fields)), problems

    # -- a row, in Python: the reference ---------------------------------------------------------

    def document_id(self, key: Any) -> str | None:
        """The document id of a key, or None when no document can have it."""
        try:
            return self._id(key)
        except InvalidRecordError:
            return None

    def key_of(self, doc_id: str) -> int | str:
        """The key a document id stands for (`document_id` backwards): for an integer key, the
        integer when the id is one as the daemon writes it, else the id itself, which no valid
        row can have; for a text key, the id."""
        if self.key_kind != "integer":
            return doc_id
        body = doc_id[1:] if doc_id.startswith("-") else doc_id
        if body.isascii() and body.isdigit():
            value = int(doc_id)
            if str(value) == doc_id and INT64[0] <= value <= INT64[1]:
                return value
        return doc_id

    def key_of_sql(self, doc_id: str) -> str:
        """SQL: `key_of` the text `doc_id`. CAST reads the leading number of any text and
        saturates outside 64 bits: an id that is no integer as the daemon writes it comes back
        as another text, and stays text."""
        if self.key_kind != "integer":
            return doc_id
        return (
            f"CASE WHEN CAST(CAST({doc_id} AS INTEGER) AS TEXT) = {doc_id}"
            f" THEN CAST({doc_id} AS INTEGER) ELSE {doc_id} END"
        )

    def key_problem(self, key: Any) -> str | None:
        """Why no document can have this key (None: one can)."""
        try:
            self._id(key)
        except InvalidRecordError as error:
            return str(error)
        return None

    def _id(self, key: Any) -> str:
        if self.key_kind == "integer":
            if type(key) is int:
                return str(key)
            raise InvalidRecordError(self.key, f"expected an integer, got {describe(key)}")
        if isinstance(key, str):
            text = key
        elif type(key) is RawText:
            text = decode(self.key, key)
        else:
            raise InvalidRecordError(self.key, f"expected text, got {describe(key)}")
        if not text:
            raise InvalidRecordError(self.key, "is empty, which Typesense cannot hold as an id")
        if len(text.encode()) > MAX_ID_BYTES:
            raise InvalidRecordError(
                self.key, f"is {len(text.encode())} bytes, more than the limit of {MAX_ID_BYTES}"
            )
        return text

    def document(self, row: Sequence[Any]) -> dict[str, Any]:
        """The document for a row (key, then one value per field, read raw); raises
        InvalidRecordError naming the first field that cannot be indexed."""
        document: dict[str, Any] = {"id": self._id(row[0])}
        for field_, value in zip(self.fields, row[1:], strict=True):
            if value is None:
                if not field_.optional:
                    raise InvalidRecordError(field_.name, "is NULL but the field is required")
                continue
            document[field_.name] = json_value(field_, value)
        return document

    def judge(self, found: Found) -> bytes:
        """The line of a row as `Database.read_rows` gives it: SQLite's line, or, for a row it
        left to this mapper, the line of its raw values. Raises InvalidRecordError."""
        _, line, row = found
        return line if line is not None else self.line(row)

    def line(self, row: Sequence[Any]) -> bytes:
        """The document's JSONL line, byte for byte what `line_sql` makes SQLite write."""
        return encode(self.document(row))

    def describe_row(self, row: Sequence[Any]) -> str:
        """The row as JSON for `sync_errors`, when it could not become a document."""
        names = (self.key, *(f.name for f in self.fields))
        return json.dumps(
            {name: jsonable(value) for name, value in zip(names, row, strict=True)},
            ensure_ascii=False,
        )

    # -- a row, in SQL: the hot path -------------------------------------------------------------

    def columns(self) -> str:
        """The key and the fields' values, in the order `document` takes them."""
        return ", ".join([quote_identifier(self.key), *(f.source for f in self.fields)])

    def verdict_sql(self) -> str:
        """SQL: why the row cannot be indexed, the text `document` raises (NULL: it can)."""
        key = quote_identifier(self.key)
        checks = [key_check_sql(key, self.key, self.key_kind), *(check_sql(f) for f in self.fields)]
        return "COALESCE(" + ", ".join(checks) + ")"

    def line_sql(self, *, sort_keys: bool = False) -> str:
        """SQL: the JSON line of a valid row, byte for byte what `line` writes; NULL where the
        Python mapper must judge the row: an invalid one (`verdict_sql`), and one with an array
        whose text holds an escape (json_each would keep "\\u00e9" escaped, and cut a string at
        an escaped NUL). The verdict is asked once and the line made only for a valid row: this
        is the drain's per-row work (docs/performance.md). A BLOB: Python takes it as bytes
        as it is, where TEXT would go through the connection's text factory, a Python call per
        row (~15 % of the read, measured). With `sort_keys`, the same document with its keys
        in order, as Typesense exports it (what the audit compares)."""
        key = quote_identifier(self.key)
        pairs = [("id", key if self.key_kind == "text" else f"CAST({key} AS TEXT)")]
        pairs += [(field_.name, json_value_sql(field_)) for field_ in self.fields]
        if sort_keys:
            pairs.sort(key=lambda pair: pair[0])
        line = "json_object(" + ", ".join(f"{sql_text(n)}, {v}" for n, v in pairs) + ")"
        optional = [f for f in self.fields if f.optional]
        if optional:  # an optional NULL is left out of the document, not sent as null
            dropped = ", ".join(
                f"CASE WHEN {f.source} IS NULL THEN {sql_text('$.' + json.dumps(f.name))}"
                f" ELSE {NO_PATH} END"
                for f in optional
            )
            # json_remove parses the line again: only for a row that has such a NULL
            nulls = " OR ".join(f"{f.source} IS NULL" for f in optional)
            line = f"CASE WHEN {nulls} THEN json_remove({line}, {dropped}) ELSE {line} END"
        plain = "".join(
            f" AND coalesce(instr({f.source}, '\\'), 0) = 0" for f in self.fields if f.array
        )
        return f"CAST(CASE WHEN {self.verdict_sql()} IS NULL{plain} THEN {line} END AS BLOB)"

    def select_by_keys(self, columns: str) -> str:
        """`columns` of the rows of these keys (a JSON array, the only parameter) that the
        mapping covers."""
        where = f" AND ({self.where})" if self.where else ""
        return (
            f"SELECT {columns} FROM {quote_identifier(self.table)}"
            f" WHERE {quote_identifier(self.key)} IN (SELECT value FROM json_each(?)){where}"
        )

    @cached_property
    def select_claimed(self) -> str:
        """Each outbox entry of this mapping with an id in (?, ?] (the mapping's name the third
        parameter), in id order: its id, whether it is a delete, its key, and the line of its
        record's row (`line_sql`): NULL when the mapping covers no row of that key (NULL and
        BLOB keys are not looked up), empty when the Python mapper must judge the row. The key
        of a row found is the row's own: a dependency's column may hold it as another type
        (the text '5' of an INTEGER key 5), which SQLite's comparison matches and Python's
        would not. Never another key that the column's collation takes for it (NOCASE,
        RTRIM): that is another document, and a delete must not become its upsert (the
        first `=` lets SQLite use the key's index, the second compares the bytes; an INTEGER
        key has no text to compare, and its drain is spared the second). The row is read by a
        query of its own, where every name is the table's: a column the table lacks is an
        error, not an outbox column, and no column clashes with one of ours. SQLite flattens
        it into the join: one key lookup per entry, as a plain join. Made once per mapping:
        the drain asks for it every batch (25 us to build)."""
        return self._select_claimed(self.line_sql())

    @cached_property
    def select_raw_size(self) -> str:
        """The bytes of the stored columns' values in the rows of these keys (a JSON array, the
        only parameter): about the size of the lines the Python mapper writes for them, which
        `select_claimed` reads as empty. No `sql` field and no `where`. A VIRTUAL column
        SQLite fails on for a row (`json_extract` of text that is not JSON) fails it, as it
        fails the mapper's read of the row's values: the entry is given up on with SQLite's
        words either way (`Applier._read`)."""
        sizes = " + ".join(
            f"coalesce(length(CAST({quote_identifier(f.column or f.name)} AS BLOB)), 0)"
            for f in self.fields
            if not f.sql
        )
        return (
            f"SELECT coalesce(sum({sizes or 0}), 0) FROM {quote_identifier(self.table)}"
            f" WHERE {quote_identifier(self.key)} IN (SELECT value FROM json_each(?))"
        )

    @cached_property
    def select_claimed_keys(self) -> str:
        """`select_claimed` without the lines: (id, is a delete, key), the key the row's own
        when the table has a row of it, covered or not. It runs neither the fields' `sql` nor
        `where`: no row can fail it, so it names the records of entries whose rows do."""
        return self._select_claimed(None)

    def _select_claimed(self, line_sql: str | None) -> str:
        table, key = quote_identifier(self.table), quote_identifier(self.key)
        found, line = "record.outbox_sync_key", "record.outbox_sync_line"
        exact = f" AND {found} = entry.record_key COLLATE BINARY"
        if line_sql is None:
            selected, record = "", f"SELECT {key} AS outbox_sync_key FROM {table}"
        else:
            where = f" WHERE {self.where}" if self.where else ""
            selected = f", CASE WHEN {found} IS NOT NULL THEN coalesce({line}, x'') END"
            record = (
                f"SELECT {key} AS outbox_sync_key, {line_sql} AS outbox_sync_line"
                f" FROM {table}{where}"
            )
        return (
            f"SELECT entry.id, entry.op = 'delete', coalesce({found}, entry.record_key)"
            f"{selected} FROM outbox AS entry LEFT JOIN ({record}) AS record"
            f" ON {found} = entry.record_key"
            " AND typeof(entry.record_key) IN ('integer', 'real', 'text')"
            f"{exact if self.key_kind == 'text' else ''}"
            " WHERE entry.id > ? AND entry.id <= ? AND entry.mapping = ? ORDER BY entry.id"
        )

    # -- triggers --------------------------------------------------------------------------------

    def triggers(self, uniques: dict[str, list["Unique"]] | None = None) -> list["Trigger"]:
        """The triggers that write this mapping's outbox entries, as SQLite keeps their text;
        with each table's unique constraints (`schema.unique_constraints`), the triggers that
        note the rows a REPLACE removes through them too."""
        uniques = uniques or {}
        own = self.table if self.name == self.table else f"{self.table}_{self.name}"
        made = _table_triggers(
            f"{own}_outbox",
            self.table,
            self.name,
            [self.key],
            uniques.get(self.table, []),
            dependency=False,
        )
        # one set per table: a table depended on through two columns (a friendship naming a
        # person in each) gets an entry per column from each trigger, not two triggers of a name
        keys: dict[str, list[str]] = {}
        for dep in self.depends_on:
            keys.setdefault(dep.table, []).append(dep.key)
        for table, columns in keys.items():
            made += _table_triggers(
                f"{table}_outbox_{self.name}",
                table,
                self.name,
                columns,
                uniques.get(table, []),
                dependency=True,
            )
        return made

    @property
    def tables(self) -> tuple[str, ...]:
        return (self.table, *(d.table for d in self.depends_on))


@dataclass(frozen=True)
class Trigger:
    name: str
    table: str
    sql: str  # as SQLite keeps it: without IF NOT EXISTS


# A unique constraint of a table: its columns, each with the collation it compares by and
# whether it is a generated column.
Unique = tuple[tuple[str, str, bool], ...]


def _table_triggers(
    prefix: str,
    table: str,
    mapping: str,
    keys: Sequence[str],
    uniques: Sequence[Unique],
    *,
    dependency: bool,
) -> list[Trigger]:
    """Insert, update and delete triggers on `table` writing (mapping, key, op) outbox entries,
    for each of the `keys` columns; and where `uniques` can make a REPLACE remove a row of
    another key, the triggers that note it (`_replaced`).

    On the mapping's own table a change of key is a delete of the old document and an upsert
    of the new one (a change the column's collation does not see, 'Bob' to 'bob' in a NOCASE
    column, too: they are two documents). On a table it depends on, each change is an upsert
    of the documents its old and new keys name (the daemon reads the document's rows when it
    applies the entry: a record that is gone is deleted whatever the op), and a NULL key
    names no document."""
    name, into = sql_text(mapping), "outbox (mapping, record_key, op)"

    def entry(row: str, column: str, op: str, condition: str = "") -> str:
        if dependency:
            condition += f" {'AND' if condition else 'WHERE'} {row}.{column} IS NOT NULL"
        return f"    INSERT INTO {into} SELECT {name}, {row}.{column}, '{op}'{condition};\n"

    gone = "upsert" if dependency else "delete"
    bodies = {"insert": "", "update": "", "delete": ""}
    for column in map(quote_identifier, keys):
        bodies["insert"] += entry("NEW", column, "upsert")
        bodies["update"] += entry(
            "OLD", column, gone, f" WHERE OLD.{column} IS NOT NEW.{column} COLLATE BINARY"
        ) + entry("NEW", column, "upsert")
        bodies["delete"] += entry("OLD", column, gone)
    on = quote_identifier(table)
    return [
        Trigger(
            f"{prefix}_{event}",
            table,
            f"CREATE TRIGGER {_trigger_name(f'{prefix}_{event}')} AFTER {event.upper()} ON {on}"
            f"\nBEGIN\n{body}END",
        )
        for event, body in bodies.items()
    ] + _replaced_triggers(prefix, table, name, keys, uniques, gone, dependency=dependency)


def _replaced_triggers(
    prefix: str,
    table: str,
    name: str,
    keys: Sequence[str],
    uniques: Sequence[Unique],
    op: str,
    *,
    dependency: bool,
) -> list[Trigger]:
    """A REPLACE (`INSERT OR REPLACE`, `REPLACE INTO`, `UPDATE OR REPLACE`) removes the rows it
    conflicts with and fires no delete trigger for them (unless the application's connection
    sets `PRAGMA recursive_triggers`). Where the conflict is on a unique constraint that does
    not hold the key (or holds it by another collation: `BOB` replacing `bob`), the removed row
    may be of another record. So a trigger before each insert, and each update of those
    columns, writes an entry for every row of another key the new values would conflict with:
    one index lookup per constraint. A conflict that does not end in a REPLACE (the statement
    fails, or is ignored, or updates the row: an upsert) leaves at most an entry of a row that
    is still there, which the daemon syncs as it is."""
    into, on = "outbox (mapping, record_key, op)", quote_identifier(table)
    body = ""
    columns: dict[str, bool] = {}  # each column of the constraints: whether it is generated
    for unique in uniques:
        match = " AND ".join(
            f"{quote_identifier(column)} = NEW.{quote_identifier(column)}"
            f" COLLATE {_trigger_name(collation)}"  # NOCASE, or an application's own, quoted
            for column, collation, _ in unique
        )
        for key in keys:
            if (key, "BINARY") in ((c, collation.upper()) for c, collation, _ in unique):
                continue  # the row replaced has the key of the new row, whose entry names it
            q = quote_identifier(key)
            known = f" AND {q} IS NOT NULL" if dependency else ""
            body += (
                f"    INSERT INTO {into} SELECT {name}, {q}, '{op}' FROM {on}"
                f" WHERE {match} AND {q} IS NOT NEW.{q} COLLATE BINARY{known};\n"
            )
            columns |= {column: generated for column, _, generated in unique}
    if not body:
        return []
    # A generated column changes with the columns it is made of, which UPDATE OF cannot name
    # (it fires only for columns the statement sets): then every update looks.
    of = ", ".join(map(quote_identifier, columns))
    events = {
        "insert": "INSERT",
        "update": "UPDATE" if any(columns.values()) else f"UPDATE OF {of}",
    }
    return [
        Trigger(
            f"{prefix}_{event}_replaced",
            table,
            f"CREATE TRIGGER {_trigger_name(f'{prefix}_{event}_replaced')} BEFORE {clause}"
            f" ON {on}\nBEGIN\n{body}END",
        )
        for event, clause in events.items()
    ]


def _trigger_name(name: str) -> str:
    """A trigger's name in SQL: as it is when it is a plain identifier (the text schema.sql
    and existing databases hold), quoted otherwise (a table `order-items`)."""
    return name if IDENTIFIER.fullmatch(name) else quote_identifier(name)


# -- the built-in mapping: the source document's `sequences` --------------------------------------

SEQUENCES = Mapping(
    table="sequences",
    key="id",
    collection="sequences",
    fields=(
        Field("element_type", "string", facet=True),
        Field("element_id", "int32"),
        Field("sequence_number", "int32", sort=True),
        Field("comment", "string", optional=True),
        Field("created_at", "string", sort=True),
    ),
    default_sorting_field="sequence_number",
)
# The columns read from `sequences` by the built-in mapping, in this order.
COLUMNS = ("id", *(f.name for f in SEQUENCES.fields))


def key_kind(declared_type: str) -> str:
    """A key column's kind from its declared type: INTEGER affinity, or text."""
    return "integer" if "INT" in declared_type.upper() else "text"


def field_names(mapping: Mapping) -> list[str]:
    return [f.name for f in mapping.fields]
