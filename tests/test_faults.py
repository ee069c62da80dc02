"""Faults: a real process, killed with SIGKILL at a known point (tests/fault_pause.py stops it there, after part of its
output is written), then the same work run again.

- `internvlx convert`, `internvlx export native`, `demo_model_dir()` and the lengths cache build: nothing half-written
  is published (the target appears by one rename at the end), the next run writes a complete result, equal to a run
  that was never killed, and removes what the killed one left.
- `internvlx push --dry-run` writes nothing: killed while it reads the weights, the folder is as it was.
- Training (one process, and 2 DDP processes with torchrun): killed mid-epoch while a checkpoint is being written,
  the run resumes from its last complete checkpoint and ends with the weights of an uninterrupted run, bit for bit;
  a checkpoint folder left half-written is refused with the one to resume from.
"""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers.trainer_utils import get_last_checkpoint

import training_helpers as th
from conftest import REPO_ROOT, require_fixture
from internvlx_hf.cli import main

TESTS = Path(__file__).resolve().parent
CLI = "import fault_pause, sys\nfrom internvlx_hf.cli import main\nsys.exit(main(sys.argv[1:]))"
PROVENANCE = "internvlx_provenance.json"  # holds the time of writing


def _env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO_ROOT / "src")]),
            **extra}


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc): torchrun starts its workers in sessions of their own, so killing
    torchrun's process group alone would leave them running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s process group and every process below it, as a machine that dies takes them all."""
    for target in [pid, *_descendants(pid)]:
        for kill in (os.killpg, os.kill):
            try:
                kill(target, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def kill_when_paused(command: list[str], tmp_path: Path, pause: str, timeout: float = 300) -> str:
    """Run ``command`` (a new process group) until it pauses at ``pause`` (see fault_pause), then SIGKILL the group
    (the process and every process it started); returns the path it paused at."""
    marker = tmp_path / "paused-at"
    marker.unlink(missing_ok=True)
    log_path = tmp_path / "killed-child.log"
    with open(log_path, "w") as log:
        child = subprocess.Popen(command, env=_env(FAULT_PAUSE=pause, FAULT_MARKER=str(marker)), cwd=tmp_path,
                                 stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the child did not reach {pause} (status {child.poll()}):\n"
                                f"{log_path.read_text()[-3000:]}")
                time.sleep(0.02)
        finally:
            _kill_tree(child.pid)
            child.wait()
    assert child.returncode == -signal.SIGKILL
    return marker.read_text()


def _hidden(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.tmp-*"))


def _same_folders(a: Path, b: Path) -> None:
    names = sorted(p.relative_to(a).as_posix() for p in a.rglob("*"))
    assert names == sorted(p.relative_to(b).as_posix() for p in b.rglob("*"))
    for name in names:
        if (a / name).is_file() and Path(name).name != PROVENANCE:
            assert filecmp.cmp(a / name, b / name, shallow=False), name


# --- writers that publish by one rename ----------------------------------------------------------------------------

def test_only_the_leftovers_of_stopped_writers_of_the_same_target_are_removed(tmp_path):
    from internvlx_hf.atomic import _host, remove_stale_temporaries, temp_prefix

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)  # a process that has ended
    names = {f".model.tmp-{_host()}-{dead}.a1b2c3d4": False,  # its writer is gone: removed
             f"{temp_prefix(tmp_path / 'model')}e5f6g7h8": True,  # this process is writing it
             f".model.tmp-{_host()}x-{dead}.a1b2c3d4": True,  # another machine's writer (a shared folder)
             f".other.tmp-{_host()}-{dead}.a1b2c3d4": True,  # another target's
             ".model.a1b2c3d4": True}  # not a name of `temp_prefix`
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "part.safetensors").write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path / "model") == [tmp_path / f".model.tmp-{_host()}-{dead}.a1b2c3d4"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(name for name, kept in names.items() if kept)


def test_a_convert_killed_midway_publishes_nothing_and_the_next_one_is_complete(tmp_path):
    from internvlx_hf.conversion import convert

    src, dst = require_fixture("internvl2_qwen2"), tmp_path / "converted"
    # Weights written, configs not yet.
    paused = kill_when_paused([sys.executable, "-c", CLI, "convert", str(src), str(dst), "--no-progress"], tmp_path,
                              r"write:/\.converted\.tmp-[^/]*/config\.json$")
    (left,) = _hidden(tmp_path, "converted")
    assert paused == str(left / "config.json") and list(left.glob("*.safetensors"))
    assert not dst.exists()

    assert main(["convert", str(src), str(dst), "--no-progress"]) == 0
    assert _hidden(tmp_path, "converted") == []  # the killed conversion's leftovers are gone
    convert(src, tmp_path / "reference", progress=False)
    _same_folders(dst, tmp_path / "reference")


def test_an_export_killed_midway_publishes_nothing_and_the_next_one_is_complete(tmp_path):
    from internvlx_hf.conversion.export import export_native

    src, dst = th.converted("internvl2_qwen2"), tmp_path / "native"
    kill_when_paused([sys.executable, "-c", CLI, "export", "native", str(src), str(dst), "--no-progress"], tmp_path,
                     r"write:/\.native\.tmp-[^/]*/config\.json$")
    (left,) = _hidden(tmp_path, "native")
    assert list(left.glob("*.safetensors")) and not dst.exists()

    assert main(["export", "native", str(src), str(dst), "--no-progress"]) == 0
    assert _hidden(tmp_path, "native") == []
    export_native(src, tmp_path / "reference", progress=False)
    _same_folders(dst, tmp_path / "reference")


def test_a_demo_folder_build_killed_midway_is_not_used_and_built_again(tmp_path):
    from internvlx_hf.demo import demo_model_dir

    cache = tmp_path / "cache"
    code = "import fault_pause, sys\nfrom internvlx_hf.demo import demo_model_dir\nprint(demo_model_dir(sys.argv[1]))"
    # The packaged files copied, the remote code not yet.
    kill_when_paused([sys.executable, "-c", code, str(cache)], tmp_path,
                     r"write:/\.demo-model-[^/]*/modeling_internvlx\.py$")
    (left,) = [p for p in cache.iterdir()]
    assert left.name.startswith(".demo-model-") and (left / "config.json").is_file()

    folder = demo_model_dir(cache)
    assert [p.name for p in cache.iterdir()] == [folder.name]  # built anew; the killed build's folder removed
    _same_folders(folder, demo_model_dir(tmp_path / "reference"))


def test_a_lengths_build_killed_before_its_rename_is_built_again(tmp_path):
    from internvlx_hf.data import InternVLXDataset

    th.write_jsonl(tmp_path / "d.jsonl", th.colour_rows(tmp_path / "images", 6, (200, 100)))
    model, cache = th.converted("internvl2_qwen2"), tmp_path / "cache"
    code = ("import fault_pause, sys\nfrom internvlx_hf import InternVLXProcessor\n"
            "from internvlx_hf.data import InternVLXDataset\n"
            "processor = InternVLXProcessor.from_pretrained(sys.argv[1])\n"
            "InternVLXDataset(sys.argv[2], processor, progress=False, cache_dir=sys.argv[3]).lengths\n")
    # Every length computed and written to the temporary file; not renamed into place.
    kill_when_paused([sys.executable, "-c", code, str(model), str(tmp_path / "d.jsonl"), str(cache)], tmp_path,
                     r"rename:\.npz$")
    (left,) = list(cache.iterdir())
    assert left.name.startswith(".d-") and left.stat().st_size > 0

    processor = th.load(model)[1]
    dataset = InternVLXDataset(str(tmp_path / "d.jsonl"), processor, progress=False, cache_dir=cache)
    assert dataset.lengths == InternVLXDataset(str(tmp_path / "d.jsonl"), processor, progress=False,
                                               cache_dir=False).lengths
    assert dataset.lengths_origin == ["built"] and [p.name for p in cache.iterdir()] == [
        Path(dataset.lengths_files[0]).name]
    again = InternVLXDataset(str(tmp_path / "d.jsonl"), processor, progress=False, cache_dir=cache)
    assert again.lengths == dataset.lengths and again.lengths_origin == ["cache"]


def test_push_dry_run_killed_while_reading_leaves_the_folder_as_it_was(tmp_path, capsys):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(th.converted("internvl2_qwen2"), folder)
    assert main(["card", str(folder), "--license", "mit", "--repo-id", "me/model"]) == 0
    before = {p.relative_to(tmp_path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
              for p in tmp_path.rglob("*")}
    kill_when_paused([sys.executable, "-c", CLI, "push", str(folder), "me/model", "--dry-run"], tmp_path,
                     r"read:/model/model\.safetensors$")
    after = {p.relative_to(tmp_path).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
             for p in tmp_path.rglob("*") if p.name not in ("paused-at", "killed-child.log")}
    assert after == before
    capsys.readouterr()
    assert main(["push", str(folder), "me/model", "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("Preflight passed: ")


# --- training -------------------------------------------------------------------------------------------------------

_TRAIN = """
import fault_pause, json, sys
from internvlx_hf.training import end_distributed, parse_train_args, train
result = train(*parse_train_args(json.loads(sys.argv[1])), print_fn=None)
del result
end_distributed()
"""
# Rank 0 writes trainer_state.json last in a checkpoint: paused there, checkpoint-6 holds the weights, optimizer,
# scheduler and rank 0's RNG state, but it is not complete.
_MID_SAVE = r"write:checkpoint-6/trainer_state\.json$"


def _train_options(tmp_path: Path, out: Path, **extra) -> dict:
    """8 rows, a global batch of 2: 4 steps an epoch, 8 steps; checkpoints at steps 3 and 6 (mid-epoch), AdamW."""
    rows = th.colour_rows(tmp_path / "images", 8)
    th.write_jsonl(tmp_path / "colours.jsonl", rows)
    (tmp_path / "meta.json").write_text(json.dumps({"colours": {
        "root": str(tmp_path / "images"), "annotation": str(tmp_path / "colours.jsonl"), "max_dynamic_patch": 1}}))
    options = dict(model=str(th.converted("internvl2_qwen2")), data=str(tmp_path / "meta.json"), output_dir=str(out),
                   preset="full", max_steps=8, save_steps=3, per_device_train_batch_size=2, learning_rate=1e-3,
                   use_cpu=True, report_to="none", disable_tqdm=True, seed=0, logging_steps=1,
                   dataloader_num_workers=0)
    return {**options, **extra}


def _run(command: list[str], tmp_path: Path) -> None:
    done = subprocess.run(command, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]


def _assert_same_weights(out: Path, reference: Path) -> None:
    resumed, expected = load_file(out / "model.safetensors"), load_file(reference / "model.safetensors")
    assert resumed.keys() == expected.keys()
    initial = load_file(th.converted("internvl2_qwen2") / "model.safetensors")
    assert not torch.equal(expected["lm_head.weight"], initial["lm_head.weight"])
    for name, value in expected.items():
        assert torch.equal(resumed[name], value), name
    losses = [[e["loss"] for e in json.loads((folder / "trainer_state.json").read_text())["log_history"]
               if "loss" in e] for folder in (out, reference)]
    assert len(losses[1]) == 8 and losses[0] == losses[1]  # steps 1-3 from checkpoint-3, 4-8 from the resumed run


def _killed_mid_save(out: Path) -> Path:
    """After the kill: checkpoint-3 is the run's last complete checkpoint; checkpoint-6 only exists half-written in
    the staging folder, where no resume looks."""
    staged = out / ".checkpoint-staging" / "checkpoint-6"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (staged / "model.safetensors").is_file() and not (staged / "trainer_state.json").exists()
    last = get_last_checkpoint(str(out))
    assert last == str(out / "checkpoint-3")
    from internvlx_hf.hub.upload import plan_upload

    plan = plan_upload(out)  # `internvlx push OUT` would not upload it either
    assert plan.left_out[".checkpoint-staging/"] == "unfinished: left by a run that was stopped while writing it"
    assert not [name for name in plan.files if name.startswith(".")]
    return Path(last)


def test_training_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    out, reference = tmp_path / "out", tmp_path / "reference"
    options = _train_options(tmp_path, out)
    kill_when_paused([sys.executable, str(script), json.dumps(options)], tmp_path, _MID_SAVE)
    last = _killed_mid_save(out)

    # What the Trainer's own save leaves when killed there: a checkpoint-6 without trainer_state.json, which
    # get_last_checkpoint would pick. Refused, naming the checkpoint to resume from.
    import shutil

    shutil.copytree(out / ".checkpoint-staging" / "checkpoint-6", out / "checkpoint-6")
    argv = ["train", *[f"--{key}={value}" for key, value in options.items()]]
    assert main([*argv, f"--resume_from_checkpoint={out / 'checkpoint-6'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"internvlx train: error: --resume_from_checkpoint {out / 'checkpoint-6'} cannot be resumed from: it has no "
        "trainer_state.json (the Trainer writes it last: the run stopped while saving it); resume from "
        f"{out / 'checkpoint-3'}, the last complete checkpoint in --output_dir")
    shutil.rmtree(out / "checkpoint-6")

    _run([sys.executable, str(script), json.dumps({**options, "resume_from_checkpoint": str(last)})], tmp_path)
    assert not (out / ".checkpoint-staging").exists()  # removed by the next save
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    _run([sys.executable, str(script), json.dumps({**options, "output_dir": str(reference)})], tmp_path)
    _assert_same_weights(out, reference)


def test_ddp_training_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_TRAIN)
    out, reference = tmp_path / "out", tmp_path / "reference"
    options = _train_options(tmp_path, out, ddp_backend="gloo", per_device_train_batch_size=1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    kill_when_paused([*torchrun, json.dumps(options)], tmp_path, _MID_SAVE)
    last = _killed_mid_save(out)
    assert sorted(p.name for p in last.glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    _run([*torchrun, json.dumps({**options, "resume_from_checkpoint": str(last)})], tmp_path)
    _run([*torchrun, json.dumps({**options, "output_dir": str(reference)})], tmp_path)
    _assert_same_weights(out, reference)
