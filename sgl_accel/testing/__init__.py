"""The test bed: import stand-ins and reference kernels for what cannot run on a
CPU-only machine (torch_npu, sgl_kernel_npu, sgl_kernel, flashinfer, torchvision's
native ops, aiter), plus an op counter.

Nothing in sgl_accel imports this package. Only the tests and
``sgl-accel verify --emulate`` switch it on, explicitly, through
``sgl_accel.testing.standins.activate()``, which refuses to run where a real
torch_npu is installed.
"""
