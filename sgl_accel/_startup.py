"""Start-up activation, imported by sgl_accel_startup.pth only when SGL_ACCEL is set.

Every Python process that inherits SGL_ACCEL (sglang's scheduler, TP workers,
detokenizer, tokenizer workers) installs the lazy import hooks here; the
patches land when sglang imports their targets. Python 3.15+ (PEP 829): the .pth
``import`` line is to move to a ``sgl_accel.start`` file naming
``sgl_accel._startup`` once that mechanism ships; the behaviour stays the same.
"""

try:
    from ._config import activate_from_environment

    activate_from_environment(default_on=False, origin="start-up")
except Exception as _exc:  # never break interpreter start-up
    import sys as _sys

    _sys.stderr.write(f"sgl-accel: start-up activation failed, no patch applied: {_exc!r}\n")
