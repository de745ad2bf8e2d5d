"""Test-run settings shared by the unit tests and the notebooks (nbval)."""

import os

# Kernels started by nbval inherit this environment: one thread per kernel, CPU only,
# so notebooks run side by side and print what the committed outputs recorded.
for _key, _value in {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MLLM_DEVICE": "cpu",
    "PYTHONHASHSEED": "0",
    "TQDM_DISABLE": "1",
}.items():
    os.environ.setdefault(_key, _value)


def pytest_collection_modifyitems(session, config, items):
    """Compare stdout and rich outputs of notebook cells, never stderr (warnings, progress bars)."""
    for item in items:
        parent = item.parent
        skip = getattr(parent, "skip_compare", None)
        if skip is not None and "stderr" not in skip:
            parent.skip_compare = tuple(skip) + ("stderr",)
