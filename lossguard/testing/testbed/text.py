"""Real text that every Python install ships: the standard library's source and the pydoc topics.

The testbed's base model is pretrained on it and its fine-tuning tasks are cut from it, so the
whole testbed is rebuilt offline from what ``python`` itself carries. A different Python version
ships different files: the committed base records the version it was made with.
"""

from __future__ import annotations

import hashlib
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
"""Test suites are left out (mostly generated fixtures), and so is everything installed later."""


@dataclass(frozen=True)
class Document:
    """One source file (``kind`` "code") or one pydoc topic (``kind`` "topic")."""

    name: str
    kind: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files outside test suites, sorted by relative path."""
    root = root or stdlib_dir()
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not SKIPPED_DIRS.intersection(rel.parts[:-1]):
            out.append(rel)
    return [root / rel for rel in sorted(out, key=lambda p: p.as_posix())]


def code_documents(root: Path | None = None) -> list[Document]:
    root = root or stdlib_dir()
    docs = []
    for path in stdlib_files(root):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(Document(path.relative_to(root).as_posix(), "code", text))
    return docs


def topic_documents() -> list[Document]:
    """The pydoc topics (``help("LOOPING")`` and friends): about 465k characters of English."""
    from pydoc_data.topics import topics

    return [Document(name, "topic", text) for name, text in sorted(topics.items()) if text.strip()]


def documents() -> list[Document]:
    return code_documents() + topic_documents()


def digest(docs: list[Document]) -> str:
    """A short fingerprint of the text, to tell whether a rebuild saw the same corpus."""
    h = hashlib.sha256()
    for d in docs:
        h.update(d.name.encode())
        h.update(b"\0")
        h.update(d.text.encode())
    return h.hexdigest()[:16]


def python_version() -> str:
    return ".".join(str(v) for v in sys.version_info[:3])
