"""`internvlx card`: write a checkpoint's model card (README.md) from its config and provenance record."""

from __future__ import annotations

import argparse

from .command import Command

_CARD_DESCRIPTION = """\
Write MODEL/README.md, the model card, with huggingface_hub's ModelCard. Everything in it comes from the folder or
from the options; nothing is made up:

  metadata    library_name transformers (peft for a LoRA adapter), pipeline_tag image-text-to-text, --license,
              base_model + base_model_relation (rules below), tags (internvl-x, custom_code, and pvtc / lvtc /
              rvtc for the compressions the checkpoint uses; internvl3.5-flash and vir for a Flash checkpoint),
              datasets (Hub ids recorded by `internvlx train`)
  body        the compression settings (projector, LVTC k/T/s/i, tiling, tokens per tile and per typical image;
              for an InternVL3.5-Flash checkpoint its router: what it does, its thresholds and scope, 256 or 64
              tokens per tile, the bounds per typical image, config.vir.enabled = False for plain InternVL3.5),
              a usage snippet that runs as is (AutoModel + AutoProcessor, generate() and chat()), how the model was
              made (from internvlx_provenance.json, written by `internvlx convert` and `internvlx train`), and a
              results table only when --results FILE is given

base_model_relation (from internvlx_provenance.json; --relation overrides):
  converted only, fine-tuned (full weights), LoRA merged into the weights  ->  finetune, base_model = the source
  LoRA adapter (adapter_config.json)  ->  adapter, base_model = the model it loads onto (--base-model)
  no record  ->  no base_model unless --base-model is given
The Hub lists "merge" models as merges of several models, so a LoRA merged into its one base is a finetune here.

--results FILE: JSON (a list of rows, or {"results": [rows]}) or CSV (a header line, then rows) with the columns
benchmark, metric, value (a number) and optionally dataset_id (a Hub dataset id: the row also goes into the
model-index metadata), split, notes. Example JSON row:
  {"benchmark": "TextVQA", "metric": "accuracy", "value": 71.2, "dataset_id": "lmms-lab/textvqa", "split": "val"}"""

_CARD_EPILOG = """\
examples:
  # a converted checkpoint that will be published as me/InternVL2-2B-X (the usage snippet loads that id)
  internvlx card ./InternVL2-2B-X --license mit --repo-id me/InternVL2-2B-X

  # with your measured results, replacing the card written before
  internvlx card ./InternVL2-2B-X --license mit --repo-id me/InternVL2-2B-X --results results.csv --overwrite

  # a LoRA adapter of a model published as me/InternVL2-2B-X
  internvlx card ./lora-out --license mit --repo-id me/InternVL2-2B-X-lora --base-model me/InternVL2-2B-X

  # look at the card without writing it
  internvlx card ./InternVL2-2B-X --license mit --output -"""


# The Hub's base_model_relation values (= internvlx_hf.hub.card.RELATIONS; not imported, so --help stays instant).
RELATIONS = ("finetune", "adapter", "merge", "quantized")


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="the checkpoint folder")
    parser.add_argument("--license", required=True, metavar="ID",
                        help="Hub license id of the weights, e.g. mit or apache-2.0 (use the base model's license)")
    parser.add_argument("--repo-id", default=None, metavar="OWNER/NAME",
                        help="the Hub repository the card is for; the usage snippet loads it (default: MODEL's path, "
                             "which runs locally)")
    parser.add_argument("--base-model", default=None, metavar="ID",
                        help="Hub id of the base model, instead of the one recorded in internvlx_provenance.json")
    parser.add_argument("--relation", choices=RELATIONS, default=None,
                        help="base_model_relation, instead of the rule above")
    parser.add_argument("--results", default=None, metavar="FILE", help="results table source (.json or .csv)")
    parser.add_argument("--name", default=None, help="the card's title (default: the repository or folder name)")
    parser.add_argument("--output", default=None, metavar="FILE",
                        help="where to write the card (default MODEL/README.md; '-' prints it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing card")


def _run_card(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..hub.card import build_model_card, write_model_card

    card = build_model_card(args.model, license=args.license, base_model=args.base_model, relation=args.relation,
                            results=args.results, repo_id=args.repo_id, model_name=args.name)
    if args.output == "-":
        print(card.content)
        return 0
    path = write_model_card(card, Path(args.output) if args.output else Path(args.model) / "README.md",
                            overwrite=args.overwrite)
    data = card.data
    relation = getattr(data, "base_model_relation", None)
    print(f"Wrote {path}: base_model {data.base_model or '(none)'}"
          + (f" ({relation})" if relation else "") + f", tags {', '.join(data.tags)}")
    if not data.base_model:
        print("note: no base model is recorded for this folder; pass --base-model ID to name it.")
    return 0


CARD = Command(
    name="card",
    help="write a checkpoint's model card (README.md) from its config and provenance",
    description=_CARD_DESCRIPTION,
    epilog=_CARD_EPILOG,
    add_arguments=_add_card_arguments,
    run=_run_card,
)
