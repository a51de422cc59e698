"""One torch.library custom op per kernel (namespace `unimlm`), each with a fake
(meta) implementation and a pure-PyTorch reference that is the CPU path."""
from . import kv_cache, layer_ops, lora_moe, msda, paged_attention  # noqa: E402,F401  (registers torch.ops.unimlm.*)
