"""The real-host check (tests/e2e/run_a1111.sh) as a test: skipped unless LORA_TRAINER_A1111 names a real
AUTOMATIC1111 v1.10.1 built by ../shared/a1111-host/setup.sh. Run it for every change to the WebUI path
(lora_trainer/webui/, models/ldm.py, models/attention.py, engine/cache.py, ui/); 10-25 minutes on 2 cores."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

HOST = os.environ.get("LORA_TRAINER_A1111")


@pytest.mark.slow
@pytest.mark.skipif(not HOST, reason="set LORA_TRAINER_A1111 to a real A1111 host (../shared/a1111-host/setup.sh)")
def test_the_tab_in_a_real_a1111():
    script = Path(__file__).with_name("run_a1111.sh")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=3600)
    print(done.stdout[-20000:])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
