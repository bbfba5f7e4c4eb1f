"""Options shared by several commands, declared once (the `hf` CLI's `_cli_utils` pattern).

Each alias is `Annotated[type, typer.Option(...)]`; a command gives it its default from its job's
Config dataclass (`DEFAULTS.field`), so every default lives in one place. A command's parameters
carry the names of its Config's fields, so `config_from` builds the Config from them, and an
error that names a field (`fit_tokens`) shows the command's flag (`--fit-tokens`).
"""

import dataclasses
from pathlib import Path
from typing import Annotated

import typer


class Numbers(tuple):
    """A comma-separated list of numbers given as one option value ("0.9,0.99")."""


def _numbers(kind: type, example: str):
    def parse(value) -> Numbers:
        if isinstance(value, (tuple, list)):  # a default, already parsed
            return Numbers(value)
        try:
            return Numbers(kind(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            raise typer.BadParameter(f"takes comma-separated numbers like {example}, got '{value}'") from None

    return parse


def names(value) -> Numbers:
    """A comma-separated list of names ("q_proj,v_proj")."""
    if isinstance(value, (tuple, list)):
        return Numbers(value)
    return Numbers(v.strip() for v in str(value).split(",") if v.strip())


floats = _numbers(float, "0.25,0.4,0.5")
ints = _numbers(int, "12,15")

# --------------------------------------------------------------------------- what to load

Model = Annotated[
    str, typer.Argument(help="`default` (the bundled SmolLM2-135M-Instruct), a Hugging Face model dir, a .gguf file or a hub id.")
]
ArtifactDir = Annotated[Path, typer.Argument(help="An artifact dir made by `dyninfer calibrate --out` (or another command's --out).")]
ModelOverride = Annotated[
    str | None, typer.Option("--model", help="Load the base model from here instead of the artifact's spec (same weights).")
]
Data = Annotated[
    str,
    typer.Option(
        "--data", "-d", help="Text: builtin:pydocs, builtin:stdlib-code, a .txt/.jsonl/.parquet/.csv file, or hf:NAME[:CONFIG][:SPLIT]."
    ),
]
TextField = Annotated[str | None, typer.Option("--field", help="Text field/column of .jsonl/.parquet/.csv/hf data (default: text).")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens of context per window.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed for the data split, sampling and training.")]
Device = Annotated[
    str, typer.Option("--device", help="Where the model runs: auto (cuda when torch sees a GPU, else cpu), cpu, cuda or cuda:N.")
]
DeviceMap = Annotated[
    str | None,
    typer.Option(
        "--device-map",
        help="auto: spread a model too big for one device over the GPUs, the CPU and the disk "
        "(accelerate's device map; --device stays auto).",
    ),
]
MaxMemory = Annotated[
    str | None,
    typer.Option(
        "--max-memory",
        help="With --device-map auto: memory per device, like 0=70GiB,1=70GiB,cpu=200GiB,disk=1TiB "
        "(without disk=, nothing is offloaded to disk).",
    ),
]
Dtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="The model's precision: auto (the checkpoint's own dtype on CUDA, float32 on the CPU), float32, "
        "bfloat16 or float16. Statistics and trained heads stay float32.",
    ),
]

# --------------------------------------------------------------------------- output

Json = Annotated[bool, typer.Option("--json", help="Print the machine-readable summary on stdout and nothing else.")]


def out_dir(help: str):
    """The --out option, with a command's own help text."""
    return Annotated[Path | None, typer.Option("--out", "-o", help=help)]


# --------------------------------------------------------------------------- lenses and calibration

LensKind = Annotated[
    str, typer.Option("--lens", "-l", help="Exit head: tuned (reused from the artifact or --lens-from, else trained) or logit.")
]
LensTrainTokens = Annotated[int, typer.Option("--lens-train-tokens", help="Train-split tokens if a tuned lens must be trained.")]
LensSteps = Annotated[int, typer.Option("--lens-steps", help="KL refinement steps if a tuned lens must be trained.")]
LensFrom = Annotated[Path | None, typer.Option("--lens-from", help="Take the tuned lens from this artifact.")]
Target = Annotated[float, typer.Option("--target", "-t", help="Required token consistency with the full model (or 1 - accuracy drop).")]
Targets = Annotated[
    Numbers,
    typer.Option(
        "--targets",
        parser=floats,
        metavar="X,Y",
        help="More targets to calibrate on the same traces (reported; the artifact keeps --target's policy).",
    ),
]
Epsilon = Annotated[float, typer.Option("--epsilon", "-e", help="Allowed probability that the guarantee fails.")]
Measure = Annotated[
    str,
    typer.Option(
        "--measure",
        "-m",
        help="Exit confidence: classifier (CALM's meta classifier on the hidden state: cheap), "
        "softmax, margin, entropy (these need the LM head at each check) or saturation.",
    ),
]
FitTokens = Annotated[int, typer.Option("--fit-tokens", help="Train-split tokens to choose exit points and fit the classifier.")]
CalibrationTokens = Annotated[int, typer.Option("--calibration-tokens", help="Train-split tokens for the test (LTT, or thresholds).")]
HeldoutTokens = Annotated[int, typer.Option("--heldout-tokens", help="Held-out tokens that report achieved quality.")]
Risk = Annotated[
    str,
    typer.Option(
        "--risk",
        help="What LTT certifies: generation (the dynamic model's own greedy continuations against the full "
        "model's), fidelity (fed the full model's continuations, the share of positions with its top-1 token), "
        "teacher-forced-consistency or teacher-forced-accuracy-drop (simulated exits).",
    ),
]
CalibrationPrompts = Annotated[
    int, typer.Option("--prompts", help="Generation risk: calibration prompts, one per random train window (LTT's examples).")
]
HeldoutPrompts = Annotated[
    int, typer.Option("--heldout-prompts", help="Generation risk: held-out prompts that report the achieved consistency.")
]
Consistency = Annotated[
    str,
    typer.Option(
        "--consistency",
        help="Generation risk: tokens (share of equal positions), prefix (common prefix over the "
        "length) or rougeL consistency with the full model's continuation.",
    ),
]
KvMode = Annotated[str | None, typer.Option("--kv-mode", help="KV of skipped layers: propagate (CALM state propagation) or recompute.")]

# --------------------------------------------------------------------------- generation

Prompts = Annotated[int, typer.Option("--prompts", help="Held-out prompts.")]
PromptTokens = Annotated[int, typer.Option("--prompt-tokens", help="Tokens per prompt.")]
NewTokens = Annotated[int, typer.Option("--new-tokens", help="Tokens generated per prompt.")]
DraftLayer = Annotated[
    int | None, typer.Option("--draft-layer", help="Speculative mode: draft with the exit after this layer (default: 70% of the depth).")
]
DraftThreshold = Annotated[
    float, typer.Option("--draft-threshold", help="Speculative mode: keep drafting while the draft's max probability is at least this.")
]
Provider = Annotated[
    str | None,
    typer.Option("--provider", help="ONNX Runtime execution provider: cuda or cpu (default: the package's; CUDA falls back to CPU)."),
]
EnergySeconds = Annotated[
    float, typer.Option("--energy-seconds", help="Length of each GPU energy window (NVML's counter updates every 20-100 ms).")
]

# --------------------------------------------------------------------------- CI gates

MinSpeedup = Annotated[float | None, typer.Option("--min-speedup", help="Gate: a speedup of at least this.")]
MinConsistency = Annotated[
    float | None, typer.Option("--min-consistency", help="Gate: a held-out token consistency of at least this (0-1).")
]


def config_from(config_class, values: dict, *, base=None, **overrides):
    """`config_class` built from a command's parameters (those named like its fields) and `overrides`; with
    `base` (an instance), the fields no parameter names keep `base`'s values.

    Paths become strings and comma lists tuples, the types the library's Configs hold.
    """
    kwargs = {}
    for f in dataclasses.fields(config_class):
        if f.name in overrides:
            kwargs[f.name] = overrides[f.name]
        elif f.name in values:
            value = values[f.name]
            kwargs[f.name] = str(value) if isinstance(value, Path) else tuple(value) if isinstance(value, Numbers) else value
    return dataclasses.replace(base, **kwargs) if base is not None else config_class(**kwargs)
