"""`@ci.inference`, as in cirron-sdk 0.3.0: each call runs in a `request` scope (attribute
request_id), isolated from the caller's open scopes; OpenAI-style `usage` on the result becomes
the SDK's summary marks (prompt_tokens / input_tokens, completion_tokens / output_tokens,
total_tokens, attribute source="openai"); a returned generator keeps the request open until it
is exhausted or closed, with time_to_first_token_ms, request_duration_ms, output_tokens and
tokens_per_second marks, and (config={"stream_chunk_timing": True}) a chunk_ms point mark per
chunk after the first.

For OpenTelemetry the request span also carries the generative-AI semantic convention
attributes that apply (gen_ai.usage.input_tokens / output_tokens, gen_ai.response.model,
gen_ai.request.model and gen_ai.provider.name from config "model" / "provider"); they are in
the spool's span attrs too, the one addition to the SDK's records.

The request span is a root, as the SDK's (parent_id null in the spool and trace()); in
OpenTelemetry it starts a trace of its own, linked to the session (`Scope._as_root`). Under a
foreign OpenTelemetry span (a service's request) it stays that span's child: one trace.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from . import _native


def _count_error(where: str, exc: BaseException) -> None:
    # telemetry never breaks the program: counted for health()["swallowed_errors"]
    from .compat import swallowed

    swallowed(f"inference.{where}", exc)


def _summary(name: str, value: float | int, **attrs: Any) -> None:
    try:
        _native.mark(name, value, kind="summary", **attrs)
    except Exception as exc:
        _count_error("mark", exc)


def _usage(result: Any) -> dict[str, int] | None:
    usage = result.get("usage") if isinstance(result, dict) else getattr(result, "usage", None)
    if usage is None:
        return None
    out: dict[str, int] = {}
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        v = usage.get(key) if isinstance(usage, dict) else getattr(usage, key, None)
        if isinstance(v, int) and not isinstance(v, bool):
            out[key] = v
    return out or None


def _mark_usage(result: Any, scope: Any) -> None:
    try:
        usage = _usage(result)
        model = result.get("model") if isinstance(result, dict) else getattr(result, "model", None)
        if isinstance(model, str):
            scope.attrs["gen_ai.response.model"] = model
        if not usage:
            return
        prompt, completion, total = (
            usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens")
        )
        if prompt is not None:
            _summary("prompt_tokens", prompt, source="openai")
            _summary("input_tokens", prompt, source="openai", normalized=True)
            scope.attrs["gen_ai.usage.input_tokens"] = prompt
        if completion is not None:
            _summary("completion_tokens", completion, source="openai")
            _summary("output_tokens", completion, source="openai", normalized=True)
            scope.attrs["gen_ai.usage.output_tokens"] = completion
        if total is None and prompt is not None and completion is not None:
            total = prompt + completion
        if total is not None:
            _summary("total_tokens", total, source="openai", normalized=True)
    except Exception as exc:
        _count_error("usage", exc)


def _finish_stream(count: int, start_ns: int, first_ns: int | None, scope: Any) -> None:
    end_ns = time.time_ns()
    _summary("request_duration_ms", (end_ns - start_ns) / 1e6)
    if first_ns is None:
        return
    _summary("output_tokens", count, normalized=True)
    _summary("tokens_per_second", count / max(1e-9, (end_ns - first_ns) / 1e9))
    try:
        scope.attrs.setdefault("gen_ai.usage.output_tokens", count)
    except Exception as exc:
        _count_error("stream", exc)


class _Request:
    """One request: its scope, opened and closed inside its own context (so the caller's scope
    stack is untouched, and marks made while the stream is consumed attach to the request)."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.ctx = contextvars.copy_context()
        self.ctx.run(_native.scope_var.set, None)  # isolated from the caller's open scopes
        attrs: dict[str, Any] = {"request_id": uuid.uuid4().hex}
        if isinstance(cfg.get("model"), str):
            attrs["gen_ai.request.model"] = cfg["model"]
        if isinstance(cfg.get("provider"), str):
            attrs["gen_ai.provider.name"] = cfg["provider"]
        self.scope = _native.scope("request", **attrs)
        self.scope._as_root()  # as the SDK's: a root (in OpenTelemetry, linked to the session)
        self.ctx.run(self.scope.__enter__)
        self.start_ns = time.time_ns()
        self.closed = False

    def close(self, exc: BaseException | None = None) -> None:
        if not self.closed:
            self.closed = True
            self.ctx.run(self.scope.__exit__, type(exc) if exc else None, exc, None)


class _Chunks:
    """A stream's chunk bookkeeping, shared by the sync and async wrappers: time to the first
    chunk, the gap between chunks, and the completion tokens (the usage the stream reports,
    else the chunk count)."""

    def __init__(self, req: _Request, chunk_timing: bool) -> None:
        self.req, self.chunk_timing = req, chunk_timing
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.count = 0
        self.explicit: Any = None

    def seen(self, item: Any) -> None:
        req, now = self.req, time.time_ns()
        if self.first_ns is None:
            self.first_ns = now
            req.ctx.run(_summary, "time_to_first_token_ms", (now - req.start_ns) / 1e6)
        elif self.chunk_timing and self.last_ns is not None:
            gap_ms = (now - self.last_ns) / 1e6
            req.ctx.run(_native.mark, "chunk_ms", gap_ms, kind="point", index=self.count)
        self.last_ns = now
        self.count += 1
        usage = _usage(item) if not isinstance(item, str | bytes) else None
        if usage and "completion_tokens" in usage:
            self.explicit = usage["completion_tokens"]

    def finish(self) -> None:
        tokens = self.explicit if self.explicit is not None else self.count
        req = self.req
        req.ctx.run(_finish_stream, tokens, req.start_ns, self.first_ns, req.scope)


def _stream(req: _Request, gen: Iterator[Any], chunk_timing: bool) -> Iterator[Any]:
    chunks = _Chunks(req, chunk_timing)
    it = iter(gen)
    try:
        while True:
            try:
                item = req.ctx.run(next, it)
            except StopIteration:
                break
            chunks.seen(item)
            yield item
    finally:
        close = getattr(it, "close", None)
        if callable(close):
            try:
                req.ctx.run(close)
            except Exception as exc:
                _count_error("stream_close", exc)
        chunks.finish()
        req.close()


async def _astream(req: _Request, agen: AsyncIterator[Any], chunk_timing: bool) -> AsyncIterator[Any]:
    # Each step runs in the request's context as a task of its own (asyncio binds a coroutine's
    # context per task), so marks the generator makes attach to the request.
    import asyncio

    chunks = _Chunks(req, chunk_timing)
    it = agen.__aiter__()
    try:
        while True:
            try:
                item = await asyncio.create_task(_anext(it), context=req.ctx)
            except StopAsyncIteration:
                break
            chunks.seen(item)
            yield item
    finally:
        aclose = getattr(it, "aclose", None)
        if callable(aclose):
            try:
                await aclose()
            except Exception as exc:
                _count_error("stream_close", exc)
        chunks.finish()
        req.close()


async def _anext(it: AsyncIterator[Any]) -> Any:
    return await it.__anext__()


def _finish(req: _Request, result: Any, cfg: dict[str, Any]) -> Any:
    req.ctx.run(_mark_usage, result, req.scope)
    chunk_timing = bool(cfg.get("stream_chunk_timing", False))
    if inspect.isasyncgen(result):
        return _astream(req, result, chunk_timing)
    if inspect.isgenerator(result) or (
        hasattr(result, "__iter__")
        and hasattr(result, "__next__")
        and not isinstance(result, str | bytes | dict | list | tuple)
    ):
        return _stream(req, result, chunk_timing)
    req.close()
    return result


def inference(
    fn: Callable[..., Any] | None = None, *, config: dict[str, Any] | None = None
) -> Callable[..., Any]:
    """`@ci.inference` or `@ci.inference(config={...})` (see the module docstring)."""
    if config is not None and not isinstance(config, dict):
        raise TypeError(f"cirron_otel.inference(): config must be a dict, not {type(config).__name__}")
    cfg: dict[str, Any] = dict(config) if config else {}

    def decorator(func: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(func):
            raise TypeError(f"cirron_otel.inference(): expected a function, got {type(func).__name__}")
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def awrapper(*args: Any, **kwargs: Any) -> Any:
                import asyncio

                req = _Request(cfg)
                try:
                    result = await asyncio.create_task(func(*args, **kwargs), context=req.ctx)
                except BaseException as exc:
                    req.close(exc)
                    raise
                return _finish(req, result, cfg)

            awrapper._cirron_config = cfg  # type: ignore[attr-defined]
            return awrapper

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            req = _Request(cfg)
            try:
                result = req.ctx.run(func, *args, **kwargs)
            except BaseException as exc:
                req.close(exc)
                raise
            return _finish(req, result, cfg)

        wrapper._cirron_config = cfg  # type: ignore[attr-defined]
        return wrapper

    return decorator(fn) if fn is not None else decorator
