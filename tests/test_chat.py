import math
import re

import pytest
import torch

from mllm_scratch.chat import (
    DESCRIBE,
    ChatCollator,
    IGNORE_INDEX,
    ChatTemplate,
    Turn,
    chat_loss,
    check_conversation,
    dialogue,
    dpo_loss,
    pope_questions,
    pope_scores,
    rejected_answer,
    reply,
    sequence_logprobs,
    splice_images,
    two_image_question,
)
from mllm_scratch.shapeworld import QA, SKILLS, ShapeWorldConfig, caption, generate_scene, questions, relations
from mllm_scratch.tokenizer import ASSISTANT, END, IMAGE, USER, load_tokenizer

N = 4  # image slots per image in these tests


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def template(tok):
    return ChatTemplate(tok, N)


def test_encode_writes_roles_images_and_ends_and_scores_only_the_assistant(tok, template):
    turns = [Turn("user", f"{IMAGE}what colour is the circle?"), Turn("assistant", "red"),
             Turn("user", "and the square?"), Turn("assistant", "blue")]
    ids, labels = template.encode(turns, num_images=1)
    sp = tok.special_tokens
    # each piece of text after a space, as the tokenizer learned words: " red" is one token
    q1, a1, q2, a2 = (tok.encode_ordinary(" " + t) for t in ("what colour is the circle?", "red", "and the square?", "blue"))
    assert len(a1) == len(a2) == 1
    expected = ([sp[USER]] + [tok.image_id] * N + q1 + [sp[END]] + [sp[ASSISTANT]] + a1 + [sp[END]]
                + [sp[USER]] + q2 + [sp[END]] + [sp[ASSISTANT]] + a2 + [sp[END]])
    assert ids == expected
    scored = [i for i, y in zip(ids, labels) if y != IGNORE_INDEX]
    assert scored == a1 + [sp[END]] + a2 + [sp[END]]  # the replies and the <|end|> that closes each, nothing else
    assert all(y in (IGNORE_INDEX, i) for i, y in zip(ids, labels))
    assert template.prompt(turns[:3], num_images=1) == expected[: expected.index(sp[ASSISTANT], len(q1) + N + 3)] + [sp[ASSISTANT]]


@pytest.mark.parametrize("turns", [
    [Turn("user", "hello")],
    [Turn("user", f"{IMAGE}{IMAGE}which image has more circles?"), Turn("assistant", "the second")],
    [Turn("user", f"look: {IMAGE} and {IMAGE}  "), Turn("assistant", " two\nlines "), Turn("user", "héllo ✓ 日本")],
    [("user", f"{IMAGE}"), ("assistant", "a small red circle.")],
])
def test_decode_reads_back_the_turns_encode_wrote(template, turns):
    ids, _ = template.encode(turns)
    assert template.decode(ids) == check_conversation(turns)


def test_generated_dialogues_round_trip(template):
    config = ShapeWorldConfig()
    for seed in range(50):
        d = dialogue(generate_scene(seed, config), seed, config)
        assert template.decode(template.encode(d.turns, num_images=1)[0]) == d.turns


@pytest.mark.parametrize("turns, images, message", [
    ([], None, "empty"),
    ("hello", None, "expected a list"),
    ([Turn("assistant", "hi")], None, "assistant turn, but it is the first turn"),
    ([Turn("user", "a"), Turn("user", "b")], None, "turn 1 is a user turn, but it follows a user turn"),
    ([Turn("user", "a"), Turn("bot", "b")], None, "role 'bot'"),
    ([Turn("user", "a"), Turn("assistant", f"{IMAGE} b")], None, "images belong in user turns"),
    ([Turn("user", "a"), Turn("assistant", "  ")], None, "is empty"),
    ([Turn("user", f"a {END} b")], None, "contains '<|end|>'"),
    ([Turn("user", 3)], None, "expected a string"),
    ([Turn("user", f"{IMAGE}a")], 2, "1 <|image|> marker but 2 images were given"),
    ([Turn("user", "a")], 1, "0 <|image|> markers but 1 image was given"),
    (["oops"], None, "expected Turn(role, text)"),
])
def test_malformed_conversations_are_refused_by_name(template, turns, images, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        template.encode(turns, num_images=images)


def test_prompt_and_decode_errors(tok, template):
    with pytest.raises(ValueError, match="ends with an assistant turn"):
        template.prompt([Turn("user", "a"), Turn("assistant", "b")])
    sp = tok.special_tokens
    with pytest.raises(ValueError, match="not a role token"):
        template.decode(tok.encode_ordinary("hi"))
    with pytest.raises(ValueError, match="no '<\\|end\\|>'"):
        template.decode([sp[USER]] + tok.encode_ordinary("hi"))
    with pytest.raises(ValueError, match="run of 3 image ids"):
        template.decode([sp[USER]] + [tok.image_id] * 3 + [sp[END]])
    with pytest.raises(ValueError, match="num_image_tokens 0"):
        ChatTemplate(tok, 0)


def test_dialogues_answer_what_the_scene_shows_and_point_back_correctly():
    config = ShapeWorldConfig()
    seen = set()
    for seed in range(300):
        scene = generate_scene(seed, config)
        d = dialogue(scene, seed, config, max_questions=3)
        assistant = [t for t in d.turns[1::2]]
        users = [t for t in d.turns[0::2]]
        assert len(assistant) == len(d.skills) and users[0].text.startswith(IMAGE)
        assert sum(t.text.count(IMAGE) for t in users) == 1
        assert d == dialogue(scene, seed, config, max_questions=3)  # a seed gives one dialogue
        for k, (user, reply, skill) in enumerate(zip(users, assistant, d.skills)):
            seen.add(skill)
            question = user.text.replace(IMAGE, "")
            if skill == "caption":
                assert (question, reply.text, k) == (DESCRIBE, caption(scene), 0)
            elif skill == "pointing":  # "it" is the one object the previous question named
                assert d.skills[k - 1] in ("colour", "shape")
                prev = users[k - 1].text.replace(IMAGE, "").rstrip("?").split()
                it = [o for o in scene.objects if (o.shape == prev[-1] if d.skills[k - 1] == "colour"
                                                   else o.colour == prev[-2])]
                rel, name = question[len("is it "):-1].split(" the ")
                other = [o for o in scene.objects if o.name == name]
                assert len(it) == 1 and len(other) == 1 and it != other
                assert reply.text == ("yes" if rel in relations(it[0], other[0]) else "no")
                assert reply.text == "yes" or relations(other[0], it[0])  # a "no" is the opposite of what holds
            else:  # one of the scene's own questions, with its answer
                assert QA(question, reply.text, skill) in questions(scene, seed, config=config)
        assert len(d.skills) - (d.skills[0] == "caption") <= 3
    assert seen == {"caption", "pointing", "colour", "shape", "count", "spatial", "existence"}  # no reading at 32 px
    with_text = next(s for s in (generate_scene(i, config) for i in range(100)) if s.text)
    asked = {skill for seed in range(20) for skill in dialogue(with_text, seed, config, skills=SKILLS).skills}
    assert "reading" in asked  # when asked for


def test_two_image_questions_need_both_images():
    from collections import Counter

    from mllm_scratch.chat import SAME_COUNT, TwoImageDataset

    data = TwoImageDataset("test", 600)
    by_first, by_second = Counter(), Counter()
    for i in range(len(data)):
        first, second = data.scenes(i)
        qa = two_image_question(first, second)
        assert qa.question == SAME_COUNT and qa.answer == ("yes" if i % 2 == 0 else "no")
        assert qa.answer == ("yes" if len(first.objects) == len(second.objects) else "no")
        by_first[len(first.objects), qa.answer] += 1
        by_second[len(second.objects), qa.answer] += 1
    assert data[4][1][1].text == "yes" and data[5][1][1].text == "no"
    # The best guess from one image's count: the answer it most often goes with, per count
    for counts in (by_first, by_second):
        best = sum(max(counts[n, "yes"], counts[n, "no"]) for n in {n for n, _ in counts})
        assert best / len(data) < 0.6, counts
    with pytest.raises(IndexError, match="index 600 out of range"):
        data.scenes(600)


def test_two_image_answers_with_counts_say_both_counts_then_the_same_verdict():
    from mllm_scratch.chat import TwoImageDataset
    from mllm_scratch.shapeworld import NUMBER_WORDS

    plain, counted = TwoImageDataset("test", 40), TwoImageDataset("test", 40, counts=True)
    for i in range(len(plain)):
        first, second = counted.scenes(i)
        assert (first, second) == plain.scenes(i)  # the same two scenes: only the answer's words differ
        answer = counted[i][1][1].text
        assert answer == f"{NUMBER_WORDS[len(first.objects)]} and {NUMBER_WORDS[len(second.objects)]}, so {plain[i][1][1].text}"
        assert torch.equal(counted[i][0], plain[i][0]) and counted[i][1][0] == plain[i][1][0]
    assert two_image_question(first, first, counts=True).answer.endswith(", so yes")


def test_what_changed_pairs_differ_by_exactly_the_edit_their_answer_names():
    from collections import Counter

    from mllm_scratch.chat import CHANGE_KINDS, WHAT_CHANGED, ChangeDataset, change_kind

    config = ShapeWorldConfig()
    data = ChangeDataset("test", 300)
    kinds = Counter()
    for i in range(len(data)):
        first, second, qa = data.scenes(i)
        kind = change_kind(qa.answer)
        assert qa.question == WHAT_CHANGED and kind == CHANGE_KINDS[i % 3]
        kinds[kind] += 1
        assert (first.text, first.text_box) == (second.text, second.text_box)  # the text stays
        before, after = set(first.objects), set(second.objects)
        gone, new = before - after, after - before
        words = qa.answer.split()
        if kind == "colour":  # one object, in the same place, of another colour
            (old,), (now,) = gone, new
            assert (old.shape, old.size, old.x, old.y) == (now.shape, now.size, now.x, now.y) and old.colour != now.colour
            assert qa.answer == f"the {old.colour} {old.shape} turned {now.colour}"
        elif kind == "gone":
            (old,) = gone
            assert not new and qa.answer == f"the {old.name} is gone" and len(second.objects) >= 1
        else:  # a new object, clear of the others and of the text
            (now,) = new
            assert not gone and words[1:3] == [now.colour, now.shape] and words[0] == ("an" if now.colour[0] in "aeiou" else "a")
            assert len(second.objects) <= config.max_objects
            for box in [o.box for o in first.objects] + ([first.text_box] if first.text_box else []):
                assert now.box[2] + config.gap <= box[0] or box[2] + config.gap <= now.box[0] \
                    or now.box[3] + config.gap <= box[1] or box[3] + config.gap <= now.box[1], (now, box)
        pairs = [(o.colour, o.shape) for o in second.objects]
        assert len(set(pairs)) == len(pairs)  # so "the red circle" names one object
        assert not set(pairs) & set(config.held_out)  # the test split's rule holds after the edit
    assert kinds == {k: 100 for k in CHANGE_KINDS}
    images, turns, skills = data[2]
    assert images.shape == (2, 3, 32, 32) and check_conversation(turns, num_images=2) == turns
    assert turns[0].text == IMAGE * 2 + WHAT_CHANGED and skills == ("what changed",)
    assert not torch.equal(images[0], images[1])
    assert change_kind("the red circle") is None and change_kind("yes") is None


def test_edit_scene_refuses_edits_a_scene_cannot_take():
    from mllm_scratch.chat import edit_scene
    from mllm_scratch.shapeworld import Scene, ShapeObject

    one = Scene((ShapeObject("circle", "red", "small", 4, 4, 6),), None, 32)
    assert edit_scene(one, "gone", 0) is None  # never an empty image
    full = Scene(tuple(ShapeObject(s, "red", "small", 4 + 9 * j, 4, 6) for j, s in enumerate(("circle", "square", "cross"))),
                 None, 32)
    assert edit_scene(full, "added", 0) is None  # max_objects is 3
    scene, qa = edit_scene(one, "colour", 0)
    assert scene.objects[0].colour != "red" and qa.answer.startswith("the red circle turned ")
    with pytest.raises(ValueError, match="kind 'moved' is invalid: expected one of colour, gone, added"):
        edit_scene(one, "moved", 0)


def test_edit_scene_keeps_new_objects_on_the_canvas_and_the_compositional_rule():
    from mllm_scratch.chat import ChangeDataset, edit_scene

    wide = ShapeWorldConfig(canvas=(32, 64), snap=4)
    added = 0
    for seed in range(200):
        scene = generate_scene(seed, wide, "train")
        edited = edit_scene(scene, "added", seed, wide, "train")
        if edited is None:
            continue
        added += 1
        (new,) = set(edited[0].objects) - set(scene.objects)
        x0, y0, x1, y1 = new.box
        assert 0 <= x0 and x1 <= 64 and 0 <= y0 and y1 <= 32 and x0 % 4 == 0 and y0 % 4 == 0, new
    assert added > 50
    config = ShapeWorldConfig()
    data = ChangeDataset("compositional", 60)
    for i in range(len(data)):  # every edited compositional scene still holds a held-out pair
        assert any((o.colour, o.shape) in config.held_out for o in data.scenes(i)[1].objects), i
    with pytest.raises(ValueError, match=r"the scene is 32 px \(canvas None\) but config is 32 px \(canvas \(32, 64\)\)"):
        edit_scene(generate_scene(0), "colour", 0, wide)
    with pytest.raises(ValueError, match="split 'tset' is unknown"):
        edit_scene(generate_scene(0), "colour", 0, split="tset")


def test_pope_questions_are_balanced_and_true():
    config = ShapeWorldConfig()
    for seed in range(100):
        scene = generate_scene(seed, config)
        qas = pope_questions(scene, seed, config)
        assert sorted(q.answer for q in qas) == ["no", "yes"]
        present = {o.name for o in scene.objects}
        for q in qas:
            name = " ".join(q.question.rstrip("?").split()[-2:])
            assert (name in present) == (q.answer == "yes")


def _article(name: str) -> str:
    return "an" if name[0] in "aeiou" else "a"


def test_binding_questions_ask_about_a_colour_and_a_shape_that_are_there_apart():
    """The binding kind asks about absent pairs of present parts; the near kind (the default) is pinned to the items
    it gave before the binding kind existed, as the shipped model's POPE score was measured on them."""
    from mllm_scratch.chat import PopeDataset, binding_misses

    config = ShapeWorldConfig()
    asked = 0
    for seed in range(200):
        scene = generate_scene(seed, config)
        misses = binding_misses(scene, config)
        colours, shapes = {o.colour for o in scene.objects}, {o.shape for o in scene.objects}
        assert all(c in colours and s in shapes and f"{c} {s}" not in {o.name for o in scene.objects} for c, s in misses)
        if not misses:
            assert len(colours) == 1 or len(shapes) == 1 or all(
                (c, s) not in config.train_pairs() or f"{c} {s}" in {o.name for o in scene.objects}
                for c in colours for s in shapes)
            with pytest.raises(ValueError, match="has no absent pair of a colour and a shape it holds"):
                pope_questions(scene, seed, config, kind="binding")
            continue
        asked += 1
        no = next(q for q in pope_questions(scene, seed, config, kind="binding") if q.answer == "no")
        assert tuple(no.question.rstrip("?").split()[-2:]) in misses
    assert asked > 50
    near = ["purple triangle", "red cross", "purple circle", "blue square", "yellow circle", "purple cross"]
    assert [t[0].text for _, t, _ in PopeDataset("test", 6)] == [f"{IMAGE}is there {_article(n)} {n}?" for n in near]
    data = PopeDataset("test", 40, kind="binding")
    assert [turns[1].text for _, turns, _ in data] == ["yes", "no"] * 20
    assert [t for _, t, _ in PopeDataset("test", 40)] != [t for _, t, _ in data]  # near misses by default
    with pytest.raises(ValueError, match="kind 'far' is invalid"):
        PopeDataset("test", 4, kind="far")
    with pytest.raises(ValueError, match="kind 'far' is invalid"):
        pope_questions(generate_scene(0, config), 0, config, kind="far")


def test_pope_scores_by_hand():
    truth = ["yes", "no", "yes", "no"]
    always_yes = pope_scores(["yes"] * 4, truth)
    assert always_yes == {"accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "yes_ratio": 1.0}
    s = pope_scores(["yes", "yes", "no", "maybe"], truth)
    assert s["accuracy"] == 0.25 and s["precision"] == 0.5 and s["recall"] == 0.5 and s["yes_ratio"] == 0.5
    assert s["f1"] == pytest.approx(0.5)
    never = pope_scores(["no", "no"], ["yes", "no"])
    assert never == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert pope_scores([" yes ", "Yes"], ["yes", "yes"])["accuracy"] == 0.5  # exact match after stripping spaces
    with pytest.raises(ValueError, match="3 predictions for 4 answers"):
        pope_scores(["yes"] * 3, truth)
    with pytest.raises(ValueError, match="not yes/no"):
        pope_scores(["yes"], ["red"])


def test_rejected_answers_are_wrong_but_of_the_same_kind():
    config = ShapeWorldConfig()
    for seed in range(200):
        for qa in questions(generate_scene(seed, config), seed, ["colour", "shape", "count", "existence"], config):
            wrong = rejected_answer(qa, seed, config)
            assert wrong != qa.answer
            for pool in (("yes", "no"), config.colours, config.shapes, ("one", "two", "three")):
                assert (qa.answer in pool) == (wrong in pool)
    assert rejected_answer(QA("do the two images have the same number of objects?", "yes", "two images"), 0) == "no"
    with pytest.raises(ValueError, match="no perturbation"):
        rejected_answer(QA("what does the text say?", "a7", "reading"), 0)


def test_sequence_logprobs_sum_the_scored_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, 1, IGNORE_INDEX, IGNORE_INDEX], [2, 2, 2, 2, 6]])
    by_hand = [sum(math.log(torch.softmax(logits[b, t], -1)[labels[b, t]].item())
                   for t in range(5) if labels[b, t] != IGNORE_INDEX) for b in range(2)]
    torch.testing.assert_close(sequence_logprobs(logits, labels), torch.tensor(by_hand))
    with pytest.raises(ValueError, match="differ"):
        sequence_logprobs(logits, labels[:, :4])


def test_dpo_loss_equals_the_formula_by_hand_and_pushes_the_chosen_answer_up():
    pc, pr = torch.tensor([-1.0, -3.0, -2.0], requires_grad=True), torch.tensor([-2.0, -1.0, -2.5], requires_grad=True)
    rc = torch.tensor([-1.5, -2.0, -2.0], requires_grad=True)
    rr = torch.tensor([-1.5, -2.0, -2.0], requires_grad=True)
    beta = 0.5
    by_hand = sum(-math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
                  for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())) / 3
    loss, stats = dpo_loss(pc, pr, rc, rr, beta)
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    assert stats["reward_accuracy"].item() == pytest.approx(2 / 3)
    raised, _ = dpo_loss(rc + torch.tensor([1.0, 0, 0]), rr, rc, rr, beta)  # only one chosen answer made likelier
    assert raised.item() < math.log(2)
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()  # descent raises the chosen, lowers the rejected
    assert rc.grad is None and rr.grad is None  # the reference is frozen: no gradient reaches it
    same, _ = dpo_loss(rc, rr, rc, rr)
    assert same.item() == pytest.approx(math.log(2))  # policy = reference: no preference yet
    with pytest.raises(ValueError, match="beta 0"):
        dpo_loss(pc, pr, rc, rr, 0)
    with pytest.raises(ValueError, match=re.escape("'policy_rejected': (2,)")):
        dpo_loss(pc, pr[:2], rc, rr)
    with pytest.raises(ValueError, match="B >= 1"):
        dpo_loss(*(torch.zeros(0),) * 4)


def tiny_chat_model(tok):
    from mllm_scratch.gpt import GPTConfig
    from mllm_scratch.vit import ViTConfig
    from mllm_scratch.vlm import UnifiedVLM, VLMConfig

    torch.manual_seed(0)
    vision = ViTConfig(image_size=32, patch_size=16, dim=16, depth=1, num_heads=2)  # 4 image tokens: N
    lm = GPTConfig(vocab_size=tok.vocab_size, context_length=96, dim=32, depth=1, num_heads=2)
    return UnifiedVLM(VLMConfig(vision=vision, lm=lm, image_id=tok.image_id)).eval()


def test_splice_images_places_each_image_in_its_own_slots(tok, template):
    model = tiny_chat_model(tok)
    images = torch.rand(3, 3, 32, 32)
    one = ChatCollator(template)([(images[:1], [Turn("user", f"{IMAGE}hi")]), (images[1:2], [Turn("user", f"{IMAGE}hi")])])
    torch.testing.assert_close(splice_images(model, one.ids, one.images), model.splice(one.ids, one.images))
    # Two images in row 0 (before and after words), none in row 1, one in row 2: spliced by hand.
    batch = ChatCollator(template)([(images[:2], [Turn("user", f"{IMAGE}and{IMAGE}which?")]),
                                    (None, [Turn("user", "no image")]),
                                    (images[2:], [Turn("user", f"x {IMAGE}")])])
    by_hand = model.lm.embed(batch.ids).clone()
    tokens = iter(model.image_tokens(images))
    for row in range(3):
        where = (batch.ids[row] == tok.image_id).nonzero().flatten().tolist()
        for start in where[::N]:
            by_hand[row, start:start + N] = next(tokens)
    torch.testing.assert_close(splice_images(model, batch.ids, batch.images), by_hand)
    with pytest.raises(ValueError, match="for 2 images"):
        splice_images(model, batch.ids, images[:2])


def test_the_collator_pads_and_scores_only_replies(tok, template):
    batch = ChatCollator(template)([(None, [Turn("user", "a"), Turn("assistant", "red")]),
                                    (torch.rand(1, 3, 32, 32), [Turn("user", f"{IMAGE}what colour is the big circle?")])])
    assert batch.images.shape == (1, 3, 32, 32) and batch.ids.shape == batch.labels.shape
    assert (batch.labels[1] == IGNORE_INDEX).all()  # no reply in row 1: nothing to learn
    assert (batch.ids[0, batch.labels[0] != IGNORE_INDEX] == batch.labels[0, batch.labels[0] != IGNORE_INDEX]).all()
    pad = batch.ids[0] == tok.pad_id
    assert pad.any() and (batch.labels[0, pad] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match=re.escape("0 <|image|> markers but 1 image")):
        ChatCollator(template)([(torch.rand(1, 3, 32, 32), [Turn("user", "a")])])
    assert torch.isfinite(chat_loss(tiny_chat_model(tok), batch))
    with pytest.raises(ValueError, match=re.escape("item 0: images of shape (3, 32, 32)")):
        ChatCollator(template)([(torch.rand(3, 32, 32), [Turn("user", f"{IMAGE}a")])])
    with pytest.raises(ValueError, match="item 1: turn 0 has role 'bot'"):
        ChatCollator(template)([(None, [Turn("user", "a")]), (None, [Turn("bot", "a")])])
    with pytest.raises(ValueError, match="empty list"):
        ChatCollator(template)([])
    with pytest.raises(ValueError, match="nothing to score"):
        chat_loss(tiny_chat_model(tok), ChatCollator(template)([(None, [Turn("user", "a")])]))


def test_reply_is_the_greedy_argmax_of_the_whole_sequence_recomputed(tok, template):
    """The KV-cached reply equals the naive loop that reruns the full sequence for every new token."""
    model = tiny_chat_model(tok)
    images = torch.rand(2, 3, 32, 32)
    turns = [Turn("user", f"{IMAGE}{IMAGE}which image has more circles?")]
    ids = template.prompt(turns, num_images=2)
    new = []
    for _ in range(6):
        x = torch.tensor([ids + new])
        nxt = int(model.lm(inputs_embeds=splice_images(model, x, images))[0, -1].argmax())
        if nxt == template.end_id:
            break
        new.append(nxt)
    assert len(new) == 6 and reply(model, template, images, turns, max_new_tokens=6) == template.text_of(new)
    assert model.training is False
    with pytest.raises(ValueError, match="exceed the LM's context_length 96"):
        reply(model, template, images, turns, max_new_tokens=90)


def test_reply_stops_at_its_end_token(tok, template):
    """A model made to say <|end|> from its third new token on replies with the two tokens before it."""
    model = tiny_chat_model(tok)
    calls = []

    def force_end(module, inputs, output):
        calls.append(1)
        if len(calls) >= 3:  # call 1: the prompt; calls 2, 3, ...: one new token each
            output = output.clone()
            output[..., template.end_id] = 1e4
        return output

    turns = [Turn("user", "hello")]
    ids = template.prompt(turns)
    first = []
    for _ in range(2):
        first.append(int(model.lm(torch.tensor([ids + first]))[0, -1].argmax()))
    assert template.end_id not in first
    handle = model.lm.register_forward_hook(force_end)
    try:
        assert reply(model, template, None, turns, max_new_tokens=10) == template.text_of(first)
    finally:
        handle.remove()
    assert len(calls) == 3  # it stopped at <|end|> rather than running all 10 steps
    with pytest.raises(ValueError, match=re.escape("images of shape (3, 32, 32)")):
        reply(model, template, torch.rand(3, 32, 32), [Turn("user", f"{IMAGE}a")])


def test_datasets_hold_valid_conversations_of_their_split():
    from mllm_scratch.chat import DialogueDataset, PopeDataset, TwoImageDataset

    d = DialogueDataset("test", 50, describe=0.0)
    for images, turns, skills in d:
        assert images.shape == (1, 3, 32, 32) and check_conversation(turns, num_images=1) == turns
        assert len(skills) == len(turns) // 2 and "caption" not in skills
    assert d[3][1] == DialogueDataset("test", 50, describe=0.0)[3][1] != DialogueDataset("train", 50, describe=0.0)[3][1]
    with pytest.raises(ValueError, match="describe 2"):
        DialogueDataset("test", 5, describe=2)
    two = TwoImageDataset("test", 200)
    answers = [turns[1].text for _, turns, _ in two]
    assert two[0][0].shape == (2, 3, 32, 32) and check_conversation(two[0][1], num_images=2) == two[0][1]
    assert answers == ["yes", "no"] * 100
    pope = PopeDataset("test", 20)
    assert [turns[1].text for _, turns, _ in pope] == ["yes", "no"] * 10


def test_dialogue_accuracy_scores_each_turn_given_the_true_history(tok, template, monkeypatch):
    import mllm_scratch.chat as chat

    dataset = chat.DialogueDataset("test", 30, cache=True)  # cached: each item's images are one tensor
    truth = {}  # what each (image, history) should get, from the dataset itself
    for images, turns, _ in dataset:
        for k in range(len(turns) // 2):
            truth[id(images), turns[: 2 * k + 1]] = turns[2 * k + 1].text
    monkeypatch.setattr(chat, "reply", lambda model, template, images, turns, *_, **__: truth[id(images), tuple(turns)])
    perfect = chat.dialogue_accuracy(None, template, dataset)
    assert perfect["turns"] == 1.0 and set(perfect["by_skill"].values()) == {1.0}
    assert perfect["count"] == sum(s != "caption" for _, _, skills in dataset for s in skills)
    monkeypatch.setattr(chat, "reply", lambda model, template, images, turns, *_, **__: "yes")
    yes = chat.dialogue_accuracy(None, template, dataset)
    assert yes["by_skill"]["colour"] == 0.0 and 0.0 < yes["by_skill"]["existence"] < 1.0
    monkeypatch.setattr(chat, "reply", lambda model, template, images, turns, *_, **__: "yes")
    assert chat.pope_accuracy(None, template, chat.PopeDataset("test", 20)) == {
        "accuracy": 0.5, "precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "yes_ratio": 1.0}


def test_build_chat_vlm_grows_the_positions_and_leaves_the_base_alone(tok):
    from mllm_scratch.chat import ChatRecipe, build_chat_vlm

    base = tiny_chat_model(tok)
    model = build_chat_vlm(base, ChatRecipe(context_length=128))
    table, old = model.lm.pos_emb.weight, base.lm.pos_emb.weight
    assert table.shape[0] == 128 and old.shape[0] == 96
    torch.testing.assert_close(table[:96], old)
    torch.testing.assert_close(table[96:], old[N:N + 32])  # new rows copy those after the image tokens
    assert model.encoder is base.encoder and model.lm is not base.lm
    torch.testing.assert_close(model.projector[0].weight, base.projector[0].weight)


def test_train_chat_vlm_runs_and_trains_only_the_projector_and_lm(tok):
    from mllm_scratch.chat import ChatRecipe, train_chat_vlm

    base = tiny_chat_model(tok)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    recipe = ChatRecipe(dialogues=16, two_image=8, what_changed=8, context_length=128, batch_size=4, warmup_steps=1)
    model, history = train_chat_vlm(recipe, tok, base=base, steps=3, log_every=0, progress=False)
    assert len(history.loss) == 1 and math.isfinite(history.loss[0])
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith("encoder."))  # the tower is frozen
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("lm."))
    assert all(torch.equal(base.state_dict()[k], before[k]) for k in before if k.startswith("lm."))  # the base LM is not
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("field, value, message", [
    ("steps", 0, "steps 0 is invalid"), ("lm_lr", float("nan"), "lm_lr nan"), ("describe", -1, "describe -1"),
    ("batch_size", 2.5, "batch_size 2.5"), ("text_only", -1, "text_only -1"),
    ("two_image_counts", "yes", "two_image_counts 'yes' is invalid: expected True or False"),
    ("what_changed", -5, "what_changed -5 is invalid: expected an int >= 0"),
    ("interleaved", 1.5, "interleaved 1.5 is invalid: expected an int >= 0"),
])
def test_chat_recipe_errors_name_the_value(field, value, message):
    from mllm_scratch.chat import ChatRecipe

    with pytest.raises(ValueError, match=message):
        ChatRecipe(**{field: value})


def test_recipe_switches_are_stored_only_when_set():
    from mllm_scratch.chat import ChatRecipe, DPORecipe, chat_dataset

    assert "two_image_counts" not in ChatRecipe().to_dict() and "replay" not in DPORecipe().to_dict()
    assert ChatRecipe(two_image_counts=True).to_dict()["two_image_counts"] is True
    assert DPORecipe(replay=16).to_dict()["replay"] == 16
    parts = chat_dataset(ChatRecipe(dialogues=2, two_image=2, two_image_counts=True)).datasets
    assert parts[1].counts and parts[1][1][1][1].text.endswith(", so no")
    assert "what_changed" not in ChatRecipe().to_dict() and ChatRecipe(what_changed=3).to_dict()["what_changed"] == 3
    parts = chat_dataset(ChatRecipe(dialogues=2, two_image=2, what_changed=3)).datasets
    assert len(parts) == 3 and len(parts[2]) == 3 and parts[2][0][1][0].text.endswith("what changed?")


def test_text_only_rows_are_chapter_04s_text_scored_on_every_token(tok, template):
    from mllm_scratch.chat import TEXT_WINDOW, ChatRecipe, TextDocument, TextOnlyDataset, chat_dataset

    data = TextOnlyDataset("train", 3)
    images, doc, skills = data[1]
    assert images is None and skills == ("text",) and len(doc.texts) == 6
    assert all(t.startswith("there ") and t.endswith(".") for t in doc.texts)  # descriptions, as chapter 04's TextDataset
    assert TextOnlyDataset("train", 3)[1] == data[1] and TextOnlyDataset("train", 3, offset=1)[0] == data[1]
    short = TextDocument(("a small red circle.", "there is one object."))
    batch = ChatCollator(template)([(None, short), (torch.zeros(1, 3, 32, 32), (Turn("user", IMAGE + "hi"), Turn("assistant", "yes")))])
    eot = tok.eot_id
    want = [eot] + tok.encode_ordinary("a small red circle.") + [eot] + tok.encode_ordinary("there is one object.") + [eot]
    assert batch.ids[0, : len(want)].tolist() == want and batch.labels[0, : len(want)].tolist() == want
    assert (batch.labels[0, len(want):] == IGNORE_INDEX).all() and batch.images.shape[0] == 1  # the text row has no image
    long = TextDocument(tuple(doc.texts) * 3)
    assert ChatCollator(template)([(None, long)]).ids.shape == (1, TEXT_WINDOW + 1)  # cut at chapter 04's window
    with pytest.raises(ValueError, match="item 0: a TextDocument with 1 images"):
        ChatCollator(template)([(torch.zeros(1, 3, 32, 32), short)])
    for bad in ((), "a text", ("",)):
        with pytest.raises(ValueError, match="expected a non-empty tuple of non-empty strings"):
            TextDocument(bad)
    with pytest.raises(ValueError, match="per_row 0 is invalid"):
        TextOnlyDataset("train", 3, per_row=0)
    assert "text_only" not in ChatRecipe().to_dict()  # the shipped recipe's manifest is unchanged
    mixed = chat_dataset(ChatRecipe(dialogues=4, two_image=2, text_only=3))
    assert len(mixed) == 9 and isinstance(mixed[8][1], TextDocument) and ChatRecipe(text_only=3).to_dict()["text_only"] == 3


def test_interleaved_documents_put_each_image_before_its_text_and_score_only_the_text(tok, template):
    from mllm_scratch.chat import (INTERLEAVED_WINDOW, ChatRecipe, InterleavedDataset, InterleavedDocument,
                                   chat_dataset, splice_images)

    data = InterleavedDataset("train", 3)
    images, doc, skills = data[1]
    assert images.shape == (2, 3, 32, 32) and len(doc.texts) == 2 and skills == ("interleaved",)
    assert all(t.startswith("there ") and t.endswith(".") for t in doc.texts)  # descriptions, as chapter 04's
    assert InterleavedDataset("train", 3, offset=1)[0][1] == doc
    two = InterleavedDocument(("a small red circle.", "there is one object."))
    pictures = torch.rand(3, 3, 32, 32)
    chat_row = (pictures[2:], (Turn("user", IMAGE + "hi"), Turn("assistant", "yes")))
    batch = ChatCollator(template)([(pictures[:2], two), chat_row])
    eot, slot = tok.eot_id, [tok.image_id] * N
    first, second = (tok.encode_ordinary(t) + [eot] for t in two.texts)
    want = [eot] + slot + first + slot + second
    assert batch.ids[0, : len(want)].tolist() == want
    assert batch.labels[0, : len(want)].tolist() == [eot] + [IGNORE_INDEX] * N + first + [IGNORE_INDEX] * N + second
    model = tiny_chat_model(tok)  # the images are spliced in order: the document's two, then the conversation's
    with torch.no_grad():
        spliced, tokens = splice_images(model, batch.ids, batch.images), model.image_tokens(pictures)
    slots = [(batch.ids[row] == tok.image_id).nonzero().flatten() for row in range(2)]
    torch.testing.assert_close(spliced[0, slots[0]], tokens[:2].flatten(0, 1))
    torch.testing.assert_close(spliced[1, slots[1]], tokens[2])
    with pytest.raises(ValueError, match="item 0: an InterleavedDocument of 2 texts with 1 image: expected one image before each text"):
        ChatCollator(template)([(pictures[:1], two)])
    with pytest.raises(ValueError, match="item 0: an InterleavedDocument of 2 texts with 0 images"):
        ChatCollator(template)([(None, two)])
    long = InterleavedDocument(("there is one object. " * 50, "a small red circle."))
    with pytest.raises(ValueError, match=f"images end at position .*: expected them within the first {INTERLEAVED_WINDOW}"):
        ChatCollator(template)([(pictures[:2], long)])
    def of_tokens(n):  # a text of exactly n tokens
        return next(t for m in range(n + 2) if len(tok.encode_ordinary(t := " ".join(["red"] * m))) == n)

    last = 1 + N + (INTERLEAVED_WINDOW - 2 * N - 2) + 1 + N - 1  # the last image slot, for a first text of that length
    assert last == INTERLEAVED_WINDOW - 1
    fits = InterleavedDocument((of_tokens(INTERLEAVED_WINDOW - 2 * N - 2), "red"))
    assert ChatCollator(template)([(pictures[:2], fits)]).ids.shape == (1, INTERLEAVED_WINDOW)  # at position 191: fits
    with pytest.raises(ValueError, match=f"images end at position {INTERLEAVED_WINDOW}:"):
        ChatCollator(template)([(pictures[:2], InterleavedDocument((of_tokens(INTERLEAVED_WINDOW - 2 * N - 1), "red")))])
    tail = InterleavedDocument(("a small red circle.", "there is one object. " * 50))
    assert ChatCollator(template)([(pictures[:2], tail)]).ids.shape == (1, INTERLEAVED_WINDOW)  # the last text cut
    with pytest.raises(ValueError, match="expected a non-empty tuple of non-empty strings"):
        InterleavedDocument(())
    with pytest.raises(ValueError, match="per_row 0 is invalid"):
        InterleavedDataset("train", 3, per_row=0)
    with pytest.raises(ValueError, match="context_length 128 is too short for interleaved documents: expected at least 192"):
        ChatRecipe(interleaved=5, context_length=128)
    assert "interleaved" not in ChatRecipe().to_dict() and ChatRecipe(interleaved=3).to_dict()["interleaved"] == 3
    mixed = chat_dataset(ChatRecipe(dialogues=4, two_image=2, interleaved=3))
    assert len(mixed) == 9 and isinstance(mixed[8][1], InterleavedDocument)


def test_text_perplexity_is_chapter_04s_measure():
    import json

    from mllm_scratch.chat import text_perplexity
    from mllm_scratch.checkpoints import DEFAULT_DIR
    from mllm_scratch.gpt import pretrained_gpt

    shipped = json.loads((DEFAULT_DIR / "gpt.json").read_text())["metrics"]["val_perplexity"]
    assert text_perplexity(pretrained_gpt()) == pytest.approx(shipped, abs=1e-3)  # what chapter 04's manifest records
    assert text_perplexity(pretrained_gpt(), size=50) != pytest.approx(shipped, abs=1e-3)


def test_preference_pairs_hold_a_right_and_a_wrong_answer():
    from mllm_scratch.chat import PreferenceDataset

    from mllm_scratch.chat import PREFERENCE_SKILLS, SAME_COUNT

    data = PreferenceDataset("test", 240)
    for i, (images, prompt, chosen, rejected, skill) in enumerate(data):
        k = 2 if skill == "two images" else 1
        assert images.shape == (k, 3, 32, 32) and check_conversation(prompt, num_images=k) == prompt
        assert chosen != rejected
        if i % 2 == 0:
            assert (skill, chosen, rejected) == ("pope", "no", "yes") if i % 4 == 0 else ("pope", "yes", "no")
        if skill == "two images":
            assert prompt[0].text == IMAGE * 2 + SAME_COUNT and {chosen, rejected} == {"yes", "no"}
    assert {s for *_, s in data} == {"pope", *PREFERENCE_SKILLS}
    two = [chosen for *_, chosen, _, s in data if s == "two images"]
    assert two.count("yes") == two.count("no") == 10
    yes_no = [chosen for _, _, chosen, rejected, _ in data if {chosen, rejected} == {"yes", "no"}]
    assert 0.4 < yes_no.count("yes") / len(yes_no) < 0.6  # DPO is not taught to prefer one word
    near = PreferenceDataset("test", 8, kind="near")
    assert [t[2] for t in near][::2] == ["no", "yes", "no", "yes"] and [t[1] for t in near] != [t[1] for t in data][:8]
    with pytest.raises(ValueError, match="kind 'far' is invalid"):
        PreferenceDataset("test", 8, kind="far")
    both = PreferenceDataset("test", 24, kind="both")
    by_kind = {k: PreferenceDataset("test", 24, kind=k) for k in ("near", "binding")}
    for i in range(24):  # near-miss and binding pairs in turn; each item is the one its own kind's dataset makes
        kind = ("near", "binding")[(i // 4) % 2] if i % 2 == 0 else "binding"  # other skills' pairs: any kind's
        (a_images, *a), (b_images, *b) = both[i], by_kind[kind][i]
        assert torch.equal(a_images, b_images) and a == b, (i, kind)
    assert [both[i][2] for i in range(0, 24, 2)] == ["no", "yes"] * 6


def test_dpo_starts_at_log_2_and_training_raises_the_chosen_over_the_rejected(tok, template):
    from mllm_scratch.chat import (
        DialogueDataset,
        DPORecipe,
        PreferenceCollator,
        PreferenceDataset,
        dpo_objective,
        preference_logprobs,
        train_dpo,
    )

    model = tiny_chat_model(tok)
    items = [PreferenceDataset("train", 8, offset=8_000_000)[i] for i in range(8)]
    batch = PreferenceCollator(template)(items)
    assert batch.ids.shape[0] == 16
    for row, item in ((0, items[0]), (3, items[3])):  # row r holds item r's chosen reply, row 8 + r its rejected one
        for offset, reply_text in ((0, item[2]), (8, item[3])):
            ids = [i for i in batch.ids[row + offset].tolist() if i != tok.pad_id]
            assert template.decode(ids)[-1] == Turn("assistant", reply_text)
    with pytest.raises(ValueError, match="batch of 3 rows"):
        preference_logprobs(model, PreferenceCollator(template)(items[:2])._replace(ids=batch.ids[:3]))
    start = dpo_objective(model, beta=0.5)(model, batch)
    assert start.item() == pytest.approx(math.log(2), abs=1e-6)  # the policy is the reference: no preference yet
    with torch.no_grad():
        chosen_logp = preference_logprobs(model, batch)[0]
    scored = sum(len(template._body(item[2])) + 1 for item in items)  # each chosen answer's tokens and its <|end|>
    with_sft = dpo_objective(model, beta=0.5, sft_weight=2.0)(model, batch)
    assert with_sft.item() == pytest.approx(math.log(2) - 2.0 * chosen_logp.sum().item() / scored, rel=1e-5)
    replayed = ChatCollator(template)([(im, turns) for im, turns, _ in DialogueDataset("train", 4)])
    with_replay = dpo_objective(model, beta=0.5, sft_weight=2.0)(model, (batch, replayed))
    assert with_replay.item() == pytest.approx(with_sft.item() + chat_loss(model, replayed).item(), rel=1e-6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    policy, history = train_dpo(model, DPORecipe(pairs=8, batch_size=8, lr=3e-3, beta=0.5, warmup_steps=0), tok,
                                steps=8, log_every=0, progress=False)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # the reference is untouched
    assert history.loss[-1] < history.loss[0] and dpo_objective(model, 0.5)(policy, batch).item() < math.log(2)
    with torch.no_grad():
        chosen, rejected = preference_logprobs(policy, batch)
        ref_chosen, ref_rejected = preference_logprobs(model, batch)
    assert ((chosen - ref_chosen) - (rejected - ref_rejected)).mean() > 0
    changed = {k.split(".")[0] for k, v in policy.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"lm"}  # only the LM trains
    _, replay_history = train_dpo(model, DPORecipe(pairs=8, batch_size=8, lr=3e-3, beta=0.5, warmup_steps=0, replay=4),
                                  tok, steps=2, log_every=0, progress=False)
    assert replay_history.examples == 16 and replay_history.loss[0] > history.loss[0]  # pairs counted; the replay's loss added
    with pytest.raises(ValueError, match="replay -1 is invalid"):
        DPORecipe(replay=-1)
    with pytest.raises(ValueError, match="beta 0 is invalid"):
        DPORecipe(beta=0)
    with pytest.raises(ValueError, match="sft_weight -1 is invalid: expected a number >= 0"):
        DPORecipe(sft_weight=-1)
    with pytest.raises(ValueError, match="pope_kind 'far' is invalid"):
        DPORecipe(pope_kind="far")


def test_a_saved_chat_model_loads_back_and_answers_the_same(tok, tmp_path, monkeypatch):
    import mllm_scratch.chat as chat
    from mllm_scratch.checkpoints import CheckpointError, round_to_dtype
    from mllm_scratch.chat import ChatRecipe, load_chat_vlm, save_chat_vlm

    model = tiny_chat_model(tok)
    path = tmp_path / "chat_vlm.pt"
    save_chat_vlm(path, model, recipe=ChatRecipe().to_dict(), metrics={"x": 1})
    loaded = load_chat_vlm(path)
    round_to_dtype(model)  # the file holds float16
    ids = torch.tensor([[tok.image_id] * N + tok.encode_ordinary("what colour is it?")])
    images = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(loaded(ids, images), model(ids, images))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with pytest.raises(ValueError, match="save_chat_vlm saves a UnifiedVLM, got a"):
        from mllm_scratch.tiling import BudgetVLM

        save_chat_vlm(tmp_path / "x.pt", BudgetVLM.__new__(BudgetVLM))
    monkeypatch.setattr(chat, "_chat_checkpoint_path", lambda: path)  # as if it were the shipped file
    monkeypatch.setattr("mllm_scratch.tiling._shipped_vlm_sha256", lambda: "0" * 64)
    with pytest.raises(CheckpointError, match="tuned from another chapter-06 model"):
        load_chat_vlm()


def test_two_image_accuracy_scores_exact_replies_and_its_control_shows_one_image_twice(tok, monkeypatch):
    import mllm_scratch.chat as chat
    from mllm_scratch.chat import TwoImageDataset, two_image_accuracy

    data = TwoImageDataset("test", 12)
    truth = [turns[1].text for _, turns, _ in data]
    seen, budgets = [], []

    def replies_the_truth(model, template, images, turns, max_new_tokens=32):  # stands in for a model
        seen.append(images.clone())
        budgets.append(max_new_tokens)
        return truth[(len(seen) - 1) % len(truth)]

    monkeypatch.setattr(chat, "reply", replies_the_truth)
    template = ChatTemplate(tok, N)
    assert two_image_accuracy(None, template, data) == 1.0
    assert two_image_accuracy(None, template, data, control="one image") == 1.0
    first, one = seen[:12], seen[12:]
    assert all(torch.equal(b, a[:1].expand(2, -1, -1, -1)) for a, b in zip(first, one))  # the first image, twice
    longest = max(len(tok.encode_ordinary(" " + t)) for t in ("yes", "no"))  # as the template writes a reply
    assert min(budgets) > longest  # room for the whole answer and its <|end|>
    monkeypatch.setattr(chat, "reply", lambda *a, **k: "yes")
    assert two_image_accuracy(None, template, data) == 0.5
    with pytest.raises(ValueError, match="control 'swapped' is invalid"):
        two_image_accuracy(None, template, data, control="swapped")


def test_change_accuracy_scores_exact_replies_by_kind_and_its_control_shows_one_image_twice(tok, monkeypatch):
    import mllm_scratch.chat as chat
    from mllm_scratch.chat import ChangeDataset, change_accuracy

    data = ChangeDataset("test", 9)
    truth = [turns[1].text for _, turns, _ in data]
    seen, budgets = [], []

    def right_but_colours_named_wrong(model, template, images, turns, max_new_tokens=32):  # stands in for a model
        seen.append(images.clone())
        budgets.append(max_new_tokens)
        i = (len(seen) - 1) % len(truth)
        return "the pink circle turned grey" if i % 3 == 0 else truth[i]  # colour items: the right kind, wrong words

    monkeypatch.setattr(chat, "reply", right_but_colours_named_wrong)
    template = ChatTemplate(tok, N)
    assert change_accuracy(None, template, data) == {
        "accuracy": 6 / 9, "kind": 1.0, "object": 6 / 9, "by_kind": {"colour": 0.0, "gone": 1.0, "added": 1.0}}
    change_accuracy(None, template, data, control="one image")
    assert all(torch.equal(b, a[:1].expand(2, -1, -1, -1)) for a, b in zip(seen[:9], seen[9:]))  # the first image, twice
    assert min(budgets) > max(len(tok.encode_ordinary(" " + t)) for t in truth)  # room for the answer and <|end|>
    monkeypatch.setattr(chat, "reply", lambda *a, **k: "nothing")
    assert change_accuracy(None, template, data)["kind"] == change_accuracy(None, template, data)["object"] == 0.0
    first = truth[1].split()  # "the <colour> <shape> is gone": the right object, named as gone, turned or appeared
    for said, kind, obj in (([*first[:3], "turned", "red"], 1 / 3, 0.0), (first, 1 / 3, 1 / 9)):
        monkeypatch.setattr(chat, "reply", lambda *a, said=said, **k: " ".join(said))
        scores = change_accuracy(None, template, data)
        assert (scores["kind"], scores["object"]) == pytest.approx((kind, obj)), said
    with pytest.raises(ValueError, match="control 'swapped' is invalid"):
        change_accuracy(None, template, data, control="swapped")


def test_chat_scores_hold_every_measure_and_what_changed_only_when_asked(tok):
    from mllm_scratch.chat import chat_scores

    model = tiny_chat_model(tok)
    sizes = {"dialogues": 2, "two_image": 2, "pope": 2}
    plain = chat_scores(model, tok, sizes)
    assert plain["sizes"] == sizes and set(plain) == {"sizes", "dialogue", "two_image", "pope"}
    scores = chat_scores(model, tok, {**sizes, "what_changed": 3}, what_changed=True)
    assert scores["sizes"]["what_changed"] == 3
    changed = scores["what_changed"]
    assert set(changed) == {"accuracy", "kind", "object", "by_kind", "one_image"} and set(changed["by_kind"]) == {"colour", "gone", "added"}
    assert all(0 <= v <= 1 for v in (changed["accuracy"], changed["kind"], changed["object"], changed["one_image"]))
    assert changed["accuracy"] <= changed["object"] <= changed["kind"]  # each asks for less than the one before
    with pytest.raises(ValueError, match="sizes gives what_changed=3 but what_changed=False"):
        chat_scores(model, tok, {**sizes, "what_changed": 3})


def test_two_image_answers_with_counts_are_scored_on_the_verdict_and_the_counts_apart(tok, monkeypatch):
    import mllm_scratch.chat as chat
    from mllm_scratch.chat import TwoImageDataset, _two_image_scores, two_image_accuracy

    data = TwoImageDataset("test", 8, counts=True)
    truth = [turns[1].text for _, turns, _ in data]
    budgets = []

    def wrong_counts_right_verdict(model, template, images, turns, max_new_tokens=32):
        budgets.append(max_new_tokens)
        i = (len(budgets) - 1) % len(truth)
        return ("nine and nine, so " + truth[i].split(" ")[-1]) if i % 2 else truth[i]  # both counts wrong on odd i

    monkeypatch.setattr(chat, "reply", wrong_counts_right_verdict)
    template = ChatTemplate(tok, N)
    assert [t.endswith("yes") for t in truth] == [True, False] * 4  # equal counts on even items, all said right
    assert _two_image_scores(None, template, data) == (1.0, {
        "both": 0.5, "first": 0.5, "second": 0.5, "same": 1.0, "first same": 1.0, "second same": 1.0,
        "differ": 0.0, "first differ": 0.0, "second differ": 0.0,
        "agree": 0.5})  # "nine and nine, so no" contradicts itself
    longest = max(len(tok.encode_ordinary(" " + t)) for t in truth)
    assert min(budgets) > longest  # room for the counts, the verdict and <|end|>
    monkeypatch.setattr(chat, "reply", lambda *a, **k: "yes")  # a bare verdict: right half the time
    assert two_image_accuracy(None, template, data) == 0.5
