"""Synthetic OpenGVLab-layout checkpoints (random weights, real key names) for tests and benchmarks.

`make_synthetic_internvl2` writes what `InternVLChatModel.save_pretrained` writes for an InternVL2 model:
config.json with llm_config/vision_config, ``vision_model.*`` / ``mlp1.*`` / ``language_model.*`` tensors split
into safetensors shards with an index, and the tokenizer files copied from an existing checkpoint. Shapes follow
the given sizes, so a wide, shallow model gives a multi-gigabyte checkpoint in seconds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .source import TOKENIZER_FILES


def synthetic_tensor_shapes(vit_hidden: int, vit_layers: int, vit_intermediate: int, llm_hidden: int,
                            llm_layers: int, heads: int, kv_heads: int, llm_intermediate: int, vocab_size: int,
                            llm: str = "internlm2", image_size: int = 448, patch_size: int = 14,
                            vit_6b: bool = False, lm_head: bool = True):
    """Ordered ``{key: shape}`` of an InternVL2 checkpoint (InternViT + mlp1 + InternLM2, Qwen2 or Llama).

    ``vit_6b`` gives the InternViT-6B layout (RMSNorm without biases, q/k norms, no qkv bias) instead of the
    InternViT-300M one; ``lm_head=False`` leaves out the LM head (checkpoints with tied embeddings).
    """
    grid = image_size // patch_size
    shapes: dict[str, tuple[int, ...]] = {
        "vision_model.embeddings.class_embedding": (1, 1, vit_hidden),
        "vision_model.embeddings.patch_embedding.weight": (vit_hidden, 3, patch_size, patch_size),
        "vision_model.embeddings.patch_embedding.bias": (vit_hidden,),
        "vision_model.embeddings.position_embedding": (1, grid * grid + 1, vit_hidden),
    }
    for i in range(vit_layers):
        p = f"vision_model.encoder.layers.{i}."
        shapes.update({
            p + "attn.qkv.weight": (3 * vit_hidden, vit_hidden),
            p + "attn.proj.weight": (vit_hidden, vit_hidden), p + "attn.proj.bias": (vit_hidden,),
            p + "ls1": (vit_hidden,), p + "ls2": (vit_hidden,),
            p + "mlp.fc1.weight": (vit_intermediate, vit_hidden), p + "mlp.fc1.bias": (vit_intermediate,),
            p + "mlp.fc2.weight": (vit_hidden, vit_intermediate), p + "mlp.fc2.bias": (vit_hidden,),
            p + "norm1.weight": (vit_hidden,), p + "norm2.weight": (vit_hidden,),
        })
        if vit_6b:
            shapes.update({p + "attn.q_norm.weight": (vit_hidden,), p + "attn.k_norm.weight": (vit_hidden,)})
        else:
            shapes.update({p + "attn.qkv.bias": (3 * vit_hidden,), p + "norm1.bias": (vit_hidden,),
                           p + "norm2.bias": (vit_hidden,)})
    shapes.update({
        "mlp1.0.weight": (4 * vit_hidden,), "mlp1.0.bias": (4 * vit_hidden,),
        "mlp1.1.weight": (llm_hidden, 4 * vit_hidden), "mlp1.1.bias": (llm_hidden,),
        "mlp1.3.weight": (llm_hidden, llm_hidden), "mlp1.3.bias": (llm_hidden,),
    })
    head_dim = llm_hidden // heads
    if llm == "internlm2":
        shapes["language_model.model.tok_embeddings.weight"] = (vocab_size, llm_hidden)
        for i in range(llm_layers):
            p = f"language_model.model.layers.{i}."
            shapes.update({
                p + "attention.wqkv.weight": ((heads + 2 * kv_heads) * head_dim, llm_hidden),
                p + "attention.wo.weight": (llm_hidden, heads * head_dim),
                p + "feed_forward.w1.weight": (llm_intermediate, llm_hidden),
                p + "feed_forward.w3.weight": (llm_intermediate, llm_hidden),
                p + "feed_forward.w2.weight": (llm_hidden, llm_intermediate),
                p + "attention_norm.weight": (llm_hidden,), p + "ffn_norm.weight": (llm_hidden,),
            })
        shapes["language_model.model.norm.weight"] = (llm_hidden,)
        if lm_head:
            shapes["language_model.output.weight"] = (vocab_size, llm_hidden)
    elif llm in ("qwen2", "llama"):  # the same layout; Qwen2 has q/k/v biases
        shapes["language_model.model.embed_tokens.weight"] = (vocab_size, llm_hidden)
        for i in range(llm_layers):
            p = f"language_model.model.layers.{i}."
            q, kv = heads * head_dim, kv_heads * head_dim
            for name, rows in (("q", q), ("k", kv), ("v", kv)):
                shapes[p + f"self_attn.{name}_proj.weight"] = (rows, llm_hidden)
                if llm == "qwen2":
                    shapes[p + f"self_attn.{name}_proj.bias"] = (rows,)
            shapes.update({
                p + "self_attn.o_proj.weight": (llm_hidden, q),
                p + "mlp.gate_proj.weight": (llm_intermediate, llm_hidden),
                p + "mlp.up_proj.weight": (llm_intermediate, llm_hidden),
                p + "mlp.down_proj.weight": (llm_hidden, llm_intermediate),
                p + "input_layernorm.weight": (llm_hidden,), p + "post_attention_layernorm.weight": (llm_hidden,),
            })
        shapes["language_model.model.norm.weight"] = (llm_hidden,)
        if lm_head:
            shapes["language_model.lm_head.weight"] = (vocab_size, llm_hidden)
    else:
        raise ValueError(f"llm must be 'internlm2', 'qwen2' or 'llama', got {llm!r}")
    return shapes


def make_synthetic_internvl2(
    directory: str | Path,
    tokenizer_from: str | Path,
    *,
    vit_hidden: int = 64,
    vit_layers: int = 2,
    vit_heads: int = 4,
    vit_intermediate: int = 128,
    llm: str = "internlm2",
    llm_hidden: int = 64,
    llm_layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    llm_intermediate: int = 176,
    vocab_size: int | None = None,
    num_shards: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    vit_6b: bool = False,
    tie_word_embeddings: bool = False,
    lm_head: bool = True,
) -> Path:
    """Write a synthetic InternVL2 checkpoint into ``directory`` (created) and return it.

    ``tokenizer_from`` is a checkpoint folder whose tokenizer files (and template) are copied; its template must
    suit ``llm`` (internlm2-chat for InternLM2, Hermes-2 for Qwen2 and Llama). ``vocab_size`` defaults to the
    tokenizer's.
    ``extra_tensors`` are added to the last shard (e.g. to test unknown or dropped keys). ``vit_6b`` switches to
    the InternViT-6B layout (RMSNorm, qk normalisation, no qkv bias); ``tie_word_embeddings`` sets the LLM's flag
    and ``lm_head`` whether an LM head tensor is written anyway.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_from = Path(tokenizer_from)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copyfile(tokenizer_from / name, directory / name)
    with open(tokenizer_from / "config.json", encoding="utf-8") as handle:
        template_config = json.load(handle)
    if vocab_size is None:
        vocab_size = template_config["llm_config"]["vocab_size"]

    shapes = synthetic_tensor_shapes(vit_hidden, vit_layers, vit_intermediate, llm_hidden, llm_layers, heads,
                                     kv_heads, llm_intermediate, vocab_size, llm=llm, vit_6b=vit_6b,
                                     lm_head=lm_head)
    _write_shards(directory, shapes, num_shards, dtype, seed, extra_tensors or {})

    llm_arch = {"internlm2": "InternLM2ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[llm]
    llm_config = {
        "architectures": [llm_arch], "model_type": llm, "hidden_size": llm_hidden, "num_hidden_layers": llm_layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "intermediate_size": llm_intermediate,
        "vocab_size": vocab_size, "max_position_embeddings": 32768, "rope_theta": 1000000, "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "rms_norm_eps": 1e-5, "torch_dtype": str(dtype).replace("torch.", ""),
    }
    if llm == "internlm2":
        llm_config.update({"bias": False, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    elif llm == "qwen2":
        llm_config.update({"use_sliding_window": False, "sliding_window": 32768, "max_window_layers": llm_layers})
    config = {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": 448, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "ps_version": "v2", "select_layer": -1, "template": template_config["template"], "use_thumbnail": True,
        "use_backbone_lora": 0, "use_llm_lora": 0, "llm_config": llm_config,
        "vision_config": {
            "architectures": ["InternVisionModel"], "model_type": "intern_vit_6b", "hidden_size": vit_hidden,
            "num_hidden_layers": vit_layers, "num_attention_heads": vit_heads, "intermediate_size": vit_intermediate,
            "image_size": 448, "patch_size": 14, "qkv_bias": not vit_6b, "qk_normalization": vit_6b,
            "norm_type": "rms_norm" if vit_6b else "layer_norm", "layer_norm_eps": 1e-6, "hidden_act": "gelu",
            "initializer_factor": 0.1 if vit_6b else 1.0,
        },
    }
    with open(directory / "config.json", "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return directory


def _write_shards(directory: Path, shapes: dict[str, tuple[int, ...]], num_shards: int, dtype: torch.dtype,
                  seed: int, extra: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = {key: torch.Size(shape).numel() * itemsize for key, shape in shapes.items()}
    budget = sum(sizes.values()) / num_shards
    groups: list[list[str]] = [[]]
    filled = 0.0
    for key in shapes:  # greedy contiguous split into at most num_shards shards of about equal bytes
        if groups[-1] and filled + sizes[key] / 2 > budget * len(groups) and len(groups) < num_shards:
            groups.append([])
        groups[-1].append(key)
        filled += sizes[key]
    names = ["model.safetensors"] if len(groups) == 1 else [
        f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for index, (name, keys) in enumerate(zip(names, groups)):
        tensors = {}
        for key in keys:
            tensor = torch.empty(shapes[key], dtype=torch.float32)
            fan_in = shapes[key][-1] if len(shapes[key]) > 1 else 1
            tensor.normal_(0.0, 1.0 / fan_in**0.5, generator=generator)
            if len(shapes[key]) == 1 and ("norm" in key or key.endswith(("ls1", "ls2"))):
                tensor.add_(1.0)
            tensors[key] = tensor.to(dtype)
            del tensor
        if index == len(groups) - 1:
            tensors.update(extra)
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in tensors})
        del tensors
    if len(names) > 1:
        total = sum(sizes.values())
        with open(directory / "model.safetensors.index.json", "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)
