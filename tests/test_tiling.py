"""Dynamic tiling (LLaVA-NeXT's AnyRes, InternVL's grid choice): grids, tiles that round-trip, clear errors."""

import pytest
import torch

from mllm_scratch.tiling import (
    best_grid_anyres,
    best_grid_internvl,
    candidate_grids,
    dynamic_tiles,
    fit_and_pad,
    resize,
    tile,
    tile_tags,
    untile,
)


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 3), (3, 1), (2, 3), (4, 2)])
def test_tile_and_untile_round_trip(rows, cols):
    image = torch.rand(3, rows * 32, cols * 32)
    tiles, grid = tile(image, 32)
    assert grid == (rows, cols) and tiles.shape == (rows * cols, 3, 32, 32)
    assert torch.equal(untile(tiles, grid), image)
    # row-major: tile k is the block at row k // cols, column k % cols
    k = rows * cols - 1
    r, c = divmod(k, cols)
    assert torch.equal(tiles[k], image[:, r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32])


def test_tile_batch_is_tile_for_each_image():
    from mllm_scratch.tiling import tile_batch

    images = torch.rand(3, 3, 64, 96)
    cut = tile_batch(images, 32).reshape(3, 6, 3, 32, 32)
    assert all(torch.equal(cut[i], tile(images[i], 32)[0]) for i in range(3))
    with pytest.raises(ValueError, match="images of 40 x 64 px do not cut into 32-px tiles"):
        tile_batch(torch.rand(1, 3, 40, 64), 32)
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        tile_batch(torch.rand(3, 32, 32), 32)


def test_tile_and_untile_refuse_bad_input():
    with pytest.raises(ValueError, match=r"40 x 64 px does not cut into 32-px tiles"):
        tile(torch.rand(3, 40, 64), 32)
    with pytest.raises(ValueError, match=r"\(channels, height, width\)"):
        tile(torch.rand(1, 3, 32, 32), 32)
    with pytest.raises(ValueError, match="tile_size 0 is invalid"):
        tile(torch.rand(3, 32, 32), 0)
    with pytest.raises(ValueError, match="got 5 tiles for a 2 x 3 grid: expected 6"):
        untile(torch.rand(5, 3, 32, 32), (2, 3))


def test_candidate_grids():
    assert candidate_grids(4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    assert candidate_grids(4, min_tiles=3) == [(1, 3), (3, 1), (1, 4), (2, 2), (4, 1)]
    with pytest.raises(ValueError, match="min_tiles 5 is above max_tiles 4"):
        candidate_grids(4, min_tiles=5)
    with pytest.raises(ValueError, match="max_tiles 0 is invalid"):
        candidate_grids(0)


def test_internvl_picks_the_closest_aspect_ratio_and_a_larger_grid_only_with_the_pixels():
    grids = candidate_grids(6)
    assert best_grid_internvl(32, 96, 32, grids) == (1, 3)  # 3:1 wide
    assert best_grid_internvl(100, 48, 32, grids) == (2, 1)  # about 1:2 tall
    assert best_grid_internvl(32, 32, 32, grids) == (1, 1)  # square, too few pixels for 2 x 2
    assert best_grid_internvl(64, 64, 32, grids) == (2, 2)  # square, and enough pixels to fill half of 2 x 2
    with pytest.raises(ValueError, match=r"grid \(0, 2\) is invalid"):
        best_grid_internvl(32, 32, 32, [(0, 2)])
    with pytest.raises(ValueError, match="grids is empty"):
        best_grid_internvl(32, 32, 32, [])


def test_anyres_keeps_the_most_pixels_then_wastes_least():
    grids = candidate_grids(6)
    assert best_grid_anyres(32, 96, 32, grids) == (1, 3)  # fits exactly: nothing wasted
    assert best_grid_anyres(40, 100, 32, grids) == (2, 3)  # (1, 3) would shrink it to 0.8x; (2, 3) keeps 0.96x
    assert best_grid_anyres(16, 16, 32, grids) == (1, 1)  # upscaling keeps no more pixels, so the least waste wins
    with pytest.raises(ValueError, match="height -3 is invalid"):
        best_grid_anyres(-3, 32, 32, grids)


def test_fit_and_pad_centres_the_image_on_a_white_canvas():
    image = torch.zeros(3, 32, 64)  # black, 1:2
    canvas = fit_and_pad(image, (2, 2), 32)  # 64 x 64: scaled to 32 x 64, centred vertically
    assert canvas.shape == (3, 64, 64)
    assert torch.all(canvas[:, 16:48] == 0) and torch.all(canvas[:, :16] == 1) and torch.all(canvas[:, 48:] == 1)
    coloured = fit_and_pad(image, (2, 2), 32, fill=(0.25, 0.5, 0.75))  # one value per channel
    assert torch.equal(coloured[:, 0, 0], torch.tensor([0.25, 0.5, 0.75])) and torch.all(coloured[:, 16:48] == 0)
    with pytest.raises(ValueError, match="fill has 2 values for an image of 3 channels: expected 1 or 3"):
        fit_and_pad(image, (2, 2), 32, fill=(0.1, 0.2))


def test_dynamic_tiles_adds_the_thumbnail_last():
    image = torch.rand(3, 40, 100)
    for rule in ("internvl", "anyres"):
        tiles, grid = dynamic_tiles(image, 32, 6, rule=rule)
        assert tiles.shape == (grid[0] * grid[1] + 1, 3, 32, 32)
        assert torch.equal(tiles[-1], resize(image, 32, 32))
    tiles, grid = dynamic_tiles(torch.rand(3, 32, 32), 32, 6)
    assert grid == (1, 1) and tiles.shape == (1, 3, 32, 32)  # one tile is the whole image: no thumbnail
    with pytest.raises(ValueError, match="rule must be 'internvl' or 'anyres', got 'best'"):
        dynamic_tiles(image, 32, 6, rule="best")


def test_tile_tags():
    assert tile_tags((1, 2)) == ["<tile_1>", "<tile_2>", "<tile_global_thumbnail>"]
    assert tile_tags((2, 1), thumbnail=False) == ["<tile_1>", "<tile_2>"]


# ----------------------------------------------------------------------------------
# The tiled VLM (chapter 10)

import copy  # noqa: E402

from mllm_scratch.checkpoints import round_to_dtype  # noqa: E402
from mllm_scratch.clip import pretrained_image_tower  # noqa: E402
from mllm_scratch.gpt import GPT, GPTConfig  # noqa: E402
from mllm_scratch.tiling import (  # noqa: E402
    PrefixCollator,
    TiledRecipe,
    build_tiled_vlm,
    extend_positions,
    load_tiled_vlm,
    save_tiled_vlm,
    thumbnail_baseline,
)
from mllm_scratch.tokenizer import load_tokenizer  # noqa: E402
from mllm_scratch.vlm import load_vlm  # noqa: E402


@pytest.fixture(scope="module")
def tiled():
    torch.manual_seed(0)
    return build_tiled_vlm(TiledRecipe(), load_vlm(), pretrained_image_tower(), load_tokenizer()).eval()


def test_the_tiled_model_cuts_and_shrinks_as_the_hand_written_functions_do(tiled):
    images = torch.rand(3, 3, 64, 64)
    cut = tiled.tiles(images).reshape(3, 4, 3, 32, 32)
    for i in range(3):
        assert torch.equal(cut[i], tile(images[i], 32)[0])
        assert torch.allclose(tiled.thumbnail(images)[i], resize(images[i], 32, 32), atol=1e-6)
    with pytest.raises(ValueError, match=r"images of 48 x 64 px do not fit the model's 2 x 2 grid of 32 px tiles"):
        tiled.tiles(torch.rand(1, 3, 48, 64))


def test_the_prefix_puts_thumbnail_then_tagged_tiles_and_splice_fills_it_in_order(tiled):
    tok = load_tokenizer()
    prefix = tiled.prefix()
    assert prefix[:64] == [tok.image_id] * 64
    for k in range(4):  # tile k: its tag (" 1" ...), then 16 slots
        start = 64 + 17 * k
        assert tok.decode(prefix[start : start + 1]) == f" {k + 1}"
        assert prefix[start + 1 : start + 17] == [tok.image_id] * 16
    assert tiled.num_image_tokens == 128 == prefix.count(tok.image_id)
    images = torch.rand(2, 3, 64, 64)
    ids = torch.tensor([prefix + tok.encode_ordinary("what does the text say?")] * 2)
    embeds = tiled.splice(ids, images)
    with torch.no_grad():
        thumb = tiled.projector(tiled.encoder(tiled.thumbnail(images)).patches)
        per_tile = tiled.tile_connector(tiled.tile_encoder(tiled.tiles(images)).patches).reshape(2, 4, 16, -1)
    assert torch.allclose(embeds[:, :64], thumb, atol=1e-6)
    for k in range(4):
        start = 64 + 17 * k
        assert torch.allclose(embeds[:, start + 1 : start + 17], per_tile[:, k], atol=1e-6)
        assert torch.equal(embeds[:, start], tiled.lm.embed(ids[:, start : start + 1])[:, 0])  # the tag is text


def test_the_collator_scores_only_the_answer(tiled):
    tok = load_tokenizer()
    batch = PrefixCollator(tok, tiled.prefix())([(torch.rand(3, 64, 64), "what does the text say?", "k7", "reading")])
    scored = batch.labels[0][batch.labels[0] != -100].tolist()
    assert scored == tok.encode_ordinary(" k7") + [tok.eot_id]
    assert batch.ids[0, : len(tiled.prefix())].tolist() == tiled.prefix()


def test_extend_positions_keeps_every_old_output_and_copies_rows():
    torch.manual_seed(0)
    lm = GPT(GPTConfig(context_length=16, dim=32, depth=1, num_heads=2)).eval()
    longer = extend_positions(lm, 24, 4).eval()
    ids = torch.randint(0, 512, (2, 16))
    assert torch.equal(longer(ids), lm(ids))
    assert torch.equal(longer.pos_emb.weight[16:], lm.pos_emb.weight[4:12])
    with pytest.raises(ValueError, match="cannot grow 16 positions to 24 copying rows from 10"):
        extend_positions(lm, 24, 10)
    with pytest.raises(ValueError, match="cannot grow 16 positions to 8"):
        extend_positions(lm, 8, 0)


def test_recipe_errors_name_the_value():
    with pytest.raises(ValueError, match="tile_connector 'conv' is unknown"):
        TiledRecipe(tile_connector="conv")
    with pytest.raises(ValueError, match="image_size 48 is not a whole number of 32 px tiles"):
        TiledRecipe(image_size=48)
    with pytest.raises(ValueError, match="mix_steps must be a positive int, got 0"):
        TiledRecipe(mix_steps=0)
    for share in (0.0, 1.5, "0.5", True):
        with pytest.raises(ValueError, match=f"reading_share must be a number in \\(0, 1\\], got {share!r}"):
            TiledRecipe(reading_share=share)
    for rate in (-1e-3, float("inf")):
        with pytest.raises(ValueError, match=f"tile_tower_lr must be a finite number >= 0 .* got {rate!r}"):
            TiledRecipe(tile_tower_lr=rate)
    assert TiledRecipe(**{**TiledRecipe().to_dict()}) == TiledRecipe()  # the stored dict rebuilds the recipe


def test_save_and_load_round_trip(tiled, tmp_path):
    model = round_to_dtype(copy.deepcopy(tiled))  # the weights a float16 file holds
    save_tiled_vlm(tmp_path / "tiled_vlm.pt", model, "pixelshuffle", recipe=TiledRecipe().to_dict())
    loaded = load_tiled_vlm(tmp_path / "tiled_vlm.pt")
    images = torch.rand(2, 3, 64, 64)
    ids = torch.tensor([model.prefix() + [5, 6]] * 2)
    assert torch.equal(loaded(ids, images), model(ids, images))


def test_the_baseline_sees_each_image_shrunk_as_the_thumbnail(tiled):
    images = torch.rand(2, 3, 64, 64)
    shrunk = thumbnail_baseline([(images[0], "q", "a", "colour"), (images[1], "r", "b", "shape")])
    assert len(shrunk) == 2 and shrunk[1][1:] == ("r", "b", "shape")
    assert torch.allclose(torch.stack([shrunk[0][0], shrunk[1][0]]), tiled.thumbnail(images), atol=1e-6)


@pytest.mark.parametrize("share", [1.0, 0.5, 0.2])
def test_stage_1_holds_the_reading_share_of_reading_questions_and_rehearses_the_other_five_skills(share):
    from collections import Counter
    from dataclasses import replace

    from mllm_scratch.shapeworld import SKILLS
    from mllm_scratch.tiling import tiled_data, tiled_dataset

    recipe = replace(TiledRecipe(), reading_pairs=20, qa_pairs=80, caption_pairs=10, reading_share=share,
                     batch_size=round(20 / share))
    data = tiled_dataset(recipe, "reading")
    skills = Counter(data[i][3] for i in range(len(data)))
    rehearsed = round(20 * (1 - share) / share)
    assert recipe.rehearsed_pairs == rehearsed and len(data) == 20 + rehearsed
    assert skills["reading"] == 20
    assert sorted(k for k in skills if k != "reading") == ([] if share == 1 else sorted(set(SKILLS) - {"reading"}))
    assert all(skills[k] == rehearsed // 5 for k in skills if k != "reading")  # the five skills in turn
    mix = tiled_dataset(recipe, "mix")  # the rehearsed questions are stage 2's first ones: the same scenes
    assert all(mix[i][1:] == data[20 + i][1:] for i in range(rehearsed))
    batch = next(tiled_data(recipe, "reading", load_tokenizer(), [0]))  # one epoch of stage 1 is one batch here
    texts = [load_tokenizer().decode(ids.tolist()) for ids in batch.ids]
    assert sum("what does the text say?" in t for t in texts) == 20


def test_stage_1_cannot_ask_for_more_rehearsal_than_stage_2_holds():
    with pytest.raises(ValueError, match="reading_share 0.3 asks for 23333 rehearsed questions, more than qa_pairs=20000"):
        TiledRecipe(reading_share=0.3)
    with pytest.raises(ValueError, match="stage must be one of"):
        from mllm_scratch.tiling import tiled_dataset

        tiled_dataset(TiledRecipe(), "warmup")


@pytest.mark.parametrize("tower_lr", [0.0, 1e-3])
def test_a_short_run_trains_only_the_connector_projector_lm_and_tower_if_asked_and_freezes_all_after(tower_lr, monkeypatch):
    from dataclasses import replace

    from mllm_scratch.tiling import train_tiled_vlm

    base, tower = load_vlm(), pretrained_image_tower()
    before = {name: copy.deepcopy(part.state_dict()) for name, part in
              (("encoder", base.encoder), ("projector", base.projector), ("lm", base.lm), ("tile_encoder", tower))}
    recipe = replace(TiledRecipe(), reading_pairs=40, qa_pairs=40, caption_pairs=20, batch_size=4, tile_tower_lr=tower_lr)
    import mllm_scratch.tiling as tiling

    tuned_in = []  # per stage: is the reading tower in the optimizer, at tile_tower_lr, and trainable?
    real_train = tiling.train

    def recording_train(model, data, loss_fn, config, optimizer, **kwargs):
        tower = set(map(id, model.tile_encoder.parameters()))
        rates = [g["lr"] for g in optimizer.param_groups if any(id(p) in tower for p in g["params"])]
        tuned_in.append((rates, all(p.requires_grad for p in model.tile_encoder.parameters())))
        return real_train(model, data, loss_fn, config, optimizer=optimizer, **kwargs)

    monkeypatch.setattr(tiling, "train", recording_train)
    model, histories = train_tiled_vlm(recipe, base=base, tile_tower=tower, steps={"reading": 2, "mix": 2},
                                       progress=False, log_every=0)
    assert tuned_in == ([([tower_lr], True), ([], False)] if tower_lr else [([], False), ([], False)])  # stage 1 only
    assert set(histories) == {"reading", "mix"} and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(before["encoder"], model.encoder.state_dict())
    assert same(before["tile_encoder"], model.tile_encoder.state_dict()) == (tower_lr == 0)  # tuned in stage 1 if asked
    assert same(before["lm"], base.lm.state_dict())  # the tiled model trains a copy of chapter 06's LM
    assert not same(before["projector"], model.projector.state_dict())
    tuned = model.lm.state_dict()
    assert any(not torch.equal(v, tuned[k]) for k, v in before["lm"].items() if k.startswith("blocks."))
    with pytest.raises(ValueError, match="steps names unknown stages \\['stage2'\\]"):
        train_tiled_vlm(recipe, base=base, tile_tower=tower, steps={"stage2": 1})
    with pytest.raises(ValueError, match="steps\\['reading_tower'\\] was given with a tile_tower"):
        train_tiled_vlm(recipe, base=base, tile_tower=tower, steps={"reading_tower": 1})


def test_the_shipped_file_is_refused_once_chapter_06s_model_is_rebuilt(tiled, tmp_path, monkeypatch):
    import mllm_scratch.tiling as tiling
    from mllm_scratch.checkpoints import CheckpointError

    path = tmp_path / "tiled_vlm.pt"
    save_tiled_vlm(path, tiled, "pixelshuffle", recipe=TiledRecipe().to_dict(), base_sha256="0" * 64)
    monkeypatch.setattr(tiling, "TILED_CHECKPOINT", path)  # as if it were the shipped file
    with pytest.raises(CheckpointError, match="trained from another chapter-06 model"):
        load_tiled_vlm()
    monkeypatch.setattr(tiling, "_shipped_vlm_sha256", lambda: "0" * 64)
    assert isinstance(load_tiled_vlm(), tiling.TiledVLM)


def test_the_first_recipes_results_were_made_with_it_and_a_results_file_is_never_merged_across_recipes(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    import search_rows
    from tiled_reading_only_seeds import READING_ONLY, RESULTS

    saved = json.loads(RESULTS.read_text())
    assert saved["recipe"] == READING_ONLY.to_dict() and [r["seed"] for r in saved["rows"]] == [0, 1, 2]
    out = tmp_path / "rows.json"
    run = lambda i: {"row": i, "seconds": 0.0}  # noqa: E731
    header = {"what": "x", "recipe": {"steps": 1}}
    assert search_rows.main(["--out", str(out)], "doc", ["a"], run, out, lambda: header, lambda rows: "") == 0
    with pytest.raises(SystemExit):  # another recipe: refused, and the file is left as it was
        search_rows.main(["--out", str(out)], "doc", ["a"], run, out, lambda: {**header, "recipe": {"steps": 2}}, lambda rows: "")
    assert json.loads(out.read_text())["recipe"] == {"steps": 1}


def test_budget_vlm_spends_a_quarter_of_the_image_tokens_and_trains_as_chapter_06s_model(tmp_path):
    from mllm_scratch.tiling import BudgetVLM, build_budget_vlm
    from mllm_scratch.vlm import VLMCollator, VLMRecipe, save_vlm, train_stage

    from mllm_scratch.vlm import load_vlm

    tok, base = load_tokenizer(), load_vlm()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for kind in ("avgpool", "cabstractor", "queries", "pixelshuffle"):  # every connector of 16 tokens; pixel shuffle last
        model = build_budget_vlm(base, kind)
        assert isinstance(model, BudgetVLM) and model.num_image_tokens == 16 == base.num_image_tokens // 4
        assert model.encoder is not base.encoder and model.lm is not base.lm
        batch = VLMCollator(tok, 16)([(torch.rand(3, 32, 32), "what colour is the circle?", "red", "colour")])
        assert model(batch.ids, batch.images).shape == (*batch.ids.shape, tok.vocab_size)
    recipe = VLMRecipe(caption_pairs=8, qa_pairs=8, batch_size=4)
    trained = {1: {"projector"}, 2: {"projector", "lm"}}  # chapter 06's stages: the connector, then it and the LM
    for stage in (1, 2):
        start = {k: v.clone() for k, v in model.state_dict().items()}
        train_stage(model, recipe, stage, tok, steps=2, log_every=0, progress=False)
        assert {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, start[k])} == trained[stage]
    assert all(torch.equal(base.state_dict()[k], v) for k, v in before.items())  # the base model is untouched
    said = model.generate(tok, torch.rand(2, 3, 32, 32), ["what colour is the circle?"] * 2, max_new_tokens=2)
    assert len(said) == 2 and all(isinstance(s, str) for s in said)
    for bad in ("bogus", "mlp"):
        with pytest.raises(ValueError, match=f"connector '{bad}' is invalid: expected one that reduces"):
            build_budget_vlm(base, bad)
    for kind in ("avgpool", "cabstractor", "queries", "pixelshuffle"):  # factor 4: 4 x 4 blocks, 4 tokens
        small = build_budget_vlm(base, kind, factor=4)
        assert small.num_image_tokens == 4 and small.image_tokens(torch.rand(2, 3, 32, 32)).shape == (2, 4, 128)
    for bad in (3, 0, 9, True, 2.0):
        with pytest.raises(ValueError, match=f"factor {bad!r} is invalid: expected a positive int that divides the 8 x 8"):
            build_budget_vlm(base, "avgpool", factor=bad)
    assert build_budget_vlm(base, "queries", factor=3).num_image_tokens == 4  # (8 // 3)^2 learned queries
    with pytest.raises(ValueError, match="save_vlm saves a UnifiedVLM, got a BudgetVLM"):
        save_vlm(tmp_path / "budget.pt", model)


def test_train_budget_vlm_starts_where_chapter_06s_recipe_starts_and_runs_its_stages():
    from dataclasses import replace

    from mllm_scratch.tiling import BudgetVLM, train_budget_vlm
    from mllm_scratch.vlm import SHIPPED_RECIPE, build_vlm

    tok = load_tokenizer()
    recipe = replace(SHIPPED_RECIPE, caption_pairs=8, qa_pairs=8, batch_size=4, stage1_steps=1, spatial_steps=1,
                     stage2_steps=1, warmup_steps=1)
    model, histories = train_budget_vlm(recipe, "avgpool", tok, factor=4, progress=False, log_every=0)
    assert isinstance(model, BudgetVLM) and model.connector_kind == "avgpool" and model.num_image_tokens == 4
    assert list(histories) == ["stage1", "spatial", "stage2"] and not model.training
    start = build_vlm(recipe, tok)  # the tower chapter 06's recipe starts from, frozen in every stage
    assert all(torch.equal(v, start.encoder.state_dict()[k]) for k, v in model.encoder.state_dict().items())
    assert not any(torch.equal(v, start.lm.state_dict()[k]) for k, v in model.lm.state_dict().items()
                   if k.endswith("weight") and v.dim() == 2)  # the LM trained in the spatial stage and stage 2
    with pytest.raises(TypeError, match="recipe must be a VLMRecipe"):
        train_budget_vlm({"seed": 0}, "avgpool", tok)
    # the connector starts from the recipe's seed: captured as stage 1 begins
    import mllm_scratch.vlm as vlm

    starts = []

    def first_stage_only(model, recipe, stage, *args, **kwargs):
        starts.append({k: v.clone() for k, v in model.projector.state_dict().items()})
        raise StopIteration

    original = vlm.train_stage
    vlm.train_stage = first_stage_only
    try:
        for seed in (0, 0, 1):
            with pytest.raises(StopIteration):
                train_budget_vlm(replace(recipe, seed=seed), "avgpool", tok)
    finally:
        vlm.train_stage = original
    same = lambda a, b: all(torch.equal(a[k], b[k]) for k in a)  # noqa: E731
    assert same(starts[0], starts[1]) and not same(starts[0], starts[2])
