"""A text corpus that every Python installation carries: the standard library's docstrings
and the ``pydoc_data`` help topics, as byte-level tokens (vocabulary 256).

Modules are read as source and parsed with ``ast``; nothing is imported, so no module's side
effects run. A module gives one document: its docstring, then the docstring of each class and
function in source order under a one-line header (``json.dumps(obj, *, skipkeys=False, ...)``).
Each ``pydoc_data`` topic is one document. Documents are sorted by name; a document belongs to
the validation split when the sha256 of its name falls below ``val_fraction`` (so the split is
stable when other documents come or go). The corpus depends on the Python version, so its
content hash (sha256 over names and texts) goes into every result that uses it.

Byte 0 never occurs in the text (it is removed) and is written before each document in the
token stream, as a beginning-of-document mark.
"""

from __future__ import annotations

import ast
import hashlib
import pkgutil
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

Split = Literal["train", "val"]
DOC_START = 0
"""Byte written before every document in the token stream (it never occurs in the text)."""
VOCAB_SIZE = 256

# Packages whose docstrings are tests, demos or an IDE rather than library documentation.
SKIP_TOP_LEVEL = frozenset(
    {"test", "idlelib", "turtledemo", "__phello__", "__hello__", "this", "antigravity"}
)
SKIP_PARTS = frozenset({"test", "tests", "_bundled", "site-packages", "dist-packages"})


@dataclass(frozen=True)
class Document:
    """One document: a module's docstrings or one help topic."""

    name: str
    text: str


@dataclass
class Corpus:
    """Documents sorted by name, a deterministic train/validation split, and a content hash."""

    documents: list[Document]
    val_fraction: float = 0.1
    python_version: str = field(default_factory=lambda: sys.version.split()[0])

    def __post_init__(self) -> None:
        self.documents = sorted(self.documents, key=lambda d: d.name)
        h = hashlib.sha256()
        for d in self.documents:
            h.update(d.name.encode() + b"\n" + d.text.encode("utf-8") + b"\x00")
        self.sha256 = h.hexdigest()

    def split(self, which: Split) -> list[Document]:
        """The documents of one split ("train" or "val")."""
        if which not in ("train", "val"):
            raise ValueError(f"split={which!r} is not known; choose 'train' or 'val'.")
        return [
            d for d in self.documents if in_val_split(d.name, self.val_fraction) == (which == "val")
        ]

    def tokens(self, which: Split) -> torch.Tensor:
        """The byte stream of one split, each document preceded by DOC_START: (n,) uint8."""
        data = b"".join(bytes([DOC_START]) + d.text.encode("utf-8") for d in self.split(which))
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()

    @property
    def n_bytes(self) -> int:
        """Size of the text in UTF-8 bytes (without the document marks)."""
        return sum(len(d.text.encode("utf-8")) for d in self.documents)

    def describe(self) -> dict:
        """Provenance: hash, size, document counts, split rule."""
        val = self.split("val")
        return {
            "name": "stdlib_docstrings+pydoc_topics",
            "sha256": self.sha256,
            "python_version": self.python_version,
            "n_documents": len(self.documents),
            "n_bytes": self.n_bytes,
            "n_val_documents": len(val),
            "n_val_bytes": sum(len(d.text.encode("utf-8")) for d in val),
            "val_fraction": self.val_fraction,
            "tokenizer": "utf-8 bytes, vocab 256, byte 0 marks a document start",
        }


def in_val_split(name: str, val_fraction: float) -> bool:
    """True when the document called `name` belongs to the validation split."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return h / 2**64 < val_fraction


def _clean(text: str) -> str:
    return text.replace("\x00", "").strip()


def _header(node: ast.AST, qualname: str) -> str:
    if isinstance(node, ast.ClassDef):
        return f"class {qualname}"
    assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    return f"{qualname}({ast.unparse(node.args)})"


def module_document(name: str, source: str) -> Document | None:
    """The docstrings of one module's source, or None if it has none (or does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    parts: list[str] = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(_clean(doc))

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}{node.name}"
                d = ast.get_docstring(node)
                if d:
                    parts.append(f"{_header(node, qualname)}\n{_clean(d)}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, qualname + ".")

    visit(tree.body, f"{name}.")
    if not parts:
        return None
    return Document(f"module:{name}", "\n\n".join(p for p in parts if p))


def _skip(name: str) -> bool:
    parts = name.split(".")
    return parts[0] in SKIP_TOP_LEVEL or any(p in SKIP_PARTS for p in parts)


def stdlib_module_files(stdlib: str | Path | None = None) -> list[tuple[str, Path]]:
    """(module name, source path) for every pure-Python stdlib module, without importing any."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    found: list[tuple[str, Path]] = []

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)], prefix):
            if _skip(info.name):
                continue
            leaf = info.name.rsplit(".", 1)[-1]
            if info.ispkg:
                init = path / leaf / "__init__.py"
                if init.is_file():
                    found.append((info.name, init))
                walk(path / leaf, info.name + ".")
            elif (path / f"{leaf}.py").is_file():
                found.append((info.name, path / f"{leaf}.py"))

    walk(root, "")
    return sorted(found)


def pydoc_topic_documents() -> list[Document]:
    """One document per ``pydoc_data.topics`` help topic (a data-only module)."""
    from pydoc_data.topics import topics

    return [Document(f"topic:{k}", _clean(v)) for k, v in sorted(topics.items()) if _clean(v)]


def build_corpus(
    *,
    modules: list[str] | None = None,
    include_topics: bool = True,
    val_fraction: float = 0.1,
    stdlib: str | Path | None = None,
) -> Corpus:
    """Build the corpus. `modules` restricts it to those stdlib modules (a slice for tests)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1).")
    docs: list[Document] = []
    for name, path in stdlib_module_files(stdlib):
        if modules is not None and name not in modules:
            continue
        doc = module_document(name, path.read_text(encoding="utf-8", errors="replace"))
        if doc is not None:
            docs.append(doc)
    if include_topics:
        docs.extend(pydoc_topic_documents())
    if not docs:
        raise ValueError(f"no documents found (modules={modules}); name existing stdlib modules.")
    return Corpus(docs, val_fraction=val_fraction)


__all__ = [
    "Corpus",
    "Document",
    "DOC_START",
    "VOCAB_SIZE",
    "build_corpus",
    "in_val_split",
    "module_document",
    "stdlib_module_files",
    "pydoc_topic_documents",
]
