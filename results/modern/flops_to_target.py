"""FLOPs-to-target from a study's val curves: where a condition's mean curve (over seeds) first reaches the
reference's final val BPC estimate (mean over seeds), as a share of the reference's FLOPs.

    PYTHONPATH=. python results/modern/flops_to_target.py STUDY_DIR [--reference base] [--condition modern]

Both sides are the trainer's val estimates (metrics.jsonl, eval_iters batches at each eval), so the target
and the curve are measured alike; the crossing is interpolated linearly between eval points.
"""
import argparse
import json
from pathlib import Path

import numpy as np

from charlm.study.report import val_curves


def mean_curve(curves: list[tuple[list[float], list[float]]]) -> tuple[np.ndarray, np.ndarray]:
    """The seeds' mean on the eval points they share (equal-FLOPs runs of one condition share them all)."""
    hi = min(x[-1] for x, _ in curves)
    x = np.unique([v for xs, _ in curves for v in xs if v <= hi])
    return x, np.mean([np.interp(x, xs, ys) for xs, ys in curves], axis=0)


def flops_to_reach(x: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """The first FLOPs at which the curve is at or below target, linearly interpolated; None if never."""
    below = np.flatnonzero(y <= target)
    if not below.size:
        return None
    i = below[0]
    if i == 0:
        return float(x[0])
    return float(x[i - 1] + (x[i] - x[i - 1]) * (y[i - 1] - target) / (y[i - 1] - y[i]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", type=Path)
    parser.add_argument("--reference", default="base")
    parser.add_argument("--condition", default="modern")
    args = parser.parse_args()
    records = [json.loads(p.read_text()) for p in sorted(args.study.glob("runs/*/result.json"))]
    curves = val_curves(records, args.study)
    ref_x, ref_y = mean_curve(curves[args.reference])
    x, y = mean_curve(curves[args.condition])
    target, budget = ref_y[-1], ref_x[-1]
    reached = flops_to_reach(x, y, target)
    share = "never" if reached is None else f"{reached:.3e} FLOPs = {reached / budget:.1%} of {args.reference}'s"
    print(f"{args.reference}'s final val BPC estimate (mean of {len(curves[args.reference])} seeds): {target:.4f} "
          f"at {budget:.3e} FLOPs; {args.condition} (mean of {len(curves[args.condition])} seeds) reaches it "
          f"at {share}")


if __name__ == "__main__":
    main()
