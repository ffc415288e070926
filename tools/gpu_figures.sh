#!/usr/bin/env bash
# The GPU figures of the data-path work (issue #12) in one go, each check under its own time limit, so that one
# short lease of a CUDA machine produces all of them:
#   1. the CUDA-relevant tests (engine speed switches, energy bands, batched views) on the GPU;
#   2. tools/benchmark.py swav-step: the SwAV ResNet-50 step at batch 128 in bf16, eager / channels_last / compiled,
#      against the plain-PyTorch reference step;
#   3. tools/benchmark.py step: the data wait of the full SwAV and UniMiSS train.json, per-item path and batched
#      path (configs/batched_views.json: the views made on the GPU), at 8 and 16 DataLoader workers, on the
#      learnability set; and the items (volumes) per second of the 3D configs;
#   4. tools/benchmark.py mit: MiT-small forward + backward, SDPA against explicit attention.
#
# Usage (repository root; a CUDA build of torch and medssl's dependencies installed, or WHEELS=DIR of wheels):
#   bash tools/gpu_figures.sh                       # logs and a summary in runs/gpu_figures
#   OUT=DIR DATA=DIR WHEELS=DIR bash tools/gpu_figures.sh
#   QUICK=1 bash tools/gpu_figures.sh               # tiny sizes, to check the script itself on a CPU in minutes
#   ONLY="demo_data swav_step" bash tools/gpu_figures.sh   # only the named checks (where one command may run at
#                                                   # most 10 minutes: two calls, checks 1-2 + mit, then the steps)
# Every check writes DIR/<name>.log; DIR/summary.txt lists each check's exit status and its last lines. A check that
# fails or runs out of time does not stop the others.
set -u
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-runs/gpu_figures}
DATA=${DATA:-$OUT/demo_data}
QUICK=${QUICK:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="common${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ]; then  # a machine without the packages and without a network: install the given wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/medssl_site \
        "$WHEELS"/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/medssl_site" || exit 1
fi
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

check() {  # check NAME SECONDS COMMAND...: run COMMAND with a time limit, its output in OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        return 0
    fi
    local start=$SECONDS
    echo "== $name (limit ${limit} s): $*"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local line="$name: exit $rc in $((SECONDS - start)) s$([ "$rc" = 124 ] && echo ' (time limit)')"
    echo "$line"
    { echo "$line"; tail -n 12 "$OUT/$name.log" | sed 's/^/    /'; } >> "$SUMMARY"
}

python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')" | tee -a "$SUMMARY"

if [ "$QUICK" = 1 ]; then
    check demo_data 300 python3 tools/demo_data.py --out "$DATA" --workers 2
    check tests_cuda 600 python3 -m pytest -q -x tests/test_engine_speed.py
    check swav_step 300 python3 tools/benchmark.py swav-step --arch tiny --batch-size 4 --large 32 --small 16 \
        --n-small 2 --iters 1 --warmup 1 --modes plain,eager,channels_last
    STEP=(--iters 2 --warmup 1 --num-workers 0 --knn false)
    SIZES=(--override smoke.json)
else
    check demo_data 240 python3 tools/demo_data.py --out "$DATA" --workers 8
    check tests_cuda 300 python3 -m pytest -q -x tests/test_engine_speed.py tests/test_engine.py \
        tests/test_energy_bands.py tests/test_views.py tests/test_batched_augment.py tests/test_swav_batched_views.py
    check swav_step 420 python3 tools/benchmark.py swav-step --batch-size 128
    STEP=(--iters 30 --warmup 5 --num-workers 8,16 --knn false)
    SIZES=(--override none)
fi
LEARN2D="$DATA/datalist_learn_2d.json"
LEARN="$DATA/datalist_learn.json"
SWAV=bundles/ssl_swav_multimodal_pretrain
UNIMISS=bundles/ssl_unimiss_pretrain
check step_swav 300 python3 tools/benchmark.py step --bundle "$SWAV" "${SIZES[@]}" --dataset-dir "$DATA" \
    --datalist "$LEARN2D" "${STEP[@]}"
check step_swav_batched 300 python3 tools/benchmark.py step --bundle "$SWAV" \
    --override "$([ "$QUICK" = 1 ] && echo smoke.json,)batched_views.json" --dataset-dir "$DATA" --datalist "$LEARN2D" \
    "${STEP[@]}"
check step_unimiss 300 python3 tools/benchmark.py step --bundle "$UNIMISS" "${SIZES[@]}" --dataset-dir "$DATA" \
    --datalist "$LEARN" "${STEP[@]}"
check step_unimiss_batched 300 python3 tools/benchmark.py step --bundle "$UNIMISS" \
    --override "$([ "$QUICK" = 1 ] && echo smoke.json,)batched_views.json" --dataset-dir "$DATA" --datalist "$LEARN" \
    "${STEP[@]}"
check step_swav_3d 300 python3 tools/benchmark.py step --bundle "$SWAV" \
    --override "$([ "$QUICK" = 1 ] && echo train_3d.json,smoke.json,smoke_3d.json || echo train_3d.json)" --dataset-dir "$DATA" \
    --datalist "$DATA/datalist_learn_3d.json" "${STEP[@]}"
if [ "$QUICK" = 1 ]; then
    check mit 300 python3 tools/benchmark.py mit --variant tiny --batch-2d 1 --size-2d 64 --size-3d 64,64,16 --repeats 1
else
    check mit 180 python3 tools/benchmark.py mit
fi
echo "summary: $SUMMARY"
