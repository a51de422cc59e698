"""The route registries: one frozen `RouteSpec` per super-link route (DESIGN.md section 7) and, at the
end of this file, one `SpanRouteSpec` per span route (the second link kind, UnifiedMLLM).

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
# The official added tokens around them (constant.py DEFAULT_TOKENS, added in this order after the
# 32,000 Llama-2 tokens): [PAD]=32000, the placeholders 32001..32003, the start/end markers 32004..32011,
# the routing tokens [DET]=32012 .. [EDIT]=32017, the query tokens [EMB]=32018 .. [EMB8]=32025.
PAD_TOKEN = "[PAD]"
MARKUP_TOKENS = ("<img>", "</img>", "<reg>", "</reg>", "<det>", "</det>", "<grd>", "</grd>")
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
_SPAN_ROUTES: dict[str, "SpanRouteSpec"] = {}  # the span registry (below); names are shared with _ROUTES


def register_route(spec: RouteSpec) -> RouteSpec:
    """Add a route. Its table must use the same K field as other routes on that table."""
    with _lock:
        if spec.token in _ROUTES:
            raise RouteError(f"route {spec.token} is already registered")
        if spec.name in {s.name for s in _ROUTES.values()} or spec.name in _SPAN_ROUTES:
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
    the official added tokens ([PAD], placeholders, start/end markers, the built-in routing tokens, the
    query tokens: 26 ids from 32000 in the official vocabulary), then routes registered later (appended,
    so adding a route never moves an existing id)."""
    extra = tuple(t for t in _ROUTES if t not in _BUILTIN)
    return required_special_tokens() + extra


def required_special_tokens() -> tuple[str, ...]:
    """The official added tokens, in the official order; a loaded tokenizer must have them all."""
    return (PAD_TOKEN,) + PLACEHOLDER_TOKENS + MARKUP_TOKENS + _BUILTIN + QUERY_TOKENS


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


# ---- span routes: the second link kind (UnifiedMLLM) -----------------------------------------------------
# The LLM writes a task span `<TASK>argument</TASK>`, optionally followed by grounding spans
# `<BOX>label:[x1, y1, x2, y2]</BOX>` (coordinates normalised to [0, 1]); the task token and whether boxes
# follow pick a SpanRouteSpec, whose decoder (a TaskDecoder, like a super-link route's) gets the argument
# text, the boxes and the request's image. Span tokens are special tokens that stay in the text.
GROUNDING_TASK = "BOX"
BOX_MODES = ("none", "required")


@dataclass(frozen=True, slots=True)
class SpanRouteSpec:
    """name: the route's name ("imgseg"), also its key on the CLI, in decoder_options and in results.
    task: the task tag ("IMGSEG": tokens <IMGSEG> and </IMGSEG>); GROUNDING_TASK for boxes on their own.
    boxes: "none" (no <BOX> follows the span) or "required" (one or more <BOX> follow it); a task has at
        most one route per mode.
    decoder: the TaskDecoder serving it; needs_image: it needs the request's input image;
    result: the result kind (RESULT_KINDS); options: fixed decoder options of the route.
    """

    name: str
    task: str
    boxes: str
    decoder: str
    needs_image: bool = False
    result: str = "image"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise RouteError(f"SpanRouteSpec: name must be a lower-case identifier, got {self.name!r}")
        if not (self.task.isidentifier() and self.task.isupper()):
            raise RouteError(f"SpanRouteSpec {self.name}: task must be an upper-case tag name, got {self.task!r}")
        if self.boxes not in BOX_MODES:
            raise RouteError(f"SpanRouteSpec {self.name}: boxes must be one of {BOX_MODES}, got {self.boxes!r}")
        if self.result not in RESULT_KINDS:
            raise RouteError(f"SpanRouteSpec {self.name}: result must be one of {RESULT_KINDS}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def token(self) -> str:
        """The opening task token ("<IMGSEG>"); several routes may share it (results name a route by name)."""
        return f"<{self.task}>"


_SPAN_BUILTIN: tuple[str, ...] = ()


def register_span_route(spec: SpanRouteSpec) -> SpanRouteSpec:
    with _lock:
        if spec.name in _SPAN_ROUTES or spec.name in {s.name for s in _ROUTES.values()}:
            raise RouteError(f"a route named {spec.name!r} is already registered")
        if any(s.task == spec.task and s.boxes == spec.boxes for s in _SPAN_ROUTES.values()):
            raise RouteError(f"span route {spec.name}: <{spec.task}> already has a route with boxes={spec.boxes!r}")
        _SPAN_ROUTES[spec.name] = spec
    return spec


def unregister_span_route(name: str) -> None:
    """Remove a span route added after the built-in ones (tests)."""
    with _lock:
        if name in _SPAN_BUILTIN:
            raise RouteError(f"{name} is a built-in span route")
        _SPAN_ROUTES.pop(name, None)


def all_span_routes() -> tuple[SpanRouteSpec, ...]:
    return tuple(_SPAN_ROUTES.values())


def get_span_route(name: str) -> SpanRouteSpec:
    key = name.strip().lower()
    if key in _SPAN_ROUTES:
        return _SPAN_ROUTES[key]
    raise RouteError(f"unknown span route {name!r}; span routes: {', '.join(_SPAN_ROUTES)}")


def span_route_for(task: str, num_boxes: int) -> Optional[SpanRouteSpec]:
    """The route of a task span followed by `num_boxes` grounding spans, None when there is none."""
    mode = "required" if num_boxes else "none"
    return next((s for s in _SPAN_ROUTES.values() if s.task == task and s.boxes == mode), None)


def span_tasks() -> tuple[str, ...]:
    """Task tag names in registration order, the grounding tag included."""
    return tuple(dict.fromkeys(s.task for s in _SPAN_ROUTES.values())) + (
        (GROUNDING_TASK,) if GROUNDING_TASK not in {s.task for s in _SPAN_ROUTES.values()} else ())


def span_tokens() -> tuple[str, ...]:
    """The span vocabulary: <TASK> and </TASK> of every task tag (grounding <BOX> </BOX> included). A
    tokenizer of a model that serves span routes has each as one special token kept in the text."""
    return tuple(t for task in span_tasks() for t in (f"<{task}>", f"</{task}>"))


def find_route(name: str):
    """A span route by name ("imgseg": what its TaskResults carry as `route`), else a super-link route by
    token or name ("[DET]", "det"); RouteError otherwise."""
    key = name.strip()
    if key.lower() in _SPAN_ROUTES:
        return _SPAN_ROUTES[key.lower()]
    return get_route(key)


def _span_builtin() -> None:
    global _SPAN_BUILTIN
    for spec in (
        SpanRouteSpec("imggen", "IMGGEN", "none", decoder="sd_text"),
        SpanRouteSpec("imgedit", "IMGEDIT", "none", decoder="ip2p_text", needs_image=True),
        SpanRouteSpec("imgedit_box", "IMGEDIT", "required", decoder="gligen_inpaint", needs_image=True),
        SpanRouteSpec("layoutgen", "LAYOUTGEN", "required", decoder="gligen"),
        SpanRouteSpec("imgseg", "IMGSEG", "required", decoder="sam", needs_image=True, result="segmentation"),
        SpanRouteSpec("box", GROUNDING_TASK, "required", decoder="boxes", needs_image=True, result="detection"),
    ):
        register_span_route(spec)
    _SPAN_BUILTIN = tuple(_SPAN_ROUTES)


_span_builtin()
