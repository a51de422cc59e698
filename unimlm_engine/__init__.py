"""unimlm-engine: serving engine for generalist multimodal LLMs with routed task decoders.

    import unimlm_engine as ue
    with ue.Engine.from_pretrained("tiny") as engine:
        out = engine.generate("Describe the image.", images=["examples/images/chelsea.png"])
"""
from .config import EngineConfig, ModelConfig
from .engine import (DecoderError, Engine, EngineClosedError, EngineError, InvalidRegionError, InvalidRequestError,
                     PromptTooLongError, QueueFullError, Region, Request, RequestHandle, RequestOutput, StreamEvent,
                     TaskResult)
from .inputs.processor import InvalidImageError
from .sampling import SamplingParams

__version__ = "0.1.0"
__all__ = ["Engine", "EngineConfig", "ModelConfig", "SamplingParams", "Request", "Region", "InvalidRegionError",
           "RequestHandle", "RequestOutput", "StreamEvent", "TaskResult", "EngineError", "InvalidRequestError",
           "InvalidImageError", "PromptTooLongError", "QueueFullError", "EngineClosedError", "DecoderError"]
