"""Quick start: build a tiny InternVL-X model (PVTC projector + LVTC), save it, reload it as remote code, generate.

    python examples/quickstart.py [output_dir]

The reload runs in a fresh Python process in which `internvlx_hf` cannot be imported, so the model comes from the
code files saved next to the weights (`trust_remote_code=True`), as on a machine without this package. Runs on CPU
in seconds; downloads nothing. Without `output_dir` the model goes to a temporary folder that is removed at the end;
with it, the folder is kept.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch

from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration

# The reload: a new interpreter that refuses to import internvlx_hf, so only the saved remote code can serve it.
RELOAD = r"""
import importlib.abc, json, sys
class HidePackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "internvlx_hf":
            raise ModuleNotFoundError(f"No module named {name!r} (hidden: the reload must use the remote code)")
sys.meta_path.insert(0, HidePackage())
import torch
from transformers import AutoModel
out_dir = sys.argv[1]
saved = torch.load(f"{out_dir}/inputs.pt")
model = AutoModel.from_pretrained(out_dir, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=saved["input_ids"], pixel_values=saved["pixel_values"]).logits
generated = model.generate(input_ids=saved["input_ids"], pixel_values=saved["pixel_values"], max_new_tokens=8,
                           do_sample=False)
print(json.dumps({"module": type(model).__module__, "class": type(model).__name__,
                  "identical": torch.equal(logits, saved["logits"]),
                  "tokens": generated[0, saved["input_ids"].shape[1]:].tolist()}))
"""


def run(out_dir: str, kept: bool) -> None:
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

    model.save_pretrained(out_dir)  # weights + config.json (auto_map) + the remote-code .py files

    tiles = torch.randn(1, 3, 448, 448)  # one 448px tile (use InternVLXProcessor for real images)
    input_ids = torch.tensor([[1, 11, 12] + [config.image_token_id] * config.image_seq_length + [13, 14]])
    with torch.no_grad():
        logits = model(input_ids=input_ids, pixel_values=tiles).logits
    torch.save({"input_ids": input_ids, "pixel_values": tiles, "logits": logits}, os.path.join(out_dir, "inputs.pt"))

    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = os.path.join(out_dir, "hf_modules")  # a fresh copy of the remote code, not a cached one
    result = subprocess.run([sys.executable, "-c", RELOAD, out_dir], capture_output=True, text=True, env=env,
                            check=False)
    if result.returncode != 0:
        sys.exit(f"reload as remote code failed:\n{result.stderr[-2000:]}")
    reload = json.loads(result.stdout.strip().splitlines()[-1])

    where = out_dir if kept else f"{out_dir} (temporary, removed when the script ends; pass a folder to keep it)"
    print(f"saved to {where}; reloaded class {reload['class']} from {reload['module']} (internvlx_hf hidden)")
    print(f"tokens per tile: {config.image_seq_length} (LVTC expands to 1024 from layer {config.lvtc.expand_layer})")
    print(f"identical logits after reload: {reload['identical']}")
    print(f"greedy tokens: {reload['tokens']}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        run(sys.argv[1], kept=True)
    else:
        with tempfile.TemporaryDirectory(prefix="internvlx-") as folder:
            run(folder, kept=False)
