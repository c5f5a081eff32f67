"""mimkit's MAE step against the machine: model FLOPs of one step (forward + backward, counted by
torch.utils.flop_counter.FlopCounterMode) / step time, over the FLOP/s of a 2048 x 2048 matmul in the step's
precision timed in the same interleaved rounds, and for bf16 steps also over the fp32 matmul's (the issue's
measure: goal >= 0.57; lightly's MAE reached 0.38 here). Shares its measurement with `peer`."""
from __future__ import annotations

from .common import write_result
from .peer import GOAL_MACHINE, PRESETS, measure, print_rows, summary


def run(repeats: int = 3, compiled: bool = False, preset: str = "cpu") -> dict:
    s = summary(measure(repeats, compiled, preset))
    print_rows(s)
    fractions = {name: r["machine_fraction"] for name, r in s["rows"].items()}
    fp32 = {name: r["machine_fraction_fp32_matmul"] for name, r in s["rows"].items()}
    best = max((n for n in fp32 if n.startswith("mimkit")), key=lambda n: fp32[n]["median"])
    print(f"mimkit MAE step: {fractions['mimkit']['median']:.2f} of the fp32 matmul's FLOP/s; fastest, {best}: "
          f"{fp32[best]['median']:.2f} of the fp32 matmul's, {fractions[best]['median']:.2f} of its own precision's "
          f"(goal >= {GOAL_MACHINE})")
    result = {"preset": PRESETS[preset], "repeats": repeats, "goal": GOAL_MACHINE,
              "matmul_gflops_per_s": s["matmul_gflops_per_s"],
              "matmul_bf16_gflops_per_s": s["matmul_bf16_gflops_per_s"], "fractions": fractions,
              "fractions_fp32_matmul": fp32,
              "flops_per_step": {n: r["flops_per_step"] for n, r in s["rows"].items()}}
    print(f"written to {write_result('machine', result)}")
    return result
