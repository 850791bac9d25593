#!/usr/bin/env bash
# The GPU checks and benchmarks in one go (under 10 minutes on one H100 or H200), for a lent
# machine where every minute counts: the `gpu`-marked tests, then each GPU benchmark, each
# step under its own time limit. The log (steps.log), benchmarks/RESULTS.md and the demo's
# manifest are copied to OUT_DIR after every step.
#
#   bash benchmarks/run_gpu.sh OUT_DIR [STEP ...]     (default: every step)
#   bash benchmarks/run_gpu.sh OUT_DIR open           (what the open issues still need
#                                                      measured, about 4 minutes)
#   bash benchmarks/run_gpu.sh OUT_DIR seg_profile    (issue 11: where the best seg step's
#                                                      GPU time goes, about 4 minutes)
#   bash benchmarks/run_gpu.sh OUT_DIR s2b            (issue 11: dilated convolutions as space
#                                                      to batch, then the bf16 pipeline, about
#                                                      9 minutes)
#
# Steps: gpu_tests walk ddp cam_fp32 cam_bf16 seeds crf seeds_gpu pipeline pipeline_crf_gpu
# pipeline_serial pipeline_steady pipeline_bf16 eval_maps seg_fp32 seg_bf16 seg_tuned seg_compile
# seg_stage seg_best seg_profile open_tests s2b_tests dilated_conv seg_s2b seg_convs map_profile demo
# demo_bf16
set -u -o pipefail
out=${1:-/tmp/amnseg-gpu}
shift || true
# `open`: the new GPU tests; issue 13's bf16 pipeline at 320 images (the map stages' steady
# rate against their bare forwards since the seeds are read in loader workers and copied from
# pinned memory, and the VOC projection); issue 11's lower bound, the seg step's convolutions.
open_steps="open_tests pipeline_bf16 seg_convs"
# `s2b`: backbone.space_to_batch's GPU equality test, its convolutions against cuDNN's dilated
# kernels, the seg stage's best setting with and without it, and the bf16 pipeline.
s2b_steps="s2b_tests dilated_conv pipeline_bf16 seg_s2b"
wanted=" ${*:-gpu_tests walk ddp cam_fp32 cam_bf16 seeds crf seeds_gpu pipeline pipeline_crf_gpu pipeline_serial pipeline_steady pipeline_bf16 eval_maps seg_fp32 seg_bf16 seg_tuned seg_compile seg_stage seg_profile dilated_conv seg_convs map_profile demo demo_bf16} "
wanted=${wanted/ open / $open_steps }
wanted=${wanted/ s2b / $s2b_steps }
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    [[ $wanted == *" $name "* ]] || return 0
    echo "=== $name: $*" | tee -a "$out/steps.log"
    timeout "$limit" "$@" >> "$out/steps.log" 2>&1
    echo "=== $name: exit $? after $((SECONDS - started)) s" | tee -a "$out/steps.log"
    cp benchmarks/RESULTS.md "$out/RESULTS.md"
}

nvidia-smi -L | tee -a "$out/steps.log"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
    | tee -a "$out/steps.log"
step gpu_tests 90 python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/test_walk_kernel.py tests/test_walk_cuda.py tests/test_precision.py tests/test_models.py tests/test_cam_stage.py \
    tests/test_fold_norm.py tests/test_permutohedral.py tests/test_space_to_batch.py
step walk 90 python3 -m benchmarks.bench_random_walk_gpu
# BatchNorm that normalises (and a smaller lr) keeps random-weight training finite.
step ddp 80 python3 -m benchmarks.bench_ddp --images 128 backbone.norm=batch cam.lr=0.01
step cam_fp32 30 python3 -m benchmarks.bench_cam_inference --device cuda
step cam_bf16 30 python3 -m benchmarks.bench_cam_inference --device cuda --amp --channels-last
step seeds 60 python3 -m benchmarks.bench_seeds --images 160 --workers 16 8
step crf 90 python3 -m benchmarks.bench_crf --images 32 --batches 1 8 16 32 --cpu-images 2
step seeds_gpu 90 python3 -m benchmarks.bench_seeds --images 160 --workers 16 8 --crf-device cuda
step pipeline 170 python3 -m benchmarks.bench_pipeline --images 160 --workers 16 --bare
step pipeline_crf_gpu 170 python3 -m benchmarks.bench_pipeline --images 160 --workers 16 seeds.crf_device=cuda
step pipeline_serial 170 python3 -m benchmarks.bench_pipeline --images 160 --workers 16 seeds.overlap=false
# 320 images on one data folder (made once): steadier rates than 160; no cudnn_benchmark, whose
# search made one MSC step of the seg stage take 22 s.
step pipeline_steady 200 python3 -m benchmarks.bench_pipeline --images 320 --workers 16 --bare \
    --keep /tmp/amnseg-pipeline-320 seeds.crf_device=cuda
step pipeline_bf16 200 python3 -m benchmarks.bench_pipeline --images 320 --workers 16 --bare \
    --keep /tmp/amnseg-pipeline-320 seeds.crf_device=cuda amp=bf16 channels_last=true compress_maps=false
step eval_maps 60 python3 -m benchmarks.bench_eval_maps --images 160 --workers 1 16
step seg_fp32 50 python3 -m benchmarks.bench_seg --steps 10
step seg_bf16 50 python3 -m benchmarks.bench_seg --steps 10 --amp --channels-last
step seg_tuned 150 python3 -m benchmarks.bench_seg --steps 20 --amp --channels-last --cudnn-benchmark
step seg_compile 300 python3 -m benchmarks.bench_seg --steps 20 --amp --channels-last --compile
step seg_stage 450 python3 -m benchmarks.bench_seg_stage --images 100 --iterations 30 --workers 16 \
    --variants bf16_tuned bf16_fused_folded_compiled bf16_fused_folded_graphs \
    bf16_fused_folded_s2b_compiled
step seg_best 200 python3 -m benchmarks.bench_seg_stage --images 100 --iterations 30 --workers 16 \
    --variants bf16_fused_folded_compiled
# The network alone with the seg stage's fastest options (folded BatchNorm, compiled): its
# kernels by device time, in seg_profile_b10.txt.
step seg_profile 300 python3 -m benchmarks.bench_seg --steps 10 --repeats 1 --amp --channels-last \
    --cudnn-benchmark --fold-norm --compile --profile "$out"
step open_tests 40 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_space_to_batch.py \
    tests/test_models.py
step s2b_tests 30 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_space_to_batch.py
step dilated_conv 45 python3 -m benchmarks.bench_dilated_conv
step seg_s2b 300 python3 -m benchmarks.bench_seg_stage --images 100 --iterations 30 --workers 16 \
    --variants bf16_fused_folded_compiled bf16_fused_folded_s2b_compiled
# Issue 11: every convolution of a seg step timed alone, the step's lower bound (about 1 minute).
step seg_convs 120 python3 -m benchmarks.bench_seg_convs
step map_profile 150 python3 -m benchmarks.profile_map_stage --images 96 --workers 16 "$out"
step demo 300 python3 -m amnseg demo run_dir=/tmp/demo-run data.root=/tmp/demo-data
if [[ -f /tmp/demo-run/manifest.json ]]; then cp /tmp/demo-run/manifest.json "$out/demo_manifest.json"; fi
step demo_bf16 240 python3 -m amnseg demo run_dir=/tmp/demo-bf16 data.root=/tmp/demo-data amp=bf16
if [[ -f /tmp/demo-bf16/manifest.json ]]; then cp /tmp/demo-bf16/manifest.json "$out/demo_bf16_manifest.json"; fi
