"""`cirron-otel replay PATH`: send a spool to an OTLP endpoint as the live export would have.

- Mapping: `otlp_map` (the live mapping applied to spool records; see its docstring for what
  the spool cannot carry back).
- Transport and configuration: the live ones. `otlp_transport_config` in `_config` resolves
  `--endpoint` / `--protocol` and the `OTEL_EXPORTER_OTLP_[TRACES_]*` variables (headers,
  timeout, compression, TLS) exactly as `profile()` does; `make_transport` sends.
- Errors: as the live sink (`OtlpSink._settle`): a retryable failure (UNAVAILABLE, 503, the
  collector down, ...) is retried with the same exponential backoff and jitter, waiting at
  least what the collector asked (Retry-After / RetryInfo, capped); a permanent one drops the
  request (counted, recorded); a partial success counts the rejected spans, never retried.
  Unlike a profiled program, which keeps retrying in the background, replay gives up after
  `--retry-for` seconds of failures in a row (exit 1; run it again to resume).
- Marks as metrics (on unless --no-metrics / OTEL_METRICS_EXPORTER=none, as live): the
  numeric marks' data points (`otlp_map`, the live mapping of `metric_points.h`; never the
  health metrics) go in requests of their own, after their file's traces, to the metrics
  endpoint `otlp_transport_config(..., signal="metrics")` resolves as for `profile()`. An
  endpoint that answers UNIMPLEMENTED / 404 for them (Jaeger) turns them off for the rest of
  the run, as the live `OtlpMetricsSink` does: one line on stderr, the traces go on, exit 0.
- Snapshots (`ci.watch`): each spool snapshot record goes as the live `cirron.snapshot` event
  on its epoch span (`otlp_map`); those whose span the spool does not hold, or taken after
  it closed, are counted (`unsent_snapshots`), not sent, as live.
- Resumable: each request is a (spool file, index) pair (`metrics:` before a metrics one's);
  once the collector has answered it for good its key is appended to the state file
  (fsynced), and a later run skips it. The encoding is deterministic, so a resumed run
  re-encodes the spool and sends only the rest.
  SIGINT / SIGTERM stop after the request on the wire has been answered and recorded, so an
  interrupted replay sends nothing twice; only a SIGKILL landing between the collector's
  answer and the state write re-sends that one request (at least once, as live export).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import click

from . import reader


@dataclass
class Outcome:
    requests_sent: int = 0
    spans_sent: int = 0
    requests_skipped: int = 0  # accepted by an earlier run (state file)
    spans_skipped: int = 0
    requests_rejected: int = 0
    spans_rejected: int = 0  # dropped for good: permanent errors and partial successes
    failed_attempts: int = 0
    gave_up: str | None = None  # why the run stopped early, if it did
    unsent_marks: int = 0  # on spans the spool does not hold (a run still going, or killed)
    # snapshot records on spans the spool does not hold, or taken after their span closed
    # (live adds no event then)
    unsent_snapshots: int = 0
    interrupted: bool = False
    errors: list[str] = field(default_factory=list)
    # marks as metrics: their requests and data points, counted apart from the traces'
    metric_requests_sent: int = 0
    points_sent: int = 0
    metric_requests_skipped: int = 0
    points_skipped: int = 0
    metric_requests_rejected: int = 0
    points_rejected: int = 0
    points_not_taken: int = 0  # the endpoint takes no metrics (Jaeger): not sent, not an error
    metrics_unsupported: str | None = None  # its answer, when it said so
    points_unsent: int = 0  # on spans the spool does not hold, or of a session it does not hold
    points_dropped: int = 0  # over the per-span bound, or a point larger than a request


class State:
    """The state file: a header line naming the spool and endpoint, then one JSON line per
    request answered for good. Appended and fsynced line by line (a kill loses at most the
    line being written; a torn last line is ignored)."""

    def __init__(self, path: str, header: dict[str, str]) -> None:
        self.path = path
        self.done: set[str] = set()
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
            if lines:
                first = _json_or_none(lines[0])
                if first is not None and first.get("endpoint") != header["endpoint"]:
                    raise click.ClickException(
                        f"state file {path} records a replay to {first.get('endpoint')}, not "
                        f"{header['endpoint']}: pass another --state (or delete it to start over)"
                    )
                for line in lines[1:]:
                    entry = _json_or_none(line)
                    if entry is not None and "key" in entry:
                        self.done.add(entry["key"])
        self._file: IO[str] | None = None
        self._header = header

    def record(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (kept open for the run)
            if new:
                self._write(self._header)
        self._write(entry)
        self.done.add(entry["key"])

    def _write(self, entry: dict[str, Any]) -> None:
        assert self._file is not None
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def _json_or_none(line: str) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def default_state_path(path: str, endpoint: str) -> str:
    """`<output_dir>/replay-<endpoint hash>.state`: beside the spool directory (never inside
    it), one per endpoint so replays to two collectors do not mix."""
    directory = reader.spool_dir(path) if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    parent = os.path.dirname(os.path.abspath(directory))
    digest = hashlib.sha256(endpoint.encode()).hexdigest()[:12]
    return os.path.join(parent, f"replay-{digest}.state")


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """SIGINT / SIGTERM set a flag instead of raising: the request on the wire is answered and
    recorded before the replay stops."""
    received: list[int] = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            previous[sig] = signal.signal(sig, lambda signum, frame: received.append(signum))
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def send_with_retries(
    transport: Any, data: bytes, retry_for: float, received: list[int], outcome: Outcome
) -> Any:
    """One request until it is answered for good (None, a PartialSuccess or a permanent
    SendError), or the retry budget runs out / a stop signal arrives (the last retryable
    SendError is returned)."""
    from cirron_otel.exporters.otlp import BACKOFF_BASE, BACKOFF_CAP
    from cirron_otel.exporters.otlp_transport import MAX_SERVER_DELAY, SendError

    attempt = 0
    first_failure: float | None = None
    while True:
        try:
            result = transport.send(data)
        except Exception as exc:  # as the live sender: a bug in a transport drops, never loops
            result = SendError(f"{type(exc).__name__}: {exc}", retryable=False)
        if not (isinstance(result, SendError) and result.retryable):
            return result
        outcome.failed_attempts += 1
        now = time.monotonic()
        first_failure = now if first_failure is None else first_failure
        attempt += 1
        backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(attempt - 1, 16)) * random.uniform(0.5, 1.0)
        server = min(result.retry_after, MAX_SERVER_DELAY) if result.retry_after is not None else 0.0
        wait = max(backoff, server)
        if received or now + wait - first_failure > retry_for:
            return result
        deadline = now + wait
        while not received and time.monotonic() < deadline:
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))


def _metrics_not_taken(result: Any) -> bool:
    """The endpoint takes traces only (Jaeger's own OTLP port, a collector without a metrics
    pipeline): the answers the live metrics sink treats so (`OtlpMetricsSink._settle`)."""
    from cirron_otel.exporters.otlp_transport import SendError

    return (
        isinstance(result, SendError)
        and not result.retryable
        and result.message.startswith(("gRPC UNIMPLEMENTED", "HTTP 404"))
    )


# Outcome's counters for one kind of request: (requests sent, requests rejected, items sent,
# items rejected, the item's name in the state file and messages)
_TRACE_FIELDS = ("requests_sent", "requests_rejected", "spans_sent", "spans_rejected", "spans")
_METRIC_FIELDS = (
    "metric_requests_sent",
    "metric_requests_rejected",
    "points_sent",
    "points_rejected",
    "points",
)


def _add(outcome: Outcome, counter: str, n: int) -> None:
    setattr(outcome, counter, getattr(outcome, counter) + n)


def _account(outcome: Outcome, result: Any, key: str, n: int, fields: tuple[str, ...]) -> dict[str, Any]:
    """Count one sent request's result (None: taken, a PartialSuccess, or a final rejection)
    in `outcome`; returns its state-file entry."""
    from cirron_otel.exporters.otlp_transport import PartialSuccess

    requests_sent, requests_rejected, sent, rejected_counter, unit = fields
    entry: dict[str, Any] = {"key": key, unit: n}
    if result is None:
        _add(outcome, requests_sent, 1)
        _add(outcome, sent, n)
    elif isinstance(result, PartialSuccess):
        rejected = min(result.rejected_spans, n)  # rejected_data_points, for metrics
        _add(outcome, requests_sent, 1)
        _add(outcome, sent, n - rejected)
        _add(outcome, rejected_counter, rejected)
        outcome.errors.append(f"{key}: {rejected} {unit} rejected: {result.message}")
        entry[f"rejected_{unit}"] = rejected
    else:
        _add(outcome, requests_rejected, 1)
        _add(outcome, rejected_counter, n)
        outcome.errors.append(f"{key}: rejected: {result.message} ({n} {unit} dropped)")
        entry["rejected"] = result.message
    return entry


def _send_metrics(
    part: Any,
    transport: Any,
    state: State | None,
    retry_for: float,
    received: list[int],
    outcome: Outcome,
) -> bool:
    """One metrics request, answered for good (recorded) or not; False: stop the replay."""
    from cirron_otel.exporters.otlp_transport import SendError

    if outcome.metrics_unsupported is not None:
        outcome.points_not_taken += part.points
        return True
    result = send_with_retries(transport, part.data, retry_for, received, outcome)
    if isinstance(result, SendError) and result.retryable:
        outcome.gave_up = f"{part.key}: {result.message}"
        outcome.interrupted = bool(received)
        return False
    if _metrics_not_taken(result):
        # as live: metrics off for the rest of the run, the traces go on; not recorded, so a
        # later run to an endpoint that takes them still sends them
        outcome.metrics_unsupported = result.message
        outcome.points_not_taken += part.points
        return True
    entry = _account(outcome, result, part.key, part.points, _METRIC_FIELDS)
    if state is not None:
        state.record(entry)
    return True


def run_replay(
    path: str,
    *,
    transport: Any,
    state: State | None,
    encoder_args: dict[str, Any],
    retry_for: float,
    progress: bool,
    dry_run: bool = False,
    echo: Any = click.echo,
    metrics_transport: Any = None,
) -> Outcome:
    """Send every request of the spool not yet in `state`; metrics requests (made when
    `encoder_args` has a `metrics_prefix`) go to `metrics_transport`, after their file's traces."""
    from cirron_otel.exporters.otlp_transport import SendError

    from .otlp_map import iter_parts

    outcome = Outcome()
    files = reader.list_files(path)
    bar_cm = click.progressbar(
        length=len(files),
        label="replaying",
        file=sys.stderr,
        show_pos=True,
        show_eta=True,
        item_show_func=lambda _: _rate(outcome, started),
        hidden=not progress,
    )
    started = time.monotonic()
    current_file: str | None = None
    with bar_cm as bar, _stop_on_signals() as received:
        encoder = None
        for item in iter_parts(path, encoder_args, files):
            encoder, part = item
            if part.file != current_file:
                if current_file is not None:
                    bar.update(1, current_file)
                current_file = part.file
            metrics = part.signal == "metrics"
            if dry_run:
                if metrics:
                    echo(f"{part.key}: {part.points} points, {len(part.data)} bytes")
                    outcome.metric_requests_sent += 1
                    outcome.points_sent += part.points
                    continue
                echo(f"{part.key}: {part.spans} spans, {len(part.data)} bytes")
                outcome.requests_sent += 1
                outcome.spans_sent += part.spans
                continue
            if state is not None and part.key in state.done:
                if metrics:
                    outcome.metric_requests_skipped += 1
                    outcome.points_skipped += part.points
                    continue
                outcome.requests_skipped += 1
                outcome.spans_skipped += part.spans
                continue
            if received:
                outcome.interrupted = True
                break
            if metrics:
                if not _send_metrics(part, metrics_transport, state, retry_for, received, outcome):
                    break
                continue
            result = send_with_retries(transport, part.data, retry_for, received, outcome)
            if isinstance(result, SendError) and result.retryable:
                outcome.gave_up = f"{part.key}: {result.message}"
                outcome.interrupted = bool(received)
                break
            entry = _account(outcome, result, part.key, part.spans, _TRACE_FIELDS)
            if state is not None:
                state.record(entry)
        else:
            if current_file is not None:
                bar.update(1, current_file)
            if encoder is not None:
                outcome.unsent_marks = encoder.counters.pending_marks
                counters = encoder.counters
                outcome.unsent_snapshots = counters.pending_snapshots + counters.snapshots_after_close
                outcome.points_unsent = encoder.counters.pending_points + encoder.counters.points_no_session
                outcome.points_dropped = encoder.counters.points_dropped
    return outcome


def _rate(outcome: Outcome, started: float) -> str:
    elapsed = max(time.monotonic() - started, 1e-9)
    return f"{outcome.spans_sent} spans sent, {outcome.spans_sent / elapsed:,.0f} spans/s"


@click.command()
@click.argument("path", type=click.Path(exists=True))
@click.option(
    "--endpoint",
    default=None,
    help="The collector (gRPC: http://host:4317; HTTP: the URL, or the base with /v1/traces "
    "added). Default: OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT, else localhost. The metrics go to "
    "the same collector (HTTP: /v1/metrics), else OTEL_EXPORTER_OTLP_[METRICS_]ENDPOINT.",
)
@click.option(
    "--protocol",
    type=click.Choice(["grpc", "http/protobuf"]),
    default=None,
    help="Default: OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]PROTOCOL, else grpc.",
)
@click.option("--service-name", default=None, help="service.name (default: OTEL_SERVICE_NAME, else cirron).")
@click.option(
    "--metrics/--no-metrics",
    default=None,
    help="Also send every numeric mark as an OTLP metric data point, as live export does "
    "(default: on, unless OTEL_METRICS_EXPORTER=none or only OTEL_EXPORTER_OTLP_TRACES_ENDPOINT "
    "names an endpoint).",
)
@click.option(
    "--metrics-prefix",
    default=None,
    help="Prefix of the metric names (default: CIRRON_METRICS_PREFIX, else cirron.mark.).",
)
@click.option(
    "--state",
    "state_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="The resume file (default: replay-<endpoint hash>.state beside the spool directory).",
)
@click.option("--restart", is_flag=True, help="Forget the state file: send everything again.")
@click.option(
    "--retry-for",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Give up (resumable, exit 1) after this many seconds of retryable failures in a row.",
)
@click.option("--dry-run", is_flag=True, help="Print the requests that would be sent; send nothing.")
@click.option("--json", "as_json", is_flag=True, help="The summary as one JSON object on stdout.")
@click.option(
    "--progress/--no-progress", default=None, help="A progress bar on stderr (default: on a terminal)."
)
def replay(
    path: str,
    endpoint: str | None,
    protocol: str | None,
    service_name: str | None,
    metrics: bool | None,
    metrics_prefix: str | None,
    state_path: str | None,
    restart: bool,
    retry_for: float,
    dry_run: bool,
    as_json: bool,
    progress: bool | None,
) -> None:
    """Send a spool to an OTLP endpoint with the live export's mapping, transport, configuration
    (OTEL_EXPORTER_OTLP_* headers, timeout, compression, TLS) and retry rules, so a run recorded
    offline appears in Jaeger / Tempo as if it had been exported live. Its numeric marks go as
    OTLP metric data points too (README, "Marks as metrics"), so its curves appear in
    Prometheus / Grafana; an endpoint that takes no metrics (Jaeger) gets the traces alone.

    Resumable: accepted requests are recorded in a state file; running the same command again
    sends only what is left (nothing twice). Ctrl-C stops after the request in flight.
    Exits 0 when everything was accepted, 1 when something was rejected or the collector
    stayed unreachable (run again to resume).
    """
    from cirron_otel._config import (
        DEFAULT_METRICS_PREFIX,
        ENV_METRICS_PREFIX,
        VALID_PROTOCOLS,
        metrics_default,
        otlp_protocol_from,
        otlp_transport_config,
    )

    try:
        reader.list_files(path)
    except FileNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    chosen_protocol = protocol
    protocol = otlp_protocol_from(protocol)  # the option, else the variables, as profile() reads them
    if protocol not in VALID_PROTOCOLS:
        raise click.UsageError(f"OTLP protocol must be one of {VALID_PROTOCOLS}, got {protocol!r}")
    try:
        config = otlp_transport_config(protocol, endpoint)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    encoder_args: dict[str, Any] = {"service_name": service_name}
    metrics_config = None
    if metrics if metrics is not None else metrics_default(os.environ, endpoint):
        # the metrics endpoint as profile() resolves it: OTEL_EXPORTER_OTLP_METRICS_* over the
        # generic variables, --endpoint's /v1/traces as /v1/metrics
        metrics_protocol = otlp_protocol_from(chosen_protocol, signal="metrics")
        if metrics_protocol not in VALID_PROTOCOLS:
            raise click.UsageError(
                f"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL must be one of {VALID_PROTOCOLS}, "
                f"got {metrics_protocol!r}"
            )
        try:
            metrics_config = otlp_transport_config(metrics_protocol, endpoint, signal="metrics")
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        encoder_args["metrics_prefix"] = (
            metrics_prefix or os.environ.get(ENV_METRICS_PREFIX) or DEFAULT_METRICS_PREFIX
        )
    metrics_target = f"{metrics_config.protocol} {metrics_config.endpoint}" if metrics_config else None
    if dry_run:
        try:
            outcome = run_replay(
                path,
                transport=None,
                state=None,
                encoder_args=encoder_args,
                retry_for=0,
                progress=False,
                dry_run=True,
                echo=(lambda _: None) if as_json else click.echo,
            )
        except reader.MALFORMED as exc:
            raise reader.malformed(path, exc) from exc
        if as_json:
            click.echo(
                json.dumps(_summary(outcome, f"{config.protocol} {config.endpoint}", metrics_target, None))
            )
            return
        line = (
            f"dry run: {outcome.requests_sent} requests, {outcome.spans_sent} spans would go to "
            f"{config.endpoint} ({config.protocol})"
        )
        if metrics_config is not None:
            line += (
                f"; {outcome.metric_requests_sent} metrics requests, {outcome.points_sent} points to "
                f"{metrics_config.endpoint} ({metrics_config.protocol})"
            )
        click.echo(line)
        return
    from cirron_otel.exporters.otlp_transport import make_transport

    target = f"{config.protocol} {config.endpoint}"
    state_file = state_path or default_state_path(path, target)
    if restart and os.path.exists(state_file):
        os.unlink(state_file)
    state = State(state_file, {"spool": os.path.abspath(path), "endpoint": target})
    transport = make_transport(config)
    metrics_transport = make_transport(metrics_config) if metrics_config is not None else None
    show = sys.stderr.isatty() if progress is None else progress
    try:
        outcome = run_replay(
            path,
            transport=transport,
            state=state,
            encoder_args=encoder_args,
            retry_for=retry_for,
            progress=show,
            metrics_transport=metrics_transport,
        )
    except reader.MALFORMED as exc:  # what was accepted so far is recorded: fix the spool, run again
        raise reader.malformed(path, exc) from exc
    finally:
        state.close()
        transport.shutdown()
        if metrics_transport is not None:
            metrics_transport.shutdown()
    for error in outcome.errors:
        click.echo(error, err=True)
    if outcome.unsent_marks:
        click.echo(
            f"{outcome.unsent_marks} marks attach to spans the spool does not hold (the program "
            f"still running, or killed): not sent, as live export would not have",
            err=True,
        )
    if outcome.unsent_snapshots:
        click.echo(
            f"{outcome.unsent_snapshots} snapshots attach to spans the spool does not hold, or were "
            f"taken after their span closed: not sent, as live export would not have",
            err=True,
        )
    if outcome.metrics_unsupported is not None:
        click.echo(
            f"{metrics_target} does not take OTLP metrics ({outcome.metrics_unsupported}): "
            f"{outcome.points_not_taken} points not sent as metrics, the traces went on "
            "(--no-metrics or OTEL_METRICS_EXPORTER=none leaves them out)",
            err=True,
        )
    if as_json:
        click.echo(json.dumps(_summary(outcome, target, metrics_target, state_file)))
    else:
        click.echo(
            f"sent {outcome.spans_sent} spans in {outcome.requests_sent} requests to {target}; "
            f"{outcome.spans_skipped} spans already sent ({outcome.requests_skipped} requests, "
            f"{state_file}); "
            f"{outcome.spans_rejected} rejected; {outcome.failed_attempts} failed attempts"
        )
        if metrics_target is not None:
            click.echo(
                f"sent {outcome.points_sent} metric points in {outcome.metric_requests_sent} requests "
                f"to {metrics_target}; {outcome.points_skipped} points already sent "
                f"({outcome.metric_requests_skipped} requests); {outcome.points_rejected} rejected; "
                f"{outcome.points_not_taken} not taken; {outcome.points_unsent} not sendable "
                f"(span or session not in the spool)"
            )
    if outcome.interrupted:
        click.echo("interrupted: run the same command again to resume", err=True)
        sys.exit(130)
    if outcome.gave_up:
        click.echo(
            f"gave up after {retry_for:g} s of failures: {outcome.gave_up}; run again to resume", err=True
        )
        sys.exit(1)
    if outcome.spans_rejected or outcome.points_rejected:
        sys.exit(1)


def _summary(
    outcome: Outcome, target: str, metrics_target: str | None, state_file: str | None
) -> dict[str, Any]:
    """The `--json` summary: every counter of the run, with where it went."""
    return {"endpoint": target, "metrics_endpoint": metrics_target, "state": state_file, **asdict(outcome)}
