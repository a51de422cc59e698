"""One torch.library custom op per kernel (namespace `unimlm`), each with a fake
(meta) implementation and a pure-PyTorch reference that is the CPU path."""
