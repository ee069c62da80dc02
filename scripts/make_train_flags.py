"""Write src/internvlx_hf/cli/train_flags.json for every transformers release of the supported range, so that
`internvlx train --help` and its argument errors answer without importing torch under each of them.

For each release other than the installed one, `pip install --target` puts it with the dependencies it asks for
(huggingface-hub, tokenizers, ...: the installed ones may be outside its bounds; not torch, which transformers does
not require) into a temporary folder, and `python -m internvlx_hf.cli.train_flags --print` runs with that folder
first on the path (its `.dist-info` too, so `environment()` reads that release) next to the installed torch. The
installed release is described from the installed package. Identical descriptions share one entry.

    python scripts/make_train_flags.py                       # the releases in RELEASES
    python scripts/make_train_flags.py 5.24.0 5.25.0         # these (the file keeps no other)
    python scripts/make_train_flags.py --wheels DIR          # pip also looks for wheels in DIR (--find-links)

Needs the package registry (pip), about 15 s a release. A release joining the range goes into RELEASES (and
pyproject.toml's bound); look at its TrainingArguments for defaults that depend on the environment.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from internvlx_hf.cli.train_flags import FLAGS_JSON, tables_text  # noqa: E402

# pyproject.toml: transformers>=5.16.1; the releases tested (docs/testing.md), every patch release included.
RELEASES = ["5.16.1", "5.17.0", "5.18.0", "5.19.0", "5.20.0", "5.20.1", "5.20.2", "5.21.0", "5.21.1", "5.22.0",
            "5.22.1", "5.22.2", "5.23.0", "5.24.0"]


def _describe(release: str, wheels: Path, work: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    if release != version("transformers"):
        target = work / release
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--target", str(target), "--find-links",
                        str(wheels), f"transformers=={release}"], check=True)
        env["PYTHONPATH"] = f"{target}{os.pathsep}{env['PYTHONPATH']}"
    out = subprocess.run([sys.executable, "-m", "internvlx_hf.cli.train_flags", "--print"], env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"transformers {release}: describing the flags failed:\n{out.stderr}")
    table = json.loads(out.stdout.splitlines()[-1])
    if table["environment"]["transformers"] != release:
        raise SystemExit(f"transformers {release}: the subprocess saw {table['environment']['transformers']}")
    return table


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(allow_abbrev=False,
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_argument("releases", nargs="*", default=RELEASES, help="transformers releases (default: RELEASES)")
    cli.add_argument("--wheels", type=Path, help="folder of transformers wheels (downloaded there when missing)")
    args = cli.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="train-flags-") as tmp:
        wheels = args.wheels or Path(tmp) / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        tables = []
        for release in args.releases:
            tables.append(_describe(release, wheels, Path(tmp)))
            print(f"transformers {release}: {sum(len(g['actions']) for g in tables[-1]['groups'])} flags")
    text = tables_text(tables)
    FLAGS_JSON.write_text(text, encoding="utf-8")
    print(f"wrote {FLAGS_JSON} ({len(json.loads(text)['tables'])} distinct tables for {len(tables)} releases)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
