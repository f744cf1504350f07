"""Running the scheme: every stage trained (or skipped, or resumed), evaluated and recorded, in order."""
from pathlib import Path

from charlm.checkpoint import latest_checkpoint
from charlm.eval import evaluate
from charlm.experts.report import write_report
from charlm.experts.scheme import Scheme, SchemeError, Stage, final_checkpoint
from charlm.experts.state import checkpoint_sha256, open_state, save_state
from charlm.job import train
from charlm.runtime import SINGLE_PROCESS, DistContext


def run_stage(scheme: Scheme, state: dict, stage: Stage, init: Path | None, ctx: DistContext) -> Path:
    """Train a stage to its end (skipped if done, resumed if interrupted), evaluate and record it.
    Returns its final checkpoint. Under torchrun every rank runs it (training and evaluation are
    data-parallel, so every rank holds the same record); rank 0 writes and prints."""
    run_dir = scheme.stage_dir(stage)
    record = state["stages"].setdefault(stage.name, {})
    record.update(kind=stage.kind, category=stage.category, iters=stage.iters, steps_total=stage.steps_total,
                  dir=str(run_dir) if run_dir == scheme.pre_from else stage.name)
    if init is not None:
        init_sha = checkpoint_sha256(init)
        if latest_checkpoint(run_dir) is not None and record.get("init_from") not in (None, init_sha):
            raise SchemeError(f"{run_dir} was trained from other weights than those now in {init}, which has been "
                              f"retrained since: delete {run_dir} (and the stages after it) to redo it")
        record["init_from"] = init_sha
    final = final_checkpoint(run_dir, stage.iters)
    if final is None:
        save_state(scheme, state, ctx)  # which weights the stage starts from is on disk before it trains
        ctx.print(f"\n=== {stage.name}: {stage.iters} steps" + (f" from {init}" if init else ""), flush=True)
        train(scheme.stage_config(stage, init), ctx)
        final = final_checkpoint(run_dir, stage.iters)
        if final is None:  # stopped by a signal, its checkpoint saved
            raise SchemeError(f"{stage.name} stopped before step {stage.iters}; run the same command again "
                              f"to resume it")
    else:
        ctx.print(f"=== {stage.name}: done ({stage.iters} steps), skipped", flush=True)
    evaluate_stage(scheme, stage, record, final, ctx)
    save_state(scheme, state, ctx)
    return final


def evaluate_stage(scheme: Scheme, stage: Stage, record: dict, checkpoint: Path, ctx: DistContext) -> None:
    """Full-pass val and test BPC of the stage's final checkpoint, and for a fine-tune or a post-train, BPC
    on its category's val subset; kept in the record, and not redone while the checkpoint stays the same."""
    sha = checkpoint_sha256(checkpoint)
    if record.get("evaluated") == sha:
        return
    run_dir, device = scheme.stage_dir(stage), scheme.base.device
    save = run_dir != scheme.pre_from  # a --from run's own eval.json (another stride, say) stays as it was
    full = evaluate(run_dir, device=device, checkpoint=checkpoint, ctx=ctx, save=save)
    record.update(val_bpc=full["val_bpc"], test_bpc=full["test_bpc"], protocol=full["protocol"], subset_val_bpc=None)
    if stage.category:
        subset = evaluate(run_dir, device=device, splits=("val",), checkpoint=checkpoint,
                          category=f"{scheme.categories}/{stage.category}", ctx=ctx, save=save)
        record["subset_val_bpc"] = subset["val_bpc"]
    record["evaluated"] = sha
    ctx.print(f"=== {stage.name}: val bpc {full['val_bpc']:.4f}, test bpc {full['test_bpc']:.4f}"
              + (f", {stage.category} val subset bpc {record['subset_val_bpc']:.4f}" if stage.category else ""))


def select_experts(scheme: Scheme, state: dict) -> list[Stage]:
    """The top_k fine-tunes by global val BPC (ties: the earlier one)."""
    fine = scheme.fine_stages()
    return sorted(fine, key=lambda s: state["stages"][s.name]["val_bpc"])[:scheme.top_k]


def run_scheme(scheme: Scheme, ctx: DistContext = SINGLE_PROCESS) -> str:
    """Every stage in order, then the report; returns the report's Markdown (rank 0; "" on other ranks)."""
    state = open_state(scheme)
    scheme.out_dir.mkdir(parents=True, exist_ok=True)
    pretrained = run_stage(scheme, state, scheme.pre_stage(), None, ctx)
    finals, previous = {}, pretrained
    for stage in scheme.fine_stages():
        previous = finals[stage.name] = run_stage(scheme, state, stage, previous, ctx)
    experts = select_experts(scheme, state)
    state["selected"] = [s.name for s in experts]
    save_state(scheme, state, ctx)
    if scheme.post_iters > 0:
        for fine in experts:
            run_stage(scheme, state, scheme.post_stage(fine), finals[fine.name], ctx)
    run_stage(scheme, state, scheme.control_stage(), pretrained, ctx)
    return write_report(scheme.out_dir) if ctx.is_master else ""
