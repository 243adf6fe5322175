"""Real text that ships with Python itself: no downloads, no new dependencies.

Two character-level language-modelling tasks share one vocabulary:

- **upstream** (pretraining): English prose, the Python documentation topics in
  :mod:`pydoc_data.topics` (about 465 kB on CPython 3.11). Topics are split by
  their sorted key: every 10th topic is held out for validation.
- **downstream** (fine-tuning, and the from-scratch runs): Python source code
  from a fixed list of standard-library modules, found with
  :func:`importlib.util.find_spec`. Training, validation and test use
  *different* modules, so both measure generalisation to unseen files.
  Hyperparameters (and early-stopping steps) are selected on validation; the
  reported figures are on test.

The upstream held-out topics are only ever used to *measure* retention (no
choice is made on them), so upstream needs no separate test split.

The downstream training set is deliberately small (about 140 kB) so that a
model can overfit it within a benchmark run: that is the regime where
regularisation towards the pretrained weights (L2-SP, rollback) or weight decay
can matter at all.

The texts depend on the Python version; :func:`describe` returns their sizes
and SHA-256 digests so that every results file records exactly what was used.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass

import numpy as np

__all__ = ["VOCAB", "VOCAB_SIZE", "OOV", "encode", "decode", "Corpus", "upstream", "downstream", "describe",
           "DOWNSTREAM_TRAIN_MODULES", "DOWNSTREAM_VAL_MODULES", "DOWNSTREAM_TEST_MODULES"]

#: Newline plus printable ASCII; everything else (tabs, non-ASCII) maps to OOV.
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
OOV = len(VOCAB)
VOCAB_SIZE = len(VOCAB) + 1
_LOOKUP = np.full(256, OOV, dtype=np.int64)
for _i, _ch in enumerate(VOCAB):
    _LOOKUP[ord(_ch)] = _i

DOWNSTREAM_TRAIN_MODULES = ("textwrap", "shlex", "heapq", "calendar", "queue", "glob", "copy", "csv",
                            "json.encoder")
DOWNSTREAM_VAL_MODULES = ("fractions", "gettext")
DOWNSTREAM_TEST_MODULES = ("pprint", "tokenize")


def encode(text: str) -> np.ndarray:
    """Token ids (int64) of ``text``; characters outside :data:`VOCAB` become :data:`OOV`.

    Examples
    --------
    >>> encode("a\\n\\t").tolist() == [VOCAB.index("a"), 0, OOV]
    True
    """
    raw = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
    ids = np.full(raw.shape, OOV, dtype=np.int64)
    ascii_mask = raw < 256
    ids[ascii_mask] = _LOOKUP[raw[ascii_mask]]
    return ids


def decode(ids: np.ndarray) -> str:
    """Inverse of :func:`encode` (OOV shows as ``"?"``)."""
    return "".join(VOCAB[i] if i < len(VOCAB) else "?" for i in np.asarray(ids).tolist())


@dataclass(frozen=True)
class Corpus:
    """Encoded training, validation and (downstream only) test streams of one task."""

    name: str
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray | None
    sources: tuple[str, ...]
    digest: str

    def info(self) -> dict:
        return {"name": self.name, "train_chars": int(self.train.size), "val_chars": int(self.val.size),
                "test_chars": None if self.test is None else int(self.test.size),
                "sources": list(self.sources), "sha256": self.digest}


def _digest(*texts: str) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def upstream() -> Corpus:
    """English prose: the Python documentation topics (``pydoc_data.topics``)."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    train = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 != 5)
    val = "\n\n".join(topics[k] for i, k in enumerate(keys) if i % 10 == 5)
    return Corpus("upstream:pydoc_data.topics", encode(train), encode(val), None, ("pydoc_data.topics",),
                  _digest(train, val))


def _module_source(name: str) -> str:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise FileNotFoundError(f"standard-library module {name!r} has no .py source on this Python")
    with open(spec.origin, encoding="utf-8") as f:
        return f.read()


def downstream() -> Corpus:
    """Python source code from fixed standard-library modules (train, val and test are different files)."""
    train, val, test = ("\n\n".join(_module_source(m) for m in mods) for mods in
                        (DOWNSTREAM_TRAIN_MODULES, DOWNSTREAM_VAL_MODULES, DOWNSTREAM_TEST_MODULES))
    return Corpus("downstream:stdlib-python-source", encode(train), encode(val), encode(test),
                  DOWNSTREAM_TRAIN_MODULES + DOWNSTREAM_VAL_MODULES + DOWNSTREAM_TEST_MODULES,
                  _digest(train, val, test))


def describe() -> dict:
    """Sizes and digests of both corpora (recorded in every results file)."""
    import sys

    return {"python": sys.version.split()[0], "upstream": upstream().info(), "downstream": downstream().info()}
