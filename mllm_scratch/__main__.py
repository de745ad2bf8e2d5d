"""`python -m mllm_scratch ...`: the book's command line (see mllm_scratch/cli.py)."""

import sys

from mllm_scratch.cli import main

sys.exit(main())
