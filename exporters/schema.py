"""The spool v1 JSON Schema this project owns, and a strict reader for batch files."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any


@cache
def spool_v1_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one spool v1 batch file."""
    text = resources.files(__package__).joinpath("spool-v1.schema.json").read_text("utf-8")
    return json.loads(text)


def _reject_constant(token: str) -> Any:
    raise ValueError(f"not strict JSON (RFC 8259): bare {token}")


def loads_strict(data: str | bytes) -> Any:
    """Parse JSON the way the Cirron platform does: NaN / Infinity tokens are errors."""
    return json.loads(data, parse_constant=_reject_constant)
