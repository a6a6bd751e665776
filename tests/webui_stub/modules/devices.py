"""modules/devices.py (v1.10.1): device, dtype_unet, torch_gc()."""
import torch

device = torch.device("cpu")
dtype = dtype_unet = dtype_vae = torch.float32
gc_calls = 0


def torch_gc():
    global gc_calls
    gc_calls += 1
