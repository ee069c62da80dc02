"""The checkpoints the LVTC-on-vLLM benchmarks compare (`bench_vllm_lvtc_savings.py savings`,
`bench_vllm_lvtc_conversation.py`): LVTC, plain-1024 and plain-256 from the same weights, at two LLM widths. Shared by
both, so neither imports the other's script; imports only the package and torch.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXImageProcessor, InternVLXProcessor
from internvlx_hf.demo.packaged import DEMO_MODEL_DIR

MID_TEXT = dict(model_type="qwen2", hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=812, max_position_embeddings=16384, rms_norm_eps=1e-6,
                pad_token_id=800, eos_token_id=802, tie_word_embeddings=False)
#: `savings --size`: the LLM's width, "mid" (512) or "wide" (768, 12 heads of 64, 2.2x the FLOPs per token). The work
#: LVTC does not change (the image's processing and ViT, the decode steps) weighs less the wider the LLM. The ViT's
#: share of plain-1024's one-tile prefill FLOPs (`vit_flops_share` in the runs): mid 14.4%, wide 7.7%; InternViT-300M's
#: (counted as 2 x parameters x 1025 tokens + attention) is about 15% before InternVL2-2B's InternLM2-1.8B, 8% before
#: InternVL2-4B's Phi-3-mini and 4% before InternVL2-8B's InternLM2-7B.
SIZES = {"mid": MID_TEXT,
         "wide": dict(MID_TEXT, hidden_size=768, intermediate_size=2112, num_attention_heads=12)}
SAVINGS_VISION = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                      image_size=448, patch_size=14)
SAVINGS_EXPAND = 6  # k = 3/4 of the depth, as bench_models.py's LVTC


def savings_checkpoints(root: Path, text: dict) -> dict[str, Path]:
    """LVTC, plain-1024 and plain-256 checkpoints sharing every weight (ViT, LLM, LM head; plain-1024's projector is
    LVTC's HR projector, plain-256's its LR projector), with the demo model's tokenizer and 448px tiles."""
    common = dict(text_config=dict(text), vision_config=dict(SAVINGS_VISION), image_token_id=805,
                  image_start_token_id=803, image_end_token_id=804, template="Hermes-2")
    configs = {
        "lvtc": InternVLXConfig(**common, lvtc=dict(expand_layer=SAVINGS_EXPAND)),
        "plain-1024": InternVLXConfig(**common, downsample_ratio=1.0),
        "plain-256": InternVLXConfig(**common),
    }
    torch.manual_seed(0)
    lvtc = InternVLXForConditionalGeneration(configs["lvtc"]).eval()
    with torch.no_grad():  # larger weights than the default init, so that images and text move the logits visibly
        for name, param in lvtc.named_parameters():
            if param.dim() >= 2 and "embeddings" not in name:
                param.normal_(0.0, 0.04)
    base = InternVLXProcessor.from_pretrained(DEMO_MODEL_DIR)
    folders = {}
    for name, config in configs.items():
        if name == "lvtc":
            model = lvtc
        else:
            model = InternVLXForConditionalGeneration(config).eval()
            model.model.vision_tower.load_state_dict(lvtc.model.vision_tower.state_dict())
            model.model.language_model.load_state_dict(lvtc.model.language_model.state_dict())
            model.lm_head.load_state_dict(lvtc.lm_head.state_dict())
            source = lvtc.model.lvtc_hr_projector if name == "plain-1024" else lvtc.model.multi_modal_projector
            model.model.multi_modal_projector.load_state_dict(source.state_dict())
        model.generation_config.eos_token_id = 802
        folders[name] = root / name
        model.save_pretrained(folders[name])
        processor = InternVLXProcessor(image_processor=InternVLXImageProcessor(image_size=448, max_tiles=6),
                                       tokenizer=base.tokenizer, chat_template=base.chat_template,
                                       image_seq_length=config.image_seq_length)
        processor.save_pretrained(folders[name])
        for file in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
            shutil.copyfile(DEMO_MODEL_DIR / file, folders[name] / file)
    return folders
