"""Training-step overhead of EnergyMeter instrumentation, for a ~20 ms step, side by side.

The step is the reference workload's (``wattwarden.workloads``: the tiny transformer LM on
synthetic tokens, AdamW, gradient clipping), on the CPU with one torch thread; the batch size is
calibrated so a bare step takes about ``--target-ms`` (20 ms). Modes, run in alternating blocks of
``--block`` steps over ``--rounds`` rounds so drift on a busy machine hits them alike:

- ``bare``: the step alone;
- ``nvml counter``: the step plus what ``workload train`` adds per step: ``meter.lap("step")``
  (one ``nvmlDeviceGetTotalEnergyConsumption`` on a simulated H100 through the fake NVML), the
  step record and the progress display;
- ``nvml polled``: the same on a GPU with no energy counter (a background thread integrates power
  every 50 ms; the lap itself makes no driver call);
- ``agent``: the same with ``EnergyMeter(source="agent")``, against a ``wattwarden agent --sim 8``
  subprocess; measured in a second phase with its own ``bare`` blocks, since the agent's sampler
  competes for the same 2 cores.

Reported: median and mean step time per mode, the overhead as ratios to ``bare`` (of medians, of
means, and the median of per-round paired ratios), and a noise-free estimate: the added
per-step work timed alone divided by the bare step's median. Goal: under 1 % for the NVML counter.

    python -m benchmarks.bench_train_overhead [--rounds 12] [--block 25] [--quick]
"""

from __future__ import annotations

import io
import logging
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.bench_energymeter import real_agent
from benchmarks.common import Option, run_benchmark, summary, table
from wattwarden.hardware.sim.fake_nvml import install_fake_nvml, uninstall_fake_nvml
from wattwarden.hardware.sim.fleet import SimFleet
from wattwarden.workloads.meter import EnergyMeter
from wattwarden.workloads.model import SIZES, SyntheticTokens, TinyLM, lr_at
from wattwarden.workloads.report import ProgressDisplay, fmt, ratio
from wattwarden.workloads.train import StepRecord

NAME = "bench_train_overhead"
GOAL_PCT = 1.0
SEQ_LEN = 64


class Trainer:
    """The reference training step, and the same step as ``workload train`` instruments it."""

    def __init__(self, batch_size: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        size = SIZES["tiny"]
        self.model = TinyLM(size)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, betas=(0.9, 0.95))
        self.data = SyntheticTokens(size.vocab_size, SEQ_LEN, batch_size, seed)
        self.batch_size = batch_size
        self.step_no = 0
        self.display = ProgressDisplay(10**9, label="train", stream=io.StringIO(), tty=False)
        self.records: list[StepRecord] = []

    def step(self) -> float:
        lr = lr_at(self.step_no, base_lr=1e-3, warmup_steps=10)
        for group in self.opt.param_groups:
            group["lr"] = lr
        batch = self.data.next_batch()
        loss = self.model.loss(batch)
        self.opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.step_no += 1
        return float(loss.item())

    def instrumented_step(self, meter: EnergyMeter) -> float:
        loss = self.step()
        m = meter.lap("step")
        self.record(loss, m.elapsed_s, m.gpu_total_j, m.host_total_j)
        return loss

    def record(self, loss: float, elapsed: float, energy: float | None, host: float | None) -> None:
        tokens = self.batch_size * SEQ_LEN
        rec = StepRecord(
            step=self.step_no, loss=loss, lr=0.0, time_s=elapsed,
            samples_per_s=self.batch_size / elapsed if elapsed > 0 else 0.0,
            tokens_per_s=tokens / elapsed if elapsed > 0 else 0.0,
            energy_j=energy, host_energy_j=host, tokens_per_j=ratio(tokens, energy),
        )  # fmt: skip
        self.records.append(rec)
        del self.records[:-100]
        self.display.update(
            self.step_no,
            f"loss {rec.loss:.3f}  {rec.time_s * 1000:.1f} ms  {rec.tokens_per_s:.0f} tok/s  "
            f"{fmt(rec.energy_j, ' J', 2)}  {fmt(rec.tokens_per_j, ' tok/J', 1)}",
        )


def timed(fn: Callable[[], object], count: int) -> list[float]:
    out = []
    for _ in range(count):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def calibrate(target_s: float) -> int:
    """The batch size whose bare step takes about ``target_s``."""
    batch = 1
    while True:
        t = Trainer(batch)
        timed(t.step, 3)
        median = statistics.median(timed(t.step, 7))
        if median >= target_s or batch >= 4096:
            break
        batch *= 2
    # a step is close to linear in the batch here: scale to the target
    return max(1, round(batch * target_s / median))


def alternate(
    base: Callable[[], object], other: Callable[[], object], pairs: int
) -> tuple[list[float], list[float]]:
    """Step times of ``base`` and ``other`` run one step each in turn (ABBA order), paired."""
    timed(base, 5)
    timed(other, 5)
    a: list[float] = []
    b: list[float] = []
    perf = time.perf_counter
    for i in range(pairs):
        first, second = (base, other) if i % 2 == 0 else (other, base)
        t0 = perf()
        first()
        t1 = perf()
        second()
        t2 = perf()
        ta, tb = (t1 - t0, t2 - t1) if i % 2 == 0 else (t2 - t1, t1 - t0)
        a.append(ta)
        b.append(tb)
    return a, b


def alternate_blocks(
    base: Callable[[], object],
    other: Callable[[int], list[float]],
    rounds: int,
    block: int,
) -> tuple[list[float], list[float]]:
    """Like :func:`alternate`, in blocks of ``block`` steps (for set-up that spans a block)."""
    a: list[float] = []
    b: list[float] = []
    for r in range(rounds):
        if r % 2 == 0:
            a.extend(timed(base, block))
            b.extend(other(block))
        else:
            b.extend(other(block))
            a.extend(timed(base, block))
    return a, b


def overhead(base: list[float], other: list[float], *, block: int = 1) -> dict[str, Any]:
    """Ratios of ``other`` to ``base``, with a bootstrap 95 % interval of the paired median."""
    if block == 1:
        paired = [o / b for b, o in zip(base, other, strict=True)]
    else:
        paired = [
            statistics.median(other[i : i + block]) / statistics.median(base[i : i + block])
            for i in range(0, len(base), block)
        ]
    rng = random.Random(0)
    boots = sorted(statistics.median(rng.choices(paired, k=len(paired))) for _ in range(1000))
    return {
        "median_ratio": statistics.median(other) / statistics.median(base),
        "mean_ratio": statistics.fmean(other) / statistics.fmean(base),
        "paired_median_ratio": statistics.median(paired),
        "paired_ci95": [boots[25], boots[974]],
    }


def run(target_ms: float, pairs: int, rounds: int, block: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    logging.getLogger("wattwarden").setLevel(logging.WARNING)
    batch = calibrate(target_ms / 1000)
    trainer = Trainer(batch)  # one model for every mode: only the instrumentation differs
    fleet = SimFleet(2)
    fleet[0].set_load(0.8)
    fleet[1].set_load(0.8)
    fleet[1].inject("not_supported", field="energy")
    install_fake_nvml(fleet)
    results: dict[str, tuple[list[float], list[float], int]] = {}
    added: dict[str, list[float]] = {}
    probe = Trainer(1)
    try:
        counter = EnergyMeter(gpus=[0], source="nvml", host=False)
        counter.begin_window("step")
        bare, inst = alternate(trainer.step, lambda: trainer.instrumented_step(counter), pairs)
        results["nvml counter"] = (bare, inst, 1)
        added["nvml counter"] = timed(lambda: probe.record(1.0, *_lap(counter)), 2000)
        counter.close()

        def polled_block(steps: int) -> list[float]:
            # the meter (and its polling thread) lives for the block only: bare blocks run
            # without the thread, so its CPU and GIL share shows in the comparison
            with EnergyMeter(gpus=[1], source="nvml", host=False) as polled:
                polled.begin_window("step")
                return timed(lambda: trainer.instrumented_step(polled), steps)

        bare, inst = alternate_blocks(trainer.step, polled_block, rounds, block)
        results["nvml polled"] = (bare, inst, block)
        with EnergyMeter(gpus=[1], source="nvml", host=False) as polled:
            polled.begin_window("step")
            added["nvml polled"] = timed(lambda: probe.record(1.0, *_lap(polled)), 2000)
    finally:
        uninstall_fake_nvml()

    with (
        real_agent(8) as url,
        EnergyMeter(gpus=[0], source="agent", agent_url=url, host=False) as agent_meter,
    ):
        agent_meter.begin_window("step")
        agent_pairs = max(pairs // 3, 20)
        bare, inst = alternate(
            trainer.step, lambda: trainer.instrumented_step(agent_meter), agent_pairs
        )
        results["agent"] = (bare, inst, 1)
        added["agent"] = timed(lambda: probe.record(1.0, *_lap(agent_meter)), 200)

    rows = []
    for name, (bare, inst, blk) in results.items():
        bare_median = statistics.median(bare)
        added_s = statistics.median(added[name])
        rows.append(
            {
                "mode": name,
                "steps_each": len(inst),
                "bare_median_ms": bare_median * 1e3,
                "median_ms": statistics.median(inst) * 1e3,
                **overhead(bare, inst, block=blk),
                "added_us_per_step": added_s * 1e6,
                "direct_overhead_pct": added_s / bare_median * 100.0,
            }
        )
    counter_row = rows[0]
    return {
        "batch_size": batch,
        "seq_len": SEQ_LEN,
        "model": "tiny",
        "torch_threads": 1,
        "target_step_ms": target_ms,
        "pairs": pairs,
        "polled_rounds": rounds,
        "polled_block": block,
        "rows": rows,
        "added_us": {k: summary([x * 1e6 for x in v]) for k, v in added.items()},
        "goal": f"instrumentation overhead under {GOAL_PCT} % of a ~{target_ms:.0f} ms step "
        "(NVML counter): the added work per step timed alone, and the paired side-by-side "
        "ratio's 95 % interval reaching below it",
        "goal_met": counter_row["direct_overhead_pct"] < GOAL_PCT
        and (counter_row["paired_ci95"][0] - 1) * 100 < GOAL_PCT,
    }


def _lap(meter: EnergyMeter) -> tuple[float, float | None, float | None]:
    m = meter.lap("step")
    return m.elapsed_s, m.gpu_total_j, m.host_total_j


def report(p: dict[str, Any]) -> str:
    def pct(value: float) -> float:
        return (value - 1.0) * 100.0

    rows = [
        (
            r["mode"], r["steps_each"], r["bare_median_ms"], r["median_ms"],
            pct(r["median_ratio"]), pct(r["mean_ratio"]), pct(r["paired_median_ratio"]),
            f"[{pct(r['paired_ci95'][0]):+.2f}, {pct(r['paired_ci95'][1]):+.2f}]",
            r["added_us_per_step"], r["direct_overhead_pct"],
        )
        for r in p["rows"]
    ]  # fmt: skip
    headers = ("mode", "steps", "bare ms", "with ms", "+% median", "+% mean", "+% paired",
               "paired 95% CI", "added us", "direct +%")  # fmt: skip
    return "\n".join(
        [
            f"tiny LM, batch {p['batch_size']} x {p['seq_len']} tokens, 1 torch thread; "
            f"side by side: one step each in turn ({p['pairs']} pairs; polled: blocks of "
            f"{p['polled_block']} x {p['polled_rounds']} rounds)",
            table(headers, rows),
            f"goal: {p['goal']}: {'met' if p['goal_met'] else 'NOT met'}",
        ]
    )


OPTIONS = (
    Option("--target-ms", 20.0),
    Option("--pairs", 600, "bare/instrumented step pairs", quick=100),
    Option("--rounds", 20, "polled mode: block rounds", quick=6),
    Option("--block", 15, "polled mode: steps per block", quick=10),
)


def main(argv: list[str] | None = None) -> int:
    """Run, print the table, write ``results/bench_train_overhead.json``."""
    return run_benchmark(NAME, __doc__, run, report, options=OPTIONS, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
