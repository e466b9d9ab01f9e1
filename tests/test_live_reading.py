"""How apply() reads the live targets of a real release, checked on every shipped target.

apply() proves that each function in memory was compiled from its file, either from the
file's byte-code cache (when import would trust it) or by compiling the def's lines; and it
lets the rules rewrite the def it parsed for the check, where plan and the scanner rewrite a
copy. Both shortcuts must give exactly what the long way gives.
"""

import ast
import importlib
import re
import sys

import pytest

from sgl_accel import _loader, seams
from sgl_accel._guard import check_def, resolve
from sgl_accel._registry import all_patches
from sgl_accel._rewrite import compile_def, def_code_from_pyc, def_code_from_text, future_flags, normalized_dump

pytestmark = pytest.mark.sglang


def _live_targets():
    """(target, _Live) for every shipped target whose module imports in this release."""
    info = _loader._sglang_info()
    found = []
    for name, patch in sorted(all_patches().items()):
        for module in seams.target_modules(name):
            try:
                importlib.import_module(module)
            except Exception:  # a module of another release or hardware
                continue
        for target in patch.targets:
            target = resolve(target, info.location)
            owner, _ = _loader._owner_of(target)
            if owner is None:
                continue
            attr = target.qualname.rsplit(".", 1)[-1]
            raw = owner.__dict__[attr]
            function, _ = _loader._unwrap(raw)
            found.append((target, _loader._Live(target, owner, attr, raw, function, sys.modules[target.module])))
    return found


@pytest.fixture(scope="module")
def live_targets():
    # conftest activated the kernel stand-ins before anything imported sglang.
    found = _live_targets()
    assert len(found) >= 10, "too few targets imported to say anything"
    return found


def test_the_text_proof_rebuilds_every_live_target_and_no_edited_one(live_targets):
    for target, live in live_targets:
        node, reason = _loader._live_def(live)
        assert node is not None, reason
        code = live.function.__code__
        lines = _loader._source_lines(live)
        args = (code.co_name, code.co_filename, code.co_freevars)
        kwargs = dict(imported=_loader._import_names(live), flags=future_flags(code))
        rebuilt = def_code_from_text(lines, code.co_firstlineno, node.end_lineno, *args, **kwargs)
        assert _loader._code_parts(rebuilt) == _loader._code_parts(code), target.key
        # The AST route of compile_def builds the same code.
        by_ast = compile_def(node, code.co_filename, live.module.__dict__, _loader._closure_of(live.function), decorators=False, **kwargs)
        assert _loader._code_parts(by_ast.__code__) == _loader._code_parts(code), target.key
        # The same def with its first parameter renamed is not the code in memory.
        edited = _rename_first_parameter(lines, node)
        rebuilt = def_code_from_text(edited, code.co_firstlineno, node.end_lineno, *args, **kwargs)
        assert rebuilt is None or _loader._code_parts(rebuilt) != _loader._code_parts(code), target.key


def _rename_first_parameter(lines: list, node) -> list:
    first = (node.args.posonlyargs + node.args.args)[0].arg
    text = "".join(lines[node.lineno - 1 :])
    start = text.index(f"def {node.name}")
    text = text[:start] + re.sub(rf"\b{first}\b", first + "_edited", text[start:], count=1)
    return lines[: node.lineno - 1] + text.splitlines(keepends=True)


def test_a_byte_code_cache_as_pip_writes_it_holds_exactly_the_code_in_memory(live_targets, tmp_path, monkeypatch):
    """Byte-code caches as pip writes them at install (here under a cache prefix: the test
    environments are installed without them) hold exactly the code in memory."""
    import py_compile

    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path))
    written = set()
    for target, live in live_targets:
        code = live.function.__code__
        if code.co_filename not in written:
            assert def_code_from_pyc(code.co_filename, code.co_name, code.co_firstlineno) is None  # none written yet
            py_compile.compile(code.co_filename, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
            written.add(code.co_filename)
        from_pyc = def_code_from_pyc(code.co_filename, code.co_name, code.co_firstlineno)
        assert from_pyc is not None, target.key
        assert _loader._code_parts(from_pyc) == _loader._code_parts(code), target.key


def test_rewriting_the_parsed_def_in_place_equals_rewriting_a_copy(live_targets):
    reader = _loader.SourceReader(_loader._sglang_info().location)
    for target, live in live_targets:
        copied = check_def(target, _loader._live_def(live)[0], reader)
        in_place = check_def(target, _loader._live_def(live)[0], reader, in_place=True)
        assert (in_place.state, in_place.reason, in_place.fingerprint) == (copied.state, copied.reason, copied.fingerprint), target.key
        if copied.patched is not None:
            assert normalized_dump(in_place.patched) == normalized_dump(copied.patched), target.key
            assert isinstance(in_place.patched, (ast.FunctionDef, ast.AsyncFunctionDef))
