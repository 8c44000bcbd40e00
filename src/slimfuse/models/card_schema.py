"""The typed schema of ``card.json``, with limits, checked before anything is built from a card.

A card is data from a file: every field the loader relies on has a type, and sizes are
bounded (nesting depth, number of values, string lengths, shape sizes) so that a crafted
card is refused with one :class:`ArtifactError` naming the field, instead of a crash deep
inside a builder or an allocation of gigabytes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError, model_validator

from ..errors import ArtifactError
from ..limits import json_shape_problem

MAX_DEPTH = 64  # JSON nesting of a whole card; the deepest card slimfuse writes is about 20
MAX_VALUES = 2_000_000  # JSON values in a card (a quantized model's layer plan is the largest part)
MAX_NAME = 1024  # characters of a name (op, codec, arch, class name)
MAX_DIMS = 8
MAX_DIM = 2**31 - 1
MAX_CLASSES = 10_000_000

Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME)]
Dim = Annotated[StrictInt, Field(ge=0, le=MAX_DIM)]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Spec(_Open):
    arch: Name | None = None
    factory: Name | None = None
    args: dict[str, Any] = {}

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.arch is None) == (self.factory is None):
            raise ValueError("a spec names exactly one of 'arch' or 'factory'")
        return self


class TaskCard(_Open):
    name: Annotated[StrictStr, Field(max_length=MAX_NAME)]
    kind: Name
    num_classes: Annotated[StrictInt, Field(ge=0, le=MAX_CLASSES)]
    input_shape: Annotated[list[Dim], Field(max_length=MAX_DIMS)]
    class_names: Annotated[list[Annotated[StrictStr, Field(max_length=MAX_NAME)]], Field(max_length=MAX_CLASSES)] = []


class Step(_Open):
    op: Name
    params: dict[str, Any] = {}


class Storage(_Open):
    codec: Name = "dense"
    meta: dict[str, Any] = {}


class Card(_Open):
    format: StrictStr
    format_version: StrictInt
    spec: Spec
    task: TaskCard | None = None
    lineage: list[Step]
    metrics: dict[str, Any]
    storage: Storage
    weights_sha256: Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
    output: Name | Annotated[StrictInt, Field(ge=-1000, le=1000)] | None = None  # models/calling.py: set_output


def validate_card(card: dict, where) -> None:
    """Raise ArtifactError naming the first field of ``card`` that breaks the schema or its limits."""
    problem = json_shape_problem(card, max_depth=MAX_DEPTH, max_nodes=MAX_VALUES)
    if problem:
        raise ArtifactError(f"{where}: implausible card ({problem})")
    try:
        Card.model_validate(card)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(card)"
        msg = err["msg"].replace("Input should be", "must be").replace("Field required", "is missing")
        msg = msg if msg.startswith(("must", "is ")) else f"is invalid: {msg}"
        raise ArtifactError(f"{where}: field {field!r} {msg}") from None
