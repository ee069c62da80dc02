"""`internvlx demo` and the demo model shipped inside the package: it answers its own images right, answers about a
user's image, fails in one line on bad input, and its folder loads as remote code where internvlx_hf is hidden."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import run_isolated_python

from internvlx_hf.cli import main
from internvlx_hf.demo import DEMO_MODEL_DIR, demo_model_dir, demo_record, demo_samples, demo_video_samples

MODELING_CODE = {"configuration_internvlx.py", "modeling_internvlx.py", "projectors.py", "lvtc.py", "lvtc_cache.py",
                 "outputs.py", "chat.py", "compat.py", "input_checks.py", "placeholders.py", "vir.py",
                 "vir_routing.py", "generation.py"}
REMOTE_CODE = MODELING_CODE | {"processing_internvlx.py", "image_processing_internvlx.py", "chat_templates.py",
                               "video.py"}
PACKAGED = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "processor_config.json", "chat_template.jinja", "internvlx_provenance.json", "demo_model.json"}


def test_the_packaged_model_is_complete_small_and_recorded():
    # weights, config, tokenizer, recipe and provenance; no code (no second copy of modeling/ and processing/) and
    # no training_args.bin (a pickle; the recipe is in demo_model.json)
    assert {p.name for p in DEMO_MODEL_DIR.iterdir()} == PACKAGED
    assert sum(p.stat().st_size for p in DEMO_MODEL_DIR.iterdir()) < 8 * 2**20
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["projector_type"] == "pvtc" and config["lvtc"]["expand_layer"] == 5
    assert config["image_seq_length"] == 16
    record = demo_record()
    assert record["recipe"] == "pvtc+lvtc" and record["training"]["steps"] == 1500
    assert min(record["held_out"]["accuracy"].values()) >= 0.85
    # trained with an empty system block and with none (the template's default), scored under both and under no
    # system turn: what lmms-eval, pipelines and chat() send
    assert record["data"]["system_prompts"] == "empty+default"
    by_system = record["held_out_by_system_prompt"]
    assert list(by_system) == ["empty", "default", "none"]
    assert by_system["empty"] == record["held_out"] and by_system["empty"]["system"] == ""
    assert by_system["default"]["system"].startswith("你是由上海人工智能实验室") and by_system["none"]["system"] is None
    assert by_system["default"]["accuracy"] == by_system["none"]["accuracy"]  # the same prompt, written out or not
    for scores in by_system.values():
        assert scores["n"] == 1000 and min(scores["accuracy"].values()) >= 0.85
    assert "exact match" in record["scored_with"]
    # the video stage: 4-frame clips of "Which colour appears first?", scored the same three ways on 200 clips
    assert record["video"]["frames"] == 4 and record["video"]["steps"] > 0
    assert list(record["held_out_video"]) == ["empty", "default", "none"]
    for scores in record["held_out_video"].values():
        assert list(scores["accuracy"]) == ["first-colour"] and scores["n"] == 200
        assert scores["tiles_per_sample"] == 4 and scores["visual_tokens_per_sample"] == 64
        assert scores["accuracy"]["first-colour"] >= 0.85


def _package_source(name: str) -> Path:
    import internvlx_hf

    room = "modeling" if name in MODELING_CODE else "processing"
    return Path(internvlx_hf.__file__).parent / room / name


def test_the_demo_model_folder_gets_the_package_code(tmp_path):
    """`demo_model_dir` is the packaged files plus the package's own remote code, written once per content."""
    folder = demo_model_dir(tmp_path)
    assert folder.parent == tmp_path and folder.name.startswith("demo-model-")
    assert {p.name for p in folder.iterdir()} == PACKAGED | REMOTE_CODE
    for name in REMOTE_CODE:
        assert (folder / name).read_bytes() == _package_source(name).read_bytes(), name
    for name in PACKAGED:
        assert (folder / name).read_bytes() == (DEMO_MODEL_DIR / name).read_bytes(), name
    # reused, not rewritten: a second call finds the folder (and nothing else was left in the cache)
    (folder / "marker").write_text("kept")
    assert demo_model_dir(tmp_path) == folder and (folder / "marker").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    # the default cache is under the Hugging Face home
    assert demo_model_dir().parent.name == "internvlx_hf"


def test_demo_answers_its_own_images_right(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    samples = demo_samples()
    assert [s.task for s in samples] == ["colour", "shape", "position", "count", "fine"]
    for index, sample in enumerate(samples, 1):
        block = out.split(f"[{index}/5] ")[1].split("\n\n")[0]
        assert block.startswith(f"synthetic {sample.task}, 112x112: {sample.question}")
        assert "tiles: ratio 1x1=1, area 1x1=1, edge 1x1=1  (used: ratio, 1 tile)" in block
        assert "visual tokens: 16; LLM tokens: layers 0-4 " in block and ", layer 5 " in block
        assert f"answer: {sample.expected!r} (" in block and block.rstrip().endswith("right"), block
    assert "5/5 right" in out
    assert "held-out exact match, empty system block (as asked here): colour " in out
    assert "held-out exact match, no system turn (lmms-eval, pipelines, chat()): colour " in out


def test_layer_groups_count_lvtc_expansion(capsys):
    main(["demo", "--seed", "2"])
    out = capsys.readouterr().out
    for line in (line for line in out.splitlines() if "LLM tokens" in line):
        short = int(line.split("layers 0-4 ")[1].split(",")[0])
        long = int(line.split("layer 5 ")[1])
        assert long - short == 64 - 16  # one tile: 16 tokens before layer 5, 64 from it


def test_demo_answers_about_a_user_image(tmp_path, capsys):
    sample = demo_samples(seed=1)[0]
    path = tmp_path / "drawing.png"
    sample.image.save(path)
    assert main(["demo", "--image", str(path), "--question", sample.question]) == 0
    out = capsys.readouterr().out
    assert f"[1/1] {path}, 112x112: {sample.question}" in out
    assert f"answer: {sample.expected!r}" in out
    assert "right" not in out.split("answer:")[1]  # no expected answer for a user's image

    banner = tmp_path / "banner.png"
    sample.image.resize((84, 28)).save(banner)
    assert main(["demo", "--image", str(banner), "--question", sample.question, "--tiling", "edge"]) == 0
    out = capsys.readouterr().out
    # a small banner: ratio matching spends 3x1 tiles + a thumbnail, the RVTC caps one tile (ceil(84*28/112^2) = 1,
    # ceil(84/112) * ceil(28/112) = 1)
    assert "tiles: ratio 3x1+thumbnail=4, area 1x1=1, edge 1x1=1  (used: edge, 1 tile)" in out
    assert "visual tokens: 16; LLM tokens: layers 0-4 " in out
    assert main(["demo", "--image", str(banner), "--question", sample.question]) == 0
    assert "(used: ratio, 4 tiles)" in capsys.readouterr().out


def test_demo_answers_its_own_clips_right(tmp_path, capsys):
    """`internvlx demo --video`: synthetic clips fed as InternVL2 feeds a video (FrameN lines, a tile per frame)."""
    assert main(["demo", "--video", "--save-images", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    samples = demo_video_samples()
    assert len(samples) == 3 and {s.task for s in samples} == {"first-colour"}
    for index, sample in enumerate(samples, 1):
        block = out.split(f"[{index}/3] ")[1].split("\n\n")[0]
        assert block.startswith("synthetic clip of 4 frames: Which colour appears first?")
        assert "frames: 4, one 112px tile each" in block
        # 4 tiles of 16 tokens, each expanded to 64 from layer 5
        short = int(block.split("layers 0-4 ")[1].split(",")[0])
        assert "visual tokens: 64;" in block and f"layer 5 {short + 4 * (64 - 16)}" in block
        answer_line = next(line for line in block.splitlines() if "answer: " in line)
        assert f"answer: {sample.expected!r} (" in answer_line and answer_line.endswith("right"), block
    assert "3/3 right" in out
    assert "held-out exact match, empty system block (as asked here): colour " in out and " first-colour " in out
    strips = sorted(tmp_path.glob("demo_video_0_*.png"))
    assert [p.name for p in strips] == [f"demo_video_0_{i}_first-colour.png" for i in (1, 2, 3)]
    from PIL import Image

    assert Image.open(strips[0]).size == (4 * 112 + 3 * 4, 112)  # the frames side by side

    # a user's clip: a folder of frames (what some datasets ship), 4 taken at segment centres of 8
    folder = tmp_path / "clip"
    folder.mkdir()
    sample = samples[0]
    for index, frame in enumerate(sample.video):
        frame.save(folder / f"frame_{2 * index + 1}.png")
        frame.save(folder / f"frame_{2 * index + 2}.png")
    assert main(["demo", "--video", str(folder), "--question", sample.question]) == 0
    out = capsys.readouterr().out
    assert f"[1/1] {folder}: {sample.question}" in out and "frames: 4, one 112px tile each" in out
    assert f"answer: {sample.expected!r}" in out


@pytest.mark.parametrize("args, expected", [
    (["--image", "{tmp}/missing.png", "--question", "How many shapes?"], "missing.png': no such file"),
    (["--image", "{tmp}/notes.txt", "--question", "How many shapes?"], "notes.txt' is not an image"),
    (["--image", "{tmp}", "--question", "How many shapes?"], "is a folder"),
    (["--image", "{tmp}/notes.txt"], "--image needs --question"),
    (["--question", "How many shapes?"], "--question goes with --image PATH or --video PATH"),
    (["--video", "--question", "How many shapes?"], "--question goes with --image PATH or --video PATH"),
    (["--image", "{tmp}/notes.txt", "--question", "  "], "--question is empty"),
    (["--model", "{tmp}"], "no config.json in"),
    (["--save", "{tmp}"], "exists and is not empty"),
    (["--save", "{tmp}/notes.txt"], "is a file"),
    (["--save", "{tmp}/new", "--seed", "1", "--model", "{tmp}"], "drop --model"),
    (["--video", "{tmp}/notes.txt"], "--video PATH needs --question"),
    (["--video", "--frames", "8"], "--frames applies to --video PATH"),
    (["--video", "--tiling", "area"], "--tiling does not apply with --video"),
    (["--video", "{tmp}/none.mp4", "--question", "Which colour appears first?"], "none.mp4': no such file"),
    (["--video", "{tmp}/notes.txt", "--question", "Which colour appears first?"], "notes.txt'"),
    (["--video", "{tmp}", "--question", "Which colour appears first?"], "the folder holds no frame images"),
    (["--video", "{tmp}/notes.txt", "--question", "Which colour appears first?", "--frames", "0"],
     "--frames must be >= 1, got 0"),
    (["--image", "{tmp}/notes.txt", "--video", "--question", "x"], "--image and --video do not go together"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, capsys, args, expected):
    (tmp_path / "notes.txt").write_text("not an image")
    assert main(["demo"] + [a.replace("{tmp}", str(tmp_path)) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("internvlx demo: error: "), err
    assert expected in err


def test_help_teaches_with_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "internvlx demo --image" in out and "Which letter is in the red box?" in out


def test_internvlx_demo_runs_as_a_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "internvlx_hf", "demo", "--save-images", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "5/5 right" in proc.stdout
    assert sorted(p.name for p in tmp_path.glob("demo_*.png")) == [
        "demo_0_1_colour.png", "demo_0_2_shape.png", "demo_0_3_position.png", "demo_0_4_count.png",
        "demo_0_5_fine.png"]


_REMOTE = """
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
folder, cases = sys.argv[1:] if len(sys.argv) > 2 else (FOLDER, CASES)
model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
answers = []
for path, question in json.loads(cases):
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "<image>\\n" + question}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(images=[Image.open(path).convert("RGB")], text=prompt, return_tensors="pt")
    out = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         pixel_values=inputs["pixel_values"], max_new_tokens=8, do_sample=False, eos_token_id=eos,
                         pad_token_id=processor.tokenizer.pad_token_id)
    answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
print(json.dumps({"module": type(model).__module__, "answers": [a.strip() for a in answers]}))
"""


@pytest.mark.oldest
def test_the_saved_folder_loads_as_remote_code_without_the_package(tmp_path, capsys):
    """`internvlx demo --save DIR`: what evaluation clients load, in an interpreter where internvlx_hf is hidden."""
    saved = tmp_path / "demo-model"
    assert main(["demo", "--save", str(saved)]) == 0
    out = capsys.readouterr().out
    assert re.match(rf"wrote {re.escape(str(saved))} \(\d+\.\d MiB\)", out) and "modeling_internvlx.py" in out
    assert {p.name for p in saved.iterdir()} == PACKAGED | REMOTE_CODE
    for name in REMOTE_CODE:
        assert (saved / name).read_bytes() == _package_source(name).read_bytes(), name
    cases = []
    for sample in demo_samples():
        path = tmp_path / f"{sample.task}.png"
        sample.image.save(path)
        cases.append((str(path), sample.question))
    code = textwrap.dedent(_REMOTE).replace("FOLDER", repr(str(saved))).replace(
        "CASES", repr(json.dumps(cases)))
    proc = run_isolated_python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["module"].startswith("transformers_modules.")
    assert result["answers"] == [s.expected for s in demo_samples()]
