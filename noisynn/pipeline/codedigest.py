"""The code each workflow step runs, as a digest: a result is only current if its code is (no torch import here).

Snakemake sees a rule's shell command change, but not the Python that the command imports. So each
rule gets, as a param, the digest of exactly the code its job runs: the functions of the command line
that handle its verb, and every noisynn module they import, followed transitively. A changed digest
changes the params, and Snakemake reruns the jobs of that rule (and what depends on them).

The digest hashes each module's syntax tree with its docstrings removed, so a comment, a docstring
or a test changes nothing; a changed line of code changes the digest of every step that imports it.
The digest follows the imports alone, with no list of modules a step is said not to run: a
training without noise still builds a noise record and cuts its validation batches with the
injection code (a test traces such a training and finds both), so a change there reruns it too.

Each figure of the report is a node of its own (as showyourwork makes each figure's script its
input): its digest holds the report's code with the plotting module cut down to what that figure
draws with (its drawing function, and the module's functions and constants those reach, by name),
and the summary's holds the report's code without the plotting module (it needs only the figures'
names). So editing one plotting function redraws that figure alone.

``python -m noisynn.pipeline.codedigest --out FILE`` writes every step's digest; the DVC stage of the
workflow depends on that file, so ``dvc.lock`` records the code that Snakemake ran.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
from functools import lru_cache
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]

_CLI_COMMON = ("main", "build_parser", "_Parser", "_json_arg", "_run")
# step → (functions of noisynn/cli.py it runs, modules it runs beyond what those import)
STEPS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "prepare": (("_add_prepare", "_prepare"), ()),
    "pretrain": (("_add_train_args", "_add_training", "_train"), ()),
    "finetune": (("_add_train_args", "_add_training", "_train"), ()),
    "import_weights": (("_add_import_weights", "_import_weights"), ()),
    "evaluate": (("_add_evaluate", "_evaluate", "_evaluation_groups", "_evaluation_settings", "_write_evaluation"), ()),
    "aggregate": (("_add_aggregate", "_aggregate"), ()),
    "report": (("_add_report", "_report"), ()),
}


def _normalized(node: ast.AST) -> str:
    """``node`` dumped without docstrings, positions or field names. The docstrings are cut from the
    parsed tree for the dump and put back after it: a deep copy of the tree cost four times the dump."""
    cut = []
    for n in ast.walk(node):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = n.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                cut.append((n, body))
                n.body = body[1:] or [ast.Pass()]
    try:
        return ast.dump(node, annotate_fields=False, include_attributes=False)
    finally:
        for n, body in cut:
            n.body = body


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    rel = module.split(".")[1:]
    path = PACKAGE.joinpath(*rel).with_suffix(".py") if rel else PACKAGE / "__init__.py"
    if not path.is_file():
        path = PACKAGE.joinpath(*rel, "__init__.py")
    return ast.parse(path.read_text(), filename=str(path))


@lru_cache(maxsize=None)
def _module_dump(module: str) -> str:
    return _normalized(_tree(module))


def clear_cache() -> None:
    """Forget the parsed modules (after the files changed)."""
    for cached in (_tree, _module_dump, _module_imports, step_digest, figure_digest, summary_digest):
        cached.cache_clear()


def _is_module(name: str) -> bool:
    rel = name.split(".")[1:]
    return bool(rel) and (PACKAGE.joinpath(*rel).with_suffix(".py").is_file() or PACKAGE.joinpath(*rel, "__init__.py").is_file())


def _runtime_nodes(node: ast.AST):
    """Every node below ``node`` but those of ``if TYPE_CHECKING:`` blocks (imports for annotations only)."""
    todo = [node]
    while todo:
        n = todo.pop()
        yield n
        if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING":
            todo.extend(n.orelse)
            continue
        todo.extend(ast.iter_child_nodes(n))


def _imports(node: ast.AST) -> set[str]:
    """The noisynn modules that ``node`` imports, at any depth (function-level imports too)."""
    found = set()
    for n in _runtime_nodes(node):
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names if a.name.startswith("noisynn.") and _is_module(a.name)}
        elif isinstance(n, ast.ImportFrom) and n.module and (n.module == "noisynn" or n.module.startswith("noisynn.")):
            if n.module == "noisynn":
                found |= {f"noisynn.{a.name}" for a in n.names if _is_module(f"noisynn.{a.name}")}
            elif _is_module(n.module):
                found.add(n.module)
                found |= {f"{n.module}.{a.name}" for a in n.names if _is_module(f"{n.module}.{a.name}")}
    # importing a module runs its packages' __init__ first (noisynn.inject's registers the model families)
    parts = [name.split(".") for name in found]
    return found | {".".join(p[:i]) for p in parts for i in range(2, len(p)) if _is_module(".".join(p[:i]))}


@lru_cache(maxsize=None)
def _module_imports(module: str) -> frozenset[str]:
    return frozenset(_imports(_tree(module)))


def _closure(modules: set[str]) -> set[str]:
    todo, seen = list(modules), set()
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(_module_imports(m) - seen)
    return seen


def step_code(step: str) -> dict[str, str]:
    """What a step's digest covers: ``cli:<function>`` and module names, each with its normalized tree."""
    if step not in STEPS:
        raise KeyError(f"unknown workflow step {step!r}; steps: {', '.join(STEPS)}")
    functions, extra = STEPS[step]
    cli = _tree("noisynn.cli")
    defs = {n.name: n for n in cli.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    wanted = [f for f in (*_CLI_COMMON, *functions) if f in defs]
    top_imports = [n for n in cli.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    modules = set(extra)
    for node in [defs[f] for f in wanted] + top_imports:
        modules |= _imports(node)
    modules = _closure(modules)
    code = {f"cli:{f}": _normalized(defs[f]) for f in wanted}
    code |= {m: _module_dump(m) for m in sorted(modules)}
    return code


@lru_cache(maxsize=None)
def step_digest(step: str) -> str:
    """The digest of the code a step runs (16 hex digits: short in the params, collisions irrelevant)."""
    return _digest(step_code(step))


PLOTS_MODULE = "noisynn.report.plots"
_FIGURE_TABLE = "DRAW"  # the plotting module's dict: figure name → the function that draws it


def _top_level(tree: ast.Module) -> tuple[dict[str, ast.AST], list[ast.AST]]:
    """A module's named top-level definitions (functions, classes, constants) and its other statements."""
    named, rest = {}, []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            named[node.name] = node
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        named[name.id] = node
        else:
            rest.append(node)
    return named, rest


def _figure_table(named: dict[str, ast.AST]) -> dict[str, str]:
    table = named[_FIGURE_TABLE].value
    return {k.value: v.id for k, v in zip(table.keys, table.values, strict=True)}


def figures() -> tuple[str, ...]:
    """The report's figures, in the plotting module's order."""
    return tuple(_figure_table(_top_level(_tree(PLOTS_MODULE))[0]))


def _plots_part(roots: set[str]) -> dict[str, str]:
    """The plotting module's definitions that ``roots`` reach by name, and its imports and other statements."""
    named, rest = _top_level(_tree(PLOTS_MODULE))
    table = {_FIGURE_TABLE, "FIGURES"}  # the whole list of figures is no figure's code
    todo, seen = list(roots), set()
    while todo:
        name = todo.pop()
        if name in seen or name not in named or name in table:
            continue
        seen.add(name)
        todo.extend(n.id for n in ast.walk(named[name]) if isinstance(n, ast.Name))
    part = {f"{PLOTS_MODULE}:{name}": _normalized(named[name]) for name in sorted(seen)}
    part[f"{PLOTS_MODULE}:<statements>"] = "".join(_normalized(node) for node in rest)
    return part


def figure_code(figure: str) -> dict[str, str]:
    """What figure ``figure``'s job digests: the report's code with only the plotting code it draws with."""
    draw = _figure_table(_top_level(_tree(PLOTS_MODULE))[0])
    if figure not in draw:
        raise KeyError(f"unknown figure {figure!r}; figures: {', '.join(draw)}")
    code = {k: v for k, v in step_code("report").items() if k != PLOTS_MODULE}
    code |= _plots_part({draw[figure], "write_figure"})
    code[f"{PLOTS_MODULE}:{_FIGURE_TABLE}[{figure}]"] = draw[figure]
    return code


def summary_code() -> dict[str, str]:
    """What the summary's job digests: the report's code without the plotting module, whose figures'
    names alone the summary uses (it embeds the figures, which are its inputs)."""
    code = {k: v for k, v in step_code("report").items() if k != PLOTS_MODULE}
    code[f"{PLOTS_MODULE}:FIGURES"] = ",".join(figures())
    return code


def modules_digest(*modules: str) -> str:
    """The digest of ``modules`` and every noisynn module they import, followed transitively."""
    return _digest({m: _module_dump(m) for m in sorted(_closure(set(modules)))})


def _digest(code: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name, dump in sorted(code.items()):
        h.update(name.encode() + b"\0" + dump.encode() + b"\0")
    return h.hexdigest()[:16]


@lru_cache(maxsize=None)
def figure_digest(figure: str) -> str:
    return _digest(figure_code(figure))


@lru_cache(maxsize=None)
def summary_digest() -> str:
    return _digest(summary_code())


def all_digests() -> dict[str, str]:
    out = {step: step_digest(step) for step in STEPS}
    out |= {f"figure:{name}": figure_digest(name) for name in figures()}
    out["summary"] = summary_digest()
    return dict(sorted(out.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m noisynn.pipeline.codedigest", description="digest of each step's code")
    parser.add_argument("--out", type=Path, help="write the digests as JSON here (default: print them)")
    args = parser.parse_args(argv)
    text = json.dumps(all_digests(), indent=1, sort_keys=True) + "\n"
    if args.out:
        from noisynn.io.atomic import atomic_write_text

        if not args.out.is_file() or args.out.read_text() != text:  # unchanged code, untouched file
            atomic_write_text(args.out, text)
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
