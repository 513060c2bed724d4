"""cirron-sdk's `output="log"` and `output="stdout"`: one line per closed span, as the SDK writes
it (`[cirron] epoch[0] — 1.2ms {loss=0.5000}`), to the `cirron.trace` logger at INFO or to
the current sys.stdout. Marks join their span when they arrive in the same batch (as there).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from . import _native
from ._sdk_render import by_span, span_line
from ._version import __version__
from .sink import Sink


class _LineSink(Sink):
    def export(self, batches: Sequence[_native.Batch]) -> None:
        try:
            doc = json.loads(_native.encode_spool(batches, "0" * 32, 0, __version__))
            marks = by_span(doc["marks"])
            for span in doc["spans"]:
                self._write(f"[cirron] {span_line(span, marks.get(span['id'], []))}")
            self.stats.add(exported=sum(len(b) for b in batches))
        except Exception as exc:  # telemetry never breaks the program: counted in health()
            self.stats.add(failed=sum(len(b) for b in batches))
            self.stats.error("write", exc)

    def _write(self, line: str) -> None:
        raise NotImplementedError


class LogSink(_LineSink):
    name = "log"

    def _write(self, line: str) -> None:
        logging.getLogger("cirron.trace").info(line)


class StdoutSink(_LineSink):
    name = "stdout"

    def _write(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)  # the current sys.stdout (tests swap it)
