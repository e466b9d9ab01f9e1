"""Run on the lent GPU machine: can the NSA targets of a real release import there?

Used before `sgl-accel bench` on CUDA (docs/BENCHMARKS.md). Prints one line per module.
"""
import importlib
import sys
import traceback

from sgl_accel.testing import standins

standins.activate()
import torch

print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
        print("ok  ", name)
    except Exception:
        print("FAIL", name)
        traceback.print_exc(limit=3)
