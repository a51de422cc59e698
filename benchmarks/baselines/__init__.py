"""Baselines the benchmarks compare against: how these models are served today.

- `hf_serial`: one request at a time with Hugging Face transformers (the official code's way).
- `msda_classic`: a one-thread-per-output CUDA kernel for multi-scale deformable attention.
"""
