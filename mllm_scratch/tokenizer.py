"""The book's own byte-level BPE tokenizer, trained on ShapeWorld text (chapter 01).

Byte-level BPE in four steps:

1. Pre-tokenise: a GPT-2-style regex cuts text into pieces (" red", " circle", "?"),
   so merges never cross a word boundary.
2. Start every piece as its UTF-8 bytes: the 256 single bytes are tokens 0..255, so any
   text at all can be encoded, with no "unknown" token.
3. Train: repeatedly merge the most frequent adjacent pair of tokens into a new token.
   The order of the merges is the token's *rank*.
4. Encode: inside each piece, repeatedly merge the adjacent pair whose concatenation has
   the lowest rank, until no pair is a token.

Training is plain Python (`train_bpe`), and so is a naive encoder (`naive_encode`) that
mirrors step 4. The ranks are then handed to `tiktoken.Encoding`, which runs step 4 in
Rust and gives identical ids, much faster. The book ships the trained ranks in
`data/tokenizer/` (built by `python scripts/build_tokenizer.py`), so nothing is
downloaded, ever.

Special tokens (<|endoftext|>, <|pad|>, <|image|>, <|video|>, the chat turns' <|user|>,
<|assistant|> and <|end|>, and five reserved slots)
get the ids right after the mergeable tokens. Like tiktoken, `Tokenizer.encode` raises
ValueError on text that contains one of their strings unless it is in `allowed_special`;
`encode_ordinary` encodes such strings as plain bytes instead.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import AbstractSet, Literal, NamedTuple

import regex  # Python's `re` has no \p{L}; tiktoken depends on `regex` already
import tiktoken

# GPT-2's pre-tokeniser: contractions, letters with an optional leading space, digits
# with an optional leading space, other symbols, then whitespace. The same string is
# compiled by `regex` here and by tiktoken's Rust regex engine.
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

ENDOFTEXT = "<|endoftext|>"
PAD = "<|pad|>"
IMAGE = "<|image|>"
VIDEO = "<|video|>"
# A chat's turns: <|user|> or <|assistant|> opens one, <|end|> closes it. They fill the first three of what
# were eight reserved slots (no id moved); the five left are <|reserved_0|> to <|reserved_4|>.
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"
NUM_RESERVED = 5  # room for more (e.g. <|audio|>) without renumbering
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, PAD, IMAGE, VIDEO, USER, ASSISTANT, END) + tuple(
    f"<|reserved_{i}|>" for i in range(NUM_RESERVED)
)

NAME = "shapeworld_bpe"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "data" / "tokenizer"
DEFAULT_PATH = DEFAULT_DIR / f"{NAME}.tiktoken"
PATH_ENV_VAR = "MLLM_TOKENIZER_PATH"
REBUILD_COMMAND = "python scripts/build_tokenizer.py"


# ---------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------


class Merge(NamedTuple):
    """One step of BPE training: `pair` was merged into `token`, which has `rank`."""

    pair: tuple[bytes, bytes]
    token: bytes
    rank: int
    count: int  # how often the pair occurred in the corpus when it was merged


@dataclass(frozen=True)
class BPEResult:
    """What `train_bpe` learned: the ranks for tiktoken and the merge history."""

    ranks: dict[bytes, int]
    merges: list[Merge]
    pat_str: str


def pretokenize(text: str, pat_str: str = PAT_STR) -> list[str]:
    """Cut text into the pieces that BPE works inside (merges never cross them)."""
    return regex.findall(pat_str, text)


def merge_pair(word: list[bytes], pair: tuple[bytes, bytes], token: bytes) -> list[bytes]:
    """Replace each non-overlapping occurrence of `pair` in `word`, left to right, by `token`."""
    merged: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(token)
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return merged


def train_bpe(texts: Iterable[str], num_ranks: int, pat_str: str = PAT_STR) -> BPEResult:
    """Learn byte-level BPE merges until there are `num_ranks` tokens or no pair occurs twice."""
    if not isinstance(num_ranks, int) or num_ranks < 256:
        raise ValueError(f"num_ranks must be an int >= 256 (the single bytes), got {num_ranks!r}")
    pattern = regex.compile(pat_str)
    # Count each distinct piece once with its frequency: the corpus repeats few words.
    piece_counts = Counter(
        piece.encode("utf-8") for text in texts for piece in pattern.findall(text)
    )
    words = [[bytes([b]) for b in piece] for piece in piece_counts]
    freqs = list(piece_counts.values())

    ranks = {bytes([b]): b for b in range(256)}
    merges: list[Merge] = []
    while len(ranks) < num_ranks:
        pair_counts: Counter[tuple[bytes, bytes]] = Counter()
        for word, freq in zip(words, freqs):
            for pair in zip(word, word[1:]):
                pair_counts[pair] += freq
        if not pair_counts:
            break
        # Most frequent pair; ties go to the smallest (bytes_a, bytes_b), so the result
        # never depends on the order of the corpus or of a dict.
        pair, count = min(pair_counts.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break  # a pair seen once is memorising the corpus, not compressing it
        token = pair[0] + pair[1]
        # Guard: should two different pairs ever spell the same bytes ("a"+"bc" and
        # "ab"+"c"), reuse the rank, since tiktoken keys tokens by their bytes.
        if token not in ranks:
            ranks[token] = len(ranks)
        merges.append(Merge(pair, token, ranks[token], count))
        words = [merge_pair(word, pair, token) for word in words]
    return BPEResult(ranks=ranks, merges=merges, pat_str=pat_str)


# ---------------------------------------------------------------------------------
# Encoding by hand (tiktoken does the same, in Rust)
# ---------------------------------------------------------------------------------


def bpe_piece(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Encode one pre-token: merge the adjacent pair with the lowest rank until none is a token."""
    if piece in ranks:
        # tiktoken's shortcut: a piece that is itself a token is that token, even where
        # the merge order would not reach it.
        return [ranks[piece]]
    parts = [bytes([b]) for b in piece]
    while len(parts) > 1:
        best_rank, best_i = None, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            # strict `<`: among equal ranks the leftmost pair wins, as in tiktoken
            if rank is not None and (best_rank is None or rank < best_rank):
                best_rank, best_i = rank, i
        if best_rank is None:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return [ranks[part] for part in parts]


def naive_encode(text: str, ranks: dict[bytes, int], pat_str: str = PAT_STR) -> list[int]:
    """Encode text as plain text (special-token strings are ordinary bytes), in pure Python."""
    ids: list[int] = []
    for piece in regex.findall(pat_str, text):
        ids.extend(bpe_piece(piece.encode("utf-8"), ranks))
    return ids


# ---------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------


def validate_ranks(ranks: dict[bytes, int]) -> None:
    """Raise ValueError unless ranks are 0..N-1, the first 256 being the single bytes in order."""
    if len(ranks) < 256:
        raise ValueError(f"ranks hold {len(ranks)} tokens, expected at least the 256 single bytes")
    for b in range(256):
        if ranks.get(bytes([b])) != b:
            raise ValueError(
                f"byte {bytes([b])!r} has rank {ranks.get(bytes([b]))!r}, expected {b}: "
                "the first 256 ranks must be the single bytes in byte order"
            )
    if sorted(ranks.values()) != list(range(len(ranks))):
        missing = sorted(set(range(len(ranks))) - set(ranks.values()))
        raise ValueError(
            f"ranks of {len(ranks)} tokens are not contiguous 0..{len(ranks) - 1} "
            f"(first missing: {missing[:5]})"
        )


def default_special_tokens(num_ranks: int) -> dict[str, int]:
    """The book's special tokens, numbered right after the `num_ranks` mergeable tokens."""
    return {name: num_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}


class Tokenizer:
    """Byte-level BPE with special tokens: a thin wrapper around `tiktoken.Encoding`.

    `encode` refuses text that contains a special-token string (e.g. a caption that
    literally says "<|image|>") unless that token is in `allowed_special`, so user text
    can never smuggle in an image slot. `encode_ordinary` encodes such strings as plain
    text instead.
    """

    def __init__(
        self,
        ranks: dict[bytes, int],
        pat_str: str = PAT_STR,
        special_tokens: dict[str, int] | None = None,
        name: str = NAME,
    ) -> None:
        validate_ranks(ranks)
        expected = default_special_tokens(len(ranks))
        special_tokens = expected if special_tokens is None else dict(special_tokens)
        if special_tokens != expected:
            raise ValueError(
                f"special tokens {special_tokens} differ from the expected {expected} "
                "(the book's special tokens, numbered right after the mergeable ranks)"
            )
        self.ranks = dict(ranks)
        self.pat_str = pat_str
        self._special_tokens = special_tokens
        self.encoding = tiktoken.Encoding(
            name=name,
            pat_str=pat_str,
            mergeable_ranks=self.ranks,
            special_tokens=special_tokens,
            explicit_n_vocab=len(ranks) + len(special_tokens),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids: mergeable tokens plus special tokens (the embedding table's rows)."""
        return self.encoding.n_vocab

    @property
    def num_ranks(self) -> int:
        """Number of mergeable tokens (256 bytes plus the learned merges)."""
        return len(self.ranks)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special-token string -> id (a copy)."""
        return dict(self._special_tokens)

    @property
    def eot_id(self) -> int:
        """Id of <|endoftext|>, which ends every training text."""
        return self._special_tokens[ENDOFTEXT]

    @property
    def pad_id(self) -> int:
        """Id of <|pad|>, which fills batches to equal length."""
        return self._special_tokens[PAD]

    @property
    def image_id(self) -> int:
        """Id of <|image|>, the slot where image features are spliced in."""
        return self._special_tokens[IMAGE]

    @property
    def video_id(self) -> int:
        """Id of <|video|>, the slot where video features are spliced in."""
        return self._special_tokens[VIDEO]

    def _allowed(self, allowed_special: Literal["all"] | AbstractSet[str]) -> set[str]:
        if allowed_special == "all":
            return set(self._special_tokens)
        if isinstance(allowed_special, str):
            raise ValueError(
                f"allowed_special must be 'all' or a set of special tokens, got the string "
                f"{allowed_special!r}; write {{{allowed_special!r}}} for one token"
            )
        unknown = set(allowed_special) - set(self._special_tokens)
        if unknown:
            raise ValueError(
                f"allowed_special contains {sorted(unknown)}, which are not special tokens; "
                f"expected a subset of {list(self._special_tokens)}"
            )
        return set(allowed_special)

    def _check_no_special(self, text: str, allowed: set[str]) -> None:
        for token in self._special_tokens:
            if token not in allowed and token in text:
                raise ValueError(
                    f"text contains the special token {token!r} at index {text.index(token)}; "
                    f"pass allowed_special={{{token!r}}} (or 'all') to encode it as its id "
                    f"{self._special_tokens[token]}, or use encode_ordinary() to encode it as plain text"
                )

    def encode(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = frozenset()) -> list[int]:
        """Text -> ids; special-token strings become ids only if allowed, else ValueError."""
        allowed = self._allowed(allowed_special)
        self._check_no_special(text, allowed)
        return self.encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_ordinary(self, text: str) -> list[int]:
        """Text -> ids, treating special-token strings as plain text."""
        return self.encoding.encode_ordinary(text)

    def encode_batch(
        self, texts: Sequence[str], allowed_special: Literal["all"] | AbstractSet[str] = frozenset()
    ) -> list[list[int]]:
        """`encode` for many texts (tiktoken encodes them in parallel threads)."""
        allowed = self._allowed(allowed_special)
        for text in texts:
            self._check_no_special(text, allowed)
        return self.encoding.encode_batch(list(texts), allowed_special=allowed, disallowed_special=())

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # also a 1-D tensor/array
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i!r} is not an int in 0..{self.vocab_size - 1}")
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.encoding.decode(self._check_ids(ids), errors="replace")

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (a special token's are its string)."""
        return self.encoding.decode_single_token_bytes(self._check_ids([token_id])[0])

    def token_str(self, token_id: int) -> str:
        """One token as readable text; a partial UTF-8 character shows as escapes like '\\xe2'."""
        return self.token_bytes(token_id).decode("utf-8", errors="backslashreplace")

    def pieces(self, text: str, allowed_special: Literal["all"] | AbstractSet[str] = frozenset()) -> list[str]:
        """How text is cut into tokens, each shown as text: "a red circle" -> ['a', ' red', ' circle']."""
        return [self.token_str(i) for i in self.encode(text, allowed_special=allowed_special)]

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"Tokenizer(name={self.encoding.name!r}, vocab_size={self.vocab_size}, "
            f"num_ranks={self.num_ranks}, eot_id={self.eot_id}, image_id={self.image_id})"
        )


def compression_stats(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[str, float]:
    """How well the tokenizer compresses texts: bytes per token, tokens per word and per text."""
    num_tokens = sum(len(tokenizer.encode(text)) for text in texts)
    # a word is what lies between spaces, without trailing punctuation ("circle?" -> "circle")
    words = Counter(word.strip(".,?!") for text in texts for word in text.split())
    words.pop("", None)
    lengths = {word: len(tokenizer.encode(" " + word)) for word in words}  # as it appears mid-sentence
    word_lengths = [n for word, n in lengths.items() for _ in range(words[word])]
    num_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {
        "texts": len(texts),
        "words": len(word_lengths),
        "distinct_words": len(set(words)),
        "bytes": num_bytes,
        "tokens": num_tokens,
        "bytes_per_token": num_bytes / max(num_tokens, 1),
        "tokens_per_text": num_tokens / max(len(texts), 1),
        "tokens_per_word": sum(word_lengths) / max(len(word_lengths), 1),
        "max_tokens_per_word": max(word_lengths, default=0),
        "share_words_1_or_2_tokens": sum(n <= 2 for n in word_lengths) / max(len(word_lengths), 1),
    }


# ---------------------------------------------------------------------------------
# Files: tiktoken's .tiktoken format plus a JSON manifest
# ---------------------------------------------------------------------------------


class TokenizerFileError(ValueError):
    """The tokenizer files are missing, corrupt or out of date; the message says how to rebuild."""


class TokenizerFileMissingError(TokenizerFileError, FileNotFoundError):
    """A tokenizer file does not exist."""


def manifest_path(ranks_path: Path) -> Path:
    """The JSON manifest that sits beside a .tiktoken file."""
    return ranks_path.with_suffix(".json")


def rebuild_hint(ranks_path: Path) -> str:
    """The exact command that rewrites the files at ranks_path."""
    if ranks_path.resolve() == DEFAULT_PATH:
        return f"rebuild it with: {REBUILD_COMMAND}"
    return f"rebuild it with: {REBUILD_COMMAND} --out {ranks_path.parent}"


def ranks_to_bytes(ranks: dict[bytes, int]) -> bytes:
    """The .tiktoken format: one line per token, base64 of its bytes, a space, its rank."""
    by_rank = sorted(ranks.items(), key=lambda item: item[1])
    return "".join(f"{base64.b64encode(token).decode('ascii')} {rank}\n" for token, rank in by_rank).encode("ascii")


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """Parse the .tiktoken format; ValueError names the first bad line."""
    ranks: dict[bytes, int] = {}
    for line_no, line in enumerate(data.splitlines(), start=1):
        try:
            token_b64, rank_str = line.split()
            token = base64.b64decode(token_b64, validate=True)
            rank = int(rank_str)
        except (ValueError, binascii.Error) as err:
            shown = line[:60].decode("ascii", "replace")
            raise ValueError(f"line {line_no} is {shown!r}, expected '<base64 bytes> <rank>' ({err})") from None
        if token in ranks:
            raise ValueError(f"line {line_no}: token {token!r} appears twice (ranks {ranks[token]} and {rank})")
        ranks[token] = rank
    return ranks


def _atomic_write(path: Path, data: bytes) -> None:
    # Write a temp file in the same directory and rename it over the target: a build that
    # is interrupted leaves either the old file or the new one, never half of one.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a shipped data file is world-readable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_tokenizer(tokenizer: Tokenizer, directory: str | os.PathLike, corpus: dict | None = None) -> Path:
    """Write <name>.tiktoken and its manifest <name>.json into directory; returns the .tiktoken path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ranks_path = directory / f"{tokenizer.encoding.name}.tiktoken"
    data = ranks_to_bytes(tokenizer.ranks)
    manifest = {
        "name": tokenizer.encoding.name,
        "ranks_file": ranks_path.name,
        "ranks_sha256": hashlib.sha256(data).hexdigest(),
        "num_ranks": tokenizer.num_ranks,
        "vocab_size": tokenizer.vocab_size,
        "pat_str": tokenizer.pat_str,
        "special_tokens": tokenizer.special_tokens,
        "corpus": corpus,
        "rebuild": REBUILD_COMMAND,
    }
    # ranks first: if we stop between the two writes, the old manifest's sha256 no
    # longer matches and loading says to rebuild.
    _atomic_write(ranks_path, data)
    _atomic_write(manifest_path(ranks_path), (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return ranks_path


def _resolve(path: str | os.PathLike | None) -> Path:
    if path is None:
        path = os.environ.get(PATH_ENV_VAR) or DEFAULT_PATH
    path = Path(path)
    return path / f"{NAME}.tiktoken" if path.is_dir() else path


def _read_tokenizer(ranks_path: Path) -> Tokenizer:
    hint = rebuild_hint(ranks_path)
    man_path = manifest_path(ranks_path)
    for p in (ranks_path, man_path):
        if not p.is_file():
            raise TokenizerFileMissingError(f"tokenizer file {p} does not exist; {hint}")
    try:
        manifest = json.loads(man_path.read_text(encoding="utf-8"))
        pat_str, special_tokens, expected_sha = (
            manifest["pat_str"], manifest["special_tokens"], manifest["ranks_sha256"]
        )
    except (ValueError, KeyError, TypeError) as err:
        raise TokenizerFileError(f"tokenizer manifest {man_path} is corrupt ({err!r}); {hint}") from None
    data = ranks_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    if sha != expected_sha:
        raise TokenizerFileError(
            f"tokenizer file {ranks_path} has sha256 {sha}, but its manifest {man_path} expects "
            f"{expected_sha} (corrupt, edited, or from another build); {hint}"
        )
    try:
        ranks = parse_ranks(data)
        return Tokenizer(ranks, pat_str=pat_str, special_tokens=special_tokens, name=manifest.get("name", NAME))
    except ValueError as err:
        raise TokenizerFileError(f"tokenizer file {ranks_path} is invalid: {err}; {hint}") from None


@functools.lru_cache(maxsize=4)
def _load_cached(ranks_path: Path) -> Tokenizer:
    return _read_tokenizer(ranks_path)


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Load the tokenizer at `path` (a .tiktoken file or its directory), $MLLM_TOKENIZER_PATH, or the shipped one."""
    if path is None:
        return _load_cached(_resolve(None).resolve())  # the default is loaded once per process
    return _read_tokenizer(_resolve(path))
