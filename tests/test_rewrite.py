"""The rewrite engine: pattern matching, exact site counts, faithful compilation."""

import ast
import os
import sys
import textwrap
from pathlib import Path

import pytest

from sgl_accel._rewrite import Custom, PatternError, Present, Rule, compile_def, count_matches, find_def, fingerprint, parse_def_at

SOURCE = textwrap.dedent(
    '''
    import math

    class Base:
        def f(self, x):
            return ("base", x)

    class Child(Base):
        def f(self, x, scale=2):
            """Child.f doc

            A multi-line docstring: its indentation is part of the constant.
            """
            head = super().f(x)
            y = math.floor(x * scale)
            if y > 10:
                y = math.floor(y * scale)
            return head, y

        @staticmethod
        def g(a, b):
            out = a.view(b, -1)
            return out
    '''
)


def _def(qualname):
    return find_def(ast.parse(SOURCE), qualname)


def test_expression_rule_counts_every_site():
    func = _def("Child.f")
    assert count_matches(func, "math.floor(__v * scale)") == 2
    assert Rule("floor to ceil", "math.floor(__v)", "math.ceil(__v)", count=2).apply(func) == 2
    assert "math.ceil(x * scale)" in ast.unparse(func)
    assert "floor" not in ast.unparse(func)


def test_metavariable_must_bind_consistently():
    func = _def("Child.f")
    # __v appears twice: matches only where both sides are the same expression.
    assert count_matches(func, "math.floor(__v * __v)") == 0
    assert count_matches(func, "math.floor(__v * scale)") == 2


def test_statement_rule_replaces_a_run_and_keeps_positions():
    func = _def("Child.g")
    rule = Rule("view to reshape", "out = __a.view(__b, -1)\nreturn out", "return __a.reshape(__b, -1)")
    assert rule.apply(func) == 1
    assert ast.unparse(func).splitlines()[-1].strip() == "return a.reshape(b, -1)"
    ret = func.body[-1]
    assert ret.lineno == SOURCE.splitlines().index("        out = a.view(b, -1)") + 1


def test_exact_match_is_required_for_non_metavariable_parts():
    func = _def("Child.f")
    assert count_matches(func, "math.floor(x * factor)") == 0
    assert Present("two floors", "math.floor(__v)", 2).apply(func) == 2


def test_bad_pattern_is_a_patch_bug():
    with pytest.raises(PatternError):
        Rule("broken", "def (", "x").apply(_def("Child.f"))
    with pytest.raises(PatternError):
        Rule("expr by stmts", "math.floor(__v)", "x = 1\ny = 2").apply(_def("Child.f"))


def test_fingerprint_ignores_formatting_but_not_code():
    a = find_def(ast.parse("def f(x):\n    return x+1\n"), "f")
    b = find_def(ast.parse("def f(x):   # comment\n\n    return (x + 1)\n"), "f")
    c = find_def(ast.parse("def f(x):\n    return x+2\n"), "f")
    assert fingerprint(a) == fingerprint(b) != fingerprint(c)


def test_parse_def_at_gives_file_positions():
    lines = SOURCE.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if "def f(self, x, scale=2)" in line) + 1
    node = parse_def_at(lines, start)
    assert node.name == "f" and node.lineno == start and node.col_offset == 4
    assert fingerprint(node) == fingerprint(_def("Child.f"))


def test_compiled_def_keeps_super_closure_globals_and_lines(tmp_path):
    path = tmp_path / "demo_rewrite_mod.py"
    path.write_text(SOURCE)
    namespace = {"__name__": "demo_rewrite_mod"}
    exec(compile(SOURCE, str(path), "exec"), namespace)
    child = namespace["Child"]
    original = child.__dict__["f"]
    func = _def("Child.f")
    Custom("scale by three", lambda f: Rule("", "math.floor(x * scale)", "math.floor(x * scale * 3)").apply(f)).apply(func)
    new = compile_def(func, str(path), namespace, {"__class__": child})
    assert new.__code__.co_filename == str(path)
    assert new.__code__.co_firstlineno == original.__code__.co_firstlineno
    assert new.__doc__ == original.__doc__ and new.__doc__.startswith("Child.f doc")
    assert new.__globals__ is namespace
    child.f = new
    assert child().f(1) == (("base", 1), 6)  # super() still resolves through __class__


def test_compiled_staticmethod_stays_static(tmp_path):
    namespace = {"__name__": "demo_static"}
    exec(SOURCE, namespace)
    new = compile_def(_def("Child.g"), "<demo>", namespace, {})
    assert isinstance(new, staticmethod)


def test_normalized_dump_is_python_3_11_ast_dump():
    """Fingerprints (and the matrix's tested sources) are made of this text: it must be the
    text ast.dump gives on 3.10/3.11, where the matrix is generated."""
    from sgl_accel._rewrite import normalized_dump

    tree = ast.parse(SOURCE + "\ndef h(a, /, b=None, *c, d, **e) -> int:\n    return {**e, 1: a[b:], 2: None}\n")
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    assert len(nodes) == 6
    if sys.version_info < (3, 12):
        assert [normalized_dump(n) for n in nodes] == [ast.dump(n, annotate_fields=False) for n in nodes]
    # 3.12 added FunctionDef.type_params (ast.dump then writes "type_params=[]"): left out when empty.
    later = type("FunctionDef", (ast.AST,), {"_fields": (*ast.FunctionDef._fields, "type_params"), "returns": None, "type_comment": None})
    node = _def("Child.f")
    newer = later(**{name: getattr(node, name) for name in ast.FunctionDef._fields}, type_params=[])
    assert normalized_dump(newer) == normalized_dump(node)


def _interpreter(minor: int):
    """A working python3.<minor> on PATH or under pyenv, else None."""
    import glob
    import shutil
    import subprocess

    candidates = [shutil.which(f"python3.{minor}"), *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/3.{minor}.*/bin/python3.{minor}")))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("minor", [10, 11, 12, 13])
def test_fingerprints_are_the_same_on_every_python(minor):
    """A def's fingerprint is the same on 3.10-3.13 (ast.dump's own text differs on 3.12 and
    3.13, which made every target "untested" there). Runs each interpreter this machine has."""
    import subprocess

    found = _interpreter(minor)
    if found is None:
        pytest.skip(f"no working python3.{minor} here")
    code = (
        "import ast, importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('rewrite_under_test', {str(Path(_rewrite_file()))!r})\n"
        "module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module; spec.loader.exec_module(module)\n"
        f"tree = ast.parse({SOURCE!r})\n"
        "print([module.fingerprint(n) for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))])\n"
    )
    there = subprocess.run([found, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    here = str([fingerprint(n) for n in ast.walk(ast.parse(SOURCE)) if isinstance(n, (ast.FunctionDef, ast.ClassDef))])
    assert there == here


def _rewrite_file() -> str:
    from sgl_accel import _rewrite

    return _rewrite.__file__
