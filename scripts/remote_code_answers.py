"""Answer questions about images with a saved folder through transformers alone (the Auto classes with
``trust_remote_code=True`` and ``pipeline``), where ``internvlx_hf`` cannot be imported: what a user without the
plugin runs. Used by tests/test_clients.py and scripts/transformers_matrix.py.

    python scripts/remote_code_answers.py '["FOLDER", ["a.png", ...], ["question", ...], true, "float32"]'

The argument is JSON: folder, image paths, questions (one per image), whether to ask through ``pipeline`` too, and
the dtype. Prints one line ``RESULT{"modules": [...], "generate": [...], "pipeline": [...]}`` (the modules the
classes came from, which must be ``transformers_modules.*``, and the answers, 8 greedy tokens each).
"""

import importlib.util
import json
import sys

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer, pipeline

try:
    found = importlib.util.find_spec("internvlx_hf")
except ModuleNotFoundError:  # a meta-path finder that hides it (tests/conftest.py's run_isolated_python)
    found = None
assert found is None, "internvlx_hf is importable here: this would not test the saved folder alone"

folder, images, questions, with_pipeline, dtype = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True, dtype=dtype).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
generated = []
for start in range(0, len(images), 4):
    chats = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
             for q in questions[start:start + 4]]
    texts = [processor.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    inputs = processor(text=texts, images=images[start:start + 4], padding=True, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    generated += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
result = {"modules": [type(model).__module__, type(processor).__module__], "generate": generated}
if with_pipeline:
    pipe = pipeline("image-text-to-text", model=folder, trust_remote_code=True, dtype=dtype)
    chats = [[{"role": "user", "content": [{"type": "image", "image": p}, {"type": "text", "text": q}]}]
             for p, q in zip(images, questions)]
    result["modules"].append(type(pipe.model).__module__)
    result["pipeline"] = [r[0]["generated_text"]
                          for r in pipe(text=chats, batch_size=4, max_new_tokens=8, return_full_text=False)]
print("RESULT" + json.dumps(result))
