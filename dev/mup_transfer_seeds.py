"""
The muP learning-rate transfer check of tests/test_mup.py (check_lr_transfer) repeated over seeds: for each
seed (model init and the fixed batch), the final losses over the multiplier grid at both transfer widths,
under muP and SP, and the fitted optimum (log2 of the multiplier). The shift of that optimum between the
widths is what the test compares; this shows how much of it is seed noise (dev/LOG.md, 2026-12-07).

    OMP_NUM_THREADS=2 python -m dev.mup_transfer_seeds --seeds 0,1,2
"""

import argparse
import os
import sys


def final_losses(mup_test, width, use_mup, seed):
    """{multiplier: loss of the last forward} as transfer_final_losses, with this seed for init and batch."""
    x, y = mup_test.fixed_batch(8, "cpu", seed=seed)
    finals = {}
    for mult in mup_test.TRANSFER_MULTIPLIERS:
        model = mup_test.build(width, mup_test.TRANSFER_BASE if use_mup else 0, "cpu", seed=seed)
        lrs = {k: v * mult for k, v in mup_test.TRANSFER_LRS.items()}
        finals[mult] = mup_test.train(model, x, y, mup_test.TRANSFER_STEPS, lrs, use_mup=use_mup,
                                      base_width=mup_test.TRANSFER_BASE)[-1]
    return finals


def main(argv=None):
    parser = argparse.ArgumentParser(description="muP LR transfer check over seeds")
    parser.add_argument("--seeds", type=str, default="0,1,2", help="comma-separated seeds")
    args = parser.parse_args(argv)
    os.environ.setdefault("NANOCHAT_DTYPE", "float32")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
    import test_mup as mup_test  # the test's model family, grid and fit, so both measure the same thing
    rows = []
    for seed in map(int, args.seeds.split(",")):
        for name in ("muP", "SP"):
            fitted = {}
            for width in mup_test.TRANSFER_WIDTHS:
                finals = final_losses(mup_test, width, name == "muP", seed)
                try:
                    fitted[width] = mup_test.fitted_log2_optimum(finals)
                except AssertionError:  # the best multiplier at the grid's edge: no vertex to fit
                    fitted[width] = float("nan")
                losses = " ".join(f"{finals[m]:8.4f}" for m in mup_test.TRANSFER_MULTIPLIERS)
                rows.append(f"{seed:>4} {name:<4} {width:>5} {losses} {fitted[width]:+7.2f}")
            small, large = mup_test.TRANSFER_WIDTHS
            rows.append(f"{seed:>4} {name:<4} shift {abs(fitted[large] - fitted[small]):.2f} octave")
    grid = " ".join(f"x{m:<7g}" for m in mup_test.TRANSFER_MULTIPLIERS)
    print(f"seed param width {grid}  fitted log2")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
