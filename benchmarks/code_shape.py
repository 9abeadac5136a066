"""The shape of edgetl's code: lines per module and the longest functions (an `ast` walk; no imports of edgetl).

    python benchmarks/code_shape.py [--top 15] [--json]

Quoted in the closing notes of refactors (issue #11) so that "before" and "after" are the same measurement.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "edgetl"


def measure(root: Path = ROOT) -> dict:
    modules, functions = [], []
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root.parent))
        text = path.read_text(encoding="utf-8")
        modules.append({"module": rel, "lines": len(text.splitlines())})
        for node in ast.walk(ast.parse(text, filename=rel)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                n_params = len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)
                functions.append(
                    {
                        "function": f"{rel}:{node.name}",
                        "line": node.lineno,
                        "lines": node.end_lineno - node.lineno + 1,
                        "params": n_params,
                    }
                )
    modules.sort(key=lambda m: -m["lines"])
    functions.sort(key=lambda f: -f["lines"])
    return {
        "modules": modules,
        "functions": functions,
        "total_lines": sum(m["lines"] for m in modules),
        "module_count": len(modules),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shape = measure()
    if args.json:
        print(json.dumps(shape, indent=2))
        return
    print(f"{shape['module_count']} modules, {shape['total_lines']} lines")
    print(f"\n{'module':<40} {'lines':>6}")
    for m in shape["modules"][: args.top]:
        print(f"{m['module']:<40} {m['lines']:>6}")
    print(f"\n{'function':<60} {'lines':>6} {'params':>6}")
    for f in shape["functions"][: args.top]:
        print(f"{f['function']:<60} {f['lines']:>6} {f['params']:>6}")
    wide = sorted(shape["functions"], key=lambda f: -f["params"])[:5]
    print("\nmost parameters: " + ", ".join(f"{f['function']} ({f['params']})" for f in wide))


if __name__ == "__main__":
    main()
