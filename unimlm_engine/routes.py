"""The route registry: one frozen `RouteSpec` per super-link route (DESIGN.md section 7).

A route is a routing token the LLM emits (`[DET]` ...). After it the engine feeds the K learned
query rows of the route's query table (`emb_embeddings_<table>`); their final-norm hidden states
are the route's payload, and the decoder named by the spec turns the payloads of a request into a
result. Everything route-specific in the package derives from this registry: the tokenizers'
special tokens, the model's query tables, the engine's query markers, the decoder dispatch, the
result JSON and the CLI's `--route` names. Adding a route = one `register_route(RouteSpec(...))`
plus one `TaskDecoder` class (model/decoders/base.py) registered under the spec's `decoder` name.

The built-in routes are the official VisionLLM v2 ones (../shared/OFFICIAL_MODEL.md): DET, GRD and
SEG share the Grounding-DINO decoder (`gdino`) and the `det` table (K = num_embs); POSE uses UniPose
(`unipose`, `pose` table) and also needs the request's DET/GRD groups as object classes; GEN and EDIT
use the Stable Diffusion / InstructPix2Pix decoders (`sd`, `ip2p`) and tables of K = num_embs_gen.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping, Optional

# Result kinds: which TaskResult fields a route fills (README "Task results").
RESULT_KINDS = ("detection", "segmentation", "pose", "image")
# SuperLinkConfig fields a route's K can come from.
QUERY_COUNT_FIELDS = ("num_embs", "num_embs_gen")
PLACEHOLDER_TOKENS = ("<image>", "<im_patch>", "<region>")
# The query tokens of the official vocabulary: [EMB], [EMB2] ... [EMB8]. In a prompt, the K query
# positions after a routing token are written as [EMB] [EMB2] ... [EMBK] (consecutive ids) for the
# det/pose tables and as K x [EMB] for the gen/edit tables (the official datasets' format).
QUERY_TOKENS = ("[EMB]",) + tuple(f"[EMB{i}]" for i in range(2, 9))


class RouteError(ValueError):
    """An unknown route name, or a spec that conflicts with the registry."""


@dataclass(frozen=True, slots=True)
class RouteSpec:
    """token: the routing token, also the route's name ("[DET]").
    table: query table name; the model parameter is `emb_embeddings_<table>.weight` [K, hidden].
    num_queries: the SuperLinkConfig field giving K ("num_embs" | "num_embs_gen"); routes sharing a
        table must agree on it.
    decoder: name of the TaskDecoder that serves the route (= its checkpoint prefix, "gdino").
    needs_image: the decoder needs the request's input image.
    requires: the decoder also needs at least one group of one of these routes in the same request;
        those groups are passed to it as `context` (POSE: the DET/GRD object classes).
    result: the result kind (RESULT_KINDS).
    options: fixed decoder options for this route (SEG: {"with_masks": True}).
    repeat_query_token: the prompt writes the K query positions as K x [EMB] instead of [EMB]..[EMBK].
    """

    token: str
    table: str
    num_queries: str
    decoder: str
    needs_image: bool = True
    requires: tuple[str, ...] = ()
    result: str = "detection"
    options: Mapping[str, Any] = field(default_factory=dict)
    repeat_query_token: bool = False

    def __post_init__(self) -> None:
        if not (self.token.startswith("[") and self.token.endswith("]") and len(self.token) > 2):
            raise RouteError(f"RouteSpec: token must look like '[NAME]', got {self.token!r}")
        if not self.table.isidentifier():
            raise RouteError(f"RouteSpec {self.token}: table must be an identifier, got {self.table!r}")
        if self.num_queries not in QUERY_COUNT_FIELDS:
            raise RouteError(f"RouteSpec {self.token}: num_queries must be one of {QUERY_COUNT_FIELDS}")
        if self.result not in RESULT_KINDS:
            raise RouteError(f"RouteSpec {self.token}: result must be one of {RESULT_KINDS}, got {self.result!r}")
        object.__setattr__(self, "requires", tuple(self.requires))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def name(self) -> str:
        """The short name used on the CLI and in config keys: "[DET]" -> "det"."""
        return self.token[1:-1].lower()

    def num_queries_in(self, superlink_cfg) -> int:
        """K for this route under a SuperLinkConfig."""
        return int(getattr(superlink_cfg, self.num_queries))

    def prompt_query_tokens(self, k: int) -> Optional[tuple[str, ...]]:
        """How a prompt writes this route's K query positions after its token: [EMB] [EMB2] ... [EMBk],
        or k x [EMB] (repeat_query_token); None when the vocabulary has no spelling for K."""
        if self.repeat_query_token:
            return (QUERY_TOKENS[0],) * k
        return QUERY_TOKENS[:k] if k <= len(QUERY_TOKENS) else None


_lock = threading.Lock()
_ROUTES: dict[str, RouteSpec] = {}
_BUILTIN: tuple[str, ...] = ()


def register_route(spec: RouteSpec) -> RouteSpec:
    """Add a route. Its table must use the same K field as other routes on that table."""
    with _lock:
        if spec.token in _ROUTES:
            raise RouteError(f"route {spec.token} is already registered")
        if spec.name in {s.name for s in _ROUTES.values()}:
            raise RouteError(f"a route named {spec.name!r} is already registered")
        for other in _ROUTES.values():
            if other.table == spec.table and other.num_queries != spec.num_queries:
                raise RouteError(f"route {spec.token}: table {spec.table!r} has K from {other.num_queries} "
                                 f"(route {other.token}), not {spec.num_queries}")
        unknown = [r for r in spec.requires if r not in _ROUTES]
        if unknown:
            raise RouteError(f"route {spec.token} requires unknown routes {unknown}")
        _ROUTES[spec.token] = spec
    return spec


def unregister_route(token: str) -> None:
    """Remove a route added after the built-in ones (tests)."""
    with _lock:
        if token in _BUILTIN:
            raise RouteError(f"{token} is a built-in route")
        _ROUTES.pop(token, None)


def get_route(name: str) -> RouteSpec:
    """By token ("[DET]") or short name ("det", "DET"); RouteError names the known routes."""
    key = name.strip()
    if key in _ROUTES:
        return _ROUTES[key]
    short = key.strip("[]").lower()
    for spec in _ROUTES.values():
        if spec.name == short:
            return spec
    raise RouteError(f"unknown route {name!r}; routes: {', '.join(s.name.upper() for s in _ROUTES.values())}")


def all_routes() -> tuple[RouteSpec, ...]:
    """Every registered route, in registration order (the order task results are reported in)."""
    return tuple(_ROUTES.values())


def route_tokens() -> tuple[str, ...]:
    return tuple(_ROUTES)


def query_tables() -> dict[str, str]:
    """table name -> SuperLinkConfig field giving its K, in first-use order (the marker order)."""
    out: dict[str, str] = {}
    for spec in _ROUTES.values():
        out.setdefault(spec.table, spec.num_queries)
    return out


def special_tokens() -> tuple[str, ...]:
    """Every special token string the tokenizers map to one id, in id order for built-in vocabularies:
    placeholders, the built-in routing tokens, the query tokens, then routes registered later (appended,
    so adding a route never moves an existing id)."""
    extra = tuple(t for t in _ROUTES if t not in _BUILTIN)
    return PLACEHOLDER_TOKENS + _BUILTIN + QUERY_TOKENS + extra


def required_special_tokens() -> tuple[str, ...]:
    """Tokens a loaded tokenizer must have (the official vocabulary); later routes are optional."""
    return PLACEHOLDER_TOKENS + _BUILTIN + QUERY_TOKENS


def _builtin() -> None:
    global _BUILTIN
    det = dict(table="det", num_queries="num_embs", decoder="gdino")
    gen = dict(num_queries="num_embs_gen", result="image", repeat_query_token=True)
    for spec in (
        RouteSpec("[DET]", **det),
        RouteSpec("[GRD]", **det, options={"top_k": 1}),
        RouteSpec("[SEG]", **det, result="segmentation", options={"with_masks": True}),
        RouteSpec("[POSE]", table="pose", num_queries="num_embs", decoder="unipose", requires=("[DET]", "[GRD]"),
                  result="pose"),
        RouteSpec("[GEN]", table="gen", decoder="sd", needs_image=False, **gen),
        RouteSpec("[EDIT]", table="edit", decoder="ip2p", **gen),
    ):
        register_route(spec)
    _BUILTIN = tuple(_ROUTES)


_builtin()
