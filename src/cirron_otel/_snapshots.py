"""Weight and gradient snapshots at epoch ends: cirron-sdk 0.3.0's (its `snapshots/` package).

`capture_epoch(model, epoch)` is the one entry point: a framework hook calls it at the end of
an epoch, before it closes the epoch's span (the PyTorch hooks at each epoch rotation and at
uninstall; the Keras and Trainer hooks are to call it the same way). Per the resolved
`profile(snapshots=...)`:

- "stats" (the default): one record per parameter (`named_parameters()`, else Keras-style
  `weights`) and per gradient, with mean, std, min, max, norm and a 16-bin histogram;
- "sampled": the same and, when `random.random() < sample_rate` (the global `random`, rolled
  once per epoch: as the SDK, a seeded program samples the same epochs), the tensors written
  to `<output_dir>/snapshots/<epoch span id>/{weights,gradients}.safetensors`, the records
  then `mode="sampled"` with that file's `file://` URI in `blob_uri`;
- "full": the files at every epoch end, `mode="full"`.

The statistics are the SDK's computations (torch's reductions for torch tensors, NumPy's for
the rest), so the records are the SDK's to the last bit. Tensors are duck-typed: no framework
is imported unless the program's tensors are that framework's (a NumPy model never imports
torch). The records go to every sink that takes them (`Sink.add_snapshots`): the spool writes
them in its next file's `snapshots` array, the OpenTelemetry sinks as `cirron.snapshot` events
on the epoch span.

Never raises: a failure is counted in `health()["swallowed_errors"]` (keys `snapshot.*`),
warned about once, and what could be captured still is (the SDK logs the same failures).
Imported at the first capture only (not a hot path: once per epoch).
"""

from __future__ import annotations

import json
import math
import random
import time
import uuid
from pathlib import Path
from typing import Any

from ._warn import warn_once
from .compat import profiling_config, swallowed
from .sink import Snapshot

MODES = ("stats", "sampled", "full")
HISTOGRAM_BINS = 16
SIZE_WARN_BYTES = 100 * 1024 * 1024  # the SDK's warning threshold for one blob
SNAPSHOTS_SUBDIR = "snapshots"
WEIGHTS_FILENAME = "weights.safetensors"
GRADIENTS_FILENAME = "gradients.safetensors"
_STATS_SCALARS = ("mean", "std", "min", "max", "norm")
_DTYPE_BYTES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "int16": 2,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}

Named = list[tuple[str, Any]]


def _failed(where: str, why: BaseException | str) -> None:
    """Count a snapshot failure (`snapshot.<where>`) and warn once per kind; never raises."""
    try:
        swallowed(f"snapshot.{where}", why if isinstance(why, BaseException) else RuntimeError(why))
        text = why if isinstance(why, str) else f"{type(why).__name__}: {why}"
        warn_once(
            f"snapshot:{where}",
            f"cirron_otel: weight/gradient snapshot ({where}) failed: {text}; counted in "
            "health()['swallowed_errors'], the program goes on",
        )
    except Exception:  # pragma: no cover - counting must not fail either
        pass


# -- the entry point ----------------------------------------------------------------------------


def capture_epoch(model: Any, epoch: Any, *, grad_refs: Named | None = None) -> int:
    """Snapshot `model` (its parameters and their gradients) for the epoch span `epoch` (a
    scope still open) in the resolved snapshots mode, and hand the records to the profiler's
    sinks. `grad_refs`: `(name, grad)` pairs stashed after the last optimizer step (the PyTorch
    hooks: `zero_grad()` has cleared `.grad` by the epoch end); None reads `.grad` live.
    Returns how many records were captured. Never raises."""
    try:
        from . import _profiler

        config = profiling_config()
        mode = config.get("snapshots")
        # _last: the hooks' final epoch is captured inside shutdown(), which has already
        # cleared _active; its drainer still runs then, and delivers them
        prof = _profiler._active or _profiler._last
        if mode not in MODES or model is None or prof is None:
            return 0
        if prof.drainer is None or not prof.drainer.is_alive():
            return 0
        span_id = epoch.id
        if not span_id:  # a scope that was never recorded (depth limit, recording off)
            return 0
        # OpenTelemetry events only on a span not yet closed: a closed one may have been encoded
        # already, and an event for it would wait in the encoder for good
        span = (int(span_id[:16], 16), int(span_id[16:], 16), bool(epoch.sampled) and epoch.state == "open")
        records = capture(
            model,
            span_id,
            mode,
            sample_rate=float(config.get("sample_rate") or 0.0),
            output_dir=prof.settings.output_dir,
            grad_refs=grad_refs,
        )
        snapshots = [s for s in (_to_snapshot(r, span) for r in records) if s is not None]
        if snapshots:
            for sink in prof.sinks:
                if sink.takes_snapshots:
                    sink.add_snapshots(snapshots)
        return len(snapshots)
    except Exception as exc:
        _failed("capture", exc)
        return 0


def _to_snapshot(record: dict[str, Any], span: tuple[int, int, bool]) -> Snapshot | None:
    """The spool record (the SDK's `snapshot_to_dict`) and its JSON."""
    raw = record["stats"]
    wire = dict(record, stats=stats_to_wire(raw), shape=list(record["shape"]))
    try:
        data = json.dumps(wire, separators=(",", ":"), allow_nan=False).encode("ascii")
    except (TypeError, ValueError) as exc:  # cannot happen for what capture() makes: never a batch
        _failed("encode", exc)
        return None
    return Snapshot(wire, data, raw, span)


# -- capture (the SDK's snapshots/stats.py `capture`) ---------------------------------------------


def capture(
    model: Any,
    span_id: str,
    mode: str,
    *,
    sample_rate: float = 0.0,
    output_dir: str | Path = "./.cirron/",
    grad_refs: Named | None = None,
    include_grads: bool = True,
) -> list[dict[str, Any]]:
    """The records (stats as computed) for `model`'s weights, then its gradients; in "sampled"
    (on a hit) and "full" mode the tensors written to safetensors files and the records
    upgraded. If a pass fails partway, what was captured is kept."""
    if mode not in MODES or model is None:
        return []
    out: list[dict[str, Any]] = []
    try:
        out.extend(_weight_records(model, span_id))
        if include_grads:
            if grad_refs is not None:
                out.extend(_grad_records(grad_refs, span_id))
            else:
                out.extend(_grad_records(_live_grads(model), span_id))
    except Exception as exc:
        _failed("capture", exc)
    if mode != "stats":
        try:
            _serialize_blobs(model, span_id, mode, out, grad_refs, include_grads, sample_rate, output_dir)
        except Exception as exc:
            _failed("blob", exc)
    return out


def _weight_records(model: Any, span_id: str) -> list[dict[str, Any]]:
    ts_ns = time.time_ns()
    out = []
    for name, tensor in named_tensors(model):
        rec = _make_record(span_id, name, tensor, ts_ns)
        if rec is not None:
            out.append(rec)
    return out


def _grad_records(grads: Named, span_id: str) -> list[dict[str, Any]]:
    ts_ns = time.time_ns()
    out = []
    for name, grad in grads:
        if grad is None:
            continue
        rec = _make_record(span_id, f"{name}.grad", grad, ts_ns)
        if rec is not None:
            out.append(rec)
    return out


def _live_grads(model: Any) -> Named:
    return [(name, getattr(p, "grad", None)) for name, p in named_tensors(model)]


def named_tensors(model: Any) -> Named:
    """`(name, tensor)` for a PyTorch-style model (`named_parameters()`), else a Keras-style
    one (`weights`, each named by its `.name` or `weight_<i>`); [] for anything else."""
    named_params = getattr(model, "named_parameters", None)
    if callable(named_params):
        try:
            return [(str(name), tensor) for name, tensor in named_params()]
        except Exception as exc:
            _failed("parameters", exc)
            return []
    weights = getattr(model, "weights", None)
    if weights is not None:
        try:
            return [(str(getattr(w, "name", None) or f"weight_{i}"), w) for i, w in enumerate(weights)]
        except Exception as exc:
            _failed("parameters", exc)
            return []
    return []


def _make_record(span_id: str, tensor_name: str, tensor: Any, ts_ns: int) -> dict[str, Any] | None:
    try:
        stats = _compute_stats(tensor)
    except Exception as exc:
        _failed("stats", exc)
        return None
    if stats is None:
        _failed("read", f"{tensor_name!r} could not be read as an array; left out")
        return None
    return {
        "id": uuid.uuid4().hex,
        "span_id": span_id,
        "tensor_name": tensor_name,
        "shape": _shape_list(tensor),
        "dtype": _dtype_str(tensor),
        "mode": "stats",
        "stats": stats,
        "blob_uri": None,
        "ts_ns": ts_ns,
        "attrs": {},
    }


# -- statistics ---------------------------------------------------------------------------------


def _is_torch_tensor(tensor: Any) -> bool:
    mod = type(tensor).__module__  # no torch import to find out
    return mod == "torch" or mod.startswith("torch.")


def _compute_stats(tensor: Any) -> dict[str, Any] | None:
    """torch's reductions for a torch tensor (NumPy's if they fail), NumPy's for the rest;
    None when the tensor cannot be read at all."""
    if _is_torch_tensor(tensor):
        try:
            return _stats_torch(tensor)
        except Exception as exc:
            _failed("torch_stats", exc)
    arr = _to_numpy(tensor)
    if arr is None:
        return None
    return _stats_numpy(arr)


def _to_numpy(tensor: Any, *, for_file: bool = False) -> Any:
    """The tensor as a NumPy array, tried as torch-like `detach().cpu().numpy()`, then
    `.numpy()`, then `np.asarray`; None if it cannot be read. The SDK's two variants: for the
    statistics a failure of a way that applies ends the attempt; for a file (`for_file`, a
    contiguous array) the next way is tried, and only the last one's failure counts."""
    import numpy as np

    convert = np.ascontiguousarray if for_file else np.asarray
    detach = getattr(tensor, "detach", None)
    if callable(detach):
        try:
            t = detach()
            cpu = getattr(t, "cpu", None)
            if callable(cpu):
                t = cpu()
            to_np = getattr(t, "numpy", None)
            if callable(to_np):
                return convert(to_np())
        except Exception:
            if not for_file:
                return None
    to_np = getattr(tensor, "numpy", None)
    if callable(to_np):
        try:
            return convert(to_np())
        except Exception:
            if not for_file:
                return None
    try:
        return convert(tensor)
    except Exception as exc:
        if for_file:
            _failed("blob_tensor", exc)
        return None


def _dtype_str(tensor: Any) -> str:
    dtype = getattr(tensor, "dtype", None)
    if dtype is None:
        return "unknown"
    name = getattr(dtype, "name", None)
    if isinstance(name, str):
        return name
    return str(dtype).removeprefix("torch.").removeprefix("tf.")


def _shape_list(tensor: Any) -> list[int]:
    shape = getattr(tensor, "shape", ())
    try:
        return [int(d) for d in shape]
    except Exception:
        return []


def _empty_stats() -> dict[str, Any]:
    return {
        "mean": 0.0,
        "std": 0.0,
        "min": 0.0,
        "max": 0.0,
        "norm": 0.0,
        "histogram": {"bins": [0.0] * (HISTOGRAM_BINS + 1), "counts": [0] * HISTOGRAM_BINS},
    }


def _histogram_range(lo: float, hi: float) -> tuple[float, float] | None:
    """None for a non-finite extreme (no histogram then); a constant tensor's range widened
    by 1.0 so its one bin is not empty."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return None
    if lo == hi:
        return (lo, lo + 1.0)
    return (lo, hi)


def _with_finite_subset(
    stats: dict[str, Any], numel: int, finite: Any, count: int, kernel: Any
) -> dict[str, Any]:
    """A tensor holding NaN or inf: `nonfinite_count`, and the statistics of its finite
    elements under `finite`."""
    stats["nonfinite_count"] = numel - count
    stats["finite"] = {"count": count, **kernel(finite)} if count else {"count": 0}
    return stats


def _stats_torch(tensor: Any) -> dict[str, Any]:
    import torch

    t = tensor.detach()
    if not t.is_floating_point():
        t = t.to(torch.float32)
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return _empty_stats()
    lo_t, hi_t = torch.aminmax(flat)
    mean_t = flat.mean()
    std_t = flat.std(unbiased=False)
    target = mean_t.dtype
    mean, std, lo, hi = torch.stack([mean_t, std_t, lo_t.to(target), hi_t.to(target)], dim=0).tolist()
    numel = flat.numel()
    norm = (numel * (mean * mean + std * std)) ** 0.5  # the SDK's: from mean and std, one pass less
    base = {"mean": mean, "std": std, "min": lo, "max": hi, "norm": norm}
    hist_range = _histogram_range(lo, hi)
    if hist_range is None:
        finite = flat[torch.isfinite(flat)]
        return _with_finite_subset(base, numel, finite, finite.numel(), _stats_torch)
    hist_lo, hist_hi = hist_range
    step = (hist_hi - hist_lo) / HISTOGRAM_BINS
    bins = [hist_lo + step * i for i in range(HISTOGRAM_BINS + 1)]
    if flat.numel() < 2:
        counts = [int(flat.numel())] + [0] * (HISTOGRAM_BINS - 1)
    else:
        counts = torch.histc(flat, bins=HISTOGRAM_BINS, min=hist_lo, max=hist_hi).to(torch.int64).tolist()
    return {**base, "histogram": {"bins": bins, "counts": counts}}


def _stats_numpy(arr: Any) -> dict[str, Any]:
    import numpy as np

    flat = arr.ravel()
    if flat.size == 0:
        return _empty_stats()
    if flat.dtype.kind != "f":
        flat = flat.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore"):  # a diverged tensor's NaN is the answer, not a warning
        lo = float(flat.min())
        hi = float(flat.max())
        mean = float(flat.mean())
        std = float(flat.std())
        norm = float(np.linalg.norm(flat))
    base = {"mean": mean, "std": std, "min": lo, "max": hi, "norm": norm}
    hist_range = _histogram_range(lo, hi)
    if hist_range is None:
        finite = flat[np.isfinite(flat)]
        return _with_finite_subset(base, int(flat.size), finite, int(finite.size), _stats_numpy)
    counts, edges = np.histogram(flat, bins=HISTOGRAM_BINS, range=hist_range)
    return {**base, "histogram": {"bins": edges.tolist(), "counts": counts.tolist()}}


def _nonfinite_token(value: float) -> str | None:
    if math.isfinite(value):
        return None
    if value != value:
        return "nan"
    return "inf" if value > 0 else "-inf"


def stats_to_wire(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The stats as the spool writes them (strict JSON): a non-finite scalar becomes null,
    recorded in a `nonfinite` map; a histogram with a non-finite edge is left out (recorded
    there as `histogram`); the `finite` block the same way."""
    if not stats:
        return stats
    nonfinite: dict[str, str] = {}
    for key in _STATS_SCALARS:
        value = stats.get(key)
        if isinstance(value, float):
            token = _nonfinite_token(value)
            if token is not None:
                nonfinite[key] = token
    hist_token = None
    histogram = stats.get("histogram")
    if isinstance(histogram, dict) and isinstance(histogram.get("bins"), list):
        for edge in histogram["bins"]:
            if isinstance(edge, float) and (hist_token := _nonfinite_token(edge)) is not None:
                break
    if not nonfinite and hist_token is None:
        return stats
    out = dict(stats)
    for key in nonfinite:
        out[key] = None
    if hist_token is not None:
        out.pop("histogram", None)
        nonfinite["histogram"] = hist_token
    out["nonfinite"] = nonfinite
    finite = out.get("finite")
    if isinstance(finite, dict):
        out["finite"] = stats_to_wire(finite)
    return out


def stats_from_wire(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """`stats_to_wire` undone as far as the spool allows (replay): each null scalar named in
    `nonfinite` is its float again, in its place, and the map goes. A histogram left out for a
    non-finite edge stays out: its bins and counts were never written."""
    if not stats or not isinstance(stats.get("nonfinite"), dict):
        return stats
    nonfinite = stats["nonfinite"]
    out = {k: v for k, v in stats.items() if k != "nonfinite"}
    for key, token in nonfinite.items():
        if key in _STATS_SCALARS and out.get(key) is None:
            out[key] = float(token)  # "nan", "inf", "-inf" all parse
    finite = out.get("finite")
    if isinstance(finite, dict):
        out["finite"] = stats_from_wire(finite)
    return out


# -- tensor files (the SDK's snapshots/sampled.py and blob.py) ------------------------------------


def _serialize_blobs(
    model: Any,
    span_id: str,
    mode: str,
    records: list[dict[str, Any]],
    grad_refs: Named | None,
    include_grads: bool,
    sample_rate: float,
    output_dir: str | Path,
) -> None:
    if mode == "sampled" and not should_sample(sample_rate):
        return
    weights = named_tensors(model)
    if weights:
        _write_and_upgrade(span_id, "weights", weights, output_dir, mode, records)
    if include_grads:
        if grad_refs is not None:
            grads = [(n, g) for n, g in grad_refs if g is not None]
        else:
            grads = [(n, g) for n, g in _live_grads(model) if g is not None]
        if grads:
            _write_and_upgrade(span_id, "gradients", grads, output_dir, mode, records)


def should_sample(sample_rate: float, rng: random.Random | None = None) -> bool:
    """`random() < sample_rate` on the global `random` (as the SDK: a seeded program samples
    the same epochs); <= 0 never, >= 1 always."""
    if sample_rate <= 0.0:
        return False
    if sample_rate >= 1.0:
        return True
    return (rng if rng is not None else random).random() < sample_rate


def _write_and_upgrade(
    span_id: str, kind: str, named: Named, output_dir: str | Path, mode: str, records: list[dict[str, Any]]
) -> None:
    """Write the tensors to their file and point the records of the tensors it holds at it."""
    result = write_tensors(span_id, kind, named, output_dir)
    if result is None:
        return
    path, written = result
    if not written:
        return
    uri = path.resolve().as_uri()
    names = {f"{n}.grad" for n in written} if kind == "gradients" else set(written)
    for rec in records:
        if rec["tensor_name"] in names:
            rec["blob_uri"] = uri
            rec["mode"] = mode


def _numel(t: Any) -> int:
    fn = getattr(t, "numel", None)
    if callable(fn):
        try:
            return int(fn())
        except Exception:
            pass
    shape = getattr(t, "shape", None)
    if shape is None:
        return 0
    total = 1
    try:
        for d in shape:
            total *= int(d)
        return total
    except Exception:
        return 0


def _dtype_bytes(t: Any) -> int:
    dtype = getattr(t, "dtype", None)
    if dtype is None:
        return 4
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype).removeprefix("torch.").removeprefix("tf.")
    return _DTYPE_BYTES.get(name, 4)


def write_tensors(
    span_id: str, kind: str, named: Named, output_dir: str | Path
) -> tuple[Path, list[str]] | None:
    """Write `named` to `<output_dir>/snapshots/<span_id>/<kind>.safetensors` (torch's
    writer when every tensor is torch's, NumPy's otherwise); (path, names written), or None."""
    if not named:
        return None
    filename = WEIGHTS_FILENAME if kind == "weights" else GRADIENTS_FILENAME
    try:
        import safetensors  # noqa: F401
    except ImportError:
        _failed(
            "safetensors",
            "snapshots='sampled' / 'full' write tensors with the safetensors package, which is "
            "not installed (`pip install safetensors`); the records stay mode='stats'",
        )
        return None
    total = sum(_numel(t) * _dtype_bytes(t) for _, t in named)
    if total >= SIZE_WARN_BYTES:
        warn_once(
            f"snapshot-size:{kind}",
            f"cirron_otel: a {kind} snapshot of {total / (1024 * 1024):.1f} MB across {len(named)} "
            "tensors; consider a lower sample_rate or snapshots='stats'",
        )
    out_dir = Path(output_dir) / SNAPSHOTS_SUBDIR / span_id
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / filename
    tensors = dict(named)
    try:
        if all(_is_torch_tensor(t) for t in tensors.values()):
            from safetensors.torch import save_file as save_torch

            prepared = {k: t.detach().cpu().contiguous() for k, t in tensors.items()}
            save_torch(prepared, str(path))
            return path, list(prepared)
        from safetensors.numpy import save_file as save_np

        arrays = {}
        for key, tensor in tensors.items():
            arr = _to_numpy(tensor, for_file=True)
            if arr is not None:
                arrays[key] = arr
        save_np(arrays, str(path))
        return path, list(arrays)
    except Exception as exc:
        _failed("blob_write", exc)
        return None
