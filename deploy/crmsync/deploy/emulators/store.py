"""SQLite document store of the emulators: one connection, one transaction per call."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    rid INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    doc TEXT NOT NULL,
    UNIQUE (kind, id)
);
CREATE INDEX IF NOT EXISTS records_seq ON records (kind, seq);
CREATE TABLE IF NOT EXISTS record_keys (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    id TEXT NOT NULL,
    PRIMARY KEY (kind, key, value)
);
CREATE INDEX IF NOT EXISTS record_keys_id ON record_keys (kind, id);
CREATE TABLE IF NOT EXISTS tombstones (
    kind TEXT NOT NULL,
    id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (kind, id)
);
CREATE INDEX IF NOT EXISTS tombstones_seq ON tombstones (kind, seq);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class DuplicateKey(Exception):
    """Another record of the same kind already holds this alternate key value."""

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


@dataclass(frozen=True, slots=True)
class Row:
    """One stored record: its id, position (rid), version (seq) and JSON document."""

    rid: int
    id: str
    seq: int
    doc: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Change:
    """A record changed (row set) or deleted (row None) at version seq."""

    seq: int
    id: str
    row: Row | None


_quoted = json.encoder.encode_basestring_ascii  # json.dumps's own quoting of a string


def key_value(values: Sequence[Any]) -> str:
    """Canonical text of an alternate key value; strings compare case-insensitively (SQL Server)."""
    if all(isinstance(v, str) for v in values):  # json.dumps's text, without its encoder setup
        return "[" + ", ".join([_quoted(v.lower()) for v in values]) + "]"
    return json.dumps([v.lower() if isinstance(v, str) else v for v in values])


def doc_path(name: str) -> str:
    """SQL for one property of a stored document."""
    return f"json_extract(doc, '$.\"{name}\"')"


def folded(name: str) -> str:
    """The case-insensitive form of a string property; indexes are built on exactly this text."""
    return f"lower({doc_path(name)})"


def _row(r: sqlite3.Row | tuple[Any, ...]) -> Row:
    return Row(rid=r[0], id=r[1], seq=r[2], doc=orjson.loads(r[3]))


@dataclass(slots=True)
class _Prefetched:
    """What a bulk call read before its first write: rows (None: no such record), the holders
    of key values (None: none), the key values of those rows; and what it has written since,
    which is read from SQLite again."""

    rows: dict[tuple[str, str], tuple[Any, ...] | None] = field(default_factory=dict)
    holders: dict[tuple[str, str, str], str | None] = field(default_factory=dict)
    keys_of: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    written_ids: set[tuple[str, str]] = field(default_factory=set)
    written_keys: set[tuple[str, str, str]] = field(default_factory=set)

    def row(self, kind: str, id_: str) -> tuple[Any, ...] | bool | None:
        """The row as read (not parsed), None if there was none, False if not known."""
        if (kind, id_) in self.written_ids:
            return False
        return self.rows.get((kind, id_), False)

    def holder(self, kind: str, key: str, value: str) -> str | bool | None:
        if (kind, key, value) in self.written_keys:
            return False
        holder = self.holders.get((kind, key, value), False)
        if isinstance(holder, str) and (kind, holder) in self.written_ids:
            return False
        return holder


def _in_json(values: Iterable[str]) -> str:
    """A JSON array of the values, for `IN (SELECT value FROM json_each(?))`: any number of
    values in one bound parameter (json, not orjson: any str, lone surrogates too)."""
    return json.dumps(sorted(set(values)))


class Records:
    """Synchronous record operations; only ever used on the store's worker thread."""

    def __init__(self, conn: sqlite3.Connection, seq: list[int]) -> None:
        self._conn = conn
        self._seq = seq
        self._savepoints = 0
        self._prefetched: _Prefetched | None = None
        #: The version counter moved past every version a row still carries (a write rolled
        #: back, a wipe): it must be kept in `meta`, or a restart would hand out a version again.
        self.high_water_unsaved = False

    def next_seq(self) -> int:
        self._seq[0] += 1
        return self._seq[0]

    @property
    def current_seq(self) -> int:
        return self._seq[0]

    @contextlib.contextmanager
    def atomic(self) -> Iterator[None]:
        """All writes inside commit together or not at all (a SAVEPOINT)."""
        self._savepoints += 1
        name = f"sp{self._savepoints}"
        self._conn.execute(f"SAVEPOINT {name}")
        try:
            yield
        except BaseException:
            self._conn.execute(f"ROLLBACK TO {name}")
            self._conn.execute(f"RELEASE {name}")
            self.high_water_unsaved = True
            raise
        else:
            self._conn.execute(f"RELEASE {name}")
        finally:
            self._savepoints -= 1

    @contextlib.contextmanager
    def prefetched(
        self,
        ids: Mapping[str, Collection[str]],
        keys: Mapping[str, Mapping[str, Collection[str]]],
    ) -> Iterator[None]:
        """Reads in a few queries the records of these ids (kind → ids) and the holders of
        these key values (kind → key → values), and the records holding them; inside the
        block `get`, `exists` and `find_by_key` answer from what was read, except for a record
        or key value written meanwhile, which they read again. A bulk call's lookups, one
        query each instead of one per record; the answers are the same."""
        found = _Prefetched()
        wanted = {kind: set(values) for kind, values in ids.items()}
        for kind, by_key in keys.items():
            for key, values in by_key.items():
                for value in set(values):
                    found.holders[(kind, key, value)] = None
                rows = self._conn.execute(
                    "SELECT value, id FROM record_keys WHERE kind = ? AND key = ? "
                    "AND value IN (SELECT value FROM json_each(?))",
                    (kind, key, _in_json(values)),
                ).fetchall()
                for value, id_ in rows:
                    found.holders[(kind, key, value)] = id_
                    wanted.setdefault(kind, set()).add(id_)
        for kind, kind_ids in wanted.items():
            if not kind_ids:
                continue
            for id_ in kind_ids:
                found.rows[(kind, id_)] = None
                found.keys_of[(kind, id_)] = {}
            text = _in_json(kind_ids)
            for r in self._conn.execute(
                "SELECT rid, id, seq, doc FROM records WHERE kind = ? "
                "AND id IN (SELECT value FROM json_each(?))",
                (kind, text),
            ):
                found.rows[(kind, r[1])] = r
            for id_, key, value in self._conn.execute(
                "SELECT id, key, value FROM record_keys WHERE kind = ? "
                "AND id IN (SELECT value FROM json_each(?))",
                (kind, text),
            ):
                found.keys_of[(kind, id_)][key] = value
        outer, self._prefetched = self._prefetched, found
        try:
            yield
        finally:
            self._prefetched = outer

    def get(self, kind: str, id_: str) -> Row | None:
        if self._prefetched is not None:
            known = self._prefetched.row(kind, id_)
            if known is not False:
                assert not isinstance(known, bool)
                return None if known is None else _row(known)
        r = self._conn.execute(
            "SELECT rid, id, seq, doc FROM records WHERE kind = ? AND id = ?", (kind, id_)
        ).fetchone()
        return _row(r) if r else None

    def exists(self, kind: str, id_: str) -> bool:
        if self._prefetched is not None:
            known = self._prefetched.row(kind, id_)
            if known is not False:
                return known is not None
        return (
            self._conn.execute(
                "SELECT 1 FROM records WHERE kind = ? AND id = ?", (kind, id_)
            ).fetchone()
            is not None
        )

    def find_by_key(self, kind: str, key: str, value: str) -> str | None:
        if self._prefetched is not None:
            known = self._prefetched.holder(kind, key, value)
            if known is not False:
                assert not isinstance(known, bool)
                return known
        r = self._conn.execute(
            "SELECT id FROM record_keys WHERE kind = ? AND key = ? AND value = ?",
            (kind, key, value),
        ).fetchone()
        return str(r[0]) if r else None

    def save(
        self,
        kind: str,
        id_: str,
        doc: dict[str, Any],
        keys: dict[str, str],
        *,
        fresh: bool = False,
    ) -> Row:
        """Inserts or replaces a record and its alternate key values; raises DuplicateKey.
        `fresh`: the id was just made (a new UUID), so nothing holds it yet."""
        for key, value in keys.items():
            holder = self.find_by_key(kind, key, value)
            if holder is not None and holder != id_:
                raise DuplicateKey(key)
        seq = self.next_seq()
        text = orjson.dumps(doc).decode()
        prefetched = self._prefetched
        known = False if prefetched is None else prefetched.row(kind, id_)
        held = None  # the key values the record holds, if read before
        if prefetched is not None:
            if known is not False:
                held = prefetched.keys_of.get((kind, id_))
            prefetched.written_ids.add((kind, id_))
            prefetched.written_keys.update((kind, key, value) for key, value in keys.items())
        rid: int | None = None
        if isinstance(known, tuple):  # read before: updated by its rid
            rid = int(known[0])
            self._conn.execute(
                "UPDATE records SET seq = ?, doc = ? WHERE rid = ?", (seq, text, rid)
            )
        elif known is False and not fresh:  # not known: updated if it is there
            updated = self._conn.execute(
                "UPDATE records SET seq = ?, doc = ? WHERE kind = ? AND id = ? RETURNING rid",
                (seq, text, kind, id_),
            ).fetchone()
            rid = None if updated is None else int(updated[0])
        if rid is None:
            cur = self._conn.execute(
                "INSERT INTO records (kind, id, seq, doc) VALUES (?, ?, ?, ?)",
                (kind, id_, seq, text),
            )
            if not fresh:
                self._conn.execute("DELETE FROM tombstones WHERE kind = ? AND id = ?", (kind, id_))
            rid = int(cur.lastrowid or 0)
        elif held == keys:  # the key rows it holds are already these
            return Row(rid=rid, id=id_, seq=seq, doc=doc)
        else:
            self._conn.execute("DELETE FROM record_keys WHERE kind = ? AND id = ?", (kind, id_))
        if keys:
            self._conn.executemany(
                "INSERT INTO record_keys (kind, key, value, id) VALUES (?, ?, ?, ?)",
                [(kind, key, value, id_) for key, value in keys.items()],
            )
        return Row(rid=rid, id=id_, seq=seq, doc=doc)

    def delete(self, kind: str, id_: str) -> bool:
        if self._prefetched is not None:
            self._prefetched.written_ids.add((kind, id_))
        cur = self._conn.execute("DELETE FROM records WHERE kind = ? AND id = ?", (kind, id_))
        if cur.rowcount == 0:
            return False
        self._conn.execute("DELETE FROM record_keys WHERE kind = ? AND id = ?", (kind, id_))
        self._conn.execute(
            "INSERT OR REPLACE INTO tombstones (kind, id, seq) VALUES (?, ?, ?)",
            (kind, id_, self.next_seq()),
        )
        return True

    def query(
        self,
        kind: str,
        where: str = "1",
        params: Sequence[Any] = (),
        *,
        order_by: str = "rid",
        limit: int = -1,
        offset: int = 0,
    ) -> list[Row]:
        """Rows of a kind matching a SQL condition over `doc` (built by the caller from a model)."""
        sql = (
            f"SELECT rid, id, seq, doc FROM records WHERE kind = ? AND ({where}) "
            f"ORDER BY {order_by} LIMIT ? OFFSET ?"
        )
        return [_row(r) for r in self._conn.execute(sql, (kind, *params, limit, offset))]

    def count(self, kind: str, where: str = "1", params: Sequence[Any] = ()) -> int:
        sql = f"SELECT count(*) FROM records WHERE kind = ? AND ({where})"
        return int(self._conn.execute(sql, (kind, *params)).fetchone()[0])

    def changes(self, kind: str, since: int, limit: int) -> list[Change]:
        """Records changed and deleted after version `since`, oldest first."""
        rows = self._conn.execute(
            "SELECT seq, id, rid, doc FROM records WHERE kind = ? AND seq > ? "
            "UNION ALL SELECT seq, id, NULL, NULL FROM tombstones WHERE kind = ? AND seq > ? "
            "ORDER BY 1 LIMIT ?",
            (kind, since, kind, since, limit),
        ).fetchall()
        return [
            Change(
                seq=seq,
                id=id_,
                row=None if rid is None else Row(rid=rid, id=id_, seq=seq, doc=orjson.loads(doc)),
            )
            for seq, id_, rid, doc in rows
        ]

    def counts(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT kind, count(*) FROM records GROUP BY kind").fetchall()
        return {str(kind): int(n) for kind, n in rows}

    def index_key(self, kind: str, key: str, values: dict[str, str]) -> None:
        """A new alternate key over existing records (record id → key value); DuplicateKey if
        two records share a value (Dataverse's index job then fails)."""
        self._prefetched = None
        self.drop_key(kind, key)
        seen: dict[str, str] = {}
        for id_, value in values.items():
            if value in seen:
                raise DuplicateKey(key)
            seen[value] = id_
        self._conn.executemany(
            "INSERT INTO record_keys (kind, key, value, id) VALUES (?, ?, ?, ?)",
            [(kind, key, value, id_) for value, id_ in seen.items()],
        )

    def drop_key(self, kind: str, key: str) -> None:
        self._prefetched = None
        self._conn.execute("DELETE FROM record_keys WHERE kind = ? AND key = ?", (kind, key))

    def meta(self, name: str) -> str | None:
        r = self._conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        return str(r[0]) if r else None

    def set_meta(self, name: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES (?, ?)", (name, value))

    def wipe(self) -> None:
        self._prefetched = None
        for table in ("records", "record_keys", "tombstones"):
            self._conn.execute(f"DELETE FROM {table}")
        self.high_water_unsaved = True


class Store:
    """One SQLite database file on one connection; every call is one transaction.

    Calls run on the event loop's thread, one after another: an emulator's operations are a few
    indexed statements each (tens of microseconds), far less than handing each to a worker
    thread and back would cost. WAL journal, `synchronous=NORMAL`: a commit writes the log but
    does not wait for the disk.
    """

    def __init__(self, path: Path, indexes: Sequence[str] = ()) -> None:
        self.path = path
        self._indexes = list(indexes)
        self._conn: sqlite3.Connection | None = None
        self._records: Records | None = None

    async def open(self) -> None:
        self._connect()

    async def close(self) -> None:
        self._disconnect()

    async def run(self, work: Callable[[Records], T]) -> T:
        """Runs `work` in one transaction; an exception rolls it back."""
        return self.run_now(work)

    def run_now(self, work: Callable[[Records], T]) -> T:
        """`run` without the coroutine, for callers already on the loop's thread."""
        if self._conn is None or self._records is None:
            raise RuntimeError("store is not open")
        return self._transaction(work)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL survives a process crash; only an OS crash may lose the last commits.
        conn.execute("PRAGMA synchronous=NORMAL")
        # A checkpoint copies the log into the file and syncs both, on the loop's thread: every
        # 10,000 pages (≈ 40 MB), not SQLite's 1,000, which a drain of bulk writes (≈ 4 pages a
        # new record, its indexes' pages scattered) reaches every third call.
        conn.execute("PRAGMA wal_autocheckpoint=10000")
        conn.executescript(_SCHEMA)
        for statement in self._indexes:
            conn.execute(statement)
        seq = conn.execute(
            "SELECT max(m) FROM (SELECT max(seq) AS m FROM records "
            "UNION ALL SELECT max(seq) FROM tombstones)"
        ).fetchone()[0]
        # The counter also moves on rolled-back writes; a delta token may carry such a value.
        high_water = conn.execute("SELECT value FROM meta WHERE name = 'seq'").fetchone()
        self._conn = conn
        self._records = Records(conn, [max(int(seq or 0), int(high_water[0]) if high_water else 0)])

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
            self._records = None

    def _transaction(self, work: Callable[[Records], T]) -> T:
        assert self._conn is not None and self._records is not None
        records = self._records
        self._conn.execute("BEGIN")
        before = records.current_seq
        try:
            result = work(records)
        except BaseException:
            self._conn.execute("ROLLBACK")
            if records.current_seq != before:
                records.high_water_unsaved = True
            raise
        # Every version handed out is on a row (a record's or a tombstone's) unless a write was
        # rolled back or the rows wiped: only then does the counter need a write of its own.
        if records.high_water_unsaved:
            records.set_meta("seq", str(records.current_seq))
            records.high_water_unsaved = False
        self._conn.execute("COMMIT")
        return result


def signing_key(records: Records, new_key: Callable[[], str]) -> str:
    """The emulator's token-signing key, made once and kept, so tokens survive a restart."""
    key = records.meta("token_key")
    if key is None:
        key = new_key()
        records.set_meta("token_key", key)
    return key
