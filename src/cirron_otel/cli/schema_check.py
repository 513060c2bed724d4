"""Checks a document against the spool v1 JSON Schema (`exporters/spool-v1.schema.json`).

The schema's own keywords only (the subset of draft 2020-12 it uses), so `validate` needs no
JSON Schema package at run time (jsonschema is a test dependency; the tests check that this
agrees with it). A keyword outside the subset is an error at start-up, so a schema change
that needs more cannot be silently ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

from cirron_otel.exporters.schema import spool_v1_schema

_ANNOTATIONS = frozenset({"$schema", "$id", "$defs", "title", "description"})
_SUPPORTED = (
    frozenset(
        {
            "$ref",
            "allOf",
            "const",
            "enum",
            "if",
            "then",
            "items",
            "minLength",
            "minimum",
            "not",
            "oneOf",
            "pattern",
            "properties",
            "required",
            "type",
        }
    )
    | _ANNOTATIONS
)
_TYPES: dict[str, Any] = {
    "object": dict,
    "array": list,
    "string": str,
    "null": type(None),
    "boolean": bool,
}


def _is_type(value: Any, name: str) -> bool:
    if name == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if name == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, _TYPES[name])


def _equal(a: Any, b: Any) -> bool:
    # JSON equality: True is not 1
    return type(a) is type(b) and a == b if isinstance(a, bool) or isinstance(b, bool) else a == b


class Checker:
    """Yields `(json path, message)` for each way a value breaks a (sub)schema."""

    def __init__(self, root: dict[str, Any]) -> None:
        self.root = root
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._compiled: dict[int, Callable[[Any], bool]] = {}
        self._check_keywords(root)

    def _check_keywords(self, schema: Any) -> None:
        if isinstance(schema, dict):
            unknown = set(schema) - _SUPPORTED
            if unknown:
                raise ValueError(f"spool schema uses keywords this checker lacks: {sorted(unknown)}")
            for key, sub in schema.items():
                if key in ("properties", "$defs"):
                    for s in sub.values():
                        self._check_keywords(s)
                elif key in ("allOf", "oneOf"):
                    for s in sub:
                        self._check_keywords(s)
                elif key in ("items", "not", "if", "then"):
                    self._check_keywords(sub)

    def sub(self, ref: str) -> dict[str, Any]:
        """`#/$defs/name` of the root schema."""
        node: Any = self.root
        # `<$id>#/$defs/x` and `#/$defs/x` alike (some validators rewrite refs to absolute)
        for part in ref.partition("#")[2].strip("/").split("/"):
            node = node[part]
        return node

    def errors(self, schema: dict[str, Any], value: Any, path: str = "") -> Iterator[tuple[str, str]]:
        if "$ref" in schema:
            yield from self.errors(self.sub(schema["$ref"]), value, path)
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            if not any(_is_type(value, n) for n in names):
                yield path, f"expected {' or '.join(names)}, got {_json_type(value)}"
                return  # the other keywords would only repeat it
        if "const" in schema and not _equal(value, schema["const"]):
            yield path, f"must be {schema['const']!r}, got {value!r}"
        if "enum" in schema and not any(_equal(value, e) for e in schema["enum"]):
            yield path, f"must be one of {schema['enum']}, got {value!r}"
        if isinstance(value, str):
            if "minLength" in schema and len(value) < schema["minLength"]:
                yield path, f"shorter than {schema['minLength']}"
            if "pattern" in schema and not self._pattern(schema["pattern"]).search(value):
                yield path, f"{value!r} does not match {schema['pattern']}"
        if "minimum" in schema and _is_type(value, "number") and value < schema["minimum"]:
            yield path, f"{value} is below the minimum {schema['minimum']}"
        if isinstance(value, dict):
            for key in schema.get("required", ()):
                if key not in value:
                    yield path, f"missing required field {key!r}"
            for key, sub in schema.get("properties", {}).items():
                if key in value:
                    yield from self.errors(sub, value[key], f"{path}.{key}")
        if isinstance(value, list) and "items" in schema:
            for i, item in enumerate(value):
                yield from self.errors(schema["items"], item, f"{path}[{i}]")
        for sub in schema.get("allOf", ()):
            yield from self.errors(sub, value, path)
        if "oneOf" in schema:
            matching = sum(1 for sub in schema["oneOf"] if self.valid(sub, value))
            if matching != 1:
                yield (
                    path,
                    (f"must match exactly one of {len(schema['oneOf'])} alternatives, matches {matching}"),
                )
        if "not" in schema and self.valid(schema["not"], value):
            yield path, "matches a schema it must not"
        if "if" in schema and self.valid(schema["if"], value) and "then" in schema:
            yield from self.errors(schema["then"], value, path)

    def valid(self, schema: dict[str, Any], value: Any) -> bool:
        return next(self.errors(schema, value), None) is None

    # -- the fast path: the schema compiled to closures, a yes/no per record ------------------
    # (most records are valid: `errors` above, which says why, runs only on the others)

    def compiled(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        key = id(schema)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compiled[key] = self._compile(schema)
        return fn

    def _compile(self, schema: dict[str, Any]) -> Callable[[Any], bool]:
        checks: list[Callable[[Any], bool]] = []
        if "$ref" in schema:
            target = self.sub(schema["$ref"])
            if target is schema or "$ref" in target:  # (not in this schema) a cycle: resolve late
                checks.append(lambda v: self.compiled(target)(v))
            else:
                checks.append(self.compiled(target))
        if "type" in schema:
            names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            checks.append(_type_check(names))
        if "const" in schema:
            const = schema["const"]
            checks.append(lambda v: _equal(v, const))
        if "enum" in schema:
            options = schema["enum"]
            checks.append(lambda v: any(_equal(v, e) for e in options))
        if "minLength" in schema:
            n = schema["minLength"]
            checks.append(lambda v: not isinstance(v, str) or len(v) >= n)
        if "pattern" in schema:
            search = self._pattern(schema["pattern"]).search
            checks.append(lambda v: not isinstance(v, str) or search(v) is not None)
        if "minimum" in schema:
            low = schema["minimum"]
            checks.append(lambda v: not _is_type(v, "number") or v >= low)
        required = tuple(schema.get("required", ()))
        props = [(k, self.compiled(sub)) for k, sub in schema.get("properties", {}).items()]
        if required or props:

            def obj(v: Any) -> bool:
                if not isinstance(v, dict):
                    return True
                return all(k in v for k in required) and all(fn(v[k]) for k, fn in props if k in v)

            checks.append(obj)
        if "items" in schema:
            item = self.compiled(schema["items"])
            checks.append(lambda v: not isinstance(v, list) or all(item(x) for x in v))
        checks += [self.compiled(sub) for sub in schema.get("allOf", ())]
        if "oneOf" in schema:
            alts = [self.compiled(sub) for sub in schema["oneOf"]]
            checks.append(lambda v: sum(1 for a in alts if a(v)) == 1)
        if "not" in schema:
            negated = self.compiled(schema["not"])
            checks.append(lambda v: not negated(v))
        if "if" in schema and "then" in schema:
            cond, then = self.compiled(schema["if"]), self.compiled(schema["then"])
            checks.append(lambda v: not cond(v) or then(v))
        if len(checks) == 1:
            return checks[0]
        if len(checks) == 2:
            first, second = checks
            return lambda v: first(v) and second(v)
        return lambda v: all(c(v) for c in checks)

    def _pattern(self, pattern: str) -> re.Pattern[str]:
        compiled = self._patterns.get(pattern)
        if compiled is None:
            compiled = self._patterns[pattern] = re.compile(pattern)
        return compiled


def _type_check(names: list[str]) -> Callable[[Any], bool]:
    """A fast `type` check: exact Python types (bool is not an integer in JSON)."""
    exact: set[type] = set()
    for name in names:
        exact |= {
            "integer": {int},
            "number": {int, float},
            "string": {str},
            "null": {type(None)},
            "boolean": {bool},
            "object": {dict},
            "array": {list},
        }[name]
    frozen = frozenset(exact)
    # exact types: json.loads makes no subclasses, and `type(True) is bool` keeps bools out
    return lambda v: type(v) in frozen


def _json_type(value: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _is_type(value, name):
            return name
    return type(value).__name__


@cache
def checker() -> Checker:
    # a fresh parse, not the cached dict: other validators (fastjsonschema) may rewrite it in place
    return Checker(spool_v1_schema.__wrapped__())


def batch_errors(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """Errors of a whole batch file, with paths such as `spans[3].start_ns`; records one by one
    (the top level is checked with its record lists emptied, then each record)."""
    c = checker()
    shallow = {
        k: ([] if k in ("spans", "marks", "snapshots") and isinstance(v, list) else v) for k, v in doc.items()
    }
    if not c.compiled(c.root)(shallow):
        yield from c.errors(c.root, shallow)
    for key, ref in (("spans", "#/$defs/span"), ("marks", "#/$defs/mark"), ("snapshots", "#/$defs/snapshot")):
        records = doc.get(key)
        if isinstance(records, list):
            schema = c.sub(ref)
            fast = c.compiled(schema)
            for i, record in enumerate(records):
                if fast(record):
                    continue
                for path, message in c.errors(schema, record):
                    yield f"{key}[{i}]{path}", message
