"""Write a JSONL corpus of the docstrings of Python's standard library (every machine has it).

One record per public module, class and function (and, with `--methods`, method) defined in a
stdlib module:
`{"id": "json.dumps", "title": "json.dumps", "kind": "function", "module": "json",
"text": "Serialize obj to a JSON formatted str. ..."}`. Embed title and text together
(`--text-field title --text-field text`) so that a query like "parse a csv file" can match on
names as well as prose; `make demo` does.

    python bench/demo_corpus.py -o demo/stdlib.jsonl [--max-chars 1000] [--limit N] [--methods]

Records are sorted by id, so the output is the same on every run of the same Python version.
Modules with import side effects (opening a browser, printing, GUI toolkits) are skipped.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import os
import sys
import warnings

# Modules never imported: side effects on import, GUI toolkits, test suites, tooling.
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "test", "ensurepip",
        "venv", "lib2to3", "pydoc_data", "__main__", "__phello__", "_pydev_bundle", "xxlimited",
        "xxlimited_35", "xxsubtype", "msvcrt", "winreg", "winsound", "_winapi", "nt"}


def stdlib_modules() -> list[str]:
    """Public top-level stdlib modules plus their public submodules (e.g. os.path, json.decoder).
    """
    import pkgutil

    names = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        names.append(name)
        module = _import(name)
        if module is not None and hasattr(module, "__path__"):
            for info in pkgutil.iter_modules(module.__path__, prefix=name + "."):
                leaf = info.name.rsplit(".", 1)[1]
                if not leaf.startswith("_") and leaf not in ("tests", "test", "__main__") \
                        and name != "encodings":  # ~100 near-identical codec tables
                    names.append(info.name)
    return names


def _import(name: str):
    """Import quietly; None when the module is missing here or fails to import."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            return importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - any failure just means "not on this machine"
            return None


def records(max_chars: int = 1000, methods: bool = False):
    """Docstring records of every public object defined in a stdlib module."""
    seen = set()
    for module_name in stdlib_modules():
        module = _import(module_name)
        if module is None:
            continue
        yield from _record(module_name, "module", module_name, module, max_chars, seen)
        for name, obj in _public_members(module):
            if getattr(obj, "__module__", None) != module_name:
                continue  # re-exported from elsewhere: described where it is defined
            qualified = f"{module_name}.{name}"
            kind = "class" if inspect.isclass(obj) else "function"
            yield from _record(qualified, kind, module_name, obj, max_chars, seen)
            if methods and inspect.isclass(obj):
                for method_name, method in _public_members(obj):
                    if inspect.isfunction(method) or inspect.ismethoddescriptor(method):
                        yield from _record(f"{qualified}.{method_name}", "method", module_name,
                                           method, max_chars, seen)


def _public_members(obj):
    try:
        members = vars(obj).items()
    except TypeError:
        return []
    return [(name, value) for name, value in sorted(members)
            if not name.startswith("_") and (inspect.isclass(value) or inspect.isroutine(value))]


def _record(qualified, kind, module_name, obj, max_chars, seen):
    doc = inspect.getdoc(obj) if not isinstance(obj, type(sys)) else obj.__doc__
    if not doc or not doc.strip() or qualified in seen:
        return
    if kind == "method" and doc == inspect.getdoc(object):
        return
    seen.add(qualified)
    text = " ".join(inspect.cleandoc(doc).split())
    if len(text.split()) < 5:  # "NotEq", "Delete(expr* targets)": names, not descriptions
        return
    if len(text) > max_chars:
        text = text[:max_chars].rsplit(" ", 1)[0] + " ..."
    yield {"id": qualified, "title": qualified, "kind": kind, "module": module_name.split(".")[0],
           "text": text}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", help="JSONL file to write (default: stdout)")
    parser.add_argument("--max-chars", type=int, default=1000, help="cut texts at this length")
    parser.add_argument("--limit", type=int, help="keep only the first N records (by id)")
    parser.add_argument("--methods", action="store_true", help="also methods of classes")
    args = parser.parse_args(argv)
    corpus = sorted(records(args.max_chars, args.methods), key=lambda r: r["id"])[:args.limit]
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in corpus)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        tmp = args.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(lines)
        os.replace(tmp, args.output)
        print(f"demo_corpus: {len(corpus):,} docstrings -> {args.output}", file=sys.stderr)
    else:
        sys.stdout.write(lines)


if __name__ == "__main__":
    main()
