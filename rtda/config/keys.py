"""Config keys as flat dotted names, and the role each key plays for a resume and for the result tables.

The roles are declared once, as field metadata on the schema (rtda.config.schema, ROLES); the key sets below are
derived from it, so a new key gets its role where it is declared and nowhere else.
"""
from __future__ import annotations

import dataclasses
import typing

from rtda.config.schema import ROLES, Config


def key_roles(cls: type = Config, prefix: str = "") -> dict[str, str]:
    """{dotted key: role} for every leaf key of the schema dataclass `cls`, in declaration order.

    A field without a role is "learning"; a section (a dataclass-typed field) has no role of its own, its keys do.
    """
    hints = typing.get_type_hints(cls)
    roles = {}
    for f in dataclasses.fields(cls):
        role = f.metadata.get("role", "learning")
        if role not in ROLES:
            raise ValueError(f"`{prefix}{f.name}` has the role {role!r}; roles are {', '.join(ROLES)}")
        if dataclasses.is_dataclass(hints[f.name]):
            if "role" in f.metadata:
                raise ValueError(f"`{prefix}{f.name}` is a section: give its keys a role, not the section")
            roles.update(key_roles(hints[f.name], f"{prefix}{f.name}."))
        else:
            roles[f"{prefix}{f.name}"] = role
    return roles


KEY_ROLES = key_roles()


def keys_with(*roles: str) -> tuple[str, ...]:
    """The dotted keys whose role is one of `roles`, in schema order."""
    return tuple(key for key, role in KEY_ROLES.items() if role in roles)


# Keys a resume may change freely; the others must match the run's config unless `--apply-changes` is given.
RESUME_FREE_KEYS = keys_with("free", "machine")
# Keys that do not split the result tables: runs differing only in these are one row.
NOT_RESULT_KEYS = keys_with("free", "seed")
# Keys that decide which tensors a checkpoint holds: no resume can change them.
STRUCTURE_KEYS = keys_with("structure")


def flatten(d: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 0.1}} -> {"train.lr": 0.1}"""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def learning_differences(old: dict, new: dict) -> dict[str, tuple]:
    """{dotted key: (old, new)} for the keys, other than RESUME_FREE_KEYS, whose values differ."""
    a, b = flatten(old), flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if k not in RESUME_FREE_KEYS and a.get(k) != b.get(k)}
