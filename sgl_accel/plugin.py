"""Entry point for sglang's plugin mechanism (group ``sglang.srt.plugins``, sglang >= 0.5.11).

sglang calls ``load()`` from ``sglang.srt.plugins.load_plugins()`` in its engine
and scheduler processes. Installing sgl-accel is enough: with SGL_ACCEL unset
every applicable patch is applied; SGL_ACCEL=0 turns it off, SGL_ACCEL=name,...
and SGL_ACCEL_DISABLE select patches as for start-up activation. Where start-up
activation ran in the same process too, warnings and the summary line are not repeated.
"""


def load() -> None:
    from ._activate import from_plugin

    from_plugin()
