"""highdicom's table of module attributes, held compactly.

highdicom reads ``_standard/module_attribute_map.json`` (22.6 MB: every attribute of
every module of the standard, ~100,000 entries) into one dict and one list per entry
the first time a constructor copies the patient and study modules of a source image.
In Python objects that is 65-107 MB of the node's memory, held for the life of the
process, in the node and again in each build process (``[worker] build_processes``),
while the node's peak under the 16 x 50 load of ``bench/reliability.py`` sits at its
600 MB bar.

:func:`install` replaces highdicom's loader with one that reads the same file into
slotted entries with interned strings and shared path tuples: the same content
(``tests/test_dicom_out.py`` compares every entry), read the way highdicom reads an
entry (``item['keyword']``, ``item['type']``, ``item['path']``), in ~7 MB.  The file is
decoded entry by entry (a JSON object hook), so the full dict is never built.  Nothing
else of highdicom changes.  It is installed when :mod:`dicom_out` is imported, before
any builder runs.
"""

from __future__ import annotations

import functools
import json
import pkgutil
import sys
from typing import Any

_ENTRY_KEYS = frozenset({"keyword", "type", "path"})


class ModuleAttribute:
    """One entry of a module: an attribute's keyword, its type (1, 1C, 2, 2C, 3) and the
    keywords of the sequences it is nested in, indexable by those names like the dict
    highdicom's JSON gives."""

    __slots__ = ("keyword", "type", "path")

    def __init__(self, keyword: str, type_: str, path: tuple[str, ...]) -> None:
        self.keyword = keyword
        self.type = type_
        self.path = path

    def __getitem__(self, key: str) -> Any:
        if key not in _ENTRY_KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in _ENTRY_KEYS

    def __repr__(self) -> str:
        return f"ModuleAttribute({self.keyword!r}, {self.type!r}, {self.path!r})"


def read_module_attribute_map() -> dict[str, tuple[ModuleAttribute, ...]]:
    """highdicom's ``module_attribute_map.json``, module name -> its entries, compact."""
    data = pkgutil.get_data("highdicom", "_standard/module_attribute_map.json")
    if data is None:
        raise FileNotFoundError("highdicom's module attribute map is missing")
    paths: dict[tuple[str, ...], tuple[str, ...]] = {}

    def entry(obj: dict[str, Any]) -> Any:
        if obj.keys() != _ENTRY_KEYS:
            return obj
        path = tuple(sys.intern(p) for p in obj["path"])
        return ModuleAttribute(sys.intern(obj["keyword"]), sys.intern(obj["type"]),
                               paths.setdefault(path, path))

    table = json.loads(data.decode("utf-8"), object_hook=entry)
    return {name: tuple(entries) for name, entries in table.items()}


@functools.lru_cache(1)
def get_module_attribute_map() -> dict[str, tuple[ModuleAttribute, ...]]:
    """What highdicom's ``get_module_attribute_map`` returns, compact (read once)."""
    return read_module_attribute_map()


def install() -> None:
    """Make highdicom use :func:`get_module_attribute_map` (its module of standard
    tables and the two modules that imported the loader by name)."""
    import highdicom._standard_utils as standard_utils
    import highdicom.base
    import highdicom.image

    original = standard_utils.get_module_attribute_map
    if original is get_module_attribute_map:
        return
    for module in (standard_utils, highdicom.base, highdicom.image):
        module.get_module_attribute_map = get_module_attribute_map  # type: ignore[attr-defined]
    cache_clear = getattr(original, "cache_clear", None)
    if cache_clear is not None:  # a table highdicom read already is let go
        cache_clear()
