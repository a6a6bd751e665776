#!/usr/bin/env bash
# The GPU measurements issues #5, #16, #20 (QLoRA) and #23 still need, in one prepared run on a lent CUDA machine.
#
#   bash bench/gpu_checks.sh OUT_DIR [CHECK ...]     # checks: smoke attention batch8 batch1 compiled learns sdxl1
#                                                    #   sdxl4 preflight profile batch16 batch32 sdpa webui llm qlora
#                                                    #   graphs8 casts sdxlgraphs
#                                                    #   (default: all but smoke)
#   In a 15-minute device session (start-up included) about 13 minutes of checks fit, in two calls (the second at
#   once, on the same OUT_DIR in /dev/shm: it skips what the first ended). Seconds each took on the H200
#   (2026-12-04): smoke 26, casts 45, profile 71, sdpa 12, batch8 133, batch16 107, batch32 94, webui 79, llm 74;
#   sdxl1 ran out of its former 300 s in its last child (the FLOPs count). Next, issue 23's open ones:
#       smoke sdxl1 casts graphs8 sdxlgraphs qlora   (sdxl1: the UNet now loads on the CPU, comes after the caches)
#
# Each check has its own time limit and writes its log (and JSON) under OUT_DIR; one that fails or runs out
# of time does not stop the next, except "smoke" (the demo on the GPU: the environment works), which stops the
# script when it fails. A check that ended (passed, failed or ran out of its own limit) leaves NAME.rc and is skipped
# when the same command runs again on the same OUT_DIR: on a machine still warm, a second call (OUT_DIR in /dev/shm)
# goes on where the first call's time ran out. The SD 1.5-shape and SDXL-shape models are built once (GPU_WORK,
# default OUT_DIR/work: keep it out of what comes back; /dev/shm/gw on the H200, which has the memory, since each
# child reads the model again) and shared (the SDXL one by sdxl1: 7 GB, its weights drawn on the GPU).
# Needs diffusers and peft importable, and for "attention" and "webui" the LDM code (stable-diffusion-sdkit,
# einops, omegaconf).
# Their limits add up to about 30 minutes (most run well inside theirs): where one call or the device time
# is shorter, run a few checks a call, the first ones first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?give the folder for the results}
shift
checks=("$@")
[ ${#checks[@]} -gt 0 ] || checks=(attention batch8 batch1 compiled learns sdxl1 sdxl4 preflight profile batch16 batch32
                                  sdpa webui llm qlora graphs8 casts sdxlgraphs)
work=${GPU_WORK:-$out/work}
mkdir -p "$out" "$work"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
speed=("$py" bench/train_speed.py --device cuda --model sd15-shape --resolution 512 --work "$work")
# issue #16: SDXL's shapes at 1024², LoRA rank 16, bf16 (mixed_precision auto), gradient checkpointing in both loops;
# ours caches latents and both encoders' outputs and moves the VAE and the encoders to the CPU (its defaults)
sdxl=("$py" bench/train_speed.py --device cuda --model sdxl-shape --resolution 1024 --rank 16 --gradient-checkpointing
      --warmup 3 --work "$work")

run() {  # name, seconds, command...  (a check that ended before in OUT_DIR, its exit in NAME.rc, is skipped)
    local name=$1 limit=$2
    shift 2
    if [ -e "$out/$name.rc" ]; then
        echo "=== $name: ended before (exit $(cat "$out/$name.rc")), skipped"
        return "$(cat "$out/$name.rc")"
    fi
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    # (in the background, killed with this script: an outer timeout's TERM reaches bash, not the inner timeout, which
    # runs in its own process group and would keep the GPU busy after the script ended)
    timeout "$limit" "$@" > "$out/$name.log" 2>&1 &
    local child=$!
    trap 'kill -TERM "$child" 2>/dev/null; exit 143' TERM INT
    wait "$child"
    local rc=$?
    trap - TERM INT
    echo "$rc" > "$out/$name.rc"
    tail -n 25 "$out/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - start)) s"
    return $rc
}

"$py" -c "import torch, diffusers, peft, transformers; print('torch', torch.__version__, torch.cuda.get_device_name(0),
      'diffusers', diffusers.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__)" || exit 1
for check in "${checks[@]}"; do
    case $check in
        smoke)  # the demo (the tiny model, 3 steps) on the GPU: stops here when the environment is broken (on the
                # H200 the former smoke, every loop of train_speed on the tiny model, took 93 s)
            run smoke 90 "$py" -m lora_trainer demo --steps 3 --output "$work/demo" \
                || { echo "smoke failed: stopping"; exit 1; } ;;
        casts)  # issue 23: SD 1.5's UNet step at batch 8, 512², with peft's LoRA input casts and without (seconds)
            run casts 120 "$py" bench/lora_casts.py --device cuda --batch 8 --latent 64 --repeats 10 ;;
        sdpa)  # issue 23: SDPA's backends (flash, cuDNN, efficient, math) on SD 1.5's and SDXL's attention shapes
            run sdpa 90 "$py" bench/sdpa_backends.py --device cuda --batch 8 --sdxl --out "$out/sdpa.json" ;;
        webui)  # issue 23: the WebUI path's step (the LDM UNet, our SDPA; and the WebUI's own attention) against the
                # diffusers UNet's, the same shapes, batch 4 (what training in place costs)
            run webui 120 "$py" bench/ldm_attention.py --device cuda --model sd15-shape --dtype bf16 --batch 4 \
                --steps 10 --loops diffusers,sdpa,webui --out "$out/webui.json" ;;
        attention)  # the VRAM the WebUI's default attention costs while training, against SDPA
            run attention 150 "$py" bench/ldm_attention.py --device cuda --model sd15-shape --dtype fp16 --batch 4 \
                --steps 5 --loops webui,sdpa --out "$out/attention.json" ;;
        batch8)  # >= 1.5x the reference's images/s, and MFU
            run batch8 240 "${speed[@]}" --batch 8 --images 32 --steps 20 --rounds 4 --out "$out/batch8.json" ;;
        batch1)  # under 4 GB, the whole process (3439 MB on an H100 before the encoders waited on the CPU)
            run batch1 150 "${speed[@]}" --batch 1 --images 8 --steps 40 --rounds 4 --gradient-checkpointing \
                --out "$out/batch1.json" ;;
        graphs8)  # issue 23: CUDA graphs at batch 8 (the step is launch-bound: the H200 profile); one compile
            run graphs8 300 "${speed[@]}" --batch 8 --images 32 --steps 20 --rounds 4 --no-reference --alone \
                --variant graphs:compile_unet=true,compile_mode=reduce-overhead --out "$out/graphs8.json" ;;
        sdxlgraphs)  # issue 23: SDXL at batch 1 with CUDA graphs (its eager step is the host's: ~1 s for ~16 TFLOP);
                     # one child (--alone), so it compiles once
            run sdxlgraphs 480 "${sdxl[@]}" --batch 1 --images 8 --steps 20 --rounds 4 --no-reference --alone \
                --variant graphs:compile_unet=true,compile_mode=reduce-overhead --out "$out/sdxlgraphs.json" ;;
        compiled)  # what torch.compile buys at batch 8 (the first step compiles for minutes)
            run compiled 300 "${speed[@]}" --batch 8 --images 32 --steps 20 --rounds 4 --no-reference --compile \
                --out "$out/compiled.json" ;;
        learns)  # the loss-decrease test, plain and with every speed-up, on CUDA in bf16; the encoders' offload
            run learns 200 "$py" -m pytest -q -p no:cacheprovider tests/test_train.py -k "learns or offloaded" ;;
        sdxl1)  # the whole process under 8 GB at batch 1 ("device MB" of ours; kohya's SDXL LoRA floor is 8 GB)
            run sdxl1 420 "${sdxl[@]}" --batch 1 --images 8 --steps 20 --rounds 4 --out "$out/sdxl1.json" ;;
        sdxl4)  # >= 1.5x the SDXL recipe's images/s at batch 4
            run sdxl4 420 "${sdxl[@]}" --batch 4 --images 16 --steps 12 --rounds 4 --out "$out/sdxl4.json" ;;
        preflight)  # issue 17: the pre-flight estimate against torch.cuda.max_memory_allocated, SD 1.5 shapes
            run preflight 300 "$py" bench/preflight_accuracy.py --device cuda --model sd15-shape --steps 3 \
                --out "$out/preflight.json" ;;
        profile)  # issue 23: where a step's time goes (top kernels; shares of matmul, attention, norm, copies)
            run profile 180 "$py" bench/profile_step.py --device cuda --model sd15-shape --resolution 512 --batch 8 \
                --steps 3 --warmup 6 --work "$work" --out "$out/profile.json" ;;
        batch16|batch32)  # issue 23: MFU at batch 16 and 32 (ours only; the FLOPs child gives the MFU column)
            run "$check" 200 "${speed[@]}" --batch "${check#batch}" --images 64 --steps 8 --rounds 2 --no-reference \
                --out "$out/$check.json" ;;
        llm)  # issue 20: a ~0.7 B random LLaMA (hidden 1536, 24 layers), ours against the plain transformers+peft loop
            run llm 300 "$py" bench/llm_speed.py --device cuda --hidden 1536 --layers 24 --rows 256 --batch 8 \
                --max-len 512 --rounds 4 --out "$out/llm.json" ;;
        qlora)  # issue 20: training.quantize_base 4bit/8bit on CUDA (needs bitsandbytes; skipped, and says so, without)
            run qlora 200 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_llm.py -k "quantized_base_trains_on_cuda" ;;
        *) echo "unknown check: $check (smoke attention batch8 batch1 compiled learns sdxl1 sdxl4 preflight profile"\
                " batch16 batch32 sdpa webui llm qlora graphs8 casts sdxlgraphs)"; exit 2 ;;
    esac
done
