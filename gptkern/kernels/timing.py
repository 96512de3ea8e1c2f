"""CUDA event timing of calls queued behind a sleep kernel (autotuning and the benchmarks).

A call of a short kernel can take as long to launch from Python as to run (a row kernel of
10-60 us, launched through a custom op and Triton's launcher). Timed back to back, the events
would then measure the host. So a sleep kernel first holds the GPU while the host queues the
timed calls (QUEUE_CALLS at a time, each batch behind its own sleep); the events around each call
then time its kernels. The sleep is sized from the host time of a call measured just before, so
that it outlasts the queueing (at most MAX_SLEEP_MS).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

# SM clock cycles per ms assumed when sizing the sleep: 2 GHz, about an H100/H200's boost clock
# (a slower clock sleeps longer, which only costs time).
CYCLES_PER_MS = 2_000_000
# Calls queued behind one sleep: CUDA's launch queue holds about a thousand pending launches, and a
# backward call with its two events takes tens; past a full queue the host waits, and the calls
# after it would be paced by the host again.
QUEUE_CALLS = 32
# The longest sleep (ms): a call that syncs with the GPU measures as long as its kernels, which
# must not turn into seconds of sleep.
MAX_SLEEP_MS = 200.0


def host_ms(fn: Callable[[], object], calls: int = 3) -> float:
    """Median host time in ms of ``calls`` calls of ``fn``, without waiting for the GPU: what it
    costs to queue one call."""
    times = []
    for _ in range(max(1, calls)):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def sleep_cycles(per_call_host_ms: float, calls: int) -> int:
    """Cycles of the sleep that holds the GPU while ``calls`` calls are queued: twice their host
    time plus 1 ms, at most MAX_SLEEP_MS."""
    return int(min(2.0 * per_call_host_ms * calls + 1.0, MAX_SLEEP_MS) * CYCLES_PER_MS)


def event_times_ms(fn: Callable[[], object], repeats: int, queue_ahead: bool,
                   per_call_host_ms: float = 0.0) -> list[float]:
    """GPU times in ms of ``repeats`` calls of ``fn``, each between two CUDA events. With
    ``queue_ahead`` (``fn`` must not sync with the host) the calls are queued QUEUE_CALLS at a
    time, each batch behind a sleep sized by ``per_call_host_ms`` (see host_ms)."""
    times: list[float] = []
    batch = QUEUE_CALLS if queue_ahead else repeats
    for first in range(0, repeats, max(1, batch)):
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(min(batch, repeats - first))]
        if queue_ahead:
            torch.cuda._sleep(sleep_cycles(per_call_host_ms, len(events)))
        for begin, end in events:
            begin.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times += [begin.elapsed_time(end) for begin, end in events]
    return times
