#!/usr/bin/env bash
# Issue 9's GPU numbers from one script, on one H100 / H200, from a checkout (postrl not installed):
#
#   STAGES="train gen-1b gen-135m" bash benchmarks/gpu.sh   # 5-8 minutes (BUDGET 480)
#   STAGES=grpo bash benchmarks/gpu.sh                      # 2-4 minutes (BUDGET = GRPO_LIMIT)
#   bash benchmarks/gpu.sh      # all four stages: BUDGET 480 + GRPO_LIMIT = 720 s, more than one
#                               # 10-minute device call holds; split it as above
#
# Stages (STAGES, default all, in this order; each starts no new step or shape after its limit):
# train     benchmarks/train_step.py: SFT and DPO steps of the Llama-3.2-1B shape at seq 2048, bf16,
#           with postrl's einsum attention and with cuDNN flash attention (--attention xla cudnn),
#           tokens/s and MFU (datasheet peak and a matmul measured in the same run); 2 sequences
#           per step on an 80 GB card, 4 on a larger one (the model's attention keeps [T, T]
#           scores per layer for the backward pass: about 12-22 GiB of activations per
#           2048-token sequence);
# gen-1b    benchmarks/generate.py: postrl vs transformers generate, Llama-3.2-1B shape, bf16,
#           batch 1 16 64 256, 64-token prompts + 256 new tokens, against the measured copy
#           bandwidth;
# gen-135m  (if time is left) the same for the SmolLM2-135M shape, batch 1 and 64;
# grpo      benchmarks/grpo_step.py: one GRPO step (8 prompts x 8 samples, 64 + 256 tokens,
#           SmolLM2-135M shape, bf16) of postrl against TRL's GRPOTrainer, per phase; its own
#           time limit GRPO_LIMIT (default 240 s), reserved from the start. TRL and its missing
#           dependencies travel as wheels in .whl/ (see below).
#
# Every script prints each finished step / shape at once and rewrites its JSON after each, so a
# killed run keeps its partial results. Files go to $OUT when set (the device runner's output
# folder), else benchmarks/results/. Environment knobs: STAGES, BUDGET (seconds for the whole
# command: default 480 when any of the first three stages runs, plus GRPO_LIMIT when grpo does;
# a shape already started may run up to a minute past it), GRPO_LIMIT, TRAIN_BATCH (sequences
# per training step; default by GPU memory as above), TRAIN_ARGS / GEN_ARGS / GRPO_ARGS (appended
# to the scripts' arguments, later ones win: the CPU smoke test runs this file with tiny sizes),
# PYTHON.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
# The GPU image lacks ml_collections (postrl.trainers imports it) and TRL with its dependencies
# datasets, dill and multiprocess: carry their wheels in .whl/ (name .whl in the device call's
# carry; see .library/device/README.md; benchmarks/fetch_wheels.sh downloads them) and they are
# installed here.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
if ! python3 -c "import ml_collections" 2>/dev/null; then
  echo "gpu.sh: ml_collections is missing (the train and grpo stages import postrl.trainers):" \
       "run 'bash benchmarks/fetch_wheels.sh' where there is internet and name .whl in carry" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# A rerun on the same (warm) machine reuses the compiled programs.
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/postrl-jax-cache}"
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
stages=" ${STAGES:-train gen-1b gen-135m grpo} "
has() { case "$stages" in *" $1 "*) return 0 ;; esac; return 1; }
grpo_limit="${GRPO_LIMIT:-240}"
grpo_need=0
if has grpo; then grpo_need=$grpo_limit; fi
first_three=0
if has train || has gen-1b || has gen-135m; then first_three=480; fi
budget="${BUDGET:-$(( first_three + grpo_need ))}"
py="${PYTHON:-python}"
command -v "$py" > /dev/null || py=python3
start=$(date +%s)
left() { echo $(( budget - ($(date +%s) - start) )); }

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit,driver_version --format=csv \
  > "$out/gpu_info.txt" 2>&1
mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -1)
if [ "${mib:-0}" -gt 100000 ] 2>/dev/null; then batch=4; else batch=2; fi
batch="${TRAIN_BATCH:-$batch}"

# Each stage gets the time left minus what the later stages need at least; a stage stops
# starting new shapes / jobs when its own limit is spent (one compile may run past it).
if has train; then
  "$py" benchmarks/train_step.py --config llama-1b --seq 2048 --batch "$batch" --steps 10 \
    --attention xla cudnn --time-limit $(( $(left) - 300 - grpo_need )) --out "$out/train_step_llama-1b.json" \
    ${TRAIN_ARGS:-} 2>&1 | tee "$out/train_step_llama-1b.log"
fi

if has gen-1b; then
  "$py" benchmarks/generate.py --config llama-1b --batch 1 16 64 256 --new-tokens 256 \
    --time-limit $(( $(left) - 90 - grpo_need )) --out "$out/generate_llama-1b.json" \
    ${GEN_ARGS:-} 2>&1 | tee "$out/generate_llama-1b.log"
fi

if has gen-135m && [ $(( $(left) - grpo_need )) -gt 100 ]; then
  "$py" benchmarks/generate.py --config smollm2-135m --batch 1 64 --new-tokens 256 \
    --time-limit $(( $(left) - 40 - grpo_need )) --out "$out/generate_smollm2-135m.json" \
    ${GEN_ARGS:-} 2>&1 | tee "$out/generate_smollm2-135m.log"
fi

# The postrl step compiles in about a minute, then TRL runs in a child process (about 10 s per
# step on an H100 / H200); the script stops starting steps at its limit.
if has grpo && [ "$(left)" -gt 60 ]; then
  limit=$(( $(left) - 15 ))
  if [ "$limit" -gt "$grpo_limit" ]; then limit=$grpo_limit; fi
  "$py" benchmarks/grpo_step.py --config smollm2-135m --time-limit "$limit" \
    --out "$out/grpo_step_smollm2-135m.json" ${GRPO_ARGS:-} 2>&1 \
    | tee "$out/grpo_step_smollm2-135m.log"
fi
echo "gpu.sh done in $(( $(date +%s) - start )) s; results in $out"
