"""Structural rewrite rules over the AST of one installed function.

A patch never carries a copy of sglang code. It describes the upstream change as
rules ("this call becomes that call"), and each rule must match an exact number of
sites in the target function; any other count means the function is not the shape
the patch was written for, and the patch is not applied.

Patterns are Python source. A bare name that starts with two underscores and does
not end with two (``__x``, ``__state``) is a metavariable: it matches any
expression (or, alone as a statement, any one statement) and can be reused in the
replacement. Everything else must match exactly (variable names, constants, the
order of keyword arguments); only source positions and load/store contexts are
ignored.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import types
from dataclasses import dataclass
from typing import Callable

_METAVAR = re.compile(r"^__[A-Za-z0-9_]*[A-Za-z0-9]$")
_POSITION_FIELDS = ("lineno", "col_offset", "end_lineno", "end_col_offset")


def is_metavar(name: str) -> bool:
    return bool(_METAVAR.match(name)) and not name.endswith("__")


class PatternError(ValueError):
    """A rule's own pattern or replacement is malformed (a bug in the patch)."""


def clone(node):
    """Deep copy of an AST (several times faster than copy.deepcopy on large trees)."""
    if isinstance(node, ast.AST):
        new = node.__class__.__new__(node.__class__)
        for key, value in node.__dict__.items():
            new.__dict__[key] = clone(value)
        return new
    if isinstance(node, list):
        return [clone(item) for item in node]
    return node


def dotted_name(node):
    """``a.b.c`` for a name followed by attributes, else None (what ast.unparse gives for such a
    node, without unparsing)."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return ".".join(reversed(parts))


def walk(node):
    """Every node under ``node`` (any order); a faster ast.walk for large functions."""
    stack = [node]
    while stack:
        current = stack.pop()
        yield current
        for value in current.__dict__.values():
            if isinstance(value, ast.AST):
                stack.append(value)
            elif isinstance(value, list):
                stack.extend(item for item in value if isinstance(item, ast.AST))


@functools.lru_cache(maxsize=512)
def _parse_pattern(source: str) -> tuple[str, list[ast.AST]]:
    """Parsed once per pattern; callers never mutate the result (templates are cloned)."""
    """Return ("expr", [node]) for an expression, else ("stmts", [statements])."""
    try:
        return "expr", [ast.parse(source.strip(), mode="eval").body]
    except SyntaxError:
        pass
    try:
        body = ast.parse(_dedent(source)).body
    except SyntaxError as exc:
        raise PatternError(f"pattern is not valid Python: {source!r}: {exc}") from None
    if not body:
        raise PatternError("empty pattern")
    return "stmts", body


def _dedent(source: str) -> str:
    import textwrap

    return textwrap.dedent(source).strip("\n")


# --------------------------------------------------------------------------- matching


def _match(pattern, node, bindings: dict) -> bool:
    if isinstance(pattern, ast.Name) and is_metavar(pattern.id):
        return _bind(pattern.id, node, bindings)
    if isinstance(pattern, ast.Expr) and isinstance(pattern.value, ast.Name) and is_metavar(pattern.value.id):
        # A metavariable alone on a line stands for any single statement.
        return isinstance(node, ast.stmt) and _bind(pattern.value.id, node, bindings)
    if type(pattern) is not type(node):
        return False
    if isinstance(pattern, ast.AST):
        for field in pattern._fields:
            if field in ("ctx", "type_comment"):
                continue
            if not _match(getattr(pattern, field, None), getattr(node, field, None), bindings):
                return False
        return True
    if isinstance(pattern, list):
        return len(pattern) == len(node) and all(_match(p, n, bindings) for p, n in zip(pattern, node))
    return pattern == node


def _bind(name: str, node, bindings: dict) -> bool:
    if not isinstance(node, ast.AST):
        return False
    if name in bindings:
        return normalized_dump(bindings[name]) == normalized_dump(node)
    bindings[name] = node
    return True


def normalized_dump(node) -> str:
    """``ast.dump(node, annotate_fields=False)`` as Python 3.11 writes it, on every Python: an
    empty ``type_params`` (3.12+) is left out, as are fields that are None by default. Written
    out because it is faster than ast.dump and its text is what fingerprints are made of."""
    if isinstance(node, ast.AST):
        cls = type(node)
        args = []
        keywords = False
        for name in node._fields:
            value = getattr(node, name, _MISSING)
            if value is _MISSING or (value is None and getattr(cls, name, _MISSING) is None) or (name == "type_params" and not value):
                keywords = keywords or name != "type_params"
                continue
            args.append(f"{name}={normalized_dump(value)}" if keywords else normalized_dump(value))
        return f"{cls.__name__}({', '.join(args)})"
    if isinstance(node, list):
        return f"[{', '.join(map(normalized_dump, node))}]"
    return repr(node)


_MISSING = object()


def fingerprint(node: ast.AST) -> str:
    """A short hash of a function's structure: positions, comments and formatting excluded."""
    import hashlib

    return hashlib.sha256(normalized_dump(node).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- substitution


def _substitute(template: ast.AST, bindings: dict, site: ast.AST):
    """A copy of ``template`` with metavariables replaced by copies of their bound nodes.

    New nodes take the position of the matched site, so tracebacks through the
    patched function still point at the original line.
    """
    template = clone(template)
    for sub in walk(template):
        if "lineno" in sub._attributes:
            for attr in _POSITION_FIELDS:
                setattr(sub, attr, getattr(site, attr, None))
    return _fill(template, bindings)


def _fill(node, bindings: dict):
    """``node`` (a fresh copy) with each metavariable replaced by a copy of its bound node; a
    metavariable alone on a line is replaced by its bound statement."""
    if isinstance(node, ast.Name) and is_metavar(node.id):
        if node.id not in bindings:
            raise PatternError(f"replacement uses unbound metavariable {node.id}")
        return clone(bindings[node.id])
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Name) and isinstance(bindings.get(node.value.id), ast.stmt):
        return clone(bindings[node.value.id])
    for field in node._fields:
        value = getattr(node, field, None)
        if isinstance(value, list):
            value[:] = [_fill(item, bindings) if isinstance(item, ast.AST) else item for item in value]
        elif isinstance(value, ast.AST):
            setattr(node, field, _fill(value, bindings))
    return node


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """Replace every site matching ``find`` with ``replace``; exactly ``count`` sites must match.

    ``find`` is an expression or a run of statements. ``replace`` is source of the
    same kind (a run of statements may be replaced by any number of statements,
    including none: use ``"pass"`` only where Python needs a statement).
    """

    description: str
    find: str
    replace: str
    count: int = 1

    def apply(self, func: ast.AST) -> int:
        kind, pattern = _parse_pattern(self.find)
        rkind, replacement = _parse_pattern(self.replace)
        if kind == "expr":
            if rkind != "expr":
                raise PatternError(f"{self.description}: an expression must be replaced by an expression")
            return _replace_expressions(func, pattern[0], replacement[0])
        if rkind == "expr":
            replacement = [ast.Expr(replacement[0])]
        return _replace_statements(func, pattern, replacement)


@dataclass(frozen=True)
class Present:
    """A check, not a change: ``find`` must occur exactly ``count`` times."""

    description: str
    find: str
    count: int = 1

    def apply(self, func: ast.AST) -> int:
        return count_matches(func, self.find)


@dataclass(frozen=True)
class Probe:
    """A check written as a function ``count_sites(func_def) -> sites found`` that only reads
    the tree: a marker runs it on the def itself, where a Custom rule gets a copy."""

    description: str
    count_sites: Callable[[ast.AST], int]
    count: int = 1

    def apply(self, func: ast.AST) -> int:
        return self.count_sites(func)


@dataclass(frozen=True)
class Custom:
    """A rewrite written as a function ``transform(func_def) -> sites changed``.

    For changes that patterns cannot say simply (e.g. editing a decorator list).
    """

    description: str
    transform: Callable[[ast.AST], int]
    count: int = 1

    def apply(self, func: ast.AST) -> int:
        return self.transform(func)


class NodeIndex:
    """One walk over a tree, for many read-only pattern counts: nodes by type, statement blocks."""

    def __init__(self, root: ast.AST):
        self.by_type: dict = {}
        self.nodes: list = []
        self.blocks: list = []
        by_type, blocks = self.by_type, self.blocks
        stack = [root]
        while stack:
            node = stack.pop()
            self.nodes.append(node)
            kind = type(node)
            if kind in by_type:
                by_type[kind].append(node)
            else:
                by_type[kind] = [node]
            for key, value in node.__dict__.items():
                if isinstance(value, list):
                    if value and isinstance(value[0], ast.AST):
                        stack.extend(value)
                        if key in _BLOCK_FIELDS and isinstance(value[0], ast.stmt):
                            blocks.append(value)
                elif isinstance(value, ast.AST):
                    stack.append(value)

    def uses_private_names(self) -> bool:
        names = [n.id for n in self.by_type.get(ast.Name, ())] + [n.attr for n in self.by_type.get(ast.Attribute, ())]
        return any(name.startswith("__") and not name.endswith("__") for name in names)


def count_matches(func: ast.AST, find: str, index: "NodeIndex | None" = None) -> int:
    """How many sites of ``func`` match ``find`` (pass an index when counting many patterns)."""
    kind, pattern = _parse_pattern(find)
    index = index or NodeIndex(func)
    if kind == "expr":
        root = pattern[0]
        free = isinstance(root, ast.Name) and is_metavar(root.id)
        candidates = index.nodes if free else index.by_type.get(type(root), ())
        return sum(1 for node in candidates if _match(root, node, {}))
    total = 0
    for block in index.blocks:
        i = 0
        while i + len(pattern) <= len(block):
            if _match(pattern, block[i : i + len(pattern)], {}):
                total += 1
                i += len(pattern)
            else:
                i += 1
    return total


def _replace_expressions(func: ast.AST, pattern: ast.AST, replacement: ast.AST) -> int:
    """Replace, top-down, every expression under ``func`` that matches ``pattern`` (a replaced
    site's own children are not searched). A plain recursion: ast.NodeTransformer's dispatch
    made this the slowest step of a first apply()."""
    hits = 0
    free = isinstance(pattern, ast.Name) and is_metavar(pattern.id)
    wanted = type(pattern)

    def transform(node):
        nonlocal hits
        if (free or type(node) is wanted) and isinstance(node, ast.expr):
            bindings: dict = {}
            if _match(pattern, node, bindings):
                hits += 1
                return _substitute(replacement, bindings, node)
        replace_children(node)
        return node

    def replace_children(node):
        for field in node._fields:
            value = getattr(node, field, None)
            if isinstance(value, list):
                for i, item in enumerate(value):
                    if isinstance(item, ast.AST):
                        value[i] = transform(item)
            elif isinstance(value, ast.AST):
                setattr(node, field, transform(value))

    replace_children(func)  # never replaces the function node itself
    return hits


_BLOCK_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


_BLOCK_FIELD_SET = frozenset(_BLOCK_FIELDS)


def statement_lists(root: ast.AST) -> list:
    """Every statement list under ``root``, in the order of a depth-first walk. Only nodes
    that hold statements are visited (expressions never do), which skips most of a tree."""
    blocks = []
    stack = [root]
    while stack:
        node = stack.pop()
        fields = node.__dict__
        for field in _BLOCK_FIELDS:
            value = fields.get(field)
            if value and isinstance(value, list) and isinstance(value[0], ast.stmt):
                blocks.append(value)
        for field, value in fields.items():  # the tree's own field order, as a full walk has it
            if field in _BLOCK_FIELD_SET and isinstance(value, list):
                stack.extend(value)
    return blocks


def _replace_statements(func: ast.AST, pattern: list, replacement: list) -> int:
    hits = 0
    for block in statement_lists(func):
        i = 0
        while i + len(pattern) <= len(block):
            bindings: dict = {}
            if _match(pattern, block[i : i + len(pattern)], bindings):
                new = [_substitute(stmt, bindings, block[i]) for stmt in replacement]
                block[i : i + len(pattern)] = new
                hits += 1
                i += len(new)
            else:
                i += 1
        if not block:
            block.append(ast.Pass(lineno=1, col_offset=0, end_lineno=1, end_col_offset=4))
    return hits


# --------------------------------------------------------------------------- source of a def


def find_def(tree: ast.Module, qualname: str):
    """The FunctionDef for ``Class.method`` / ``function`` in a parsed module, or None."""
    scope: list = tree.body
    parts = qualname.split(".")
    node = None
    for i, part in enumerate(parts):
        wanted = (ast.FunctionDef, ast.AsyncFunctionDef) if i == len(parts) - 1 else (ast.ClassDef,)
        # The last definition wins, as it does when Python runs the module.
        matches = [n for n in scope if isinstance(n, wanted) and n.name == part]
        if not matches:
            return None
        node = matches[-1]
        scope = node.body
    return node


def parse_def_at(lines: list[str], first_line: int, last_line: int = 0):
    """Parse the def (with its decorators) that starts at 1-based ``first_line``.

    Much cheaper than parsing the whole module. ``last_line`` (from the code
    object, see ``code_last_line``) bounds the block; without it the block is
    found by tokenizing. The block keeps its own indentation (a method is parsed
    under a synthetic ``if 1:`` header), so string literals, line numbers and
    column offsets are exactly the file's.
    """
    start = first_line - 1
    if last_line:
        block = lines[start:last_line]
    else:
        import inspect

        block = inspect.getblock(lines[start:])
    text = "".join(block)
    indented = block[0][:1] in (" ", "\t")
    # Blank lines in front put every node on its line in the file (cheaper than
    # renumbering the tree afterwards).
    if indented:
        tree = ast.parse("\n" * (start - 1) + "if 1:\n" + text) if start else ast.parse("if 1:\n" + text)
        node = tree.body[0].body[0]
        if not start:
            ast.increment_lineno(node, -1)
    else:
        node = ast.parse("\n" * start + text).body[0]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return None
    return node


def code_last_line(code) -> int:
    """The last source line of a function's code (nested code included); 0 if unknown."""
    if not hasattr(code, "co_positions"):  # Python 3.10
        return 0
    last = 0
    for _, end, _, _ in code.co_positions():
        if end and end > last:
            last = end
    for const in code.co_consts:
        if hasattr(const, "co_positions"):
            last = max(last, code_last_line(const))
    return last


_IMPORT_LINE = re.compile(r"^(\s*)(import|from)\s")
_TOP_LEVEL_SCOPE = re.compile(r"^(def|async\s+def|class|@)")
_MODULE_LINE = re.compile(r"^(?:[^\s#]|[ \t]+(?:import|from)\s)", re.M)


def _line_at(text: str, start: int) -> str:
    end = text.find("\n", start)
    return text[start:] if end < 0 else text[start : end + 1]


def module_import_names(lines: list) -> tuple:
    """Names bound by import statements in module scope (not inside a def or class).

    CPython compiles ``name.attr(...)`` differently when ``name`` was bound by an
    import in module scope (LOAD_ATTR instead of LOAD_METHOD in 3.11), so a
    function recompiled on its own must see the same import bindings to produce
    the same bytecode as the original.
    """
    text = "".join(lines)
    statements: list = []
    in_def = False
    consumed = 0  # end of the last import statement taken (its continuation lines included)
    for match in _MODULE_LINE.finditer(text):  # top-level lines and indented imports only
        start = match.start()
        if start < consumed:
            continue
        line = _line_at(text, start)
        if not line[0].isspace():
            in_def = bool(_TOP_LEVEL_SCOPE.match(line))
        if in_def or not _IMPORT_LINE.match(line):
            continue
        statement, end = line, start + len(line)
        depth = line.count("(") - line.count(")")
        while (depth > 0 or statement.rstrip().endswith("\\")) and end < len(text):
            more = _line_at(text, end)
            statement, end = statement + more, end + len(more)
            depth += more.count("(") - more.count(")")
        consumed = end
        statements.append(statement.strip())
    names: list = []
    for node in _parse_imports(statements):
        for alias in node.names:
            names.append(alias.asname or alias.name.split(".")[0])
    return tuple(dict.fromkeys(n for n in names if n != "*"))


def _parse_imports(statements: list) -> list:
    """The import nodes among ``statements``: one parse of them all (the common case), else
    one parse each (a docstring line that starts with "import" is not a statement)."""
    try:
        tree = ast.parse("\n".join(statements))
    except SyntaxError:
        tree = None
    if tree is not None and len(tree.body) == len(statements):
        nodes = tree.body
    else:
        nodes = []
        for statement in statements:
            try:
                nodes.append(ast.parse(statement).body[0])
            except (SyntaxError, IndexError):
                pass
    return [n for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom))]


# --------------------------------------------------------------------------- compile


FACTORY = "__sgl_accel_factory__"


def future_flags(code) -> int:
    """The ``from __future__`` compiler flags a code object was compiled with."""
    import __future__

    mask = 0
    for name in __future__.all_feature_names:
        mask |= getattr(__future__, name).compiler_flag
    return code.co_flags & mask


def compile_def(func: ast.AST, filename: str, module_globals: dict, closure: dict, *, decorators: bool = True, imported: tuple = (), flags: int = 0):
    """Evaluate the def ``func`` as if written where the original was.

    The def is wrapped in a factory whose parameters are the names of
    ``closure`` (the original's free variables such as ``__class__`` for
    zero-argument ``super()``, plus helpers the patch adds), so the new function
    sees them as closure cells and its globals are the target module's own dict.
    Returns whatever the def statement binds (decorators applied unless
    ``decorators`` is False). ``imported``: the target module's import-bound
    names (see ``module_import_names``), declared in a never-run block so that
    the compiler treats them as the original module did; ``flags``: its
    ``__future__`` flags (see ``future_flags``).
    """
    code = factory_code(func, filename, tuple(closure), decorators=decorators, imported=imported, flags=flags)
    return run_factory(code, module_globals, closure)


def factory_code(func: ast.AST, filename: str, closure_names: tuple, *, decorators: bool = True, imported: tuple = (), flags: int = 0):
    """The compiled factory module of ``compile_def``, not run (the code-object cache stores it)."""
    # A shallow copy: compiling reads the tree and never changes it.
    func = ast.FunctionDef(**{**func.__dict__, "decorator_list": func.decorator_list if decorators else []}) if isinstance(func, ast.FunctionDef) else ast.AsyncFunctionDef(**{**func.__dict__, "decorator_list": func.decorator_list if decorators else []})
    line = func.lineno
    args = [ast.arg(arg=name, lineno=line, col_offset=0) for name in closure_names]
    factory = ast.FunctionDef(
        name=FACTORY,
        args=ast.arguments(posonlyargs=[], args=args, vararg=None, kwonlyargs=[], kw_defaults=[], kwarg=None, defaults=[]),
        body=[func, ast.Return(value=ast.Name(id=func.name, ctx=ast.Load()))],
        decorator_list=[],
        returns=None,
    )
    if "type_params" in ast.FunctionDef._fields:
        factory.type_params = []
    body = [factory]
    if imported:
        never = ast.If(
            test=ast.Constant(False),
            body=[ast.Import(names=[ast.alias(name=n)]) for n in imported],
            orelse=[],
        )
        body.insert(0, never)
    module = ast.Module(body=body, type_ignores=[])
    # Position only the nodes made here; the def's own nodes carry the file's positions.
    made = [factory, factory.body[1], factory.body[1].value, factory.args, *args]
    if imported:
        made += list(walk(body[0]))
    for node in made:
        if "lineno" in node._attributes:
            node.lineno = node.end_lineno = line
            node.col_offset = node.end_col_offset = 0
    # The target module's own __future__ flags, never this module's.
    return compile(module, filename, "exec", flags=flags, dont_inherit=True)


def def_code_from_text(lines: list, first_line: int, last_line: int, name: str, filename: str, closure_names: tuple = (), *, imported: tuple = (), flags: int = 0):
    """The code object that lines ``first_line``..``last_line`` of a file (a def, decorators
    included) compile to, set up as ``compile_def`` sets it up (closure names as factory
    parameters, the module's import names, its ``__future__`` flags). Compiled from the text:
    nothing runs and no Python AST is built, so it costs one C compile. None if the block is
    a module-level def with free variables (no such def exists)."""
    block = "".join(lines[first_line - 1 : last_line])
    if block[:1] in (" ", "\t"):  # a method: the body of a factory, as in compile_def
        head = "\n" * max(first_line - 2, 0) + f"def {FACTORY}({', '.join(closure_names)}):\n"
    elif closure_names:
        return None
    else:
        head = "\n" * (first_line - 1)
    # Position does not matter: the compiler sees every import binding of the module at once.
    tail = "\nif False: import " + ", ".join(imported) + "\n" if imported else "\n"
    module = compile(head + block + tail, filename, "exec", flags=flags, dont_inherit=True)
    scope = next((c for c in module.co_consts if isinstance(c, types.CodeType) and c.co_name == FACTORY), module)
    return next((c for c in scope.co_consts if isinstance(c, types.CodeType) and c.co_name == name), None)


def def_code_from_pyc(filename: str, name: str, first_line: int):
    """The code object of the def ``name`` at ``first_line`` of ``filename``, as the import
    system compiled it: read from the file's byte-code cache, if that cache is a timestamp
    one that matches the file's current modification time and size (the test Python's import
    makes before it uses a cache). None if there is no such cache or no such def in it (compile the text)."""
    import importlib.util

    try:
        pyc = importlib.util.cache_from_source(filename)
        st = os.stat(filename)
        module = _module_code_in_pyc(pyc, int(st.st_mtime) & 0xFFFFFFFF, st.st_size & 0xFFFFFFFF)
    except (OSError, ValueError, NotImplementedError):
        return None
    return _find_code(module, name, first_line) if module is not None else None


@functools.lru_cache(maxsize=8)
def _module_code_in_pyc(pyc: str, mtime: int, size: int):
    """The module code of a timestamp byte-code cache written for a source of that mtime and size."""
    import importlib.util
    import marshal

    with open(pyc, "rb") as f:
        data = f.read()
    header_ok = data[:4] == importlib.util.MAGIC_NUMBER and int.from_bytes(data[4:8], "little") == 0
    if not header_ok or int.from_bytes(data[8:12], "little") != mtime or int.from_bytes(data[12:16], "little") != size:
        return None
    try:
        return marshal.loads(memoryview(data)[16:])
    except (EOFError, ValueError, TypeError):
        return None


def _find_code(code, name: str, first_line: int):
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if const.co_name == name and const.co_firstlineno == first_line:
                return const
            found = _find_code(const, name, first_line)
            if found is not None:
                return found
    return None


def run_factory(code, module_globals: dict, closure: dict):
    """Run a factory module code (from ``compile_def`` or the cache): the def it binds."""
    namespace: dict = {}
    exec(code, module_globals, namespace)
    return namespace[FACTORY](*closure.values())
