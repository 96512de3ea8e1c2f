"""kernels.timing and benchmark.time_fn's CUDA path, on a simulated GPU stream.

The stand-in stream runs queued work in order: a sleep of c cycles takes c / CYCLES_PER_MS ms,
each call's kernel KERNEL_MS, and an event records when the work queued before it ends (at the
earliest when the host queues it). The host takes HOST_MS to queue one call. Timed back to back
such calls measure the host; queued behind a sleep sized from the host time they measure the
kernel.
"""
import statistics

import pytest
import torch

from gptkern import benchmark
from gptkern.kernels import autotune, timing

HOST_MS, KERNEL_MS = 0.3, 0.05


class _FakeGpu:
    def __init__(self):
        self.host = 0.0       # ms, the host's clock
        self.gpu_free = 0.0   # ms, when the queued work ends
        self.sleeps = []

    def call(self):
        self.host += HOST_MS
        self.gpu_free = max(self.gpu_free, self.host) + KERNEL_MS

    def sleep(self, cycles):
        self.sleeps.append(cycles)
        self.gpu_free = max(self.gpu_free, self.host) + cycles / timing.CYCLES_PER_MS

    def synchronize(self):
        self.host = max(self.host, self.gpu_free)

    def event_class(self):
        gpu = self

        class Event:
            def __init__(self, enable_timing=False):
                self.at = None

            def record(self):
                self.at = max(gpu.gpu_free, gpu.host)

            def elapsed_time(self, end):
                return end.at - self.at
        return Event


@pytest.fixture
def fake_gpu(monkeypatch):
    gpu = _FakeGpu()
    monkeypatch.setattr(torch.cuda, "Event", gpu.event_class())
    monkeypatch.setattr(torch.cuda, "_sleep", gpu.sleep)
    monkeypatch.setattr(torch.cuda, "synchronize", gpu.synchronize)
    monkeypatch.setattr(timing.time, "perf_counter", lambda: gpu.host / 1e3)  # (benchmark's time too)
    return gpu


def test_queued_calls_time_the_kernel_not_the_host(fake_gpu):
    per_call = timing.host_ms(fake_gpu.call)
    assert per_call == pytest.approx(HOST_MS)
    fake_gpu.synchronize()
    times = timing.event_times_ms(fake_gpu.call, 100, queue_ahead=True, per_call_host_ms=per_call)
    assert len(times) == 100 and statistics.median(times) == pytest.approx(KERNEL_MS)
    # QUEUE_CALLS calls behind each sleep of twice their host time plus 1 ms (CUDA's launch queue is finite)
    assert [c / timing.CYCLES_PER_MS for c in fake_gpu.sleeps] == pytest.approx(
        [2 * HOST_MS * 32 + 1] * 3 + [2 * HOST_MS * 4 + 1])
    back_to_back = timing.event_times_ms(fake_gpu.call, 100, queue_ahead=False)
    assert statistics.median(back_to_back) == pytest.approx(HOST_MS)


def test_the_sleep_is_capped():
    """A call that syncs measures its GPU time as host time: seconds of sleep are not added."""
    assert timing.sleep_cycles(10.0, 32) == timing.MAX_SLEEP_MS * timing.CYCLES_PER_MS


def test_a_sleep_too_short_for_the_host_would_time_the_host(fake_gpu):
    """What the sizing prevents: a sleep sized for a host that queues at no cost (1 ms for each
    32 calls) runs out after 3 calls of a 0.3 ms host; the rest are paced by the host."""
    times = timing.event_times_ms(fake_gpu.call, 100, queue_ahead=True, per_call_host_ms=0.0)
    assert statistics.median(times) == pytest.approx(HOST_MS)


def test_time_fn_queues_ahead_and_reports_the_host_time(fake_gpu):
    stats = benchmark.time_fn(fake_gpu.call, torch.device("cuda"), warmup=2, repeats=50, queue_ahead=True)
    assert stats["median_ms"] == pytest.approx(KERNEL_MS)
    assert stats["host_ms"] == pytest.approx(HOST_MS)
    plain = benchmark.time_fn(fake_gpu.call, torch.device("cuda"), warmup=2, repeats=50)
    assert plain["median_ms"] == pytest.approx(HOST_MS) and "host_ms" not in plain


def test_autotune_times_kernels_behind_a_sized_sleep(fake_gpu):
    assert autotune._cuda_time_ms(fake_gpu.call) == pytest.approx(KERNEL_MS)
    assert [c / timing.CYCLES_PER_MS for c in fake_gpu.sleeps] == pytest.approx(
        [2 * HOST_MS * autotune.TIMED_RUNS + 1])
