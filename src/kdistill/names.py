"""The one way kdistill says that a name is unknown.

Every registry and every check of a user-given name (recipes, losses, models and their sizes and
options, data sets, shifts, tap module paths, config keys and literal values) builds its message
with :func:`unknown_name`, so all of them suggest the same way: up to three close names, or the
sorted valid names when none is close. This module sits at the bottom of the package and imports
nothing from kdistill.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

#: How alike (difflib's ratio, 0-1) a valid name must be to be suggested.
CUTOFF = 0.5
#: At most this many names are suggested.
SUGGESTED = 3
#: At most this many valid names are listed when none is close (a model can have hundreds of
#: module paths).
LISTED = 20


def unknown_name(kind: str, name: str, known: Iterable[str]) -> str:
    """``unknown <kind> '<name>'`` followed by the closest valid names or, when none is
    close, the valid names in sorted order.

    Callers put their context in front (a config field path, the failing tap); ``kind`` may
    carry an owner (``"mlp size"``, ``"CNN module"``).

    Examples:
        >>> unknown_name("recipe", "hintn", ["ce", "hinton", "fitnets", "dkd"])
        "unknown recipe 'hintn'; did you mean 'hinton' or 'fitnets'?"
        >>> unknown_name("loss", "kdd", ["kd", "dkd", "kld", "cosine"])
        "unknown loss 'kdd'; did you mean 'kd', 'kld' or 'dkd'?"
        >>> unknown_name("mlp size", "huge", ["tiny", "small", "base"])
        "unknown mlp size 'huge'; valid names: base, small, tiny"
        >>> unknown_name("hf size", "tiny", [])
        "unknown hf size 'tiny'; valid names: none"
        >>> paths = [f"layer{i}" for i in range(24)]  # the first 20 in sorted order are listed
        >>> unknown_name("module", "head", paths).endswith("layer4, layer5 and 4 more")
        True
    """
    known = sorted(set(known))
    close = difflib.get_close_matches(name, known, n=SUGGESTED, cutoff=CUTOFF)
    if close:
        quoted = [repr(c) for c in close]
        hint = "did you mean " + _either(quoted) + "?"
    else:
        shown = ", ".join(known[:LISTED]) or "none"
        more = len(known) - LISTED
        hint = "valid names: " + shown + (f" and {more} more" if more > 0 else "")
    return f"unknown {kind} {name!r}; {hint}"


def _either(items: list[str]) -> str:
    """``a``, ``a or b``, ``a, b or c``."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]
