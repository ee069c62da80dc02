"""`internvlx train` as InternVL users launch it: DeepSpeed ZeRO-2 / ZeRO-3 with the shipped configs
(examples/deepspeed/, 2 CPU processes, gloo) and FSDP asked for where accelerate cannot apply it.

The DeepSpeed runs train 4 samples for 2 steps with a global batch of 4 (2 per process), so every step sees the whole
set in both runs and the single-process run with a batch of 4 takes the same optimizer steps: same losses, same saved
weights (SGD, whose update follows the gradient, so a wrong reduction would show). DeepSpeed is an optional extra
(`pip install internvlx-hf[deepspeed]`); without it those tests skip and say why.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import training_helpers as th
from conftest import REPO_ROOT, run_isolated_python
from internvlx_hf.training import parse_train_args, train

needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (pip install internvlx-hf[deepspeed])")
CONFIGS = REPO_ROOT / "examples" / "deepspeed"


def _data(tmp_path, count=4):
    rows = th.colour_rows(tmp_path / "images", count)
    rows[1]["conversations"][1]["value"] = "It is green, a bright green square on a white background."
    th.write_jsonl(tmp_path / "colours.jsonl", rows)
    entry = {"root": str(tmp_path / "images"), "annotation": str(tmp_path / "colours.jsonl"), "max_dynamic_patch": 1}
    (tmp_path / "meta.json").write_text(json.dumps({"colours": entry}))
    return tmp_path / "meta.json"


def _options(tmp_path, model, **overrides):
    options = dict(model=str(model), data=str(_data(tmp_path)), preset="full", max_steps=2, save_strategy="no",
                   use_cpu=True, report_to="none", disable_tqdm=True, seed=0, logging_steps=1, optim="sgd",
                   learning_rate=0.5, per_device_train_batch_size=2)
    return {**options, **overrides}


def _torchrun_cli(tmp_path, options: dict) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m internvlx_hf train --flag value ...`, as a user types it."""
    argv = []
    for key, value in options.items():
        argv += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "internvlx_hf", "train", *argv]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def _losses(folder) -> list[float]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def _same_run(tmp_path, options, out):
    """The DeepSpeed run in ``out`` against one process with the same global batch: losses and saved weights."""
    single = train(*parse_train_args({**options, "output_dir": str(tmp_path / "single"),
                                      "per_device_train_batch_size": 4}), print_fn=None)
    assert _losses(out) == pytest.approx(th.losses(single.trainer), abs=2e-5)
    saved, expected = load_file(out / "model.safetensors"), load_file(tmp_path / "single" / "model.safetensors")
    assert saved.keys() == expected.keys()  # the same key layout as every other output (ZeRO-3 included)
    initial = load_file(Path(options["model"]) / "model.safetensors")
    head = "lm_head.weight" if "lm_head.weight" in expected else "model.language_model.embed_tokens.weight"
    assert not torch.equal(expected[head], initial[head])
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-4, atol=1e-5, msg=name)


_LOAD = """
import sys, torch
from transformers import AutoModel
model = AutoModel.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "out", trust_remote_code=True)
print("LOADED", type(model).__name__, sum(p.numel() for p in model.parameters()))
"""


@needs_deepspeed
@pytest.mark.parametrize("config", ["zero2.json", "zero3.json"])
def test_deepspeed_trains_as_one_process(tmp_path, config):
    """The shipped demo model: PVTC, LVTC and tied embeddings (the LM head is saved once, as everywhere else)."""
    from internvlx_hf.demo import demo_model_dir

    options = _options(tmp_path, demo_model_dir())
    out = tmp_path / "out"
    _torchrun_cli(tmp_path, {**options, "output_dir": str(out), "ddp_backend": "gloo",
                             "deepspeed": str(CONFIGS / config)})
    _same_run(tmp_path, options, out)
    # The folder loads where internvlx_hf is not installed, with every weight in place.
    loaded = run_isolated_python(_LOAD, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "LOADED InternVLXForConditionalGeneration" in loaded.stdout
    assert "were not initialized" not in loaded.stderr and "MISSING" not in loaded.stderr, loaded.stderr[-3000:]


@needs_deepspeed
def test_zero3_with_activation_checkpointing_and_square_loss(tmp_path):
    """LVTC (layer 1 of 2 on the 1024-token tiles) under ZeRO-3 with activation checkpointing and InternVL2.5's
    square loss averaging, whose weights are summed over both processes: the one-process run again."""
    model = th.converted("internvl2_qwen2", lvtc="k=1")
    options = _options(tmp_path, model, loss_reduction="square", activation_checkpointing=True)
    out = tmp_path / "out"
    _torchrun_cli(tmp_path, {**options, "output_dir": str(out), "ddp_backend": "gloo",
                             "deepspeed": str(CONFIGS / "zero3.json")})
    _same_run(tmp_path, options, out)


_DEFAULTS_HOLD_THE_GROUP = """
import json, os, socket
with socket.socket() as probe:
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
import torch.distributed as dist
dist.init_process_group("gloo")
# Imported after the group exists, as accelerate imports deepspeed (deepspeed.comm.torch: `barrier(self,
# group=GroupMember.WORLD)`): torch.distributed.nn.functional's `broadcast(tensor, src, group=group.WORLD)` and the
# rest take the default group as their default argument.
import torch.distributed.nn.functional as functional
from internvlx_hf.training import end_distributed
held = functional.broadcast.__defaults__[-1] is not None
end_distributed()
threads = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(json.dumps({"held": held, "released": functional.broadcast.__defaults__[-1] is None,
                  "gloo_threads": [t for t in threads if "gloo" in t]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="lists the process's threads in /proc")
def test_end_distributed_releases_the_group_that_default_arguments_hold(tmp_path):
    """The cause of gloo threads outliving `end_distributed()` where deepspeed is installed, without deepspeed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    done = subprocess.run([sys.executable, "-c", _DEFAULTS_HOLD_THE_GROUP], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"held": True, "released": True, "gloo_threads": []}


def test_fsdp_from_an_accelerate_config_that_is_not_in_effect_is_reported(tmp_path, monkeypatch, caplog):
    """`accelerate launch` with ``distributed_type: FSDP`` in its config passes ACCELERATE_USE_FSDP to the script, not
    ``--fsdp``; on CPU accelerate trains without FSDP all the same. (``--fsdp`` in one process is refused by the
    Trainer itself: "Using fsdp only works in distributed training".)"""
    options = _options(tmp_path, th.converted("internvl2_qwen2"), max_steps=1, output_dir=str(tmp_path / "out"))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level(logging.WARNING, logger="internvlx_hf.training.runtime"):
        result = train(*parse_train_args(options), print_fn=None)
    assert not result.trainer.is_fsdp_enabled
    assert [r.getMessage() for r in caplog.records if "FSDP" in r.getMessage()] == [
        "The accelerate config (distributed_type: FSDP, ACCELERATE_USE_FSDP=true) asks for FSDP, but it is not in "
        "effect: accelerate applies FSDP only to GPU (and other accelerator) runs, so this run trains without "
        "sharding (one process)."]


def test_no_fsdp_warning_without_fsdp(tmp_path, caplog):
    options = _options(tmp_path, th.converted("internvl2_qwen2"), max_steps=1, output_dir=str(tmp_path / "out"))
    with caplog.at_level(logging.WARNING, logger="internvlx_hf.training.runtime"):
        train(*parse_train_args(options), print_fn=None)
    assert not [r for r in caplog.records if "FSDP" in r.getMessage()]
