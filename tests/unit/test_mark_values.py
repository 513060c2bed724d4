"""mark(): every value coercion rule, every error, and how each lands in the spool."""

from __future__ import annotations

import enum
import math

import numpy as np
import pytest

import cirron_otel as ci
from tests.support.helpers import run_script, spans_and_marks


def _marks(out) -> dict[str, dict]:
    ci.flush()
    _, marks = spans_and_marks(out)
    return {m["name"]: m for m in marks}


TRICKY = 'quote " back \\ nl \n tab \t ctl \x01 é 漢 🎉'


class MyFloat(float):
    pass


class MyInt(int):
    pass


class MyStr(str):
    pass


class Color(enum.IntEnum):
    RED = 3


@pytest.mark.parametrize(
    ("value", "vtype", "expected"),
    [
        (True, "bool", True),
        (False, "bool", False),
        (0, "int", 0),
        (-(2**63), "int", -(2**63)),
        (2**63 - 1, "int", 2**63 - 1),
        (0.5, "float", 0.5),
        (0.1, "float", 0.1),
        (-1e300, "float", -1e300),
        (5e-324, "float", 5e-324),
        (3.0, "float", 3.0),
        ("hello", "string", "hello"),
        ("", "string", ""),
        (TRICKY, "string", TRICKY),
        (MyFloat(1.25), "float", 1.25),
        (MyInt(7), "int", 7),
        (Color.RED, "int", 3),
        (MyStr("sub"), "string", "sub"),
        (np.float64(0.25), "float", 0.25),
        (np.float32(0.5), "float", 0.5),
        (np.float16(2.0), "float", 2.0),
        (np.int64(-5), "int", -5),
        (np.int8(5), "int", 5),
        (np.uint32(7), "int", 7),
        (np.bool_(True), "bool", True),
        (np.bool_(False), "bool", False),
    ],
)
def test_value_coercion(prof, out, value, vtype, expected):
    ci.mark("v", value)
    m = _marks(out)["v"]
    assert m["value_type"] == vtype
    assert m["value"] == expected
    assert type(m["value"]) is type(expected)
    assert "value_nonfinite" not in m


@pytest.mark.parametrize(
    ("value", "token"),
    [(math.nan, "nan"), (math.inf, "inf"), (-math.inf, "-inf"), (np.float32("nan"), "nan")],
)
def test_nonfinite_float_is_null_plus_token(prof, out, value, token):
    ci.mark("nf", value)
    m = _marks(out)["nf"]
    assert m["value_type"] == "float"
    assert m["value"] is None
    assert m["value_nonfinite"] == token


def test_float_round_trips_exactly(prof, out):
    values = [0.1 * i + 1e-7 * i * i for i in range(200)] + [1 / 3, math.pi, 1e16, 1e-5, 123456789.123]
    for i, v in enumerate(values):
        ci.mark(f"f{i}", v)
    got = _marks(out)
    for i, v in enumerate(values):
        assert got[f"f{i}"]["value"] == v


def test_string_cap_is_256_utf8_bytes_on_a_char_boundary(prof, out):
    ci.mark("ascii", "a" * 1000)
    ci.mark("multi", "é" * 200)  # 2 bytes each: 128 fit
    ci.mark("wide", "a" + "🎉" * 100)  # 1 + 4*63 = 253 fit, the 64th would cross 256
    got = _marks(out)
    assert got["ascii"]["value"] == "a" * 256
    assert got["multi"]["value"] == "é" * 128
    assert got["wide"]["value"] == "a" + "🎉" * 63
    for m in got.values():
        assert len(m["value"].encode()) <= 256


def test_lone_surrogate_does_not_cost_the_batch(prof, out):
    ci.mark("sur", "bad \ud800 value")
    ci.mark("after", 1)
    got = _marks(out)
    assert got["after"]["value"] == 1
    assert got["sur"]["value_type"] == "string"
    assert "bad" in got["sur"]["value"]


@pytest.mark.parametrize(
    ("value", "exc", "words"),
    [
        (2**63, OverflowError, "int64"),
        (-(2**63) - 1, OverflowError, "int64"),
        (None, TypeError, "NoneType"),
        (b"bytes", TypeError, "bytes"),
        ([1.0], TypeError, "list"),
        (1 + 2j, TypeError, "complex"),
        (np.array([1.0, 2.0]), TypeError, ".item()"),
        (np.array(1.0), TypeError, ".item()"),
        (np.complex64(1), TypeError, "complex64"),
    ],
)
def test_bad_values_raise_a_specific_error(prof, value, exc, words):
    with pytest.raises(exc, match=words.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")):
        ci.mark("x", value)


def test_bad_name_and_kind(prof):
    with pytest.raises(ValueError, match="non-empty"):
        ci.mark("", 1.0)
    with pytest.raises(TypeError, match="name must be a str"):
        ci.mark(3, 1.0)
    with pytest.raises(ValueError, match="kind must be 'point' or 'summary'"):
        ci.mark("x", 1.0, kind="gauge")
    with pytest.raises(TypeError):
        ci.mark("x")
    with pytest.raises(TypeError):
        ci.mark("x", 1.0, "point")


def test_summary_and_attrs(prof, out):
    with ci.scope("epoch"):
        ci.mark("acc", 0.9, kind="summary")
        ci.mark("loss", 0.3, step=120, phase="warmup")
    got = _marks(out)
    assert got["acc"]["kind"] == "summary"
    assert got["loss"]["kind"] == "point"
    assert got["loss"]["attrs"] == {"step": 120, "phase": "warmup"}
    assert got["acc"]["attrs"] == {}


class Weird:
    def __str__(self) -> str:
        return "weird!"


class Hostile:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


def test_attrs_follow_the_spool_rule(prof, out):
    cyc: list = [1]
    cyc.append(cyc)
    deep: dict = {}
    node = deep
    for _ in range(100):
        node["d"] = {}
        node = node["d"]
    ci.mark(
        "m",
        1,
        ok_int=1,
        ok_float=1.5,
        ok_str="s",
        ok_bool=True,
        ok_none=None,
        ok_list=[1, "a", [2.5]],
        ok_dict={"a": {"b": 1}},
        big=2**80,
        nan=math.nan,
        inf=math.inf,
        ninf=-math.inf,
        nested_nan=[math.nan, {"x": math.inf}],
        obj=Weird(),
        hostile=Hostile(),
        cyc=cyc,
        deep=deep,
        keys={1: "one", (2, 3): "t"},
        tup=(1, 2),
        npf=np.float32(1.5),
        npi=np.int64(4),
        arr=np.array([1, 2]),
    )
    a = _marks(out)["m"]["attrs"]
    assert a["ok_int"] == 1 and a["ok_float"] == 1.5 and a["ok_str"] == "s"
    assert a["ok_bool"] is True and a["ok_none"] is None
    assert a["ok_list"] == [1, "a", [2.5]] and a["ok_dict"] == {"a": {"b": 1}}
    assert a["big"] == 2**80
    assert (a["nan"], a["inf"], a["ninf"]) == ("nan", "inf", "-inf")
    assert a["nested_nan"] == ["nan", {"x": "inf"}]
    assert a["obj"] == "weird!"
    assert a["hostile"] == "<unserializable>"
    assert a["cyc"][0] == 1 and isinstance(a["cyc"][1], str)
    depth = 0
    node = a["deep"]
    while isinstance(node, dict):
        node = node["d"]
        depth += 1
    assert isinstance(node, str) and 10 < depth <= 40
    assert a["keys"] == {"1": "one", "(2, 3)": "t"}
    assert a["tup"] == [1, 2]
    assert a["npf"] == 1.5 and a["npi"] == 4
    assert a["arr"] == "[1 2]"


def test_numpy_is_not_imported_by_marking():
    r = run_script(
        """
        import sys, tempfile
        import cirron_otel as ci
        ci.profile(output_dir=tempfile.mkdtemp(), install_signal_handlers=False)
        class F(float): pass
        ci.mark("a", 1.0); ci.mark("b", F(2.0)); ci.mark("c", 3, x=[1])
        try:
            ci.mark("d", object())
        except TypeError:
            pass
        ci.flush()
        print("numpy" in sys.modules)
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"
