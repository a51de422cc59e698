"""The serving engine: loop, scheduler bridge, paged KV cache, decoder routing."""
from .engine import Engine
from .handle import RequestHandle
from .regions import InvalidRegionError, Region
from .types import (DecoderError, EngineClosedError, EngineError, InvalidRequestError, PromptTooLongError,
                    QueueFullError, Request, RequestOutput, StreamEvent, TaskResult)

__all__ = ["Engine", "RequestHandle", "Request", "Region", "InvalidRegionError", "RequestOutput", "StreamEvent",
           "TaskResult", "EngineError", "InvalidRequestError", "PromptTooLongError", "QueueFullError",
           "EngineClosedError", "DecoderError"]
