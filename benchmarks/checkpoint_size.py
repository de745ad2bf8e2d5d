"""The shipped checkpoints' size in each storage format, side by side in one run.

    python benchmarks/checkpoint_size.py

For every file in data/checkpoints/ (read with `read_payload`, so the tensors are exactly
what the file holds), the bytes of:
- `torch.save` of {"format", "name", "config", "state_dict"}: format 1, what the book shipped before;
- that same file compressed with xz (preset 6, as format 2 uses);
- format 2 (`write_payload`): xz of a JSON header and the tensors' bytes, shuffled, each
  tensor whose bytes equal an earlier one's stored once.
It checks that format 2 gives back every tensor bit for bit, and prints each size and the
ratio to format 1. Then, per file, the time of a first `read_payload` (which decompresses the
xz stream) and of a second one in the same process (which finds the stream in the cache that
`read_payload` keeps, by the file's sha256), best of three each. Takes about half a minute on one
CPU thread.
"""

from __future__ import annotations

import io
import lzma
import time

import torch

import mllm_scratch.checkpoints as ck
from mllm_scratch.checkpoints import DEFAULT_DIR, FORMAT_TORCH, read_payload, write_payload


def sizes(path) -> tuple[int, int, int]:
    payload = read_payload(path)
    state_dict = payload["state_dict"]
    saved = io.BytesIO()
    torch.save({**payload, "format": FORMAT_TORCH}, saved)
    packed = io.BytesIO()
    write_payload(packed, payload["name"], payload["config"], state_dict)
    back = read_payload_bytes(packed.getvalue())
    for key, t in state_dict.items():  # bit for bit, not just equal values (-0.0 and 0.0 differ)
        a, b = (x.contiguous().reshape(-1).view(torch.uint8) if x.dtype != torch.bool else x for x in (t, back[key]))
        assert t.dtype == back[key].dtype and t.shape == back[key].shape and torch.equal(a, b), (path.name, key)
    return len(saved.getvalue()), len(lzma.compress(saved.getvalue(), preset=6)), len(packed.getvalue())


def read_payload_bytes(data: bytes) -> dict[str, torch.Tensor]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.pt"
        path.write_bytes(data)
        return read_payload(path)["state_dict"]


def main() -> None:
    torch.set_num_threads(1)
    mib = 2**20
    print(f"{'file':20s}{'torch.save':>12s}{'+ xz':>10s}{'format 2':>10s}   (MiB; ratio to torch.save)")
    total = [0, 0, 0]
    for path in sorted(DEFAULT_DIR.glob("*.pt")):
        row = sizes(path)
        total = [t + r for t, r in zip(total, row)]
        print(f"{path.name:20s}{row[0] / mib:12.2f}{row[1] / mib:10.2f}{row[2] / mib:10.2f}   "
              f"{row[1] / row[0]:.2f} {row[2] / row[0]:.2f}")
    print(f"{'all':20s}{total[0] / mib:12.2f}{total[1] / mib:10.2f}{total[2] / mib:10.2f}   "
          f"{total[1] / total[0]:.2f} {total[2] / total[0]:.2f}")
    print("format 2 gives back every tensor bit for bit")
    print(f"\n{'file':20s}{'first read':>12s}{'again':>10s}   (seconds, best of 3; ratio)")
    first_all = again_all = 0.0
    for path in sorted(DEFAULT_DIR.glob("*.pt")):
        first, again = read_times(path)
        first_all, again_all = first_all + first, again_all + again
        print(f"{path.name:20s}{first:12.3f}{again:10.3f}   {first / again:.1f}x")
    print(f"{'all':20s}{first_all:12.3f}{again_all:10.3f}   {first_all / again_all:.1f}x")


def read_times(path) -> tuple[float, float]:
    """Best-of-3 seconds of a first read (cache emptied) and of a read that finds the stream cached."""
    def best(clear: bool) -> float:
        times = []
        for _ in range(3):
            if clear:
                ck._DECOMPRESSED.clear()
            else:
                read_payload(path)  # make sure it is cached
            start = time.perf_counter()
            read_payload(path)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(True), best(False)


if __name__ == "__main__":
    main()
