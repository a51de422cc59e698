"""Request intake on the caller's thread: validation, images, tokens -> a Sequence.

Routing tokens already in the prompt get their super-link query positions here
(`SuperLinks.expand_prompt`), so the prefill computes them like the reference does.

Everything here can fail on a bad request; failures are typed (InvalidRequestError,
PromptTooLongError, processor.InvalidImageError) and end only that request's handle.
"""
from __future__ import annotations

import operator
import random
import time

import torch

from .. import _C
from ..config import EngineConfig
from ..inputs.processor import Processor, image_hash, load_image, pixel_values, tile_image
from ..sampling import SamplingParams
from ..inputs.tokenizer import IncrementalDetokenizer
from .handle import RequestHandle
from .regions import InvalidRegionError, prepare_regions
from .sequence import Sequence
from .superlink import SuperLinks
from .types import InvalidRequestError, PromptTooLongError, Request


class Intake:
    def __init__(self, model, tokenizer, cfg: EngineConfig, max_model_len: int, superlinks: SuperLinks):
        self.model, self.tokenizer, self.cfg, self.superlinks = model, tokenizer, cfg, superlinks
        self.max_model_len = max_model_len
        self.processor = Processor(model.cfg.vision, tokenizer)
        self.vocab = model.cfg.llm.vocab_size

    def prepare(self, seq_id: int, req: Request, handle: RequestHandle) -> Sequence:
        params = req.sampling
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, got {type(params).__name__}")
        params.__post_init__()  # re-validate: fields may have been changed after construction
        ids_given = (*params.logit_bias, *params.forced_prefix, *params.stop_token_ids)
        bad = [t for t in ids_given if not _token_id_in(t, self.vocab)]
        if bad:  # an out-of-range id would fail the whole batch's sampling step (a device assert on CUDA)
            raise InvalidRequestError(f"token ids outside the vocabulary [0, {self.vocab}) in logit_bias / "
                                      f"forced_prefix / stop_token_ids: {bad[:5]}")
        if (req.prompt is None) == (req.prompt_token_ids is None):
            raise InvalidRequestError("give exactly one of prompt and prompt_token_ids")
        if req.timeout_s is not None and not req.timeout_s > 0:
            raise InvalidRequestError(f"timeout_s must be positive, got {req.timeout_s}")
        images = [load_image(src) for src in (req.images or [])]
        if req.prompt_token_ids is not None:
            ids, spans, pixels, hashes = self._from_ids(req.prompt_token_ids, images)
        else:
            p = self.processor(req.prompt, images or None, chat=req.chat)
            ids, spans, pixels, hashes = p.input_ids.tolist(), p.image_spans, p.pixel_values, p.image_hashes
        ids, pending, where = self.superlinks.expand_prompt(ids)
        spans = [(int(where[a]), int(where[b - 1]) + 1) for a, b in spans]
        regions, region_pos = self._regions(req, ids, images, hashes)
        pending = pending if req.run_prompt_routes else []  # the query positions are fed either way
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(f"prompt has {len(ids)} tokens; the model's context is {self.max_model_len}")
        plain_greedy = params.temperature == 0 and not params.logit_bias
        seq = Sequence(seq_id=seq_id, request=req, handle=handle, tokens=list(ids), prompt_len=len(ids),
                       pixel_values=pixels, images=images, seed=params.resolved_seed(), regions=regions,
                       detok=IncrementalDetokenizer(self.tokenizer), pending=pending,
                       greedy_from=len(params.forced_prefix) if plain_greedy else -1)
        if spans:
            idx = torch.full((len(ids),), -1, dtype=torch.long)
            row = 0
            for a, b in spans:
                idx[a:b] = torch.arange(row, row + b - a)
                row += b - a
            idx[region_pos] = torch.arange(row, row + len(region_pos))  # region features follow the image rows
            seq.patch_index = idx
        seq.image_spans = [(a, b, int(h[:15], 16)) for (a, b), h in zip(spans, hashes)]
        seq.image_spans += [(p, p + 1, r.key) for p, r in zip(region_pos, regions)]
        if req.timeout_s is not None:
            seq.deadline = time.monotonic() + req.timeout_s
        return seq

    def _regions(self, req: Request, ids: list[int], images, hashes) -> tuple[list, list[int]]:
        """-> (RegionInput per `<region>` token, their positions in ids); InvalidRegionError on bad input.
        Without regions and without a region encoder, `<region>` stays an ordinary token."""
        rid = self.tokenizer.special_ids.get("<region>")
        pos = [i for i, t in enumerate(ids) if t == rid] if rid is not None else []
        if not req.regions and (self.model.region_encoder is None or not pos):
            return [], []
        if self.model.region_encoder is None:
            raise InvalidRegionError("this model has no region encoder (config use_region_encoder is false)")
        return prepare_regions(req.regions, images, hashes, self.model.cfg.vision.image_size, len(pos)), pos

    def _from_ids(self, ids, images):
        ids = [int(i) for i in ids]
        if not ids:
            raise InvalidRequestError("prompt_token_ids is empty")
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise InvalidRequestError(f"prompt_token_ids has ids outside the vocabulary [0, {self.vocab}): {bad[:8]}")
        special = self.tokenizer.special_ids
        if special["<im_patch>"] in ids:
            raise InvalidRequestError("<im_patch> is reserved for image features; put one <image> id per image")
        n_img = ids.count(special["<image>"])
        if n_img != len(images):
            raise InvalidRequestError(f"prompt_token_ids has {n_img} <image> ids but {len(images)} images were given")
        pixels = [pixel_values(tile_image(im, self.model.cfg.vision), self.model.cfg.vision) for im in images]
        ids, spans = self.processor._expand(ids, [p.shape[0] for p in pixels])
        return ids, spans, pixels, [image_hash(im) for im in images]

    def extra_keys(self, seq: Sequence) -> list[int]:
        """Per-block prefix-hash keys so blocks of different images never share, and so a prompt whose
        routing-token payloads are wanted computes its query positions instead of reusing cached blocks
        (a cached block has KV but no hidden states): a key of its own from the first query on."""
        spans = list(seq.image_spans)
        if seq.pending:
            first = min(p.start for p in seq.pending)
            spans.append((first, first + 1, random.getrandbits(62)))
        if not spans:
            return []
        return _C.block_extra_keys(seq.prompt_len, self.cfg.block_size, spans)


def _token_id_in(t, vocab: int) -> bool:
    """An integer (Python or numpy, not bool) in [0, vocab)."""
    try:
        i = operator.index(t)
    except TypeError:
        return False
    return not isinstance(t, bool) and 0 <= i < vocab
