"""Find the implementations to test: ``impl_core`` and one module per framework, each imported lazily.

A module that is missing, or whose framework is not installed, becomes an
:class:`Entry` with a ``skip`` reason: the suite shows it as skipped, never as
passed. A module that fails in any other way becomes an entry with an
``error``: the suite counts that as a failure.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .protocol import Implementation

__all__ = ["IMPL_MODULES", "Entry", "discover", "tokens", "select"]

#: module (in ``dualopt.conformance``) -> the framework it covers, for rows when it cannot be imported.
IMPL_MODULES: dict[str, str] = {
    "impl_core": "core",
    "impl_torch": "torch",
    "impl_optax": "optax",
    "impl_keras": "keras",
}


@dataclass
class Entry:
    """One implementation as the suite sees it (``impl`` is None when it could not be loaded)."""

    name: str
    framework: str
    module: str
    impl: Implementation | None = None
    skip: str | None = None
    error: str | None = None


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def _load(module: str, package: str) -> tuple[Any | None, str | None, str | None]:
    """(module object, skip reason, error) for ``package.module``."""
    full = f"{package}.{module}"
    try:
        return importlib.import_module(full), None, None
    except ModuleNotFoundError as exc:
        if exc.name in (full, f"{package}.{module}"):
            return None, f"{full} not found (no conformance/{module}.py)", None
        # The module exists but imports a framework at module level that is not installed.
        return None, f"{exc.name or exc} not installed", None
    except ImportError as exc:
        return None, f"import failed: {_describe(exc)}", None
    except Exception as exc:  # noqa: BLE001 - any other failure is reported as an error row
        return None, None, f"importing {full} raised {_describe(exc)}"


def discover(modules: Iterable[str] = IMPL_MODULES, *, package: str = "dualopt.conformance",
             extra: Sequence[Implementation] = ()) -> list[Entry]:
    """Import each module, call its ``implementations()``, and ask each implementation ``unavailable()``.

    Examples
    --------
    >>> [e.name for e in discover(["impl_core"])][:2]
    ['core[numpy]', 'core[array-api-strict]']
    >>> e = discover(["impl_nosuch"])[0]
    >>> e.skip
    'dualopt.conformance.impl_nosuch not found (no conformance/impl_nosuch.py)'
    """
    entries: list[Entry] = []
    for module in modules:
        fallback = IMPL_MODULES.get(module, module.removeprefix("impl_"))
        mod, skip, error = _load(module, package)
        if mod is None:
            entries.append(Entry(name=f"{fallback} (all)", framework=fallback, module=module, skip=skip, error=error))
            continue
        try:
            impls = list(mod.implementations())
        except Exception as exc:  # noqa: BLE001
            entries.append(Entry(name=f"{fallback} (all)", framework=fallback, module=module,
                                 error=f"{module}.implementations() raised {_describe(exc)}"))
            continue
        entries.extend(_entry(impl, module) for impl in impls)
    entries.extend(_entry(impl, "external") for impl in extra)
    return entries


def _entry(impl: Any, module: str) -> Entry:
    name = str(getattr(impl, "name", repr(impl)))
    framework = str(getattr(impl, "framework", "?"))
    if not isinstance(impl, Implementation):
        return Entry(name, framework, module, error=f"{name} does not satisfy the Implementation protocol")
    try:
        reason = impl.unavailable()
    except Exception as exc:  # noqa: BLE001
        return Entry(name, framework, module, error=f"unavailable() raised {_describe(exc)}")
    return Entry(name, framework, module, impl=None if reason else impl, skip=reason)


def tokens(framework: str, module: str = "") -> set[str]:
    """Names a ``--backends`` filter may use for an implementation.

    Examples
    --------
    >>> sorted(tokens("keras[torch]"))
    ['keras', 'keras[torch]', 'torch']
    >>> sorted(tokens("core[array-api-strict]", "impl_core"))
    ['array-api-strict', 'array_api_strict', 'core', 'core[array-api-strict]', 'core[array_api_strict]']
    """
    fw = framework.lower()
    out = {fw}
    m = re.fullmatch(r"([^\[]+)\[(.*)\]", fw)
    if m:
        out.add(m.group(1).strip())
        out.update(p.strip() for p in m.group(2).split(",") if p.strip())
    out.update({t.replace("-", "_") for t in out})
    if module.startswith("impl_"):
        out.add(module.removeprefix("impl_"))
    return out


def select(entries: Sequence[Entry], backends: Iterable[str] | None) -> list[Entry]:
    """Entries whose framework matches any of ``backends`` (all entries when ``backends`` is None).

    Examples
    --------
    >>> es = [Entry("a", "core[numpy]", "impl_core"), Entry("b", "keras[jax]", "impl_keras")]
    >>> [e.name for e in select(es, ["numpy"])], [e.name for e in select(es, ["jax"])]
    (['a'], ['b'])
    """
    if backends is None:
        return list(entries)
    wanted = {b.strip().lower() for b in backends if b.strip()}
    wanted |= {w.replace("-", "_") for w in wanted}
    return [e for e in entries if tokens(e.framework, e.module) & wanted or e.name.lower() in wanted]
