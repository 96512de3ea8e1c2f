"""First-call autotuning on CUDA: time each candidate launch configuration once per problem key
and keep the fastest for the rest of the process.

The candidates come from tables whose every entry compiles for Hopper without spills
(tests/test_hopper_compile.py); timing then picks among them on the GPU at hand, and a
candidate that fails to launch there (too much shared memory on a smaller GPU) is dropped.
``GPTKERN_AUTOTUNE=0`` turns it off: the first candidate (the table's default) is used. So does
``torch.use_deterministic_algorithms(True)``: timing may choose differently in another process,
and another block size sums in another order (the bits would change between runs).
The kernels tuned here write their outputs whole (no accumulation), so the timing runs leave
correct results behind and the chosen configuration simply runs once more.
"""
from __future__ import annotations

import logging
import math
import os
import statistics
from typing import Callable, Hashable, Optional, Sequence, TypeVar

import torch

from gptkern.kernels import timing

log = logging.getLogger("gptkern")
C = TypeVar("C")
_CHOICES: dict[Hashable, object] = {}
TIMED_RUNS = 5


def enabled(device: torch.device) -> bool:
    """Autotune launches on ``device``: CUDA only, unless GPTKERN_AUTOTUNE=0 or torch's
    deterministic mode is on."""
    return (device.type == "cuda" and os.environ.get("GPTKERN_AUTOTUNE", "1") != "0"
            and not torch.are_deterministic_algorithms_enabled())


def _cuda_time_ms(fn: Callable[[], None]) -> float:
    """Median of TIMED_RUNS timed runs of ``fn`` after one untimed run (which compiles it).

    The timed runs are queued behind a sleep kernel sized from the host time of two more
    untimed runs (timing.event_times_ms), so that the events time the kernels and not their
    launches from Python, which for a row kernel take about as long."""
    fn()
    torch.cuda.synchronize()
    per_call = timing.host_ms(fn, calls=2)
    torch.cuda.synchronize()
    return statistics.median(timing.event_times_ms(fn, TIMED_RUNS, queue_ahead=True, per_call_host_ms=per_call))


def pick(key: Hashable, candidates: Sequence[C], run: Callable[[C], None], device: torch.device,
         timer: Optional[Callable[[Callable[[], None]], float]] = None) -> C:
    """The candidate to launch for ``key``: the fastest of ``run(candidate)`` on the first call for
    the key (timed by ``timer``, CUDA events by default), remembered afterwards.

    With one candidate or autotuning off, the first candidate. While a CUDA graph is captured
    (timing would sync), the choice made before, else the first candidate (not remembered).
    """
    if len(candidates) == 1 or not enabled(device):
        return candidates[0]
    full_key = (key, str(device))
    if _CHOICES.get(full_key) in candidates:  # (a choice no longer among the candidates is timed again)
        return _CHOICES[full_key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return candidates[0]
    timer = timer or _cuda_time_ms
    times, errors = [], []
    for cfg in candidates:
        try:
            times.append(timer(lambda: run(cfg)))
        except Exception as err:  # noqa: BLE001 (e.g. out of shared memory on this GPU): not a choice
            log.warning("gptkern autotune: %r failed for %r and is not a choice: %s", cfg, key, err)
            times.append(math.inf)
            errors.append(err)
    if all(t == math.inf for t in times):
        raise errors[0]
    best = candidates[times.index(min(times))]
    _CHOICES[full_key] = best
    return best


def choices() -> dict[str, str]:
    """What was chosen so far, as text (for benchmark reports)."""
    return {repr(key): repr(cfg) for key, cfg in _CHOICES.items()}


def reset() -> None:
    _CHOICES.clear()
