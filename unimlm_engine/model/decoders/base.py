"""The task-decoder interface and the decoder registry (name -> class).

A `TaskDecoder` serves the routes whose `RouteSpec.decoder` names it: one batched call takes, per
request, that route's payload groups, the request's image and (for routes with `requires`) the
groups of the required routes, plus options, and returns one result per request. Decoders register
under their official checkpoint prefix (`gdino`, `unipose`, `sd`, `ip2p`), so `DecoderSet`'s state
dict keys are the official ones.

A decoder may expose a tensor-level forward that an exported artifact can replace (ONNX Runtime,
AOTInductor, TensorRT: backends.py); `export_kind` names the export wrapper ("detector", the only one),
None when the decoder has no export path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Optional

import torch
from PIL import Image
from torch import nn

from ...routes import RouteSpec

_DECODERS: dict[str, type["TaskDecoder"]] = {}


@dataclass
class DecoderInput:
    """One request's share of a batched decoder call.

    payloads: this route's groups in emission order, each [K, llm_hidden] (group n = class / keypoint /
        image n of the request).
    image: the request's input image (RGB PIL) or None when the route needs none.
    context: the groups of the routes in `spec.requires`, in emission order (POSE: object classes).
    seed: the request's sampling seed (generation decoders derive one seed per group from it).
    text, boxes, phrases: a span route's call (routes.SpanRouteSpec): the task span's argument text, the
        grounding boxes that follow it ([x1, y1, x2, y2] normalised to [0, 1]) and their labels.
    """

    payloads: list[torch.Tensor]
    image: Optional[Image.Image] = None
    context: list[torch.Tensor] = field(default_factory=list)
    seed: int = 0
    text: str = ""
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)
    phrases: list[str] = field(default_factory=list)


TensorForward = Callable[..., tuple]


class TaskDecoder(nn.Module):
    """Base class. Subclasses set `name`, implement `from_model_config` and `run`."""

    name: ClassVar[str] = ""
    export_kind: ClassVar[Optional[str]] = None
    # checkpoint keys under this decoder's prefix that the engine does not load (reported as skipped)
    unserved_keys: ClassVar[tuple[str, ...]] = ()
    # checkpoint keys under this decoder's prefix that are not module parameters but weights of a
    # component the decoder builds elsewhere (the IP2P UNet of a diffusers pipeline): sub-prefix ->
    # component name; the loader hands them to `load_component_weights`
    component_keys: ClassVar[Mapping[str, str]] = {}

    def __init_subclass__(cls, **kw) -> None:
        # only a class that names itself registers: subclasses made by tools (torch.export's module
        # proxies subclass the traced module's class) must not replace it
        super().__init_subclass__(**kw)
        if cls.__dict__.get("name"):
            register_decoder(cls)

    @classmethod
    def from_model_config(cls, cfg) -> Optional["TaskDecoder"]:
        """The decoder for ModelConfig `cfg`, or None when the model has none of this kind."""
        raise NotImplementedError

    def run(self, route: RouteSpec, inputs: list[DecoderInput], options: Mapping[str, Any],
            tensor_forward: Optional[TensorForward] = None) -> list:
        """One batched call -> one result per input, in order. options = route.options + per-call
        options; tensor_forward replaces the decoder's tensor-level forward (an exported backend) when
        given. Raises ValueError on bad inputs."""
        raise NotImplementedError

    def load_component_weights(self, component: str, state: dict[str, torch.Tensor]) -> None:
        """Weights for a `component_keys` component (keys without the sub-prefix); ValueError if unusable."""
        raise NotImplementedError(f"{type(self).__name__} has no component {component!r}")

    def accepts_backend(self, route: RouteSpec, record: Mapping[str, Any]) -> bool:
        """Whether an exported artifact (its JSON record) can serve `route`'s calls."""
        return False

    def num_groups(self, route: RouteSpec) -> Optional[int]:
        """The exact number of `route` groups a request must give, or None when any number >= 1 works
        (POSE: one per keypoint). The CLI's --route and serve-bench's workloads force this many."""
        return None


def register_decoder(cls: type[TaskDecoder]) -> type[TaskDecoder]:
    if not cls.name.isidentifier():
        raise ValueError(f"decoder name must be an identifier, got {cls.name!r}")
    _DECODERS[cls.name] = cls
    return cls


def unregister_decoder(name: str) -> None:
    _DECODERS.pop(name, None)


def decoder_classes() -> dict[str, type[TaskDecoder]]:
    """name -> class of every registered decoder (importing the built-in decoder modules first)."""
    from . import detector, experts, generation, pose  # noqa: F401 - registration side effect

    return dict(_DECODERS)
