"""Whether ``training.compile_unet`` can run here: torch.compile's compiler, checked before any model loads.

torch.compile (inductor) writes kernels in Triton on CUDA GPUs and in C++ on the CPU, and builds them at
the first step. Without Triton or a C++ compiler it fails there, minutes in, with a compiler traceback;
this finds out first and says what to install or change.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import torch

from lora_trainer.errors import ConfigError

_OFF = "or set training.compile_unet: false"


def cpp_compilers() -> list[str]:
    """The C++ compilers inductor looks for on this machine, in its order (its config, then ``CXX``)."""
    if sys.platform == "win32":
        return [os.environ.get("CXX", "cl")]
    try:
        from torch._inductor import config

        cxx = config.cpp.cxx
        names = list(cxx) if isinstance(cxx, (list, tuple)) else [cxx]
    except (ImportError, AttributeError):
        names = [os.environ.get("CXX", "g++")]
    return [n for n in names if n]


def check_compile(device_type: str) -> None:
    """A ConfigError when torch.compile cannot build its kernels for ``device_type`` ("cuda", "cpu") here."""
    import torch._dynamo

    if not torch._dynamo.is_dynamo_supported():
        raise ConfigError(f"training.compile_unet: torch.compile does not run with torch {torch.__version__} on "
                          f"Python {sys.version_info.major}.{sys.version_info.minor} ({sys.platform}); {_OFF}")
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            name = "triton-windows" if sys.platform == "win32" else "triton"
            raise ConfigError(f"training.compile_unet: compiling for the GPU needs the Triton compiler "
                              f"(pip install {name}, matching torch {torch.__version__}); {_OFF}")
    elif not any(shutil.which(name) for name in cpp_compilers()):
        raise ConfigError(f"training.compile_unet: compiling for the CPU needs a C++ compiler, and none of "
                          f"{', '.join(cpp_compilers())} is on PATH (install one, or point CXX at it); {_OFF}")
