"""Forcing routes: the routing tokens a demo or benchmark request starts with, so a model with random
weights (which never chooses a route by itself) still runs every decoder. Used by `unimlm generate
--route` and the serve-bench workloads; derived from the route registry and the model's decoders."""
from __future__ import annotations

from typing import Callable, Optional, Sequence

from ..routes import RouteError, RouteSpec, get_route


def parse_routes(spec: Optional[str]) -> list[RouteSpec]:
    """"DET,SEG,pose" -> RouteSpecs; RouteError (a ValueError) names the known routes."""
    if not spec:
        return []
    return [get_route(r) for r in spec.split(",") if r.strip()]


def forced_route_tokens(model, routes: Sequence[RouteSpec], groups: Optional[Callable[[RouteSpec], int]] = None
                        ) -> tuple[int, ...]:
    """Token ids forcing `routes` in order. Each route gets the number of groups its decoder requires
    (POSE: one per keypoint), else groups(route) (default 1); a route with `requires` is preceded by one
    group of its first required route unless one was forced already. ValueError when the model cannot
    serve a route (no routing token in its vocabulary, or no decoder)."""
    out: list[str] = []
    for spec in routes:
        if spec.requires and not any(r in out for r in spec.requires):
            out.append(spec.requires[0])
        out += [spec.token] * _count(model, spec, groups)
    missing = sorted({t for t in out if t not in model.special_ids})
    if missing:
        raise ValueError(f"this model's vocabulary has no routing token {', '.join(missing)}")
    return tuple(model.special_ids[t] for t in out)


def _count(model, spec: RouteSpec, groups: Optional[Callable[[RouteSpec], int]]) -> int:
    decoders = model.decoders
    if decoders is None or spec.token not in {s.token for s in decoders.available_routes()}:
        raise ValueError(f"this model has no decoder for {spec.token}")
    return decoders.decoder_for(spec).num_groups(spec) or (groups(spec) if groups else 1)


def span_text(spec) -> str:
    """A sample answer for a span route (routes.SpanRouteSpec): its task span, then one box when the route
    needs boxes, e.g. "<IMGSEG>the cat</IMGSEG><BOX>the cat:[0.1, 0.2, 0.6, 0.9]</BOX>"."""
    from ..routes import GROUNDING_TASK

    box = "<BOX>the cat:[0.1, 0.2, 0.6, 0.9]</BOX>" if spec.boxes == "required" else ""
    return box if spec.task == GROUNDING_TASK else f"<{spec.task}>the cat</{spec.task}>{box}"


__all__ = ["RouteError", "parse_routes", "forced_route_tokens", "span_text"]
