"""The book's BPE tokenizer: trainer, naive vs tiktoken encoding, special tokens, files."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mllm_scratch import tokenizer as tk
from mllm_scratch.tokenizer import (
    DEFAULT_PATH,
    SPECIAL_TOKENS,
    Merge,
    Tokenizer,
    TokenizerFileError,
    TokenizerFileMissingError,
    load_tokenizer,
    naive_encode,
    pretokenize,
    save_tokenizer,
    train_bpe,
)

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = [
    "",
    "a red circle is left of a blue square.",
    "how many objects are there? three",
    "what does the text say? a7k",
    "there are two objects. a small yellow diamond is left of a large green square.",
    "  leading and trailing spaces  \n\nnew lines\ttabs ",
    "it's the cat's, they've, we'll, I'd, you're, 123456 and 3.14",
    "héllo wörld ✓ 日本語のテキスト 🙂👍🏽 Ελληνικά русский",
    "<|image|> <|endoftext|> literal specials <|reserved_4|> <|user|>",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer()


# --- the trainer ----------------------------------------------------------------


def test_pretokenize_splits_words_with_their_leading_space() -> None:
    assert pretokenize("a red circle? yes, 12 it's") == ["a", " red", " circle", "?", " yes", ",", " 12", " it", "'s"]


# Hand-computed (the chapter's example): pieces hug x10, pug x5, pun x12, bun x4, hugs x5.
# Pair counts: u+g 20, p+u 17, u+n 16, h+u 15 ... -> "ug"; then u+n 16 -> "un";
# h+ug 15 -> "hug"; p+un 12 -> "pun"; then hug+s 5 and p+ug 5 tie and the smaller pair
# (b"hug", b"s") < (b"p", b"ug") goes first; then b+un 4; then no pair is left.
HUG_CORPUS = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
HUG_MERGES = [
    Merge((b"u", b"g"), b"ug", 256, 20),
    Merge((b"u", b"n"), b"un", 257, 16),
    Merge((b"h", b"ug"), b"hug", 258, 15),
    Merge((b"p", b"un"), b"pun", 259, 12),
    Merge((b"hug", b"s"), b"hugs", 260, 5),
    Merge((b"p", b"ug"), b"pug", 261, 5),
    Merge((b"b", b"un"), b"bun", 262, 4),
]


def test_train_bpe_learns_the_hand_computed_merges() -> None:
    result = train_bpe(HUG_CORPUS, num_ranks=1000)
    assert result.merges == HUG_MERGES
    assert list(result.ranks.items())[:256] == [(bytes([b]), b) for b in range(256)]
    assert {m.token: m.rank for m in HUG_MERGES} == dict(list(result.ranks.items())[256:])


def test_train_bpe_stops_at_num_ranks() -> None:
    result = train_bpe(HUG_CORPUS, num_ranks=258)
    assert result.merges == HUG_MERGES[:2] and len(result.ranks) == 258


def test_train_bpe_never_merges_a_pair_seen_once() -> None:
    assert train_bpe(["xyz", "ab", "ab"], num_ranks=1000).merges == [Merge((b"a", b"b"), b"ab", 256, 2)]


def test_tie_break_is_smallest_pair_and_ignores_corpus_order() -> None:
    result = train_bpe(["cd", "ab"] * 3, num_ranks=1000)
    assert [m.token for m in result.merges] == [b"ab", b"cd"]  # both occur 3 times
    shuffled = HUG_CORPUS[:]
    random.Random(0).shuffle(shuffled)
    assert train_bpe(shuffled, num_ranks=1000).merges == HUG_MERGES


def test_train_bpe_rejects_fewer_ranks_than_bytes() -> None:
    with pytest.raises(ValueError, match="num_ranks must be an int >= 256.*got 100"):
        train_bpe(["ab"], num_ranks=100)


@settings(max_examples=60, deadline=None)
@given(
    corpus=st.lists(st.text(alphabet="ab c.é", max_size=12), max_size=12),
    probe=st.text(alphabet="ab c.éx", max_size=20),
)
def test_any_trained_ranks_load_into_tiktoken_and_naive_encoding_agrees(corpus: list[str], probe: str) -> None:
    ranks = train_bpe(corpus, num_ranks=300).ranks
    tokenizer = Tokenizer(ranks)  # validates ranks 0..N-1, bytes first
    for text in corpus + [probe]:
        assert naive_encode(text, ranks) == tokenizer.encode_ordinary(text)
        assert tokenizer.decode(tokenizer.encode_ordinary(text)) == text


# --- the shipped tokenizer ------------------------------------------------------


def test_naive_encoder_equals_tiktoken_on_samples(tok: Tokenizer) -> None:
    for text in SAMPLES:
        assert naive_encode(text, tok.ranks, tok.pat_str) == tok.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_naive_encoder_equals_tiktoken_on_any_text(tok: Tokenizer, text: str) -> None:
    assert naive_encode(text, tok.ranks, tok.pat_str) == tok.encode_ordinary(text)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_on_any_unicode_text(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode_ordinary(text)) == text
    assert tok.decode(tok.encode(text, allowed_special="all")) == text


def test_shapeworld_words_are_single_tokens(tok: Tokenizer) -> None:
    from mllm_scratch.shapeworld import COLOURS, DIRECTIONS, SHAPES, SIZES

    for word in COLOURS + SHAPES + SIZES + DIRECTIONS + ("objects", "there", "above", "below"):
        assert tok.pieces(" " + word) == [" " + word]
    assert tok.pieces("a red circle is left of a blue square.") == [
        "a", " red", " circle", " is", " left", " of", " a", " blue", " square", "."
    ]


def test_naive_encoder_equals_tiktoken_on_shapeworld_text(tok: Tokenizer) -> None:
    from mllm_scratch.shapeworld import text_corpus

    texts = text_corpus(num_scenes=100, seed=1)
    assert [naive_encode(text, tok.ranks, tok.pat_str) for text in texts] == tok.encode_batch(texts)


def test_special_token_ids_follow_the_mergeable_ranks(tok: Tokenizer) -> None:
    n = tok.num_ranks
    assert tok.vocab_size == len(tok) == n + len(SPECIAL_TOKENS) == 512
    assert (tok.eot_id, tok.pad_id, tok.image_id, tok.video_id) == (n, n + 1, n + 2, n + 3)
    assert tok.special_tokens == {name: n + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert tok.special_tokens["<|reserved_4|>"] == tok.vocab_size - 1
    for token_id in tok.special_tokens.values():
        assert tok.decode([token_id]) == tok.token_str(token_id)


def test_encode_refuses_special_strings_unless_allowed(tok: Tokenizer) -> None:
    text = "<|image|> what colour is the circle?"
    with pytest.raises(ValueError, match=r"special token '<\|image\|>' at index 0.*allowed_special.*encode_ordinary"):
        tok.encode(text)
    with pytest.raises(ValueError, match="encode_ordinary"):
        tok.encode_batch(["fine", text])
    rest = tok.encode_ordinary(" what colour is the circle?")
    assert tok.encode(text, allowed_special={"<|image|>"}) == [tok.image_id] + rest
    assert tok.encode(text, allowed_special="all") == [tok.image_id] + rest
    # allowing one special token does not allow the others
    with pytest.raises(ValueError, match=r"'<\|video\|>'"):
        tok.encode(text + "<|video|>", allowed_special={"<|image|>"})
    # as plain text the string is just bytes, never a special id
    plain = tok.encode_ordinary(text)
    assert max(plain) < tok.num_ranks and tok.decode(plain) == text
    with pytest.raises(ValueError, match="not special tokens"):
        tok.encode(text, allowed_special={"<image>"})
    with pytest.raises(ValueError, match="got the string"):
        tok.encode(text, allowed_special="<|image|>")


def test_encode_batch_equals_encode(tok: Tokenizer) -> None:
    texts = [s for s in SAMPLES if "<|" not in s]
    assert tok.encode_batch(texts) == [tok.encode(s) for s in texts]


def test_decode_rejects_ids_outside_the_vocabulary(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match=r"token id 512 is not an int in 0..511"):
        tok.decode([1, 512])
    with pytest.raises(ValueError, match=r"token id -1"):
        tok.token_bytes(-1)


def test_token_display(tok: Tokenizer) -> None:
    assert tok.token_bytes(ord("a")) == b"a"
    assert tok.token_str(0xE2) == "\\xe2"  # a lone byte of a multi-byte character
    assert tok.token_str(tok.image_id) == "<|image|>"
    ids = tok.encode("✓")
    assert b"".join(tok.token_bytes(i) for i in ids) == "✓".encode()


# --- files ----------------------------------------------------------------------


def copy_shipped(tmp_path: Path) -> Path:
    for path in (DEFAULT_PATH, DEFAULT_PATH.with_suffix(".json")):
        shutil.copy(path, tmp_path / path.name)
    return tmp_path / DEFAULT_PATH.name


def rewrite_ranks(ranks_path: Path, data: bytes) -> None:
    """Replace the ranks file and fix the manifest's sha256, so only the content is wrong."""
    ranks_path.write_bytes(data)
    manifest_file = ranks_path.with_suffix(".json")
    manifest = json.loads(manifest_file.read_text())
    manifest["ranks_sha256"] = hashlib.sha256(data).hexdigest()
    manifest_file.write_text(json.dumps(manifest))


def test_default_load_is_cached_and_the_env_var_overrides_it(tmp_path: Path, monkeypatch, tok: Tokenizer) -> None:
    assert load_tokenizer() is load_tokenizer()
    copy = copy_shipped(tmp_path)
    assert load_tokenizer(tmp_path).ranks == load_tokenizer(copy).ranks == tok.ranks
    monkeypatch.setenv(tk.PATH_ENV_VAR, str(tmp_path / "elsewhere.tiktoken"))
    with pytest.raises(TokenizerFileMissingError, match="elsewhere.tiktoken"):
        load_tokenizer()


def test_save_then_load_round_trips_and_leaves_no_temp_files(tmp_path: Path) -> None:
    original = Tokenizer(train_bpe(HUG_CORPUS, num_ranks=1000).ranks)
    path = save_tokenizer(original, tmp_path, corpus={"hand": "made"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shapeworld_bpe.json", "shapeworld_bpe.tiktoken"]
    loaded = load_tokenizer(path)
    assert loaded.ranks == original.ranks and loaded.special_tokens == original.special_tokens
    assert loaded.encode("hugs pun") == original.encode("hugs pun")
    assert path.read_text().splitlines()[256] == "dWc= 256"  # base64(b"ug"), rank


def test_interrupted_save_keeps_the_old_files(tmp_path: Path, monkeypatch) -> None:
    ranks_path = copy_shipped(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def crash(src, dst):
        raise KeyboardInterrupt  # as if the build were stopped mid-write

    monkeypatch.setattr(tk.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_tokenizer(Tokenizer(train_bpe(HUG_CORPUS, num_ranks=1000).ranks), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temp file left behind
    monkeypatch.undo()
    assert load_tokenizer(ranks_path).num_ranks == 500


@pytest.mark.parametrize("which", ["tiktoken", "json"])
def test_missing_file_names_path_and_rebuild_command(tmp_path: Path, which: str) -> None:
    ranks_path = copy_shipped(tmp_path)
    missing = ranks_path.with_suffix("." + which)
    missing.unlink()
    with pytest.raises(TokenizerFileMissingError) as info:
        load_tokenizer(ranks_path)
    message = str(info.value)
    assert str(missing) in message and f"python scripts/build_tokenizer.py --out {tmp_path}" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_default_path_hint_is_the_plain_build_command() -> None:
    assert tk.rebuild_hint(DEFAULT_PATH) == "rebuild it with: python scripts/build_tokenizer.py"


def test_sha_mismatch_is_reported(tmp_path: Path) -> None:
    ranks_path = copy_shipped(tmp_path)
    data = bytearray(ranks_path.read_bytes())
    data[-2:-1] = b"8"  # the last rank, silently changed from 499 to 498
    ranks_path.write_bytes(bytes(data))
    with pytest.raises(TokenizerFileError, match=r"has sha256 [0-9a-f]{64}, but its manifest .* expects .*build_tokenizer.py"):
        load_tokenizer(ranks_path)


@pytest.mark.parametrize(
    "corrupt, expected",
    [
        (lambda lines: lines[:-1] + ["not base64!! 499"], r"line 500 is 'not base64!! 499'"),
        (lambda lines: lines[:-1] + ["YWJj"], r"line 500 is 'YWJj', expected '<base64 bytes> <rank>'"),
        (lambda lines: lines[:-1] + [lines[-1].replace(" 499", " 600")], r"not contiguous 0..499"),
        (lambda lines: [lines[1].replace(" 1", " 0"), lines[0].replace(" 0", " 1")] + lines[2:], r"byte b'\\x00' has rank 1, expected 0"),
        (lambda lines: lines[:-1] + [lines[300]], r"appears twice"),
    ],
    ids=["bad-base64", "missing-rank", "gap", "bytes-out-of-order", "duplicate"],
)
def test_corrupt_ranks_are_reported(tmp_path: Path, corrupt, expected: str) -> None:
    ranks_path = copy_shipped(tmp_path)
    lines = ranks_path.read_text().splitlines()
    rewrite_ranks(ranks_path, ("\n".join(corrupt(lines)) + "\n").encode())
    with pytest.raises(TokenizerFileError, match=expected) as info:
        load_tokenizer(ranks_path)
    assert str(ranks_path) in str(info.value) and "python scripts/build_tokenizer.py" in str(info.value)


def test_corrupt_manifest_is_reported(tmp_path: Path) -> None:
    ranks_path = copy_shipped(tmp_path)
    ranks_path.with_suffix(".json").write_text('{"pat_str": ')
    with pytest.raises(TokenizerFileError, match=r"manifest .*shapeworld_bpe.json is corrupt.*build_tokenizer.py"):
        load_tokenizer(ranks_path)


def test_shipped_files_equal_a_fresh_build(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # The reproducibility promise: the build script rebuilds the shipped files byte for byte.
    spec = importlib.util.spec_from_file_location("build_tokenizer", ROOT / "scripts" / "build_tokenizer.py")
    build_tokenizer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_tokenizer)
    assert build_tokenizer.main(["--check"]) == 0, capsys.readouterr().out

    manifest = json.loads(DEFAULT_PATH.with_suffix(".json").read_text())
    assert manifest["corpus"] == {
        "function": "mllm_scratch.shapeworld.text_corpus",
        "num_scenes": build_tokenizer.NUM_SCENES,
        "seed": build_tokenizer.SEED,
    }
    # and --check notices a file that differs (compared without a second build)
    ranks_path = copy_shipped(tmp_path)
    assert build_tokenizer.differing_files(tmp_path, DEFAULT_PATH) == []
    manifest_file = ranks_path.with_suffix(".json")
    manifest_file.write_text(manifest_file.read_text().replace("512", "513"))
    assert build_tokenizer.differing_files(tmp_path, DEFAULT_PATH) == [manifest_file]
    ranks_path.unlink()
    assert build_tokenizer.differing_files(tmp_path, DEFAULT_PATH) == [ranks_path, manifest_file]
