"""The way the official code serves: one request at a time with Hugging Face transformers.

`HFSerialBaseline` runs a request like the official VisionLLM v2 / UnifiedMLLM code does:

- the LLM is a `transformers.LlamaForCausalLM` holding the `llm.*` weights of the same
  checkpoint (official-layout shards); when the config has LoRA-MoE, the FFN linears are
  swapped for `HFLoRAMoELinear` (frozen W0 + dense-routed low-rank experts, the way the
  UnifiedMLLM code patches modules into an HF model);
- vision features come from our CLIP tower + `vl_bridge` (`VisionLLM.encode_images`) and
  are scattered into `inputs_embeds` at the `<im_patch>` positions;
- text comes from `generate(inputs_embeds=..., do_sample=False, max_new_tokens=...)`;
  forced routing tokens come from a LogitsProcessor (`ForcedPrefix`), so both sides emit
  the same tokens. Generation stops at a routing token (StoppingCriteria); the routing
  token and its K query embeddings are appended and generation goes on from the HF KV
  cache, so the tokens after a route see the queries, exactly as in the engine;
- after generation, one extra forward with `output_hidden_states=True` over the whole
  sequence (queries inserted after each routing token) gives the payloads: the query
  positions of `hidden_states[-1]`, which transformers ties to the output of the final
  norm (checked by tests/test_bench_e2e.py against our reference generation);
- the decoders run one request at a time (`DecoderSet.run` with a batch of one).

CPU path tested (fp32, tiny preset). The CUDA path (bf16, 7B shapes) is the same code but
has not been run here: no GPU on the development machine.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from unimlm_engine.engine.output import to_task_result
from unimlm_engine.model.decoders import DecoderInput
from unimlm_engine.routes import all_routes
from unimlm_engine.sampling import apply_logit_bias
from unimlm_engine.engine.types import Request, TaskResult
from unimlm_engine.model.superlink import RoutedPayload
from unimlm_engine.inputs.processor import Processor, load_image

_FFN = ("gate_proj", "up_proj", "down_proj")


class HFLoRAMoELinear(nn.Module):
    """o = W0 x + scaling * B_cat (softmax(x Wg) (x) A_cat x), parameters named like ours."""

    def __init__(self, in_features: int, out_features: int, num_experts: int, rank: int, scaling: float):
        super().__init__()
        self.rank, self.scaling = rank, scaling
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.lora_router = nn.Parameter(torch.empty(num_experts, in_features))
        self.lora_A = nn.Parameter(torch.empty(num_experts * rank, in_features))
        self.lora_B = nn.Parameter(torch.empty(out_features, num_experts * rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., K] -> [..., N]"""
        gate = torch.softmax(x.float() @ self.lora_router.float().t(), dim=-1)  # [..., E]
        mid = (x @ self.lora_A.t()).unflatten(-1, (-1, self.rank)) * gate[..., None].to(x.dtype)
        return x @ self.weight.t() + self.scaling * (mid.flatten(-2) @ self.lora_B.t())


def build_hf_llama(model, attn_implementation: str = "sdpa"):
    """An HF LlamaForCausalLM with `model.llm`'s shapes (LoRA-MoE FFN linears when configured)."""
    import transformers

    c, lm = model.cfg.llm, model.cfg.lora_moe
    hf_cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        attn_implementation=attn_implementation)
    with torch.device(model.device):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    if lm is not None:
        for layer in hf.model.layers:
            for name in lm.target_modules:
                old = getattr(layer.mlp, name)
                setattr(layer.mlp, name, HFLoRAMoELinear(old.in_features, old.out_features, lm.num_experts, lm.rank,
                                                         lm.scaling).to(model.device))
    return hf.to(model.dtype).eval()


def hf_llama_from_shards(model, ckpt: str | Path, attn_implementation: str = "sdpa"):
    """The `llm.*` keys of an official-layout checkpoint directory, loaded into HF's Llama."""
    from unimlm_engine.checkpoint.loader import find_shards, read_shard

    hf = build_hf_llama(model, attn_implementation)
    sd = {}
    for f in find_shards(Path(ckpt)):
        sd.update({k[len("llm."):]: v for k, v in read_shard(f).items() if k.startswith("llm.")})
    hf.load_state_dict(sd, strict=True)
    return hf.to(model.dtype).eval()


def hf_llama_from_model(model, attn_implementation: str = "sdpa"):
    """Copy `model.llm`'s weights into HF's Llama (GPU path: no checkpoint on disk)."""
    hf = build_hf_llama(model, attn_implementation)
    hf.load_state_dict(model.llm.state_dict(), strict=True)
    return hf


class _ForcedPrefix:
    """LogitsProcessor: the first len(prefix) generated tokens are the prefix."""

    def __init__(self, prefix: tuple[int, ...], done: int):
        self.prefix, self.done = prefix, done

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = self.done + input_ids.shape[1]
        if step < len(self.prefix):
            scores = torch.full_like(scores, float("-inf"))
            scores[:, self.prefix[step]] = 0.0
        return scores


class _LogitBias:
    """LogitsProcessor: SamplingParams.logit_bias, added to the scores by the engine's reference function."""

    def __init__(self, bias: dict[int, float]):
        self.bias = bias

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return apply_logit_bias(scores, self.bias)


class _StopOnRoute:
    """StoppingCriteria: stop right after a routing token (its queries go in next)."""

    def __init__(self, route_ids: dict[int, str]):
        self.ids = torch.tensor(sorted(route_ids) or [-1])

    def __call__(self, input_ids: torch.Tensor, scores, **kw) -> torch.Tensor:
        if input_ids.shape[1] == 0:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        return torch.isin(input_ids[:, -1], self.ids.to(input_ids.device))


class _TokenClock:
    """Streamer recording the wall time of every generated token (the prompt put is skipped)."""

    def __init__(self, times: list[float]):
        self.times, self.first = times, True

    def put(self, value) -> None:
        if self.first:
            self.first = False
            return
        self.times.append(time.monotonic())

    def end(self) -> None:
        pass


@dataclass
class BaselineOutput:
    token_ids: list[int] = field(default_factory=list)
    payloads: list[RoutedPayload] = field(default_factory=list)
    tasks: list[TaskResult] = field(default_factory=list)
    prompt_len: int = 0
    time_to_first_token_s: Optional[float] = None
    time_per_output_token_s: Optional[float] = None
    e2e_time_s: float = 0.0


class HFSerialBaseline:
    """One request at a time: HF generate, then an extra forward for payloads, then decoders."""

    def __init__(self, model, hf, tokenizer):
        self.model, self.hf, self.tokenizer = model, hf, tokenizer
        self.processor = Processor(model.cfg.vision, tokenizer)
        self.route_ids = model.route_ids
        hf.generation_config.eos_token_id = None  # stop tokens come per request (ignore_eos)

    @classmethod
    def from_checkpoint(cls, ckpt: str | Path, device=None, dtype: Optional[torch.dtype] = None,
                        attn_implementation: str = "sdpa") -> "HFSerialBaseline":
        from unimlm_engine.checkpoint.pretrained import load_pretrained

        model, tok = load_pretrained(ckpt, device=device or "cpu", dtype=dtype)
        return cls(model, hf_llama_from_shards(model, ckpt, attn_implementation), tok)

    def prompt(self, req: Request) -> tuple[torch.Tensor, list[torch.Tensor], list[Any]]:
        """-> input ids [T], pixel values per image [n_tiles, 3, S, S], loaded images."""
        images = [load_image(src) for src in (req.images or [])]
        if req.prompt_token_ids is not None:
            raise ValueError("the HF baseline takes text prompts only")
        p = self.processor(req.prompt, images or None, chat=req.chat)
        return p.input_ids.to(self.model.device), p.pixel_values, images

    @torch.inference_mode()
    def run(self, req: Request) -> BaselineOutput:
        t0 = time.monotonic()
        ids, pixels, images = self.prompt(req)
        feats = torch.cat([self.model.encode_images(p) for p in pixels]) if pixels else None
        embeds = self.model.embed_inputs(ids, feats)
        times: list[float] = []
        tokens, seq, routes = self._generate(embeds, req.sampling, times)
        out = BaselineOutput(token_ids=tokens, prompt_len=int(ids.numel()))
        if routes:
            out.payloads = self._payloads(seq, routes)
            out.tasks = self._decode(out.payloads, images, req)
        out.e2e_time_s = time.monotonic() - t0
        if times:
            out.time_to_first_token_s = times[0] - t0
            if len(times) > 1:
                out.time_per_output_token_s = (times[-1] - times[0]) / (len(times) - 1)
        return out

    def _generate(self, embeds: torch.Tensor, params, times: list[float]):
        """embeds: [T, hidden] -> (generated ids, full input embeds [T', hidden] with the
        queries inserted, [(route, token index, first query position)])."""
        from transformers import DynamicCache, LogitsProcessorList, StoppingCriteriaList

        if params.temperature != 0:
            raise ValueError("the HF baseline is compared on greedy requests only")
        eos = None if params.ignore_eos else self.model.cfg.llm.eos_token_id
        stops = ({eos} | set(params.stop_token_ids)) - {None}
        tokens: list[int] = []
        routes: list[tuple[str, int, int]] = []
        seq, cache = embeds, DynamicCache(config=self.hf.config)
        while len(tokens) < params.max_tokens:
            new = self.hf.generate(
                inputs_embeds=seq[None], attention_mask=torch.ones(1, seq.shape[0], dtype=torch.long,
                                                                   device=seq.device),
                past_key_values=cache, max_new_tokens=params.max_tokens - len(tokens), do_sample=False,
                num_beams=1, eos_token_id=sorted(stops) or None, pad_token_id=self.model.cfg.llm.pad_token_id,
                logits_processor=LogitsProcessorList([_ForcedPrefix(params.forced_prefix, len(tokens))]
                                                     + ([_LogitBias(params.logit_bias)] if params.logit_bias else [])),
                stopping_criteria=StoppingCriteriaList([_StopOnRoute(self.route_ids)]),
                streamer=_TokenClock(times))[0].tolist()
            tokens += new
            seq = torch.cat([seq, self.model.llm.embed(torch.tensor(new, device=seq.device))])
            route = self.route_ids.get(new[-1]) if new else None
            if route is not None:
                routes.append((route, len(tokens) - 1, seq.shape[0]))
                seq = torch.cat([seq, self.model.query_embeddings(route).to(seq.dtype)])
            if not new or new[-1] in stops or route is None:
                break
        return tokens, seq, routes

    def _payloads(self, seq: torch.Tensor, routes) -> list[RoutedPayload]:
        """The official extra forward over the whole sequence; query rows of hidden_states[-1]."""
        hidden = self.hf(inputs_embeds=seq[None], output_hidden_states=True, use_cache=False).hidden_states[-1][0]
        out = []
        for route, tok_idx, start in routes:
            k = self.model.cfg.superlink.num_queries(route)
            out.append(RoutedPayload(route, tok_idx, hidden[start:start + k].clone()))
        return out

    def _decode(self, payloads: list[RoutedPayload], images: list, req: Request) -> list[TaskResult]:
        """Each route the request used: one decoder call with a batch of one."""
        tasks = []
        image = images[0] if images else None
        for spec in all_routes():
            groups = [p.payload for p in payloads if p.route == spec.token]
            if not groups:
                continue
            inp = DecoderInput(groups, image if spec.needs_image else None,
                               [p.payload for p in payloads if p.route in spec.requires], req.sampling.seed or 0)
            res, backend = self.model.decoders.run(spec, [inp])
            tasks.append(to_task_result(spec.token, len(groups), res[0], backend))
        return tasks
