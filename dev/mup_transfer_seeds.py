"""
muP against SP on learning-rate transfer, over seeds: tests/test_mup.py's memorisation task on a finer grid
whose best multiplier is interior (widths 64 and 256, multipliers 1/64 ... 4, 20 steps; dev/LOG.md
2026-12-06). For each seed (model init and the fixed batch), the final losses over the grid at both widths,
under muP and SP, and the fitted optimum (log2 of the multiplier). Whether muP's optimum shifts less than SP's
between the widths is what this compares; it shows how much of that shift is seed noise (dev/LOG.md,
2026-12-07: all of it, so far).

    OMP_NUM_THREADS=2 python -m dev.mup_transfer_seeds --seeds 0,1,2
"""

import argparse
import math
import os
import sys

WIDTHS = (64, 256)
BASE = 64  # muP's base: the small width
MULTIPLIERS = (1 / 64, 1 / 16, 1 / 4, 1, 4)  # evenly spaced in log2 (see fitted_log2_optimum)
STEPS = 20


def final_losses(mup_test, width, use_mup, seed):
    """{multiplier: loss of the last forward} as the test's transfer_final_losses, on this script's grid, with
    this seed for init and batch."""
    x, y = mup_test.fixed_batch(8, "cpu", seed=seed)
    finals = {}
    for mult in MULTIPLIERS:
        model = mup_test.build(width, BASE if use_mup else 0, "cpu", seed=seed)
        lrs = {k: v * mult for k, v in mup_test.TRANSFER_LRS.items()}
        finals[mult] = mup_test.train(model, x, y, STEPS, lrs, use_mup=use_mup, base_width=BASE)[-1]
    return finals


def fitted_log2_optimum(finals):
    """
    log2 of the loss-minimising multiplier between grid points: the vertex of the parabola through
    log(loss) at the best multiplier and its two neighbours (the grid is evenly spaced in log2). It
    shows a shift smaller than one grid step; NaN when the best multiplier is at the grid's edge.
    """
    finite = {m: v for m, v in finals.items() if math.isfinite(v)}  # a NaN loss is never the optimum
    mults = sorted(finals)
    i = mults.index(min(finite, key=finite.get))
    if not 0 < i < len(mults) - 1:
        return float("nan")
    y0, y1, y2 = (math.log(finals[m]) for m in mults[i - 1:i + 2])
    step = math.log2(mults[i + 1] / mults[i])
    return math.log2(mults[i]) + step * (y0 - y2) / (2 * (y0 - 2 * y1 + y2))


def main(argv=None):
    parser = argparse.ArgumentParser(description="muP LR transfer check over seeds")
    parser.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated seeds")
    args = parser.parse_args(argv)
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import test_mup as mup_test  # the test's model family, LRs and training loop
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for name in ("muP", "SP"):
            fitted = {}
            for width in WIDTHS:
                finals = final_losses(mup_test, width, name == "muP", seed)
                fitted[width] = fitted_log2_optimum(finals)
                losses = " ".join(f"{finals[m]:8.4f}" for m in MULTIPLIERS)
                rows.append(f"{seed:>4} {name:<4} {width:>5} {losses} {fitted[width]:+7.2f}")
            small, large = WIDTHS
            rows.append(f"{seed:>4} {name:<4} shift {abs(fitted[large] - fitted[small]):.2f} octave")
    grid = " ".join(f"x{m:<7g}" for m in MULTIPLIERS)
    print(f"seed param width {grid}  fitted log2")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
