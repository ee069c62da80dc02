"""`internvlx train`: outputs that load anywhere, YAML configs, errors, resuming, LVTC packing, DDP and FSDP."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from packaging.version import Version
from safetensors.torch import load_file

import training_helpers as th
from conftest import REPO_ROOT, run_isolated_python
from internvlx_hf.cli import main
from internvlx_hf.cli.train import parse_cli
from internvlx_hf.provenance import read_provenance
from internvlx_hf.training import parse_train_args, train
from tiny import is_checkpointing

REMOTE_CODE = ["configuration_internvlx.py", "modeling_internvlx.py", "projectors.py", "lvtc.py", "lvtc_cache.py",
               "outputs.py", "chat.py", "compat.py", "input_checks.py", "placeholders.py", "processing_internvlx.py", "image_processing_internvlx.py", "chat_templates.py", "video.py"]
FAST = ["--use_cpu", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true", "--logging_steps", "1",
        "--per_device_train_batch_size", "2", "--learning_rate", "1e-3"]


def _data(tmp_path, count=8, **meta):
    rows = th.colour_rows(tmp_path / "images", count)
    th.write_jsonl(tmp_path / "colours.jsonl", rows)
    entry = {"root": str(tmp_path / "images"), "annotation": str(tmp_path / "colours.jsonl"), "data_augment": False,
             "repeat_time": 1, **meta}
    (tmp_path / "meta.json").write_text(json.dumps({"colours": entry}))
    return tmp_path / "meta.json"


# Loads OUT and checkpoints in a process where internvlx_hf cannot be imported, and prints greedy-free checks.
_LOAD_ANYWHERE = """
import json, sys, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor
torch.set_num_threads(1)  # the reduction order of `_logits`, so that both sides compute the same float32 sums
results = {}
for folder in sys.argv[1:]:
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (64, 64), (220, 30, 30))], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0, -1]
    results[folder] = {"class": type(model).__name__, "module": type(model).__module__.split(".")[0],
                       "processor": type(processor).__name__, "logits": logits[:8].tolist()}
print(json.dumps(results))
"""


def _load_anywhere(tmp_path, *folders):
    code = "import sys\nsys.argv = [''] + " + repr([str(f) for f in folders]) + "\n" + _LOAD_ANYWHERE
    result = run_isolated_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _logits(folder, adapter=None):
    """The first 8 last-position logits of ``folder``'s model (with the LoRA ``adapter`` folder on it, by peft)."""
    from PIL import Image

    model, processor = th.load(folder)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[prompt], images=[Image.new("RGB", (64, 64), (220, 30, 30))], return_tensors="pt")
    # one thread, as `_LOAD_ANYWHERE` computes them, so that both processes take each float32 sum in the same order
    # (a CI run beside another found these logits 1.9e-5 apart with the default threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            return model.eval()(**inputs).logits[0, -1, :8]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("preset", [pytest.param("stage2", marks=pytest.mark.oldest), "lora"])
def test_train_writes_checkpoints_that_load_anywhere(preset, tmp_path, capsys):
    model = th.converted("internvl2_qwen2")
    out = tmp_path / "out"
    code = main(["train", "--model", str(model), "--data", str(_data(tmp_path, max_dynamic_patch=1)), "--preset",
                 preset, "--output_dir", str(out), "--max_steps", "2", "--save_steps", "1", *FAST])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"Trainable parameters (preset {preset})" in printed
    assert "  colours                           8          8" in printed  # rows, samples (read lazily)
    source_tiles = json.loads((model / "processor_config.json").read_text())["image_processor"]["max_tiles"]
    assert (f"Tiles: each dataset's max_dynamic_patch (colours 1) (--max_tiles N sets one budget for all); the saved "
            f"processor keeps the source's max_tiles {source_tiles} (training tiles at up to 1; --save_max_tiles "
            "saves that instead)") in printed
    # the run's peak memory: on a CPU the process's peak RSS (ru_maxrss), which only grows afterwards
    import resource

    peak = re.search(r"^Peak memory: (\d+\.\d\d) GiB resident \(peak RSS of this process, cpu\)$", printed, re.M)
    assert peak, printed
    assert 0.1 < float(peak.group(1)) <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 + 0.005

    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "processor_config.json", "internvlx_provenance.json", *REMOTE_CODE}
    assert expected <= set(os.listdir(out))
    record = read_provenance(out)["training"][-1]
    assert record["started_from"] == str(model) and record["preset"] == preset and record["steps"] == 2
    assert record["data"][0]["files"] == [str(tmp_path / "colours.jsonl")] and record["data"][0]["samples"] == 8
    assert (record["learning_rate"], record["tiling"], record["max_tiles"], record["packing"]) == (1e-3, "ratio", 1,
                                                                                                   False)
    assert record["lm_head_loss"] == "labelled"  # the LM head on the labelled positions only, by default
    # the budget is training's: the saved processor tiles as the source did (`--save_max_tiles` saves the budget)
    assert json.loads((out / "processor_config.json").read_text())["image_processor"]["max_tiles"] == source_tiles
    # what loading the rows found, all processes and DataLoader workers together
    assert record["data_loaded"]["rows"] == 8 and record["data_loaded"]["skipped"] == {}
    assert 4 <= record["data_loaded"]["rows_read"] <= 8
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(losses) == 2 and losses[-1] < losses[0]

    if preset == "lora":
        assert record["output"] == "merged" and record["lora"]["r"] == 16
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(out / "adapter"))
        assert read_provenance(out / "adapter")["training"][-1]["output"] == "adapter"
        # checkpoints hold the adapter (+ processor); they load through the base folder named in the adapter
        assert {"adapter_model.safetensors", "processor_config.json", "tokenizer.json"} <= \
            set(os.listdir(out / "checkpoint-1"))
        assert read_provenance(out / "checkpoint-1")["training"][-1] | {"date": None} == \
            {**{key: value for key, value in record.items() if key != "data_loaded"},  # counted at the run's end
             "steps": 1, "epochs": 0.25, "output": "adapter", "date": None}
    else:
        assert record["output"] == "full" and record["lora"] is None
        for checkpoint in ("checkpoint-1", "checkpoint-2"):
            assert expected <= set(os.listdir(out / checkpoint))
            assert read_provenance(out / checkpoint)["training"][-1]["steps"] == int(checkpoint[-1])

    # transformers 5.16-5.17 load a LoRA checkpoint's modules_to_save (the projectors) as unexpected keys, leaving
    # them untrained; there peft's PeftModel.from_pretrained loads it (docs/fine-tuning.md)
    by_transformers = preset != "lora" or Version(transformers.__version__) >= Version("5.18")
    loaded = _load_anywhere(tmp_path, out, *([out / "checkpoint-2"] if by_transformers else []))
    assert {r["module"] for r in loaded.values()} == {"transformers_modules"}
    assert {r["processor"] for r in loaded.values()} == {"InternVLXProcessor"}
    ours = _logits(out)
    torch.testing.assert_close(torch.tensor(loaded[str(out)]["logits"]), ours, rtol=0, atol=1e-5)
    # the last checkpoint is the final model (for LoRA: base + adapter == merged), and training changed it
    last = loaded[str(out / "checkpoint-2")]["logits"] if by_transformers else _logits(model, out / "checkpoint-2")
    torch.testing.assert_close(torch.as_tensor(last), ours, rtol=0, atol=1e-5)
    assert not torch.allclose(_logits(model), ours, atol=1e-4)


def test_yaml_config_flags_override_it_and_errors_are_one_line(tmp_path, capsys):
    model = th.converted("internvl2_qwen2")
    config = tmp_path / "train.yaml"
    config.write_text(textwrap.dedent(f"""\
        model: {model}
        data: {_data(tmp_path, count=4, max_dynamic_patch=1)}
        preset: stage1
        output_dir: {tmp_path / 'out'}
        max_steps: 3
        learning_rate: 0.005
        tiling: edge
        max_tiles: 2
        use_cpu: true
        report_to: none
        disable_tqdm: true
        per_device_train_batch_size: 2
        save_strategy: "no"
        """))
    assert main(["train", str(config), "--max_steps", "1"]) == 0
    record = read_provenance(tmp_path / "out")["training"][-1]
    assert (record["preset"], record["steps"], record["learning_rate"]) == ("stage1", 1, 0.005)
    assert (record["tiling"], record["max_tiles"]) == ("edge", 2)  # what training used
    # the saved processor takes the run's tiling (RVTC, part of the model), and keeps the source's tile budget unless
    # asked to save training's
    source = json.loads((model / "processor_config.json").read_text())["image_processor"]
    saved = json.loads((tmp_path / "out" / "processor_config.json").read_text())["image_processor"]
    assert (saved["tiling"], saved["max_tiles"]) == ("edge", source["max_tiles"]) and source["max_tiles"] != 2
    assert main(["train", str(config), "--max_steps", "1", "--save_max_tiles", "--output_dir",
                 str(tmp_path / "saved")]) == 0
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_processor"]
    assert (saved["tiling"], saved["max_tiles"]) == ("edge", 2)
    assert (f"the saved processor gets max_tiles 2 (--save_max_tiles; the source's was {source['max_tiles']}): the "
            "model then tiles images at up to 2 at inference") in capsys.readouterr().out
    capsys.readouterr()

    (tmp_path / "no-model.yaml").write_text("max_steps: 1\n")  # train() checks what CONFIG.yaml leaves out
    cases = [
        (["train", "--data", "x.jsonl", "--output_dir", "o"], "the following options are required: --model (or "),
        (["train", "--model", str(model), "--data", "x.jsonl"], "the following options are required: --output_dir"),
        (["train", str(tmp_path / "no-model.yaml"), "--data", "x.jsonl", "--output_dir", "o"], "--model is required"),
        (["train", "--model", str(th.require_fixture("internvl2_qwen2")), "--data", "x", "--output_dir", "o"],
         "config.json has model_type 'internvl_chat', not 'internvlx'; convert OpenGVLab InternVL2 / InternVL-X "
         "checkpoints "
         "first with `internvlx convert SRC DST`"),
        (["train", str(config), "--data", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "new")],
         "training data '"),
        (["train", str(config), "--preset", "lora", "--lora_target", "qkv", "--output_dir", str(tmp_path / "new")],
         "lora_target item 'qkv' matches no Linear layer of the llm"),
        (["train", str(tmp_path / "missing.yaml")], "training config '"),
    ]
    (tmp_path / "reduction.yaml").write_text(config.read_text() + "loss_reduction: mean\n")
    cases.append((["train", str(tmp_path / "reduction.yaml")],
                  "reduction.yaml: loss_reduction is 'mean', but it must be one of ['token', 'sample', 'square']"))
    (tmp_path / "bad.yaml").write_text("model: x\nno_such_option: 1\n")
    cases.append((["train", str(tmp_path / "bad.yaml")], "unknown training option(s) ['no_such_option']"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars: one line
        assert err.startswith("internvlx train: error: ") and message in err, err


def test_an_unconverted_teacher_is_named_as_the_teacher(tmp_path, capsys):
    """`--teacher` given an OpenGVLab folder (model_type internvl_chat) is refused before any work, by a line that
    names --teacher and the fix (it once blamed --model, which was a converted checkpoint, after reading the data)."""
    from internvlx_hf.demo import demo_model_dir

    teacher = str(th.require_fixture("internvl2_qwen2"))
    argv = ["train", "--model", str(demo_model_dir()), "--teacher", teacher, "--data", str(_data(tmp_path, count=2)),
            "--output_dir", str(tmp_path / "out"), *FAST]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"internvlx train: error: --teacher {teacher!r}: config.json has model_type 'internvl_chat', not 'internvlx'; "
        "convert OpenGVLab InternVL2 / InternVL-X checkpoints first with `internvlx convert SRC DST`")
    assert not (tmp_path / "out").exists()


def test_resume_from_checkpoint_reaches_the_same_weights(tmp_path):
    model = str(th.converted("internvl2_qwen2"))
    data = str(_data(tmp_path, max_dynamic_patch=1))
    options = dict(model=model, data=data, preset="stage2", max_steps=2, save_steps=1, use_cpu=True,
                   report_to="none", disable_tqdm=True, seed=0, per_device_train_batch_size=2, learning_rate=1e-3)
    train(*parse_train_args(options, output_dir=str(tmp_path / "straight")), print_fn=None)
    train(*parse_train_args(options, output_dir=str(tmp_path / "resumed"),
                            resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-1")), print_fn=None)
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "model.safetensors")
    halfway = load_file(tmp_path / "straight" / "checkpoint-1" / "model.safetensors")
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(halfway["lm_head.weight"], straight["lm_head.weight"])


def test_lvtc_trains_packed_with_gradient_checkpointing(tmp_path):
    model = str(th.converted("internvl2_qwen2", lvtc="k=1"))  # layer 1 of 2 runs on the 1024-token tiles
    result = train(*parse_train_args(
        dict(model=model, data=str(_data(tmp_path, max_dynamic_patch=1)), preset="full", packing=True,
             loss_reduction="square", activation_checkpointing=True, output_dir=str(tmp_path / "out"), max_steps=3,
             save_strategy="no",
             use_cpu=True, report_to="none", disable_tqdm=True, seed=0, logging_steps=1,
             per_device_train_batch_size=2, learning_rate=1e-3)), print_fn=None)
    losses = th.losses(result.trainer)
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert is_checkpointing(result.trainer.model)
    record = read_provenance(tmp_path / "out")["training"][-1]
    assert (record["packing"], record["loss_reduction"]) == (True, "square")


_DDP = """
import json, os, sys, torch
import torch.distributed as dist
from internvlx_hf.training import end_distributed, parse_train_args, train
result = train(*parse_train_args(json.loads(sys.argv[1])), print_fn=None)
rank, world = dist.get_rank(), dist.get_world_size()
model = result.trainer.accelerator.unwrap_model(result.trainer.model)
torch.save({n: p.detach().clone() for n, p in model.named_parameters()}, sys.argv[2] + f"/rank{rank}.pt")
losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
del result, model
end_distributed()
tasks = "/proc/self/task"  # Linux: the process's threads, C++ ones included
threads = [open(f"{tasks}/{t}/comm").read().strip() for t in os.listdir(tasks)] if os.path.isdir(tasks) else None
json.dump({"losses": losses, "world": world,
           "gloo_threads": None if threads is None else [t for t in threads if "gloo" in t]},
          open(sys.argv[2] + f"/rank{rank}.json", "w"))
"""


def _torchrun(tmp_path, options):
    script = tmp_path / "run.py"
    script.write_text(_DDP)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               json.dumps(options), str(tmp_path)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


def _options(tmp_path, **overrides):
    options = dict(model=str(th.converted("internvl2_qwen2")), data=str(_data(tmp_path, max_dynamic_patch=1)),
                   preset="full", output_dir=str(tmp_path / "out"), max_steps=4, save_strategy="no", use_cpu=True,
                   ddp_backend="gloo", report_to="none", disable_tqdm=True, seed=0, logging_steps=1,
                   per_device_train_batch_size=2, learning_rate=1e-3)
    return {**options, **overrides}


def test_ddp_with_two_cpu_processes(tmp_path):
    ranks = _torchrun(tmp_path, _options(tmp_path))
    assert [r["world"] for r in ranks] == [2, 2]
    # end_distributed() (what `internvlx train` runs last) stopped gloo's threads: none is left to abort at exit,
    # also where deepspeed is installed (accelerate imports it in every Trainer, after the group was made, and
    # deepspeed.comm.torch's `barrier(group=GroupMember.WORLD)` default kept the group; CI runs this test there too).
    if sys.platform.startswith("linux"):
        assert [r["gloo_threads"] for r in ranks] == [[], []]
    losses = ranks[0]["losses"]
    assert len(losses) == 4 and losses[-1] < losses[0] - 0.5
    weights = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    initial = load_file(th.converted("internvl2_qwen2") / "model.safetensors")
    for name, value in weights[0].items():
        assert torch.equal(weights[1][name], value), name
    assert not torch.equal(weights[0]["lm_head.weight"], initial["lm_head.weight"])
    final = load_file(tmp_path / "out" / "model.safetensors")
    for name, value in final.items():
        assert torch.equal(value, weights[0][name]), name


def test_help_names_every_preset_and_loss_reduction(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help lines at the terminal width
    assert "[--preset {stage1,stage2,stage2-frozen-vit,full,lora,qlora}]" in text
    for line in ("stage2 everything (the paper's stage 2, instruction tuning: all parameters; default)",
                 "stage2-frozen-vit LLM + projectors; ViT frozen (InternVL2's fine-tuning scripts, --freeze_backbone "
                 "True)",
                 "--loss-reduction {token,sample,square} InternVL's loss averaging: token (every labelled token "
                 "alike), sample (every sample alike: 1/n per token), square (1/sqrt(n) per token; InternVL2.5's "
                 "recipes) (default: token)"):
        assert line in text, line


def test_ddp_weighted_loss_is_normalised_over_both_processes(tmp_path):
    """loss_reduction square on two processes with one sample each trains as one process with both samples."""
    rows = th.colour_rows(tmp_path / "images", 2)
    rows[1]["conversations"][1]["value"] = "It is green, a bright green square on a white background."
    th.write_jsonl(tmp_path / "colours.jsonl", rows)
    entry = {"root": str(tmp_path / "images"), "annotation": str(tmp_path / "colours.jsonl"), "max_dynamic_patch": 1}
    (tmp_path / "meta.json").write_text(json.dumps({"colours": entry}))
    options = _options(tmp_path, data=str(tmp_path / "meta.json"), loss_reduction="square", optim="sgd",
                       learning_rate=0.5, max_steps=1, per_device_train_batch_size=1)
    ranks = _torchrun(tmp_path, options)
    options.pop("ddp_backend")
    single = train(*parse_train_args({**options, "output_dir": str(tmp_path / "single"),
                                      "per_device_train_batch_size": 2}), print_fn=None)
    assert ranks[0]["losses"][0] == pytest.approx(th.losses(single.trainer)[0], abs=1e-5)
    ddp, one = load_file(tmp_path / "out" / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    initial = load_file(th.converted("internvl2_qwen2") / "model.safetensors")
    assert not torch.equal(one["lm_head.weight"], initial["lm_head.weight"])
    for name, value in one.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-6, msg=name)


def test_train_refuses_a_used_output_dir_unless_resumed_or_overwritten(tmp_path, capsys):
    model = th.converted("internvl2_qwen2")
    out = tmp_path / "out"
    argv = ["train", "--model", str(model), "--data", str(_data(tmp_path, count=4, max_dynamic_patch=1)),
            "--output_dir", str(out), "--max_steps", "1", *FAST]
    assert main([*argv, "--save_steps", "1"]) == 0
    (out / "README.md").write_text("the card of the last run\n")
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    capsys.readouterr()

    assert main(argv) == 2
    assert capsys.readouterr().err == (
        f"internvlx train: error: --output_dir {out} is not empty (README.md, chat.py, chat_template.jinja, "
        "...); a new run there would mix its files with the old ones. Continue that run with "
        "--resume_from_checkpoint, delete its contents with --overwrite_output_dir, or choose another --output_dir\n")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before  # refused before any work

    inside = out / "base"
    shutil.copytree(model, inside)
    assert main([*argv[:2], str(inside), *argv[3:], "--overwrite_output_dir"]) == 2
    assert capsys.readouterr().err == (
        f"internvlx train: error: --overwrite_output_dir would delete --model {inside}, which lies in --output_dir "
        f"{out}; write to another --output_dir\n")
    shutil.rmtree(inside)

    # resuming continues the run that is there
    assert main([*argv[:-len(FAST) - 2], "--max_steps", "2", "--save_steps", "1", *FAST,
                 "--resume_from_checkpoint", str(out / "checkpoint-1")]) == 0
    assert read_provenance(out)["training"][-1]["steps"] == 2 and (out / "checkpoint-2").is_dir()

    # --overwrite_output_dir: the old run's checkpoints and card are gone, the new model is there
    assert main([*argv, "--save_strategy", "no", "--overwrite_output_dir"]) == 0
    assert not (out / "README.md").exists() and not list(out.glob("checkpoint-*"))
    assert read_provenance(out)["training"][-1]["steps"] == 1 and (out / "model.safetensors").is_file()


def test_yaml_values_are_read_as_the_flags_would_be(tmp_path, capsys):
    """PyYAML reads `1e-3` (no dot) as a string and an unquoted `no` as false; the options come out typed as on the
    command line, or the run stops before any work with the key named."""
    model = th.converted("internvl2_qwen2")
    config = tmp_path / "train.yaml"
    base = f"model: {model}\ndata: {_data(tmp_path, count=4)}\noutput_dir: {tmp_path / 'out'}\n"
    config.write_text(base + "learning_rate: 1e-3\nmax_steps: '3'\nweight_decay: 1e-2\nbf16: 'false'\n"
                             "max_length: 4000.0\nsave_strategy: 'no'\nreport_to: none\n")
    model_args, data_args, preset_args, training_args = parse_train_args(config)
    assert (training_args.learning_rate, training_args.weight_decay, training_args.max_steps, data_args.max_length) \
        == (0.001, 0.01, 3, 4000)
    assert type(training_args.learning_rate) is float and training_args.bf16 is False
    assert training_args.save_strategy == "no" and training_args.report_to == []
    # a flag whose bare form means true (`--fsdp`, transformers' "pass --fsdp or fsdp=True") takes true in YAML too,
    # as on the command line
    config.write_text(base + "fsdp: true\n")
    assert parse_train_args(config)[3].fsdp is True
    assert parse_cli([str(config), "--fsdp"])[3].fsdp is True

    cases = [
        ("learning_rate: fast", "learning_rate is 'fast', but it must be a number"),
        ("max_steps: 2.5", "max_steps is 2.5, but it must be an integer"),
        ("bf16: maybe", "bf16 is 'maybe', but it must be true or false"),
        ("tiling: diagonal", "tiling is 'diagonal', but it must be one of ['ratio', 'area', 'edge', 'none']"),
        ("save_strategy: no", "save_strategy is false, but it must be one of ['no', 'steps', 'epoch', 'best'] (YAML "
                              "reads an unquoted yes/no/on/off as true/false; quote it)"),
    ]
    for line, message in cases:
        config.write_text(base + line + "\n")
        assert main(["train", str(config)]) == 2, line
        assert capsys.readouterr().err == f"internvlx train: error: {config}: {message}\n"
    assert not (tmp_path / "out").exists()


_CLEAN_RUN = """
import json, sys
from internvlx_hf.cli import main
src, data, bad_data, work = sys.argv[1:5]
assert main(["convert", src, work + "/converted", "--no-progress"]) == 0
assert main(["train", "--model", work + "/converted", "--data", data, "--output_dir", work + "/out", "--preset", "lora",
             "--activation_checkpointing", "--max_steps", "1", "--use_cpu", "--report_to", "none",
             "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]) == 0
print("=== warnings expected from here", file=sys.stderr)
config = json.load(open(work + "/converted/config.json"))
config["text_config"]["pad_token_id"] = None  # as `internvlx convert` wrote it before: the Trainer warns
json.dump(config, open(work + "/converted/config.json", "w"))
assert main(["train", "--model", work + "/converted", "--data", bad_data, "--output_dir", work + "/out2",
             "--max_steps", "1", "--use_cpu", "--report_to", "none", "--per_device_train_batch_size", "2"]) == 0
"""


def test_a_clean_convert_and_train_print_no_warning(tmp_path):
    """The first run of docs/fine-tuning.md (convert, then train; here with activation checkpointing) writes nothing
    to stderr but progress bars: no FutureWarning, no "new PAD/BOS/EOS tokens" from the Trainer, no note from peft.
    Warnings that are due (a skipped sample, an old checkpoint without a pad id) print once each, on lines of their
    own."""
    script = tmp_path / "run.py"
    script.write_text(_CLEAN_RUN)
    data = _data(tmp_path, count=2, max_dynamic_patch=1)
    rows = [json.loads(line) for line in (tmp_path / "colours.jsonl").read_text().splitlines()]
    bad_data = th.write_jsonl(tmp_path / "images" / "bad.jsonl", [*rows, {**rows[0], "image": "missing.png"}])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    result = subprocess.run([sys.executable, str(script), str(th.require_fixture("internvl2_qwen2")), str(data),
                             str(bad_data), str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # the Trainer's bar is the progress: transformers' own bars (loading, writing shards) are not shown around it
    assert "Loading weights" not in result.stderr and "Writing model shards" not in result.stderr
    clean, warned = result.stderr.split("=== warnings expected from here\n")

    def not_bars(text):  # tqdm redraws after "\r" and a bar ends in "]": a message glued to one is kept
        pieces = (re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", piece).strip() for piece in re.split(r"[\r\n]", text))
        return [piece for piece in pieces if piece and not re.search(r"\|.*\]$", piece)]

    aligned = ("[transformers] The tokenizer has new PAD/BOS/EOS tokens that differ from the model config and "
               "generation config. The model config and generation config were aligned accordingly, being updated "
               "with the tokenizer's values. Updated tokens: ")
    if Version(transformers.__version__) >= Version("5.18"):
        assert not_bars(clean) == []
        updated = "{'pad_token_id': 800}"
    else:  # 5.16-5.17 compare the tokenizer's tokens with the top-level config, not the text config: every run warns
        updated = "{'eos_token_id': 802, 'bos_token_id': None, 'pad_token_id': 800}"  # (docs/fine-tuning.md)
        assert not_bars(clean) == [f"{aligned}{updated}."]
    assert not_bars(warned) == [
        f"{aligned}{updated}.",
        # rows are checked as they load (lazily), so the skipped row is found once training runs
        f"skipping {bad_data}:3: image {str(tmp_path / 'images' / 'missing.png')!r} not found (image "
        "not found; 1 skipped while loading so far)",
    ]


def test_callbacks_see_every_optimizer_step_with_its_gradients(tmp_path):
    from transformers import TrainerCallback

    class Record(TrainerCallback):
        def __init__(self):
            self.seen = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads = [p.grad for p in model.model.multi_modal_projector.parameters()]
            self.seen.append((state.global_step, all(g is not None and bool(g.any()) for g in grads)))

    record = Record()
    result = train(*parse_train_args(
        dict(model=str(th.converted("internvl2_qwen2")), data=str(_data(tmp_path, max_dynamic_patch=1)),
             preset="stage1", output_dir=str(tmp_path / "out"), max_steps=2, save_strategy="no", use_cpu=True,
             report_to="none", disable_tqdm=True, seed=0, per_device_train_batch_size=2, learning_rate=1e-3)),
        callbacks=[record], print_fn=None)
    assert record in result.trainer.callback_handler.callbacks
    assert record.seen == [(0, True), (1, True)]


def test_cpu_threads_leave_a_busy_machine_s_cores_to_their_jobs(monkeypatch):
    """A CPU run takes torch's threads lowered to the cores free at its start (on a busy 2-core machine, 2 threads
    ran several times slower than 1: benchmarks/results/cpu-training.md); --threads and OMP_NUM_THREADS win."""
    import os

    from internvlx_hf.training.runtime import cpu_threads

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
        for load, expected in ((1.9, 1), (0.2, 2), (0.6, 1), (5.0, 1)):
            monkeypatch.setattr(os, "getloadavg", lambda load=load: (load, load, load))
            threads, why = cpu_threads()
            assert threads == expected and f"2 cores, load average {load:.1f}" in why, (load, threads, why)
        assert cpu_threads(2) == (2, "--threads")
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert cpu_threads() == (2, "OMP_NUM_THREADS=2")
        with pytest.raises(ValueError, match="--threads must be >= 1, got 0"):
            cpu_threads(0)
    finally:
        torch.set_num_threads(before)
