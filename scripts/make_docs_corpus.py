"""Build data/deltatune_docs.jsonl: a raw-text corpus of deltatune's own documentation.

One document per Python module of src/deltatune (its module docstring, then the docstring of every
class, function and documented config field, each under its qualified name) and one per section of
the Markdown files in docs/. Used by configs/pt-docs.yaml (continued pretraining; held-out
perplexity before/after). Deterministic: run it again to refresh the corpus after the code changes.

    python scripts/make_docs_corpus.py [--out data/deltatune_docs.jsonl]
"""

from __future__ import annotations

import argparse
import ast
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """`def name(a, b, *rest)`: argument names only (annotations and defaults are noise for a corpus)."""
    args = node.args
    names = [a.arg for a in [*args.posonlyargs, *args.args] if a.arg not in ("self", "cls")]
    names += [f"*{args.vararg.arg}"] if args.vararg else []
    names += [a.arg for a in args.kwonlyargs] + ([f"**{args.kwarg.arg}"] if args.kwarg else [])
    return f"def {node.name}({', '.join(names)})"


def _docstrings(body: list[ast.stmt], prefix: str) -> list[str]:
    """'name\\ndocstring' for every documented class, function and field in `body`, depth first."""
    out = []
    for i, node in enumerate(body):
        if isinstance(node, ast.ClassDef):
            doc = ast.get_docstring(node)
            bases = ", ".join(ast.unparse(b) for b in node.bases)
            out.append(f"class {prefix}{node.name}({bases})" + (f"\n{doc}" if doc else ""))
            out += _docstrings(node.body, f"{prefix}{node.name}.")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node):
            if not node.name.startswith("_") or node.name == "__init__":
                out.append(f"{prefix}{_signature(node)}\n{ast.get_docstring(node)}")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and i + 1 < len(body):
            following = body[i + 1]
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                default = f" = {ast.unparse(node.value)}" if node.value is not None else ""
                out.append(f"{prefix}{node.target.id}: {ast.unparse(node.annotation)}{default}\n{following.value.value.strip()}")
    return out


def module_documents(src: Path) -> list[dict[str, str]]:
    docs = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        name = ".".join(path.relative_to(src.parent).with_suffix("").parts).removesuffix(".__init__")
        parts = [ast.get_docstring(tree) or ""] + _docstrings(tree.body, "")
        text = "\n\n".join(p for p in parts if p.strip())
        if len(text) > 200:
            docs.append({"text": f"# {name}\n\n{text}", "source": str(path.relative_to(ROOT))})
    return docs


def markdown_documents(folder: Path) -> list[dict[str, str]]:
    docs = []
    for path in sorted(folder.glob("*.md")) if folder.is_dir() else []:
        for section in re.split(r"\n(?=## )", path.read_text(encoding="utf-8")):
            if len(section.strip()) > 200:
                docs.append({"text": section.strip(), "source": str(path.relative_to(ROOT))})
    return docs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "deltatune_docs.jsonl")
    args = parser.parse_args()
    docs = module_documents(ROOT / "src" / "deltatune") + markdown_documents(ROOT / "docs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    print(f"{args.out}: {len(docs)} documents, {sum(len(d['text']) for d in docs):,} characters")


if __name__ == "__main__":
    main()
