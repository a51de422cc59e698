"""EngineCore: the loop thread. Admit, expire/cancel, schedule, run the model, sample, feed super links.

Overlapped scheduling (like SGLang's overlap scheduler and vLLM's async scheduling): step N+1 is
scheduled and launched before the host has looked at step N's sampled tokens. Each sampled token goes
into the scheduler as PLACEHOLDER right away, so the next step schedules it; the next step reads its value
from the device tensor step N sampled into (no host sync before launching). One iteration:

    schedule N+1 -> launch N+1 (forward + sampling, asynchronous on a GPU)
    -> process N (wait for its one device-to-host copy; resolve its placeholders; payloads; stops; routing)
    -> append N+1's samples as placeholders

so on a GPU the host work of N and N+1 runs while the device computes. A request that ended at step N
was also computed in N+1 (its result is dropped). A sampled routing token R was fed to N+1 as an
ordinary token (its KV is what the 1 + K step would compute, since attention is causal), but N+1's
sample for it came from R's position: that sample is discarded and N+2 feeds the K query positions and
samples from the last one. Forced-prefix tokens are known on the host, so they go in resolved (and a
forced routing token with its K queries at once). On the CPU the forward runs synchronously; the
pipeline and its results are the same.

What the caller sees (text, stop strings, stream events, the final output) is the output processor's
(output.py: its own thread on CUDA, inline on the CPU); it reports stop strings back through
`request_stop`.
"""
from __future__ import annotations

import collections
import heapq
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from .. import _C
from .output import OutputProcessor
from .routing import DecoderRouter
from .span_routing import SpanRouter
from .runner import ModelRunner
from .sampler import BatchSampler, h2d, to_host, wait
from .sequence import PLACEHOLDER, Sequence
from .superlink import SuperLinks
from .types import EngineError, PromptTooLongError, QueueFullError, TaskResult

log = logging.getLogger("unimlm_engine")


@dataclass
class Step:
    """One launched step: what the scheduler gave, the model's outputs, the sampled ids (on the device,
    and their host copy once `event` completes)."""

    seqs: list[Sequence]
    starts: list[int]
    counts: list[int]
    row_starts: list[int]
    hidden: torch.Tensor
    samplers: list[Sequence] = field(default_factory=list)  # rows of `sampled`
    sampler_ids: set = field(default_factory=set)
    chunks: list[Sequence] = field(default_factory=list)  # scheduled but not sampling (prefill chunks)
    sampled: Optional[torch.Tensor] = None
    forced: Optional[list] = None  # per sampler row: is its token a forced-prefix one (None: no row's is)
    host: Optional[torch.Tensor] = None
    event: object = None
    discard: set = field(default_factory=set)  # seq ids whose sample here is invalid (routing split)


class _StepArrays:
    """The scheduler's StepOutput with each field read once: the binding converts a field to a new numpy
    array on every access, and the loop and the runner read several of them."""

    __slots__ = ("_out", "_seen", "size")

    def __init__(self, out):
        self._out, self._seen, self.size = out, {}, len(out)

    def __len__(self) -> int:
        return self.size

    def __getattr__(self, name):
        seen = self._seen
        if name not in seen:
            seen[name] = getattr(self._out, name)
        return seen[name]


class EngineCore:
    def __init__(self, model, scheduler, runner: ModelRunner, superlinks: SuperLinks, intake, cfg):
        self.model, self.scheduler, self.runner, self.superlinks = model, scheduler, runner, superlinks
        self.intake, self.cfg = intake, cfg
        self.router = DecoderRouter(model, cfg, self.on_task)  # first: a bad back-end spec raises here
        self.span_router = SpanRouter(model, cfg, self.router, self.on_task)  # span routes: same batcher
        threaded = cfg.output_thread
        if threaded is None:
            threaded = torch.device(model.device).type == "cuda"
        self.output = OutputProcessor(on_stop=self.request_stop, on_text_done=self._dispatch, threaded=threaded,
                                      span_tasks=self.span_router.tasks(), on_spans=self._on_spans)
        self.sampler = BatchSampler(model.device)
        self.eos = model.cfg.llm.eos_token_id
        self.queue = _C.RequestQueue(cfg.max_queue_size)
        self.lock = threading.Lock()
        self.incoming: dict[int, Sequence] = {}
        self.seqs: dict[int, Sequence] = {}
        self._cancels: collections.deque[int] = collections.deque()
        self._stops: collections.deque[Sequence] = collections.deque()
        self._inflight: Optional[Step] = None
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, seq_id) of admitted requests
        self._stop = threading.Event()
        self.fatal: Optional[EngineError] = None  # the engine cannot go on (a TP worker died): what ends requests
        self.iter_times: collections.deque[float] = collections.deque(maxlen=256)
        self.steps = 0
        self.loop_cpu_s = 0.0  # CPU seconds of the loop in working iterations (of it the model: runner.model_cpu_s)
        self._thread = threading.Thread(target=self._loop, name="unimlm-engine-loop", daemon=True)
        self._thread.start()

    # ---- called from other threads -----------------------------------------------------------------
    def add(self, seq: Sequence) -> bool:
        """Queue a prepared sequence; False when the request queue is full."""
        with self.lock:
            self.incoming[seq.seq_id] = seq
        if self.queue.try_push(seq.seq_id):
            return True
        with self.lock:
            self.incoming.pop(seq.seq_id, None)
        return False

    def cancel(self, seq_id: int) -> None:
        self._cancels.append(seq_id)

    def request_stop(self, s: Sequence) -> None:
        """The output thread found a stop string: end the text at the next iteration."""
        self._stops.append(s)

    def shutdown(self, timeout: float) -> None:
        """Stop the loop, end every request left as cancelled, stop the decoder workers and the output thread."""
        self._stop.set()
        self.queue.close()
        self._thread.join(timeout=timeout)
        with self.lock:
            left = list(self.incoming.values()) + list(self.seqs.values())
        reason, error = ("error", self.fatal) if self.fatal is not None else ("cancelled", None)
        for s in left:
            self.end(s, reason, error)
        self.router.close(timeout=timeout)
        self.span_router.close(timeout=timeout)
        self.output.close(timeout=timeout)

    def busy(self) -> bool:
        return bool(self.seqs or self.incoming)

    def on_task(self, s: Sequence, idx: int, task: TaskResult) -> None:
        """Decoder worker callback (any thread), super-link tasks and spans (task.span set) alike. The
        request ends when its text is done, its tasks are planned and no routed call is left."""
        with self.lock:
            (s.spans if task.span is not None else s.tasks)[idx] = task
            s.decoders_pending -= 1
            done = s.planned and s.decoders_pending == 0
        self.output.task(s, idx, task)
        if done:
            self.end(s, s.finish_reason or "stop")

    def _on_spans(self, s: Sequence, groups: list, dispatch: bool) -> None:
        """The output side completed span groups (its thread): each becomes a span call, in text order (not
        run when the request has ended meanwhile: cancelled, timed out)."""
        for g in groups:
            with self.lock:
                dispatch = dispatch and s.seq_id in self.seqs
                idx = len(s.spans)
                s.spans.append(None)
                s.decoders_pending += 1
            self.span_router.submit(s, idx, g, dispatch)

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self._iteration()
            except Exception as e:  # noqa: BLE001 - an internal failure ends the batch, not the engine
                self._inflight = None
                if self.fatal is None:
                    log.exception("engine step failed")
                    if getattr(e, "closes_engine", False):  # a TP worker died mid-step: nothing can run again
                        self.fatal = e
                self._fail_running(self.fatal or (e if isinstance(e, EngineError) else
                                                  EngineError(f"engine step failed: {type(e).__name__}: {e}")))
                worked = True
            if not worked:
                seq_id = self.queue.pop(self.cfg.idle_wait_s)
                if seq_id is not None:
                    self._admit_one(seq_id)

    def _admit_one(self, seq_id: int) -> None:
        with self.lock:
            seq = self.incoming.pop(seq_id, None)
            if seq is None:
                return
            self.seqs[seq_id] = seq
        if seq.deadline is not None:
            heapq.heappush(self._deadlines, (seq.deadline, seq_id))
        try:
            self.scheduler.add_request(seq_id, seq.tokens, seq.request.priority, self.intake.extra_keys(seq))
        except _C.QueueFullError as e:
            self.end(seq, "error", QueueFullError(str(e)))
        except ValueError as e:
            self.end(seq, "error", PromptTooLongError(str(e)))

    def _housekeeping(self) -> None:
        while (seq_id := self.queue.pop(0.0)) is not None:
            self._admit_one(seq_id)
        while self._cancels:
            seq = self.seqs.get(sid := self._cancels.popleft()) or self.incoming.get(sid)
            if seq is not None:
                self.end(seq, "cancelled")
        while self._stops:
            s = self._stops.popleft()
            if s.seq_id in self.seqs and not s.text_done:
                self.end_text(s, "stop")
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            s = self.seqs.get(heapq.heappop(self._deadlines)[1])
            if s is not None:
                self.end(s, "timeout")

    def _iteration(self) -> bool:
        c0 = time.thread_time()
        self._housekeeping()
        t0 = time.perf_counter()
        out = _StepArrays(self.scheduler.step())
        for seq_id in out.rejected:
            if (s := self.seqs.get(seq_id)) is not None:
                self.end_text(s, "length", in_scheduler=False)
        prev = self._inflight
        self._inflight = self._launch(out) if len(out) else None
        if prev is not None:
            self._process(prev)
        if self._inflight is not None:
            self._append_samples(self._inflight)
        if self._inflight is None and prev is None:
            return False
        self.steps += 1
        self.iter_times.append(time.perf_counter() - t0)
        self.loop_cpu_s += time.thread_time() - c0
        return True

    @torch.inference_mode()  # once per step for the forward, the logits and the sampler
    def _launch(self, out) -> Step:
        """Run step `out` on the device and sample; placeholders read the in-flight step's samples."""
        table = self.seqs
        seq_ids = out.seq_ids.tolist()
        seqs = [table[i] for i in seq_ids]
        if out.is_prefill.any():
            now = time.monotonic()
            for s in seqs:
                if s.first_scheduled is None:
                    s.first_scheduled = now
                    s.num_cached_tokens = self.scheduler.num_cached_tokens(s.seq_id)
        if out.cow:
            self.runner.copy_blocks(out.cow)
        prev = self._inflight
        feed = prev.sampled if prev is not None else None  # a PLACEHOLDER reads row s.sample_row of it
        hidden, last_rows = self.runner.execute(out, seqs, placeholders=feed)
        do_sample = out.do_sample
        step = Step(seqs, out.num_computed.tolist(), out.num_new_tokens.tolist(), out.query_start_loc.tolist(),
                    hidden)
        flags = do_sample.tolist()
        every = all(flags)
        if not every:
            step.chunks = [s for s, d in zip(seqs, flags) if not d]
        if every or any(flags):
            step.samplers = seqs if every else [s for s, d in zip(seqs, flags) if d]
            step.sampler_ids = set(seq_ids) if every else {s.seq_id for s in step.samplers}
            for i, s in enumerate(step.samplers):
                s.sample_row = i
            if every and hidden.shape[0] == len(seqs):  # one row per sequence (decode): hidden is the rows
                rows = hidden
            else:
                rows = hidden[h2d(last_rows.numpy()[do_sample], hidden.device)]
            step.sampled, forced = self.sampler.sample(self.runner.logits(rows), step.samplers)
            step.forced = forced.tolist() if forced.any() else None
            step.host, step.event = to_host(step.sampled)
        return step

    def _append_samples(self, step: Step) -> None:
        """Each sample of the just-launched step enters the scheduler: forced tokens resolved (a forced
        routing token with its queries), sampled ones as PLACEHOLDER."""
        if not step.samplers:
            return
        prefix = step.forced  # None: every sample is a placeholder
        ids, toks = [], []
        for i, s in enumerate(step.samplers):
            if s.text_done or s.seq_id in step.discard or s.finish_after_payload:
                continue
            tok = PLACEHOLDER
            if prefix is not None and prefix[i]:
                tok = s.request.sampling.forced_prefix[s.num_sampled - 1]
                if tok in self.superlinks.route_ids:
                    feed = [tok] + self.superlinks.open_payload(s, tok, s.num_sampled - 1, len(s.tokens) + 1)
                    s.tokens += feed
                    self.scheduler.update(s.seq_id, feed)
                    continue
            else:
                s.placeholder_pos = len(s.tokens)
            s.tokens.append(tok)
            ids.append(s.seq_id)
            toks.append(tok)
        if ids:
            self.scheduler.update_batch(ids, toks)

    def _process(self, step: Step) -> None:
        """The host's turn on a finished step: payloads, then each sample's token."""
        self.superlinks.collect(step.seqs, step.starts, step.counts, step.row_starts, step.hidden)
        for s in step.chunks:
            if not s.text_done:
                self.scheduler.update(s.seq_id, [])  # a prefill chunk: commit its computed blocks
        if not step.samplers:
            return
        wait(step.event)
        values = step.host.tolist()
        forced = step.forced
        res_ids, res_pos, res_val, learned, ended, routed = [], [], [], [], [], []
        now = time.monotonic()
        eos, route_ids = self.eos, self.superlinks.route_ids
        for i, s in enumerate(step.samplers):
            if s.text_done or s.seq_id in step.discard:
                continue
            tok, was_forced = values[i], forced is not None and forced[i]
            if s.placeholder_pos is not None and not was_forced:
                res_ids.append(s.seq_id)
                res_pos.append(s.placeholder_pos)
                res_val.append(tok)
                s.tokens[s.placeholder_pos], s.placeholder_pos = tok, None
            if s.finish_after_payload:  # the queries of a final routing token are computed: done
                ended.append((s, s.finish_after_payload))
                continue
            s.first_token = s.first_token or now
            s.last_token = now
            s.generated.append(tok)
            learned.append((s, tok))
            # token-level rules: EOS / stop ids / max_tokens, routing
            p = s.request.sampling
            stop = (tok == eos and not p.ignore_eos) or tok in p.stop_token_ids
            at_length = len(s.generated) >= p.max_tokens
            if not stop and tok in route_ids:  # its queries follow (forced: already appended with them)
                if not was_forced:
                    routed.append((s, tok))
                if at_length:
                    s.finish_after_payload = "length"
            elif stop or at_length:
                ended.append((s, "stop" if stop else "length"))
        if res_ids:
            self.scheduler.resolve_batch(res_ids, res_pos, res_val)
        self.output.tokens(learned)  # before any end of text below
        for s, tok in routed:
            self._route(s, tok)
        for s, reason in ended:
            self.end_text(s, reason)

    def _route(self, s: Sequence, tok: int) -> None:
        """A sampled routing token: its K queries are fed next. If the in-flight step already fed the token
        (from the device) and sampled from its position, that sample is dropped."""
        inflight = self._inflight
        fed = inflight is not None and s.seq_id in inflight.sampler_ids
        markers = self.superlinks.open_payload(s, tok, len(s.generated) - 1, len(s.tokens))
        if fed:
            inflight.discard.add(s.seq_id)
            s.num_sampled -= 1
        s.tokens += markers
        self.scheduler.update(s.seq_id, markers)

    # ---- endings -----------------------------------------------------------------------------------
    def end_text(self, s: Sequence, reason: str, in_scheduler: bool = True) -> None:
        """Text is done: free the KV blocks; the output thread flushes the text, then `_dispatch`es."""
        if in_scheduler:
            self.scheduler.abort(s.seq_id)
        s.text_done, s.finish_reason = True, reason
        self.output.text_done(s)

    def _dispatch(self, s: Sequence) -> None:
        """On the output thread, after the text is final: hand the payloads to the decoders."""
        jobs = self.router.plan(s)
        with self.lock:
            s.decoders_pending += len(jobs)  # span calls still running are counted already
            s.planned = True
            done = s.decoders_pending == 0
        if done:
            self.end(s, s.finish_reason)
            return
        for idx, spec in jobs:
            self.router.submit(s, idx, spec)

    def end(self, s: Sequence, reason: str, error: Optional[BaseException] = None) -> None:
        """End a request exactly once: remove it everywhere and finish its handle."""
        with self.lock:
            self.incoming.pop(s.seq_id, None)
            known = self.seqs.pop(s.seq_id, None) is not None
        if known and not s.text_done:
            self.scheduler.abort(s.seq_id)
        s.text_done = True
        if reason in ("cancelled", "timeout"):
            self.router.cancel(s)
        self.output.end(s, reason, error)

    def _fail_running(self, error: EngineError) -> None:
        with self.lock:
            victims = [s for s in self.seqs.values() if not s.text_done]
        for s in victims:
            self.end(s, "error", error)
