"""The one-screen summary of one bench/run_all.py run: each claim, its figure, its baseline measured in the
same run, the ratio, and PASS or FAIL against the claim's goal; then how each stage ended.

A claim whose rows are missing (its stage was skipped, timed out or failed) reads "no data" and counts as
neither. The claims pick their rows by role, not by exact shape (DEEP's case, the longest attention
sequence per head dim, RoPE's largest working set), so a dry run's tiny shapes go through the same code.
"""
import math
from collections import defaultdict
from dataclasses import dataclass

from common import format_cell, text_table
from report import markdown_report

AT_LEAST, AT_MOST = ">=", "<="


@dataclass(frozen=True)
class Line:
    claim: str
    figure: str
    baseline: str
    ratio: float | None  # as the goal reads it: a speed-up, or measured over predicted
    goal: tuple[str, float]  # (AT_LEAST or AT_MOST, bound)
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.ratio is None or math.isnan(self.ratio):
            return "no data"
        direction, bound = self.goal
        return "PASS" if (self.ratio >= bound if direction == AT_LEAST else self.ratio <= bound) else "FAIL"


FASTER, NO_MORE = (AT_LEAST, 1.0), (AT_MOST, 1.0)


def _latest(rows: list[dict], **want) -> dict | None:
    """The last row whose fields (bench, impl) and case fields equal want's."""
    found = [r for r in rows if all(r.get(k, r["case"].get(k)) == v for k, v in want.items())]
    return found[-1] if found else None


def _amount(value: float, unit: str) -> str:
    return f"{format_cell(value)} {unit}"


def _missing(claim: str, goal: tuple[str, float], stage: str) -> Line:
    return Line(claim, "-", "-", None, goal, f"no rows: see the {stage} stage")


def training(rows: list[dict]) -> list[Line]:
    charlm = _latest(rows, bench="train", impl="charlm", name="deep")
    base = _latest(rows, bench="train", impl="baseline", name="deep")
    speed = "DEEP training tokens/s, charlm vs nanoGPT-style"
    memory = "DEEP training peak memory, charlm vs nanoGPT-style"
    if not (charlm and base):
        return [_missing(speed, FASTER, "train"), _missing(memory, NO_MORE, "train")]
    lines = [Line(speed, _amount(charlm["tokens_per_s"], "tok/s"), _amount(base["tokens_per_s"], "tok/s"),
                  charlm["tokens_per_s"] / base["tokens_per_s"], FASTER,
                  f"ms p80 {format_cell(charlm.get('ms_p80'))} vs {format_cell(base.get('ms_p80'))}")]
    if charlm["peak_mem_gb"] is None or base["peak_mem_gb"] is None:
        lines.append(Line(memory, "-", "-", None, NO_MORE, "no CUDA memory statistics (CPU)"))
    else:
        lines.append(Line(memory, _amount(charlm["peak_mem_gb"], "GB"), _amount(base["peak_mem_gb"], "GB"),
                          charlm["peak_mem_gb"] / base["peak_mem_gb"], NO_MORE))
    return lines


def memory_planner(rows: list[dict]) -> list[Line]:
    """Per DEEP case: measured allocated peak over the planner's predicted tensors (the plan is safe at or
    under 1); then the largest card total against the emulated card."""
    cases = [r for r in rows if r["bench"] == "memory"]
    if not cases:
        return [_missing("memory planner: measured / predicted tensors", NO_MORE, "memory")]
    lines = []
    for r in cases:
        measured = r.get("allocated_gb")
        lines.append(Line(f"memory planner, DEEP {r['case']['name']}: allocated / predicted",
                          "-" if measured is None else _amount(measured, "GB"),
                          _amount(r["predicted_tensors_gb"], "GB"),
                          None if measured is None else measured / r["predicted_tensors_gb"], NO_MORE,
                          r.get("oom") or f"micro-batch {r['case']['micro_batch']}, checkpointed "
                                          f"{r['case']['checkpoint_layers']}"))
    worst = max(cases, key=lambda r: -1 if r.get("total_gb") is None else r["total_gb"])
    card = worst["case"]["max_memory_gb"]
    fits = f"DEEP fits a {card:g} GB card (reserved + outside)"
    if worst.get("total_gb") is None or not card:
        lines.append(Line(fits, "-", f"{card:g} GB", None, NO_MORE, "no CUDA memory statistics (CPU)"))
    else:
        lines.append(Line(fits, _amount(worst["total_gb"], "GB"), f"{card:g} GB", worst["total_gb"] / card, NO_MORE,
                          f"{worst['case']['name']}; outside the allocator {_amount(worst['outside_gb'], 'GB')} "
                          f"(planned {_amount(worst['predicted_context_gb'], 'GB')})"))
    return lines


def attention(rows: list[dict]) -> list[Line]:
    """fwd+bwd at the longest sequence, per head dim: triton vs the fastest SDPA backend, and RoPE fused
    into the kernel vs apply_rope then the kernel."""
    timed = [r for r in rows if r["bench"] == "attn" and r["case"]["pass"] == "fwd+bwd"]
    if not timed:
        return [_missing("attention fwd+bwd, triton vs fastest SDPA", FASTER, "attn")]
    lines, by_dim = [], defaultdict(list)
    for r in timed:
        by_dim[r["case"]["D"]].append(r)
    for D, dim_rows in sorted(by_dim.items()):
        T = max(r["case"]["T"] for r in dim_rows)
        case_rows = {r["impl"]: r for r in dim_rows if r["case"]["T"] == T}
        sdpa = [r for name, r in case_rows.items() if name.startswith("sdpa")]
        label = f"attention fwd+bwd T={T} D={D}"
        if "triton" in case_rows and sdpa:
            best = min(sdpa, key=lambda r: r["ms"])
            lines.append(Line(f"{label}, triton vs fastest SDPA", _amount(case_rows["triton"]["ms"], "ms"),
                              f"{_amount(best['ms'], 'ms')} ({best['impl']})", best["ms"] / case_rows["triton"]["ms"],
                              FASTER, _amount(case_rows["triton"]["tflops"], "TFLOP/s")))
        if "triton+rope" in case_rows and "rope+triton" in case_rows:
            fused, unfused = case_rows["triton+rope"]["ms"], case_rows["rope+triton"]["ms"]
            lines.append(Line(f"{label}, RoPE fused vs apply_rope + triton", _amount(fused, "ms"),
                              _amount(unfused, "ms"), unfused / fused, FASTER))
    return lines


def rope(rows: list[dict]) -> list[Line]:
    """fwd+bwd on the largest working set (beyond L2 on a GPU): the Triton kernel vs each baseline."""
    timed = [r for r in rows if r["bench"] == "rope" and r["case"]["pass"] == "fwd+bwd"]
    if not timed:
        return [_missing("RoPE fwd+bwd GB/s, triton vs torch.compile", FASTER, "rope")]
    largest = max(timed, key=lambda r: r["gb_moved"])["case"]["name"]
    case_rows = {r["impl"]: r for r in timed if r["case"]["name"] == largest}
    triton = case_rows.get("triton")
    lines = []
    for base in ("compile", "liger"):
        if triton and base in case_rows:
            lines.append(Line(f"RoPE fwd+bwd {largest}, triton vs {base}", _amount(triton["gbps"], "GB/s"),
                              _amount(case_rows[base]["gbps"], "GB/s"), triton["gbps"] / case_rows[base]["gbps"],
                              FASTER, f"{format_cell(triton['frac_of_copy_bw'])} of a copy's bandwidth"))
    return lines or [_missing("RoPE fwd+bwd GB/s, triton vs torch.compile", FASTER, "rope")]


def loader(rows: list[dict]) -> list[Line]:
    lines = []
    nanogpt, cpp = _latest(rows, bench="loader", impl="nanogpt"), _latest(rows, bench="loader", impl="c++", threads=1)
    if nanogpt and cpp:
        lines.append(Line("loader batch, C++ (1 thread) vs nanoGPT get_batch", _amount(cpp["ms"], "ms"),
                          _amount(nanogpt["ms"], "ms"), nanogpt["ms"] / cpp["ms"], FASTER))
    elif nanogpt:
        lines.append(Line("loader batch, C++ vs nanoGPT get_batch", "-", _amount(nanogpt["ms"], "ms"), None, FASTER,
                          "charlm._loader not built"))
    pinned = _latest(rows, bench="loader", impl="c++ prefetched, pinned")
    if pinned and pinned.get("share_of_deep_step") is not None:
        lines.append(Line("loader: trainer's batch() / DEEP step", _amount(pinned["ms"], "ms"),
                          _amount(pinned["deep_step_ms"], "ms"), pinned["share_of_deep_step"], (AT_MOST, 0.01)))
    return lines or [_missing("loader batch, C++ vs nanoGPT get_batch", FASTER, "loader")]


def claims(rows: list[dict]) -> list[Line]:
    return [*training(rows), *memory_planner(rows), *attention(rows), *rope(rows), *loader(rows)]


def markdown_table(header: list[str], cells: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells])


CLAIM_HEADER = ["claim", "figure", "baseline (same run)", "ratio", "goal", "verdict", "note"]
STAGE_HEADER = ["stage", "ended", "seconds", "note"]


def claim_cells(lines: list[Line]) -> list[list[str]]:
    return [[x.claim, x.figure, x.baseline, "-" if x.ratio is None else f"{x.ratio:.3g}",
             f"{x.goal[0]} {x.goal[1]:g}", x.verdict, x.note] for x in lines]


def screen(title: str, lines: list[Line], stages: list[list[str]]) -> str:
    """The plain-text summary printed at the end of a run."""
    verdicts = [x.verdict for x in lines]
    tally = f"{verdicts.count('PASS')} PASS, {verdicts.count('FAIL')} FAIL, {verdicts.count('no data')} no data"
    return "\n".join([title, "", text_table(CLAIM_HEADER, claim_cells(lines)), tally, "",
                      text_table(STAGE_HEADER, stages)])


def report_markdown(title: str, notes: list[str], lines: list[Line], stages: list[list[str]], rows: list[dict]) -> str:
    """report.md: the claims, the stages, the planner's figures beside the measured ones, every row."""
    memory = [r for r in rows if r["bench"] == "memory"]
    planner_header = ["case", "micro-batch", "checkpointed", "predicted tensors", "allocated", "predicted peak",
                      "reserved", "outside", "total", "fits"]
    planner = [[r["case"]["name"], str(r["case"]["micro_batch"]), str(r["case"]["checkpoint_layers"]),
                *(format_cell(r.get(k)) for k in ("predicted_tensors_gb", "allocated_gb", "predicted_peak_gb",
                                           "reserved_gb", "outside_gb", "total_gb", "fits"))] for r in memory]
    sections = [f"# {title}", "\n".join(f"- {note}" for note in notes), "## Claims",
                markdown_table(CLAIM_HEADER, claim_cells(lines)), "## Stages", markdown_table(STAGE_HEADER, stages)]
    if planner:
        sections += ["## Memory planner: predicted beside measured (GB)", markdown_table(planner_header, planner)]
    sections += ["## Every row of this run", markdown_report(rows) if rows else "(none)"]
    return "\n\n".join(sections) + "\n"
