#!/usr/bin/env bash
# The GPU measurements issues #5, #16, #20 (QLoRA) and #23 still need, in one prepared run on a lent CUDA machine.
#
#   bash bench/gpu_checks.sh OUT_DIR [CHECK ...]     # checks: attention batch8 batch1 compiled learns sdxl1 sdxl4 preflight
#                                                    #   profile batches llm qlora (default: all)
#   In a 15-minute device session (start-up included), issue 23's first: profile batch8 batches llm sdxl1
#
# Each check has its own time limit and writes its log (and JSON) under OUT_DIR; one that fails or runs out
# of time does not stop the next. The SD 1.5-shape and SDXL-shape models are built once (OUT_DIR/work) and
# shared (the SDXL one by sdxl1: ~14 GB of RAM and 7 GB of disk, a minute or two). Needs diffusers and peft
# importable, and for "attention" the LDM code (stable-diffusion-sdkit, einops, omegaconf).
# Their limits add up to about 30 minutes (most run well inside theirs): where one call or the device time
# is shorter, run a few checks a call, the first ones first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?give the folder for the results}
shift
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(attention batch8 batch1 compiled learns sdxl1 sdxl4 preflight profile batches llm qlora)
mkdir -p "$out/work"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
speed=("$py" bench/train_speed.py --device cuda --model sd15-shape --resolution 512 --work "$out/work")
# issue #16: SDXL's shapes at 1024², LoRA rank 16, bf16 (mixed_precision auto), gradient checkpointing in both loops;
# ours caches latents and both encoders' outputs and moves the VAE and the encoders to the CPU (its defaults)
sdxl=("$py" bench/train_speed.py --device cuda --model sdxl-shape --resolution 1024 --rank 16 --gradient-checkpointing
      --warmup 3 --work "$out/work")

run() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
}

"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" || exit 1
for check in "${checks[@]}"; do
    case $check in
        attention)  # the VRAM the WebUI's default attention costs while training, against SDPA
            run attention 150 "$py" bench/ldm_attention.py --device cuda --model sd15-shape --dtype fp16 --batch 4 \
                --steps 5 --loops webui,sdpa --out "$out/attention.json" ;;
        batch8)  # >= 1.5x the reference's images/s, and MFU
            run batch8 240 "${speed[@]}" --batch 8 --images 32 --steps 20 --rounds 4 --out "$out/batch8.json" ;;
        batch1)  # under 4 GB, the whole process (3439 MB on an H100 before the encoders waited on the CPU)
            run batch1 150 "${speed[@]}" --batch 1 --images 8 --steps 40 --rounds 4 --gradient-checkpointing \
                --out "$out/batch1.json" ;;
        compiled)  # what torch.compile buys at batch 8 (the first step compiles for minutes)
            run compiled 300 "${speed[@]}" --batch 8 --images 32 --steps 20 --rounds 4 --no-reference --compile \
                --out "$out/compiled.json" ;;
        learns)  # the loss-decrease test, plain and with every speed-up, on CUDA in bf16; the encoders' offload
            run learns 200 "$py" -m pytest -q -p no:cacheprovider tests/test_train.py -k "learns or offloaded" ;;
        sdxl1)  # the whole process under 8 GB at batch 1 ("device MB" of ours; kohya's SDXL LoRA floor is 8 GB)
            run sdxl1 480 "${sdxl[@]}" --batch 1 --images 8 --steps 20 --rounds 4 --out "$out/sdxl1.json" ;;
        sdxl4)  # >= 1.5x the SDXL recipe's images/s at batch 4
            run sdxl4 420 "${sdxl[@]}" --batch 4 --images 16 --steps 12 --rounds 4 --out "$out/sdxl4.json" ;;
        preflight)  # issue 17: the pre-flight estimate against torch.cuda.max_memory_allocated, SD 1.5 shapes
            run preflight 300 "$py" bench/preflight_accuracy.py --device cuda --model sd15-shape --steps 3 \
                --out "$out/preflight.json" ;;
        profile)  # issue 23: where a step's time goes (top kernels; shares of matmul, attention, norm, copies)
            run profile 180 "$py" bench/profile_step.py --device cuda --model sd15-shape --resolution 512 --batch 8 \
                --steps 3 --warmup 5 --trace "$out/profile_trace.json" --work "$out/work" --out "$out/profile.json" ;;
        batches)  # issue 23: MFU at batch 16 and 32 (ours only; the FLOPs child gives the MFU column)
            run batch16 200 "${speed[@]}" --batch 16 --images 64 --steps 12 --rounds 3 --no-reference \
                --out "$out/batch16.json"
            run batch32 240 "${speed[@]}" --batch 32 --images 64 --steps 8 --rounds 2 --no-reference \
                --out "$out/batch32.json" ;;
        llm)  # issue 20: a ~0.7 B random LLaMA (hidden 1536, 24 layers), ours against the plain transformers+peft loop
            run llm 300 "$py" bench/llm_speed.py --device cuda --hidden 1536 --layers 24 --rows 256 --batch 8 \
                --max-len 512 --rounds 4 --out "$out/llm.json" ;;
        qlora)  # issue 20: training.quantize_base 4bit/8bit on CUDA (needs bitsandbytes; skipped, and says so, without)
            run qlora 200 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_llm.py -k "quantized_base_trains_on_cuda" ;;
        *) echo "unknown check: $check (attention batch8 batch1 compiled learns sdxl1 sdxl4 preflight profile batches"\
                " llm qlora)"; exit 2 ;;
    esac
done
