"""From a VQA model to an assistant: the chat template, dialogues about scenes, a hallucination check, DPO.

The pieces an instruction-tuned VLM adds to the one-question models of chapters 06-10:

- **The chat template.** A conversation is a list of `Turn`s, user and assistant in turn,
  starting with the user. Each turn is written as its role token (<|user|> or
  <|assistant|>), its text (each piece after a space, as words stand in a sentence), then
  <|end|>; an <|image|> marker in a user turn becomes `num_image_tokens` image slots, where
  the images are spliced in, in order. The loss is
  taken on the assistant's words and the <|end|> that closes them, and nowhere else: the
  model learns to answer, not to predict the user. `ChatTemplate.decode` reads the ids
  back into the same turns.
- **Dialogues from a scene graph** (`dialogue`): "describe, then ask", follow-up
  questions, and a question that points back at an earlier answer ("is it left of the
  blue square?", where "it" is the object the previous question named).
- **Questions about two images** (`two_image_question`): do the two hold the same number of
  objects? Asked so that neither image alone decides the answer, a model that sees one image
  can only guess.
- **"What changed?"** (`edit_scene`, `ChangeDataset`): a scene and the same scene after one
  edit (an object changes colour, disappears, or a new one appears), answered by naming the edit
  ("the red circle turned blue"): the answer needs what the first image held and what the second holds.
- **Text-only rows** (`TextDocument`, `TextOnlyDataset`): chapter 04's kind of text, scored on
  every token, mixed into the chat data (`ChatRecipe.text_only`) so that the LM keeps its text
  ability (`text_perplexity`), as MM1 mixes text-only data into its pretraining; and **interleaved
  documents** (`InterleavedDocument`, `InterleavedDataset`, `ChatRecipe.interleaved`): images, each
  followed by its description, the text scored, as MM1 mixes image-text documents from the web.
- **A hallucination check** in the style of POPE (`pope_questions`, `pope_scores`): yes/no
  questions about objects that are present and, as often, objects that are absent (near
  misses, or binding misses: `binding_misses`), scored as accuracy, precision, recall and the
  share of "yes" answers.
- **Preference tuning** (`dpo_loss`, `train_dpo`): Direct Preference Optimization on pairs
  whose rejected answer perturbs the right one (`rejected_answer`: a wrong colour, a "yes"
  about an absent object), with the chosen answers' next-token loss added (`DPORecipe.sft_weight`).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F

from mllm_scratch.shapeworld import (
    _MAX_ATTEMPTS,
    NUMBER_WORDS,
    QA,
    SIZES,
    SPLIT_SEEDS,
    Rng,
    Scene,
    ShapeObject,
    ShapeWorldConfig,
    _a,
    _as_rng,
    _check_split,
    _place,
    _sample_scene,
    _SplitDataset,
    asked_pair,
    caption,
    description,
    questions,
    relations,
    render,
    to_tensor,
)
from mllm_scratch.gpt import next_token_loss
from mllm_scratch.runtime import checked_on_host
from mllm_scratch.tokenizer import ASSISTANT, END, IMAGE, USER, Tokenizer
from mllm_scratch.train import autocast
from mllm_scratch.vit import SWITCH
from mllm_scratch.vlm import UnifiedVLM, greedy_decode

IGNORE_INDEX = -100  # labels the loss skips (as `vlm.VLMCollator` writes them)
ROLES: dict[str, str] = {"user": USER, "assistant": ASSISTANT}
_ARTICLE = {"user": "a", "assistant": "an"}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


# ----------------------------------------------------------------------------------
# The chat template


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: who speaks ("user" or "assistant") and what they say.

    A user turn may hold <|image|> markers, one per image, where the image goes."""

    role: str
    text: str


def check_conversation(turns: Sequence[Turn | tuple[str, str]], num_images: int | None = None) -> tuple[Turn, ...]:
    """The turns as a tuple of `Turn`s, or ValueError naming the first thing wrong.

    The rules: at least one turn; roles alternate user, assistant, user, ... starting with the user;
    each text is a string; an assistant turn is not empty and holds no <|image|>; no turn holds a
    role or end token (they are the template's, not the speaker's). With `num_images`, the user
    turns hold exactly that many <|image|> markers."""
    if isinstance(turns, (str, bytes)) or not isinstance(turns, Sequence):
        raise ValueError(f"turns {turns!r} is invalid: expected a list of Turn(role, text)")
    if len(turns) == 0:
        raise ValueError("the conversation is empty: expected at least one user turn")
    out = []
    for i, turn in enumerate(turns):
        if isinstance(turn, tuple) and not isinstance(turn, Turn) and len(turn) == 2:
            turn = Turn(*turn)
        if not isinstance(turn, Turn):
            raise ValueError(f"turn {i} is {turn!r}: expected Turn(role, text) or a (role, text) pair")
        if not isinstance(turn.role, str) or turn.role not in ROLES:
            raise ValueError(f"turn {i} has role {turn.role!r}: expected 'user' or 'assistant'")
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            where = "it is the first turn" if i == 0 else f"it follows {_ARTICLE[out[-1].role]} {out[-1].role} turn"
            raise ValueError(f"turn {i} is {_ARTICLE[turn.role]} {turn.role} turn, but {where}: expected turns to alternate "
                             "user, assistant, user, ... starting with the user")
        if not isinstance(turn.text, str):
            raise ValueError(f"turn {i} ({turn.role}) has text {turn.text!r}: expected a string")
        for token in (USER, ASSISTANT, END):
            if token in turn.text:
                raise ValueError(f"turn {i} ({turn.role}) contains {token!r}: the template writes the role and "
                                 "end tokens itself, expected plain text")
        if turn.role == "assistant":
            if IMAGE in turn.text:
                raise ValueError(f"turn {i} (assistant) contains {IMAGE!r}: images belong in user turns")
            if not turn.text.strip():
                raise ValueError(f"turn {i} (assistant) is empty: expected the reply's text")
        out.append(turn)
    if num_images is not None:
        markers = sum(t.text.count(IMAGE) for t in out)
        if markers != num_images:
            raise ValueError(f"the conversation has {markers} {IMAGE} marker{'s' * (markers != 1)} but {num_images} "
                             f"image{'s' * (num_images != 1)} {'was' if num_images == 1 else 'were'} given: expected "
                             "one marker per image")
    return tuple(out)


class ChatTemplate:
    """Turns <-> ids: <|user|> text <|end|> <|assistant|> text <|end|> ...; each <|image|> -> N image slots."""

    def __init__(self, tokenizer: Tokenizer, num_image_tokens: int):
        if not isinstance(num_image_tokens, int) or isinstance(num_image_tokens, bool) or num_image_tokens < 1:
            raise ValueError(f"num_image_tokens {num_image_tokens!r} is invalid: expected an int >= 1")
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        special = tokenizer.special_tokens
        missing = [t for t in (USER, ASSISTANT, END) if t not in special]
        if missing:
            raise ValueError(f"the tokenizer has no {missing[0]!r}: expected the book's tokenizer (load_tokenizer())")
        self.role_ids = {role: special[token] for role, token in ROLES.items()}
        self.end_id = special[END]

    def _body(self, text: str) -> list[int]:
        """A turn's text as ids, each <|image|> marker expanded to num_image_tokens image ids.

        Each piece of text is written after a space (" red", not "red"): the tokenizer learned its
        words with the space before them, as they stand in a sentence, so " red" is one token where
        "red" at the start of a turn would be two rarer ones ("re", "d"). `decode` takes the space off."""
        ids: list[int] = []
        for k, piece in enumerate(text.split(IMAGE)):
            if k:
                ids += [self.tokenizer.image_id] * self.num_image_tokens
            if piece:
                ids += self.tokenizer.encode_ordinary(" " + piece)
        return ids

    def text_of(self, ids: Sequence[int]) -> str:
        """The text of a piece of a turn that `_body` wrote: decoded, less the one space it put in front."""
        text = self.tokenizer.decode(list(ids))
        return text[1:] if text.startswith(" ") else text

    def encode(self, turns: Sequence[Turn | tuple[str, str]], num_images: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation: labels copy the assistant turns' text and <|end|>, -100 elsewhere."""
        ids: list[int] = []
        labels: list[int] = []
        for turn in check_conversation(turns, num_images):
            body = self._body(turn.text) + [self.end_id]
            ids += [self.role_ids[turn.role]] + body
            labels += [IGNORE_INDEX] + (body if turn.role == "assistant" else [IGNORE_INDEX] * len(body))
        return ids, labels

    def prompt(self, turns: Sequence[Turn | tuple[str, str]], num_images: int | None = None) -> list[int]:
        """The ids a model continues to reply: the conversation, which must end with a user turn, then <|assistant|>."""
        turns = check_conversation(turns, num_images)
        if turns[-1].role != "user":
            raise ValueError(f"the conversation ends with an {turns[-1].role} turn: expected a user turn to reply to")
        return self.encode(turns)[0] + [self.role_ids["assistant"]]

    def decode(self, ids: Sequence[int]) -> tuple[Turn, ...]:
        """The turns that `encode` wrote as `ids`: a run of k x num_image_tokens image ids reads as k <|image|>.

        Every turn must be closed by its <|end|>, so `prompt`'s ids (which end with an open
        <|assistant|>) and padded rows do not decode: strip them first."""
        ids = [int(i) for i in ids]
        roles = {v: k for k, v in self.role_ids.items()}
        image = self.tokenizer.image_id
        turns: list[Turn] = []
        i = 0
        while i < len(ids):
            if ids[i] not in roles:
                raise ValueError(f"id {ids[i]} at position {i} is not a role token: expected {USER} "
                                 f"({self.role_ids['user']}) or {ASSISTANT} ({self.role_ids['assistant']}) to open each turn")
            role = roles[ids[i]]
            try:
                end = ids.index(self.end_id, i + 1)
            except ValueError:
                raise ValueError(f"the {role} turn at position {i} has no {END!r} ({self.end_id}) to close it") from None
            text, j, piece = [], i + 1, []
            while j < end:
                if ids[j] == image:
                    run = 0
                    while j < end and ids[j] == image:
                        run, j = run + 1, j + 1
                    if run % self.num_image_tokens:
                        raise ValueError(f"a run of {run} image ids at position {j - run}: expected a multiple of "
                                         f"num_image_tokens ({self.num_image_tokens})")
                    text.append(self.text_of(piece) + IMAGE * (run // self.num_image_tokens))
                    piece = []
                else:
                    piece.append(ids[j])
                    j += 1
            text.append(self.text_of(piece))
            turns.append(Turn(role, "".join(text)))
            i = end + 1
        return check_conversation(turns) if turns else ()


# ----------------------------------------------------------------------------------
# A chat model: chapter 06's unified decoder with any number of images in a sequence


class ChatBatch(NamedTuple):
    """A collated batch of conversations: every row's images in order (K, 3, H, W), or None; ids and labels (B, T)."""

    images: torch.Tensor | None
    ids: torch.Tensor
    labels: torch.Tensor


TEXT_WINDOW = 128  # a text-only row's tokens, as chapter 04's LM read them (its context), plus the first <|endoftext|>


def _check_texts(texts) -> None:
    if isinstance(texts, str) or not texts or not all(isinstance(t, str) and t for t in texts):
        raise ValueError(f"texts {texts!r} is invalid: expected a non-empty tuple of non-empty strings")


@dataclass(frozen=True)
class TextDocument:
    """Text for the LM alone, without an image or roles: each text followed by <|endoftext|>, after one in front, as
    chapter 04 packed its data, and scored on every token. `ChatCollator` writes it as a row of at most
    TEXT_WINDOW + 1 ids (a longer document is cut there)."""

    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_texts(self.texts)


INTERLEAVED_WINDOW = 192  # an interleaved document's ids at most: the chat recipe's context


@dataclass(frozen=True)
class InterleavedDocument:
    """Images and text in turn, as a web page holds them (MM1's interleaved image-text documents): after one
    <|endoftext|>, image j's slots, then text j and <|endoftext|>, for each of the item's images. Every
    text token and <|endoftext|> is scored, except the first <|endoftext|> (nothing comes before it); the
    image slots are not. `ChatCollator` writes it as a row of at most INTERLEAVED_WINDOW ids: a longer last
    text is cut there (about 2% of `InterleavedDataset`'s documents at 64 image tokens lose the end of their
    second description)."""

    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_texts(self.texts)


class ChatCollator:
    """Collate (images (k, 3, H, W) or None, turns[, skills]) items into a `ChatBatch`, right-padded with <|pad|>.

    An item whose turns are a `TextDocument` (and whose images are None) is a text-only row: its ids are
    the texts with <|endoftext|> around each, at most TEXT_WINDOW + 1 of them, all scored. One whose turns
    are an `InterleavedDocument` holds one image before each text, the image slots unscored."""

    def __init__(self, template: ChatTemplate):
        self.template = template

    def __call__(self, items: Sequence[tuple[torch.Tensor | None, Sequence[Turn]]]) -> ChatBatch:
        if len(items) == 0:
            raise ValueError("got an empty list of items: expected at least one (images, turns) pair")
        encoded, images = [], []
        for i, (images_k, turns, *_) in enumerate(items):
            if images_k is not None and (not isinstance(images_k, torch.Tensor) or images_k.dim() != 4):
                shape = tuple(images_k.shape) if isinstance(images_k, torch.Tensor) else type(images_k).__name__
                raise ValueError(f"item {i}: images of shape {shape}: expected a tensor (k, 3, H, W), "
                                 "k >= 0 (one image: images[None])")
            k = 0 if images_k is None else len(images_k)
            if isinstance(turns, TextDocument):
                if k:
                    raise ValueError(f"item {i}: a TextDocument with {k} images: expected None, text-only rows have none")
                tokenizer = self.template.tokenizer
                ids = [tokenizer.eot_id]
                for text in turns.texts:
                    ids += tokenizer.encode_ordinary(text) + [tokenizer.eot_id]
                ids = ids[: TEXT_WINDOW + 1]
                encoded.append((ids, ids))  # every token scored: the first predicts the second, and so on
                continue
            if isinstance(turns, InterleavedDocument):
                encoded.append(self._interleaved(i, images_k, turns))
                images.append(images_k)
                continue
            try:
                encoded.append(self.template.encode(turns, num_images=k))
            except ValueError as e:
                raise ValueError(f"item {i}: {e}") from None
            if k:
                images.append(images_k)
        longest = max(len(ids) for ids, _ in encoded)
        ids = torch.full((len(encoded), longest), self.template.tokenizer.pad_id, dtype=torch.long)
        labels = torch.full((len(encoded), longest), IGNORE_INDEX, dtype=torch.long)
        for row, (x, y) in enumerate(encoded):
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
        return ChatBatch(torch.cat(images) if images else None, ids, labels)

    def _interleaved(self, i: int, images: torch.Tensor | None, document: InterleavedDocument) -> tuple[list, list]:
        k, n = (0 if images is None else len(images)), len(document.texts)
        if k != n:
            raise ValueError(f"item {i}: an InterleavedDocument of {n} text{'s' * (n != 1)} with {k} image"
                             f"{'s' * (k != 1)}: expected one image before each text")
        tokenizer, slots = self.template.tokenizer, self.template.num_image_tokens
        ids, labels = [tokenizer.eot_id], [tokenizer.eot_id]
        for text in document.texts:
            words = tokenizer.encode_ordinary(text) + [tokenizer.eot_id]
            ids += [tokenizer.image_id] * slots + words
            labels += [IGNORE_INDEX] * slots + words
        last_image = len(ids) - 1 - ids[::-1].index(tokenizer.image_id)
        if last_image >= INTERLEAVED_WINDOW:
            raise ValueError(f"item {i}: an InterleavedDocument whose images end at position {last_image}: expected "
                             f"them within the first {INTERLEAVED_WINDOW} ids (fewer or shorter texts, or fewer images)")
        return ids[:INTERLEAVED_WINDOW], labels[:INTERLEAVED_WINDOW]


def splice_images(model: UnifiedVLM, ids: torch.Tensor, images: torch.Tensor | None) -> torch.Tensor:
    """`UnifiedVLM.splice` for any number of images per row: token embeddings (B, T, lm_dim) with the
    image tokens written over the <|image|> slots. `images` (K, 3, H, W) holds the rows' images in
    order (row 0's first, each row's in the order of its markers), K in all; each image fills
    `num_image_tokens` consecutive slots. This is the layout of `UnifiedVLM` (and of `ChatTemplate`);
    a model that lays out its own prefix, such as `tiling.TiledVLM`, needs its own splice."""
    embeds = model.lm.embed(ids)
    slots = ids == model.image_id
    k = 0 if images is None else images.shape[0]
    n = model.num_image_tokens
    if checked_on_host(ids):
        per_row = slots.sum(dim=1)
        if bool((per_row % n).any()) or int(per_row.sum()) != k * n:
            raise ValueError(f"the rows hold {per_row.tolist()} <|image|> slots for {k} images: expected "
                             f"{n} slots per image, {k * n} in all")
    if k == 0:
        return embeds
    tokens = model.image_tokens(images).to(embeds.dtype)  # (K, n, lm_dim)
    if tokens.shape[1] != n:  # masked_scatter would take other images' tokens without a word
        raise ValueError(f"the image path gave {tokens.shape[1]} tokens per image, but {n} <|image|> slots hold one")
    return embeds.masked_scatter(slots[..., None], tokens)  # slots fill in order: row by row, image by image


def chat_loss(model: UnifiedVLM, batch: ChatBatch) -> torch.Tensor:
    """The `loss_fn` for `train`: next-token loss on the labels the collator scores (the assistant turns, every
    token of a text-only row, and the text of an interleaved document)."""
    if checked_on_host(batch.labels) and not bool((batch.labels != IGNORE_INDEX).any()):
        raise ValueError("the batch holds nothing to score: expected an assistant reply, a text-only row or an "
                         "interleaved document in at least one row")
    logits = model.lm(inputs_embeds=splice_images(model, batch.ids, batch.images))[:, :-1]
    return next_token_loss(logits, batch.labels[:, 1:], ignore_index=IGNORE_INDEX)


@torch.no_grad()
def reply(model: UnifiedVLM, template: ChatTemplate, images: torch.Tensor | None, turns: Sequence[Turn | tuple[str, str]],
          max_new_tokens: int = 32) -> str:
    """The assistant's greedy reply to a conversation that ends with a user turn, up to its <|end|>.

    `images` (k, 3, H, W) are the conversation's images in the order of their markers. The prompt
    runs once; each new token then runs alone against the GPT's KV caches."""
    if images is not None and (not isinstance(images, torch.Tensor) or images.dim() != 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images of shape {shape}: expected a tensor (k, 3, H, W) (one image: images[None])")
    k = 0 if images is None else len(images)
    ids = template.prompt(turns, num_images=k)
    context = model.config.lm.context_length
    if len(ids) + max_new_tokens > context:
        raise ValueError(f"a prompt of {len(ids)} tokens and max_new_tokens {max_new_tokens} exceed the LM's "
                         f"context_length {context}: expected a shorter conversation or fewer new tokens")
    device = next(model.lm.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids_t = torch.tensor([ids], device=device)
        images = None if images is None or k == 0 else images.to(device)
        caches = model.lm.new_caches()
        with autocast(ids_t.device):
            logits = model.lm(inputs_embeds=splice_images(model, ids_t, images), caches=caches)

        def step(new: torch.Tensor) -> torch.Tensor:
            with autocast(ids_t.device):
                return model.lm(new, caches=caches)

        new = greedy_decode(logits, step, max_new_tokens, template.end_id)[0].tolist()
    finally:
        model.train(was_training)
    new = new[: new.index(template.end_id)] if template.end_id in new else new
    return template.text_of(new)


# ----------------------------------------------------------------------------------
# Dialogues about one scene, and questions about two


@dataclass(frozen=True)
class Dialogue:
    """A conversation about one image, and the skill each assistant turn tests (in order)."""

    turns: tuple[Turn, ...]
    skills: tuple[str, ...]


DESCRIBE = "describe the image."


def _pointing_question(qa: QA, scene: Scene, rng: Rng) -> QA | None:
    """After a colour or shape question, a spatial question about the same object, called "it".

    `questions` asks a colour question only about a shape the scene holds once, and a shape question
    only about a colour it holds once, and no scene holds two objects of one colour and shape: "it"
    and "the blue square" each name one object."""
    if qa.skill not in ("colour", "shape"):
        return None
    obj = next(o for o in scene.objects if (o.colour, o.shape) == asked_pair(qa.question, qa.answer))
    others = [o for o in scene.objects if o is not obj]
    if not others:
        return None
    other = rng.choice(others)
    holds = relations(obj, other)
    if rng.random() < 0.5:
        rel, answer = rng.choice(holds), "yes"
    else:
        rel, answer = _OPPOSITE[rng.choice(holds)], "no"
    return QA(f"is it {rel} the {other.name}?", answer, "pointing")


def _check_dialogue(max_questions: int, describe: float) -> None:
    if not isinstance(max_questions, int) or isinstance(max_questions, bool) or max_questions < 1:
        raise ValueError(f"max_questions {max_questions!r} is invalid: expected an int >= 1")
    if not isinstance(describe, (int, float)) or isinstance(describe, bool) or not 0 <= describe <= 1:
        raise ValueError(f"describe {describe!r} is invalid: expected a probability from 0 to 1")


DIALOGUE_SKILLS = ("colour", "shape", "count", "spatial", "existence")  # reading needs chapter 10's tiles


def dialogue(scene: Scene, rng: Rng | random.Random | int, config: ShapeWorldConfig | None = None,
             max_questions: int = 3, describe: float = 0.5, skills: Sequence[str] = DIALOGUE_SKILLS) -> Dialogue:
    """A conversation about `scene`: with probability `describe`, "describe the image." and its caption first;
    then `max_questions` questions at most: the scene's questions of `skills` (`shapeworld.questions`;
    by default every skill but reading, which chapter 06's model, at 32 px, cannot do) in a random
    order, and after a colour or shape question, half the time, one that points back at the object it
    named ("is it left of the blue square?": skill "pointing"; it counts toward `max_questions`). The
    image's marker opens the first user turn.

    After a caption, most questions can be answered by copying from it rather than by looking:
    measure what a model sees on dialogues without one (`describe=0`)."""
    _check_dialogue(max_questions, describe)
    rng = _as_rng(rng)
    qas = questions(scene, rng, skills=tuple(skills), config=config)
    rng.shuffle(qas)
    asked: list[QA] = []
    for qa in qas:
        if len(asked) == max_questions:
            break
        asked.append(qa)
        follow = _pointing_question(qa, scene, rng) if len(asked) < max_questions and rng.random() < 0.5 else None
        if follow is not None:
            asked.append(follow)
    pairs = ([(DESCRIBE, caption(scene), "caption")] if rng.random() < describe else []) + \
        [(qa.question, qa.answer, qa.skill) for qa in asked]
    turns: list[Turn] = []
    for k, (question, answer, _) in enumerate(pairs):
        turns += [Turn("user", (IMAGE if k == 0 else "") + question), Turn("assistant", answer)]
    return Dialogue(tuple(turns), tuple(skill for _, _, skill in pairs))


SAME_COUNT = "do the two images have the same number of objects?"


def two_image_question(first: Scene, second: Scene, counts: bool = False) -> QA:
    """A question that needs both images: do they hold the same number of objects? ("yes" or "no").

    `counts=True`: the answer says the two counts before its verdict ("three and two, so no"), a
    chain of thought the model then reads back instead of comparing two images in one step.

    Neither image alone decides it when the data set asks it as `TwoImageDataset` does: for each
    item the answer is fixed first ("yes" for even items) and the second scene drawn to fit, so
    whatever the first image holds, "yes" and "no" are equally likely. (A question such as "which
    image has more circles?" can mostly be answered from one image: one with no circle loses.)"""
    verdict = "yes" if len(first.objects) == len(second.objects) else "no"
    if counts:
        verdict = f"{NUMBER_WORDS[len(first.objects)]} and {NUMBER_WORDS[len(second.objects)]}, so {verdict}"
    return QA(SAME_COUNT, verdict, "two images")


class DialogueDataset(_SplitDataset):
    """(images (1, 3, H, W), turns, skills): a `dialogue` about each scene of a split.

    `describe`, `max_questions` and `skills` are `dialogue`'s. Item i comes from the split's seed i (plus
    `offset`), as in every ShapeWorld dataset."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, *, describe: float = 0.5,
                 max_questions: int = 3, skills: Sequence[str] = DIALOGUE_SKILLS, cache: bool = False,
                 offset: int = 0) -> None:
        super().__init__(split, size, config, cache, offset)
        _check_dialogue(max_questions, describe)
        self.describe, self.max_questions, self.skills = describe, max_questions, tuple(skills)

    def _make(self, rng: Rng, i: int) -> tuple:
        scene = _sample_scene(rng, self.config, self.split)
        d = dialogue(scene, rng, self.config, self.max_questions, self.describe, self.skills)
        return to_tensor(render(scene))[None], d.turns, d.skills


def _item_rng(dataset: _SplitDataset, i: int) -> tuple[Rng, int]:
    """The random stream item i of a split dataset is made from, as `__getitem__` makes it, and i in 0..size-1."""
    if not -dataset.size <= i < dataset.size:
        raise IndexError(f"index {i} out of range for a dataset of size {dataset.size}")
    i %= dataset.size
    return Rng(SPLIT_SEEDS[dataset.split][0] + dataset.offset + i), i


def _second_scene(rng: Rng, first: Scene, same: bool, config: ShapeWorldConfig, split: str) -> Scene | None:
    """The next scene of `rng`'s stream with as many objects as `first` (same=True) or another number; None if
    none comes within _MAX_ATTEMPTS draws."""
    for _ in range(_MAX_ATTEMPTS):
        second = _sample_scene(rng, config, split)
        if (len(second.objects) == len(first.objects)) == same:
            return second
    return None


class TwoImageDataset(_SplitDataset):
    """(images (2, 3, H, W), turns, skills): two scenes and the `two_image_question` about them.

    The user turn is "<|image|><|image|>do the two images have the same number of objects?". Item i's
    answer is "yes" for even i and "no" for odd i: the first scene is drawn, then the second is
    re-drawn from the same seed's stream until it fits that answer, so the answer does not depend on
    what the first image shows (`scenes(i)` gives the two scenes). `counts=True` gives the answers
    that say both counts first (`two_image_question`)."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, *, cache: bool = False,
                 offset: int = 0, counts: bool = False) -> None:
        super().__init__(split, size, config, cache, offset)
        self.counts = bool(counts)

    def scenes(self, i: int) -> tuple[Scene, Scene]:
        """Item i's two scenes."""
        return self._scenes(*_item_rng(self, i))

    def _scenes(self, rng: Rng, i: int) -> tuple[Scene, Scene]:
        first = _sample_scene(rng, self.config, self.split)
        same = i % 2 == 0
        second = _second_scene(rng, first, same, self.config, self.split)
        if second is None:
            raise RuntimeError(f"no second scene with {'the same' if same else 'another'} number of objects for item {i}")
        return first, second

    def _make(self, rng: Rng, i: int) -> tuple:
        first, second = self._scenes(rng, i)
        qa = two_image_question(first, second, self.counts)
        images = torch.stack([to_tensor(render(first)), to_tensor(render(second))])
        return images, (Turn("user", IMAGE * 2 + qa.question), Turn("assistant", qa.answer)), (qa.skill,)


WHAT_CHANGED = "what changed?"
CHANGE_KINDS = ("colour", "gone", "added")  # item i of a ChangeDataset makes edit CHANGE_KINDS[i % 3]


def _allowed_pairs(config: ShapeWorldConfig, split: str | None) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a scene of `split` may hold: the train pairs, or every pair for the compositional
    split and for no split."""
    if split in (None, "compositional"):
        return [(c, s) for c in config.colours for s in config.shapes]
    return config.train_pairs()


def edit_scene(scene: Scene, kind: str, rng: Rng | random.Random | int, config: ShapeWorldConfig | None = None,
               split: str | None = None) -> tuple[Scene, QA] | None:
    """`scene` after one edit of `kind`, and the "what changed?" question whose answer names it; None if `scene`
    does not allow that edit.

    - "colour": one object takes another colour ("the red circle turned blue");
    - "gone": one object is removed ("the blue square is gone"), from scenes of two objects or more;
    - "added": a new object appears in a free place ("a green cross appeared"), in scenes with fewer than
      `config.max_objects`.

    A scene never holds one (colour, shape) pair twice, so "the red circle" names one object, before and after.
    New pairs obey `split`'s held-out rule (a compositional scene keeps a held-out pair), and the other
    objects, the text and their places stay as they were. `config` must be the one the scene was drawn with."""
    from dataclasses import replace

    if kind not in CHANGE_KINDS:
        raise ValueError(f"kind {kind!r} is invalid: expected one of {', '.join(CHANGE_KINDS)}")
    _check_split(split)
    rng, config = _as_rng(rng), config or ShapeWorldConfig()
    if (scene.image_size, scene.canvas) != (config.image_size, config.canvas):
        raise ValueError(f"the scene is {scene.image_size} px (canvas {scene.canvas}) but config is {config.image_size} px "
                         f"(canvas {config.canvas}): expected the config the scene was drawn with")
    objects = list(scene.objects)
    present = {(o.colour, o.shape) for o in objects}
    allowed = [p for p in _allowed_pairs(config, split) if p not in present]
    if kind == "colour":
        if not objects:
            return None
        j = rng.below(len(objects))
        old = objects[j]
        colours = [c for c, shape in allowed if shape == old.shape]
        if not colours:
            return None
        objects[j] = replace(old, colour=rng.choice(colours))
        answer = f"the {old.name} turned {objects[j].colour}"
    elif kind == "gone":
        if len(objects) < 2:
            return None
        old = objects.pop(rng.below(len(objects)))
        answer = f"the {old.name} is gone"
    else:
        if len(objects) >= config.max_objects or not allowed:
            return None
        colour, shape = rng.choice(allowed)
        size = rng.choice(SIZES)
        side = config.sides[size]
        taken = [o.box for o in objects] + ([scene.text_box] if scene.text_box else [])
        corner = _place(rng, side, side, taken, (config.height, config.width), config.gap, config.snap)
        if corner is None:
            return None
        objects.append(ShapeObject(shape, colour, size, corner[0], corner[1], side))
        answer = f"{_a(colour)} {colour} {shape} appeared"
    if split == "compositional" and not any((o.colour, o.shape) in config.held_out for o in objects):
        return None  # the split's scenes each hold a held-out pair
    return replace(scene, objects=tuple(objects)), QA(WHAT_CHANGED, answer, "what changed")


def change_kind(answer: str) -> str | None:
    """The kind of edit an answer names ("colour", "gone" or "added"), or None if it names none."""
    words = answer.split()
    if len(words) == 5 and words[0] == "the" and words[3] == "turned":
        return "colour"
    if len(words) == 5 and words[0] == "the" and words[3:] == ["is", "gone"]:
        return "gone"
    if len(words) == 4 and words[0] in ("a", "an") and words[3] == "appeared":
        return "added"
    return None


class ChangeDataset(_SplitDataset):
    """(images (2, 3, H, W), turns, skills): a scene, the same scene after one `edit_scene`, and "what changed?".

    The user turn is "<|image|><|image|>what changed?". Item i makes the edit CHANGE_KINDS[i % 3], so the
    three kinds are equally common: its first scene is drawn again from the seed's stream until it
    allows that edit (`scenes(i)` gives the two scenes and the question)."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, *, cache: bool = False,
                 offset: int = 0) -> None:
        super().__init__(split, size, config, cache, offset)

    def scenes(self, i: int) -> tuple[Scene, Scene, QA]:
        """Item i's scene before and after the edit, and its question."""
        return self._scenes(*_item_rng(self, i))

    def _scenes(self, rng: Rng, i: int) -> tuple[Scene, Scene, QA]:
        kind = CHANGE_KINDS[i % len(CHANGE_KINDS)]
        for _ in range(_MAX_ATTEMPTS):
            first = _sample_scene(rng, self.config, self.split)
            edited = edit_scene(first, kind, rng, self.config, self.split)
            if edited is not None:
                return first, *edited
        raise RuntimeError(f"no scene allowed the edit {kind!r} for item {i} in {_MAX_ATTEMPTS} draws")

    def _make(self, rng: Rng, i: int) -> tuple:
        first, second, qa = self._scenes(rng, i)
        images = torch.stack([to_tensor(render(first)), to_tensor(render(second))])
        return images, (Turn("user", IMAGE * 2 + qa.question), Turn("assistant", qa.answer)), (qa.skill,)


def _check_per_row(per_row: int) -> int:
    if isinstance(per_row, bool) or not isinstance(per_row, int) or per_row < 1:
        raise ValueError(f"per_row {per_row!r} is invalid: expected an int >= 1")
    return per_row


class TextOnlyDataset(_SplitDataset):
    """(None, TextDocument, ("text",)): `per_row` ShapeWorld descriptions of scenes of the split, the text chapter 04's
    LM was pretrained on (`shapeworld.description`, never rendered); item i's from the split's seed i (plus `offset`)."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, *, per_row: int = 6,
                 cache: bool = False, offset: int = 0) -> None:
        super().__init__(split, size, config, cache, offset)
        self.per_row = _check_per_row(per_row)

    def _make(self, rng: Rng, i: int) -> tuple:
        texts = tuple(description(_sample_scene(rng, self.config, self.split)) for _ in range(self.per_row))
        return None, TextDocument(texts), ("text",)


class InterleavedDataset(_SplitDataset):
    """(images (per_row, 3, H, W), InterleavedDocument, ("interleaved",)): `per_row` scenes of the split, each image
    followed by its `description`, the kind of text chapter 04's LM was pretrained on, here beside the image it
    describes; item i's from the split's seed i (plus `offset`)."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, *, per_row: int = 2,
                 cache: bool = False, offset: int = 0) -> None:
        super().__init__(split, size, config, cache, offset)
        self.per_row = _check_per_row(per_row)

    def _make(self, rng: Rng, i: int) -> tuple:
        scenes = [_sample_scene(rng, self.config, self.split) for _ in range(self.per_row)]
        images = torch.stack([to_tensor(render(s)) for s in scenes])
        return images, InterleavedDocument(tuple(description(s) for s in scenes)), ("interleaved",)


def text_perplexity(lm, tokenizer: Tokenizer | None = None, size: int | None = None) -> float:
    """The perplexity of an LM (a `GPT`, e.g. `model.lm`) on chapter 04's held-out text: `size` (default
    `PretrainRecipe().val_texts`) "val" descriptions packed into windows of its context, as chapter 04 measures it."""
    from mllm_scratch.gpt import PretrainRecipe, evaluate_lm
    from mllm_scratch.shapeworld import TextDataset
    from mllm_scratch.text import PackedTextDataset, pack_texts, perplexity
    from mllm_scratch.tokenizer import load_tokenizer

    recipe = PretrainRecipe()
    size = recipe.val_texts if size is None else size
    tokenizer = tokenizer or load_tokenizer()
    texts = TextDataset("val", size)
    stream = pack_texts([texts[i] for i in range(size)], tokenizer)
    return perplexity(evaluate_lm(lm, PackedTextDataset(stream, recipe.model.context_length)))


@torch.no_grad()
def dialogue_accuracy(model: UnifiedVLM, template: ChatTemplate, dataset, max_new_tokens: int = 40) -> dict:
    """Exact-match accuracy of each assistant turn, given the true conversation before it.

    For turn k the model sees every earlier turn with its true reply (teacher forcing of the
    history), so a turn is scored on its own, not on the model's earlier mistakes. Returns
    {"turns": accuracy over every non-caption turn, "by_skill": {skill: accuracy},
    "by_turn": {k: accuracy of the k-th question}, "count": number of turns scored}."""
    by_skill: dict[str, list[bool]] = {}
    by_turn: dict[int, list[bool]] = {}
    for images, turns, skills in dataset:
        k_question = 0
        for k, skill in enumerate(skills):
            said = reply(model, template, images, turns[: 2 * k + 1], max_new_tokens)
            right = said.strip() == turns[2 * k + 1].text.strip()
            by_skill.setdefault(skill, []).append(right)
            if skill != "caption":
                by_turn.setdefault(k_question, []).append(right)
                k_question += 1
    scored = [r for skill, rs in by_skill.items() if skill != "caption" for r in rs]
    if not scored:
        raise ValueError("the dataset holds no question turns to score (only captions): expected some questions")
    mean = lambda rs: sum(rs) / len(rs)  # noqa: E731
    return {"turns": mean(scored), "by_skill": {s: mean(rs) for s, rs in sorted(by_skill.items())},
            "by_turn": {k: mean(rs) for k, rs in sorted(by_turn.items())}, "count": len(scored)}


# ----------------------------------------------------------------------------------
# A hallucination check (POPE)


POPE_KINDS = ("near", "binding")  # which absent object a POPE question asks about (`pope_questions`)


def binding_misses(scene: Scene, config: ShapeWorldConfig | None = None) -> list[tuple[str, str]]:
    """The training pairs (colour, shape) absent from `scene` whose colour and whose shape are both there, on
    different objects: a red square and a blue circle make "a red circle" and "a blue square"."""
    config = config or ShapeWorldConfig()
    present = {(o.colour, o.shape) for o in scene.objects}
    colours, shapes = {c for c, _ in present}, {s for _, s in present}
    return [p for p in config.train_pairs() if p not in present and p[0] in colours and p[1] in shapes]


def pope_questions(scene: Scene, rng: Rng | random.Random | int, config: ShapeWorldConfig | None = None,
                   kind: str = "near") -> list[QA]:
    """Two yes/no questions about `scene`: one object it holds ("yes") and one it does not ("no").

    kind="near": the absent object is drawn from the training pairs, preferring a near miss (the
    colour or the shape of an object present), which is the kind a model that guesses from parts
    says "yes" to. POPE's adversarial setting asks about objects that often appear together with
    those present; a near miss is this world's analogue of it.
    kind="binding": the absent object's colour and shape are both in the scene, on different
    objects (`binding_misses`); a scene without one raises ValueError."""
    if kind not in POPE_KINDS:
        raise ValueError(f"kind {kind!r} is invalid: expected one of {POPE_KINDS}")
    rng = _as_rng(rng)
    config = config or ShapeWorldConfig()
    present = {(o.colour, o.shape) for o in scene.objects}
    absent = [p for p in config.train_pairs() if p not in present]
    if not absent:
        raise ValueError(f"scene holds every training pair {sorted(present)}: no absent object to ask about")
    if kind == "binding":
        pool = binding_misses(scene, config)
        if not pool:
            raise ValueError(f"scene {sorted(present)} has no absent pair of a colour and a shape it holds: "
                             "expected objects of two colours and two shapes at least")
    else:
        pool = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)] or absent
    colour, shape = rng.choice(sorted(present))
    out = [QA(f"is there {_a(colour)} {colour} {shape}?", "yes", "pope")]
    colour, shape = rng.choice(pool)
    out.append(QA(f"is there {_a(colour)} {colour} {shape}?", "no", "pope"))
    rng.shuffle(out)
    return out


def pope_scores(predicted: Sequence[str], truth: Sequence[str]) -> dict[str, float]:
    """POPE's numbers for yes/no replies: accuracy, precision and recall of "yes", F1, and the yes-ratio.

    Replies match exactly (after stripping spaces): "Yes" or "yes." is neither answer. Such a reply is
    wrong, is not a "yes" (so it lowers recall as a "no" would), and counts in the yes-ratio's
    denominator. A model that never says "yes" has precision 0."""
    if len(predicted) != len(truth) or not truth:
        raise ValueError(f"got {len(predicted)} predictions for {len(truth)} answers: expected as many, at least one")
    bad = sorted({t for t in truth if t not in ("yes", "no")})
    if bad:
        raise ValueError(f"true answers {bad} are not yes/no: expected 'yes' or 'no'")
    said_yes = [p.strip() == "yes" for p in predicted]
    is_yes = [t == "yes" for t in truth]
    tp = sum(p and t for p, t in zip(said_yes, is_yes))
    correct = sum(p.strip() == t for p, t in zip(predicted, truth))
    precision = tp / sum(said_yes) if any(said_yes) else 0.0
    recall = tp / sum(is_yes) if any(is_yes) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": correct / len(truth), "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(said_yes) / len(truth)}


class PopeDataset(_SplitDataset):
    """(images (1, 3, H, W), turns, skills): one `pope_questions` question per scene, "yes" for even i, "no" for odd.

    kind="binding" draws scenes from each seed's stream until one has a `binding_misses` pair, for the
    "yes" items as for the "no" ones, so that both halves ask about scenes of the same kind."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, *, cache: bool = False,
                 offset: int = 0, kind: str = "near") -> None:
        super().__init__(split, size, config, cache, offset)
        if kind not in POPE_KINDS:
            raise ValueError(f"kind {kind!r} is invalid: expected one of {POPE_KINDS}")
        self.kind = kind

    def _make(self, rng: Rng, i: int) -> tuple:
        for _ in range(_MAX_ATTEMPTS):
            scene = _sample_scene(rng, self.config, self.split)
            if self.kind == "near" or binding_misses(scene, self.config):
                break
        else:
            raise RuntimeError(f"no scene with a binding miss for item {i}")
        qa = next(q for q in pope_questions(scene, rng, self.config, self.kind)
                  if q.answer == ("yes" if i % 2 == 0 else "no"))
        return to_tensor(render(scene))[None], (Turn("user", IMAGE + qa.question), Turn("assistant", qa.answer)), ("pope",)


@torch.no_grad()
def pope_accuracy(model: UnifiedVLM, template: ChatTemplate, dataset: PopeDataset) -> dict[str, float]:
    """`pope_scores` of the model's replies to a `PopeDataset`'s questions."""
    said = [reply(model, template, images, turns[:1], max_new_tokens=4) for images, turns, _ in dataset]
    return pope_scores(said, [turns[1].text for _, turns, _ in dataset])


# ----------------------------------------------------------------------------------
# Preference tuning (DPO)


def rejected_answer(qa: QA, rng: Rng | random.Random | int, config: ShapeWorldConfig | None = None) -> str:
    """A wrong answer close to the right one: another colour, shape or count (one more or one fewer), or
    the answer flipped (yes/no)."""
    rng = _as_rng(rng)
    config = config or ShapeWorldConfig()
    answer = qa.answer
    flips = {"yes": "no", "no": "yes"}
    if answer in flips:
        return flips[answer]
    for pool in (config.colours, config.shapes):
        if answer in pool:
            return rng.choice([w for w in pool if w != answer])
    if answer in NUMBER_WORDS:
        n = NUMBER_WORDS.index(answer)
        near = [k for k in (n - 1, n + 1) if config.min_objects <= k <= config.max_objects and k > 0]
        return NUMBER_WORDS[rng.choice(near or [k for k in range(1, len(NUMBER_WORDS)) if k != n])]
    raise ValueError(f"answer {answer!r} ({qa.skill}) has no perturbation: expected yes/no, "
                     "a colour, a shape or a number word")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Sum of log p(label) over each row's scored tokens: logits (B, T, V) predict labels (B, T) at the same t.

    A model's logits at t predict the token at t + 1, so shift first:
    `sequence_logprobs(logits[:, :-1], labels[:, 1:])`."""
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} differ: expected (B, T, V) "
                         "and (B, T)")
    scored = labels != ignore_index
    picked = torch.gather(F.log_softmax(logits.float(), dim=-1), -1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * scored).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO (Rafailov et al., 2023): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged.

    The arguments are sequence log-probabilities (B,) of the chosen and rejected answers under the
    policy being tuned and under the frozen reference. Returns the loss and, as detached tensors (no
    host-device sync in a training step), the mean implicit rewards beta * (pi - ref) of each and how
    often the chosen one's is higher."""
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta {beta!r} is invalid: expected a positive number")
    named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "ref_chosen": ref_chosen,
             "ref_rejected": ref_rejected}
    shapes = {name: tuple(t.shape) for name, t in named.items()}
    b = shapes["policy_chosen"]
    if len(b) != 1 or b[0] < 1 or any(v != b for v in shapes.values()):
        raise ValueError(f"log-probabilities of shapes {shapes}: expected four tensors of one shape (B,), B >= 1")
    chosen = beta * (policy_chosen - ref_chosen.detach())
    rejected = beta * (policy_rejected - ref_rejected.detach())
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, {"chosen_reward": chosen.detach().mean(), "rejected_reward": rejected.detach().mean(),
                  "reward_accuracy": (chosen > rejected).float().mean()}


# ----------------------------------------------------------------------------------
# Instruction tuning: chapter 06's model taught the chat format


def _check_fields(recipe: object, counts: Sequence[str], zero_or_more: Sequence[str], rates: Sequence[str]) -> None:
    """A recipe's fields, or ValueError naming the first bad one: `counts` ints >= 1, `zero_or_more` ints >= 0,
    `rates` positive finite numbers."""
    for names, low in ((counts, 1), (zero_or_more, 0)):
        for name in names:
            value = getattr(recipe, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} {value!r} is invalid: expected an int >= {low}")
    for name in rates:
        value = getattr(recipe, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{name} {value!r} is invalid: expected a positive number")


CHAT_OFFSET = 6_000_000  # where the dialogues' scenes start among the train seeds: scenes of their own
TWO_IMAGE_OFFSET = 7_000_000  # and the two-image questions' (two scenes each)
CHANGE_OFFSET = 7_500_000  # and the "what changed?" questions'
TEXT_OFFSET = 9_000_000  # and the text-only rows' (six descriptions each)
INTERLEAVED_OFFSET = 9_500_000  # and the interleaved documents' (two scenes each)


@dataclass(frozen=True)
class ChatRecipe:
    """Instruction tuning of chapter 06's shipped model: dialogues about one image and questions about two.

    The LM's learned position table grows to `context_length` (`tiling.extend_positions`, new rows
    copied from the rows the base model read its questions at): a dialogue with a caption, or two
    images of 64 tokens each, does not fit in the 128 positions chapter 06's LM has. The tower
    stays frozen; the projector trains at `lr` and the LM at `lm_lr`."""

    dialogues: int = 20_000
    two_image: int = 5_000
    # Text-only rows (`TextOnlyDataset`, 6 descriptions each) mixed in; stored only when set
    text_only: int = field(default=0, metadata=SWITCH)
    # Two-image answers that say both counts before the verdict (`two_image_question(counts=True)`); stored only when set
    two_image_counts: bool = field(default=False, metadata=SWITCH)
    # "What changed?" questions (`ChangeDataset`); stored only when set
    what_changed: int = field(default=0, metadata=SWITCH)
    # Interleaved documents (`InterleavedDataset`: two images, each followed by its description); stored only when set
    interleaved: int = field(default=0, metadata=SWITCH)
    describe: float = 0.5
    max_questions: int = 3
    context_length: int = 192
    steps: int = 3_000
    batch_size: int = 32
    lr: float = 1e-3
    lm_lr: float = 3e-4
    warmup_steps: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        _check_fields(self, ("dialogues", "max_questions", "context_length", "steps", "batch_size"),
                      ("two_image", "text_only", "what_changed", "interleaved", "warmup_steps", "seed"), ("lr", "lm_lr"))
        _check_dialogue(self.max_questions, self.describe)
        if not isinstance(self.two_image_counts, bool):
            raise ValueError(f"two_image_counts {self.two_image_counts!r} is invalid: expected True or False")
        if self.interleaved and self.context_length < INTERLEAVED_WINDOW:
            raise ValueError(f"context_length {self.context_length} is too short for interleaved documents: expected "
                             f"at least {INTERLEAVED_WINDOW}")

    def to_dict(self) -> dict:
        from mllm_scratch.vit import config_dict

        return config_dict(self)


def chat_dataset(recipe: ChatRecipe, config: ShapeWorldConfig | None = None):
    """The training rows: `recipe.dialogues` dialogues, `recipe.two_image` two-image questions, `recipe.what_changed`
    "what changed?" questions, `recipe.text_only` text-only rows and `recipe.interleaved` interleaved documents."""
    from torch.utils.data import ConcatDataset

    parts = [DialogueDataset("train", recipe.dialogues, config, describe=recipe.describe,
                             max_questions=recipe.max_questions, cache=True, offset=CHAT_OFFSET)]
    if recipe.two_image:
        parts.append(TwoImageDataset("train", recipe.two_image, config, cache=True, offset=TWO_IMAGE_OFFSET,
                                     counts=recipe.two_image_counts))
    if recipe.what_changed:
        parts.append(ChangeDataset("train", recipe.what_changed, config, cache=True, offset=CHANGE_OFFSET))
    if recipe.text_only:
        parts.append(TextOnlyDataset("train", recipe.text_only, config, cache=True, offset=TEXT_OFFSET))
    if recipe.interleaved:
        parts.append(InterleavedDataset("train", recipe.interleaved, config, cache=True, offset=INTERLEAVED_OFFSET))
    return ConcatDataset(parts)


def build_chat_vlm(base: UnifiedVLM, recipe: ChatRecipe) -> UnifiedVLM:
    """A copy of `base` whose LM's position table is grown to `recipe.context_length` (the tower is shared)."""
    from dataclasses import replace

    from mllm_scratch.tiling import extend_positions

    # A copy of the LM, its new rows copied from those after the image tokens (a shorter context: a clear error)
    lm = extend_positions(base.lm, recipe.context_length, base.config.num_image_tokens)
    model = UnifiedVLM(replace(base.config, lm=lm.config), encoder=base.encoder, lm=lm)
    model.projector.load_state_dict(base.projector.state_dict())
    return model


def train_chat_vlm(recipe: ChatRecipe | None = None, tokenizer: Tokenizer | None = None, *,
                   base: UnifiedVLM | None = None, steps: int | None = None, log_every: int = 500,
                   progress: bool = True, device=None):
    """Instruction-tune chapter 06's shipped model (or `base`) on `chat_dataset`: returns (model, History).

    Every conversation is encoded by `ChatTemplate` (the loss on the replies only), batched by
    `ChatCollator` and trained with `chat_loss`; `steps` shortens the run."""
    from mllm_scratch.train import TrainConfig, batches, train
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.vlm import load_vlm

    recipe = recipe or ChatRecipe()
    tokenizer = tokenizer or load_tokenizer()
    base = base if base is not None else load_vlm()
    torch.manual_seed(recipe.seed)
    model = build_chat_vlm(base, recipe)
    model.set_trainable(encoder=False, projector=True, lm=True)
    template = ChatTemplate(tokenizer, model.num_image_tokens)
    n = recipe.steps if steps is None else steps
    optimizer = torch.optim.AdamW([{"params": list(model.projector.parameters()), "lr": recipe.lr},
                                   {"params": list(model.lm.parameters()), "lr": recipe.lm_lr}],
                                  lr=recipe.lr, weight_decay=0.0)
    config = TrainConfig(steps=n, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps, n), weight_decay=0.0,
                         min_lr_ratio=0.0, record_every=10, log_every=log_every, progress=progress)
    data = batches(chat_dataset(recipe, base_scene_config(base)), recipe.batch_size, seed=recipe.seed,
                   collate_fn=ChatCollator(template))
    history = train(model, data, chat_loss, config, optimizer=optimizer, device=device,
                    batch_size_of=lambda b: b.ids.shape[0])
    model.set_trainable(encoder=False, projector=False, lm=False)
    return model.eval(), history


def base_scene_config(model: UnifiedVLM) -> ShapeWorldConfig:
    """The scenes a model's tower reads: ShapeWorld at its image size."""
    return ShapeWorldConfig(image_size=model.config.vision.image_size)


# ----------------------------------------------------------------------------------
# Preference tuning: DPO on pairs of a right and a perturbed answer


PREFERENCE_OFFSET = 8_000_000  # where the preference pairs' scenes start among the train seeds
PREFERENCE_SKILLS = ("colour", "shape", "count", "spatial", "existence", "two images")
PREFERENCE_POPE_KINDS = (*POPE_KINDS, "both")  # "both": near-miss and binding POPE pairs in turn


class PreferenceDataset(_SplitDataset):
    """(images (k, 3, H, W), prompt turns, chosen, rejected, skill): a question, its answer and a wrong one.

    Even items are `pope_questions` of `kind` ("binding" by default): items 0, 4, 8, ... ask about
    an absent object (chosen "no", rejected "yes": the hallucination preference tuning is meant to
    remove), items 2, 6, 10, ... about an object that is there (chosen "yes", rejected "no"), so
    that the model is not simply taught to say "no". As in `PopeDataset`, binding questions of both
    answers draw scenes that have a binding miss, so that the kind of scene does not give the answer
    away. `kind="both"` alternates near-miss and binding questions, each with both answers (items 0
    and 2 near, 4 and 6 binding, and so on). Odd items cycle
    through `PREFERENCE_SKILLS`, the rejected answer from `rejected_answer`; "two images" items are
    `TwoImageDataset`'s question about two scenes (k = 2), "yes" and "no" equally often."""

    def __init__(self, split: str, size: int, config: ShapeWorldConfig | None = None, *, cache: bool = False,
                 offset: int = 0, kind: str = "binding") -> None:
        super().__init__(split, size, config, cache, offset)
        if kind not in PREFERENCE_POPE_KINDS:
            raise ValueError(f"kind {kind!r} is invalid: expected one of {PREFERENCE_POPE_KINDS}")
        self.kind = kind

    def _make(self, rng: Rng, i: int) -> tuple:
        skill = "pope" if i % 2 == 0 else PREFERENCE_SKILLS[(i // 2) % len(PREFERENCE_SKILLS)]
        for _ in range(_MAX_ATTEMPTS):  # re-sample from the same seed's stream until the question applies
            scene = _sample_scene(rng, self.config, self.split)
            if skill == "pope":
                kind = self.kind if self.kind != "both" else POPE_KINDS[(i // 4) % 2]
                if kind == "binding" and not binding_misses(scene, self.config):
                    continue
                want = "no" if i % 4 == 0 else "yes"
                qa = next(q for q in pope_questions(scene, rng, self.config, kind) if q.answer == want)
            elif skill == "two images":
                same = (i // 2 // len(PREFERENCE_SKILLS)) % 2 == 0  # "yes" and "no" in turn
                second = _second_scene(rng, scene, same, self.config, self.split)
                if second is None:
                    continue
                qa = two_image_question(scene, second)
                images = torch.stack([to_tensor(render(scene)), to_tensor(render(second))])
                prompt = (Turn("user", IMAGE * 2 + qa.question),)
                return images, prompt, qa.answer, rejected_answer(qa, rng, self.config), qa.skill
            else:
                qas = questions(scene, rng, [skill], self.config)
                if not qas:
                    continue
                qa = qas[0]
            prompt = (Turn("user", IMAGE + qa.question),)
            return to_tensor(render(scene))[None], prompt, qa.answer, rejected_answer(qa, rng, self.config), qa.skill
        raise RuntimeError(f"no question found for item {i}")


class PreferenceCollator:
    """Collate `PreferenceDataset` items into one `ChatBatch` of 2B rows: the B chosen replies, then the B rejected."""

    def __init__(self, template: ChatTemplate):
        self.chat = ChatCollator(template)

    def __call__(self, items: Sequence[tuple]) -> ChatBatch:
        rows = [(im, prompt + (Turn("assistant", chosen),)) for im, prompt, chosen, _, _ in items]
        rows += [(im, prompt + (Turn("assistant", rejected),)) for im, prompt, _, rejected, _ in items]
        return self.chat(rows)


def preference_logprobs(model: UnifiedVLM, batch: ChatBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequence log-probabilities (B,) of the chosen and the rejected replies of a `PreferenceCollator` batch."""
    rows = batch.ids.shape[0]
    if rows % 2:
        raise ValueError(f"a preference batch of {rows} rows: expected an even number, the chosen rows then the rejected")
    logits = model.lm(inputs_embeds=splice_images(model, batch.ids, batch.images))
    logps = sequence_logprobs(logits[:, :-1], batch.labels[:, 1:])  # logits at t predict the token at t + 1
    half = rows // 2
    return logps[:half], logps[half:]


@dataclass(frozen=True)
class DPORecipe:
    """Direct Preference Optimization of a chat model's LM on `PreferenceDataset` pairs (the tower and projector frozen).

    `sft_weight` adds that multiple of the chosen answers' mean next-token loss to DPO's, as iterative
    RPO does (weight 1; Llama 3's post-training uses 0.2): DPO alone can raise the chosen answer over
    the rejected one by lowering both. `pope_kind` is the `PreferenceDataset`'s: "binding", "near", or
    "both" in turn.

    `replay` rows of the chat model's own instruction data (`chat_dataset(ChatRecipe())`) join every
    step, their next-token loss added at weight 1: the skills the pairs do not cover keep a gradient,
    as InstructGPT's PPO-ptx mixed pretraining gradients into its RL to reduce the "alignment tax".
    The rows are `ChatRecipe()`'s whatever model is tuned, shuffled by `seed` (with seed 0, in the
    order the shipped chat model was tuned on them). Stored only when set, so recipes from before it
    keep their manifest."""

    pairs: int = 10_000
    steps: int = 200
    batch_size: int = 32
    lr: float = 1e-4
    beta: float = 0.1
    sft_weight: float = 1.0
    pope_kind: str = "binding"
    warmup_steps: int = 20
    seed: int = 0
    replay: int = field(default=0, metadata=SWITCH)

    def __post_init__(self) -> None:
        _check_fields(self, ("pairs", "steps", "batch_size"), ("warmup_steps", "seed", "replay"), ("lr", "beta"))
        w = self.sft_weight
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"sft_weight {w!r} is invalid: expected a number >= 0")
        if self.pope_kind not in PREFERENCE_POPE_KINDS:
            raise ValueError(f"pope_kind {self.pope_kind!r} is invalid: expected one of {PREFERENCE_POPE_KINDS}")

    def to_dict(self) -> dict:
        from mllm_scratch.vit import config_dict

        return config_dict(self)


def dpo_objective(reference: UnifiedVLM, beta: float, sft_weight: float = 0.0):
    """The `loss_fn` for `train`: `dpo_loss` of the policy being trained against the frozen `reference`, plus
    `sft_weight` times the mean next-token loss of the chosen answers (their tokens and <|end|>).

    A batch may also be a pair (preference batch, replay batch): the replay `ChatBatch`'s `chat_loss` is
    then added (`DPORecipe.replay`)."""

    def loss_fn(policy: UnifiedVLM, batch) -> torch.Tensor:
        if isinstance(batch, tuple) and not isinstance(batch, ChatBatch):
            batch, replayed = batch
            return loss_fn(policy, batch) + chat_loss(policy, replayed)
        chosen, rejected = preference_logprobs(policy, batch)
        with torch.no_grad():
            ref_chosen, ref_rejected = preference_logprobs(reference, batch)
        loss = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta)[0]
        if sft_weight:
            scored = (batch.labels[: chosen.shape[0], 1:] != IGNORE_INDEX).sum()
            loss = loss - sft_weight * chosen.sum() / scored
        return loss

    return loss_fn


def train_dpo(model: UnifiedVLM, recipe: DPORecipe | None = None, tokenizer: Tokenizer | None = None, *,
              steps: int | None = None, log_every: int = 100, progress: bool = True, device=None):
    """DPO on a copy of `model` (its LM trains; tower and projector stay frozen) against another copy, frozen,
    as the reference (three models in memory). Returns (policy, History); `model` is left as it was.

    The policy trains in train mode and the reference runs in eval mode: the same function only while
    the model has no dropout (the book's models have none), as the first step's DPO loss of log 2 assumes
    (with `sft_weight`, the first loss is log 2 plus that multiple of the chosen answers' loss)."""
    import copy

    from mllm_scratch.runtime import choose_device
    from mllm_scratch.tokenizer import load_tokenizer
    from mllm_scratch.train import TrainConfig, batches, train

    recipe = recipe or DPORecipe()
    device = choose_device(device) if not isinstance(device, torch.device) else device  # as train() chooses it
    tokenizer = tokenizer or load_tokenizer()
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    policy = copy.deepcopy(model).requires_grad_(False)
    policy.lm.requires_grad_(True)
    template = ChatTemplate(tokenizer, model.num_image_tokens)
    n = recipe.steps if steps is None else steps
    config = TrainConfig(steps=n, lr=recipe.lr, warmup_steps=min(recipe.warmup_steps, n), weight_decay=0.0,
                         min_lr_ratio=0.0, record_every=1 if n < 10 else 10, log_every=log_every, progress=progress)
    data = batches(PreferenceDataset("train", recipe.pairs, base_scene_config(model), cache=True,
                                     offset=PREFERENCE_OFFSET, kind=recipe.pope_kind),
                   recipe.batch_size, seed=recipe.seed, collate_fn=PreferenceCollator(template))
    if recipe.replay:  # the instruction data the chat model was tuned on, in its own order for this seed
        data = zip(data, batches(chat_dataset(ChatRecipe(), base_scene_config(model)), recipe.replay,
                                 seed=recipe.seed, collate_fn=ChatCollator(template)))
    reference.to(device)  # beside the policy, which train() moves there
    history = train(policy, data, dpo_objective(reference, recipe.beta, recipe.sft_weight), config, device=device,
                    batch_size_of=lambda b: (b[0] if recipe.replay else b).ids.shape[0] // 2)
    return policy.requires_grad_(False).eval(), history


# ----------------------------------------------------------------------------------
# The shipped chat model: `ChatRecipe()` trained, scored and saved


CHAT_CHECKPOINT_NAME = "chat_vlm"
CHAT_EVAL = {"dialogues": 1000, "two_image": 1000, "pope": 1000}  # held-out (test) items each score is measured on


def _chat_checkpoint_path():
    from mllm_scratch.checkpoints import DEFAULT_DIR

    return DEFAULT_DIR / f"{CHAT_CHECKPOINT_NAME}.pt"


def two_image_accuracy(model: UnifiedVLM, template: ChatTemplate, dataset: "TwoImageDataset", *,
                       control: str | None = None, max_new_tokens: int | None = None) -> float:
    """Exact-match accuracy on `TwoImageDataset` questions: of the verdict, the reply's last word, when the
    dataset's answers say the counts first (`counts=True`; `chat_scores` also scores the counts said).

    `control="one image"` gives the model the first image in both places: a model that compares
    the two then always finds the same number and says "yes", right on half of the items, as a
    guess is; a model that answers from some shortcut in the first image keeps its score."""
    if control not in (None, "one image"):
        raise ValueError(f"control {control!r} is invalid: expected None or 'one image'")
    return _two_image_scores(model, template, dataset, control, max_new_tokens)[0]


def _two_image_scores(model, template, dataset, control=None, max_new_tokens=None) -> tuple[float, dict | None]:
    """(verdict accuracy, and for answers that say the counts first a dict, else None).

    The dict: the share of replies whose two counts are both right ("both"), whose first and second count
    are right ("first", "second"); each count's share on items whose two images hold the same number
    ("same", "first same", "second same") and on those that do not ("differ", "first differ", "second
    differ"); and "agree", the share of replies whose verdict is the one their own two counts give."""
    counts = getattr(dataset, "counts", False)
    if max_new_tokens is None:  # the longest answer's tokens and <|end|>, with room to spare
        max_new_tokens = 10 if counts else 4
    right, said = [], []
    for images, turns, _ in dataset:
        if control == "one image":
            images = images[:1].expand(2, -1, -1, -1)
        out = reply(model, template, images, turns[:1], max_new_tokens=max_new_tokens).strip()
        if counts:
            right.append(out.split(" ")[-1] == turns[1].text.split(" ")[-1])
            true, got = (text.split(", so ")[0].split(" and ") for text in (turns[1].text, out))  # "three and two, so no"
            agree = len(got) == 2 and out.split(" ")[-1] == ("yes" if got[0] == got[1] else "no")
            said.append((got == true, got[:1] == true[:1], got[1:2] == true[1:2], true[0] == true[1], agree))
        else:
            right.append(out == turns[1].text)
    if not right:
        raise ValueError("the dataset is empty: expected at least one two-image question")
    if not counts:
        return sum(right) / len(right), None
    share = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    scores = {k: share([s[j] for s in said]) for j, k in enumerate(("both", "first", "second"))}
    for name, same in (("same", True), ("differ", False)):  # each count, on items whose counts are equal or not
        scores[name] = share([c for s in said if s[3] == same for c in s[1:3]])
        for j, which in ((1, "first"), (2, "second")):
            scores[f"{which} {name}"] = share([s[j] for s in said if s[3] == same])
    scores["agree"] = share([s[4] for s in said])
    return sum(right) / len(right), scores


@torch.no_grad()
def change_accuracy(model: UnifiedVLM, template: ChatTemplate, dataset: ChangeDataset, *,
                    control: str | None = None, max_new_tokens: int = 12) -> dict:
    """Scores on "what changed?" questions: {"accuracy": exact match, "kind": the share of replies that name
    the right kind of edit (`change_kind`), "object": the share that name the right kind and the right object
    (the one that changed colour or is gone, or the one that appeared: "the red circle", "a green cross"),
    "by_kind": {kind: exact match}}.

    `control="one image"` gives the model the first image in both places, as `two_image_accuracy` does:
    nothing changed then, so a model that compares the two images cannot name the edit, and one that
    names it anyway is reading something else."""
    if control not in (None, "one image"):
        raise ValueError(f"control {control!r} is invalid: expected None or 'one image'")
    right, kind_right, object_right, by_kind = [], [], [], {k: [] for k in CHANGE_KINDS}
    for images, turns, _ in dataset:
        if control == "one image":
            images = images[:1].expand(2, -1, -1, -1)
        out = reply(model, template, images, turns[:1], max_new_tokens=max_new_tokens).strip()
        truth = turns[1].text
        right.append(out == truth)
        kind_right.append(change_kind(out) == change_kind(truth))
        object_right.append(kind_right[-1] and out.split()[1:3] == truth.split()[1:3])  # its colour and shape
        by_kind[change_kind(truth)].append(out == truth)
    if not right:
        raise ValueError("the dataset is empty: expected at least one question")
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {"accuracy": mean(right), "kind": mean(kind_right), "object": mean(object_right),
            "by_kind": {k: mean(v) for k, v in by_kind.items() if v}}


def chat_scores(model: UnifiedVLM, tokenizer: Tokenizer | None = None, sizes: dict[str, int] | None = None, *,
                two_image_counts: bool = False, what_changed: bool = False) -> dict:
    """The chat model's held-out scores: per-turn accuracy on dialogues without a caption (`describe=0`), by skill
    and by turn; two-image questions, with the one-image control; and POPE on near-miss objects.

    `two_image_counts`: the model was taught answers that say the counts first; its two-image score is
    then the verdict's, and "counts" the shares of replies whose two counts, first and second count are right.
    `what_changed`: also score `sizes["what_changed"]` (1,000 unless given) "what changed?" questions
    (`change_accuracy`), with the one-image control."""
    from mllm_scratch.tokenizer import load_tokenizer

    if sizes and "what_changed" in sizes and not what_changed:
        raise ValueError(f"sizes gives what_changed={sizes['what_changed']} but what_changed=False: expected "
                         "what_changed=True to score those questions")
    sizes = {**CHAT_EVAL, **({"what_changed": CHAT_EVAL["two_image"]} if what_changed else {}), **(sizes or {})}
    tokenizer = tokenizer or load_tokenizer()
    template = ChatTemplate(tokenizer, model.num_image_tokens)
    config = base_scene_config(model)
    two = TwoImageDataset("test", sizes["two_image"], config, counts=two_image_counts)
    verdicts, said = _two_image_scores(model, template, two)
    two_image = {"accuracy": verdicts, "one_image": two_image_accuracy(model, template, two, control="one image")}
    if two_image_counts:
        two_image["counts"] = said
    scores = {"sizes": sizes,
              "dialogue": dialogue_accuracy(model, template, DialogueDataset("test", sizes["dialogues"], config, describe=0.0)),
              "two_image": two_image,
              "pope": pope_accuracy(model, template, PopeDataset("test", sizes["pope"], config))}
    if what_changed:
        changes = ChangeDataset("test", sizes["what_changed"], config)
        scores["what_changed"] = {**change_accuracy(model, template, changes),
                                  "one_image": change_accuracy(model, template, changes, control="one image")["accuracy"]}
    return scores


def save_chat_vlm(path, model: UnifiedVLM, *, recipe: dict | None = None, metrics: dict | None = None,
                  dtype: torch.dtype | None = None, base_sha256: str | None = None) -> dict:
    """Save a chat model (its projector and LM; the shipped tower by checksum) and its manifest.

    `base_sha256`: the sha256 of the chapter-06 checkpoint it was tuned from (the shipped one's,
    recorded so that `load_chat_vlm` can tell when that file has been rebuilt since)."""
    from mllm_scratch.checkpoints import STORED_DTYPE
    from mllm_scratch.vlm import save_vlm

    if type(model) is not UnifiedVLM:
        raise ValueError(f"save_chat_vlm saves a UnifiedVLM, got a {type(model).__name__}")
    return save_vlm(path, model, recipe=recipe, metrics=metrics, name=CHAT_CHECKPOINT_NAME, dtype=dtype or STORED_DTYPE,
                    loader="mllm_scratch.chat.load_chat_vlm",
                    extra={"base_vlm_sha256": base_sha256} if base_sha256 else None)


def load_chat_vlm(path=None) -> UnifiedVLM:
    """The chat model `scripts/build_checkpoints.py chat_vlm` trains with `ChatRecipe()` (default), or a file saved
    by `save_chat_vlm`; verified before it is built (sha256, config, recipe, tokenizer); eval mode, CPU, frozen."""
    from pathlib import Path

    from mllm_scratch.checkpoints import CheckpointError, load_verified, read_manifest
    from mllm_scratch.gpt import tokenizer_sha256
    from mllm_scratch.tiling import _shipped_vlm_sha256
    from mllm_scratch.vlm import unified_from_checkpoint

    default = _chat_checkpoint_path()
    saved, state_dict, path, rebuild = load_verified(
        CHAT_CHECKPOINT_NAME, path, default, expected_config=None, recipe=ChatRecipe().to_dict(),
        recipe_owner="ChatRecipe() in mllm_scratch/chat.py", tokenizer_sha256=tokenizer_sha256())
    manifest = read_manifest(path, rebuild)
    shipped = Path(path).resolve() == default.resolve()
    if shipped and _shipped_vlm_sha256() is None:
        raise CheckpointError(f"checkpoint {path} is tuned from chapter 06's data/checkpoints/vlm.pt, whose manifest "
                              f"is missing: build it first (python scripts/build_checkpoints.py vlm)")
    if shipped and manifest.get("base_vlm_sha256") != _shipped_vlm_sha256():
        raise CheckpointError(f"checkpoint {path} was tuned from another chapter-06 model than the shipped "
                              f"data/checkpoints/vlm.pt (rebuilt since?); rebuild it with: {rebuild}")
    return unified_from_checkpoint(saved, state_dict, path, rebuild, manifest)


def build_chat_checkpoint(out) -> dict:
    """Train `ChatRecipe()` on chapter 06's shipped model and save it scored (`save_scored_chat`) as
    out/chat_vlm.pt + .json (what `scripts/build_checkpoints.py chat_vlm` calls)."""
    from mllm_scratch.tokenizer import load_tokenizer

    model, history = train_chat_vlm(ChatRecipe(), load_tokenizer(), progress=False, device="cpu")
    return save_scored_chat(out, model, history.loss[-1], history.seconds)


def save_scored_chat(out, model: UnifiedVLM, final_loss: float | None, seconds: float) -> dict:
    """Round `ChatRecipe()`'s trained model to float16, score it (`chat_scores`) and save out/chat_vlm.pt + .json:
    the second half of `build_chat_checkpoint`. `final_loss` None leaves the loss out of the manifest."""
    from pathlib import Path

    from mllm_scratch.checkpoints import STORED_DTYPE, round_to_dtype
    from mllm_scratch.tiling import _shipped_vlm_sha256

    round_to_dtype(model, STORED_DTYPE)  # score the weights the float16 file will hold
    metrics = {**({"loss": round(final_loss, 4)} if final_loss is not None else {}), "train_seconds": round(seconds, 1),
               **chat_scores(model)}
    return save_chat_vlm(Path(out) / f"{CHAT_CHECKPOINT_NAME}.pt", model, recipe=ChatRecipe().to_dict(), metrics=metrics,
                         base_sha256=_shipped_vlm_sha256())
