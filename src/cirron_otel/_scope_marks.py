"""`Scope.marks`: the ids of the marks recorded on a scope, as cirron-sdk's handle lists them.

The SDK appends each mark's id to its scope's list as it records it. Here `ci.mark` only
writes the native ring (no allocation, no Python work); the drainer gives marks their ids
and keeps each open span's list until the span record goes out with it (the spool's
`mark_ids`). Reading `.marks` therefore asks the drainer to claim what is recorded so far
(no export, no wait for the sinks) and reads:
- an open scope: the drainer's list so far (`_native.open_span_mark_ids`);
- a closed one: its span record's list, in the batches not yet exported or the trace store
  (newest first). The scope keeps that answer, which no longer changes.

A closed scope read for the first time after the trace store let its batch go
(`trace_buffer_records`) has no list to read: `[]`, as for a scope never entered. The
spool's `mark_ids` still has it. A span lists its first 1,000,000 mark ids (the session's
first 1,000), as the spool does.
"""

from __future__ import annotations

from . import _native

_CLAIM_TIMEOUT = 5.0


def mark_ids(scope: _native.Scope) -> tuple[list[str], bool]:
    """(the ids, whether they are final) for the C getter `Scope.marks`, which keeps final ones."""
    state = scope.state
    if state == "new":
        return [], False
    if state == "dropped":  # not recorded (not sampled, or recording off): no marks attach
        return [], True
    from . import _profiler

    prof = _profiler._active or _profiler._last
    drainer = prof.drainer if prof is not None else None
    if drainer is None:
        return [], False
    if prof is not None and prof.running:
        drainer.claim(_CLAIM_TIMEOUT)
    if state == "open":
        return _native.open_span_mark_ids(scope) or [], False
    for batch in reversed(drainer.recent_batches()):
        ids = batch.span_mark_ids(scope)
        if ids is not None:
            return ids, True
    return [], False
