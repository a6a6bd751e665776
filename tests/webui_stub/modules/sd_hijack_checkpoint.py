"""modules/sd_hijack_checkpoint.py (v1.10.1): add(), remove().

As the WebUI does it: add() swaps the forward of ldm's BasicTransformerBlock and ResBlock classes for one
that runs their ``_forward`` under torch's reentrant checkpoint; remove() puts the originals back.
"""
from torch.utils.checkpoint import checkpoint

stored = []


def _transformer_block_forward(self, x, context=None):
    return checkpoint(self._forward, x, context, use_reentrant=True)


def _res_block_forward(self, x, emb):
    return checkpoint(self._forward, x, emb, use_reentrant=True)


def _classes():
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    return BasicTransformerBlock, ResBlock


def add():
    if stored:
        return
    block, res = _classes()
    stored.extend([block.forward, res.forward])
    block.forward, res.forward = _transformer_block_forward, _res_block_forward


def remove():
    if not stored:
        return
    block, res = _classes()
    block.forward, res.forward = stored
    stored.clear()
