#!/usr/bin/env python
"""Train the book's byte-level BPE on ShapeWorld text and write data/tokenizer/.

    python scripts/build_tokenizer.py            # (re)build the shipped files
    python scripts/build_tokenizer.py --check    # exit 1 if they differ from a fresh build
    python scripts/build_tokenizer.py --out DIR  # write (or with --check, compare) DIR instead

The build is deterministic: running it again reproduces the files byte for byte.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so the script runs from a checkout without installing the package

from mllm_scratch.shapeworld import text_corpus  # noqa: E402
from mllm_scratch.tokenizer import (  # noqa: E402
    DEFAULT_DIR,
    SPECIAL_TOKENS,
    Tokenizer,
    compression_stats,
    manifest_path,
    save_tokenizer,
    train_bpe,
)

NUM_SCENES = 2000  # ~15k lines, 0.7 MB of text: every ShapeWorld word many times over
SEED = 0
# 512 ids in all (500 mergeable + 12 special): every frequent ShapeWorld word is one
# token; more merges would only memorise random reading strings.
VOCAB_SIZE = 512


def build(out_dir: Path) -> Path:
    """Train on the ShapeWorld corpus, write the files into out_dir, print what was learned."""
    start = time.perf_counter()
    texts = text_corpus(num_scenes=NUM_SCENES, seed=SEED)
    corpus_s = time.perf_counter() - start

    start = time.perf_counter()
    result = train_bpe(texts, num_ranks=VOCAB_SIZE - len(SPECIAL_TOKENS))
    train_s = time.perf_counter() - start

    tokenizer = Tokenizer(result.ranks, pat_str=result.pat_str)
    corpus = {"function": "mllm_scratch.shapeworld.text_corpus", "num_scenes": NUM_SCENES, "seed": SEED}
    path = save_tokenizer(tokenizer, out_dir, corpus=corpus)

    stats = compression_stats(tokenizer, texts)
    print(f"corpus: {len(texts)} texts, {stats['bytes']} bytes, {stats['distinct_words']} distinct words ({corpus_s:.2f} s)")
    print(f"trained: {len(result.merges)} merges, {tokenizer.num_ranks} mergeable + "
          f"{len(SPECIAL_TOKENS)} special = {tokenizer.vocab_size} ids ({train_s:.2f} s)")
    first = [f"{m.token.decode('utf-8', 'backslashreplace')!r}({m.count})" for m in result.merges[:8]]
    print(f"first merges (token, count): {', '.join(first)}")
    print(f"compression: {stats['bytes_per_token']:.2f} bytes/token, {stats['tokens_per_text']:.2f} tokens/text, "
          f"{stats['tokens_per_word']:.3f} tokens/word (max {stats['max_tokens_per_word']}), "
          f"{100 * stats['share_words_1_or_2_tokens']:.1f}% of words in 1-2 tokens")
    print(f"special tokens: {tokenizer.special_tokens}")
    return path


def differing_files(out_dir: Path, fresh: Path) -> list[Path]:
    """Files in out_dir that are missing or differ from the freshly built ones beside `fresh`."""
    differ = []
    for fresh_file in (fresh, manifest_path(fresh)):
        existing = out_dir / fresh_file.name
        if not existing.is_file() or existing.read_bytes() != fresh_file.read_bytes():
            differ.append(existing)
    return differ


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_DIR, help=f"directory of the files (default {DEFAULT_DIR})")
    parser.add_argument("--check", action="store_true", help="compare --out with a fresh build instead of writing it")
    args = parser.parse_args(argv)

    if not args.check:
        path = build(args.out)
        print(f"wrote {path} and {manifest_path(path).name}")
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        differ = differing_files(args.out, build(Path(tmp)))
    if differ:
        out = "" if args.out.resolve() == DEFAULT_DIR else f" --out {args.out}"
        print(f"DIFFERENT from a fresh build: {', '.join(map(str, differ))}; "
              f"rebuild with: python scripts/build_tokenizer.py{out}")
        return 1
    print(f"OK: {args.out} matches a fresh build byte for byte")
    return 0


if __name__ == "__main__":
    sys.exit(main())
