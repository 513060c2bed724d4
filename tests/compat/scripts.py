"""Scripts written for cirron-sdk 0.3.0, run unchanged under either package: `MOD` (argv[1]) is
`cirron` or `cirron_otel`, the only line that differs. Each prints one JSON document of what
its calls returned; the spool is left in the working directory."""

TRAINING = r"""
import json, sys
ci = __import__(sys.argv[1])
out = {}
prof = ci.profile(snapshots="stats", sample_rate=0.5, flush_interval=0.5)
for epoch in ci.epochs(range(2)):
    for batch in ci.batches(range(3)):
        with ci.scope("forward", layer="all"):
            ci.mark("loss", 1.0 / (batch + 1))
        with ci.scope("backward"):
            ci.mark("grad_ok", True)
            ci.mark("phase", "bw")
    ci.mark("acc", 0.5 + epoch, kind="summary")
with ci.scope("eval", index=7):
    ci.mark("count", 3)
    ci.mark("nan", float("nan"))
ci.flush()
out["dict"] = ci.trace(format="dict")
out["json"] = json.loads(ci.trace(format="json"))
out["name"] = ci.trace(format="dict", name="forward")
out["last"] = ci.trace(format="dict", last=3)
out["last0"] = ci.trace(format="dict", last=0)
out["df_columns"] = list(ci.trace(format="df").columns)
out["df_rows"] = len(ci.trace(format="df"))
out["tree_returns"] = repr(ci.trace())
out["health"] = ci.health()
out["profile_again_same"] = ci.profile() is prof
out["config"] = [ci.get_default().snapshots, ci.get_default().sample_rate, ci.get_default().flush_interval]
ci.shutdown()
out["health_after"] = ci.health()
out["dict_after"] = ci.trace(format="dict")
print("@@" + json.dumps(out, default=str))
"""

INFERENCE = r"""
import json, sys
ci = __import__(sys.argv[1])
ci.profile()

@ci.inference
def complete(prompt):
    ci.mark("prompt_len", len(prompt))
    return {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}

@ci.inference(config={"stream_chunk_timing": True})
def stream(n):
    for i in range(n):
        yield {"text": str(i)}

with ci.scope("outer"):
    r = complete("hello")
chunks = list(stream(3))
print("@@" + json.dumps({"result": r, "chunks": chunks, "config": stream._cirron_config}))
ci.shutdown()
"""

CONFIG = r"""
import json, sys
ci = __import__(sys.argv[1])
out = {}
try:
    ci.profile(snapshots="bogus")
except ValueError as e:
    out["bad_snapshots"] = "ValueError"
try:
    ci.profile(output="carrier-pigeon")
except ValueError:
    out["bad_output"] = "ValueError"
ci.profile(config={"sample_rate": 0.25}, flush_interval=2.0)
d = ci.get_default()
out["resolved"] = [d.snapshots, d.sample_rate, d.flush_interval]
out["errors"] = {n: [c.__name__ for c in getattr(ci, n).__mro__]
                 for n in ("CirronError", "CirronDependencyError", "CirronSecretNotFound", "CirronYamlError")}
class Est:
    def fit(self, x):
        ci.mark("n", len(x))
        return self
    def predict(self, x):
        return [0] * len(x)
    coef_ = 3
w = ci.wrap(Est())
w.fit([1, 2]); out["predict"] = w.predict([1]); out["coef"] = w.coef_
out["wrap_idempotent"] = ci.wrap(w) is w
m = object()
out["watch"] = ci.watch(m) is m and ci.watch(None) is None
ci.shutdown()
print("@@" + json.dumps(out))
"""

OUTPUT_STDOUT = r"""
import sys
ci = __import__(sys.argv[1])
ci.profile(output="stdout")
with ci.scope("only"):
    ci.mark("x", 2)
ci.shutdown()
"""

OUTPUT_NONE = r"""
import json, os, sys
ci = __import__(sys.argv[1])
ci.profile(output="none")
with ci.scope("s"):
    pass
ci.shutdown()
print("@@" + json.dumps({"spool": os.path.exists(".cirron/spool") and bool(os.listdir(".cirron/spool"))}))
"""

DISABLED = r"""
import json, sys
ci = __import__(sys.argv[1])
ci.profile(enabled=False)
with ci.scope("s"):
    ci.mark("m", 1)
print("@@" + json.dumps({"health": ci.health()}))
"""

ASYNC_INFERENCE = r"""
import asyncio, json, sys
ci = __import__(sys.argv[1])
ci.profile()

@ci.inference
async def complete(x):
    ci.mark("in", x)
    await asyncio.sleep(0)
    return {"usage": {"prompt_tokens": 3, "completion_tokens": 5}}

@ci.inference
async def stream(n):
    async def gen():
        for i in range(n):
            ci.mark("chunk_in", i)
            yield i
    return gen()

async def main():
    await asyncio.gather(complete(1), complete(2))  # concurrent requests: one scope each
    return [i async for i in await stream(2)]

print("@@" + json.dumps(asyncio.run(main())))
ci.shutdown()
"""

HANDLE = r"""
import json, os, sys
ci = __import__(sys.argv[1])
c = ci.Cirron(output_dir="custom_out", flush_interval=0.5)
prof = c.profile()
with ci.scope("s"):
    ci.mark("m", 1.5)
prof.flush()
out = {"enabled": prof.enabled, "hooks": prof.installed_hooks, "ctx": prof.platform_context,
       "same_cirron": isinstance(prof.cirron, ci.Cirron),
       "trace": prof.trace(format="dict")["span_count"], "health_enabled": prof.health()["enabled"],
       "spool_files": len(os.listdir("custom_out/spool")) > 0, "flush_interval": c.flush_interval}
prof.shutdown()
out["after"] = ci.health()["enabled"]
print("@@" + json.dumps(out))
"""

SCOPE_HANDLE = r"""
import json, os, sys, threading
ci = __import__(sys.argv[1])
ci.profile()
def fields(s):
    return {
        "pid": s.pid == os.getpid(), "rank": s.rank, "thread": s.thread_id == threading.get_ident(),
        "cpu_ns": s.cpu_ns, "gpu_ns": s.gpu_ns, "memory_peak_bytes": s.memory_peak_bytes,
        "types": [type(s.pid).__name__, type(s.rank).__name__, type(s.thread_id).__name__],
    }
out = {}
with ci.scope("a", k=1) as s:
    out["open"] = fields(s)
out["closed"] = {**fields(s), "end_after_start": s.end_ns >= s.start_ns}
def worker():
    with ci.scope("b") as t:
        out["other_thread"] = fields(t)
th = threading.Thread(target=worker)
th.start()
th.join()
ci.shutdown()
print("@@" + json.dumps(out))
"""

SCOPE_MARKS = r"""
import glob, json, sys, threading
ci = __import__(sys.argv[1])
ci.profile()
out = {}
with ci.scope("a") as s:
    ci.mark("m1", 1.0)
    with ci.scope("child") as c:
        ci.mark("m2", 2)
        out["child_open"] = c.marks
    ci.mark("m3", "x", kind="summary")
    out["a_open"] = s.marks
def worker():
    with ci.scope("b") as t:
        for i in range(3):
            ci.mark("w", i)
    out["b"] = t.marks
th = threading.Thread(target=worker)
th.start()
th.join()
handles = {"a": s, "child": c}
ci.shutdown()
out["closed_list_is_kept"] = s.marks is s.marks
spool = [json.load(open(p)) for p in sorted(glob.glob(".cirron/spool/*.json"))]
names = {m["id"]: m["name"] for doc in spool for m in doc["marks"]}
listed = {sp["name"]: sp["mark_ids"] for doc in spool for sp in doc["spans"]}
out = {k: [names[i] for i in v] if isinstance(v, list) else v for k, v in out.items()}
for name, h in handles.items():
    out[name + "_closed"] = [names[i] for i in h.marks]
    out[name + "_as_listed_in_the_spool"] = h.marks == listed[name]
print("@@" + json.dumps(out))
"""
