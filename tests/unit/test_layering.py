"""The producer/consumer boundary as a rule the code keeps, not only as folders.

The producer side (the modules of `cirron_otel` itself) never imports the consumer side
(`cirron_otel.exporters`): it owns the sink interface (`cirron_otel.sink`) and makes sinks
through its registry, which names the factories as strings. Only `_config` reads the
environment. (The `cli` subpackage is a separate program over the spool and is not part of
the runtime producer side.)
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import cirron_otel.exporters
import pytest

import cirron_otel
from cirron_otel.sink import SINK_FACTORIES, Sink

PRODUCER = sorted(Path(cirron_otel.__file__).parent.glob("*.py"))
CONSUMER = sorted(Path(cirron_otel.exporters.__file__).parent.glob("*.py"))


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    package = "cirron_otel" if path.parent.name == "cirron_otel" else "cirron_otel.exporters"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


@pytest.mark.parametrize("path", PRODUCER, ids=lambda p: p.name)
def test_the_producer_side_never_imports_the_exporters(path: Path) -> None:
    imported = sorted(name for name in _imports(path) if name.startswith("cirron_otel.exporters"))
    assert imported == [], f"{path.name} imports the consumer side: {imported}"


@pytest.mark.parametrize("path", PRODUCER + CONSUMER, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_only_config_reads_the_environment(path: Path) -> None:
    if path.name == "_config.py":
        return
    tree = ast.parse(path.read_text(), str(path))
    reads = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb")
    ]
    assert reads == [], f"{path.name} reads the environment itself (lines {reads}): that is _config's job"


@pytest.mark.parametrize("kind", sorted(SINK_FACTORIES))
def test_every_registered_factory_resolves(kind: str) -> None:
    module, _, name = SINK_FACTORIES[kind].partition(":")
    assert callable(getattr(importlib.import_module(module), name))


def test_the_exporters_implement_the_producers_interface() -> None:
    from cirron_otel.exporters.otlp import OtlpSink
    from cirron_otel.exporters.provider import TracerProviderSink
    from cirron_otel.exporters.span_exporter import SpanExporterSink
    from cirron_otel.exporters.spool import SpoolSink

    for sink in (SpoolSink, OtlpSink, TracerProviderSink, SpanExporterSink):
        assert issubclass(sink, Sink)
    assert cirron_otel.exporters.Sink is Sink  # the re-export is the same class
