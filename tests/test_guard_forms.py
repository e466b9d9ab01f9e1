"""The guard's named forms of a target (release-free, over small source trees written here):
moved places (newest first), ``replaced`` and ``older`` markers, and SourceCheck markers that
read another module of the release."""

import ast
import textwrap

from sgl_accel._guard import OLDER_FORM, REPLACED, SourceCheck, SourceReader, check_static, resolve
from sgl_accel._registry import Target
from sgl_accel._rewrite import Rule


def _tree(tmp_path, files: dict) -> str:
    root = tmp_path / "sglang"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return str(root)


OLD = """
    def work(x):
        y = slow(x)
        return y
"""
RULE = Rule("slow -> fast", find="slow(__x)", replace="fast(__x)")


def test_a_moved_place_wins_over_an_older_copy_at_the_own_place(tmp_path):
    root = _tree(tmp_path, {"a.py": OLD, "b.py": "def work2(x):\n    return fast(x)\n"})
    target = Target("sglang.a", "work", rules=[RULE], upstream=["fast(__x)"], moved=[("sglang.b", "work2")])
    placed = resolve(target, root)
    assert (placed.module, placed.qualname) == ("sglang.b", "work2")
    assert check_static(placed, root).state == "upstream"
    # Where no moved place exists, the own place is the target.
    root_old = _tree(tmp_path / "old", {"a.py": OLD})
    assert resolve(target, root_old).module == "sglang.a"
    assert check_static(resolve(target, root_old), root_old).state == "applies"


def test_replaced_and_older_forms_are_named_with_their_reason(tmp_path):
    replaced = ("other_kernel(__x)", "runs other_kernel, which does the same job")
    older = ("slower(__x)", "older form: slower() before slow() existed")
    target = Target("sglang.a", "work", rules=[RULE], upstream=["fast(__x)"], replaced=[replaced], older=[older])

    root = _tree(tmp_path / "r", {"a.py": "def work(x):\n    return other_kernel(x)\n"})
    verdict = check_static(target, root)
    assert (verdict.state, verdict.reason) == (REPLACED, "work: runs other_kernel, which does the same job")

    root = _tree(tmp_path / "o", {"a.py": "def work(x):\n    return slower(x)\n"})
    verdict = check_static(target, root)
    assert (verdict.state, verdict.reason) == (OLDER_FORM, "work: older form: slower() before slow() existed")

    # The pre-change shape still applies; an unknown shape is still drifted.
    assert check_static(target, _tree(tmp_path / "a", {"a.py": OLD})).state == "applies"
    assert check_static(target, _tree(tmp_path / "d", {"a.py": "def work(x):\n    return x\n"})).state == "drifted"


def _uses_listed_name(def_node, reader) -> int:
    names = {n.id for n in ast.walk(def_node) if isinstance(n, ast.Name)}
    listing = reader.module("sglang.choices")
    listed = {e.value for n in (listing.body if listing else []) if isinstance(n, ast.Assign) for e in getattr(n.value, "elts", [])}
    return int("CHOICES" in names and "wanted" in listed)


def test_a_source_check_marker_reads_another_module_of_the_release(tmp_path):
    marker = SourceCheck("CHOICES lists 'wanted'", _uses_listed_name, modules=("sglang.choices",))
    target = Target("sglang.a", "work", rules=[RULE], upstream=[marker])
    body = "def work(x):\n    return x in CHOICES\n"
    yes = _tree(tmp_path / "y", {"a.py": body, "choices.py": "CHOICES = ['wanted']\n"})
    no = _tree(tmp_path / "n", {"a.py": body, "choices.py": "CHOICES = ['other']\n"})
    assert check_static(target, yes).state == "upstream"
    assert "CHOICES lists 'wanted'" in check_static(target, yes).reason
    assert check_static(target, no).state == "drifted"
    # Without the release's source (no reader) the marker finds nothing.
    from sgl_accel._guard import check_def, static_def

    assert check_def(target, static_def(target, yes)).state == "drifted"
    assert check_def(target, static_def(target, yes), SourceReader(yes)).state == "upstream"


def _generic_module_has_slower(def_node, reader) -> int:
    tree = reader.module("sglang.generic")
    return int(def_node is None and tree is not None and "slower" in ast.unparse(tree))


def test_an_absent_target_whose_older_form_lives_elsewhere_is_named(tmp_path):
    elsewhere = SourceCheck("generic module runs slower()", _generic_module_has_slower, modules=("sglang.generic",))
    target = Target("sglang.a", "work", rules=[RULE], older=[(elsewhere, "older form: the generic module runs slower()")])
    root = _tree(tmp_path / "g", {"generic.py": "def run(x):\n    return slower(x)\n"})
    verdict = check_static(target, root)
    assert (verdict.state, verdict.reason) == (OLDER_FORM, "work: older form: the generic module runs slower()")
    assert check_static(target, _tree(tmp_path / "n", {"generic.py": "def run(x):\n    return x\n"})).state == "absent"


def test_read_only_markers_see_the_def_and_a_custom_marker_a_copy():
    """Probe and Present markers only read, so the guard hands them the def itself; a Custom
    rule used as a marker may change the tree, so it gets a copy and the def stays as parsed."""
    from sgl_accel._guard import check_def
    from sgl_accel._rewrite import Custom, Present, Probe, normalized_dump

    node = ast.parse(textwrap.dedent(OLD)).body[0]
    before = normalized_dump(node)
    seen = []

    def probe(def_node):
        seen.append(("probe", def_node))
        return 0

    def custom(def_node):
        seen.append(("custom", def_node))
        def_node.body.clear()  # a rewrite: on a copy it leaves the def alone
        return 0

    target = Target("sglang.a", "work", rules=[RULE], upstream=[Probe("p", probe), Present("q", "fast(__x)"), Custom("c", custom)])
    assert check_def(target, node).state == "applies"
    assert [kind for kind, _ in seen] == ["probe", "custom"]
    assert seen[0][1] is node and seen[1][1] is not node
    assert normalized_dump(node) == before


def test_in_place_check_rewrites_the_def_it_was_given_unless_older_markers_need_it():
    from sgl_accel._guard import check_def

    node = ast.parse(textwrap.dedent(OLD)).body[0]
    verdict = check_def(Target("sglang.a", "work", rules=[RULE]), node, in_place=True)
    assert verdict.state == "applies" and verdict.patched is node and verdict.original is None
    assert "fast(x)" in ast.unparse(node)
    # An ``older`` marker is asked after the rules failed, on the def as parsed.
    older = ("slower(__x)", "older form: slower()")
    node = ast.parse(textwrap.dedent(OLD.replace("slow(x)", "slower(x)"))).body[0]
    verdict = check_def(Target("sglang.a", "work", rules=[RULE], older=[older]), node, in_place=True)
    assert verdict.state == OLDER_FORM and verdict.original is node
