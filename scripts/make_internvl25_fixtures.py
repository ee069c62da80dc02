#!/usr/bin/env python3
"""Build tiny InternVL2.5 / InternVL3 reference checkpoints with OpenGVLab's own code and record their golden runs.

InternVL2.5 and InternVL3 ship in the same remote-code layout as InternVL2 (`InternVLChatModel`, `llm_config` /
`vision_config`); what changes is the LLM (InternLM2.5 = the InternLM2 code, Qwen2.5 = the Qwen2 code), the vision
tower (InternViT-300M-448px-V2_5, InternViT-6B-448px-V2_5) and the chat template (`internvl2_5`). This script builds
one tiny checkpoint per case with the reference classes at a pinned commit of github.com/OpenGVLab/InternVL, runs it
the way the reference `chat()` does, and writes a full fixture folder in the schema of the shared fixtures
(`../shared/fixtures/README.md`: ``reference.safetensors`` / ``reference.json``), then its compact copy into
``tests/fixtures/<name>/`` with the rules of ``scripts/compact_fixtures.py`` (``tests/golden.py``).

Fixtures (the tokenizers are the tiny ones of the InternVL2 fixtures, reused as they are):

* ``internvl2_5_internlm2_5``: InternVL2.5-2B/8B-style: InternLM2.5 LLM (`InternLM2ForCausalLM`, no biases, dynamic
  NTK rope factor 2) + InternViT-300M-448px-V2_5-style vision (LayerNorm, qkv bias, no qk-norm);
* ``internvl3_qwen2_5``: InternVL3-1B/2B/8B/14B-style: Qwen2.5 LLM (`Qwen2ForCausalLM`) + the same vision layout;
* ``internvl2_5_vit6b_qwen2_5``: InternVL2.5-38B/78B-style: InternViT-6B-448px-V2_5-style vision (RMSNorm, qk
  normalisation, no qkv bias) + Qwen2.5.

Every fixture uses the template ``internvl2_5`` with its default system message, ``ps_version`` v2, dynamic tiling
with a thumbnail, float32 weights drawn as the shared fixtures' (see ``init_weights``), eager attention.

Environment (a throw-away venv; the reference code pins transformers 4.37.2 in internvl_chat/pyproject.toml)::

    python3 -m venv /tmp/ivl25-venv
    /tmp/ivl25-venv/bin/pip install torch==2.13.0 transformers==4.37.2 tokenizers==0.15.2 sentencepiece==0.2.0 \
        protobuf numpy==1.26.4 pillow==13.0.0 einops peft==0.10.0 safetensors
    /tmp/ivl25-venv/bin/python scripts/make_internvl25_fixtures.py --reference /path/to/InternVL.git

``--reference`` is a git clone (or bare mirror) of OpenGVLab/InternVL; the script extracts ``internvl_chat/internvl``
at ``--commit`` (default: the pinned one) into a temporary folder. torchvision and timm are not needed: the
reference ``dynamic_preprocess`` is taken from ``dataset.py`` alone (its module imports cv2/decord/torchvision), the
torchvision transform is emulated with PIL exactly as the shared fixtures do, and ``timm.models.layers.DropPath``
(used by InternViT only when drop_path_rate > 0, which these configs never set) is a stub that refuses to be built.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PINNED_COMMIT = "2410d1dbf208f0e799459aff9376e5747dbf41a2"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
QUESTION = "What is unusual about this picture? Answer in one sentence."
MAX_NEW_TOKENS = 8
MIN_MARGIN = 0.02

VIT_300M_V2_5 = {"norm_type": "layer_norm", "qk_normalization": False, "qkv_bias": True}
VIT_6B_V2_5 = {"norm_type": "rms_norm", "qk_normalization": True, "qkv_bias": False}

# What InternVL2.5/3 checkpoints write into a Qwen2.5 llm_config (e.g. InternVL3-1B): a dynamic rope scaling that
# transformers 4.37.2's Qwen2 does not implement (the reference ignores it), and no sliding window.
QWEN2_5_AS_SHIPPED = {"rope_scaling": {"factor": 2.0, "rope_type": "dynamic", "type": "dynamic"},
                      "use_sliding_window": False, "sliding_window": None, "max_window_layers": 70}
# A system message in the top-level config.json: the reference InternVLChatModel uses it instead of the template's
# (`hasattr(config, 'system_message')`), null included.
CONFIG_SYSTEM_MESSAGES = ["You are a tiny test model.", None]
# The rope check of the Qwen2.5 fixture: its LLM alone with max_position_embeddings 128 and 200 random text ids, so
# that a dynamic NTK scaling would act (the reference's does not: see QWEN2_5_AS_SHIPPED).
ROPE_CHECK = {"fixture": "internvl3_qwen2_5", "name": "rope_scaling_check", "max_position_embeddings": 128,
              "length": 200, "seed": 2547}

FIXTURES = {
    "internvl2_5_internlm2_5": {
        "modelled_on": "InternVL2.5-2B / InternVL2.5-8B (InternLM2.5 + InternViT-300M-448px-V2_5)",
        "tokenizer_from": "internvl2_internlm2",
        "llm": {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2", "hidden_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
                "rope_theta": 1000000, "rope_scaling": {"type": "dynamic", "factor": 2.0}, "bias": False,
                "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2,
                "pad_token_id": 2},
        "vision": VIT_300M_V2_5, "image": "image1.jpg", "max_num": 4, "seed": 2500,
    },
    "internvl3_qwen2_5": {
        "modelled_on": "InternVL3-1B/2B/8B/14B (Qwen2.5 + InternViT-300M-448px-V2_5)",
        "tokenizer_from": "internvl2_qwen2",
        "llm": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
                "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                **QWEN2_5_AS_SHIPPED, "bos_token_id": 800, "eos_token_id": 802, "hidden_act": "silu"},
        "vision": VIT_300M_V2_5, "image": "img6.jpg", "max_num": 6, "seed": 3000,
    },
    "internvl2_5_vit6b_qwen2_5": {
        "modelled_on": "InternVL2.5-38B / InternVL2.5-78B (Qwen2.5 + InternViT-6B-448px-V2_5)",
        "tokenizer_from": "internvl2_qwen2",
        "llm": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64,
                "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 176,
                "rope_theta": 1000000.0, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                **QWEN2_5_AS_SHIPPED, "bos_token_id": 800, "eos_token_id": 802, "hidden_act": "silu"},
        "vision": VIT_6B_V2_5, "image": "image2.jpg", "max_num": 4, "seed": 3500,
    },
}
VISION_DIMS = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
               "image_size": 448, "patch_size": 14, "layer_norm_eps": 1e-6, "drop_path_rate": 0.0,
               "hidden_act": "gelu", "initializer_factor": 0.1, "model_type": "intern_vit_6b",
               "architectures": ["InternVisionModel"]}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha256(tensor) -> str:
    return sha256_bytes(tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())


def extract_reference(repo: Path, commit: str, into: Path) -> Path:
    """``internvl_chat/internvl`` of the reference repository at ``commit``; returns the folder to put on sys.path."""
    archive = subprocess.run(["git", "-C", str(repo), "archive", commit, "internvl_chat/internvl"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "internvl_chat"


def stub_drop_path() -> None:
    """InternViT imports timm's DropPath at module level but builds it only for drop_path_rate > 0."""

    class DropPath:  # noqa: D401
        def __init__(self, *args, **kwargs):
            raise RuntimeError("DropPath stub: these fixtures use drop_path_rate 0")

    for name in ("timm", "timm.models", "timm.models.layers"):
        sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["timm.models.layers"].DropPath = DropPath


def load_dynamic_preprocess(reference: Path):
    """``find_closest_aspect_ratio`` and ``dynamic_preprocess`` from the reference dataset.py, nothing else of it."""
    from PIL import Image

    source = (reference / "internvl" / "train" / "dataset.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef)
              and node.name in ("find_closest_aspect_ratio", "dynamic_preprocess")]
    namespace = {"Image": Image}
    exec(compile(ast.Module(body=wanted, type_ignores=[]), "dataset.py", "exec"), namespace)
    return namespace["dynamic_preprocess"]


def preprocess(image_path: Path, max_num: int, dynamic_preprocess):
    """The reference load_image: dynamic_preprocess + T.Resize/ToTensor/Normalize (emulated with PIL, float32)."""
    import numpy as np
    import torch
    from PIL import Image

    image = Image.open(image_path).convert("RGB")
    calls = []
    original_resize, original_crop = Image.Image.resize, Image.Image.crop

    def resize(self, size, *args, **kwargs):
        calls.append(("resize", tuple(size)))
        return original_resize(self, size, *args, **kwargs)

    Image.Image.resize = resize
    try:
        tiles = dynamic_preprocess(image, image_size=448, use_thumbnail=True, max_num=max_num)
    finally:
        Image.Image.resize = original_resize
    assert original_crop is Image.Image.crop
    resized = calls[0][1]
    cols, rows = resized[0] // 448, resized[1] // 448
    u8 = torch.stack([torch.from_numpy(np.asarray(t.resize((448, 448), Image.BICUBIC), dtype=np.uint8).copy())
                      .permute(2, 0, 1) for t in tiles])
    mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
    pixel_values = ((u8.to(torch.float32) / 255) - mean) / std
    grid = {"cols": cols, "rows": rows, "grid_tiles": cols * rows, "thumbnail": len(tiles) > cols * rows,
            "num_tiles": len(tiles), "resized_wh": list(resized)}
    return u8, pixel_values, grid


def init_weights(model, seed: int) -> None:
    """The shared fixtures' scheme: matrices N(0, 1/fan_in); token embeddings and ViT class/position embeddings
    N(0, 1); biases N(0, 0.1^2); norm weights and layer scales 1 + N(0, 0.1^2); one generator, named_parameters
    order."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if param.dim() == 1:
                param.copy_(noise * 0.1 if name.endswith("bias") else 1 + noise * 0.1)
            elif "embedding" in name and "patch_embedding" not in name or "tok_embeddings" in name \
                    or "embed_tokens" in name:
                param.copy_(noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


def build_config(spec: dict, vocab_size: int):
    from internvl.model.internvl_chat import InternVLChatConfig

    llm = {**spec["llm"], "vocab_size": vocab_size, "tie_word_embeddings": False}
    vision = {**VISION_DIMS, **spec["vision"], "use_flash_attn": False}
    config = InternVLChatConfig(vision_config=vision, llm_config=llm, select_layer=-1, force_image_size=448,
                                downsample_ratio=0.5, template="internvl2_5", dynamic_image_size=True,
                                use_thumbnail=True, ps_version="v2", min_dynamic_patch=1, max_dynamic_patch=12)
    config.architectures = ["InternVLChatModel"]
    config.auto_map = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                       "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                       "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}
    config.torch_dtype = "float32"
    return config


def load_tokenizer(folder: Path, architecture: str):
    """As the reference runs load them: InternLM2Tokenizer (slow, sentencepiece) for InternLM2, AutoTokenizer for
    Qwen2 (the InternVL2 qwen2 fixture's Qwen2TokenizerFast)."""
    from transformers import AutoTokenizer

    if architecture == "InternLM2ForCausalLM":
        from internvl.model.internlm2.tokenization_internlm2 import InternLM2Tokenizer

        return InternLM2Tokenizer.from_pretrained(str(folder))
    return AutoTokenizer.from_pretrained(str(folder))


def build_prompt(model, tokenizer, num_patches: int):
    from internvl.conversation import get_conv_template

    template = get_conv_template(model.template)
    template.system_message = model.system_message
    question = "<image>\n" + QUESTION
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    with_tag = template.get_prompt()
    prompt = with_tag.replace("<image>", "<img>" + "<IMG_CONTEXT>" * model.num_image_token * num_patches + "</img>", 1)
    return template, question, with_tag, prompt


# Conversations rendered with the reference template (conversation.py) besides chat()'s: (system message or None for
# the template default, [(role index, text or None)]); None as the last text is the generation prompt.
TEMPLATE_CASES = [
    ("You are a helpful assistant.", [(0, "Hi"), (1, "Hello! How can I help?"), (0, "<image>\nDescribe it."),
                                      (1, None)]),
    ("", [(0, "Hi"), (1, None)]),
    (None, [(0, "First question"), (1, "First answer"), (0, "Second question"), (1, "Second answer")]),
]


def template_cases(model, tokenizer) -> list[dict]:
    from internvl.conversation import get_conv_template

    cases = []
    for system, turns in TEMPLATE_CASES:
        template = get_conv_template(model.template)
        template.system_message = model.system_message if system is None else system
        for role, text in turns:
            template.append_message(template.roles[role], text)
        prompt = template.get_prompt()
        cases.append({"system_message": system, "turns": [[["user", "assistant"][r], t] for r, t in turns],
                      "prompt": prompt, "input_ids": tokenizer(prompt).input_ids})
    return cases


def config_system_message_cases(config, tokenizer, num_patches: int) -> list[dict]:
    """chat()'s prompt when config.json carries `system_message` (the reference reads it before the template's)."""
    from internvl.model.internvl_chat import InternVLChatModel

    cases = []
    for system in CONFIG_SYSTEM_MESSAGES:
        variant = copy.deepcopy(config)
        variant.system_message = system
        model = InternVLChatModel(variant, use_flash_attn=False)
        _, _, with_tag, prompt = build_prompt(model, tokenizer, num_patches)
        cases.append({"config_system_message": system, "prompt_with_image_tag": with_tag,
                      "input_ids": tokenizer(prompt).input_ids})
    return cases


def rope_check(model, folder: Path) -> dict:
    """The LLM alone with a short max_position_embeddings (ROPE_CHECK): forward logits and 8 cached greedy steps."""
    import torch
    from safetensors.torch import save_file

    llm_config = copy.deepcopy(model.language_model.config)
    llm_config.max_position_embeddings = ROPE_CHECK["max_position_embeddings"]
    llm = type(model.language_model)(llm_config).eval()
    llm.load_state_dict(model.language_model.state_dict())
    vocab = llm_config.vocab_size
    generator = torch.Generator().manual_seed(ROPE_CHECK["seed"])
    input_ids = torch.randint(3, vocab - 20, (1, ROPE_CHECK["length"]), generator=generator)
    mask = torch.ones_like(input_ids)
    with torch.no_grad():
        logits = llm(input_ids=input_ids, attention_mask=mask).logits
        out = llm.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                           eos_token_id=-1, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, 1)[0]
    info = {"what": "language_model alone (reference Qwen2ForCausalLM, transformers 4.37.2) with llm_config."
                    f"max_position_embeddings overridden to {ROPE_CHECK['max_position_embeddings']} (rope_scaling "
                    f"{llm_config.rope_scaling} unchanged), fed {ROPE_CHECK['length']} random ids "
                    f"(torch.randint(3, vocab - 20, seed {ROPE_CHECK['seed']}))",
            "rotary_class": type(llm.model.layers[0].self_attn.rotary_emb).__name__,
            "greedy": out.sequences[0, input_ids.shape[1]:].tolist(), "min_margin": min(margins(scores))}
    save_file({"input_ids": input_ids, "attention_mask": mask, "logits": logits.float().contiguous(),
               "generated_ids": out.sequences[:, input_ids.shape[1]:].contiguous(),
               "generation_scores": scores.float().contiguous()},
              str(folder / f"{ROPE_CHECK['name']}.safetensors"), metadata={"info": json.dumps(info)})
    return info


def run_model(model, tokenizer, pixel_values, input_ids, eos_id):
    import torch

    image_flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
    model.img_context_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                       image_flags=image_flags).logits
        out = model.generate(pixel_values=pixel_values, input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=eos_id,
                             output_scores=True, return_dict_in_generate=True)
    scores = torch.stack(out.scores, 1)[0]
    return logits, out.sequences, scores


def margins(scores) -> list[float]:
    top = scores.topk(2, dim=-1).values
    return (top[:, 0] - top[:, 1]).tolist()


def make_fixture(name: str, spec: dict, src_fixtures: Path, images: Path, full_out: Path, dynamic_preprocess,
                 reference_commit: str, environment: dict) -> None:
    import torch
    from internvl.model.internvl_chat import InternVLChatModel
    from safetensors.torch import save_file

    folder = full_out / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tokenizer_src = src_fixtures / spec["tokenizer_from"]
    copied = [f for f in TOKENIZER_FILES if (tokenizer_src / f).is_file()]
    for file in copied:
        shutil.copyfile(tokenizer_src / file, folder / file)
    architecture = spec["llm"]["architectures"][0]
    tokenizer = load_tokenizer(folder, architecture)
    config = build_config(spec, len(tokenizer))

    u8, pixel_values, grid = preprocess(images / spec["image"], spec["max_num"], dynamic_preprocess)
    torch.manual_seed(0)
    model = InternVLChatModel(copy.deepcopy(config), use_flash_attn=False).eval()
    template, question, with_tag, prompt = build_prompt(model, tokenizer, pixel_values.shape[0])
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos_id = tokenizer.convert_tokens_to_ids(template.sep.strip())

    attempts = []
    for attempt in range(20):
        seed = spec["seed"] + 1000 * attempt
        init_weights(model, seed)
        logits, sequences, scores = run_model(model, tokenizer, pixel_values, input_ids, eos_id)
        generated = sequences[0, -scores.shape[0]:]
        step_margins = margins(scores)
        attempts.append({"seed": seed, "generated": int(scores.shape[0]), "min_margin": min(step_margins)})
        if scores.shape[0] == MAX_NEW_TOKENS and eos_id not in generated.tolist() and min(step_margins) >= MIN_MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no seed gave {MAX_NEW_TOKENS} non-eos tokens with margins >= {MIN_MARGIN}")

    # chat() as users call it: the prompt ids it sends and its answer
    seen = {}
    original_generate = model.generate

    def recording_generate(**kwargs):
        seen.update(kwargs)
        return original_generate(**kwargs)

    model.generate = recording_generate
    response = model.chat(tokenizer, pixel_values, QUESTION, dict(max_new_tokens=MAX_NEW_TOKENS, do_sample=False))
    del model.generate
    with torch.no_grad():
        tile0 = model.vision_model(pixel_values=pixel_values[:1]).last_hidden_state
        vit_embeds = model.extract_feature(pixel_values)
        tile0_in_batch = model.vision_model(pixel_values=pixel_values).last_hidden_state[:1]

    model.save_pretrained(str(folder), safe_serialization=True)
    reloaded = InternVLChatModel.from_pretrained(str(folder), use_flash_attn=False, output_loading_info=True)
    reloaded, loading_info = reloaded
    reloaded.eval()
    reload_logits, reload_sequences, _ = run_model(reloaded, tokenizer, pixel_values, input_ids, eos_id)
    tokenizer_again = load_tokenizer(folder, architecture)

    generated = sequences[0, -MAX_NEW_TOKENS:]
    tensors = {"pixel_values_u8": u8, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
               "image_flags": torch.ones(u8.shape[0], dtype=torch.int64), "logits": logits.float(),
               "generated_ids": generated[None].clone(), "generation_scores": scores.float(),
               "vision_last_hidden_state_tile0": tile0, "vit_embeds": vit_embeds}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "reference.safetensors"))

    image_token_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    ids = input_ids[0].tolist()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    compact_tokens, run = [], 0
    for token in tokens + [None]:
        if token == "<IMG_CONTEXT>":
            run += 1
            continue
        if run:
            compact_tokens.append(f"<IMG_CONTEXT>x{run}")
            run = 0
        if token is not None:
            compact_tokens.append(token)
    vision = config.vision_config
    llm = config.llm_config
    image_bytes = (images / spec["image"]).read_bytes()
    from PIL import Image

    meta = {
        "schema": "as ../shared/fixtures/README.md (reference.safetensors / reference.json of every model fixture)",
        "reference_project": "OpenGVLab/InternVL",
        "reference_commit": reference_commit,
        "reference_code": ["internvl_chat/internvl/model/internvl_chat/modeling_internvl_chat.py::"
                           "InternVLChatModel.chat/generate/forward",
                           "internvl_chat/internvl/train/dataset.py::dynamic_preprocess",
                           "internvl_chat/internvl/conversation.py::get_conv_template"],
        "modelled_on": spec["modelled_on"],
        "checkpoint": {"dir": ".", "files": sorted(p.name for p in folder.iterdir()) + ["reference.json"],
                       "num_parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32",
                       "tokenizer_files_from": f"{spec['tokenizer_from']} fixture: {copied}"},
        "llm_architecture": architecture,
        "vision": {"hidden": vision.hidden_size, "layers": vision.num_hidden_layers,
                   "heads": vision.num_attention_heads, "intermediate": vision.intermediate_size,
                   "norm_type": vision.norm_type, "qk_normalization": vision.qk_normalization,
                   "qkv_bias": vision.qkv_bias, "layer_norm_eps": vision.layer_norm_eps},
        "text": {key: getattr(llm, key, None) for key in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                           "num_key_value_heads", "intermediate_size", "rope_theta",
                                                           "rope_scaling", "max_position_embeddings", "rms_norm_eps",
                                                           "bias", "use_sliding_window", "sliding_window")},
        "vocab_size": len(tokenizer),
        "tokenizer": {"class_": type(tokenizer).__module__ + "." + type(tokenizer).__name__},
        "special_token_ids": {t: tokenizer.convert_tokens_to_ids(t)
                              for t in ("<img>", "</img>", "<IMG_CONTEXT>", "<|im_start|>", "<|im_end|>")},
        "bos_token_id": tokenizer.bos_token_id,
        "adds_bos": ids[0] == tokenizer.bos_token_id,
        "image": {"file": f"../images/{spec['image']}", "size_wh": list(Image.open(images / spec["image"]).size),
                  "sha256": sha256_bytes(image_bytes)},
        "preprocess": {"function": "OpenGVLab/InternVL internvl_chat/internvl/train/dataset.py::dynamic_preprocess "
                                   "(ratio matching)",
                       "min_num": 1, "max_num": spec["max_num"], "image_size": 448, "use_thumbnail": True,
                       "tile_grid": grid, "num_patches": int(u8.shape[0]),
                       "transform": "per tile: PIL resize((448,448), BICUBIC), uint8 -> float32 /255, (x - mean) / "
                                    "std in float32 (emulates torchvision T.Resize/ToTensor/Normalize)",
                       "mean": list(MEAN), "std": list(STD), "pixel_values_sha256": tensor_sha256(pixel_values),
                       "tiles_u8_sha256": tensor_sha256(u8)},
        "template": model.template,
        "system_message": model.system_message,
        "template_sep": template.sep,
        "question": QUESTION,
        "question_as_sent": question,
        "prompt_with_image_tag": with_tag,
        "prompt": prompt,
        "num_image_token": model.num_image_token,
        "num_image_context_tokens": ids.count(image_token_id),
        "img_context_token_id": image_token_id,
        "input_len": len(ids),
        "prompt_tokens_compact": compact_tokens,
        "template_cases": template_cases(model, tokenizer),
        "config_system_message_cases": config_system_message_cases(config, tokenizer, int(u8.shape[0])),
        "generation": {
            "called_as": "model.generate(pixel_values=..., input_ids=..., attention_mask=..., max_new_tokens=8, "
                         "do_sample=False, eos_token_id=<template sep>, output_scores=True, "
                         "return_dict_in_generate=True) (what chat() calls); chat(tokenizer, pixel_values, question, "
                         "dict(max_new_tokens=8, do_sample=False)) for the answer",
            "eos_token_id": eos_id, "eos_token": template.sep.strip(),
            "generated_ids": generated.tolist(),
            "generated_tokens": tokenizer.convert_ids_to_tokens(generated.tolist()),
            "generate_raw_output": sequences[0].tolist(),
            "chat_response": response,
            "greedy_margins_top1_minus_top2": margins(scores),
            "seed_attempts": attempts,
        },
        "checks": {
            "first_generated_token_equals_argmax_of_forward_last_logits":
                int(logits[0, -1].argmax()) == int(generated[0]),
            "generate_prefill_scores_vs_forward_last_logits_max_abs_diff":
                float((scores[0] - logits[0, -1]).abs().max()),
            "vision_tile0_alone_vs_in_batch_max_abs_diff": float((tile0_in_batch - tile0).abs().max()),
            "prompt_rebuilt_from_template_equals_chat_input_ids": seen["input_ids"][0].tolist() == ids,
            "chat_eos_token_id": seen.get("eos_token_id"),
            "second_tokenizer_load_equal_ids": tokenizer_again(prompt).input_ids == ids,
            "reload": {"logits_bitwise_equal": bool(torch.equal(reload_logits, logits)),
                       "logits_max_abs_diff": float((reload_logits - logits).abs().max()),
                       "attention_classes": sorted({type(m).__name__ for m in reloaded.modules()
                                                    if type(m).__name__.endswith("Attention")}),
                       "generated_ids_equal": reload_sequences.tolist() == sequences.tolist(),
                       "loading_info": {k: list(v) for k, v in loading_info.items()}},
        },
        "weights_init": {"seed": attempts[-1]["seed"], "scheme": init_weights.__doc__.split("\n\n")[0]},
        "attention_implementation": sorted({type(m).__name__ for m in model.modules()
                                            if type(m).__name__.endswith("Attention")}),
        "logits_stats": {"mean": float(logits.mean()), "std": float(logits.std()), "min": float(logits.min()),
                         "max": float(logits.max())},
        "environment": environment,
    }
    if name == ROPE_CHECK["fixture"]:
        meta[ROPE_CHECK["name"]] = rope_check(model, folder)
    checks = meta["checks"]
    problems = [key for key in ("first_generated_token_equals_argmax_of_forward_last_logits",
                                "prompt_rebuilt_from_template_equals_chat_input_ids", "second_tokenizer_load_equal_ids")
                if not checks[key]]
    # A reload may differ in the last bits (weights and buffers were checked equal: the same kernels on tensors
    # allocated differently); 1e-5 is far below what the parity tests compare at.
    if checks["reload"]["logits_max_abs_diff"] > 1e-5 or not checks["reload"]["generated_ids_equal"]:
        problems.append(f"reload {checks['reload']} {sequences.tolist()} {reload_sequences.tolist()}")
    if any(checks["reload"]["loading_info"].values()):
        problems.append(f"loading_info {checks['reload']['loading_info']}")
    if response != tokenizer.decode(generated, skip_special_tokens=True).strip():
        problems.append("chat response")
    if problems:
        raise SystemExit(f"{name}: checks failed: {problems}")
    (folder / "reference.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{name}: {meta['checkpoint']['num_parameters']:,} params, {len(ids)} prompt tokens, "
          f"{u8.shape[0]} tiles, greedy {generated.tolist()}, min margin {min(margins(scores)):.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="git clone or mirror of OpenGVLab/InternVL")
    parser.add_argument("--commit", default=PINNED_COMMIT)
    parser.add_argument("--fixtures", type=Path, default=ROOT / "tests" / "fixtures",
                        help="where the InternVL2 fixtures' tokenizers and the images are read "
                             "(default tests/fixtures)")
    parser.add_argument("--full-out", type=Path, default=None,
                        help="keep the full fixture folders here (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures", help="compact copies go here")
    parser.add_argument("--only", nargs="*", default=list(FIXTURES), choices=list(FIXTURES))
    args = parser.parse_args(argv)

    import numpy
    import PIL
    import sentencepiece
    import tokenizers
    import torch
    import transformers

    if transformers.__version__ != "4.37.2":
        sys.exit(f"run this with transformers 4.37.2 (the reference code's pin), not {transformers.__version__}")
    torch.set_num_threads(1)
    environment = {"python": sys.version.split()[0], "torch": torch.__version__,
                   "transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
                   "sentencepiece": sentencepiece.__version__, "pillow": PIL.__version__, "numpy": numpy.__version__,
                   "torch_num_threads": 1, "stubbed": ["timm.models.layers.DropPath (never built)"]}
    with tempfile.TemporaryDirectory(prefix="internvl25-") as tmp:
        reference = extract_reference(args.reference.resolve(), args.commit, Path(tmp))
        sys.path.insert(0, str(reference))
        stub_drop_path()
        dynamic_preprocess = load_dynamic_preprocess(reference)
        full_out = (args.full_out or Path(tmp) / "full").resolve()
        (full_out / "images").mkdir(parents=True, exist_ok=True)
        for image in sorted((args.fixtures / "images").iterdir()):
            shutil.copyfile(image, full_out / "images" / image.name)
        for name in args.only:
            make_fixture(name, FIXTURES[name], args.fixtures, full_out / "images", full_out, dynamic_preprocess,
                         args.commit, environment)
        sys.path.insert(0, str(ROOT / "scripts"))
        import compact_fixtures

        for name in args.only:
            target = args.out / name
            if target.exists():
                shutil.rmtree(target)
            rope = ROPE_CHECK["name"] if name == ROPE_CHECK["fixture"] else None
            compact_fixtures._compact_model_fixture(name, full_out / name, target, rope)
            size = sum(p.stat().st_size for p in target.iterdir())
            print(f"{target}: {size / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
