"""An embedded default corpus: the docstrings and comments of Python's standard library.

Every machine with Python has this text, so ``gptkern prepare`` works without a download. The
``.py`` files under ``sysconfig.get_paths()["stdlib"]`` are read in sorted order and parsed with
``ast`` / ``tokenize`` (nothing is imported or executed); test packages and installed
third-party packages are skipped. The result is the same on every run of one Python version
(about 3.7 MB of text on CPython 3.11).
"""
from __future__ import annotations

import ast
import functools
import io
import os
import sysconfig
import tokenize
import warnings
from typing import Iterator, Optional

# Folders never entered: third-party packages, tests (their files are fixtures, not prose).
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


def stdlib_files(root: Optional[str] = None) -> list[str]:
    """The standard library's ``.py`` files under ``root``, as sorted POSIX paths relative to it."""
    root = root or sysconfig.get_paths()["stdlib"]
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS)
        rel = os.path.relpath(folder, root)
        for name in files:
            if name.endswith(".py"):
                found.append(name if rel == "." else f"{rel}/{name}".replace(os.sep, "/"))
    return sorted(found)


def _docstrings(tree: ast.AST) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                yield node.body[0].lineno, doc.strip()


def _comment_blocks(source: bytes) -> Iterator[tuple[int, str]]:
    """Runs of comments on consecutive lines, each as one paragraph (``#`` and banners removed)."""
    block: list[str] = []
    start = last = -1
    for tok in tokenize.tokenize(io.BytesIO(source).readline):
        if tok.type != tokenize.COMMENT or tok.start[0] == 1 and tok.string.startswith("#!"):
            continue
        text = tok.string.lstrip("#").strip()
        if not any(c.isalnum() for c in text):
            continue
        line = tok.start[0]
        if block and line != last + 1:
            yield start, "\n".join(block)
            block = []
        if not block:
            start = line
        block.append(text)
        last = line
    if block:
        yield start, "\n".join(block)


def module_text(source: bytes) -> str:
    """A module's docstrings and comment blocks in source order, separated by blank lines."""
    with warnings.catch_warnings():  # invalid escapes in old sources: not our concern here
        warnings.simplefilter("ignore")
        tree = ast.parse(source)
    parts = sorted([*_docstrings(tree), *_comment_blocks(source)], key=lambda p: p[0])
    return "\n\n".join(text for _, text in parts)


@functools.lru_cache(maxsize=4)
def _documents(root: str, max_chars: Optional[int]) -> tuple[str, ...]:
    docs, total = [], 0
    for rel in stdlib_files(root):
        try:
            with open(os.path.join(root, rel), "rb") as f:
                text = module_text(f.read())
        except (OSError, SyntaxError, ValueError, tokenize.TokenError):
            continue  # unreadable or not parseable by this Python: skipped, deterministically
        if not text:
            continue
        name = rel[:-3].replace("/", ".").removesuffix(".__init__")
        doc = f"Module {name}\n\n{text}\n"
        if max_chars is not None and total + len(doc) >= max_chars:
            docs.append(doc[: max_chars - total])
            break
        docs.append(doc)
        total += len(doc)
    return tuple(d for d in docs if d)


def stdlib_corpus(max_chars: Optional[int] = None, root: Optional[str] = None) -> list[str]:
    """One document per standard-library module (``Module NAME`` then its docstrings and comments).

    ``max_chars`` caps the total length: modules are taken in sorted path order and the last one
    is cut so that the documents hold exactly ``max_chars`` characters (fewer if the library is
    smaller). ``root`` is the library folder (default: this Python's).
    """
    if max_chars is not None and max_chars < 1:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    return list(_documents(root or sysconfig.get_paths()["stdlib"], max_chars))


def corpus_description(max_chars: Optional[int] = None) -> str:
    import platform

    cap = "" if max_chars is None else f", first {max_chars} characters"
    return f"embedded corpus: docstrings and comments of the Python {platform.python_version()} standard library{cap}"
