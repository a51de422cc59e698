"""Names of routed groups, read back from the generated text, for drawing results.

A routing token follows the name of its group in the official answers ("Yes, here are the results for red
circle[DET][EMB]..., blue square[DET]..." and the keypoint names before [POSE]). The name of a group is the
text between the previous routing token and this one, cut after its last ",", " for " or " of " (the official
templates' separators) and stripped. A heuristic for labels on pictures, not part of any result.
"""
from __future__ import annotations

import re
from typing import Sequence

_CUT = re.compile(r".*(?:,| for | of )")


def routed_group_names(token_ids: Sequence[int], tokenizer) -> dict[str, list[str]]:
    """-> {route token: [name of its 1st group, 2nd, ...]} over the generated ids."""
    routes = tokenizer.route_ids
    out: dict[str, list[str]] = {}
    run: list[int] = []
    for t in token_ids:
        t = int(t)
        if t in routes:
            text = _CUT.sub("", tokenizer.decode(run).strip().rstrip(",")).strip().rstrip(".").strip()
            out.setdefault(routes[t], []).append(text)
            run = []
        else:
            run.append(t)
    return out
