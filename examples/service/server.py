"""A small prediction service instrumented with OpenTelemetry and Cirron.

FastAPI on uvicorn, traced by the official `opentelemetry-instrumentation-fastapi`: every
request gets a SERVER span. The handlers open Cirron scopes (`load`, `predict`) and record
marks inside that span, so they are its children in the same trace, and `ci.profile()` sends
them through this process's SDK TracerProvider: same exporter, same resource, same backend.

    python examples/service/server.py --port 8000

Exports OTLP to wherever the standard variables say (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL` = `grpc`, the
default, or `http/protobuf`). Service name: `OTEL_SERVICE_NAME`, else `cirron-demo-server`.
Prints `listening on http://HOST:PORT` once the port is bound (`--port 0`: any free port).
SIGTERM or Ctrl-C: finishes the requests in flight, flushes every span, exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, HTTPException
from opentelemetry import trace
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from otel_setup import otlp_exporter
from pydantic import BaseModel

import cirron_otel as ci

DEFAULT_SERVICE_NAME = "cirron-demo-server"
MODEL_NAME = "ridge"
N_FEATURES = 4


def setup_tracing(default_service_name: str) -> TracerProvider:
    """The service's own OpenTelemetry setup, as any instrumented service has it."""
    service_name = os.environ.get("OTEL_SERVICE_NAME") or default_service_name
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(otlp_exporter(), schedule_delay_millis=500))
    trace.set_tracer_provider(provider)
    return provider


class RidgeModel:
    """Ridge regression fitted in closed form on generated data: the "model" the service loads."""

    def __init__(self, weights: np.ndarray, bias: float, train_rmse: float, fitted_s: float) -> None:
        self.weights = weights
        self.bias = bias
        self.train_rmse = train_rmse
        self.fitted_s = fitted_s

    @classmethod
    def fit(cls, n_samples: int = 2000, alpha: float = 1e-2, seed: int = 7) -> RidgeModel:
        t0 = time.perf_counter()
        rng = np.random.default_rng(seed)
        true_w = np.array([1.5, -2.0, 0.5, 3.0])
        x = rng.normal(size=(n_samples, N_FEATURES))
        y = x @ true_w + 0.25 + rng.normal(scale=0.1, size=n_samples)
        xb = np.hstack([x, np.ones((n_samples, 1))])
        gram = xb.T @ xb + alpha * np.eye(N_FEATURES + 1)
        theta = np.linalg.solve(gram, xb.T @ y)
        rmse = float(np.sqrt(np.mean((xb @ theta - y) ** 2)))
        return cls(theta[:-1], float(theta[-1]), rmse, time.perf_counter() - t0)

    def predict(self, x: np.ndarray) -> np.ndarray:
        if x.ndim != 2 or x.shape[1] != N_FEATURES:
            raise ValueError(f"expected rows of {N_FEATURES} features, got shape {x.shape}")
        return x @ self.weights + self.bias


_model: RidgeModel | None = None
_model_lock = threading.Lock()


def load_model() -> RidgeModel:
    """The model, fitted on first use; a `load` scope with what it cost."""
    global _model
    with ci.scope("load", model=MODEL_NAME) as scope, _model_lock:
        cached = _model is not None
        if _model is None:
            _model = RidgeModel.fit()
        scope.attrs["cached"] = cached
        ci.mark("weights_norm", float(np.linalg.norm(_model.weights)))
        ci.mark("train_rmse", _model.train_rmse, kind="summary")
        return _model


class PredictRequest(BaseModel):
    inputs: list[list[float]]


class PredictResponse(BaseModel):
    model: str
    predictions: list[float]


app = FastAPI(title="cirron-demo")


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/model")
async def model_info() -> dict[str, Any]:
    # An async handler: runs in the request's asyncio task, under the request span.
    model = load_model()
    return {
        "model": MODEL_NAME,
        "weights": model.weights.tolist(),
        "bias": model.bias,
        "train_rmse": model.train_rmse,
    }


@app.post("/predict")
def predict(request: PredictRequest) -> PredictResponse:
    # A plain handler: FastAPI runs it on a worker thread with the request's context.
    model = load_model()
    x = np.asarray(request.inputs, dtype=np.float64)
    try:
        with ci.scope("predict", model=MODEL_NAME, rows=len(request.inputs)):
            y = model.predict(x)  # ValueError on a bad shape: the scope records the error
            for value in y:
                ci.mark("prediction", float(value))
            ci.mark("mean_prediction", float(y.mean()), kind="summary")
    except ValueError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return PredictResponse(model=MODEL_NAME, predictions=[float(v) for v in y])


def _exit_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    args = parser.parse_args(argv)

    provider = setup_tracing(DEFAULT_SERVICE_NAME)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider, exclude_spans=["receive", "send"])
    # uvicorn stops gracefully on SIGTERM, then re-raises it; end with status 0 then.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    ci.profile()  # after the provider is set: Cirron spans go through its span processors

    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(128)
    host, port = sock.getsockname()[:2]
    print(f"listening on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        sock.close()
        ci.shutdown()  # Cirron's last spans into the provider first,
        provider.shutdown()  # then the provider exports everything it holds
    print("server stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
