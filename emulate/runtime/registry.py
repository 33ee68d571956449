"""Registries of oracles and executors by name: built-ins and users' entries are equals.

    emulate.register_oracle("counting", CountingOracle)     # then oracle="counting", --oracle counting
    emulate.register_executor("reverse", ReverseExecutor)   # then executor="reverse", --executor reverse

An entry is a factory: a class or a function that takes keyword options and returns the oracle or
executor description (contract.AttentionOracle, contract.Executor). A built-in entry may be the
string "module:attribute", resolved on first use, so that naming the Ray executor imports neither
Ray nor the cluster package until it is chosen. The CLI's --oracle and --executor choices are these
names, and a run names an entry by string or passes an object: `resolve` is the one way from either
to a description.

Options go to the factory by keyword (None meaning "not given"); one that the factory does not take
is refused with a line that names the entries that do take it.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from emulate.errors import EmulateError


class Registry:
    """Named factories of one kind of part ("oracle" or "executor")."""

    def __init__(self, kind: str, flag: str, required: tuple[str, ...], group: str):
        self.kind, self.flag, self.required, self.group = kind, flag, required, group
        self._entries: dict[str, Callable[..., Any] | str] = {}
        self._plugins_read = False

    def _read_plugins(self) -> None:
        """Entries other packages declare under the entry-point group (e.g. `emulate.oracles`), read once,
        each a lazy "module:attribute": an installed plugin is a name on the command line too."""
        if self._plugins_read:
            return
        self._plugins_read = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self.group):
            self._entries.setdefault(ep.name, ep.value)

    def register(self, name: str, factory: Callable[..., Any] | str, *, replace: bool = False) -> None:
        """Add `factory` under `name`; a name already taken is refused unless `replace`."""
        if not isinstance(name, str) or not name or name != name.strip() or name.startswith("-"):
            raise EmulateError(f"{self.kind} name must be a non-empty string without surrounding spaces, got {name!r}")
        if not (callable(factory) or (isinstance(factory, str) and ":" in factory)):
            raise EmulateError(f"{self.kind} {name!r}: the factory must be callable (a class or a function), "
                               f"not {factory!r}")
        if name in self._entries and not replace:
            raise EmulateError(f"{self.kind} {name!r} is registered already (pass replace=True to replace it)")
        self._entries[name] = factory

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def names(self) -> list[str]:
        self._read_plugins()
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        self._read_plugins()
        return name in self._entries

    def factory(self, name: str) -> Callable[..., Any]:
        """The factory registered as `name` (imported on first use for a "module:attribute" entry)."""
        self._read_plugins()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EmulateError(f"unknown {self.kind} {name!r} (choose from {', '.join(self._entries)}){hint}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = getattr(importlib.import_module(module), attribute)
            self._entries[name] = entry
        return entry

    def make(self, name: str, options: dict[str, Any] | None = None) -> Any:
        """The description `name`'s factory makes from the options given (None values dropped)."""
        factory = self.factory(name)
        given = {k: v for k, v in (options or {}).items() if v is not None}
        refused = [k for k in given if not accepts(factory, k)]
        if refused:
            raise EmulateError(self._refusal(name, refused))
        return self.check(factory(**given))

    def check(self, part: Any) -> Any:
        """An object passed in place of a name: it must have what the protocol asks (never a class test)."""
        if isinstance(part, type):  # the class itself has the methods, unbound: it would fail deep inside
            raise EmulateError(f"{self.kind} {public_name(part)} is a class: pass an instance, {public_name(part)}()")
        missing = [m for m in self.required if not hasattr(part, m)]
        if missing:
            raise EmulateError(f"{self.kind} must be a registered name ({', '.join(self._entries)}) or an object with "
                               f"{' and '.join(self.required)} (emulate.{self.kind.title()} protocol); "
                               f"{part!r} has no {' or '.join(missing)}")
        return part

    def resolve(self, part: Any, options: dict[str, Any] | None = None) -> Any:
        """A name (made with the options) or an object (taken as it is; options must then be absent)."""
        if isinstance(part, str):
            return self.make(part, options)
        given = [k for k, v in (options or {}).items() if v is not None]
        if given:
            goes = f"{', '.join(given)} go{'es' if len(given) == 1 else ''} inside"
            if all(accepts(type(part), k) for k in given):
                raise EmulateError(f"{goes} {public_name(type(part))}(...) when an {self.kind} object is given")
            owners = self._owners(None, given)
            where = f"{public_name(self.factory(owners[0]))}(...)" if owners else f"an {self.kind} that takes it"
            raise EmulateError(f"{goes} {where}; the {self.kind} object given, {public_name(type(part))}(...), "
                               f"does not take {'it' if len(given) == 1 else 'them'}")
        return self.check(part)

    def _owners(self, name: str | None, keywords: list[str]) -> list[str]:
        """The registered entries other than `name` whose factories take every one of `keywords`."""
        owners = []
        for other in list(self._entries):
            if other != name:
                try:
                    if all(accepts(self.factory(other), k) for k in keywords):
                        owners.append(other)
                except Exception:  # noqa: BLE001 - an entry that cannot be imported here takes nothing
                    continue
        return owners

    def _refusal(self, name: str, refused: list[str]) -> str:
        flags = ", ".join(flag(k) for k in refused)
        owners = self._owners(name, refused)
        verb = "is not an option" if len(refused) == 1 else "are not options"
        where = f": add {self.flag} {owners[0]}, or drop it" if owners else ""
        return f"{flags} {verb} of the {name} {self.kind}{where}"


def accepts(factory: Callable[..., Any], keyword: str) -> bool:
    """Whether `factory` takes `keyword` (or any keyword)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
    return keyword in params or any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def public_name(obj) -> str:
    """How a user names a class or factory: emulate.Ray for the package's own, module.Name for others."""
    module = getattr(obj, "__module__", "") or ""
    home = "emulate" if module.split(".")[0] in ("emulate", "cluster") else module
    return f"{home}.{getattr(obj, '__qualname__', repr(obj))}"


def flag(keyword: str) -> str:
    """The CLI's spelling of a keyword option: pack_heads -> --pack-heads."""
    return "--" + keyword.replace("_", "-")


ORACLES = Registry("oracle", "--oracle", ("name", "bind"), "emulate.oracles")
EXECUTORS = Registry("executor", "--executor", ("name", "start"), "emulate.executors")

ORACLES.register("kernel", "emulate.runtime.oracles:KernelOracle")
ORACLES.register("paper", "emulate.runtime.oracles:paper")
ORACLES.register("paper-stable", "emulate.runtime.oracles:paper_stable")
EXECUTORS.register("local", "emulate.runtime.local:Local")
EXECUTORS.register("ray", "cluster.options:Ray")


def register_oracle(name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
    """Make `name` an oracle a run can name (oracle=name, --oracle name): factory(**options) gives
    an object with `name` and `bind(block_size, heads)` (emulate.AttentionOracle)."""
    ORACLES.register(name, factory, replace=replace)


def register_executor(name: str, factory: Callable[..., Any], *, replace: bool = False) -> None:
    """Make `name` an executor a run can name (executor=name, --executor name): factory(**options)
    gives an object with `name` and `start(job, progress)` (emulate.Executor)."""
    EXECUTORS.register(name, factory, replace=replace)
