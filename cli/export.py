"""`dyninfer export`: ship the calibrated dynamic model as an ONNX Runtime package."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from dyninfer.cli import options as opt
from dyninfer.cli.output import handle_errors, notes, print_json, progress_reporter, stdout, writing
from dyninfer.jobs.configs import ExportConfig

DEFAULTS = ExportConfig()

HELP = """Export the dynamic model as an ONNX Runtime package, exits and custom exit ops included.

The graph is one decoding step with KV cache (inputs past_key_values.{i}.key/value, outputs present.{i}.key/value, like optimum), with the calibrated exits as real `If` branches that skip the deeper layers and each exit decision as an `ai.dyninfer.ExitGate` custom-op node defined as an ONNX function, so stock ONNX Runtime runs it on any execution provider.

The package goes to ARTIFACT/onnx/ (or --out): model.onnx + model.onnx.data, the tokenizer, dyninfer-onnx.json, and baseline/ (the plain model exported by optimum, for `bench --backend onnx`). It is verified against the torch dynamic model before it replaces anything. --weights int8|int4 then quantizes the weights of every projection (and the head) with ONNX Runtime's MatMulNBits (CPU and CUDA kernels), and the baseline the same way; how far that moved the logits is reported. --weights source (a model loaded from a quantized GGUF) carries the GGUF's own Q4_0/Q4_1/Q8_0 blocks into the same kernel instead of rounding its dequantized weights again: far closer to the source, somewhat slower. --weights auto (with --certify) builds a fixed list of candidates (source when the model came from a GGUF, int8, int4), times each on this machine, and ships the fastest whose fidelity certifies: one fixed-sequence test along the candidates, slowest first, then the exit thresholds on the last, so choosing spends no part of the guarantee.

The graph runs ONNX Runtime's fused kernels where the model allows (as onnxruntime-genai's builder emits them): RMSNorm as SimplifiedLayerNormalization, the residual add with it as SkipSimplifiedLayerNormalization, sibling projections (q/k/v, gate/up) as one MatMul, and the rotary embedding inside the attention op; the manifest's `fusions` and notes say what was fused and what stays plain ops.

The manifest carries the bound the package ships with. By default it is calibration's, computed on the torch model: for a quantized or fp16 package that is another graph, and every report says so. --certify certifies the package itself on calibration's prompts (needs a calibration with the generation or fidelity risk, which caches the original model's continuations), through ONNX Runtime, batch 1, with Learn-then-Test along calibration's candidate thresholds, exits disabled first. --certify-risk fidelity (the default) feeds the package the original model's continuation and certifies the share of positions keeping its top-1 token (with --kl-tau, also KL <= tau), the measure llama.cpp's --kl-divergence reports; same top-1, mean and 99th-percentile KL and the perplexity ratio are reported beside it. --certify-risk generation certifies the package's free-running greedy tokens instead (strict: one early difference changes every later token). The threshold it certifies becomes the package's. It decodes every calibration prompt once per setting tried (on 2 CPU cores, 128 prompts of 64 tokens: about a minute a setting for an int4 package of the bundled model). --target and --epsilon set the bound to certify (default: the calibration's): a quantized graph may keep less consistency with the original model than the torch policy was certified for. --accuracy-level sets MatMulNBits' CPU compute precision (default 4, int8 activations: the fast int4 path on CPUs; CUDA ignores it).

KV cache: by default (--kv-layout auto) each layer's past is one preallocated buffer that the step's attention (ONNX Runtime's GroupQueryAttention, one node a layer) writes the new positions into in place; the runtime binds it as both input and output, so no step copies the cache, and a greedy step brings back the token (the graph's next_token), not the logits. It is used wherever it reproduces the model's step (checked before export on every family); otherwise, and for fp32 on CUDA (whose kernel is fp16/bf16 only), the package concatenates past and new K/V each step, as optimum's does, and says why. --kv-layout buffer refuses a model it does not fit; concat forces the old layout.

Examples:

    dyninfer export audit/                            (CPU, fp32, with the optimum baseline)

    dyninfer export audit/ --provider cuda --dtype fp16 --out audit-gpu/    (on a GPU machine; --no-verify builds it elsewhere)

    dyninfer export audit/ --weights int4 --out audit-int4/      (weight-only int4, blocks of 32; the baseline quantized alike)

    dyninfer export audit/ --weights int4 --certify --out audit-int4/   (and certify the int4 package on its own continuations)

    dyninfer export audit/ --weights auto --certify --target 0.9 --out audit-auto/   (the fastest weights whose same top-1 certifies at 0.9)

    dyninfer export audit/ --no-baseline --json
"""  # noqa: E501 (help paragraphs are one line each: Typer keeps line breaks)


@handle_errors
def export(
    artifact: opt.ArtifactDir,
    out: opt.out_dir("Package directory (default: ARTIFACT/onnx).") = None,
    provider: Annotated[str, typer.Option("--provider", help="Execution provider the package is for: cuda or cpu.")] = DEFAULTS.provider,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, or fp16 (CUDA only).")] = DEFAULTS.dtype,
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            help="full (in --dtype), int8/int4 weight-only quantization (MatMulNBits; the baseline's too), source (a GGUF's own "
            "blocks), or auto (with --certify: the fastest candidate that certifies).",
        ),
    ] = DEFAULTS.weights,
    block_size: Annotated[int, typer.Option("--block-size", help="int8/int4: weights per quantization scale.")] = DEFAULTS.block_size,
    accuracy_level: Annotated[
        int,
        typer.Option("--accuracy-level", help="int8/int4: MatMulNBits' CPU compute precision: 0 input's, 1 fp32, 2 fp16, 3 bf16, 4 int8."),
    ] = DEFAULTS.accuracy_level,
    model: opt.ModelOverride = DEFAULTS.model,
    kv_mode: Annotated[
        str | None, typer.Option("--kv-mode", help="Override the policy's KV mode (the graph implements propagate).")
    ] = DEFAULTS.kv_mode,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also export the plain model through optimum.")
    ] = DEFAULTS.baseline,
    verify: Annotated[
        bool, typer.Option("--verify/--no-verify", help="Check the package against torch on this machine's provider.")
    ] = DEFAULTS.verify,
    certify: Annotated[
        bool,
        typer.Option("--certify/--no-certify", help="Certify the package itself (its ONNX Runtime continuations vs the original model)."),
    ] = DEFAULTS.certify,
    target: Annotated[
        float | None, typer.Option("--target", help="--certify: the consistency to certify (default: the calibration's).")
    ] = DEFAULTS.target,
    epsilon: Annotated[
        float | None, typer.Option("--epsilon", help="--certify: the error probability (default: the calibration's).")
    ] = DEFAULTS.epsilon,
    certify_risk: Annotated[
        str,
        typer.Option(
            "--certify-risk",
            help="--certify: fidelity (the package fed the original model's continuations keeps its top-1 token) or generation "
            "(its free-running greedy tokens match).",
        ),
    ] = DEFAULTS.certify_risk,
    kl_tau: Annotated[
        float | None,
        typer.Option("--kl-tau", help="--certify fidelity: also certify the share of positions with KL(original || package) <= this."),
    ] = DEFAULTS.kl_tau,
    kv_layout: Annotated[
        str,
        typer.Option("--kv-layout", help="auto, buffer (preallocated KV, updated in place) or concat (past and new joined each step)."),
    ] = DEFAULTS.kv_layout,
    as_json: opt.Json = False,
) -> None:
    from dyninfer.jobs import export as job

    config = opt.config_from(ExportConfig, locals())
    # The package is written into the artifact (or --out): the artifact, or --out, is this command's meanwhile.
    with writing(out if out is not None else artifact), progress_reporter() as progress:
        result = job.run(config, artifact, progress=progress)
    if as_json:
        print_json({"command": "export", **result.to_dict()})
        return
    nodes = ", ".join(f"{count}× {name}" for name, count in result.custom_nodes.items()) or "none (no exits)"
    stdout.print(f"[bold]Exported[/] {escape(str(result.path))} ({result.dtype}, for {result.provider}) in {result.seconds:.0f} s")
    stdout.print(
        f"exits after layers {result.exit_points} of {result.num_layers}, threshold "
        f"{result.threshold}, KV of skipped layers: {result.kv_mode}"
    )
    stdout.print(f"custom ops (ai.dyninfer): {nodes}; model {result.model_bytes / 1e6:.0f} MB; KV cache: {result.kv_layout}")
    if result.verify_max_abs_diff is not None:
        stdout.print(f"verified against torch: max |logit difference| {result.verify_max_abs_diff:.2g}")
    if result.weights is not None:
        moved = "" if result.quantized_max_abs_diff is None else f"; logits moved by up to {result.quantized_max_abs_diff:.2g}"
        stdout.print(
            f"weights: {result.weights['format']} in blocks of {result.weights['block_size']}, "
            f"accuracy level {result.weights['accuracy_level']} "
            f"({result.weights['quantized_matmuls']} MatMuls quantized{moved})"
        )
    for candidate in result.weights_candidates:
        stdout.print(f"weight candidate {candidate['weights']}: {candidate['decode_tokens_per_s']:.1f} decode tok/s")
    if result.certificate is not None:
        stdout.print(f"bound: {escape(result.certificate['statement'])}")
    if result.baseline:
        stdout.print(f"optimum baseline: {result.baseline}")
    notes(result.notes)
