"""The table's statistics over seeds: mean ± sample standard deviation, and the difference from the
reference condition with a Welch t-interval. How they are computed is said once, in `describe_statistics`."""
import statistics
import textwrap
from typing import NamedTuple

CONFIDENCE = 0.95
REFERENCE = "base"  # the condition differences are measured from, when it is run


class Spread(NamedTuple):
    mean: float
    std: float | None  # sample standard deviation (ddof = 1); None for a single value


class Difference(NamedTuple):
    """mean(condition) - mean(reference) and its confidence interval (None with < 2 values in either)."""
    diff: float
    low: float | None
    high: float | None


def describe_statistics(reference: str) -> str:
    """What the table's numbers are, as Markdown bullets: written into results.md and shown by --help."""
    bullets = [
        "val and test BPC: mean ± sample standard deviation (ddof = 1) over seeds; with one seed the spread is n/a.",
        f"Δ: mean test BPC of the condition minus that of {reference}, with a {CONFIDENCE:.0%} Welch t-interval: "
        "the seeds of two conditions are independent samples with unequal variances, degrees of freedom by "
        "Welch-Satterthwaite. Seed s gives two conditions at most the same data order (not when their block "
        "sizes differ) and different initial weights, so the runs are not treated as paired; the unpaired "
        "interval is the conservative choice. n/a with fewer than two seeds in either condition. With 3 seeds "
        "the interval is wide; it is meant to be.",
        "results.png: the line is the mean over seeds, the band the min-max (with 3 seeds a standard deviation "
        "says little).",
    ]
    return "\n".join(textwrap.fill(b, 110, initial_indent="- ", subsequent_indent="  ") for b in bullets)


def reference_condition(names: list[str]) -> str:
    """The condition the differences are measured from: base, or the first condition when base is not run."""
    return REFERENCE if REFERENCE in names else names[0]


def mean_std(values: list[float]) -> Spread:
    return Spread(statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None)


def welch_interval(sample: list[float], reference: list[float], level: float = CONFIDENCE) -> Difference:
    """mean(sample) - mean(reference) and its Welch t-interval at `level`."""
    diff = statistics.fmean(sample) - statistics.fmean(reference)
    if len(sample) < 2 or len(reference) < 2:
        return Difference(diff, None, None)
    if statistics.stdev(sample) == statistics.stdev(reference) == 0:  # no spread: the interval is the point
        return Difference(diff, diff, diff)
    from scipy import stats  # here: `python -m charlm.study --help` shows this module's text without scipy

    low, high = stats.ttest_ind(sample, reference, equal_var=False).confidence_interval(level)
    return Difference(diff, float(low), float(high))


def summarize(records: list[dict], reference: str) -> list[dict]:
    """One row per condition (in first-seen order) with the statistics of its seeds."""
    by_condition: dict[str, list[dict]] = {}
    for r in records:
        by_condition.setdefault(r["condition"], []).append(r)
    reference_test = [r["test_bpc"] for r in by_condition.get(reference, [])]
    rows = []
    for name, runs in by_condition.items():
        first = runs[0]
        test = [r["test_bpc"] for r in runs]
        rows.append({"condition": name, "params": first["params"], "steps": first["steps"],
                     "tokens": first["tokens"], "flops": first["flops"], "seeds": len(runs),
                     "val_bpc": mean_std([r["val_bpc"] for r in runs]), "test_bpc": mean_std(test),
                     "diff": None if name == reference or not reference_test else welch_interval(test, reference_test)})
    return rows
