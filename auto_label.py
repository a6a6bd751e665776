"""`python auto_label.py --input DIR --output FILE`, as the lora-scripts articles write it: the same as
`python -m lora_trainer label --input DIR --output FILE` (BLIP or CLIP-tag captions into a metadata.csv)."""

import sys

from lora_trainer.cli import main

if __name__ == "__main__":
    sys.exit(main(["label", *sys.argv[1:]]))
