"""Public request / result types and the typed errors of the engine."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from ..sampling import SamplingParams


class EngineError(RuntimeError):
    """Base class of errors the engine reports on a request."""


class InvalidRequestError(EngineError, ValueError):
    """The request itself is malformed (bad prompt ids, image, sampling values...)."""


class PromptTooLongError(InvalidRequestError):
    pass


class QueueFullError(EngineError):
    """The waiting queue is at max_queue_size; the request was rejected."""


class EngineClosedError(EngineError):
    pass


class DecoderError(EngineError):
    """A task decoder failed on this request."""


_ids = itertools.count(1)


@dataclass
class Request:
    """One generation request. Give `prompt` (text, the chat template is applied unless
    chat=False) or `prompt_token_ids` (used as they are)."""

    prompt: Optional[str] = None
    prompt_token_ids: Optional[Sequence[int]] = None
    images: Optional[Sequence[Any]] = None  # paths, bytes, PIL images or HxWx3 uint8 arrays
    # visual prompts (engine/regions.py: Region or dict; point, box, scribble, mask in image pixels), one per
    # `<region>` token of the prompt, in order; the prompt writes region i as <reg>region{i+1}<region></reg>
    regions: Optional[Sequence[Any]] = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0  # lower is more urgent (policy="priority")
    timeout_s: Optional[float] = None
    chat: bool = True
    request_id: Optional[str] = None
    # routing tokens already in the prompt always get their query positions; with run_prompt_routes
    # their payloads are also collected, returned and decoded (the official evaluation feeds the
    # answer, routing and [EMB] tokens included, as the prompt). Those prompts then share prefix-cache
    # blocks only up to the first query position (cached blocks hold KV, not hidden states).
    run_prompt_routes: bool = False

    def __post_init__(self) -> None:
        if self.request_id is None:
            self.request_id = f"req-{next(_ids)}"


@dataclass
class TaskResult:
    """The output of one routed decoder call for a request.

    route: "[DET]" ...; kind: the route's result kind (routes.RESULT_KINDS); detections: boxes
    [n, 4] xyxy image pixels, scores [n], labels [n] (index of the routed group = class), masks
    [n, H, W] bool for [SEG]; keypoints [n, K, 3] for [POSE]; images (PIL) for [GEN]/[EDIT];
    backend: the decoder back end that produced it ("eager", "onnxruntime", "aoti", "tensorrt");
    `raw` is the decoder's own result object. `to_json()`: the README's task-result schema.
    A span route's result (route = the span route's name, "imgseg") also has `span`: [start, end)
    character offsets of the span group in the request's text, `span_text`: the task span's argument and
    `phrases`: the labels of its boxes (one per box row).
    """

    route: str
    num_groups: int
    boxes: Any = None
    scores: Any = None
    labels: Any = None
    masks: Any = None
    keypoints: Any = None
    images: Any = None
    raw: Any = None
    error: Optional[BaseException] = None
    backend: Optional[str] = None
    kind: Optional[str] = None
    span: Optional[tuple[int, int]] = None
    span_text: Optional[str] = None
    phrases: Any = None

    def to_json(self, image_paths: Optional[Sequence[str]] = None) -> dict[str, Any]:
        """The task-result JSON (README); image_paths: saved files to name instead of inline PNGs."""
        from ..outputs.schema import task_json

        return task_json(self, image_paths)


@dataclass
class RequestOutput:
    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)  # generated ids, routing tokens in, queries out
    tasks: list[TaskResult] = field(default_factory=list)
    payloads: list[Any] = field(default_factory=list)  # RoutedPayload: super-link hidden states [K, hidden]
    spans: list[TaskResult] = field(default_factory=list)  # span-route results, in text order
    finish_reason: Optional[str] = None  # stop | length | cancelled | timeout | error
    prompt_len: int = 0
    num_cached_tokens: int = 0
    queue_time_s: float = 0.0
    time_to_first_token_s: Optional[float] = None
    time_per_output_token_s: Optional[float] = None
    e2e_time_s: float = 0.0
    error: Optional[BaseException] = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.finish_reason in ("stop", "length")

    def to_json(self, image_paths: Optional[Sequence[Optional[Sequence[str]]]] = None) -> dict[str, Any]:
        """image_paths[i]: saved files of task i's images (inline base64 PNGs when None)."""
        paths = list(image_paths) if image_paths is not None else [None] * len(self.tasks)
        return {"request_id": self.request_id, "text": self.text, "token_ids": self.token_ids,
                "finish_reason": self.finish_reason, "tasks": [t.to_json(p) for t, p in zip(self.tasks, paths)],
                "spans": [t.to_json() for t in self.spans],
                "prompt_len": self.prompt_len, "num_cached_tokens": self.num_cached_tokens,
                "queue_time_s": self.queue_time_s, "time_to_first_token_s": self.time_to_first_token_s,
                "time_per_output_token_s": self.time_per_output_token_s, "e2e_time_s": self.e2e_time_s,
                "error": None if self.error is None else f"{type(self.error).__name__}: {self.error}"}


@dataclass(slots=True)
class StreamEvent:
    """One item of `handle.stream()`: new text (and the token ids it came from), a task result, or the end."""

    text: str = ""
    token_ids: Sequence[int] = ()
    task: Optional[TaskResult] = None
    finished: bool = False
    output: Optional[RequestOutput] = None  # set on the final event
