"""benchmarks/training_throughput.py: the measured matmul peak, and transformers' models at the book's configs.

No timing is asserted here (speed lives in the benchmark's own output): these tests check that
the comparison races like against like, and that the script runs end to end on its smallest path.
"""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "training_throughput.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("training_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_matmul_peak_keeps_the_best_repeat_and_refuses_bad_sizes(bench):
    peak = bench.matmul_peak(torch.device("cpu"), 64, repeats=3)
    assert peak.dtype == torch.float32 and peak.size == 64 and peak.repeats == 3
    assert peak.best >= peak.median > 0
    with pytest.raises(ValueError, match="size 0"):
        bench.matmul_peak(torch.device("cpu"), 0)


def test_transformers_models_match_the_book_configs(bench):
    pytest.importorskip("transformers")
    batch = dict.fromkeys(bench.PRESETS["cpu"], 2)
    cases, references = bench.make_cases(batch), bench.transformers_cases(batch)
    cpu = torch.device("cpu")
    for name in bench.COMPARED:
        factory, loss_fn, data = cases[name]
        _, hf_factory, hf_loss = references[name]
        book, hf = factory(), hf_factory()
        assert hf.config._attn_implementation == "sdpa"
        # The same work: forward + backward FLOPs of one step, counted by PyTorch, are equal.
        assert bench.flops_per_step(book, loss_fn, data, cpu) == bench.flops_per_step(hf, hf_loss, data, cpu), name
        extra = sum(p.numel() for p in hf.parameters()) - sum(p.numel() for p in book.parameters())
        if name == "clip":  # CLIP's ln_pre (+2 x width) and bias-free patch projection (-width), as the note says
            assert extra == book.config.vision.dim and "ln_pre" in bench.PARAM_NOTES["clip"]
        else:
            assert extra == 0, name


def test_comparison_says_how_to_install_transformers_when_it_is_missing(bench, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    cases = bench.make_cases(dict.fromkeys(bench.PRESETS["cpu"], 2))
    bench.compare_with_transformers(cases, ["vit"], {}, torch.device("cpu"), steps=1, rounds=1)
    assert "comparison with its GPT-2, ViT and CLIP is skipped (pip install transformers)" in capsys.readouterr().out


def test_script_prints_the_mfu_and_the_ratio_to_transformers(bench, monkeypatch, capsys):
    pytest.importorskip("transformers")
    args = ["--models", "vit", "--steps", "1", "--rounds", "1", "--mm-size", "64", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *args])
    threads = torch.get_num_threads()
    try:
        bench.main()  # the smallest path of the whole script, in this process (no second import of torch)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("measured matmul peak: torch.mm 64x64 @ 64x64 float32 on 1 thread(s)") for line in lines)
    assert "mm MFU" in out and "book/HF" in out
    row = next(line for line in lines if "ViTForImageClassification" in line).split()
    assert row[0] == "vit" and row[2] == row[3]  # equal parameter counts
    assert float(row[8]) > 0  # book/HF
