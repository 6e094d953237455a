"""CLIP tokenizers from the shipped BPE merges: the real ids, no download."""
from __future__ import annotations

import pytest

from convkit import tokenizers
from convkit.errors import UnknownNameError


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONVKIT_CACHE", str(tmp_path / "cache"))
    tokenizers.clip_tokenizer.cache_clear()
    yield
    tokenizers.clip_tokenizer.cache_clear()


def test_vocabulary_is_clips():
    vocab, merges = tokenizers.vocab_and_merges()
    assert len(vocab) == 49408 and len(merges) == 48894
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert vocab["!"] == 0 and vocab["a</w>"] == 320


def test_ids_are_the_published_ones():
    # "a photo of a cat" is CLIP's README example; its ids are what every SD pipeline feeds
    tok = tokenizers.clip_tokenizer("clip_l")
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.pad_token_id == 49407 and tok.model_max_length == 77


def test_clip_g_pads_with_exclamation_mark():
    tok = tokenizers.clip_tokenizer("clip_g")
    ids = tok("a photo of a cat", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[7:] == [0] * 70


def test_any_text_round_trips():
    tok = tokenizers.clip_tokenizer("clip_l")
    text = 'video game room with a big neon sign that says "arcade", café ☕ 8k'
    ids = tok(text).input_ids
    # CLIP splits digits one by one ("8k" -> "8", "k"), so decoding spaces them out
    back = tok.decode(ids, skip_special_tokens=True)
    assert back.replace(" ", "") == text.lower().replace(" ", "")


def test_folder_is_written_once_and_reused(tmp_path):
    a = tokenizers.clip_tokenizer_folder("clip_l")
    mtime = (a / "vocab.json").stat().st_mtime_ns
    assert tokenizers.clip_tokenizer_folder("clip_l") == a
    assert (a / "vocab.json").stat().st_mtime_ns == mtime
    assert str(a).startswith(str(tmp_path / "cache"))


def test_unknown_kind_suggests():
    with pytest.raises(UnknownNameError, match="clip_l"):
        tokenizers.tokenizer_files("clip_1")
