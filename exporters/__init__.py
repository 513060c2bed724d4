"""Consumer side of cirron-otel: sinks that take collected batches somewhere.

Installed as `cirron_otel.exporters` (the directory maps onto that package name in
pyproject.toml). Each sink implements `Sink`, which the producer side owns
(`cirron_otel.sink`); the drainer thread hands every sink the same batches and never lets
one sink's failure reach another, or the application. The profiler makes sinks through the
registry in `cirron_otel.sink`, which names the factories in `factories.py`.
"""

from cirron_otel.sink import Sink, SinkStats

from .spool import SpoolSink

__all__ = ["Sink", "SinkStats", "SpoolSink"]
