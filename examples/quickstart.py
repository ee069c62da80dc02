"""Quick start: build a tiny InternVL-X model (PVTC projector + LVTC), save it, reload it as remote code, generate.

    python examples/quickstart.py [output_dir]

Runs on CPU in seconds; downloads nothing.
"""

import sys
import tempfile

import torch
from transformers import AutoModel

import internvlx_hf  # noqa: F401  (registers the Auto classes; not needed by the reload below)
from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration

config = InternVLXConfig(
    vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    text_config={"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000},
    image_token_id=999,
    projector_type="pvtc",
    pvtc_num_heads=4,
    lvtc={"expand_layer": 3, "num_lr_projectors": 2},  # 256 tokens per tile below layer 3, 1024 from layer 3
)
torch.manual_seed(0)
model = InternVLXForConditionalGeneration(config).eval()

out_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="internvlx-")
model.save_pretrained(out_dir)  # weights + config.json (auto_map) + the remote-code .py files
reloaded = AutoModel.from_pretrained(out_dir, trust_remote_code=True).eval()

tiles = torch.randn(1, 3, 448, 448)  # one 448px tile (use InternVLXProcessor for real images)
input_ids = torch.tensor([[1, 11, 12] + [config.image_token_id] * config.image_seq_length + [13, 14]])
with torch.no_grad():
    same = torch.equal(model(input_ids=input_ids, pixel_values=tiles).logits,
                       reloaded(input_ids=input_ids, pixel_values=tiles).logits)
generated = reloaded.generate(input_ids=input_ids, pixel_values=tiles, max_new_tokens=8, do_sample=False)
print(f"saved to {out_dir}; reloaded class {type(reloaded).__name__} from {type(reloaded).__module__}")
print(f"tokens per tile: {config.image_seq_length} (LVTC expands to 1024 from layer {config.lvtc['expand_layer']})")
print(f"identical logits after reload: {same}")
print(f"greedy tokens: {generated[0, input_ids.shape[1]:].tolist()}")
