"""modules/sd_hijack.py (v1.10.1): current_optimizer, the cross attention optimization in force."""
import types

current_optimizer = types.SimpleNamespace(name="Doggettx")  # "Automatic" on CUDA without --xformers
