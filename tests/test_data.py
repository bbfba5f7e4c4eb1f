"""Tests for dyninfer.core.data: corpus specs, file formats, errors and token windows."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from dyninfer.core import data
from dyninfer.core.choices import DEFAULT_DATA
from dyninfer.core.data import BUILTIN_CORPORA, TokenWindows, load_texts, load_windows, make_windows, sequence_start, token_stream
from dyninfer.core.errors import DyninferError

EOS = "<eos>"
UNK = "<unk>"
# Every word is distinct, so every token id in the stream is unique and a window can be
# located in the stream by its first token.
WORDS = [f"w{i}" for i in range(600)]
DOCUMENTS = [" ".join(WORDS[0:250]), " ".join(WORDS[250:430]), " ".join(WORDS[430:600])]


def build_tokenizer(words: list[str], *, with_eos: bool = True) -> PreTrainedTokenizerFast:
    specials = [UNK, EOS] if with_eos else [UNK]
    vocab = {token: index for index, token in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"eos_token": EOS} if with_eos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, **kwargs)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(WORDS)


def expected_stream(documents: list[str], eos_id: int | None) -> list[int]:
    """The EOS-joined token stream, rebuilt from the vocabulary layout of build_tokenizer."""
    word_id = {word: index + (2 if eos_id is not None else 1) for index, word in enumerate(WORDS)}
    stream: list[int] = []
    for index, document in enumerate(documents):
        if index and eos_id is not None:
            stream.append(eos_id)
        stream.extend(word_id[word] for word in document.split())
    return stream


# --------------------------------------------------------------------------- builtin


def test_default_and_builtin_names():
    assert DEFAULT_DATA == "builtin:pydocs"
    assert BUILTIN_CORPORA == ("pydocs", "stdlib-code")


def test_pydocs_is_pydoc_topics_in_key_order():
    from pydoc_data.topics import topics

    texts = load_texts("builtin:pydocs")
    assert texts == [topics[key] for key in sorted(topics) if topics[key].strip()]
    assert len(texts) > 10
    assert all(isinstance(text, str) and text.strip() for text in texts)
    assert load_texts("builtin:pydocs") == texts


def test_stdlib_code_is_bounded_deterministic_source():
    texts = load_texts("builtin:stdlib-code")
    assert load_texts("builtin:stdlib-code") == texts
    total = sum(len(text) for text in texts)
    # Files are taken until the total first reaches 3,000,000 characters.
    assert 3_000_000 <= total < 3_000_000 + max(len(text) for text in texts)
    assert total - len(texts[-1]) < 3_000_000
    assert all(text.strip() for text in texts)
    assert len(set(texts)) > 20
    # Every document is the verbatim text of one eligible stdlib file.
    eligible_texts = set()
    for path in data.stdlib_code_files():
        try:
            eligible_texts.add(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            pass
    assert all(text in eligible_texts for text in texts)


def test_stdlib_code_files_exclude_tests_and_site_packages():
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = data.stdlib_code_files()
    relative = [path.relative_to(stdlib).parts for path in files]
    assert relative, "no stdlib files found"
    assert all(path.suffix == ".py" for path in files)
    excluded = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not [parts for parts in relative if excluded & set(parts[:-1])]
    # Known modules are in; the stdlib's own test suite (when installed) is out.
    names = {"/".join(parts) for parts in relative}
    assert "json/decoder.py" in names
    assert "os.py" in names
    if (stdlib / "test" / "test_json").is_dir():
        assert not any(name.startswith("test/") for name in names)
    assert [path.relative_to(stdlib).as_posix() for path in files] == sorted(names)


def test_unknown_builtin_lists_corpora():
    with pytest.raises(DyninferError, match=r"builtin:pydocs, builtin:stdlib-code"):
        load_texts("builtin:wikipedia")


def test_builtin_pydocs_windows(tokenizer):
    windows = load_windows(DEFAULT_DATA, tokenizer, seq_len=64)
    assert windows.spec == DEFAULT_DATA
    assert windows.train.shape[1] == windows.heldout.shape[1] == 65
    assert windows.train.shape[0] > 10 and windows.heldout.shape[0] > 10


# --------------------------------------------------------------------------- local files


def test_txt_is_one_document(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("line one\n\nline two\n", encoding="utf-8")
    assert load_texts(str(path)) == ["line one\n\nline two\n"]


def test_jsonl_default_and_custom_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [
        {"text": "alpha", "body": "first body"},
        {"text": "beta", "body": "   "},
        {"text": "", "body": "third body"},
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n", encoding="utf-8")
    assert load_texts(str(path)) == ["alpha", "beta"]
    assert load_texts(str(path), field="body") == ["first body", "third body"]


def test_parquet_column(tmp_path):
    path = tmp_path / "corpus.parquet"
    pd.DataFrame({"text": ["one doc", "two doc", None], "id": [1, 2, 3]}).to_parquet(path)
    assert load_texts(str(path)) == ["one doc", "two doc"]


def test_csv_column_with_field(tmp_path):
    path = tmp_path / "corpus.csv"
    pd.DataFrame({"title": ["t1", "t2", "t3"], "body": ["body, with comma", "", "123"]}).to_csv(path, index=False)
    assert load_texts(str(path), field="body") == ["body, with comma", "123"]
    assert load_texts(str(path), field="title") == ["t1", "t2", "t3"]


def test_hf_local_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "local_ds"
    folder.mkdir()
    rows = [{"text": "hub doc one", "label": 0}, {"text": "hub doc two", "label": 1}]
    (folder / "data.jsonl").write_text("\n".join(json.dumps(row) for row in rows), encoding="utf-8")
    assert load_texts(f"hf:{folder}") == ["hub doc one", "hub doc two"]
    assert load_texts(f"hf:{folder}::train") == ["hub doc one", "hub doc two"]
    with pytest.raises(DyninferError, match=r"no column 'body'.*text, label"):
        load_texts(f"hf:{folder}", field="body")


# --------------------------------------------------------------------------- errors


def test_empty_spec():
    with pytest.raises(DyninferError, match="empty"):
        load_texts("")
    with pytest.raises(DyninferError, match="empty"):
        load_texts("   ")


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(DyninferError, match=rf"data file '{missing}' does not exist"):
        load_texts(str(missing))


def test_empty_txt(tmp_path):
    path = tmp_path / "blank.txt"
    path.write_text("  \n\t\n", encoding="utf-8")
    with pytest.raises(DyninferError, match="empty"):
        load_texts(str(path))


def test_unknown_extension_lists_supported(tmp_path):
    path = tmp_path / "corpus.docx"
    path.write_text("words", encoding="utf-8")
    with pytest.raises(DyninferError, match=r"\.docx.*\.txt, \.jsonl, \.parquet, \.csv"):
        load_texts(str(path))


def test_bad_json_line_names_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(DyninferError, match=r"line 3 is not valid JSON"):
        load_texts(str(path))


def test_jsonl_missing_field_lists_fields(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"title": "a", "body": "b"}\n', encoding="utf-8")
    with pytest.raises(DyninferError, match=r"no field 'text'.*`field` with one of: body, title"):
        load_texts(str(path))


def test_table_missing_column_lists_columns(tmp_path):
    path = tmp_path / "corpus.csv"
    pd.DataFrame({"title": ["a"], "body": ["b"]}).to_csv(path, index=False)
    with pytest.raises(DyninferError, match=r"no column 'text'.*title, body"):
        load_texts(str(path))


def test_non_text_field_is_an_error(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": ["a", "list"]}\n', encoding="utf-8")
    with pytest.raises(DyninferError, match=r"line 1 field 'text' holds a list"):
        load_texts(str(path))


def test_all_empty_documents(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": ""}\n{"text": "  "}\n', encoding="utf-8")
    with pytest.raises(DyninferError, match=rf"data '{path}' contains no text"):
        load_texts(str(path))


def test_hf_missing_dataset_fails_fast_offline(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # datasets and huggingface_hub read these once at import; patch both env and constants.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DyninferError) as caught:
        load_texts("hf:dyninfer-test-owner/no-such-dataset-xyz")
    message = str(caught.value)
    assert "\n" not in message
    assert "could not load dataset 'hf:dyninfer-test-owner/no-such-dataset-xyz'" in message
    assert "offline" in message and "local" in message


def test_bad_hf_spec():
    with pytest.raises(DyninferError, match="hf:NAME"):
        load_texts("hf:")
    with pytest.raises(DyninferError, match="hf:NAME"):
        load_texts("hf:a:b:c:d")


# --------------------------------------------------------------------------- windows


def window_rows(windows: torch.Tensor, stream: list[int], seq_len: int) -> list[int]:
    """Row index of each window in the stream cut into seq_len+1 chunks (asserting it is one)."""
    chunk = seq_len + 1
    rows = []
    for window in windows.tolist():
        # Word tokens are unique, so a window matches at most one slice of the stream.
        starts = [p for p in range(len(stream) - chunk + 1) if stream[p : p + chunk] == window]
        assert len(starts) == 1, "window is not a unique contiguous slice of the stream"
        assert starts[0] % chunk == 0, "window does not start at a chunk boundary"
        rows.append(starts[0] // chunk)
    return rows


def test_windows_are_contiguous_slices_of_eos_joined_stream(tokenizer):
    seq_len = 9
    windows = make_windows(DOCUMENTS, tokenizer, spec="unit", seq_len=seq_len, seed=3, heldout_fraction=0.3)
    stream = expected_stream(DOCUMENTS, tokenizer.eos_token_id)
    assert tokenizer.eos_token_id == 1
    assert len(stream) == 600 + 2
    assert windows.total_tokens == len(stream)
    n_windows = len(stream) // (seq_len + 1)

    assert windows.train.dtype == windows.heldout.dtype == torch.int64
    assert windows.train.shape[1] == windows.heldout.shape[1] == seq_len + 1
    train_rows = window_rows(windows.train, stream, seq_len)
    heldout_rows = window_rows(windows.heldout, stream, seq_len)
    assert train_rows == sorted(train_rows) and heldout_rows == sorted(heldout_rows)
    assert not set(train_rows) & set(heldout_rows)
    assert sorted(train_rows + heldout_rows) == list(range(n_windows))
    assert len(heldout_rows) == round(n_windows * 0.3)
    # The EOS separators made it into the windows.
    assert (windows.train == 1).sum() + (windows.heldout == 1).sum() == 2


def test_split_follows_seeded_randperm(tokenizer):
    windows = make_windows(DOCUMENTS, tokenizer, seq_len=9, seed=11, heldout_fraction=0.5)
    stream = expected_stream(DOCUMENTS, tokenizer.eos_token_id)
    n_windows = len(stream) // 10
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(11)).tolist()
    expected_heldout = sorted(order[: round(n_windows * 0.5)])
    assert window_rows(windows.heldout, stream, 9) == expected_heldout


def test_same_seed_same_split_different_seed_different_split(tokenizer):
    first = make_windows(DOCUMENTS, tokenizer, seq_len=9, seed=0)
    again = make_windows(DOCUMENTS, tokenizer, seq_len=9, seed=0)
    other = make_windows(DOCUMENTS, tokenizer, seq_len=9, seed=1)
    assert torch.equal(first.train, again.train) and torch.equal(first.heldout, again.heldout)
    assert not torch.equal(first.heldout, other.heldout)
    assert first.total_tokens == other.total_tokens


def test_no_eos_means_no_separator():
    tokenizer = build_tokenizer(WORDS, with_eos=False)
    assert tokenizer.eos_token_id is None
    windows = make_windows(DOCUMENTS, tokenizer, seq_len=9)
    stream = expected_stream(DOCUMENTS, None)
    assert windows.total_tokens == 600
    rows = window_rows(windows.train, stream, 9) + window_rows(windows.heldout, stream, 9)
    assert sorted(rows) == list(range(60))


def test_remainder_is_dropped(tokenizer):
    windows = make_windows(DOCUMENTS, tokenizer, seq_len=99)
    # 602 tokens -> 6 windows of 100, 2 tokens dropped.
    assert windows.train.shape[0] + windows.heldout.shape[0] == 6


def test_too_few_windows(tokenizer):
    with pytest.raises(DyninferError, match=r"data 'tiny' has only 5 tokens.*shorter `seq_len`"):
        make_windows(["w1 w2 w3 w4 w5"], tokenizer, spec="tiny", seq_len=4)
    # Exactly two windows is enough, and each split gets one even with a lopsided fraction.
    windows = make_windows(["w1 w2 w3 w4 w5 w6"], tokenizer, seq_len=2, heldout_fraction=0.1)
    assert windows.train.shape[0] == windows.heldout.shape[0] == 1


@pytest.mark.parametrize("seq_len", [0, 1, -5])
def test_bad_seq_len(tokenizer, seq_len):
    with pytest.raises(DyninferError, match="`seq_len`"):
        make_windows(DOCUMENTS, tokenizer, seq_len=seq_len)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_heldout_fraction(tokenizer, fraction):
    with pytest.raises(DyninferError, match="heldout fraction"):
        make_windows(DOCUMENTS, tokenizer, heldout_fraction=fraction)


def test_take_draws_nested_random_windows_from_the_whole_split(tokenizer):
    windows = make_windows(DOCUMENTS, tokenizer, seq_len=9, heldout_fraction=0.5)
    n_heldout = windows.heldout.shape[0]
    previous = None
    for n_tokens in (1, 9, 10, 45, 9 * n_heldout):
        rows = windows.take_rows("heldout", n_tokens)
        assert rows.numel() == math.ceil(n_tokens / 9) == len(set(rows.tolist()))
        assert torch.equal(windows.take("heldout", n_tokens), windows.heldout[rows])
        if previous is not None:  # a larger draw extends a smaller one
            assert torch.equal(rows[: previous.numel()], previous)
        previous = rows
    assert sorted(previous.tolist()) == list(range(n_heldout))
    # Not the corpus's first pages: a draw of a quarter reaches past the first half of the split.
    quarter = windows.take_rows("train", 9 * (windows.train.shape[0] // 4))
    assert quarter.max() >= windows.train.shape[0] // 2
    # Each row's corpus position: the window's tokens are that stretch of the token stream.
    stream = torch.cat([windows.train, windows.heldout])[torch.argsort(torch.cat([windows.index("train"), windows.index("heldout")]))]
    assert torch.equal(stream.flatten(), torch.tensor(token_stream(DOCUMENTS, tokenizer)[: stream.numel()]))


def test_take_too_many_tokens(tokenizer):
    windows = make_windows(DOCUMENTS, tokenizer, spec="unit", seq_len=9)
    available = windows.train.shape[0] * 9
    windows.take("train", available)
    with pytest.raises(DyninferError, match=rf"train split of data 'unit' has {available} tokens.*lower `tokens`"):
        windows.take("train", available + 1)
    with pytest.raises(DyninferError, match="at least 1"):
        windows.take("train", 0)
    with pytest.raises(ValueError, match=r"split must be .train. or .heldout."):
        windows.take("validation", 5)


def test_describe_is_json_summary(tokenizer):
    windows = make_windows(DOCUMENTS, tokenizer, spec="unit", seq_len=9, seed=4, heldout_fraction=0.25)
    summary = windows.describe()
    assert json.loads(json.dumps(summary)) == summary
    n_windows = 602 // 10
    assert summary == {
        "spec": "unit",
        "seq_len": 9,
        "seed": 4,
        "heldout_fraction": 0.25,
        "train_windows": n_windows - round(n_windows * 0.25),
        "heldout_windows": round(n_windows * 0.25),
        "train_tokens": (n_windows - round(n_windows * 0.25)) * 9,
        "heldout_tokens": round(n_windows * 0.25) * 9,
        "total_tokens": 602,
        "sequence_start": [],  # this tokenizer adds no BOS
    }


def test_load_windows_from_file(tmp_path, tokenizer):
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(json.dumps({"body": document}) for document in DOCUMENTS), encoding="utf-8")
    windows = load_windows(str(path), tokenizer, field="body", seq_len=9, seed=2)
    direct = make_windows(DOCUMENTS, tokenizer, spec=str(path), seq_len=9, seed=2)
    assert isinstance(windows, TokenWindows)
    assert windows.spec == str(path)
    assert torch.equal(windows.train, direct.train) and torch.equal(windows.heldout, direct.heldout)


def test_lens_overlap_is_found_across_seeds_and_window_lengths(tokenizer):
    """A lens trained on one split's windows: which windows of another split share its tokens."""
    from dyninfer.runtime.loader import lens_provenance, trained_on

    first = make_windows(DOCUMENTS, tokenizer, spec="unit", seq_len=9, seed=0)
    rows = first.take_rows("train", 27)
    record = lens_provenance(first, rows)
    seen = set()
    for k in record.windows:
        seen.update(range(k * 10, (k + 1) * 10))  # stream tokens of each lens window
    for seed, seq_len in ((0, 9), (1, 9), (2, 13)):
        other = make_windows(DOCUMENTS, tokenizer, spec="unit", seq_len=seq_len, seed=seed)
        every = torch.arange(other.heldout.shape[0])
        expected = sum(bool(seen & set(range(k * (seq_len + 1), (k + 1) * (seq_len + 1)))) for k in other.index("heldout").tolist())
        assert trained_on(record, other, "heldout", every) == expected
        if seed == 0 and seq_len == 9:
            assert expected == 0  # the same split: the lens trained on train windows only
    assert trained_on(record, make_windows(DOCUMENTS, tokenizer, spec="other", seq_len=9), "heldout", [0]) is None
    assert trained_on(None, first, "heldout", [0]) is None


def _bos_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that starts every sequence with <s>, as Llama's and Gemma's do (after the words and EOS)."""
    from tokenizers import processors

    bos_id = 2 + len(WORDS)
    vocab = {token: index for index, token in enumerate([UNK, EOS, *WORDS, "<s>"])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token=UNK, eos_token=EOS, bos_token="<s>")


def test_windows_start_as_the_tokenizer_starts_a_sequence():
    tokenizer = _bos_tokenizer()
    bos_id = tokenizer.bos_token_id
    assert sequence_start(tokenizer) == (bos_id,) and sequence_start(build_tokenizer(WORDS)) == ()
    seq_len = 9
    windows = make_windows(DOCUMENTS, tokenizer, spec="unit", seq_len=seq_len, seed=3, heldout_fraction=0.3)
    assert windows.train.shape[1] == windows.heldout.shape[1] == seq_len + 1  # still seq_len predictions each
    assert (windows.train[:, 0] == bos_id).all() and (windows.heldout[:, 0] == bos_id).all()
    assert (windows.train[:, 1:] != bos_id).all()  # nowhere else
    # After the BOS, each window is the next `stride` tokens of the EOS-joined stream: together, in corpus order,
    # they are its prefix, nothing skipped or repeated.
    stream = expected_stream(DOCUMENTS, tokenizer.eos_token_id)
    assert windows.stride == seq_len
    whole = torch.cat([windows.train, windows.heldout])[torch.cat([windows.train_index, windows.heldout_index]).argsort()]
    assert whole[:, 1:].reshape(-1).tolist() == stream[: len(stream) // seq_len * seq_len]
    assert windows.describe()["sequence_start"] == [bos_id]
    assert make_windows(DOCUMENTS, build_tokenizer(WORDS), seq_len=seq_len).describe()["sequence_start"] == []


def test_a_byte_order_mark_is_not_text(tmp_path):
    """Editors on some systems start UTF-8 files with a BOM: a JSONL or text file with one reads as without it."""
    from dyninfer.core.data import load_texts

    records = [{"text": "first line"}, {"text": "second line"}]
    jsonl = tmp_path / "with-bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "\n".join(json.dumps(r) for r in records).encode())
    assert load_texts(str(jsonl)) == ["first line", "second line"]
    text = tmp_path / "with-bom.txt"
    text.write_bytes(b"\xef\xbb\xbfplain words")
    assert load_texts(str(text)) == ["plain words"]
