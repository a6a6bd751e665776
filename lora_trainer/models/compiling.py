"""``training.compile_unet``: whether torch.compile can build here (checked before any model loads), and the
compiled UNet call the backends train through.

torch.compile (inductor) writes kernels in Triton on CUDA GPUs and in C++ on the CPU, and builds them at
the first step. Without Triton or a C++ compiler it fails there, minutes in, with a compiler traceback;
this finds out first and says what to install or change.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable

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


def c_compilers() -> list[str]:
    """The C compilers Triton builds its GPU launcher with (``CC``, else gcc or clang; triton-windows has its own)."""
    return [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]


def check_compile(device_type: str) -> None:
    """A ConfigError when torch.compile cannot build its kernels for ``device_type`` ("cuda", "cpu") here."""
    import torch._dynamo

    where = f"torch {torch.__version__} on Python {sys.version_info.major}.{sys.version_info.minor} ({sys.platform})"
    inductor = getattr(torch._dynamo, "is_inductor_supported", lambda: True)  # (torch < 2.2: no such check)
    if not torch._dynamo.is_dynamo_supported() or not inductor():
        raise ConfigError(f"training.compile_unet: torch.compile does not run with {where}; {_OFF}")
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            name = "triton-windows" if sys.platform == "win32" else "triton"
            raise ConfigError(f"training.compile_unet: compiling for the GPU needs the Triton compiler "
                              f"(pip install {name}, matching torch {torch.__version__}); {_OFF}")
        major, minor = torch.cuda.get_device_capability()
        if major < 7:
            raise ConfigError(f"training.compile_unet: Triton compiles for GPUs of compute capability 7.0 and "
                              f"newer, and {torch.cuda.get_device_name()} is {major}.{minor}; {_OFF}")
        if sys.platform != "win32" and not any(shutil.which(name) for name in c_compilers()):
            raise ConfigError(f"training.compile_unet: Triton needs a C compiler to build its GPU launcher, and "
                              f"none of {', '.join(c_compilers())} is on PATH (install one, or point CC at it); "
                              f"{_OFF}")
    elif device_type == "cpu":
        if not any(shutil.which(name) for name in cpp_compilers()):
            raise ConfigError(f"training.compile_unet: compiling for the CPU needs a C++ compiler, and none of "
                              f"{', '.join(cpp_compilers())} is on PATH (install one, or point CXX at it); {_OFF}")
    else:
        raise ConfigError(f"training.compile_unet: compiling for {device_type} is not supported here (CUDA GPUs "
                          f"and the CPU are); {_OFF}")


def compile_for_run(call: Callable, mode: str) -> Callable:
    """torch.compile of ``call`` (a UNet, or its forward) through a function with a code object of its own.

    dynamo keeps compiled graphs on the code object it compiles. Compiling the UNet itself would put them on
    its class's forward, which every run in one process shares (the WebUI's session, the standalone app):
    each run's new LoRA layers would add graphs there, held, until dynamo's recompile limit (8) stopped
    compiling. This run's graphs stay on this function's code, and go with it.
    """

    def training_forward(*args, **kwargs):
        return call(*args, **kwargs)

    training_forward.__code__ = training_forward.__code__.replace()  # a new code object, the same code
    return torch.compile(training_forward, mode=mode)
