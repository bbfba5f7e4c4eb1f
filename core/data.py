"""Text corpora and the fixed token windows every measurement runs on.

A *data spec* names a corpus:

- ``builtin:pydocs``: Python's own documentation (``pydoc_data.topics``), shipped with
  every Python, so the default needs no download.
- ``builtin:stdlib-code``: a deterministic ~3 MB sample of the standard-library source,
  a code-completion corpus.
- a local ``.txt`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file.
- ``hf:NAME[:CONFIG][:SPLIT]``: anything ``datasets.load_dataset`` understands (a hub id
  or a local folder of data files).

`load_texts` turns a spec into documents; `make_windows` tokenises them into one
stream and cuts it into equal windows with a seeded, reproducible train/heldout split.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from dyninfer.core.errors import DyninferError

BUILTIN_CORPORA = ("pydocs", "stdlib-code")
SUPPORTED_FILE_TYPES = (".txt", ".jsonl", ".parquet", ".csv")
DEFAULT_FIELD = "text"

# The stdlib-code sample stops once it reaches this many characters: enough text for
# stable statistics, small enough to read and tokenise in seconds.
STDLIB_CODE_TARGET_CHARS = 3_000_000
STDLIB_CODE_SHUFFLE_SEED = 0
# Folders that hold tests, test data, installed third-party packages or the docs corpus
# (pydoc_data/topics.py is the pydocs text wrapped in a dict, not representative code).
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data"})

_SPEC_HELP = "pass builtin:pydocs, builtin:stdlib-code, a .txt/.jsonl/.parquet/.csv file or hf:NAME[:CONFIG][:SPLIT]"


# --------------------------------------------------------------------------- texts


def load_texts(spec: str, field: str | None = None) -> list[str]:
    """Documents (non-empty strings) for a data spec.

    `field` names the text field/column of .jsonl, .parquet, .csv and hf: data
    (default "text"); other kinds of data ignore it.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DyninferError(f"the data spec is empty; {_SPEC_HELP}")
    spec = spec.strip()
    if spec.startswith("builtin:"):
        texts = _load_builtin(spec[len("builtin:") :])
    elif spec.startswith("hf:"):
        texts = _load_hf(spec, field or DEFAULT_FIELD)
    else:
        texts = _load_file(spec, field or DEFAULT_FIELD)
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise DyninferError(f"data '{spec}' contains no text (every document is empty); {_SPEC_HELP}")
    return texts


def _load_builtin(name: str) -> list[str]:
    if name == "pydocs":
        from pydoc_data.topics import topics

        return [topics[key] for key in sorted(topics)]
    if name == "stdlib-code":
        return list(_stdlib_code_documents())
    raise DyninferError(f"unknown builtin corpus '{name}'; use one of: " + ", ".join(f"builtin:{corpus}" for corpus in BUILTIN_CORPORA))


def stdlib_code_files() -> list[Path]:
    """Every eligible standard-library ``.py`` file, sorted by path relative to the stdlib."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        # Pruning in place keeps os.walk out of site-packages (can be huge) and test trees.
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS)
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(stdlib).as_posix())


@functools.lru_cache(maxsize=1)
def _stdlib_code_documents() -> tuple[str, ...]:
    files = stdlib_code_files()
    random.Random(STDLIB_CODE_SHUFFLE_SEED).shuffle(files)
    documents: list[str] = []
    total_chars = 0
    for path in files:
        if total_chars >= STDLIB_CODE_TARGET_CHARS:
            break
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few stdlib files are latin-1 test fixtures or unreadable
        if not text.strip():
            continue  # empty __init__.py files carry no code
        documents.append(text)
        total_chars += len(text)
    if not documents:
        raise DyninferError(
            f"found no readable Python source under '{sysconfig.get_paths()['stdlib']}'; use `data` builtin:pydocs or a local file"
        )
    return tuple(documents)


def _load_file(spec: str, field: str) -> list[str]:
    path = Path(spec).expanduser()
    if not path.exists():
        raise DyninferError(f"data file '{spec}' does not exist; {_SPEC_HELP}")
    if path.is_dir():
        raise DyninferError(f"data path '{spec}' is a directory; pass one file, or hf:{spec} to load the folder with `datasets`")
    if not path.is_file():  # a FIFO would block the read, a device never ends
        raise DyninferError(f"data path '{spec}' is not a regular file (a pipe, device or socket); save the data to a file and pass that")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = _read_utf8(path, spec)
        if not text.strip():
            raise DyninferError(f"data file '{spec}' is empty; put text in it or pass another file")
        return [text]
    if suffix == ".jsonl":
        return _load_jsonl(path, spec, field)
    if suffix in (".parquet", ".csv"):
        return _load_table(path, spec, field, suffix)
    raise DyninferError(
        f"data file '{spec}' has unsupported type '{path.suffix or '(no extension)'}'; use one of: {', '.join(SUPPORTED_FILE_TYPES)}"
    )


def _read_utf8(path: Path, spec: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark, as some editors write, is not text
    except UnicodeDecodeError as exc:
        raise DyninferError(f"data file '{spec}' is not valid UTF-8 (byte {exc.start}); re-save it as UTF-8") from exc


def _load_jsonl(path: Path, spec: str, field: str) -> list[str]:
    texts: list[str] = []
    for line_number, line in enumerate(_read_utf8(path, spec).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DyninferError(
                f"data file '{spec}' line {line_number} is not valid JSON ({exc.msg}); each line must be one JSON object"
            ) from exc
        if not isinstance(record, dict):
            raise DyninferError(
                f"data file '{spec}' line {line_number} is a JSON {type(record).__name__}, not an object; each line must be one JSON object"
            )
        if field not in record:
            present = ", ".join(sorted(record)) or "(none)"
            raise DyninferError(f"data file '{spec}' has no field '{field}' on line {line_number}; pass `field` with one of: {present}")
        texts.append(_as_text(record[field], f"data file '{spec}' line {line_number} field '{field}'"))
    return texts


def _load_table(path: Path, spec: str, field: str, suffix: str) -> list[str]:
    import pandas as pd

    try:
        if suffix == ".csv":
            # Read every cell as a string so numbers stay verbatim and blanks become "".
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except (ValueError, OSError, pd.errors.ParserError) as exc:
        reason = _short_reason(exc)
        raise DyninferError(f"could not read data file '{spec}': {reason}; check that it is a valid {suffix[1:]} file") from exc
    if field not in frame.columns:
        columns = ", ".join(str(column) for column in frame.columns) or "(none)"
        raise DyninferError(f"data file '{spec}' has no column '{field}'; pass `field` with one of: {columns}")
    return [_as_text(value, f"data file '{spec}' row {row} column '{field}'") for row, value in enumerate(frame[field].tolist())]


def _load_hf(spec: str, field: str) -> list[str]:
    name, config, split = _parse_hf_spec(spec)
    try:
        import datasets

        dataset = datasets.load_dataset(name, config, split=split)
    except Exception as exc:
        raise DyninferError(
            f"could not load dataset '{spec}' ({type(exc).__name__}: {_short_reason(exc)}); "
            "this machine may be offline: pass a local .txt/.jsonl/.parquet/.csv file instead"
        ) from exc
    columns = list(dataset.column_names)
    if field not in columns:
        raise DyninferError(f"dataset '{spec}' has no column '{field}'; pass `field` with one of: {', '.join(columns) or '(none)'}")
    return [_as_text(value, f"dataset '{spec}' row {row} column '{field}'") for row, value in enumerate(dataset[field])]


def _parse_hf_spec(spec: str) -> tuple[str, str | None, str]:
    parts = spec[len("hf:") :].split(":")
    if len(parts) > 3 or not parts[0]:
        raise DyninferError(f"bad dataset spec '{spec}'; write hf:NAME, hf:NAME:CONFIG or hf:NAME:CONFIG:SPLIT")
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return name, config, split


def _as_text(value, where: str) -> str:
    """A document from one field; missing values count as empty (dropped later)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if not isinstance(value, str):
        raise DyninferError(f"{where} holds a {type(value).__name__}, not text; pass `field` naming a text field")
    return value


def _short_reason(exc: BaseException, limit: int = 200) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = lines[0] if lines else "no details"
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


# --------------------------------------------------------------------------- windows


@dataclass
class TokenWindows:
    """Equal-length token windows of one corpus, split into train and heldout.

    Each window holds seq_len + 1 tokens, i.e. seq_len next-token predictions. "Tokens"
    in `take` and `describe` count predictions, the unit of every `*_tokens` option.
    """

    spec: str
    seq_len: int
    seed: int
    heldout_fraction: float
    train: torch.Tensor  # int64 [n_train_windows, seq_len + 1]
    heldout: torch.Tensor  # int64 [n_heldout_windows, seq_len + 1]
    total_tokens: int  # tokens in the tokenised corpus before windowing
    # Each window's place in the corpus (window k holds stream tokens [k * stride, (k + 1) * stride)).
    train_index: torch.Tensor | None = None
    heldout_index: torch.Tensor | None = None
    # The tokens the model's tokenizer starts every sequence with (a BOS), which start every window too.
    sequence_start: tuple[int, ...] = ()

    @property
    def stride(self) -> int:
        """Corpus tokens per window: seq_len + 1, less the sequence-start tokens put before them."""
        return self.seq_len + 1 - len(self.sequence_start)

    def split(self, split: str) -> torch.Tensor:
        if split == "train":
            return self.train
        if split == "heldout":
            return self.heldout
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")

    def index(self, split: str) -> torch.Tensor:
        """The corpus position of each window of `split` (see `train_index`)."""
        index = self.train_index if split == "train" else self.heldout_index
        return index if index is not None else torch.arange(self.split(split).shape[0])

    def order(self, split: str) -> torch.Tensor:
        """Row numbers of `split` in a seeded random order: every draw from a split takes a prefix of it,
        so what one stage draws is a random sample of the whole corpus, not its first pages."""
        rows = self.split(split).shape[0]
        salt = 1 if split == "train" else 2  # independent of the train/heldout split's own permutation
        return torch.randperm(rows, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + salt))

    def take(self, split: str, n_tokens: int, option: str = "tokens") -> torch.Tensor:
        """ceil(n_tokens / seq_len) windows of `split` ("train" or "heldout"): the first ones of its random `order`.

        `option` names the config field that asked for `n_tokens`, for the error.
        """
        return self.split(split)[self.take_rows(split, n_tokens, option)]

    def take_rows(self, split: str, n_tokens: int, option: str = "tokens") -> torch.Tensor:
        """The row numbers `take` returns."""
        windows = self.split(split)
        if n_tokens < 1:
            raise DyninferError(f"the number of tokens must be at least 1, got {n_tokens}; pass a positive `{option}`")
        available = windows.shape[0] * self.seq_len
        if n_tokens > available:
            raise DyninferError(
                f"the {split} split of data '{self.spec}' has {available} tokens "
                f"({windows.shape[0]} windows of {self.seq_len}) but {n_tokens} were asked for; "
                f"lower `{option}`, use a shorter `seq_len` or more data"
            )
        return self.order(split)[: math.ceil(n_tokens / self.seq_len)]

    def describe(self) -> dict:
        """JSON-able summary; *_tokens count predictions (windows * seq_len)."""
        return {
            "spec": self.spec,
            "seq_len": self.seq_len,
            "seed": self.seed,
            "heldout_fraction": self.heldout_fraction,
            "train_windows": int(self.train.shape[0]),
            "heldout_windows": int(self.heldout.shape[0]),
            "train_tokens": int(self.train.shape[0]) * self.seq_len,
            "heldout_tokens": int(self.heldout.shape[0]) * self.seq_len,
            "total_tokens": self.total_tokens,
            "sequence_start": list(self.sequence_start),
        }


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """All documents tokenised and joined, separated by the EOS token when there is one."""
    separator = tokenizer.eos_token_id
    stream: list[int] = []
    for index, text in enumerate(texts):
        if index and separator is not None:
            stream.append(separator)
        # verbose=False: documents longer than the model's context are expected here
        # (we cut windows ourselves), so the "sequence too long" warning is noise.
        stream.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    return stream


def sequence_start(tokenizer) -> tuple[int, ...]:
    """The tokens `tokenizer` puts before any text (Llama's, Gemma's BOS; nothing for GPT-2 or SmolLM2).

    Models trained with a BOS degrade badly without one, so every window starts as the tokenizer
    starts a sequence.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if plain and full[start : start + len(plain)] == plain:
            return tuple(full[:start])
    return ()


def make_windows(
    texts: list[str],
    tokenizer,
    *,
    spec: str = "custom",
    seq_len: int = 256,
    seed: int = 0,
    heldout_fraction: float = 0.5,
) -> TokenWindows:
    """Cut the tokenised corpus into windows of seq_len + 1 tokens and split them by seed."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise DyninferError(f"sequence length must be an integer of at least 2, got {seq_len!r}; pass a larger `seq_len`")
    if not 0.0 < heldout_fraction < 1.0:
        raise DyninferError(f"heldout fraction must be strictly between 0 and 1, got {heldout_fraction!r}; pass e.g. 0.5")
    if not texts:
        raise DyninferError(f"data '{spec}' contains no text; {_SPEC_HELP}")

    stream = token_stream(texts, tokenizer)
    start = sequence_start(tokenizer)
    if len(start) >= seq_len:
        raise DyninferError(
            f"sequence length {seq_len} leaves no room for text after the tokenizer's {len(start)} "
            "sequence-start tokens; pass a larger `seq_len`"
        )
    stride = seq_len + 1 - len(start)  # corpus tokens per window, after the sequence start
    n_windows = len(stream) // stride
    if n_windows < 2:
        raise DyninferError(
            f"data '{spec}' has only {len(stream)} tokens; need at least 2 windows of "
            f"{stride} tokens ({2 * stride}); use more data or a shorter `seq_len`"
        )
    text = torch.tensor(stream[: n_windows * stride], dtype=torch.int64).view(n_windows, stride)
    windows = torch.cat([torch.tensor(start, dtype=torch.int64).expand(n_windows, len(start)), text], dim=1)

    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed))
    # Both splits must hold at least one window, whatever the fraction rounds to.
    n_heldout = min(max(round(n_windows * heldout_fraction), 1), n_windows - 1)
    heldout_index, _ = torch.sort(order[:n_heldout])
    train_index, _ = torch.sort(order[n_heldout:])
    return TokenWindows(
        spec=spec,
        seq_len=seq_len,
        seed=seed,
        heldout_fraction=heldout_fraction,
        train=windows[train_index],
        heldout=windows[heldout_index],
        total_tokens=len(stream),
        train_index=train_index,
        heldout_index=heldout_index,
        sequence_start=start,
    )


def load_windows(
    spec: str,
    tokenizer,
    *,
    field: str | None = None,
    seq_len: int = 256,
    seed: int = 0,
    heldout_fraction: float = 0.5,
) -> TokenWindows:
    """`make_windows` over `load_texts(spec, field)`."""
    return make_windows(
        load_texts(spec, field),
        tokenizer,
        spec=spec,
        seq_len=seq_len,
        seed=seed,
        heldout_fraction=heldout_fraction,
    )
