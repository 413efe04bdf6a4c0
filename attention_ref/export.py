"""Any public function of attention_ref as one standalone Python file that needs only NumPy.

    python -m attention_ref.export NAME [-o FILE]

writes the function ``NAME`` and every definition it needs — the functions, classes and constants
it names, and the ones those name, across the package's modules — under a single ``import numpy
as np``. The dependencies are read from the code (its syntax tree), not from a list kept by hand.
The file reads top to bottom: ``NAME`` first, then each definition after the first one that uses
it (depth first), and last the input checks of ``attention_ref.contract`` under one comment. On
the way:

* the array-namespace lookup becomes NumPy: a function's ``xp = array_namespace(...)`` line is
  dropped and its ``xp.`` read as ``np.`` (any other ``array_namespace(...)`` becomes ``np``); the
  package's own code also runs on CuPy and other array-API libraries;
* a statement whose first line ends with the comment ``# export: omit`` is left out with its body
  (the Numba backend, FlashAttention-1 next to FlashAttention-2, reports for pictures); the file's
  second line names what was left out;
* the annotations of signatures are left out, since their names (``Array``, ``Any``) live in other
  imports, and the signatures are rewrapped; a dataclass's field annotations become strings;
* ``NAME`` keeps its docstring but for the sentence "Export with ..." (the first line says it);
  every other definition keeps the summary paragraph of its docstring (the package has the rest),
  and the contract's checks keep none: their error messages state what they check;
* imports inside functions of names from the package are dropped (the definitions come along),
  and ``import numpy as xp`` becomes ``xp = np``.

The only other import a file may have is Python's own ``from dataclasses import dataclass``, for the
functions that return a parameter container (AttentionParams, IOCount). A name the file would need
from any other library is an error (:class:`ExportError`), never a silently broken file.
``tests/test_export.py`` runs every exported file in an interpreter where only NumPy can be
imported and compares its results and error messages with the package's.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ExportError", "export", "main"]

PACKAGE = Path(__file__).resolve().parent
OMIT = "# export: omit"
NAMESPACE_LOOKUP = "array_namespace"
# Python's own modules an exported file may import besides NumPy: the parameter containers
# (AttentionParams, IOCount) are dataclasses.
STANDARD_LIBRARY = ("from dataclasses import dataclass",)
# The module of the input checks: they come last in an exported file, under this comment.
CHECKS = "contract"
CHECKS_COMMENT = "# The input checks (attention_ref.contract): the same bad input gets the same error everywhere."


class ExportError(ValueError):
    """The function cannot be exported as a standalone NumPy file (the message says why)."""


@dataclass
class _Module:
    """One module of the package: its source, syntax tree, top-level definitions and imports."""

    name: str
    source: bytes
    tree: ast.Module
    lines: list[bytes]
    starts: list[int] = field(default_factory=list)  # byte offset of each line's start
    definitions: dict[str, ast.stmt] = field(default_factory=dict)
    imports: dict[str, tuple[str, str]] = field(default_factory=dict)  # local name -> (module, name)
    external: dict[str, str] = field(default_factory=dict)  # local name -> "import ..." it came from


def _load(name: str, cache: dict[str, _Module]) -> _Module:
    """Parse ``attention_ref.<name>`` once and index its top-level definitions and imports."""
    if name not in cache:
        source = (PACKAGE / f"{name}.py").read_bytes()
        tree = ast.parse(source)
        lines = source.splitlines(keepends=True)
        starts = [0]
        for line in lines:
            starts.append(starts[-1] + len(line))
        module = _Module(name, source, tree, lines, starts)
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                module.definitions[node.name] = node
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    if isinstance(target, ast.Name):
                        module.definitions[target.id] = node
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                _index_import(module, node)
        cache[name] = module
    return cache[name]


def _index_import(module: _Module, node: ast.Import | ast.ImportFrom) -> None:
    for alias in node.names:
        local = alias.asname or alias.name.split(".")[0]
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            module.imports[local] = (node.module, alias.name)  # from .masks import band
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            module.imports[local] = (alias.name, "")  # from . import flash_numba
        else:
            module.external[local] = ast.unparse(node)


def _omitted(module: _Module, node: ast.AST) -> bool:
    """Whether a statement's first line ends with ``# export: omit``."""
    return isinstance(node, ast.stmt) and module.lines[node.lineno - 1].rstrip().endswith(OMIT.encode())


def _annotations(node: ast.AST) -> list[ast.expr]:
    """The annotations of a function's arguments and return value (left out of the export) and of
    a class's fields (kept as strings, which Python does not evaluate)."""
    if isinstance(node, ast.AnnAssign):
        return [node.annotation]
    if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return []
    args = node.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return [a.annotation for a in every if a is not None and a.annotation is not None] + (
        [node.returns] if node.returns is not None else [])


def _walk(module: _Module, root: ast.AST) -> tuple[list[ast.AST], list[ast.stmt]]:
    """The nodes below ``root`` that the export keeps, and the outermost omitted statements."""
    kept: list[ast.AST] = []
    omitted: list[ast.stmt] = []
    skip: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in skip:
            continue
        if node is not root and _omitted(module, node):
            omitted.append(node)
            continue
        kept.append(node)
        skip.update(id(a) for a in _annotations(node))
        stack.extend(reversed(list(ast.iter_child_nodes(node))))
    return kept, omitted


def _free_names(module: _Module, root: ast.stmt) -> list[str]:
    """The names a definition reads and does not bind itself, in order of appearance. A name
    imported from the package inside the function counts as read: its definition comes along."""
    bound: set[str] = set()
    read: list[str] = []
    for node in _walk(module, root)[0]:
        if node is not root and isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.Name):
            (bound.add if isinstance(node.ctx, ast.Store) else read.append)(node.id)
        elif isinstance(node, ast.ImportFrom) and node.level == 1:
            read.extend(a.asname or a.name for a in node.names)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update(a.asname or a.name.split(".")[0] for a in node.names)
    return [n for n in dict.fromkeys(read) if n not in bound or _imported_inside(module, root, n)]


def _imported_inside(module: _Module, root: ast.stmt, name: str) -> tuple[str, str] | None:
    """(module, name) when ``root`` itself imports ``name`` from the package (``from .x import``)."""
    for node in _walk(module, root)[0]:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return node.module, alias.name
    return None


def _resolve(module: _Module, name: str, root: ast.stmt, cache: dict[str, _Module]) -> tuple[str, str] | None:
    """Where ``name``, read in ``root`` of ``module``, is defined: (module, name); None for
    builtins and NumPy. Anything else raises ExportError."""
    inside = _imported_inside(module, root, name)
    if inside is not None:
        return inside
    if name in module.definitions:
        return module.name, name
    if name in module.imports:
        target, attr = module.imports[name]
        if not attr:
            raise ExportError(f"{module.name}.{root.name} uses the module {target!r} as a whole")
        target_module = _load(target, cache)
        if attr in target_module.definitions:
            return target, attr
        return _resolve(target_module, attr, target_module.tree, cache)
    if name in ("np", NAMESPACE_LOOKUP) or hasattr(builtins, name):
        return None
    where = module.external.get(name, "not defined")
    if where in STANDARD_LIBRARY:
        return "", where
    raise ExportError(f"{module.name}.{getattr(root, 'name', '?')} needs {name!r} ({where}); "
                      "an exported file imports NumPy only")


def _closure(module_name: str, name: str, cache: dict[str, _Module]) -> list[tuple[_Module, ast.stmt]]:
    """The definition of ``name`` and everything it needs: each definition after the first one that
    uses it (depth first, in order of use), the contract's checks last."""
    order: list[tuple[_Module, ast.stmt]] = []

    def visit(module_name: str, name: str) -> None:
        if not module_name:  # a standard-library import: see _imports
            return
        module = _load(module_name, cache)
        root = module.definitions[name]
        if any(r is root for _, r in order):
            return
        order.append((module, root))
        for free in _free_names(module, root):
            where = _resolve(module, free, root, cache)
            if where is not None:
                visit(*where)

    visit(module_name, name)
    return sorted(order, key=lambda part: part[0].name == CHECKS and part is not order[0])


def _imports(parts: list[tuple[_Module, ast.stmt]], cache: dict[str, _Module]) -> list[str]:
    """The standard-library imports the definitions need (besides ``import numpy as np``)."""
    needed = {_resolve(m, n, r, cache) for m, r in parts for n in _free_names(m, r)}
    return sorted(imp for where in needed if where and not where[0] for imp in [where[1]])


def _offset(module: _Module, line: int, col: int) -> int:
    """The byte offset in the module's source of (1-based line, byte column)."""
    return module.starts[line - 1] + col


def _span(module: _Module, node: ast.AST) -> tuple[int, int]:
    return _offset(module, node.lineno, node.col_offset), _offset(module, node.end_lineno, node.end_col_offset)


def _lines(module: _Module, node: ast.AST) -> tuple[int, int]:
    """The whole lines a statement stands on (with decorators), as a byte range."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
    return _offset(module, first, 0), _offset(module, node.end_lineno + 1, 0)


def _edits(module: _Module, node: ast.AST, name: str, np_for_xp: bool) -> list[tuple[int, int, bytes]]:
    """The export's changes to one kept node: the namespace lookup (and ``xp`` read as ``np`` where
    ``np_for_xp``), imports, signatures without annotations, and docstrings (see :func:`_docstring`)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == NAMESPACE_LOOKUP:
        return [(*_span(module, node), b"np")]
    if np_for_xp and isinstance(node, ast.Name) and node.id == "xp":
        return [(*_span(module, node), b"np")]
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        start, end = _lines(module, node)
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            return [(start, end, b"")]
        if isinstance(node, ast.Import) and [a.name for a in node.names] == ["numpy"]:
            local = node.names[0].asname or "numpy"
            indent = module.lines[node.lineno - 1][: node.col_offset]
            return [(start, end, b"" if local == "np" else indent + f"{local} = np\n".encode())]
        raise ExportError(f"{module.name}: an exported function imports {ast.unparse(node)!r}")
    if isinstance(node, ast.AnnAssign):  # a dataclass field: "W_q: Array" -> "W_q: 'Array'"
        return [(*_span(module, node.annotation), repr(ast.get_source_segment(module.source.decode(), node.annotation)).encode())]
    if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
        edits = [_signature(module, node)] if isinstance(node, ast.FunctionDef) else []
        doc = node.body[0] if node.body and isinstance(node.body[0], ast.Expr) else None
        if doc is not None and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str):
            edits.append((*_lines(module, doc), _docstring(module, doc, node.name == name, node.name)))
        return edits
    return []


def _docstring(module: _Module, doc: ast.Expr, exported: bool, name: str) -> bytes:
    """A docstring as the export writes it: the exported function's without its sentence "Export
    with ..." (the file's first line says it); another definition's cut to its summary paragraph
    (PEP 257); none for the contract's checks, whose error messages say what they check."""
    lines = module.lines[doc.lineno - 1: doc.end_lineno]
    quote = lines[0].lstrip()[:3]
    if module.name == CHECKS and not exported:
        return b""
    if exported:
        sentence = f"Export with ``python -m attention_ref.export {name}``.".encode()
        lines = [x.replace(b" " + sentence, b"") for x in lines if x.strip() != sentence]
        if len(lines) > 2 and not lines[-2].strip() and lines[-1].strip() == quote:
            del lines[-2]  # no blank line left before the closing quotes
    elif b"" in (x.strip() for x in lines):
        lines = lines[: [x.strip() for x in lines].index(b"")]
    else:
        return b"".join(lines)
    if len(lines) == 2 and lines[-1].strip() == quote:
        lines = [lines[0].rstrip() + quote + b"\n"]
    elif lines[-1].strip() != quote and not lines[-1].rstrip().endswith(quote):
        lines[-1] = lines[-1].rstrip() + quote + b"\n"
    return b"".join(lines)


def _namespace_line(root: ast.stmt) -> ast.stmt | None:
    """A function's statement ``xp = array_namespace(...)``, when nothing else in it binds ``xp``:
    the export drops the line and reads ``xp`` as ``np``."""
    if not isinstance(root, ast.FunctionDef):
        return None
    lookups = [s for s in root.body if isinstance(s, ast.Assign) and [ast.unparse(t) for t in s.targets] == ["xp"]
               and isinstance(s.value, ast.Call) and ast.unparse(s.value.func) == NAMESPACE_LOOKUP]
    binds = [n for n in ast.walk(root) if (isinstance(n, ast.Name) and n.id == "xp" and isinstance(n.ctx, ast.Store))
             or (isinstance(n, ast.arg) and n.arg == "xp") or (isinstance(n, ast.alias) and n.asname == "xp")]
    return lookups[0] if len(lookups) == 1 and len(binds) == 1 else None


def _signature(module: _Module, node: ast.FunctionDef) -> tuple[int, int, bytes]:
    """``def name(...):`` rebuilt without annotations and wrapped at 100 columns."""
    source = module.source.decode()
    args = node.args
    positional = [*args.posonlyargs, *args.args]
    defaults = [None] * (len(positional) - len(args.defaults)) + list(args.defaults)
    params = [a.arg + ("" if d is None else "=" + ast.get_source_segment(source, d)) for a, d in zip(positional, defaults, strict=True)]
    if args.posonlyargs:
        params.insert(len(args.posonlyargs), "/")
    if args.vararg or args.kwonlyargs:
        params.append("*" + (args.vararg.arg if args.vararg else ""))
    params += [a.arg + ("" if d is None else "=" + ast.get_source_segment(source, d))
               for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True)]
    if args.kwarg:
        params.append("**" + args.kwarg.arg)
    indent = " " * node.col_offset
    lines, line = [], f"{indent}def {node.name}("
    for i, param in enumerate(params):
        piece = param + ("," if i < len(params) - 1 else "):")
        if len(line) + len(piece) + 1 > 100 and not line.endswith("("):
            lines.append(line.rstrip())
            line = " " * (len(indent) + len("def ") + len(node.name) + 1)
        line += piece + " "
    lines.append(line.rstrip() if params else f"{indent}def {node.name}():")
    start = _offset(module, node.lineno, 0)
    return start, _offset(module, node.body[0].lineno, 0), ("\n".join(lines) + "\n").encode()


def _text(module: _Module, root: ast.stmt, name: str) -> str:
    """The source of one definition with the export's edits applied."""
    start, end = _lines(module, root)
    kept, omitted = _walk(module, root)
    lookup = _namespace_line(root)
    edits = [e for node in kept for e in _edits(module, node, name, lookup is not None)]
    dropped = [_lines(module, s) for s in omitted] + ([_lines(module, lookup)] if lookup is not None else [])
    edits = [e for e in edits if not any(a <= e[0] < b for a, b in dropped)] + [(a, b, b"") for a, b in dropped]
    text = module.source[start:end]
    for s, e, new in sorted(edits, key=lambda edit: -edit[0]):
        text = text[: s - start] + new + text[e - start:]
    return text.decode()


def _omitted_line(module: _Module, node: ast.stmt) -> str:
    """The first line of an omitted statement, without the marker, for the file's header."""
    return module.lines[node.lineno - 1].decode().strip().removesuffix(OMIT).strip().rstrip(":")


def export(name: str) -> str:
    """The standalone source of the public function or class ``name`` of attention_ref."""
    import attention_ref

    module_name = attention_ref._EXPORTS.get(name)
    if module_name is None:
        raise ExportError(f"{name!r} is not a public name of attention_ref")
    cache: dict[str, _Module] = {}
    parts = _closure(module_name, name, cache)
    constants = [(m, r) for m, r in parts if isinstance(r, (ast.Assign, ast.AnnAssign))]
    definitions = [(m, r) for m, r in parts if not isinstance(r, (ast.Assign, ast.AnnAssign))]
    omitted = [_omitted_line(m, s) for m, r in parts for s in _walk(m, r)[1]]
    header = f"# {name} from attention_ref {attention_ref.__version__}: python -m attention_ref.export {name}\n"
    if omitted:
        header += "# left out here (the package has them): " + "; ".join(dict.fromkeys(omitted)) + "\n"
    header += "".join(imp + "\n" for imp in ["import numpy as np", *_imports(parts, cache)])
    texts = [_text(m, r, name).rstrip("\n") for m, r in definitions]
    checks = [i for i, (m, _) in enumerate(definitions) if m.name == CHECKS]  # the last ones (_closure)
    if checks:
        texts[checks[0]] = CHECKS_COMMENT + "\n" + texts[checks[0]]
    body = "\n\n".join(texts)
    consts = "".join(_text(m, r, name).rstrip("\n") + "\n" for m, r in constants)
    return header + "\n" + (consts + "\n" if consts else "") + body + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attention_ref.export", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="a public function of attention_ref, e.g. scaled_dot_product_attention")
    parser.add_argument("-o", "--output", help="the file to write (default: standard output)")
    args = parser.parse_args(argv)
    try:
        source = export(args.name)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.output:
        Path(args.output).write_text(source)
        print(f"wrote {args.output}: {args.name}, {source.count(chr(10))} lines", file=sys.stderr)
    else:
        sys.stdout.write(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
