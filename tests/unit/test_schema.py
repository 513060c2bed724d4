"""The project's spool v1 JSON Schema: it accepts what we write and rejects what it must."""

from __future__ import annotations

import copy

import jsonschema
import pytest
from cirron_otel.exporters.schema import spool_v1_schema

import cirron_otel as ci
from tests.support.helpers import read_spool

VALIDATOR = jsonschema.Draft202012Validator(spool_v1_schema())


@pytest.fixture
def batch(prof, out) -> dict:
    with ci.scope("s", 1, a=1):
        ci.mark("f", 0.5)
        ci.mark("n", float("nan"))
        ci.mark("i", 3, kind="summary")
        ci.mark("b", True)
        ci.mark("t", "text")
    ci.flush()
    (doc,) = read_spool(out)
    return doc


def test_reference_validator_accepts_what_we_write(batch):
    VALIDATOR.validate(batch)


@pytest.mark.parametrize(
    "breakage",
    [
        lambda d: d.pop("schema_version"),
        lambda d: d.__setitem__("schema_version", 2),
        lambda d: d.__setitem__("batch_id", "XYZ"),
        lambda d: d["spans"][0].pop("mark_ids"),
        lambda d: d["spans"][0].__setitem__("parent_id", "root"),
        lambda d: d["marks"][0].__setitem__("value", "0.5"),
        lambda d: d["marks"][0].__setitem__("kind", "gauge"),
        lambda d: d["marks"][0].__setitem__("value_nonfinite", "nan"),
        lambda d: next(m for m in d["marks"] if m["name"] == "n").pop("value_nonfinite"),
        lambda d: next(m for m in d["marks"] if m["name"] == "i").__setitem__("value", 1.5),
        lambda d: d["marks"][0].__setitem__("span_id", "nope"),
    ],
)
def test_schema_rejects_broken_batches(batch, breakage):
    broken = copy.deepcopy(batch)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATOR.validate(broken)


def test_unknown_fields_are_allowed(batch):
    extended = copy.deepcopy(batch)
    extended["future"] = 1
    extended["marks"][0]["future"] = {}
    VALIDATOR.validate(extended)
