"""`python train.py --config my.yaml`, as the lora-scripts articles write it: the same as
`python -m lora_trainer train --config my.yaml` (every option of that command works here)."""

import sys

from lora_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
