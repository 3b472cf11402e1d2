"""Goodput under failures: the checkpoint interval and the effective training time ratio.

A synchronous job of G GPUs stops at every failure of any of them, restarts (R seconds:
rescheduling, process start, communicator set-up, checkpoint load) and redoes the work done
since its last checkpoint. Checkpointing costs delta seconds of blocked training every tau
seconds of work. With failures a Poisson process of mean time between failures M (the job's:
the per-GPU MTBF divided by G), Daly's model gives the expected wall time in closed form, and
a discrete-event replay of a failure trace checks it.

    m = job_mtbf_s(mtbf_gpu_hours=50_680, gpus=16_384)         # Llama 3: one failure per 3.1 h
    tau = daly_interval_s(checkpoint_s=2.8, mtbf_s=m)
    expected_ettr(tau, checkpoint_s=2.8, restart_s=600, mtbf_s=m)   # ~0.92

References: J. W. Young, "A first order approximation to the optimum checkpoint interval",
CACM 17(9), 1974; J. T. Daly, "A higher order estimate of the optimum checkpoint interval for
restart dumps", FGCS 22(3), 2006 (eqs. 13 and 37); Llama 3 team, "The Llama 3 Herd of
Models", 2024, section 3.3.4 and Table 5 (419 unexpected interruptions in 54 days on 16,384
H100; Tectonic storage at 2 TB/s sustained).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LLAMA3_INTERRUPTIONS: dict[str, int] = {
    "faulty GPU": 148, "GPU HBM3 memory": 72, "software bug": 54, "network switch/cable": 35,
    "host maintenance": 32, "GPU SRAM memory": 19, "GPU system processor": 17, "NIC": 7,
    "NCCL watchdog timeout": 7, "silent data corruption": 6, "GPU thermal interface/sensor": 6,
    "SSD": 3, "power supply": 3, "server chassis": 2, "IO expansion board": 2, "dependency": 2,
    "CPU": 2, "system memory": 2,
}
"""Unexpected interruptions of the Llama 3 405B pre-training by root cause (Llama 3 Table 5):
419 in 54 days on 16,384 H100."""
LLAMA3_GPUS = 16_384
LLAMA3_DAYS = 54
LLAMA3_MTBF_GPU_HOURS = LLAMA3_DAYS * 24 * LLAMA3_GPUS / sum(LLAMA3_INTERRUPTIONS.values())
"""Per-GPU mean time between job-stopping failures, GPU-hours (about 50,680)."""


def job_mtbf_s(mtbf_gpu_hours: float, gpus: int) -> float:
    """Mean time between failures of a job on `gpus` GPUs, seconds: any GPU's failure (and
    what fails with it: its host, NIC, switch port) stops the whole synchronous job."""
    return mtbf_gpu_hours * 3600.0 / gpus


def young_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Young's first-order optimum work between checkpoints, sqrt(2 delta M), seconds."""
    return math.sqrt(2.0 * checkpoint_s * mtbf_s)


def daly_interval_s(checkpoint_s: float, mtbf_s: float) -> float:
    """Daly's higher-order optimum work between checkpoints, seconds (Daly 2006, eq. 37):
    sqrt(2 delta M) [1 + sqrt(delta/2M)/3 + (delta/2M)/9] - delta for delta < 2M, else M."""
    if checkpoint_s >= 2.0 * mtbf_s:
        return mtbf_s
    x = checkpoint_s / (2.0 * mtbf_s)
    return math.sqrt(2.0 * checkpoint_s * mtbf_s) * (1 + math.sqrt(x) / 3 + x / 9) - checkpoint_s


def expected_ettr(interval_s: float, checkpoint_s: float, restart_s: float,
                  mtbf_s: float) -> float:
    """Expected effective training time ratio (useful work / wall time), Daly 2006 eq. 13:
    T_wall / T_work = (M / tau) e^(R/M) (e^((tau + delta)/M) - 1), exact for Poisson failures
    that may strike during work, checkpoints and restarts alike."""
    wall_per_work = (mtbf_s / interval_s) * math.exp(restart_s / mtbf_s) \
        * math.expm1((interval_s + checkpoint_s) / mtbf_s)
    return 1.0 / wall_per_work


@dataclass(frozen=True, slots=True)
class Replay:
    """A failure trace played against a checkpoint policy."""

    work_s: float
    """Useful training time completed."""
    wall_s: float
    """Wall time it took (work, checkpoints, lost work, restarts)."""
    failures: int
    """Failures that struck (during work, a checkpoint or a restart)."""
    lost_work_s: float
    """Work redone after failures."""
    checkpoint_time_s: float
    restart_time_s: float

    @property
    def ettr(self) -> float:
        return self.work_s / self.wall_s


def replay(failure_times_s: np.ndarray, work_s: float, interval_s: float, checkpoint_s: float,
           restart_s: float) -> Replay:
    """Play failures (absolute wall-clock times, seconds, ascending) against "checkpoint every
    `interval_s` of work" until `work_s` of work is saved; a failure during a segment or its
    checkpoint loses the segment, one during a restart starts the restart again."""
    times = iter(np.sort(np.asarray(failure_times_s, dtype=float)).tolist())
    next_fail = next(times, math.inf)
    clock = saved = lost = ckpt = restart = 0.0
    failures = 0
    while saved < work_s:
        segment = min(interval_s, work_s - saved)
        end = clock + segment + checkpoint_s
        if next_fail >= end:  # the segment and its checkpoint complete
            clock, saved, ckpt = end, saved + segment, ckpt + checkpoint_s
            continue
        failures += 1
        lost += min(next_fail - clock, segment)
        ckpt += max(0.0, next_fail - clock - segment)
        clock = next_fail
        next_fail = next(times, math.inf)
        while next_fail < clock + restart_s:  # failed again while restarting
            failures += 1
            restart += next_fail - clock
            clock = next_fail
            next_fail = next(times, math.inf)
        clock += restart_s
        restart += restart_s
    return Replay(saved, clock, failures, lost, ckpt, restart)


def poisson_trace(mtbf_s: float, horizon_s: float, seed: int = 0) -> np.ndarray:
    """Failure times of a Poisson process with mean gap `mtbf_s` over [0, horizon_s)."""
    rng = np.random.default_rng(seed)
    count = int(horizon_s / mtbf_s * 1.5) + 100
    times = np.cumsum(rng.exponential(mtbf_s, size=count))
    while times[-1] < horizon_s:  # rare: draw more
        more = times[-1] + np.cumsum(rng.exponential(mtbf_s, size=count))
        times = np.concatenate([times, more])
    return times[times < horizon_s]


def trace_causes(count: int, seed: int = 0,
                 mix: dict[str, int] = LLAMA3_INTERRUPTIONS) -> dict[str, int]:
    """Root causes of `count` failures drawn from a published mix (Llama 3's by default)."""
    rng = np.random.default_rng(seed + 1)
    names = list(mix)
    weights = np.array([mix[n] for n in names], dtype=float)
    drawn = rng.choice(len(names), size=count, p=weights / weights.sum())
    counts = np.bincount(drawn, minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts, strict=True) if c}
