"""One decoding step of the dynamic model as a traceable module, with exits as real control flow.

`DynamicStep.forward(input_ids, threshold, *past)` runs the tokens through the decoder with
its KV cache. At each exit point of the policy it computes the confidence of the last
token (a custom `ai.dyninfer` op for head measures) and asks `ai.dyninfer.ExitGate` whether
the batch may leave. Each segment of layers between two exit points is one `torch.cond`
(an ONNX `If` once exported): run the layers, or, once the token has left, fill their
present KV by CALM propagation from its exit hidden state. A threshold above 1 disables
every exit (the prefill and the "exits disabled" mode use the same graph).

Outputs: logits of the last position [B, V], the exit layer (int64, num_layers when the
token ran every layer), the exit confidence (-1 when it did not exit), the stop confidence [B],
the greedy next token [B], then the present K and V of every layer.

KV layouts (`KV_LAYOUTS`): "concat", the past of each layer holds exactly the positions before
this step and the present is past and new concatenated; "buffer" (exporters/attention.py), each
layer's past is a preallocated buffer the step writes into in place, and the step takes one more
input, `positions` [total], whose length says how many positions the buffers hold after it.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from dyninfer.core.choices import HEAD_MEASURES, KV_LAYOUTS
from dyninfer.core.errors import DyninferError
from dyninfer.core.layered import LayeredModel
from dyninfer.core.lenses import ExitTranslators, TunedLens
from dyninfer.core.policies import ExitPolicy
from dyninfer.early_exit.confidence import max_probability
from dyninfer.exporters import attention, ops
from dyninfer.runtime.dynamic import DynamicModel


class StepCache:
    """A functional KV cache for one step: past tensors in, present tensors out.

    The decoder layers call `update` as they would on a transformers Cache; nothing is
    mutated in place, so the step traces into a pure graph.
    """

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, cache_kwargs=None):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key.to(past_key.dtype)], dim=2)
        value = torch.cat([past_value, value.to(past_value.dtype)], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value

    @classmethod
    def for_layers(cls, first: int, past) -> StepCache:
        """The cache of layers first, first + 1, ... from their flat (key, value, key, value, ...) past."""
        return cls(attention.layer_pairs(first, past))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.past[layer_idx][0].shape[2]


def check_exportable(lm: LayeredModel, policy: ExitPolicy | None) -> None:
    if lm.adapter.recurrent:
        raise DyninferError(f"ONNX export needs a KV cache; the {lm.family} family keeps a recurrent state (run it with the torch backend)")
    if policy is not None and policy.kv_mode != "propagate":
        raise DyninferError(
            f"the policy's KV mode is '{policy.kv_mode}'; the ONNX graph fills skipped layers by "
            "propagation: export with `kv_mode` propagate"
        )


@contextlib.contextmanager
def step_attention(lm: LayeredModel, kv_layout: str):
    """Run the step's layers with the attention its layout needs: the buffered function for "buffer"; SDPA for
    "concat", which exports cleanly for every family (GPT-2's eager path slices a fixed causal buffer, which
    torch.export cannot keep symbolic inside branches)."""
    config = lm.model.config
    saved = config._attn_implementation
    if kv_layout == "buffer":
        attention.register()
    config._attn_implementation = attention.ATTENTION_NAME if kv_layout == "buffer" else "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = saved


class DynamicStep(nn.Module):
    def __init__(self, dynamic: DynamicModel, kv_layout: str = "concat", rotary_in_attention: bool = False):
        """`rotary_in_attention` (buffered layout only): the attention op rotates queries and keys with the rotary tables
        of the step's positions (ONNX Runtime's GroupQueryAttention do_rotary); the family's code leaves them as they are."""
        super().__init__()
        if kv_layout not in KV_LAYOUTS:
            raise ValueError(f"kv_layout must be one of {KV_LAYOUTS}, got {kv_layout!r}")
        self.buffered = kv_layout == "buffer"
        if rotary_in_attention and not self.buffered:
            raise ValueError("the attention op rotates only in the buffered layout")
        self.rotary_in_attention = rotary_in_attention
        self.rotary = None  # the step's rotary tables while it runs
        lm, policy = dynamic.lm, dynamic.policy
        check_exportable(lm, policy)
        # The torch dynamic model's own exit heads and checks, with head confidences as custom ops.
        self.dynamic = copy.copy(dynamic)
        self.dynamic.logit_confidence = lambda measure, logits: ops.LOGIT_CONFIDENCE[measure](logits)
        self.lm = lm
        self.num_layers = lm.num_layers
        certified = policy is not None and policy.threshold is not None
        self.points = list(policy.exit_points) if certified else []
        self.measure = policy.measure if policy is not None else None
        self.top_k = policy.vocab_top_k if certified and self.measure in HEAD_MEASURES else 0
        if isinstance(dynamic.lens, TunedLens):  # the graph stores (and a quantizer sees) the exits' translators only
            self.dynamic.lens = ExitTranslators(dynamic.lens, self.points)
        # Register the wrapped modules so their weights are parameters of the traced program.
        self.model = lm.model
        self.exit_heads = self.dynamic.lens if isinstance(self.dynamic.lens, nn.Module) else None
        self.classifier = dynamic.classifier

    # -- the step ---------------------------------------------------------------------
    # One `If` per segment between exit points (run it, or fill it by propagation). Checks
    # that read only the hidden state (classifier, saturation) cost a dot product, so they
    # run unconditionally and the exit's normalised state is kept with `Where`; a single
    # head call at the end serves both exits and full-depth tokens. Head-based checks cost a
    # head each, so they get their own `If`. Branches are flat, never nested per exit point:
    # torch.export retraces nested branches once per enclosing one (exponential).
    def forward(self, input_ids: torch.Tensor, threshold: torch.Tensor, *inputs: torch.Tensor):
        if self.buffered:  # the buffers' length is their capacity: `positions` says how much is filled
            positions, *past = inputs
            start = positions.shape[0] - input_ids.shape[1]
        else:
            past, start = inputs, inputs[0].shape[2]
        hidden = self.lm.embed_at(input_ids, start)
        deferred = self.lm.deferred_rotary() if self.rotary_in_attention else contextlib.nullcontext()
        with self.lm.traced_step(hidden, start), deferred:
            # once per step, in the main graph that every branch reads
            self.rotary = self.lm.rotary_tables(hidden, positions.shape[0]) if self.rotary_in_attention else None
            logits, exit_layer, exit_confidence, *present = self._step(hidden, threshold, past, start)
            self.rotary = None
        # What a stop rule scores: the max probability of the distribution the next token is picked from (the
        # torch runtime's own function). The order is the package format's (runtime/package_format.py: STEP_OUTPUTS).
        return (logits, exit_layer, exit_confidence, max_probability(logits), logits.argmax(dim=-1), *present)

    def _step(self, hidden, threshold, past, start):
        bounds = [0] + self.points + [self.num_layers]
        previous, hidden, present = self._layers(0, bounds[1], hidden, past[: 2 * bounds[1]], start)
        if not self.points:
            return (self.lm.logits_from(hidden[:, -1]), _scalar(self.num_layers, torch.int64), _scalar(-1.0, torch.float32)) + present
        batch = hidden.shape[0]
        head_check = self.measure in HEAD_MEASURES
        state = (
            torch.zeros((), dtype=torch.bool),  # done: the token has left
            _scalar(self.num_layers, torch.int64),  # exit layer
            _scalar(-1.0, torch.float32),  # exit confidence
            # what the head reads at the exit: its logits (head checks) or its normalised state
            hidden.new_zeros(batch, self.lm.vocab_size if head_check else self.lm.hidden_size),
        ) + ((torch.zeros(batch, self.top_k, dtype=torch.long),) if self.top_k else ())
        disabled = threshold > 1.0  # confidences are <= 1: no check passes (prefill, exits off)
        for row, depth in enumerate(self.points):
            if head_check:
                state = _cond(disabled | state[0], _keep, self._check_branch(row, depth), (hidden, previous, threshold) + state)
            else:
                state = self._state_check(row, depth, hidden, previous, threshold, state)
            end = bounds[row + 2]
            outputs = _cond(
                state[0],
                self._propagate_branch(depth, end, start),
                self._run_branch(depth, end, start),
                (hidden, previous) + tuple(past[2 * depth : 2 * end]),
            )
            hidden, previous = outputs[:2]
            present = present + tuple(outputs[2:])
        done, exit_layer, exit_confidence, exit_value = state[:4]
        if head_check:
            logits = _cond(
                done,
                lambda exit_logits, hidden: (exit_logits.clone(),),
                lambda exit_logits, hidden: (self.lm.logits_from(hidden[:, -1]),),
                (exit_value, hidden),
            )[0]
        else:
            logits = self.lm.head(torch.where(done, exit_value, self.lm.final_norm(hidden[:, -1])))
        return (logits, exit_layer, exit_confidence) + present

    def _state_check(self, row: int, depth: int, hidden, previous, threshold, state):
        """A check that needs no head, without a branch: it only takes effect if not done yet."""
        done, exit_layer, exit_confidence, exit_normed = state
        last = hidden[:, -1]
        confidence, _, _ = self.dynamic.check(row, depth, last, previous[:, -1], None)
        leave = ops.exit_gate(confidence, threshold) & ~done
        return (
            done | leave,
            torch.where(leave, depth, exit_layer),
            torch.where(leave, confidence.min().float(), exit_confidence),
            torch.where(leave, self.dynamic.normed(depth, last), exit_normed),
        )

    def _layers(self, first: int, last: int, hidden, past, start):
        """Layers [first, last) on `hidden`: (input of the last one, output, their present K/V)."""
        cache = self._cache(first, past, start, hidden.shape[1])
        previous = hidden
        for index in range(first, last):
            previous, hidden = hidden, self.lm.layer_at(index, hidden, start, cache)
        return previous, hidden, _flat(cache.present, first, last)

    def _cache(self, first: int, past, start, new: int):
        if self.buffered:
            return attention.BufferedCache.for_layers(first, past, start, new, self.rotary)
        return StepCache.for_layers(first, past)

    def _run_branch(self, first: int, last: int, start):
        def run(hidden, previous, *past):
            previous, out, present = self._layers(first, last, hidden, past, start)
            # A branch may not return its input itself (`previous` is the input for one layer).
            return (out.clone() if out is hidden else out, previous.clone()) + present

        return run

    def _propagate_branch(self, first: int, last: int, start):
        """The token left earlier: fill these layers' K/V from its exit hidden state (CALM)."""

        def propagate(hidden, previous, *past):
            cache = self._cache(first, past, start, hidden.shape[1])
            for index in range(first, last):
                self.lm.propagate(index, hidden, start, cache)
                if self.buffered and index in cache.pending:  # K/V computed, no attention run
                    cache.write(index)
            return (hidden.clone(), previous.clone()) + _flat(cache.present, first, last)

        return propagate

    def _check_branch(self, row: int, depth: int):
        """Confidence at exit point `row`; on a confident batch, the exit logits and done=True."""

        def check(hidden, previous, threshold, done, exit_layer, exit_confidence, exit_logits, *candidates):
            last = hidden[:, -1]
            confidence, logits, chosen = self.dynamic.check(
                row, depth, last, previous[:, -1], candidates[0] if candidates and row else None
            )
            leave = ops.exit_gate(confidence, threshold)

            def exit_head(last, old, *extra):
                # Cloned: with the full vocabulary the exit logits are the check's own, an input here.
                return (self.dynamic.exit_logits(depth, last, *_unpack(extra, logits, chosen)).clone(),)

            exit_logits = _cond(leave, exit_head, lambda last, old, *extra: (old.clone(),), (last, exit_logits) + _present(logits, chosen))[
                0
            ]
            kept = (chosen.clone(),) if self.top_k else ()
            return (
                leave.clone(),
                torch.where(leave, depth, exit_layer),
                torch.where(leave, confidence.min().float(), exit_confidence),
                exit_logits,
            ) + kept

        return check


def _present(*tensors) -> tuple:
    """torch.cond takes tensors only: optional pieces travel when they exist."""
    return tuple(t for t in tensors if t is not None)


def _unpack(extra: tuple, *optional) -> tuple:
    """Inverse of `_present`: put the traveling tensors back where the optional ones were not None."""
    extra = list(extra)
    return tuple(extra.pop(0) if t is not None else None for t in optional)


def _keep(hidden, previous, threshold, *state):
    return tuple(t.clone() for t in state)


def _cond(pred, true_fn, false_fn, operands):
    """torch.cond when tracing (an ONNX `If`); plain Python control flow when eager."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return tuple(torch.cond(pred, true_fn, false_fn, tuple(operands)))
    return tuple((true_fn if bool(pred) else false_fn)(*operands))


def _scalar(value, dtype) -> torch.Tensor:
    # A factory op, not a constant tensor: constants created inside cond branches break tracing.
    return torch.full((), value, dtype=dtype)


def _flat(present: dict, first: int, last: int) -> tuple:
    return tuple(t for index in range(first, last) for t in present[index])


def buffered_step_problem(dynamic: DynamicModel, geometry: list[tuple[int, int]]) -> str | None:
    """Why the buffered layout does not reproduce this model's step (None when it does): both layouts run
    eagerly on a prompt and three more steps, exits disabled, then every exit point forced (propagation), and
    their logits must agree. A family whose attention has a feature the contrib op lacks fails here."""
    return _buffered_differs(dynamic, geometry, rotary_in_attention=False)


def rotary_in_attention_problem(dynamic: DynamicModel, geometry: list[tuple[int, int]]) -> str | None:
    """Why the buffered step cannot leave the rotary embedding to its attention op (None when it can): the family
    has no rotary embedding, or one that does not cover the whole head, or ONNX Runtime's kernel cannot rotate heads
    of its size, or the step computed that way differs from the concatenated one (checked as `buffered_step_problem`)."""
    lm = dynamic.lm
    if lm.adapter.rotary_tables is None:
        return f"the {lm.family} family has no rotary embedding"
    sizes = sorted({dim for _, dim in geometry if dim % ROTARY_HEAD_MULTIPLE})
    if sizes:
        return f"ONNX Runtime's attention rotates heads of a multiple of {ROTARY_HEAD_MULTIPLE} dimensions only, not {sizes[0]}"
    with torch.no_grad():
        hidden = lm.embed_at(torch.zeros(1, 1, dtype=torch.long, device=lm.device), 0)
        if lm.rotary_tables(hidden, 1) is None:
            return "its rotary embedding does not cover the whole head (partial rotary)"
    return _buffered_differs(dynamic, geometry, rotary_in_attention=True)


ROTARY_HEAD_MULTIPLE = 16  # ONNX Runtime's GroupQueryAttention (CPU) refuses to rotate other head sizes


def _buffered_differs(dynamic: DynamicModel, geometry, rotary_in_attention: bool) -> str | None:
    """Why the buffered step (with the rotary in its attention op or not) does not reproduce the concatenated one, or None."""
    lm = dynamic.lm
    generator = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, lm.vocab_size, (1, n), generator=generator).to(lm.device) for n in (5, 1, 2, 1)]
    logits = {}
    for name, step_layout, rotary in (("reference", "concat", False), ("candidate", "buffer", rotary_in_attention)):
        step = DynamicStep(dynamic, step_layout, rotary).eval()
        try:
            with torch.no_grad(), step_attention(lm, step_layout):
                logits[name] = [_eager_steps(step, lm, steps, geometry, threshold) for threshold in (2.0, -1.0)]
        except (attention.UnsupportedAttention, DyninferError) as exc:
            return str(exc)
    difference = max(float((a - b).abs().max()) for runs in zip(*logits.values()) for a, b in zip(*runs))
    return None if difference <= 1e-4 else f"its logits differ from the concatenated cache's by {difference:.2g}"


def _eager_steps(step: DynamicStep, lm: LayeredModel, steps: list, geometry, threshold: float) -> list:
    dtype = next(lm.model.parameters()).dtype
    capacity = sum(ids.shape[1] for ids in steps) if step.buffered else 0
    past = [torch.zeros(1, heads, capacity, dim, dtype=dtype, device=lm.device) for heads, dim in geometry for _ in range(2)]
    filled, logits = 0, []
    for ids in steps:
        filled += ids.shape[1]
        positions = (torch.arange(filled, device=lm.device),) if step.buffered else ()
        out = step(ids, torch.tensor(threshold, device=lm.device), *positions, *past)
        logits.append(out[0].float())
        past = list(out[5:])
    return logits
