#!/bin/bash
# Leave-one-out ablations of the modern preset: tiny size, seed 0, 7.5e11 training FLOPs per run, gcide10m.
# Each component is switched back to base's choice in turn; `ref` is the preset as it was then, with a ReLU²
# MLP (--mlp relu2, pinned here: the preset's MLP became SwiGLU after these runs; a later flag wins).
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${1:-/tmp/studies/ablate}
run() {  # NAME FLAGS...
    local name=$1; shift
    python -m charlm.study --dataset gcide10m --data-root /tmp/data --conditions modern --budget 7.5e11 \
        --seeds 1 --preset tiny --device cpu --mlp relu2 --out-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
run ref
run adamw --optimizer adamw
run no-qk-norm --no-qk-norm
run gelu --mlp gelu
run no-zero-init --no-zero-init
run cosine --lr-schedule cosine
run swiglu --mlp swiglu
run layernorm --norm layernorm
run learned-pos --pos-embedding learned
