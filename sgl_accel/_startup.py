"""Start-up activation, imported by sgl_accel_startup.pth only when SGL_ACCEL is on.

Every Python process that inherits SGL_ACCEL (sglang's scheduler, TP workers,
detokenizer, tokenizer workers, but also pip and health checks) runs this, so it
only validates the settings (one warning per bad value) and installs a small
meta-path finder for the modules the wanted patches target (read from the
generated ``_index``). The loader, logging, ``packaging``, ``ast`` are imported
the first time one of those modules is imported. Python 3.15+ (PEP 829): the .pth
``import`` line is to move to a ``sgl_accel.start`` file naming
``sgl_accel._startup`` once that mechanism ships; the behaviour stays the same.
"""

try:
    from ._activate import at_startup

    at_startup()
except Exception as _exc:  # never break interpreter start-up
    import sys as _sys

    _sys.stderr.write(f"sgl-accel: start-up activation failed, no patch applied: {_exc!r}\n")
