"""Parity of a converted checkpoint with its reference run, checked where `internvlx_hf` cannot be imported.

`run_parity(dst, ref, tmp_path)` loads DST with `trust_remote_code=True` alone (in a fresh interpreter that hides the
package, as on a machine without the plugin) and returns what the model, tokenizer, `chat()` and processor give for
the reference inputs: a ``result`` dict (class names, greedy tokens, tokenizer ids, eos token, chat answer, prompt)
and ``outputs`` tensors (logits, the processor's input ids and pixel values).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from conftest import run_isolated_python

PARITY_SCRIPT = r"""
import json, sys, torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor, AutoTokenizer

dst, inputs_path, outputs_path, meta_path = sys.argv[1:5]
ref = load_file(inputs_path)
meta = json.load(open(meta_path))
pixel_values = ref["pixel_values"]
result, outputs = {}, {}

model = AutoModel.from_pretrained(dst, trust_remote_code=True, dtype=torch.float32).eval()
result["class"] = type(model).__name__
with torch.no_grad():
    outputs["logits"] = model(input_ids=ref["input_ids"], pixel_values=pixel_values,
                              attention_mask=ref["attention_mask"]).logits
out = model.generate(input_ids=ref["input_ids"], pixel_values=pixel_values, attention_mask=ref["attention_mask"],
                     max_new_tokens=8, do_sample=False)
result["generated"] = out[0, ref["input_ids"].shape[1]:].tolist()
result["eos"] = model.generation_config.eos_token_id

tokenizer = AutoTokenizer.from_pretrained(dst, trust_remote_code=True)
result["tokenizer_class"] = type(tokenizer).__name__
result["tokenizer_ids"] = tokenizer(meta["prompt"])["input_ids"]
eos = result["eos"]
result["eos_token"] = tokenizer.convert_ids_to_tokens(eos if isinstance(eos, list) else [eos])
result["decoded"] = tokenizer.decode(result["generated"], skip_special_tokens=True)
# InternVL2's own entry point, as its users call it: the answer string the reference chat() returned
result["chat"] = model.chat(tokenizer, pixel_values, meta["question"], dict(max_new_tokens=8, do_sample=False))

processor = AutoProcessor.from_pretrained(dst, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": meta["question"]}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
result["prompt"] = prompt
image = Image.open(meta["image"])
inputs = processor(images=[image], text=prompt, max_tiles=meta["max_tiles"], return_tensors="pt")
outputs["processor_input_ids"] = inputs["input_ids"]
outputs["processor_pixel_values"] = inputs["pixel_values"]
save_file({k: v.contiguous() for k, v in outputs.items()}, outputs_path)
print("RESULT" + json.dumps(result))
"""


def run_isolated_script(code: str, args: list[str], cwd: Path) -> dict:
    """Run ``code`` with ``sys.argv[1:] = args`` where internvlx_hf is hidden; the dict it printed after RESULT."""
    code = "import sys\nsys.argv = [''] + " + repr(args) + "\n" + code
    proc = run_isolated_python(code, cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    # (an interactive prompt printed without a newline may precede the marker on its line)
    line = [row for row in proc.stdout.splitlines() if "RESULT{" in row][-1]
    return json.loads(line.split("RESULT", 1)[1])


def run_parity(dst: Path, ref, tmp_path: Path) -> tuple[dict, dict]:
    """``ref``: a `golden.model_reference(...)`. Returns ``(result, outputs)`` of PARITY_SCRIPT on DST."""
    save_file({"input_ids": ref.input_ids, "attention_mask": ref.attention_mask,
               "pixel_values": ref.pixel_values()}, tmp_path / "inputs.safetensors")
    meta = {"prompt": ref.prompt, "question": ref.question, "image": str(ref.image), "max_tiles": ref.max_tiles}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    args = [str(dst), str(tmp_path / "inputs.safetensors"), str(tmp_path / "outputs.safetensors"),
            str(tmp_path / "meta.json")]
    result = run_isolated_script(PARITY_SCRIPT, args, tmp_path)
    return result, load_file(str(tmp_path / "outputs.safetensors"))
