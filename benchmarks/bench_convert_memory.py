"""Peak memory of `internvlx convert` on a multi-gigabyte, multi-shard checkpoint.

Builds a synthetic InternVL2 checkpoint in a temporary folder (real InternVL2 key names: InternViT + mlp1 + a wide,
shallow InternLM2 with InternLM2-7B widths, bfloat16, split into several safetensors shards with an index), then
converts it in a fresh subprocess and reads that process's peak resident set size (``ru_maxrss`` / ``VmHWM``).
The same is measured for a process that only imports the converter, so the conversion's own cost is visible.

    python benchmarks/bench_convert_memory.py                      # ~2.4 GB checkpoint, 4 source shards
    python benchmarks/bench_convert_memory.py --layers 6 --max-shard-size 1GB

Takes the tokenizer of the fixture `internvl2_internlm2` (in ``$INTERNVLX_FIXTURES``, default the project's
``tests/fixtures``) and needs about twice the checkpoint size of free disk space.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from internvlx_hf.bench.harness import Progress, environment, results, time_call, write_results

REPO_ROOT = Path(__file__).resolve().parents[1]

_MEASURE = r"""
import json, resource, sys, time
start = time.time()
from internvlx_hf.conversion import convert
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if sys.argv[1] == "convert":
    convert(sys.argv[2], sys.argv[3], max_shard_size=sys.argv[4], progress=False)
with open("/proc/self/status") as handle:
    hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM"))
print(json.dumps({"ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "vmhwm_kb": hwm,
                  "after_import_kb": imported, "seconds": time.time() - start}))
"""


def measure(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


_BUILD = r"""
import sys, torch
from internvlx_hf.conversion.synthetic_checkpoint import make_synthetic_internvl2
make_synthetic_internvl2(
    sys.argv[1], sys.argv[2], vit_hidden=1024, vit_layers=2, vit_heads=16, vit_intermediate=4096,
    llm_hidden=4096, llm_layers=int(sys.argv[3]), heads=32, kv_heads=8, llm_intermediate=14336,
    vocab_size=92553, num_shards=int(sys.argv[4]), dtype=torch.bfloat16,
)
"""


def main() -> None:
    parser = argparse.ArgumentParser(allow_abbrev=False,
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="InternLM2 layers (each ~0.44 GB in bf16)")
    parser.add_argument("--num-shards", type=int, default=4, help="source shards")
    parser.add_argument("--max-shard-size", default="5GB", help="output shard size (the converter's default)")
    parser.add_argument("--workdir", default=None, help="where to build the checkpoints (default: a temp dir)")
    parser.add_argument("--tokenizer-from", default=None, help="a checkpoint folder with an InternLM2 tokenizer")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    progress = Progress(3, "convert memory")

    fixtures = Path(os.environ.get("INTERNVLX_FIXTURES", REPO_ROOT / "tests" / "fixtures"))
    tokenizer_from = Path(args.tokenizer_from or fixtures / "internvl2_internlm2")
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench_convert_") as work:
        src, dst = Path(work) / "src", Path(work) / "dst"
        # Built in a subprocess: Linux keeps ru_maxrss across exec, so a big parent would mask the children's peak.
        build_seconds = time_call(lambda: subprocess.run([sys.executable, "-c", _BUILD, str(src), str(tokenizer_from),
                                                          str(args.layers), str(args.num_shards)], check=True),
                                  warmup=0, repeats=1)["median_s"]
        progress.step("synthetic checkpoint built")
        shards = sorted(src.glob("*.safetensors"))
        total = sum(f.stat().st_size for f in shards)
        largest_shard = max(f.stat().st_size for f in shards)
        baseline = measure("import")
        progress.step("import measured")
        result = measure("convert", str(src), str(dst), args.max_shard_size)
        progress.step("conversion measured")
        outputs = sorted(dst.glob("*.safetensors"))
        largest_tensor = 92553 * 4096 * 2  # the embedding / LM head in bf16

        mib = 1024 * 1024
        own = (result["vmhwm_kb"] - baseline["vmhwm_kb"]) * 1024
        print(f"synthetic InternVL2 checkpoint: {total / 1e9:.2f} GB bf16 in {len(shards)} shards "
              f"(largest {largest_shard / 1e9:.2f} GB; largest tensor {largest_tensor / 1e9:.2f} GB), "
              f"built in {build_seconds:.0f}s")
        print(f"output: {len(outputs)} shard(s), {sum(f.stat().st_size for f in outputs) / 1e9:.2f} GB, "
              f"--max-shard-size {args.max_shard_size}")
        print(f"peak RSS, import only : {baseline['vmhwm_kb'] * 1024 / mib:6.0f} MiB (ru_maxrss "
              f"{baseline['ru_maxrss_kb'] * 1024 / mib:.0f} MiB)")
        print(f"peak RSS, convert     : {result['vmhwm_kb'] * 1024 / mib:6.0f} MiB (ru_maxrss "
              f"{result['ru_maxrss_kb'] * 1024 / mib:.0f} MiB), {result['seconds']:.0f}s")
        print(f"conversion's own peak : {own / mib:6.0f} MiB = {own / largest_shard:.2f} x the largest source shard, "
              f"{own / total:.2f} x the checkpoint")
        if args.out:
            rows = [{"process": "import only", **baseline}, {"process": "convert", **result}]
            summary = {"checkpoint_bytes": total, "source_shards": len(shards), "largest_shard_bytes": largest_shard,
                       "output_shards": len(outputs), "build_s": round(build_seconds, 1), "own_peak_bytes": own,
                       "own_peak_vs_largest_shard": round(own / largest_shard, 3),
                       "own_peak_vs_checkpoint": round(own / total, 3)}
            settings = {k: v for k, v in vars(args).items() if k != "out"} | {"tokenizer_from": str(tokenizer_from)}
            write_results(args.out, results("convert_memory", rows, settings, environment("cpu", "bfloat16"))
                          | {"summary": summary})


if __name__ == "__main__":
    main()
