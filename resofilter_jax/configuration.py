"""Run configs: loading a config file with dotted overrides, and one vocabulary for every
command, checked once when a config is loaded.

Names that were renamed are refused with a message that names the new field, both on the
command line (``--config.limit=64``, before ml_collections rejects the unknown key with a
bare KeyError) and in a config object built by user code. Dtype fields take the canonical
names only (``float32``, ``bfloat16``, ``float16``), so an alias such as ``bf16`` fails at
load with a clear message instead of late inside one method.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections

# old dotted field -> new dotted field
RENAMED = {
    "limit": "data.limit",
    "chunk": "ce_chunk",
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_FIELDS = ("model.dtype", "model.param_dtype", "export.dtype")
_ALIASES = {"fp32": "float32", "f32": "float32", "bf16": "bfloat16", "fp16": "float16"}


class ConfigError(ValueError):
    """A config field that does not exist any more, or a value out of the vocabulary."""


def _renamed_message(old: str) -> str:
    new = RENAMED[old]
    return f"config field {old!r} was renamed to {new!r}: use --config.{new}=... instead"


def _lookup(config: Any, dotted: str) -> tuple[bool, Any]:
    node = config
    for part in dotted.split("."):
        if not hasattr(node, "keys") or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_dtype(name: Any, field: str = "dtype") -> str:
    """``name`` if it is a canonical dtype name; else a :class:`ConfigError` naming them."""
    if name in DTYPE_NAMES:
        return name
    hint = f" (did you mean {_ALIASES[name]!r}?)" if name in _ALIASES else ""
    raise ConfigError(f"{field} must be one of {DTYPE_NAMES}, got {name!r}{hint}")


def check_config(config: Any) -> Any:
    """Refuses renamed fields and non-canonical dtype names; returns ``config``."""
    for old in RENAMED:
        if _lookup(config, old)[0]:
            raise ConfigError(_renamed_message(old))
    for field in DTYPE_FIELDS:
        present, value = _lookup(config, field)
        if present and value not in ("", None):
            check_dtype(value, field)
    return config


_FLAG = re.compile(r"^--config\.([A-Za-z0-9_.]+)(=.*)?$")


def check_argv(argv: Sequence[str]) -> None:
    """Refuses ``--config.<old>`` overrides with the new name (call before flag parsing)."""
    for arg in argv:
        m = _FLAG.match(arg)
        if m and m.group(1) in RENAMED:
            raise SystemExit(f"error: {_renamed_message(m.group(1))}")


def _cast(value: Any, old: Any) -> Any:
    """A command-line string cast to the type of the field it replaces."""
    if not isinstance(value, str) or old is None or isinstance(old, str):
        return value
    if isinstance(old, bool):
        if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
            raise ConfigError(f"expected a boolean, got {value!r}")
        return value.lower() in ("1", "true", "yes")
    if isinstance(old, int | float):
        return type(old)(value)
    return value


def load_config(
    path: str | Path, overrides: Mapping[str, Any] | None = None
) -> ml_collections.ConfigDict:
    """``get_config()`` of a config file, with dotted overrides (``{"data.limit": 64}``).

    String values are cast to the type of the field they replace (as on the command line);
    the result is checked with :func:`check_config`.
    """
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"resofilter_config_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot load config file {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    overrides = dict(overrides or {})
    for key in overrides:
        if key in RENAMED:
            raise ConfigError(_renamed_message(key))
    flat = {k: _cast(v, _lookup(config, k)[1]) for k, v in overrides.items()}
    config.update_from_flattened_dict(flat)
    return check_config(config)


def host_settings(config: Any) -> dict[str, Any]:
    """The ``host`` section with its defaults (a config without one gets them all):
    ``workers`` resolved to a thread count, ``prefetch`` shards, ``encoded_cache_dir``."""
    from resofilter_jax.data.host_tokenize import host_workers

    host = config.get("host") or {}
    return {
        "workers": host_workers(int(host.get("workers", 0))),
        "prefetch": int(host.get("prefetch", 1)),
        "encoded_cache_dir": str(host.get("encoded_cache_dir", "")),
    }
