#!/bin/bash
# A second seed where one seed left the MLP choice open (ReLU^2, GELU, SwiGLU): seed 1, as ablate.sh otherwise.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OUT=${1:-/tmp/studies/ablate-s1}
run() {  # NAME FLAGS...
    local name=$1; shift
    python -m charlm.study --dataset gcide10m --data-root /tmp/data --conditions modern --budget 7.5e11 \
        --seeds 2 --only modern:1 --preset tiny --device cpu --mlp relu2 --out-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
}
mkdir -p "$OUT"
run ref
run gelu --mlp gelu
run swiglu --mlp swiglu
