"""OTLP export of Cirron spans and marks, with a durable outbox that the network never stalls.

The mapping itself is native (`_native.otlp_encode`, see the README's mapping table): the
drainer's batches become one `ExportTraceServiceRequest` without building Python span
objects. Requests travel through `otlp_transport` (gRPC or HTTP/protobuf on public APIs; the
standard `OTEL_EXPORTER_OTLP_*` variables, resolved in `_config`), one attempt per send.

Durability: when an output directory is available, each request is first written to the
outbox (`<output_dir>/otlp-outbox/`, atomic and fsynced like the spool) and deleted only
once the collector has accepted it. A collector outage therefore loses nothing: requests
wait in the outbox and are sent again, oldest first, when it is back, including by the
next run of the program. Without a directory, a bounded in-memory queue plays that role.

Never stalls: failures are classified as the OTLP specification says. A retryable one
(collector down, UNAVAILABLE, 503, ...) keeps the request at the head of the queue and backs
off exponentially with jitter, or as long as the collector asked (Retry-After, RetryInfo). A
permanent one (400, INVALID_ARGUMENT, ...) drops the request, counted, and the queue moves on.
An outbox file that cannot be read or parsed is renamed `*.pb.corrupt` (counted) and skipped.
No request is larger than `max_request_bytes` (see `otlp_fit`).

Pace: with the outbox, the worker's pace is encode + disk (one group commit per export), like
the spool's, so the sink applies backpressure as the spool does: a flat-out producer is paced
rather than losing records, while the network only makes requests wait in the outbox. While
outbox writes fail it applies none (the memory queue's bound applies). Without the outbox,
never: what the worker cannot take is dropped, counted. `SENDERS` threads send at once, each
outbox file under its own lock (see `_locked_file`).

Counters (`health()["sinks"]["otlp"]`) count spans: `exported`, `dropped` and `pending`, so
that exported + dropped + pending = spans handed to the sink. Marks travel as span events
and are not counted separately.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import random
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from cirron_otel import _native
from cirron_otel._version import __version__
from cirron_otel.sink import BackgroundThread

from .otlp_encoding import SCOPE_NAME, OtlpEncodingSink
from .otlp_fit import fit_request, span_count
from .otlp_transport import (
    MAX_SERVER_DELAY,
    GrpcTransport,
    HttpTransport,
    PartialSuccess,
    SendError,
    Transport,
    make_transport,
)
from .spool_dir import Committer, SpoolDirectory, StagedFile, bytes_filler, new_batch_id, new_file_name

__all__ = [
    "GrpcTransport",
    "HttpTransport",
    "OtlpSink",
    "SendError",
    "Transport",
    "build_resource",
    "make_transport",
]

OUTBOX_DIR = "otlp-outbox"
QUARANTINE_SUFFIX = ".corrupt"
DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
# Requests in flight at once, one sender thread each: the wire's latency and the collector's
# work overlap, and gzip (done by the sending thread, without the GIL) runs in parallel.
SENDERS = 3
# How often a sender looks again at an outbox file another process is sending.
LOCK_POLL = 0.01
# Exponential backoff between retryable failures: BASE * 2**n, at most CAP, times a random
# factor in [0.5, 1] so processes sharing a collector do not retry in lockstep.
BACKOFF_BASE = 0.25
BACKOFF_CAP = 10.0


# What encoded the spans (semantic conventions, `telemetry.*`): this package's native
# encoder, not the OpenTelemetry SDK, whose reserved `telemetry.sdk.name` "opentelemetry" it
# must not claim. Set over OTEL_RESOURCE_ATTRIBUTES, as the SDK sets its own.
TELEMETRY_ATTRS: dict[str, str] = {
    "telemetry.sdk.name": SCOPE_NAME,
    "telemetry.sdk.language": "python",
    "telemetry.sdk.version": __version__,
    "telemetry.distro.name": "cirron-otel",
    "telemetry.distro.version": __version__,
}


def build_resource(service_name: str | None, rank: int) -> tuple[dict[str, Any], bytes]:
    """The process's Resource (OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME merged by the
    SDK, `telemetry.*` naming this package), as attributes and as OTLP protobuf bytes."""
    from opentelemetry.sdk.resources import Resource

    resource = Resource.create(
        {
            "process.pid": os.getpid(),
            "host.name": socket.gethostname(),
            "cirron.rank": rank,
            **TELEMETRY_ATTRS,
        }
    )
    if service_name:
        resource = resource.merge(Resource({"service.name": service_name}))
    elif str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "cirron"}))
    attrs = dict(resource.attributes)
    return attrs, encode_resource(attrs)


def encode_resource(attrs: dict[str, Any]) -> bytes:
    from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PbResource

    def any_value(v: Any) -> AnyValue:
        if isinstance(v, bool):
            return AnyValue(bool_value=v)
        if isinstance(v, int):
            return AnyValue(int_value=v)
        if isinstance(v, float):
            return AnyValue(double_value=v)
        if isinstance(v, list | tuple):
            return AnyValue(array_value=ArrayValue(values=[any_value(x) for x in v]))
        return AnyValue(string_value=str(v))

    return PbResource(
        attributes=[KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]
    ).SerializeToString()


@dataclass(eq=False)  # identity: the queue removes the very request a sender settled
class _Request:
    """A queued request: on disk (`name`) or in memory (`data`), with its span count."""

    name: str | None
    data: bytes | None
    spans: int
    sending: bool = False  # a sender thread has it: never evicted, not claimed twice
    # The size of the file this sink wrote itself: a file still of that size is sent without
    # parsing it again to check it (files from elsewhere, a previous run, are checked).
    written: int | None = None
    started: float = 0.0  # when its current attempt began (monotonic)


# Outcomes of one delivery attempt other than a SendError.
# _BUSY: another process was sending it when this sink stopped (left as it is).
_SENT, _GONE, _CORRUPT, _BUSY = "sent", "gone", "corrupt", "busy"


class OtlpSink(OtlpEncodingSink):
    """Maps batches to OTLP requests and delivers them from a durable queue.

    `export` (on the sink's worker) only encodes and queues (writes the outbox with one
    group commit per call), so its pace is set by the CPU and the disk, never by the
    network; `senders` threads of its own deliver the queue, oldest first, several requests
    in flight, backing off while the collector fails.
    """

    name = "otlp"
    outbox_subdir = OUTBOX_DIR  # a sink of other requests (metrics) keeps its own outbox

    def __init__(
        self,
        transport: Transport,
        *,
        resource: bytes,
        session_trace: Callable[[], tuple[int, int]],
        event_limit: int = 128,
        outbox_dir: str | os.PathLike[str] | None = None,
        outbox_max_bytes: int = 1_000_000_000,
        memory_queue_requests: int = 256,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        senders: int = SENDERS,
    ) -> None:
        super().__init__()
        self.transport = transport
        self.resource = resource
        self.session_trace = session_trace
        self.max_request_bytes = max_request_bytes
        self.state = _native.OtlpState(event_limit)
        self.outbox = (
            SpoolDirectory(outbox_dir, outbox_max_bytes, subdir=self.outbox_subdir, suffix=".pb")
            if outbox_dir is not None
            else None
        )
        # With the outbox, requests wait on disk: cut them at half the limit (2 MiB by default;
        # one cut after the span that crosses it rarely needs splitting). Each request is an
        # outbox file and a call, and at 1 MiB flat out the files' creation alone took ~5% of
        # this sink's worker. Without it, 1 MiB keeps the in-memory queue's typical size.
        self.request_cut_bytes = max(1 << 16, min(max_request_bytes // 2, (2 if self.outbox else 1) << 20))
        self._queue: deque[_Request] = deque()
        self._memory_limit = memory_queue_requests
        self._cv = threading.Condition()
        self._stopping = False
        self._write_failing = False  # the last outbox write failed: no backpressure meanwhile
        self._attempt = 0  # retryable failures in a row
        self._last_failure = 0.0  # when the last retryable failure was settled (monotonic)
        self._retry_at = 0.0  # own backoff: flush() may cut it short
        self._not_before = 0.0  # the collector's Retry-After / RetryInfo: always honoured
        self._retryable_failures = 0
        self._exiting = False  # at_exit(): shutdown() stops at the first retryable failure
        # One export's requests whose outbox commit (fsync, rename) runs while the next export
        # is encoded: counted as pending, queued for the senders once durable (in memory if
        # the commit fails), always before the requests of later exports.
        self._inflight: list[tuple[str, bytes, int]] | None = None
        self._committer = Committer(f"cirron-otel-{self.name}-commit")
        self._settled = threading.Event()
        self._settled.set()
        self.stats.set(
            requests_sent=0,
            requests_rejected=0,
            outbox=self.outbox.path if self.outbox else None,
            outbox_quarantined=0,
            requests_split=0,
            values_truncated=0,
            sender_errors=0,
            root_marks=0,
            unsampled_spans=0,
            events_dropped=0,
        )
        if self.outbox is not None:  # requests a previous run could not deliver, oldest first
            for name, _ in self.outbox.scan()[0]:
                self._queue.append(_Request(name, None, _spans_in(name)))
                self.stats.add(pending=_spans_in(name))
        self._senders = [
            BackgroundThread(target=self._send_loop, name=f"cirron-otel-otlp-sender-{i}")
            for i in range(max(1, senders))
        ]
        for sender in self._senders:
            sender.start()

    @property  # type: ignore[override]
    def backpressure(self) -> bool:
        """With the outbox, this sink's pace is encode + disk, like the spool's (the network
        waits on the outbox, never on us): it may pace the producer as the spool does rather
        than drop. While outbox writes fail, waiting would not help: no backpressure, and what
        cannot be kept is dropped and counted. Without the outbox, never."""
        return self.outbox is not None and not self._write_failing

    def _senders_alive(self) -> bool:
        return any(sender.is_alive() for sender in self._senders)

    # -- Sink interface ------------------------------------------------------------------

    def export(self, batches: Sequence[_native.Batch]) -> None:
        requests = self.encode(batches, self.resource)
        if requests is None:
            return
        self._update_counters()
        self._enqueue([part for request, spans in requests for part in self._fit(request, spans)])

    def retry(self) -> None:
        # The sender keeps its own backoff schedule: an idle poke must not shorten it.
        with self._cv:
            self._cv.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Try now, and wait until the queue is delivered; False as soon as an attempt fails
        in a way worth retrying (the queue then waits for the collector) or at the timeout."""
        deadline = time.monotonic() + timeout
        if not self._settled.wait(timeout):  # the last export's outbox commit (see settle)
            return False
        with self._cv:
            failures = self._retryable_failures
            self._retry_at = 0.0  # our own backoff yields to an explicit flush; Retry-After does not
            self._cv.notify_all()
            while self._queue:
                left = deadline - time.monotonic()
                if left <= 0 or self._retryable_failures != failures or not self._senders_alive():
                    return False
                self._cv.wait(min(left, 0.1))
        return True

    def before_fork(self) -> None:
        self.transport.before_fork()

    def after_fork_in_parent(self) -> None:
        self.transport.after_fork_in_parent()

    def at_exit(self) -> None:
        self._exiting = True

    def shutdown(self, timeout: float) -> None:
        """Deliver what is queued within `timeout`, retrying as usual. At process exit
        (`at_exit`), stop at once when the collector fails in a way worth retrying
        (unreachable, UNAVAILABLE, 503, ...) or has asked us to wait: a program does not wait
        for its collector to exit. What is left stays in the outbox for the next run (without
        an outbox it is lost: counted as dropped)."""
        deadline = time.monotonic() + timeout
        self.settle()  # the worker has stopped: the last export's commit is ours to finish
        with self._cv:
            failures = self._retryable_failures
            self._retry_at = 0.0  # our own backoff yields; the collector's Retry-After does not
            self._cv.notify_all()
            while self._queue and self._senders_alive():
                left = deadline - time.monotonic()
                if left <= 0 or (
                    self._exiting
                    and (self._retryable_failures != failures or self._not_before > time.monotonic())
                ):
                    break
                self._cv.wait(min(left, 0.1))
            self._stopping = True
            self._cv.notify_all()
        # An attempt on the wire ends with its answer, or when the channel is closed below.
        for sender in self._senders:
            sender.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            self.transport.shutdown()
        for sender in self._senders:
            sender.join(0.1)
        with self._cv:
            lost = [item for item in self._queue if item.name is None and not item.sending]
        if lost:
            spans = sum(item.spans for item in lost)
            self.stats.add(pending=-spans, dropped=spans)
            self.stats.error("not delivered at shutdown", f"{spans} spans (no outbox to keep them)")

    # -- the queue ------------------------------------------------------------------------

    def _fit(self, request: bytes, spans: int) -> list[tuple[bytes, int]]:
        """The request, or its pieces when it is over `max_request_bytes` (counted)."""
        if len(request) <= self.max_request_bytes:
            return [(request, spans)]
        try:
            fitted = fit_request(request, self.max_request_bytes)
        except Exception as exc:
            self._drop(spans, "oversized request could not be split", exc)
            return []
        self.stats.add(requests_split=1, values_truncated=fitted.truncated_values)
        if fitted.dropped_spans:
            self._drop(
                fitted.dropped_spans,
                "span too large",
                f"{fitted.dropped_spans} spans over {self.max_request_bytes} bytes even truncated",
            )
        return fitted.parts

    def _enqueue(self, parts: list[tuple[bytes, int]]) -> None:
        """Queue one export's requests. With the outbox they are written now and committed
        (one group commit) while the next export is encoded: the senders get them once they
        are durable, or from memory if the commit fails; `settle` finishes the last one."""
        if not parts:
            return
        self.stats.add(pending=sum(spans for _, spans in parts))
        if self.outbox is None:
            self._push([(None, data, spans) for data, spans in parts])
            return
        # consecutive times keep the export's order; the random id keeps names unique
        base = time.time_ns()
        named = [(f"{base + i:020d}-{new_batch_id()}-{n}.pb", data, n) for i, (data, n) in enumerate(parts)]
        staged: list[StagedFile] = []
        try:
            for name, data, _ in named:
                staged.append(self.outbox.stage(name, bytes_filler(data)))
        except OSError as exc:
            self.outbox.discard(staged)
            self.settle()  # the export before this one goes first
            self._write_failed(exc)
            self._push([(None, data, spans) for _, data, spans in named])
            return
        self.settle()
        self._inflight = named
        self._settled.clear()
        self._committer.submit(self.outbox, staged)

    def settle(self) -> None:
        """Hand the senders the export whose outbox commit is in flight, once it is durable
        (from memory if the commit failed). The worker calls it whenever its queue runs empty."""
        named = self._inflight
        if named is None:
            return
        outcome = self._committer.wait()
        self._inflight = None
        if outcome is None:
            self._write_failing = False
            self._push([(name, data, spans) for name, data, spans in named])
        else:
            self._write_failed(outcome)
            self._push([(None, data, spans) for _, data, spans in named])
        self._settled.set()

    def _write_failed(self, exc: BaseException) -> None:
        self._write_failing = True
        self.stats.error("outbox write failed", exc)

    def _push(self, requests: list[tuple[str | None, bytes, int]]) -> None:
        """Give requests to the senders (named: durable in the outbox; None: in memory only)."""
        with self._cv:
            for name, data, spans in requests:
                written = len(data) if name else None
                self._queue.append(_Request(name, None if name else data, spans, written=written))
            self._trim_locked()
            self._cv.notify_all()

    def _trim_locked(self) -> None:
        """Past the outbox's byte cap or the memory limit, drop the oldest (counted), never
        the request on the wire."""
        while True:
            in_memory = sum(1 for item in self._queue if item.name is None)
            over_memory = in_memory > self._memory_limit
            over_disk = self.outbox is not None and self.outbox.over_cap()
            if not (over_memory or over_disk):
                return
            victim = next(
                (item for item in self._queue if not item.sending and (item.name is None) == over_memory),
                None,
            )
            if victim is None or (over_disk and not over_memory and victim is self._queue[-1]):
                return  # keep the newest request: the cap evicts older ones only
            self._queue.remove(victim)
            if victim.name is not None:
                self._remove(victim.name)
            self.stats.add(pending=-victim.spans, dropped=victim.spans)
            self.stats.error("queue full", f"{victim.spans} spans dropped: the collector is too far behind")

    def _drop(self, spans: int, kind: str, why: BaseException | str) -> None:
        self.stats.add(dropped=spans)
        self.stats.error(kind, why)

    def _send_loop(self) -> None:
        """One of the sender threads: claims the oldest request no other sender has."""
        while True:
            with self._cv:
                while True:
                    if self._stopping:
                        return
                    now = time.monotonic()
                    due = max(self._retry_at, self._not_before)
                    head = None
                    if now >= due:
                        head = next((item for item in self._queue if not item.sending), None)
                    if head is not None:
                        break
                    # backing off: until due; otherwise until a request comes or a sender is done
                    self._cv.wait(max(0.0, due - now) if self._queue and now < due else None)
                head.sending = True
                head.started = now
            try:
                outcome = self._deliver(head)
            except Exception as exc:  # a bug here must not stop the sender: drop the head, counted
                outcome = SendError(f"{type(exc).__name__}: {exc}", retryable=False)
            try:
                self._settle(head, outcome)
            except Exception as exc:  # nor a bug in the bookkeeping: the head is tried again later
                with self._cv:
                    head.sending = False
                    self._retry_at = time.monotonic() + BACKOFF_CAP
                    self._cv.notify_all()
                self.stats.add(sender_errors=1)
                self.stats.error("sender error", exc)

    def _settle(self, head: _Request, outcome: SendError | PartialSuccess | str | list[_Request]) -> None:
        """Account for one attempt (begun at `head.started`) and pick the next retry time."""
        error: SendError | None = outcome if isinstance(outcome, SendError) else None
        with self._cv:
            head.sending = False
            if outcome == _BUSY:
                self._cv.notify_all()
                return
            now = time.monotonic()
            # An attempt begun before the last failure was known says nothing new about the
            # collector: it neither doubles the backoff again nor, if it succeeded, cancels it.
            news = head.started >= self._last_failure
            if error is not None and error.retryable:
                self.stats.add(failed=1)
                self._retryable_failures += 1
                self._last_failure = now
                if news:
                    self._attempt += 1
                # (the exponent is capped: after ~1,000 failures in a row 2**n overflows a float)
                backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(max(self._attempt, 1) - 1, 16))
                self._retry_at = now + backoff * random.uniform(0.5, 1.0)
                delay = min(error.retry_after, MAX_SERVER_DELAY) if error.retry_after is not None else 0.0
                self._not_before = max(self._not_before, now + delay)
            else:
                with contextlib.suppress(ValueError):
                    self._queue.remove(head)
                if isinstance(outcome, list):  # split: the pieces take the head's place, in order
                    self._queue.extendleft(reversed(outcome))
                elif outcome == _SENT:
                    self.stats.add(pending=-head.spans, exported=head.spans, requests_sent=1)
                elif isinstance(outcome, PartialSuccess):  # some spans refused for good
                    rejected = min(outcome.rejected_spans, head.spans)
                    self.stats.add(
                        pending=-head.spans, exported=head.spans - rejected, dropped=rejected, requests_sent=1
                    )
                elif outcome == _CORRUPT:
                    self.stats.add(pending=-head.spans, dropped=head.spans, outbox_quarantined=1)
                elif error is not None:
                    self.stats.add(pending=-head.spans, failed=1, dropped=head.spans, requests_rejected=1)
                else:  # gone: another process sharing the outbox delivered it
                    self.stats.add(pending=-head.spans)
                if news:
                    self._attempt = 0
                    self._retry_at = self._not_before = 0.0
            self._cv.notify_all()
        if outcome == _SENT or isinstance(outcome, PartialSuccess):
            _native.progress()
        if isinstance(outcome, PartialSuccess):
            self.stats.error("spans rejected", f"{outcome.rejected_spans} spans: {outcome.message}")
        elif error is not None:
            kind = "export failed" if error.retryable else "request rejected"
            self.stats.error(
                kind, error.message if error.retryable else f"{error.message} ({head.spans} spans dropped)"
            )

    def _deliver(self, head: _Request) -> SendError | PartialSuccess | str | list[_Request]:
        """One attempt at a request: for an outbox file, under its own lock (see
        `_locked_file`): read, check, send, then delete."""
        if head.name is None:
            return self._deliver_data(head, head.data)  # type: ignore[arg-type]
        with self._locked_file(head.name) as fd:
            if isinstance(fd, str):  # gone (another process delivered it), busy, or unreadable
                return fd if fd in (_GONE, _BUSY) else self._quarantine(head, fd)
            try:
                data = _read_fd(fd)
            except OSError as exc:
                return self._quarantine(head, f"unreadable: {exc}")
            problem = None if len(data) == head.written else self._check(data, head.spans)
            if problem is not None:
                return self._quarantine(head, problem)
            return self._deliver_data(head, data)

    def _deliver_data(self, head: _Request, data: bytes) -> SendError | PartialSuccess | str | list[_Request]:
        """Send `data` (the request `head`), then delete its file unless worth retrying."""
        if len(data) > self.max_request_bytes:  # from a run that did not split: split it now
            pieces = [_Request(None, part, spans) for part, spans in self._fit(data, head.spans)]
            for piece in pieces:
                piece.name = self._store(piece.data, piece.spans)  # type: ignore[arg-type]
                if piece.name is not None:
                    piece.data = None
            if head.name is not None:
                self._remove(head.name)
            # the pieces carry the spans that are still pending
            self.stats.add(pending=-(head.spans - sum(p.spans for p in pieces)))
            return pieces
        result = self.transport.send(data)
        if head.name is not None and not (isinstance(result, SendError) and result.retryable):
            self._remove(head.name)  # accepted, or never will be
        return _SENT if result is None else result

    def _store(self, data: bytes, spans: int) -> str | None:
        if self.outbox is None:
            return None
        _, _, name = new_file_name(f"-{spans}.pb")
        try:
            self.outbox.write_bytes(name, data)
        except OSError as exc:
            self.stats.error("outbox write failed", exc)
            return None
        return name

    def _quarantine(self, head: _Request, why: str) -> str:
        """Rename a bad outbox file aside (no longer `*.pb`: not re-read, not under the cap)."""
        assert head.name is not None and self.outbox is not None
        path = os.path.join(self.outbox.path, head.name)
        try:
            # A link then the outbox's own remove, so the byte count forgets the file too.
            with contextlib.suppress(FileExistsError):
                os.link(path, path + QUARANTINE_SUFFIX)
            self.outbox.remove(head.name)
        except FileNotFoundError:
            return _GONE
        except OSError as exc:  # no hard links here: rename it (the byte count catches up later)
            try:
                os.replace(path, path + QUARANTINE_SUFFIX)
            except OSError as exc2:
                why += f"; could not rename it aside: {exc}; {exc2}"
        self.stats.error(
            "corrupt outbox file quarantined", f"{head.name}: {why} ({head.spans} spans dropped)"
        )
        return _CORRUPT

    @contextlib.contextmanager
    def _locked_file(self, name: str) -> Iterator[int | str]:
        """The outbox file `name`, open and locked; or `_GONE` (another process delivered it),
        `_BUSY` (another process still had it when this sink stopped), or why it cannot be
        opened. Processes sharing an output directory (ranks, forked children) each send a
        file only under its lock and delete it before letting go, so none is delivered twice,
        while different files go out in parallel. A POSIX record lock (lockf), not flock: a
        child forked while it is held does not inherit it. lockf locks belong to the process,
        not the thread: the sender threads never claim the same request, and the file is read
        through this descriptor (closing any other descriptor of it would release the lock)."""
        path = os.path.join(self.outbox.path, name)  # type: ignore[union-attr]
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except PermissionError:  # a read-only file: sent without the lock, as before
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            yield _GONE
            return
        except OSError as exc:
            yield f"unreadable: {exc}"
            return
        try:
            # Polled, never a blocking lockf: the kernel's deadlock detection sees processes,
            # not threads, and would fail a blocking wait (EDEADLK) when two processes each
            # hold one file and wait for the other's, though different threads do each.
            while True:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except (BlockingIOError, PermissionError):  # another process is sending it
                    if os.fstat(fd).st_nlink == 0:
                        break
                    if self._stopping:
                        yield _BUSY  # still theirs: left in the outbox
                        return
                    time.sleep(LOCK_POLL)
                except OSError:  # no locking on this file system: go on, as before
                    break
            # deleted by the process that held the lock (delivered): its name is gone
            yield _GONE if os.fstat(fd).st_nlink == 0 else fd
        finally:
            os.close(fd)

    def _remove(self, name: str) -> None:
        try:
            self.outbox.remove(name)  # type: ignore[union-attr]
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.stats.error("outbox cleanup failed", exc)

    def outbox_bytes(self) -> int:
        """Bytes of requests waiting in the outbox (0 without one, or before the first write)."""
        return self.outbox.disk_bytes if self.outbox is not None else 0

    def _check(self, data: bytes, spans: int) -> str | None:
        """Why an outbox file is not the request its name says, or None when it is."""
        return _check(data, spans)

    def _update_counters(self) -> None:
        self.stats.set(
            root_marks=self.state.root_marks,
            unsampled_spans=self.state.unsampled_spans,
            events_dropped=self.state.events_dropped,
        )


def _check(data: bytes, spans: int) -> str | None:
    """Why an outbox file is not the request its name says, or None when it is."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    try:
        request = ExportTraceServiceRequest.FromString(data)
    except Exception as exc:
        return f"not an ExportTraceServiceRequest ({type(exc).__name__})"
    found = span_count(request)
    if found != spans or not found:
        return f"holds {found} spans, its name says {spans}"
    return None


def _read_fd(fd: int) -> bytes:
    """The whole file behind `fd`, read through it (see `_locked_file`)."""
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, max(size - offset, 1 << 16), offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _spans_in(name: str) -> int:
    """Outbox files are named <created_ns>-<id>-<spans>.pb."""
    try:
        return int(name.rsplit("-", 1)[1].removesuffix(".pb"))
    except (IndexError, ValueError):
        return 0
