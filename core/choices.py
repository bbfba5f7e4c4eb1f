"""The values dyninfer's options take, declared once and importable without torch.

The jobs' Configs (jobs/configs/, one module per command) validate against these, and the CLI builds its `--help`
from those Configs without loading torch; the modules that act on a value import it from here.
"""

from __future__ import annotations

# --- what to load
DEFAULT_MODEL = "default"  # the bundled SmolLM2-135M-Instruct
DEFAULT_DATA = "builtin:pydocs"
BUILTIN_COT = "builtin:arithmetic"  # chain-of-thought problems for steering and reasoning stop rules
BUILTIN_CODE = "builtin:stdlib-code"  # the standard library's source: completion stop rules' default corpus

# --- where and how it runs (core/placement.py)
MODEL_DTYPES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *MODEL_DTYPES)

# --- exit heads and confidence (core/lenses.py, early_exit/confidence.py)
LOGIT = "logit"
TUNED = "tuned"
LENS_KINDS = (LOGIT, TUNED)
HEAD_MEASURES = ("softmax", "margin", "entropy")  # need the exit head's logits
STATE_MEASURES = ("saturation", "classifier")  # read the hidden state only
MEASURES = HEAD_MEASURES + STATE_MEASURES

# --- what early exit certifies (core/policies.py, early_exit/certify.py, certification/)
# generation: 1 - consistency of the dynamic model's own greedy continuation of a prompt with the full
# model's. The teacher-forced risks simulate exits on the full model's hidden states along the text:
# cheaper, and optimistic for what generation ships.
GENERATION_RISK = "generation"
# fidelity: the share of positions where the dynamic model (or a package), fed the full model's own continuation,
# picks another top-1 token than the full model on the same context (certification/fidelity.py)
FIDELITY_RISK = "fidelity"
TOP1 = "top1"  # the fidelity risk's measure: same top-1 as the original model
PROMPT_RISKS = (GENERATION_RISK, FIDELITY_RISK)  # certified on prompts and the full model's continuations of them
TEACHER_FORCED_RISKS = ("teacher-forced-consistency", "teacher-forced-accuracy-drop")
RISKS = (*PROMPT_RISKS, *TEACHER_FORCED_RISKS)
PACKAGE_RISKS = (FIDELITY_RISK, GENERATION_RISK)  # the risks a package can be certified on
# How the dynamic model fills the caches of layers a token skipped: CALM state propagation, or a
# recompute when a later token needs them.
KV_MODES = ("propagate", "recompute")
CONSISTENCY_MEASURES = ("tokens", "prefix", "rougeL")  # core/consistency.py
# Where calibrate's per-layer costs come from. auto: the latency a `profile` measured on the artifact
# when there is one, else FLOPs.
COST_SOURCES = ("auto", "flops", "measured")

# --- running it (runtime/decoding.py, runtime/dynamic.py, runtime/onnx_decoder.py)
FULL, EARLY_EXIT, SPECULATIVE = "full", "early-exit", "speculative"
RUN_MODES = (FULL, EARLY_EXIT, SPECULATIVE)
PACKAGE_RUN_MODES = (EARLY_EXIT, FULL)  # an exported package has no self-speculation
RUN_BACKENDS = ("torch", "onnx")
# ONNX Runtime's execution provider for each `provider` value (a package runs the first it can start)
PROVIDER_NAMES = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
ONNX_PROVIDERS = tuple(PROVIDER_NAMES)
EXPORT_DTYPES = ("fp32", "fp16")
# How a package's step takes its KV cache (runtime/package_format.py): "concat", past and new concatenated each
# step; "buffer", one preallocated buffer a layer that ONNX Runtime writes in place.
KV_LAYOUTS = ("concat", "buffer")
# auto: the buffers wherever they reproduce the model's step, else the concatenated cache; buffer refuses a model
# they do not fit
EXPORT_KV_LAYOUTS = ("auto", *reversed(KV_LAYOUTS))
# full: the weights in the graph's dtype; int8/int4: weight-only MatMulNBits, round to nearest; source: a quantized GGUF
# source's own blocks carried into MatMulNBits (exporters/source_blocks.py)
EXPORT_WEIGHTS = ("full", "int8", "int4", "source")
# auto (weights chosen by certification): the fastest of a fixed candidate list that certifies (exporters/weights_choice.py)
AUTO_WEIGHTS = "auto"
EXPORT_WEIGHT_CHOICES = (*EXPORT_WEIGHTS, AUTO_WEIGHTS)

# --- pruning (compressors/pruning.py)
PRUNE_METHODS = ("threshold", "predictor")
PRUNE_ALLOCATIONS = ("uniform", "greedy")
PRUNE_LABELS = ("topk", "mass")
PRUNE_BACKENDS = ("auto", "cpu", "triton", "reference", "masked")

# --- steering (compressors/steering.py, compressors/steer_extract.py)
STEER_METHODS = ("activation", "valve")
STEER_KINDS = ("mean", "pca")

# --- tune-exits (compressors/exit_tuning.py)
CURRICULA = ("rotational", "gradual", "all")
EXIT_TARGETS = ("teacher", "labels")
DEPTH_WEIGHTINGS = ("quadratic", "linear", "uniform")

# --- stop rules (core/policies.py, compressors/stop_*.py)
COMPLETION, REASONING = "completion", "reasoning"
STOP_WORKLOADS = (COMPLETION, REASONING)  # what a stop rule stops: corpus completions, or chains of thought
# What each workload's rule scores: a completion token's max probability or the product up to it (prefix); a
# reasoning probe's confidence, or the same only when its answer repeats the previous probe's (stable)
STOP_SIGNALS = {COMPLETION: ("confidence", "prefix"), REASONING: ("confidence", "stable")}
STOP_VALUE_UNITS = ("tokens", "characters", "lines")  # a completion's value: its prefix matching the real text
STOP_CONDITIONS = ("valued", "all")  # which units a stop guarantee is about: those with something to lose, or all
STOP_MODES = (FULL, EARLY_EXIT)  # the generation a stop rule is certified on (greedy, one prompt at a time)
# where a reasoning rule probes: every sentence end, or line ends only
STOP_PROBE_SITES = ("sentences", "lines")
