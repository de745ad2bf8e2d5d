"""No host-device synchronisation in the VLMs' training step.

On a GPU, reading a value computed on the device (`bool(t)`, `int(t)`, `t.item()`,
`t.tolist()`) makes Python wait for every queued kernel: a sync that stalls training at
every step. PyTorch's `meta` device holds shapes but no values, so any such read raises
there. A training step (forward, loss, backward) that runs on `meta` therefore reads no
device value, on any machine, no GPU needed. On the CPU the same models still check
their inputs (`runtime.checked_on_host`), as the other tests show.
"""

import pytest
import torch

from mllm_scratch.gpt import GPT
from mllm_scratch.runtime import checked_on_host
from mllm_scratch.shapeworld import ShapeWorldConfig, VQADataset
from mllm_scratch.tokenizer import load_tokenizer
from mllm_scratch.vlm import VLMCollator, vlm_loss
from mllm_scratch.xattn import xattn_loss

TOK = load_tokenizer()


def on_meta(model: torch.nn.Module, batch):
    return model.to("meta"), type(batch)(*[x.to("meta") if torch.is_tensor(x) else x for x in batch])


def test_the_meta_device_catches_a_host_read():
    """The detector works: reading a value on meta raises, so a sync cannot go unnoticed."""
    t = torch.ones(3, device="meta")
    with pytest.raises(Exception):
        bool(t.any())
    assert checked_on_host(torch.ones(1)) and not checked_on_host(t)


def test_unified_vlm_step_reads_no_device_value():
    from test_vlm import tiny_vlm, vqa_items

    model, batch = on_meta(tiny_vlm().train(), VLMCollator(TOK, 16)(vqa_items(4)))
    loss = vlm_loss(model, batch)
    loss.backward()
    assert loss.device.type == "meta" and model.projector[0].weight.grad is not None


def test_cross_attention_vlm_step_reads_no_device_value():
    from test_xattn import tiny_model

    items = [VQADataset("train", 8)[i] for i in range(3)]
    model, batch = on_meta(tiny_model(gates=0.5).train(), VLMCollator(TOK, 1)(items))
    loss = xattn_loss(model, batch)
    loss.backward()
    assert loss.device.type == "meta"
    assert all(p.grad is not None for p in model.blocks.parameters() if p.requires_grad)


def test_hybrid_step_reads_no_device_value():
    from test_hybrid import tiny_hybrid

    from mllm_scratch.hybrid import hybrid_loss

    data = VQADataset("train", 4, ShapeWorldConfig(image_size=32))
    items = [(torch.nn.functional.avg_pool2d(it[0], 2), *it[1:]) for it in (data[i] for i in range(4))]  # 16 px
    model = tiny_hybrid().train()
    model, batch = on_meta(model, VLMCollator(TOK, model.num_image_tokens)(items))
    loss = hybrid_loss(model, batch)
    loss.backward()
    assert loss.device.type == "meta"


def test_plain_lm_step_reads_no_device_value():
    from test_xattn import LM

    from mllm_scratch.gpt import lm_loss

    model = GPT(LM).to("meta")
    ids = torch.zeros(2, 9, dtype=torch.long, device="meta")
    loss = lm_loss(model, (ids[:, :-1], ids[:, 1:]))
    loss.backward()
    assert loss.device.type == "meta"


def test_models_compile_to_one_graph():
    """The same checks would split a `torch.compile` graph; under compile they are skipped.

    fullgraph=True makes any graph break an error; the eager backend traces without
    generating code, so this runs in seconds on any machine.
    """
    from test_vlm import tiny_vlm, vqa_items

    torch._dynamo.reset()
    model = tiny_vlm().eval()
    batch = VLMCollator(TOK, 16)(vqa_items(2))
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(batch.ids, batch.images), model(batch.ids, batch.images))
    with pytest.raises(ValueError, match="exactly 16 <\\|image\\|> tokens"):
        model(batch.ids[:, 1:], batch.images)  # eager, on the CPU: still checked
