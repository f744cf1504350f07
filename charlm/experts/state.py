"""scheme.json: the settings a scheme folder was started with, each stage's record and the selection."""
import dataclasses
import json
from pathlib import Path

from charlm.checkpoint import checkpoint_entry
from charlm.data import categorisation_sha256
from charlm.experts.scheme import Scheme, SchemeError
from charlm.io import atomic_write_text
from charlm.runtime import DistContext

SCHEME_FILE = "scheme.json"
FORMAT = 1


def scheme_spec(scheme: Scheme) -> dict:
    """What a re-run must share with the first run for its finished stages to be reused."""
    return {"dataset": scheme.base.dataset, "variant": scheme.base.variant, "categories": scheme.categories,
            "categories_sha256": categorisation_sha256(scheme.base.dataset_dir, scheme.categories),
            "order": scheme.order, "pre_iters": scheme.pre_iters, "fine_iters": scheme.fine_iters,
            "post_iters": scheme.post_iters, "from": str(scheme.pre_from) if scheme.pre_from else None,
            "model": dataclasses.asdict(scheme.base.model)}


def read_state(scheme_dir: Path) -> dict:
    path = Path(scheme_dir) / SCHEME_FILE
    if not path.is_file():
        raise SchemeError(f"{scheme_dir}: no {SCHEME_FILE}; run the scheme there first (python -m charlm.experts ...)")
    return json.loads(path.read_text())


def open_state(scheme: Scheme) -> dict:
    """scheme.json's state, new or checked against this run's settings."""
    spec = scheme_spec(scheme)
    if not (scheme.out_dir / SCHEME_FILE).is_file():
        return {"format": FORMAT, "spec": spec, "top_k": scheme.top_k, "stages": {}, "selected": []}
    state = read_state(scheme.out_dir)
    # A setting the first run did not record (an older charlm) is recorded now rather than compared.
    changed = [f"{k}: {state['spec'][k]!r} then, {v!r} now" for k, v in spec.items()
               if k in state["spec"] and state["spec"][k] != v]
    if changed:
        raise SchemeError(f"{scheme.out_dir} was started with other settings ({'; '.join(changed)}): run it with "
                          f"the same flags, or choose another --out-dir")
    return {**state, "spec": spec, "top_k": scheme.top_k}


def save_state(scheme: Scheme, state: dict, ctx: DistContext) -> None:
    if ctx.is_master:
        atomic_write_text(scheme.out_dir / SCHEME_FILE, json.dumps(state, indent=1) + "\n")


def checkpoint_sha256(checkpoint: Path) -> str:
    """A checkpoint's sha256, from its run's manifest (charlm.checkpoint): retraining a stage to other weights
    changes it; moving or copying the scheme's folder does not."""
    return checkpoint_entry(checkpoint)["sha256"]
