"""Write every diagram of `mllm_scratch.diagrams` to a PNG file, for review: python scripts/draw_diagrams.py [folder]."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from mllm_scratch import diagrams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("folder", nargs="?", default="/tmp/diagrams", help="where the PNG files go (default /tmp/diagrams)")
    parser.add_argument("--only", nargs="*", help="draw only these diagrams (function names)")
    args = parser.parse_args()
    out = Path(args.folder)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib.pyplot as plt

    for name in diagrams.__all__:
        if args.only and name not in args.only:
            continue
        fig = getattr(diagrams, name)()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=diagrams.DPI, bbox_inches="tight", pad_inches=0.05)
        plt.close(fig)
        print(f"{path}  {name}{inspect.signature(getattr(diagrams, name))}")


if __name__ == "__main__":
    main()
