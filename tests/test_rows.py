"""Every row struct agrees with its table: each field is a column of that name, of that Python type,
nullable exactly when the column is. A renamed, retyped or dropped column fails here, not in a poll."""

from __future__ import annotations

import types
import typing
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
import pytest
from sqlalchemy import Column, Table
from sqlalchemy.dialects.postgresql import JSONB

from service.models import Client, Clip, Delivery, DeliveryAttempt, Task, TaskEvent
from service.tracking.repository import ClaimedTask, ClipState, EventRow, TaskState
from service.webhooks.repository import AttemptOutcome, ClaimedDelivery


def table(model: Any) -> Table:
    return model.__table__  # type: ignore[no-any-return]


# (struct, the tables its columns come from, fields that are not columns: computed by the statement
# or held beside the row)
ROWS: list[tuple[type, tuple[Table, ...], frozenset[str]]] = [
    (ClipState, (table(Clip),), frozenset()),
    # last_answer: written to task_answers when there is one (NULL there is no row).
    (TaskState, (table(Task),), frozenset({"clips", "client_relay_hooks", "last_answer"})),
    (EventRow, (table(TaskEvent),), frozenset()),
    (ClaimedTask, (table(Task),), frozenset({"quiet", "lag_s"})),
    # webhook_secret: a client's, NULL for the admin's tasks (an outer join).
    (ClaimedDelivery, (table(Delivery), table(Task), table(Client)), frozenset({"lease", "webhook_secret"})),
    (AttemptOutcome, (table(DeliveryAttempt), table(Delivery)), frozenset({"lease"})),
]


def disagreements(struct: type, tables: tuple[Table, ...], computed: frozenset[str]) -> list[str]:
    hints = typing.get_type_hints(struct)
    fields = struct._fields if hasattr(struct, "_fields") else struct.__struct_fields__  # type: ignore[attr-defined]
    problems = []
    for name in fields:
        if name in computed:
            continue
        column: Column[Any] | None = next((t.c[name] for t in tables if name in t.c), None)
        if column is None:
            problems.append(f"{struct.__name__}.{name}: no such column")
            continue
        hint = hints[name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        nullable = type(None) in args
        python_types = {arg for arg in args if arg is not type(None)}
        expected = column.type.python_type
        if isinstance(column.type, JSONB):
            # A JSON object (a dict, or a struct of its own), or the relay's JSON as it came.
            python_types = {
                dict
                if isinstance(arg, type) and issubclass(arg, msgspec.Struct)
                else typing.get_origin(arg) or arg
                for arg in python_types
            }
            expected = msgspec.Raw if python_types == {msgspec.Raw} else dict
        elif expected is str and python_types == {msgspec.Raw}:
            # JSON kept as the text it came in (json_to_recordset writes a JSON value's own text).
            expected = msgspec.Raw
        if python_types != {expected}:
            problems.append(f"{struct.__name__}.{name}: {python_types} for a {expected.__name__} column")
        if nullable != bool(column.nullable):
            problems.append(
                f"{struct.__name__}.{name}: nullable {nullable}, column nullable {column.nullable}"
            )
    return problems


@pytest.mark.parametrize(("struct", "tables", "computed"), ROWS, ids=[row[0].__name__ for row in ROWS])
def test_row_struct_matches_its_table(
    struct: type, tables: tuple[Table, ...], computed: frozenset[str]
) -> None:
    assert disagreements(struct, tables, computed) == []


class _Drifted(NamedTuple):
    id: int
    task_id: int  # text in the table
    kind: str | None  # NOT NULL in the table
    renamed: str


def test_a_drifted_struct_is_caught() -> None:
    assert disagreements(_Drifted, (table(Task),), frozenset()) == [
        "_Drifted.task_id: {<class 'int'>} for a str column",
        "_Drifted.kind: nullable True, column nullable False",
        "_Drifted.renamed: no such column",
    ]


def test_timestamps_are_datetimes() -> None:
    """The one type the check above relies on SQLAlchemy for: TIMESTAMP WITH TIME ZONE is a datetime."""
    assert table(Task).c.created_at.type.python_type is datetime
