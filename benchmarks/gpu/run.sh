#!/usr/bin/env bash
# The GPU check in one command: parity tests on CUDA (and the CUDA-graph recipe), then prefill/decode/memory of
# baseline vs ShortV at the paper shapes, eager, CUDA graphs and torch.compile, beside the FLOPs-ideal and roofline
# speedups and issue #23's targets. See benchmarks/gpu/README.md.
#
#   bash benchmarks/gpu/run.sh OUTDIR            # on a machine with a CUDA GPU (8 minutes on an H200)
#   bash benchmarks/gpu/run.sh OUTDIR --smoke    # anywhere, on CPU, with miniature shapes (CI runs this)
#
# Writes into OUTDIR: log.txt, env.txt, parity.txt, parity.xml, cells.jsonl, results.json, report.md.
# Environment: PYTHON (default python3), SHORTV_GPU_BUDGET_S (default 465: the whole script, parity included).
# Exit status: 0 when the parity tests passed and the measurement finished in time, else 1.
set -uo pipefail

if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: $0 OUTDIR [--smoke]" >&2
    exit 2
fi
SMOKE=${2:-}
if [[ $# -gt 2 || ( -n $SMOKE && $SMOKE != --smoke ) ]]; then
    echo "usage: $0 OUTDIR [--smoke]" >&2
    exit 2
fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd) || exit 2
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
BUDGET_S=${SHORTV_GPU_BUDGET_S:-465}
WHEELS=benchmarks/gpu/wheels
SITE=/tmp/shortv-gpu-site

main() {
    local started deadline parity_rc measure_rc device parity_args
    started=$(date +%s)
    deadline=$((started + BUDGET_S))
    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
    # The CUDA-graph recipe as a user runs it (inductor, reduce-overhead): on CUDA it also checks that no graph
    # skipped its CUDA graph.
    local cuda_graphs_test=tests/test_compile.py::test_cuda_graph_recipe_with_inductor_reduce_overhead_equals_eager
    if [[ -n $SMOKE ]]; then
        device=cpu
        parity_args=("tests/test_parity.py::test_fast_matches_reference_and_changes_text_logits[llava]" \
            "$cuda_graphs_test")
    else
        device=cuda
        parity_args=(tests/test_parity.py "$cuda_graphs_test")
        # The GPU machine's transformers is older than shortv supports: install the wheels fetched beforehand
        # by download_wheels.sh (they shadow the installed packages through PYTHONPATH; torch is left alone).
        if compgen -G "$WHEELS/*.whl" >/dev/null; then
            "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
                "$WHEELS"/*.whl || return 1
            export PYTHONPATH=$SITE:$PWD
        else
            echo "note: no wheels in $WHEELS; using the installed packages"
        fi
    fi

    echo "== environment ($(date -u +%FT%TZ))"
    {
        command -v nvidia-smi >/dev/null && nvidia-smi
        "$PYTHON" -m pip list 2>/dev/null | grep -iE "^(torch|transformers|accelerate|tokenizers|huggingface|safetensors|regex) "
    } >"$OUT/env.txt" 2>&1
    "$PYTHON" -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, \
'| transformers', transformers.__version__, '| cuda', torch.cuda.is_available(), torch.version.cuda); \
from shortv._compat import check_transformers_version as check; check()" >>"$OUT/env.txt" 2>&1
    local env_rc=$?
    cat "$OUT/env.txt"
    if [[ $env_rc != 0 ]]; then
        echo "error: shortv cannot run with these packages; run benchmarks/gpu/download_wheels.sh and carry $WHEELS"
        return 1
    fi

    echo "== parity tests on $device"
    SHORTV_TEST_DEVICE=$device timeout 200 "$PYTHON" -m pytest -o addopts= -q -p no:cacheprovider -rfE \
        --junitxml "$OUT/parity.xml" "${parity_args[@]}" >"$OUT/parity.txt" 2>&1
    parity_rc=$?
    tail -n 5 "$OUT/parity.txt"

    echo "== measurements ($((deadline - $(date +%s))) s left)"
    rm -f "$OUT/cells.jsonl"
    timeout $((deadline - $(date +%s) + 5)) "$PYTHON" benchmarks/gpu/measure.py "$OUT" --device "$device" \
        --deadline $((deadline - 10)) $SMOKE
    measure_rc=$?
    [[ $measure_rc == 124 ]] && echo "measurement stopped at the time limit; the report has what finished"

    echo "== report"
    "$PYTHON" benchmarks/gpu/report.py "$OUT" || return 1
    echo "== done in $(($(date +%s) - started)) s: parity exit $parity_rc, measurement exit $measure_rc; $OUT/report.md"
    [[ $parity_rc == 0 && $measure_rc == 0 ]]
}

main 2>&1 | tee "$OUT/log.txt"
exit "${PIPESTATUS[0]}"
