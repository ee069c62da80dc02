"""InternVL3.5-Flash's router (`vir.py`) on every route into the model: one function routes a forward's inputs
(`route_inputs`, called by the base model's forward, which every forward goes through: the causal LM's, and the LM
heads trainers put in its place), one plans a `generate` call (`plan_generation`: a new prompt, a later turn on a
routed cache, a new image in that turn), and the cache keeps what the router did (`ViRCacheRecord`).

The layout rule, the same on every route: the LLM runs on each row's columns in order (its padding too), minus a
compressed tile's placeholders after its first ``compressed_tokens_per_tile``; rows shortened less than the most get
new padding on the left, and positions, where given, drop by the placeholders deleted before each token in its sample
(the reference numbers its shortened prompt contiguously). A forward's outputs come back in the columns of the prompt
as given (`ViRRouting.restore`; a deleted placeholder's are zeros), so labels, masks and ``logits_to_keep`` index
them as for any model: a trainer that reads log-probs from the end (TRL's GRPO, RLOO, DPO) or by its masks reads the
same tokens as without the router. ``ViRRouting.source`` says which given column each routed column holds.

Saved next to checkpoints as remote code: imports only torch, transformers, the standard library and its own folder.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput

from .input_checks import check_image_inputs
from .vir import tile_tokens, vir_decisions


@dataclass
class ViRRouting(ModelOutput):
    """A batch after the router (`InternVLXModel.route`): the shortened prompt and the tokens that fill its
    placeholders. Forwards that routed their inputs return it as ``vir_routing`` (their outputs in the given columns).

    Args:
        input_ids: ``(batch, L')`` the prompt without the compressed tiles' deleted placeholders (layout above).
        attention_mask: ``(batch, L')`` the given mask's values, 0 on the padding the router added (None where none
            was given and no padding was added, or the rows are packed: position ids without a mask).
        position_ids: ``(batch, L')`` where position ids were given: each drops by the placeholders deleted before
            it in its sample; 0 on the added padding.
        labels: ``(batch, L')`` the labels of the kept tokens (-100 on the added padding), where labels were given.
        image_features: ``(n, D)`` the visual tokens in prompt order: each tile's projector output, or its compressed
            projector output where the router compressed it.
        compressed: ``(tiles,)`` bool, the router's decision per tile (True: compressed).
        scores: ``(tiles,)`` ``p0`` per tile.
        kept: ``(batch, L)`` bool, which columns of the given prompt are kept.
        source: ``(batch, L')`` the given column each routed column holds, -1 on the added padding
            (``routing.take(tensor, pad)`` lays out any ``(batch, L)`` tensor the same way).
        given_input_ids: ``(batch, L)`` the prompt as given.
        groups: ``(samples,)`` tiles per sample, the scopes the quantiles were taken over.
    """

    input_ids: torch.LongTensor | None = None
    attention_mask: torch.Tensor | None = None
    position_ids: torch.LongTensor | None = None
    labels: torch.LongTensor | None = None
    image_features: torch.Tensor | None = None
    compressed: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    kept: torch.Tensor | None = None
    source: torch.LongTensor | None = None
    given_input_ids: torch.LongTensor | None = None
    groups: torch.LongTensor | None = None

    def take(self, tensor: torch.Tensor, pad) -> torch.Tensor:
        """A ``(batch, L)`` tensor of the given prompt laid out as the routed one (``pad`` on the added padding)."""
        return take_columns(tensor, self.source, pad)

    def restore(self, tensor: torch.Tensor) -> torch.Tensor:
        """A ``(batch, L', ...)`` output of the routed prompt in the given prompt's columns ``(batch, L, ...)``:
        each routed column at its given one, zeros at the deleted placeholders (differentiable)."""
        source = self.source.to(tensor.device)
        valid = source >= 0
        rows = torch.arange(source.shape[0], device=tensor.device)[:, None].expand_as(source)[valid]
        restored = tensor.new_zeros((source.shape[0], self.kept.shape[1], *tensor.shape[2:]))
        return restored.index_put((rows, source[valid]), tensor[valid])


# ------------------------------------------------------------------------------------------------------- the layout


def sample_starts(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> torch.Tensor:
    """``(batch, L)`` bool: where each sample begins. A row is one sample, except packed rows, whose samples begin
    where the position ids fall back to 0 on an unmasked token (with or without an attention mask)."""
    starts = torch.zeros_like(input_ids, dtype=torch.bool)
    starts[:, 0] = True
    if position_ids is not None and position_ids.ndim == 2:
        reset = (position_ids == 0).expand_as(starts)
        if attention_mask is not None and attention_mask.ndim == 2:
            reset = reset & attention_mask.bool()
        starts |= reset
    return starts


def tiles_per_sample(image_mask: torch.Tensor, starts: torch.Tensor, tokens_per_tile: int) -> list[int]:
    """Tiles of each sample, samples in prompt order (row by row), from an uncompressed prompt's placeholders."""
    sample = torch.cumsum(starts.reshape(-1).long(), 0) - 1
    counts = torch.bincount(sample[image_mask.reshape(-1)], minlength=int(sample[-1]) + 1)
    return (counts // tokens_per_tile).tolist()


def shorten_prompt(input_ids: torch.Tensor, image_mask: torch.Tensor, compressed: torch.Tensor, tokens_per_tile: int,
                   compressed_tokens_per_tile: int) -> torch.Tensor:
    """``(batch, L)`` bool, the tokens kept: every token but a compressed tile's placeholders after its first
    ``compressed_tokens_per_tile``. The prompt holds ``tokens_per_tile`` placeholders per tile, tiles in order."""
    flat = image_mask.reshape(-1)
    index = torch.arange(int(flat.sum()), device=input_ids.device)
    drop = compressed.to(input_ids.device)[index // tokens_per_tile] & (index % tokens_per_tile
                                                                        >= compressed_tokens_per_tile)
    kept = torch.ones_like(flat)
    kept[flat.nonzero()[:, 0]] = ~drop
    return kept.reshape(input_ids.shape)


def routed_columns(kept: torch.Tensor) -> torch.Tensor:
    """``(batch, L')``: the given column each routed column holds, -1 on the padding added on the left of rows that
    kept fewer columns than the longest (``L'``)."""
    batch, length = kept.shape
    counts = kept.sum(-1)
    width = int(counts.max()) if batch else 0
    filled = torch.arange(width, device=kept.device)[None] >= (width - counts)[:, None]
    source = torch.full((batch, width), -1, dtype=torch.long, device=kept.device)
    source[filled] = torch.arange(length, device=kept.device).expand(batch, -1)[kept]
    return source


def take_columns(tensor: torch.Tensor, source: torch.Tensor, pad) -> torch.Tensor:
    """``tensor`` ``(batch, L)`` (or ``(1, L)``, broadcast) at the columns ``source`` names, ``pad`` where it is -1."""
    source = source.to(tensor.device)
    tensor = tensor.expand(source.shape[0], -1)
    return torch.gather(tensor, 1, source.clamp(min=0)).masked_fill(source < 0, pad)


def shortened_positions(position_ids: torch.Tensor, kept: torch.Tensor, starts: torch.Tensor,
                        attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Given position ids ``(batch, L)``, each unmasked one lowered by the placeholders deleted before it in its
    sample: the reference's contiguous positions of the shortened prompt, whatever the first position is."""
    position_ids = position_ids.expand(kept.shape[0], -1)
    dropped = (~kept).long()
    before = dropped.cumsum(-1) - dropped  # deleted columns strictly before each column
    at_start = torch.where(starts, before, torch.zeros_like(before)).cummax(-1).values
    shift = before - at_start
    if attention_mask is not None:
        shift = shift * attention_mask.bool()
    return position_ids - shift


def varlen_kwargs(varlen: dict, kept: torch.Tensor, source: torch.Tensor) -> dict:
    """flash-attention's packed-sequence kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``) of the given rows,
    translated to the routed ones: a boundary before a given column moves to the first routed column at or after it
    (a row's added padding goes with the sequence before it), the end of the batch to the end of the routed batch."""
    batch, length = kept.shape
    width = source.shape[1]
    kept_before = kept.long().cumsum(-1) - kept.long()  # kept columns strictly before each given column
    offset = width - kept.sum(-1, keepdim=True)  # the padding added on the left of each row
    rows = torch.arange(batch, device=kept.device)[:, None] * width
    table = torch.cat([(rows + offset + kept_before).reshape(-1), torch.tensor([batch * width], device=kept.device)])
    translated = {}
    for side in ("q", "k"):
        cu = varlen.get(f"cu_seq_lens_{side}")
        if cu is None:
            continue
        if cu.ndim != 1 or int(cu[0]) != 0 or int(cu[-1]) != batch * length or bool((cu.diff() < 0).any()):
            raise ValueError(
                f"cu_seq_lens_{side} {cu.tolist()} does not describe the flattened batch of {batch} x {length} "
                f"tokens: it must rise from 0 to {batch * length}. Pass the boundaries that transformers' "
                "DataCollatorWithFlattening(return_flash_attn_kwargs=True) makes for these input_ids.")
        routed = table.to(cu.device)[cu.long()].to(cu.dtype)
        translated[f"cu_seq_lens_{side}"] = routed
        translated[f"max_length_{side}"] = int(routed.diff().max())
    return translated


# -------------------------------------------------------------------------------------------------- routing a batch


def route_batch(model, input_ids, pixel_values, attention_mask=None, position_ids=None, image_flags=None,
                labels=None, compressed=None) -> ViRRouting:
    """`InternVLXModel.route` (see there): ``model`` is the base model, with ``vir``, ``multi_modal_projector`` and
    the vision tower. ``compressed``: ``(tiles,)`` bool decisions to apply instead of the router's (training a router:
    `training.vico`), with the router on or off."""
    config, vir = model.config, model.config.vir
    if vir is None:
        raise ValueError("This model has no router (config.vir is None): it is not an InternVL3.5-Flash model.")
    vir.check()
    per_tile = config.image_seq_length
    image_mask = input_ids == config.image_token_id
    try:
        check_image_inputs(config, pixel_values, image_mask, image_flags, None, None)
    except ValueError as error:
        raise ValueError(f"{error} (The router takes the prompt before it is shortened: {per_tile} <IMG_CONTEXT> "
                         "per tile; a shortened prompt goes to the forward with its image_features.)") from None
    vit, _, _ = model._vision_output(pixel_values, image_flags, {})
    starts = sample_starts(input_ids, attention_mask, position_ids)
    groups = tiles_per_sample(image_mask, starts, per_tile)
    with torch.no_grad():  # a decision has no gradient (the router trains on labels: `training.vico`)
        scores = model.vir.scores(vit)
    if compressed is None:
        compressed = decide(vir, scores, groups)
    else:
        compressed = torch.as_tensor(compressed, dtype=torch.bool, device=scores.device).reshape(-1)
        if compressed.numel() != scores.numel():
            raise ValueError(f"vir_compressed holds {compressed.numel()} decisions but the batch has {scores.numel()} "
                             "tiles; give one per tile, in the order of pixel_values.")
    features = tile_tokens(vit, compressed, model.multi_modal_projector, model.vir.projector)
    kept = shorten_prompt(input_ids, image_mask, compressed, per_tile, config.compressed_tokens_per_tile)
    source = routed_columns(kept)
    pad = config.get_text_config().pad_token_id
    mask = None
    if attention_mask is not None:
        mask = take_columns(attention_mask, source, 0)
    elif position_ids is None and bool((source < 0).any()):  # packed rows (positions, no mask) keep no mask
        mask = (source >= 0).long()
    positions = None
    if position_ids is not None:
        positions = take_columns(shortened_positions(position_ids, kept, starts, attention_mask), source, 0)
    return ViRRouting(
        input_ids=take_columns(input_ids, source, pad if pad is not None else 0), attention_mask=mask,
        position_ids=positions, labels=take_columns(labels, source, -100) if labels is not None else None,
        image_features=features, compressed=compressed, scores=scores, kept=kept, source=source,
        given_input_ids=input_ids, groups=torch.tensor(groups, dtype=torch.long))


def decide(vir, scores: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """The decisions for ``scores`` grouped by sample (``groups``), over the scope ``vir.scope`` says; none when the
    router is off."""
    if not vir.enabled:
        return torch.zeros_like(scores, dtype=torch.bool)
    if vir.scope == "call":
        groups = [sum(groups)]
    return vir_decisions(scores, groups, vir.relative_threshold, vir.absolute_threshold)


# --------------------------------------------------------------------------------------------- routing a forward

#: What a forward that routed passes on instead of the tiles.
_TILE_INPUTS = ("pixel_values", "image_flags", "num_patches", "tile_grid")


def route_inputs(base, inputs: dict) -> dict:
    """A forward's inputs (by name) after the router, or ``inputs`` unchanged where it does not run: a model without
    an enabled router, no tiles, or visual tokens already given. The prompt, mask, positions and flash-attention
    boundaries are laid out as `ViRRouting` says, the tiles replaced by ``image_features`` and the routing passed on
    as ``vir_routing``. ``base``: the `InternVLXModel`, whose forward calls this once, first."""
    vir = base.config.vir
    forced = inputs.get("vir_compressed")
    if vir is None or not (vir.enabled or forced is not None) or inputs.get("pixel_values") is None \
            or inputs.get("image_features") is not None:
        if forced is not None and vir is None:
            raise ValueError("vir_compressed decides which tiles the router compresses, but this model has no router "
                             "(config.vir is None); add one: internvlx convert SRC DST --add-router.")
        return inputs
    input_ids = inputs.get("input_ids")
    if input_ids is None:
        raise ValueError("This InternVL3.5-Flash model's router (config.vir) shortens the prompt's ids, so it needs "
                         "input_ids with pixel_values, not inputs_embeds; pass the processor's input_ids (or set "
                         "model.config.vir.enabled = False to run every tile at full resolution).")
    cache = inputs.get("cache", inputs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "A forward given pixel_values on a cache that already holds tokens: the router decides each tile against "
            "every tile of its sample, those in the cache included, which a forward cannot revisit. Pass the whole "
            "conversation to generate() with the cache (it routes a new image against the cached ones), or run the "
            "forward from the start without a cache.")
    routing = route_batch(base, input_ids, inputs["pixel_values"], inputs.get("attention_mask"),
                          inputs.get("position_ids"), inputs.get("image_flags"), compressed=forced)
    routed = {**inputs, **{key: None for key in _TILE_INPUTS if key in inputs}, "vir_compressed": None}
    routed.update(input_ids=routing.input_ids, attention_mask=routing.attention_mask,
                  position_ids=routing.position_ids, image_features=routing.image_features, vir_routing=routing)
    varlen = {key: inputs[key] for key in ("cu_seq_lens_q", "cu_seq_lens_k") if inputs.get(key) is not None}
    if varlen:
        routed.update(varlen_kwargs(varlen, routing.kept, routing.source))
    return routed


# ---------------------------------------------------------------------------------------- caches and generation


@dataclass
class ViRCacheRecord:
    """What a cache filled by a routed prompt remembers (``cache.vir_record``): the prompt as given and as routed,
    and every routed tile's score and decision with the tiles per sample, so that a later turn can be checked against
    the prompt it extends and a new image routed against the tiles already in the cache."""

    given_ids: torch.Tensor  # (batch, G)
    routed_ids: torch.Tensor  # (batch, R)
    routed_mask: torch.Tensor  # (batch, R)
    scores: torch.Tensor  # (tiles,)
    compressed: torch.Tensor  # (tiles,)
    groups: list[int]  # tiles per row

    @classmethod
    def of(cls, routing: ViRRouting, routed_mask: torch.Tensor | None = None) -> "ViRCacheRecord":
        mask = routing.attention_mask if routed_mask is None else routed_mask
        if mask is None:
            mask = torch.ones_like(routing.input_ids)
        return cls(routing.given_input_ids, routing.input_ids, mask, routing.scores, routing.compressed,
                   routing.groups.tolist())

    def repeated(self, times: int) -> "ViRCacheRecord":
        """Each row ``times`` times in a row (beam search, ``num_return_sequences``), its tiles with it."""
        if times == 1:
            return self
        blocks = lambda tensor: torch.cat([b for b in tensor.split(self.groups) for _ in range(times)])  # noqa: E731
        return ViRCacheRecord(*(t.repeat_interleave(times, dim=0) for t in (self.given_ids, self.routed_ids,
                                                                           self.routed_mask)),
                              blocks(self.scores), blocks(self.compressed),
                              [g for g in self.groups for _ in range(times)])


RECORD = "vir_record"


def record_routing(cache, record: ViRCacheRecord | None) -> None:
    if cache is not None and record is not None:
        setattr(cache, RECORD, record)


#: The columns the router deleted from the prompt of the `generate` call running (`_prepare_generated_length`):
#: ``max_length`` and ``min_length`` count the prompt as given.
DELETED_COLUMNS: contextvars.ContextVar[int] = contextvars.ContextVar("vir_deleted_columns", default=0)


@dataclass
class GenerationPlan:
    """A `generate` call after the router: the ids, mask and visual tokens transformers generates from, the prompt
    as the caller gave it, and the record the cache keeps afterwards."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_features: torch.Tensor | None
    given_ids: torch.Tensor
    record: ViRCacheRecord


def _no_record_error(route: str) -> ValueError:
    return ValueError(
        f"{route}: the cache holds a prompt with images but no record of how the router shortened it (a cache rebuilt "
        "from its layers, or filled elsewhere, loses it). Pass the cache object the model filled (copy.deepcopy keeps "
        "the record), or generate without a cache (the router then runs on the whole conversation).")


def plan_generation(base, input_ids, cache, kwargs: dict) -> GenerationPlan | None:
    """What `generate` runs on, or None where the router has nothing to do (no enabled router, no tiles, a cache
    whose prompt has no image and no new image). Pops the tiles (and the mask) from ``kwargs`` when it routes.

    - An empty cache (or none): the router on the prompt, as a forward does.
    - A cache the router filled (its `ViRCacheRecord`): the input must start with the prompt the cache holds as
      given; the rest (the answer, the next turn) follows the routed prompt. A new image in the rest is routed with
      the cache's tiles in its quantile (the vision tower on the new tiles only); where that changes a cached tile's
      decision, the conversation is routed from the start when every image's tiles are given (the cache refilled),
      else refused.
    - A cache without a record whose prompt holds images: refused (it cannot be known how it was routed).
    """
    vir = base.config.vir
    if vir is None or not vir.enabled or input_ids is None or kwargs.get("image_features") is not None:
        return None
    past = cache.get_seq_length() if cache is not None and hasattr(cache, "get_seq_length") else 0
    pixel_values = kwargs.get("pixel_values")
    image_id = base.config.image_token_id
    if past == 0:
        if pixel_values is None:
            return None
        return _fresh_plan(base, input_ids, kwargs)
    record = getattr(cache, RECORD, None)
    if record is None:
        cached = input_ids[:, :past]
        if bool((cached == image_id).any()):
            raise _no_record_error("generate() on a cache")
        if pixel_values is None:
            return None
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(cached) if mask is None else mask[:, :past]
        record = ViRCacheRecord(cached, cached, mask, input_ids.new_zeros(0, dtype=torch.float32),
                                input_ids.new_zeros(0, dtype=torch.bool), [0] * input_ids.shape[0])
    given = record.given_ids.to(input_ids.device)
    if input_ids.shape[1] < given.shape[1] or input_ids.shape[0] != given.shape[0] \
            or not torch.equal(input_ids[:, :given.shape[1]], given):
        raise ValueError(
            "generate() on a cache the router filled takes the conversation as generate() returned it (the prompt "
            "as given, the answer, then the next turn); this input does not start with the prompt the cache holds. "
            "Pass that conversation, or generate without the cache.")
    return _continued_plan(base, input_ids, cache, record, kwargs)


def _fresh_plan(base, input_ids, kwargs) -> GenerationPlan:
    mask = kwargs.pop("attention_mask", None)
    routing = route_batch(base, input_ids, kwargs.pop("pixel_values"),
                          torch.ones_like(input_ids) if mask is None else mask,
                          image_flags=kwargs.pop("image_flags", None))
    for key in ("num_patches", "tile_grid"):
        kwargs.pop(key, None)
    return GenerationPlan(routing.input_ids, routing.attention_mask, routing.image_features, input_ids,
                          ViRCacheRecord.of(routing))


def _continued_plan(base, input_ids, cache, record: ViRCacheRecord, kwargs) -> GenerationPlan:
    config = base.config
    n = record.given_ids.shape[1]
    mask = kwargs.pop("attention_mask", None)
    mask = torch.ones_like(input_ids) if mask is None else mask
    new, new_mask = input_ids[:, n:], mask[:, n:]
    routed_ids, routed_mask = record.routed_ids.to(input_ids.device), record.routed_mask.to(mask.device)
    image_mask = new == config.image_token_id
    pixel_values = kwargs.pop("pixel_values", None)
    image_flags = kwargs.pop("image_flags", None)
    for key in ("num_patches", "tile_grid"):
        kwargs.pop(key, None)
    if not bool(image_mask.any()):
        if pixel_values is not None:
            raise ValueError(
                "generate() on a cache the router filled got pixel_values, but the part of the conversation after the "
                "cached prompt has no image: the cache already holds the earlier images' tokens. Drop pixel_values "
                "(or pass them with a new <image> in the new turn).")
        plan_ids = torch.cat([routed_ids, new], dim=-1)
        plan_mask = torch.cat([routed_mask, new_mask], dim=-1)
        updated = ViRCacheRecord(input_ids, plan_ids, plan_mask, record.scores, record.compressed, record.groups)
        return GenerationPlan(plan_ids, plan_mask, None, input_ids, updated)
    per_tile = config.image_seq_length
    new_groups = (image_mask.sum(-1) // per_tile).tolist()
    old_tiles, new_tiles = sum(record.groups), sum(new_groups)
    if pixel_values is None or pixel_values.shape[0] not in (new_tiles, old_tiles + new_tiles) or \
            image_flags is not None:
        given = "no pixel_values" if pixel_values is None else f"{pixel_values.shape[0]} tiles"
        raise ValueError(
            f"generate() on a cache the router filled: the new turn has images of {new_tiles} tiles beside the "
            f"cache's {old_tiles}, and got {given}. Pass the new images' tiles (or every image's, in prompt order), "
            "without image_flags.")
    everything = pixel_values.shape[0] == old_tiles + new_tiles
    new_pixels = pixel_values[old_tiles:] if everything else pixel_values
    try:
        check_image_inputs(config, new_pixels, image_mask, None, None, None)
    except ValueError as error:
        raise ValueError(f"{error} (the images of the turn after the cached prompt)") from None
    base.config.vir.check()
    vit, _, _ = base._vision_output(new_pixels, None, {})
    with torch.no_grad():
        new_scores = base.vir.scores(vit)
    # every row's cached tiles, then its new ones: the scope of its quantile from scratch
    old_rows = record.scores.to(new_scores.device).split(record.groups)
    new_rows = new_scores.split(new_groups)
    combined = torch.cat([piece for old, fresh in zip(old_rows, new_rows) for piece in (old, fresh)])
    decided = decide(config.vir, combined, [o + f for o, f in zip(record.groups, new_groups)])
    pieces = decided.split([g for pair in zip(record.groups, new_groups) for g in pair])
    old_decisions, new_decisions = torch.cat(pieces[0::2]), torch.cat(pieces[1::2])
    if not torch.equal(old_decisions.cpu(), record.compressed.cpu()):
        changed = int((old_decisions.cpu() != record.compressed.cpu()).sum())
        if everything and _emptied(cache):
            return _fresh_plan(base, input_ids, {**kwargs, "pixel_values": pixel_values, "attention_mask": mask})
        raise ValueError(
            f"generate() on a cache the router filled: the new images change the router's decision on {changed} "
            "tile(s) already in the cache (each tile is ranked against every tile of its sample). Pass every image's "
            "tiles of the conversation, in prompt order (the cache is then refilled from the start), or generate "
            "without the cache.")
    features = tile_tokens(vit, new_decisions, base.multi_modal_projector, base.vir.projector)
    kept = shorten_prompt(new, image_mask, new_decisions, per_tile, config.compressed_tokens_per_tile)
    source = routed_columns(kept)
    pad = config.get_text_config().pad_token_id
    # the new part's rows, shortened, padded on their left: in the middle of each row, masked (positions follow the
    # mask in generate())
    plan_ids = torch.cat([routed_ids, take_columns(new, source, pad if pad is not None else 0)], dim=-1)
    plan_mask = torch.cat([routed_mask, take_columns(new_mask, source, 0)], dim=-1)
    scores = torch.cat([piece for old, fresh in zip(old_rows, new_rows) for piece in (old, fresh)])
    compressed = torch.cat([piece for pair in zip(record.compressed.to(decided.device).split(record.groups),
                                                  new_decisions.split(new_groups)) for piece in pair])
    updated = ViRCacheRecord(input_ids, plan_ids, plan_mask, scores, compressed,
                             [o + f for o, f in zip(record.groups, new_groups)])
    return GenerationPlan(plan_ids, plan_mask, features, input_ids, updated)


def _emptied(cache) -> bool:
    """Empties ``cache`` for a generation from the start; False where this cache type cannot be emptied."""
    reset = getattr(cache, "reset", None)
    if reset is None:
        return False
    reset()
    if hasattr(cache, RECORD):
        delattr(cache, RECORD)
    return cache.get_seq_length() == 0


__all__ = ["ViRRouting", "ViRCacheRecord", "route_batch", "route_inputs", "plan_generation"]
