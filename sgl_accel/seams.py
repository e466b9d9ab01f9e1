"""Public seams for code that needs the loader's building blocks without its state:
the equivalence cases, ``sgl-accel verify`` and ``sgl-accel bench``.

    patched_forms(name)      {target key: (original, patched)}, built as apply() builds them,
                             installed nowhere (the targets' modules must be imported)
    swapped([(owner, attr, obj), ...])   a context manager: those objects in place for a block
    target_modules(name)     the modules of a patch's targets in the installed sglang
    applied_objects()        {"owner.attr": patched object} of every target in place now

None of them resets or changes what apply()/revert() track.
"""

from ._loader import applied_objects, patched_forms, swapped
from ._loader import modules_of as _modules_of


def target_modules(name: str) -> list:
    from ._registry import all_patches

    return _modules_of(all_patches()[name])


__all__ = ["patched_forms", "swapped", "target_modules", "applied_objects"]
