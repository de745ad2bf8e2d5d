"""Chapter 13: the VQ-VAE tokenizer, the judge, and the drawing models (Emu3- and Janus-style)."""

import pytest
import torch

from mllm_scratch.cli import main
from mllm_scratch.imagegen import (
    CAPTION_SLOT, EVAL, DrawConfig, DrawingLM, DrawRecipe, Layout, caption_slot, check_prompt, draw_caption,
    draw_codes, drawing_row, extended_gpt, make_rows, pretrained_drawing_model, reading_row, held_out_captions,
)
from mllm_scratch.judge import Found, Spec, cell_targets, detect, pretrained_judge, score
from mllm_scratch.shapeworld import ShapeObject, generate_scene, relations
from mllm_scratch.tokenizer import load_tokenizer
from mllm_scratch.vq import SCENES, VQConfig, VQVAE, VectorQuantizer, code_usage, nearest_codes, pretrained_vqvae, psnr, scene_images


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


# ----------------------------------------------------------------------------------
# The quantiser


def test_nearest_codes_equals_a_loop_over_the_codebook():
    g = torch.Generator().manual_seed(0)
    z, codebook = torch.randn(2, 5, 5, 8, generator=g), torch.randn(17, 8, generator=g)
    by_hand = torch.stack([((codebook - v) ** 2).sum(1).argmin() for v in z.reshape(-1, 8)]).reshape(2, 5, 5)
    assert torch.equal(nearest_codes(z, codebook), by_hand)


def test_straight_through_copies_the_gradient_and_the_losses_are_the_squared_distances():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4).eval()
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = q(z)
    e = q.codebook[out.codes].permute(0, 3, 1, 2)
    assert torch.equal(out.z_q, z + (e - z).detach()) and torch.allclose(out.z_q, e)  # forward: the code
    weights = torch.randn_like(z)
    (out.z_q * weights).sum().backward()
    assert torch.equal(z.grad, weights)  # backward: the identity
    assert torch.allclose(out.commitment_loss, ((z.detach() - e.detach()) ** 2).mean())
    assert torch.allclose(out.codebook_loss, out.commitment_loss)  # same value, gradients to different sides


def test_ema_codebook_moves_towards_its_vectors_and_dead_codes_restart():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, ema=True, decay=0.5, restart_after=2)
    z = torch.full((1, 2, 1, 1), 3.0)
    chosen = q(z).codes.item()
    assert q.codebook[chosen].sub(3.0).abs().max() < 3.0  # pulled halfway towards the vector
    q(z)  # the other three codes have now been idle for two steps: moved onto the batch's vector
    assert torch.allclose(q.codebook, torch.full((4, 2), 3.0), atol=2.0)
    assert not q.codebook.requires_grad and not q(z).codebook_loss  # EMA: no codebook loss


def test_vqvae_round_trip_shapes_and_errors():
    model = VQVAE(VQConfig(channels=8, codebook_size=8)).eval()
    images = torch.rand(3, 3, 32, 32)
    codes = model.encode(images)
    assert codes.shape == (3, 4, 4) and codes.dtype == torch.long  # one code per 8 x 8 pixels
    out = model.decode(codes)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert torch.equal(model.encode(images), codes)  # deterministic
    with pytest.raises(ValueError, match=r"images must have shape \(batch, 3, 32, 32\)"):
        model.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="codes must be in 0..7, got min 8 and max 8"):
        model.decode(torch.full((1, 4, 4), 8))
    with pytest.raises(ValueError, match=r"codes must have shape \(batch, 4, 4\)"):
        model.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    assert VQVAE(VQConfig(cell=4, channels=8, codebook_size=8)).encode(images).shape == (3, 8, 8)
    with pytest.raises(ValueError, match="multiple of the cell 8"):
        VQConfig(image_size=30)


def test_code_usage_and_psnr():
    assert code_usage(torch.tensor([0, 1, 2, 3]), 8) == {"used": 0.5, "perplexity": pytest.approx(4.0)}
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x + 0.1, x) == pytest.approx(20.0)


# ----------------------------------------------------------------------------------
# Layout, rows and captions


def test_codes_and_ids_round_trip_and_refuse_other_ids():
    layout = Layout(512, 128, grid=8)
    codes = torch.randint(0, 128, (2, 8, 8))
    ids = layout.codes_to_ids(codes)
    assert ids.min() >= 512 and ids.max() < 640 and torch.equal(layout.ids_to_codes(ids), codes)
    assert (layout.boi, layout.eoi, layout.vocab_size) == (640, 641, 642)
    with pytest.raises(ValueError, match="id 5 is not an image code: expected ids 512..639"):
        layout.ids_to_codes(torch.full((1, 64), 5))
    with pytest.raises(ValueError, match="codes must be in 0..127"):
        layout.codes_to_ids(torch.full((1, 8, 8), 128))


def test_rows_put_every_code_at_its_fixed_position_and_score_only_what_they_should(tok):
    layout = Layout(tok.vocab_size, 128, grid=8)
    codes = torch.arange(64).reshape(8, 8)
    ids, targets = drawing_row(layout, tok, "a small red circle.", codes)
    assert len(ids) == len(targets) == layout.length
    assert ids[CAPTION_SLOT] == layout.boi and ids[layout.image_start : layout.image_start + 64] == (codes.flatten() + 512).tolist()
    scored = [t for t, y in enumerate(targets) if y != -100]
    assert scored == list(range(CAPTION_SLOT, CAPTION_SLOT + 65))  # the 64 codes and <eoi>
    assert all(targets[t] == ids[t + 1] for t in scored)
    ids, targets = reading_row(layout, tok, (codes.flatten() + 512).tolist(), "how many objects are there?", "one")
    scored = [t for t, y in enumerate(targets) if y != -100]
    assert [targets[t] for t in scored] == tok.encode(" one") + [tok.eot_id] and all(targets[t] == ids[t + 1] for t in scored)
    assert ids[:CAPTION_SLOT] == [tok.pad_id] * CAPTION_SLOT  # an empty caption slot


def test_every_drawing_caption_fits_its_slot_and_states_what_holds(tok):
    for i in range(300):
        scene = generate_scene(i, SCENES)
        text, spec = draw_caption(scene, i)
        assert len(caption_slot(tok, text)) == CAPTION_SLOT and check_prompt(text) == text
        if spec.relation is not None:
            assert spec.relation in relations(*spec.objects) and f" {spec.relation} " in text


def test_check_prompt_names_the_words_it_does_not_know():
    assert check_prompt("A Small red circle") == "a small red circle."
    with pytest.raises(ValueError, match="'dog'.*never saw"):
        check_prompt("a red dog")
    with pytest.raises(ValueError, match="empty"):
        check_prompt("  ")


def test_extended_gpt_keeps_the_text_model():
    from mllm_scratch.gpt import pretrained_gpt

    base = pretrained_gpt()
    ext = extended_gpt(16, base)
    ids = torch.randint(0, 500, (2, 10))
    assert ext.config.vocab_size == base.config.vocab_size + 18
    assert torch.allclose(ext(ids)[..., : base.config.vocab_size], base(ids), atol=1e-5)


# ----------------------------------------------------------------------------------
# Drawing


def tiny_model():
    from mllm_scratch.gpt import GPTConfig

    torch.manual_seed(0)
    lm = GPTConfig(vocab_size=512 + 8 + 2, context_length=128, dim=32, depth=1, num_heads=2)
    return DrawingLM(DrawConfig("emu3", 8, lm)).eval()


def test_drawing_samples_only_codes_and_the_cache_changes_nothing(tok):
    model = tiny_model()
    codes = draw_codes(model, ["a small red circle.", None], temperature=0, tokenizer=tok)
    assert codes.shape == (2, 4, 4) and codes.min() >= 0 and codes.max() < 8
    # greedy without a cache: the whole sequence each step
    layout = model.layout
    seq = torch.tensor([caption_slot(tok, "a small red circle.") + [layout.boi]])
    for _ in range(layout.num_codes):
        logits = model(seq)[:, -1, layout.code_offset : layout.code_offset + 8]
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True) + layout.code_offset], 1)
    assert torch.equal(layout.ids_to_codes(seq[:, -layout.num_codes:]), codes[:1])


def test_guidance_one_is_plain_sampling_and_guidance_changes_the_logits(tok):
    model = tiny_model()
    a = draw_codes(model, ["a large blue square."] * 3, generator=torch.Generator().manual_seed(1), tokenizer=tok)
    b = draw_codes(model, ["a large blue square."] * 3, guidance=1.0, generator=torch.Generator().manual_seed(1), tokenizer=tok)
    assert torch.equal(a, b)
    # the first guided code, by hand: unconditional logits + scale * (conditional - unconditional)
    captions = ["a large blue square.", "a small red circle.", "a large green cross left of a small yellow diamond."]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)  # a model whose captions matter
    layout = model.layout
    cond = model(torch.tensor([caption_slot(tok, c) + [layout.boi] for c in captions]))[:, -1, 512:520]
    uncond = model(torch.tensor([caption_slot(tok, None) + [layout.boi]]))[:, -1, 512:520]
    for scale in (0.0, 3.0):
        guided = draw_codes(model, captions, guidance=scale, temperature=0, tokenizer=tok)
        assert torch.equal(guided[:, 0, 0], (uncond + scale * (cond - uncond)).argmax(-1))
    with pytest.raises(ValueError, match="guidance -1"):
        draw_codes(model, ["a"], guidance=-1)


def test_janus_needs_a_tower_and_recipes_check_their_fields():
    with pytest.raises(ValueError, match="pass tower="):
        DrawingLM(DrawConfig("janus"))
    with pytest.raises(ValueError, match="method 'dalle'"):
        DrawRecipe(method="dalle")
    with pytest.raises(ValueError, match="cfg_drop"):
        DrawRecipe(cfg_drop=1.0)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="read_every"):
            DrawRecipe(read_every=bad)


def test_make_rows_drops_captions_for_guidance(tok):
    images, scenes = scene_images("train", 200)
    codes = torch.zeros(200, 4, 4, dtype=torch.long)
    rows = make_rows("emu3", Layout(tok.vocab_size, 128), tok, scenes, codes, seed=0, cfg_drop=0.2, task="draw")
    empty = (rows["ids"][:, :CAPTION_SLOT] == tok.pad_id).all(1).float().mean()
    assert 0.1 < empty < 0.3 and len(rows["specs"]) == 200 and not rows["qas"]


def test_make_rows_asks_every_read_every_th_scene(tok):
    images, scenes = scene_images("train", 30)
    codes = torch.zeros(30, 4, 4, dtype=torch.long)
    layout = Layout(tok.vocab_size, 128)
    for every, questions in ((1, 30), (2, 15), (3, 10)):
        rows = make_rows("emu3", layout, tok, scenes, codes, seed=0, task="both", read_every=every)
        assert len(rows["specs"]) == 30 and len(rows["qas"]) == questions
        # each scene's drawing row, then its reading row if it is scene 0, every, 2 * every, ...
        assert rows["index"].tolist() == [j for i in range(30) for j in ([i, i] if i % every == 0 else [i])]
    assert len(make_rows("emu3", layout, tok, scenes, codes, seed=0, task="read", read_every=3)["qas"]) == 30


# ----------------------------------------------------------------------------------
# The judge


def obj(colour, shape, size, x, y):
    return ShapeObject(shape, colour, size, x, y, 8 if size == "small" else 12)


def test_score_per_attribute():
    spec = Spec((obj("red", "circle", "small", 2, 2), obj("blue", "square", "large", 18, 4)), "left of")
    right = [Found("red", "circle", "small", 6, 6), Found("blue", "square", "large", 22, 10)]
    assert all(score(spec, right).values())
    swapped = [Found("red", "circle", "small", 22, 6), Found("blue", "square", "large", 6, 10)]
    assert score(spec, swapped) == {**score(spec, right), "position": False}
    wrong_colour = [Found("green", "circle", "small", 6, 6), Found("blue", "square", "large", 22, 10)]
    out = score(spec, wrong_colour)
    assert not out["colour"] and out["shape"] and not out["colour_shape"] and out["count"] and not out["position"]
    one = Spec((obj("red", "circle", "small", 2, 2),))
    assert score(one, right[:1])["position"] is None and not score(one, right)["count"]


def test_cell_targets_mark_each_centre_once():
    scene = generate_scene(3)
    t = cell_targets([scene])
    assert int(t["object"].sum()) == len(scene.objects)
    assert int((t["colour"] >= 0).sum()) == len(scene.objects)


# ----------------------------------------------------------------------------------
# The shipped models


def test_shipped_judge_reads_real_and_reconstructed_scenes():
    judge, vqvae = pretrained_judge(), pretrained_vqvae()
    _, specs, images, _ = held_out_captions("compositional", 200)
    real = [score(s, f) for s, f in zip(specs, detect(judge, images))]
    assert sum(r["colour_shape"] for r in real) / 200 >= 0.97
    recon = vqvae.decode(vqvae.encode(images))
    assert psnr(recon, images) > 25
    rec = [score(s, f) for s, f in zip(specs, detect(judge, recon))]
    assert sum(r["colour_shape"] for r in rec) / 200 >= 0.9


@pytest.mark.parametrize("method", ["emu3", "janus"])
def test_shipped_drawing_models_load_and_draw(method):
    model = pretrained_drawing_model(method)
    codes = draw_codes(model, ["a large red circle."] * 2, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 4, 4)


def test_draw_command_writes_a_png_and_refuses_unknown_words(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "x.png"
    assert main(["draw", "a small red circle left of a large blue square", "--out", str(out)]) == 0
    assert Image.open(out).size == (256, 256)
    said = capsys.readouterr().out
    assert "a small red circle left of a large blue square." in said and f"guidance {EVAL['guidance']})" in said  # the chapter's
    with pytest.raises(SystemExit):
        main(["draw", "--help"])
    helped = " ".join(capsys.readouterr().out.split())
    assert f"the chapter's, {EVAL['guidance']}," in helped and f"the chapter's, {EVAL['temperature']}," in helped
    assert main(["draw", "a purple elephant", "--out", str(out)]) == 2
    assert "'elephant'" in capsys.readouterr().err
    assert main(["draw", "a red circle", "--count", "0"]) == 2
    assert main(["draw", "a red circle", "--out", str(tmp_path / "missing" / "x.png")]) == 2


def test_column_order_writes_codes_column_by_column():
    layout = Layout(512, 128, "column", grid=8)
    codes = torch.arange(64).reshape(1, 8, 8)
    ids = layout.codes_to_ids(codes)
    assert ids[0, :3].tolist() == [512, 520, 528]  # down the first column
    assert torch.equal(layout.ids_to_codes(ids), codes)
    with pytest.raises(ValueError, match="order 'spiral'"):
        Layout(512, 128, "spiral")


def test_judged_relations_hold_for_every_real_relation_and_refuse_unknown_ones():
    from mllm_scratch.judge import CELL, holds

    for i in range(300):
        scene = generate_scene(i, SCENES)
        objs = scene.objects
        for a in objs:
            for b in objs:
                if a is b:
                    continue
                centre = lambda o: Found(o.colour, o.shape, o.size, ((o.x + o.side / 2) // CELL + 0.5) * CELL,  # noqa: E731
                                         ((o.y + o.side / 2) // CELL + 0.5) * CELL)
                for rel in relations(a, b):
                    assert holds(rel, centre(a), centre(b)), (i, rel)
    with pytest.raises(ValueError, match="relation 'near'"):
        holds("near", Found("red", "circle", "small", 0, 0), Found("red", "circle", "small", 0, 0))


def test_pool_patches_averages_each_2x2_block():
    from mllm_scratch.imagegen import pool_patches

    patches = torch.randn(2, 64, 3)
    pooled = pool_patches(patches, 16)
    grid = patches.reshape(2, 8, 8, 3)
    assert torch.allclose(pooled[:, 5], grid[:, 2:4, 2:4].mean((1, 2)))  # token 5 = row 1, column 1 of the 4 x 4
    with pytest.raises(ValueError, match="cannot pool 64 patches to 9 tokens"):
        pool_patches(patches, 9)
