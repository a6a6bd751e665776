#!/usr/bin/env bash
# The real-host check of the WebUI path: install this checkout (tracked and new files, not ignored ones) as an
# extension of a real AUTOMATIC1111 v1.10.1, run its install.py as the WebUI's launcher does, then
#   1. a1111_inprocess.py inside a WebUI process (conditioning == command line, batch independence, a zero-mean
#      caption stopped before step 1, a training through the tab's session, the model restored bitwise);
#   2. with the host's SDXL checkpoint (setup.sh with SDXL=1; SDXL=0 skips it): a1111_sdxl.py, the same path on the
#      WebUI's sgm SDXL model (conditioning == the WebUI's, training, the Lora loader matches every module, sweep);
#   3. start the WebUI and drive the Train LoRA tab in headless Chromium (drive_tab.py), then stop it.
# Usage: LORA_TRAINER_A1111=$HOME/a1111-host bash tests/e2e/run_a1111.sh
# The host is built by ../shared/a1111-host/setup.sh (a random-weight SD 1.5 checkpoint, CPU torch, offline);
# it has start.sh / stop.sh / run_ext_installers.sh beside webui/. Screenshots and drive_summary.json go to
# $SHOTS ($HOME/a1111-host-shots). Exit 1 if a check failed.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
H=${LORA_TRAINER_A1111:?set LORA_TRAINER_A1111 to the folder that holds webui/, venv/ and start.sh}
DRIVE_PY=${DRIVE_PY:-$HOME/a1111-host-drive-venv/bin/python}
if [ ! -x "$DRIVE_PY" ]; then
  python3 -m venv "$HOME/a1111-host-drive-venv" && "$HOME/a1111-host-drive-venv/bin/pip" install -q playwright pillow numpy
fi
command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }
EXT="$H/webui/extensions/lora-trainer"
rm -rf "$EXT"; mkdir -p "$EXT"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 -I{} cp --parents {} "$EXT/")
"$H/run_ext_installers.sh" || exit 1
"$H/stop.sh" >/dev/null 2>&1
rc=0
export HF_HOME="$H/hf" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
(cd "$H/webui" && "$H/venv/bin/python" "$EXT/tests/e2e/a1111_inprocess.py" --project "$EXT" \
   --ckpt models/Stable-diffusion/random.safetensors) || rc=1
if [ -f "$H/webui/models/Stable-diffusion/random_sdxl.safetensors" ] && [ "${SDXL:-1}" = 1 ]; then
  # SDXL (setup.sh with SDXL=1): the sgm model in process; ~15 GB of RAM, 5-8 minutes on 2 cores
  (cd "$H/webui" && "$H/venv/bin/python" "$EXT/tests/e2e/a1111_sdxl.py" --project "$EXT" \
     --ckpt models/Stable-diffusion/random_sdxl.safetensors --ui-settings-file config_sdxl.json) || rc=1
fi
"$H/start.sh" || exit 1
trap '"$H/stop.sh"' EXIT
LORA_HARNESS="$H" "$DRIVE_PY" "$ROOT/tests/e2e/drive_tab.py" || rc=1
exit $rc
