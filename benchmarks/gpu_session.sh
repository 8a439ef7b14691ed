#!/usr/bin/env bash
# The one prepared script for a GPU session (issue 5's GPU targets, the CUDA parity tests, issue 2's CUDA speed).
#
# Before the run, on the development machine (../shared does not travel to the GPU machine; /devdata/ is
# git-ignored, 41 MiB, within the 64 MiB carry limit):
#   mkdir -p devdata && cp -r ../shared/data/{cifar-10-batches-py,weights,frost,SHA256SUMS} devdata/
# Then run it there with `carry: ["devdata"]`, e.g. through the device tool:
#   bash benchmarks/gpu_session.sh devdata "$OUT"
# The steps' limits add up to more than one 10-minute command: a third argument picks steps by name (an extended
# regular expression), e.g. `bash benchmarks/gpu_session.sh devdata "$OUT" 'time_'` for issue 22's steps only.
# Every step has its own time limit and writes into OUT as it goes, so a step that fails or runs out of time
# loses nothing of the others. Record the figures in benchmarks/RESULTS.md with the device name it prints.
set -u
DATA=${1:-devdata}
OUT=${2:-benchmarks/out/gpu}
ONLY=${3:-.}
mkdir -p "$OUT"
export TTA_SURGICAL_DATA="$DATA"
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, never stop the script
    local name=$1 limit=$2
    shift 2
    if ! [[ $name =~ $ONLY ]]; then return; fi
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "    rc=$? in $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
}

pip install -q --no-deps -e . >"$OUT/install.log" 2>&1 || echo "editable install failed (see install.log)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python -c "import torch, torchvision; print(torch.__version__, torchvision.__version__)" | tee -a "$OUT/device.txt"

# CUDA parity and GPU-only paths (corruptions on CUDA vs CPU, engine bf16 + channels_last vs CPU, GPU JPEG).
step pytest_gpu 120 python -m pytest -m gpu -q -p no:cacheprovider
# Targets: p95 < 5 ms at batch 1 for resnet20 tent; tent cost over inference; ours vs the plain loop.
step bench_cuda 120 tta-surgical bench --device cuda --interleave --models resnet20 resnet56 resnet50 \
    --methods inference,source,norm,tent,surgical:block1,surgical:all,reference_tent --batch-sizes 1 16 64 200 \
    --warmup 10 --iters 50 --no-autograd --out "$OUT/bench_cuda"
step bench_cuda_graphs 60 tta-surgical bench --device cuda --models resnet20 --methods inference,tent,reference_tent \
    --batch-sizes 1 64 --compile --compile-mode reduce-overhead --warmup 10 --iters 50 --no-autograd \
    --out "$OUT/bench_cuda_graphs"
# Target: the full continual CIFAR-10-C stream (15 x 10,000, severity 5, generated on the fly) under 10 s.
step stream_cifar 90 python benchmarks/stream_timing.py --scenario cifar --device cuda \
    --methods source,tent,surgical:block1 --out "$OUT/stream_cifar"
# Target: ResNet-50 tent at batch 64 from an on-the-fly corrupted 224x224 stream, >= 3,000 images/s end to end.
step stream_imagenet 90 python benchmarks/stream_timing.py --scenario imagenet --device cuda --batch-size 64 \
    --n-per-corruption 640 --methods source,tent --set runtime.num_workers=8 --out "$OUT/stream_imagenet"
# Issue 2: corruption throughput on the GPU (target 100k CIFAR images/s).
step corruption_speed 60 python benchmarks/corruption_speed.py --device cuda --no-reference \
    --out "$OUT/corruption_speed_cuda.json"
# Issue 22, time pressure on this GPU. Step costs of every method and selection (x plain inference, batch 200): the
# GPU column of configs/time/cpu_step_costs.yaml.
step time_costs 90 tta-surgical bench --device cuda --interleave --models resnet20 --methods \
    inference,source,norm,lame,tent,tent:block1,tent:block2,eta,eta:block1,eta:block2,eata,sar,deyo,roid,rotta,cotta \
    --batch-sizes 200 --warmup 5 --iters 20 --no-autograd --out "$OUT/time_costs"
# The realistic protocol with measured costs (the protocol's answer for this device) at 1x, 1/2x, 1/4x plain
# inference and waiting, synchronous and asynchronous (a CUDA stream), resnet20, continual, 15 x 1,000.
step time_frontier 180 tta-surgical frontier --methods source,norm,tent,eta,cotta --blocks default,block1 \
    --budgets wait,speed:1,speed:0.5,speed:0.25,speed:1+async --stream streams/cifar10c_continual.yaml \
    --out "$OUT/time_frontier" --title "resnet20 on $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
    runtime.device=cuda stream.n_examples=1000
# Asynchronous adaptation on a CUDA stream vs synchronous steps, as fast as possible (images/s served, share adapted).
step time_async 90 python benchmarks/time_async.py --device cuda --rounds 2 --n-per-corruption 1000 \
    --out "$OUT/time_async.json"
echo "done; outputs in $OUT"
