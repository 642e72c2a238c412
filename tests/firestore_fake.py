"""An in-memory stand-in for the google-cloud-firestore `AsyncClient`, for the Firestore storage contract tests.

It is a stand-in because no Firestore emulator can run here (the emulator needs Java and a download); it covers
exactly the calls `storage.firestore` makes, with Firestore's semantics where they matter to that backend. What it
proves is that the backend's logic meets the contract, not that real Firestore accepts every query (indexes), nor
anything about `FirestoreStorage.from_settings`, which needs firebase-admin credentials and a real project: that
part is untested here.

Supported calls:
- `client.collection(path)`, `client.document(path)`, `client.collection_group(id)`, `client.batch()`,
  `client.transaction(max_attempts=, read_only=)`, `client.get_all(refs, transaction=)` (an async iterator).
- document references: `.id`, `.path`, `.parent`, `.collection(id)`, `await .get(transaction=)`,
  `await .set(data, merge=False)` (merge is deep for maps, as in Firestore), `await .create(data)` (AlreadyExists),
  `await .update(data)` (NotFound; dotted keys are field paths), `await .delete()` (no error when missing).
- collection references and queries: `.document(id=None)`, `.where(filter=FieldFilter(...))` or
  `.where(field, op, value)` with ==, <, <=, >, >=, in (at most 30 values), `.order_by(field, direction=)`,
  `.limit(n)`, `.offset(n)`, `.stream(transaction=)` (an async iterator), `await .get(transaction=)`. Firestore's
  query rules that matter: a document lacking a filtered or ordered field is not returned; comparisons only match
  values of the same type class (numbers with numbers, strings with strings...); results are ordered by the order_by
  fields, then by the inequality fields, then by document name in the last order's direction; the first
  order_by of a query with an inequality filter must be on an inequality field.
- snapshots: `.exists`, `.id`, `.reference`, `.to_dict()` (a copy, None when missing), `.get(field)`.
- write batches: `.set/.create/.update/.delete`, `await .commit()` (all or nothing).
- transactions, driven by the SDK's own `async_transactional` (it calls `_clean_up`, `_begin`, `_commit`,
  `_rollback`, `in_progress`, `_id`, `_max_attempts`, `_read_only`): writes are buffered and applied at commit, all
  or nothing; a read after a write in the same transaction raises the SDK's ReadAfterWriteError; writes in a
  read-only one raise ValueError. Transactions are serialised with one asyncio.Lock, held from begin to commit or
  rollback, and writes outside transactions wait for it too: a coarse model of the server SDKs' pessimistic locks,
  so concurrent lease acquisitions really race. A non-transactional write or a nested transaction from the task
  that holds a transaction raises RuntimeError (in Firestore it would wait on its own lock). Every call that would
  be a round trip yields to the event loop, so concurrent callers interleave between reads and commits.
- values go through the SDK's own encoder and decoder (`_helpers.encode_dict` / `decode_dict`), so types Firestore
  rejects (numpy scalars, out-of-range ints...) fail here too, and bytes, floats and None round-trip as they would.

Not modelled: indexes (any query runs; real Firestore refuses one without its index, see
`storage.firestore.FIRESTORE_INDEXES`), document size (1 MiB) and per-commit write (500) limits, retries and
transient errors, contention errors (Aborted: transactions here never conflict, they wait), transaction
timeouts, read-only transactions' snapshot reads (they are serialised like the others), server timestamps and other
sentinels, cursors, `!=`/`not-in`/`array-contains` filters, OR filters, projections, listeners.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import math
import re
import secrets
import string
from collections.abc import AsyncIterator
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud.firestore_v1 import _helpers
from google.cloud.firestore_v1.base_query import FieldFilter

_INEQUALITIES = {"<", "<=", ">", ">="}
_RESERVED_ID = re.compile(r"__.*__")


class FakeAsyncClient:
    def __init__(self) -> None:
        self._docs: dict[str, dict] = {}  # document path → its fields (as decoded from the wire format)
        self._lock = asyncio.Lock()  # held by the open transaction
        self._holder: asyncio.Task | None = None

    def collection(self, *path: str) -> FakeCollectionReference:
        parts = _split(path)
        if len(parts) % 2 != 1:
            raise ValueError(f"{'/'.join(parts)} is not a collection path")
        return FakeCollectionReference(self, parts)

    def document(self, *path: str) -> FakeDocumentReference:
        parts = _split(path)
        if len(parts) % 2 != 0:
            raise ValueError(f"{'/'.join(parts)} is not a document path")
        return FakeDocumentReference(self, parts)

    def collection_group(self, collection_id: str) -> FakeQuery:
        if "/" in collection_id:
            raise ValueError("a collection group id cannot contain '/'")
        return FakeQuery(self, group=collection_id)

    def batch(self) -> FakeWriteBatch:
        return FakeWriteBatch(self)

    def transaction(self, max_attempts: int = 5, read_only: bool = False) -> FakeTransaction:
        return FakeTransaction(self, max_attempts, read_only)

    async def get_all(self, references: list, field_paths: Any = None,
                      transaction: FakeTransaction | None = None) -> AsyncIterator[FakeDocumentSnapshot]:
        if field_paths is not None:
            raise NotImplementedError("projections")
        self._check_read(transaction)
        await _round_trip()
        for ref in {r.path: r for r in references}.values():  # one snapshot per document
            yield self._snapshot(ref)

    # -- internals ------------------------------------------------------------------------------------------------

    def _snapshot(self, ref: FakeDocumentReference) -> FakeDocumentSnapshot:
        data = self._docs.get(ref.path)
        return FakeDocumentSnapshot(ref, copy.deepcopy(data) if data is not None else None)

    def _check_read(self, transaction: FakeTransaction | None) -> None:
        if transaction is None:
            return
        if transaction._client is not self or not transaction.in_progress:
            raise ValueError("the transaction is not in progress on this client")
        if transaction._writes:
            raise _helpers.ReadAfterWriteError(_helpers.READ_AFTER_WRITE_ERROR)

    async def _commit_outside_transaction(self, writes: list[tuple]) -> None:
        if self._holder is not None and self._holder is asyncio.current_task():
            raise RuntimeError("a write outside the transaction this task holds would wait on its own lock")
        async with self._lock:
            await _round_trip()
            self._apply(writes)

    def _apply(self, writes: list[tuple]) -> None:
        """Apply the writes in order, all or none (a failed precondition raises before anything changes)."""
        staged: dict[str, dict | None] = {}
        for op, path, data, merge in writes:
            current = staged[path] if path in staged else self._docs.get(path)
            if op == "create":
                if current is not None:
                    raise gexc.AlreadyExists(f"Document already exists: {path}")
                staged[path] = data
            elif op == "set":
                staged[path] = _merge(copy.deepcopy(current), data) if merge and current is not None else data
            elif op == "update":
                if current is None:
                    raise gexc.NotFound(f"No document to update: {path}")
                staged[path] = _update(copy.deepcopy(current), data)
            else:  # delete
                staged[path] = None
        for path, doc in staged.items():
            if doc is None:
                self._docs.pop(path, None)
            else:
                self._docs[path] = doc


class FakeDocumentSnapshot:
    def __init__(self, reference: FakeDocumentReference, data: dict | None) -> None:
        self.reference = reference
        self._data = data

    @property
    def exists(self) -> bool:
        return self._data is not None

    @property
    def id(self) -> str:
        return self.reference.id

    def to_dict(self) -> dict | None:
        return copy.deepcopy(self._data)

    def get(self, field_path: str) -> Any:
        if self._data is None:
            return None
        found, value = _lookup(self._data, field_path)
        if not found:
            raise KeyError(f"no field {field_path!r} in the document")
        return copy.deepcopy(value)


class FakeDocumentReference:
    def __init__(self, client: FakeAsyncClient, parts: tuple[str, ...]) -> None:
        self._client = client
        self._parts = parts

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FakeDocumentReference) and (other._client, other._parts) == (self._client,
                                                                                             self._parts)

    def __hash__(self) -> int:
        return hash(self._parts)

    def __repr__(self) -> str:
        return f"FakeDocumentReference({self.path!r})"

    @property
    def id(self) -> str:
        return self._parts[-1]

    @property
    def path(self) -> str:
        return "/".join(self._parts)

    @property
    def parent(self) -> FakeCollectionReference:
        return FakeCollectionReference(self._client, self._parts[:-1])

    def collection(self, collection_id: str) -> FakeCollectionReference:
        return self._client.collection(*self._parts, collection_id)

    async def get(self, field_paths: Any = None, transaction: FakeTransaction | None = None) -> FakeDocumentSnapshot:
        if field_paths is not None:
            raise NotImplementedError("projections")
        self._client._check_read(transaction)
        await _round_trip()
        return self._client._snapshot(self)

    async def create(self, document_data: dict) -> None:
        await self._client._commit_outside_transaction([_write("create", self, document_data)])

    async def set(self, document_data: dict, merge: bool = False) -> None:
        await self._client._commit_outside_transaction([_write("set", self, document_data, merge)])

    async def update(self, field_updates: dict) -> None:
        await self._client._commit_outside_transaction([_write("update", self, field_updates)])

    async def delete(self) -> None:
        await self._client._commit_outside_transaction([_write("delete", self)])


class FakeQuery:
    def __init__(self, client: FakeAsyncClient, parent: tuple[str, ...] | None = None, group: str | None = None,
                 filters: tuple = (), orders: tuple = (), limit: int | None = None, offset: int = 0) -> None:
        self._client = client
        self._parent, self._group = parent, group  # a collection's path, or a collection group's id
        self._filters, self._orders, self._limit, self._offset = filters, orders, limit, offset

    def _with(self, **changes: Any) -> FakeQuery:
        fields = {"parent": self._parent, "group": self._group, "filters": self._filters, "orders": self._orders,
                  "limit": self._limit, "offset": self._offset, **changes}
        return FakeQuery(self._client, **fields)

    def where(self, field_path: str | None = None, op_string: str | None = None, value: Any = None, *,
              filter: FieldFilter | None = None) -> FakeQuery:
        if filter is not None:
            if not isinstance(filter, FieldFilter):
                raise NotImplementedError("only FieldFilter (no OR / AND composites)")
            field_path, op_string, value = filter.field_path, filter.op_string, filter.value
        if op_string not in {"==", "in", *_INEQUALITIES}:
            raise NotImplementedError(f"operator {op_string!r}")
        if op_string == "in" and (not isinstance(value, list) or not 0 < len(value) <= 30):
            raise gexc.InvalidArgument("'in' takes a non-empty list of at most 30 values")
        encoded = _roundtrip({"v": value})["v"]
        return self._with(filters=(*self._filters, (field_path, op_string, encoded)))

    def order_by(self, field_path: str, direction: str = "ASCENDING") -> FakeQuery:
        if direction not in ("ASCENDING", "DESCENDING"):
            raise ValueError(f"direction {direction!r}")
        return self._with(orders=(*self._orders, (field_path, direction)))

    def limit(self, count: int) -> FakeQuery:
        return self._with(limit=int(count))

    def offset(self, num_to_skip: int) -> FakeQuery:
        return self._with(offset=int(num_to_skip))

    async def stream(self, transaction: FakeTransaction | None = None) -> AsyncIterator[FakeDocumentSnapshot]:
        self._client._check_read(transaction)
        await _round_trip()
        for snap in self._run():
            yield snap

    async def get(self, transaction: FakeTransaction | None = None) -> list[FakeDocumentSnapshot]:
        return [snap async for snap in self.stream(transaction=transaction)]

    def _run(self) -> list[FakeDocumentSnapshot]:
        inequality = sorted({f for f, op, _ in self._filters if op in _INEQUALITIES})
        if inequality and self._orders and self._orders[0][0] not in inequality:
            raise gexc.InvalidArgument("the first order_by must be on a field with an inequality filter")
        orders = list(self._orders)
        direction = orders[-1][1] if orders else "ASCENDING"
        orders += [(f, "ASCENDING") for f in inequality if f not in {o[0] for o in orders}]
        matched = []
        for path, data in self._client._docs.items():
            parts = tuple(path.split("/"))
            in_scope = parts[:-1] == self._parent if self._parent is not None else parts[-2] == self._group
            if in_scope and all(_matches(data, *f) for f in self._filters) and \
                    all(_lookup(data, field)[0] for field, _ in orders):
                matched.append((parts, data))

        def compare(a: tuple, b: tuple) -> int:
            for field, way in [*orders, ("__name__", direction)]:
                ka = a[0] if field == "__name__" else _sort_key(_lookup(a[1], field)[1])
                kb = b[0] if field == "__name__" else _sort_key(_lookup(b[1], field)[1])
                if ka != kb:
                    return (-1 if ka < kb else 1) * (-1 if way == "DESCENDING" else 1)
            return 0

        matched.sort(key=functools.cmp_to_key(compare))
        matched = matched[self._offset:]  # Firestore skips the offset first, then applies the limit
        if self._limit is not None:
            matched = matched[:self._limit]
        return [FakeDocumentSnapshot(FakeDocumentReference(self._client, parts), copy.deepcopy(data))
                for parts, data in matched]


class FakeCollectionReference(FakeQuery):
    def __init__(self, client: FakeAsyncClient, parts: tuple[str, ...]) -> None:
        super().__init__(client, parent=parts)
        self._parts = parts

    @property
    def id(self) -> str:
        return self._parts[-1]

    @property
    def parent(self) -> FakeDocumentReference | None:
        return FakeDocumentReference(self._client, self._parts[:-1]) if len(self._parts) > 1 else None

    def document(self, document_id: str | None = None) -> FakeDocumentReference:
        if document_id is None:
            document_id = "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(20))
        return self._client.document(*self._parts, document_id)


class FakeWriteBatch:
    def __init__(self, client: FakeAsyncClient) -> None:
        self._client = client
        self._writes: list[tuple] = []

    def __len__(self) -> int:
        return len(self._writes)

    def _add(self, write: tuple) -> None:
        self._writes.append(write)

    def create(self, reference: FakeDocumentReference, document_data: dict) -> None:
        self._add(_write("create", reference, document_data))

    def set(self, reference: FakeDocumentReference, document_data: dict, merge: bool = False) -> None:
        self._add(_write("set", reference, document_data, merge))

    def update(self, reference: FakeDocumentReference, field_updates: dict) -> None:
        self._add(_write("update", reference, field_updates))

    def delete(self, reference: FakeDocumentReference) -> None:
        self._add(_write("delete", reference))

    async def commit(self) -> None:
        writes, self._writes = self._writes, []
        await self._client._commit_outside_transaction(writes)


class FakeTransaction(FakeWriteBatch):
    def __init__(self, client: FakeAsyncClient, max_attempts: int = 5, read_only: bool = False) -> None:
        super().__init__(client)
        self._max_attempts = max_attempts
        self._read_only = read_only
        self._id: bytes | None = None

    @property
    def in_progress(self) -> bool:
        return self._id is not None

    @property
    def id(self) -> bytes | None:
        return self._id

    def _add(self, write: tuple) -> None:
        if self._read_only:
            raise ValueError("Cannot perform write operation in read-only transaction.")
        if not self.in_progress:
            raise ValueError("the transaction is not in progress")
        super()._add(write)

    def _clean_up(self) -> None:
        self._writes = []
        self._id = None

    async def _begin(self, retry_id: bytes | None = None) -> None:
        if self.in_progress:
            raise ValueError("The transaction has already begun.")
        if self._client._holder is not None and self._client._holder is asyncio.current_task():
            raise RuntimeError("a transaction inside a transaction would wait on its own lock")
        await self._client._lock.acquire()
        self._client._holder = asyncio.current_task()
        self._id = secrets.token_bytes(8)
        await _round_trip()

    def _release(self) -> None:
        self._client._holder = None
        self._client._lock.release()

    async def _commit(self) -> list:
        if not self.in_progress:
            raise ValueError("The transaction has no transaction ID, so it cannot be committed.")
        await _round_trip()
        self._client._apply(self._writes)  # raises (lock kept) on a failed precondition: then _rollback
        self._clean_up()
        self._release()
        return []

    async def _rollback(self) -> None:
        if not self.in_progress:
            raise ValueError("The transaction has no transaction ID, so it cannot be rolled back.")
        self._clean_up()
        self._release()

    async def commit(self) -> None:
        raise NotImplementedError("transactions commit through async_transactional")


# -- helpers ---------------------------------------------------------------------------------------------------------


async def _round_trip() -> None:
    """Every call that would be an RPC yields to the event loop, so concurrent callers interleave as they would."""
    await asyncio.sleep(0)


def _split(path: tuple[str, ...]) -> tuple[str, ...]:
    parts = tuple(p for segment in path for p in segment.split("/"))
    for p in parts:
        if not p or p in (".", "..") or _RESERVED_ID.fullmatch(p) or len(p.encode()) > 1500:
            raise ValueError(f"invalid id {p!r} in path {'/'.join(parts)!r}")
    return parts


def _roundtrip(data: dict) -> dict:
    """Through the SDK's wire encoding: what Firestore would store and return."""
    return _helpers.decode_dict(_helpers.encode_dict(data), None)


def _write(op: str, ref: FakeDocumentReference, data: dict | None = None, merge: bool = False) -> tuple:
    if not isinstance(ref, FakeDocumentReference):
        raise TypeError("writes take a document reference")
    if op == "update" and not data:
        raise ValueError("an update needs at least one field")
    return op, ref.path, _roundtrip(data) if data is not None else None, merge


def _merge(current: dict, data: dict) -> dict:
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(current.get(key), dict):
            _merge(current[key], value)
        else:
            current[key] = value
    return current


def _update(current: dict, data: dict) -> dict:
    for field_path, value in data.items():
        *parents, last = field_path.split(".")
        node = current
        for p in parents:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[last] = value
    return current


def _lookup(data: dict, field_path: str) -> tuple[bool, Any]:
    node: Any = data
    for p in field_path.split("."):
        if not isinstance(node, dict) or p not in node:
            return False, None
        node = node[p]
    return True, node


def _type_rank(value: Any) -> int:
    """Firestore's order of value types: null, booleans, numbers, timestamps, strings, bytes, arrays, maps."""
    if value is None:
        return 0
    if isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return 2
    if hasattr(value, "timestamp"):
        return 3
    if isinstance(value, str):
        return 4
    if isinstance(value, bytes):
        return 5
    if isinstance(value, list):
        return 8
    return 9


def _sort_key(value: Any) -> tuple:
    rank = _type_rank(value)
    if rank == 2:
        return (2, 0, 0.0) if math.isnan(value) else (2, 1, value)  # NaN before every other number
    if rank == 3:
        return (3, value.timestamp())
    if rank == 8:
        return (8, tuple(_sort_key(v) for v in value))
    if rank == 9:
        return (9, tuple(sorted((k, _sort_key(v)) for k, v in value.items())))
    return (rank, value)


def _matches(data: dict, field_path: str, op: str, value: Any) -> bool:
    found, actual = _lookup(data, field_path)
    if not found:
        return False
    if op == "in":
        return any(_sort_key(actual) == _sort_key(v) for v in value)
    if _type_rank(actual) != _type_rank(value):  # no comparison across types
        return False
    a, b = _sort_key(actual), _sort_key(value)
    if op == "==":
        return a == b
    if _type_rank(actual) == 2 and (math.isnan(actual) or math.isnan(value)):
        return False  # NaN matches no range
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]
