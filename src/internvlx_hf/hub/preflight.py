"""Checks that a checkpoint folder will load from the Hub where internvlx-hf is not installed.

`preflight(folder)` returns every problem at once (an empty list when the folder is ready), each naming the file
it is about and the fix. `internvlx push` refuses to upload a folder with problems. Checked:

- remote code: every module named by an ``auto_map`` (config.json, processor / preprocessor / tokenizer configs)
  exists, defines the named class, and finds its sibling modules; no remote-code file imports ``internvlx_hf``
  (which the machines loading the checkpoint do not have);
- a tokenizer (tokenizer_config.json + tokenizer.json / tokenizer.model / vocab files) and a processor config,
  whose ``auto_map`` lets ``AutoProcessor`` find the processor class;
- weights: safetensors present, every shard named by an index present and readable, and every tensor's name and
  shape equal to those of the model that config.json builds (built on the meta device: no memory, no weights);
- a model card (README.md) whose usage snippet, when it names a model id, names the repository being pushed to;
- no pickle files (``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.pickle``) among the files `internvlx push` uploads:
  they can run code when loaded (the Trainer's own ``training_args.bin`` / ``optimizer.pt`` / ... and its
  ``checkpoint-*`` folders are left out of the upload, see `internvlx_hf.hub.upload.plan_upload`).

LoRA adapter folders (adapter_config.json) are checked for their adapter files and a Hub id as base model (in
adapter_config.json, or the card's ``base_model``, which push then writes into the uploaded adapter_config.json)
instead of the full-model weights.
"""

from __future__ import annotations

import ast
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import DAMAGED_HINT, config_key_problem, json_error_text
from .upload import AdapterBase, UploadPlan, adapter_bases, plan_upload

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
_CONFIG_FILES_WITH_AUTO_MAP = ("config.json", "processor_config.json", "preprocessor_config.json",
                               "tokenizer_config.json")


@dataclass(frozen=True)
class Problem:
    """One reason the folder would not load (or should not be published), about ``path`` (relative)."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class PreflightError(ValueError):
    """A folder failed the preflight; ``problems`` lists every problem."""

    def __init__(self, folder: Path, problems: list[Problem]):
        self.folder = folder
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in {folder}: " + "; ".join(map(str, problems)))


def preflight(folder: str | os.PathLike, repo_id: str | None = None, include_checkpoints: bool = False,
              plan: UploadPlan | None = None) -> list[Problem]:
    """Every problem that would keep ``folder`` from loading (or from being published) as a Hub checkpoint.

    Args:
        folder: the checkpoint folder.
        repo_id: the repository it goes to; the card's usage snippet must load that id.
        include_checkpoints: the ``checkpoint-*`` folders go up too (see `internvlx_hf.hub.upload.plan_upload`:
            only the files that are uploaded are checked for pickles).
        plan: the `plan_upload` of ``folder`` when the caller has it already (`internvlx push` prints it), so that
            the folder, an adapter's config and its card are read once.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder; pass the checkpoint folder to publish.")
    problems: list[Problem] = []
    plan = plan or plan_upload(folder, include_checkpoints)
    problems += _check_pickles(plan.files)
    problems += _check_card(folder, repo_id)
    problems += _check_provenance(folder)
    configs = _read_configs(folder, problems)
    problems += _check_remote_code(folder, configs)
    if plan.adapter is not None:
        problems += _check_adapter(folder, plan.adapter)
        return problems
    config_problems = _check_model_config(folder, configs)
    problems += config_problems
    problems += _check_tokenizer_and_processor(folder, configs)
    # Shapes are compared with the model config.json builds, which a damaged config.json cannot.
    problems += _check_weights(folder, None if config_problems else configs.get("config.json"))
    return problems


# ------------------------------------------------------------------------------------------------------- files


def _check_pickles(files: list[str]) -> list[Problem]:
    """Pickles among the files that would be uploaded (the Trainer's own state is never uploaded)."""
    return [Problem(name, "a pickle file (loading it can run arbitrary code); convert it to safetensors "
                          "(`internvlx convert`, or save_pretrained) and delete it.")
            for name in files if Path(name).suffix.lower() in PICKLE_SUFFIXES]


def _check_card(folder: Path, repo_id: str | None) -> list[Problem]:
    card = folder / "README.md"
    if not card.is_file():
        return [Problem("README.md", "no model card; write one with `internvlx card " f"{folder} --license ID`.")]
    if repo_id is None:
        return []
    from .card import snippet_model_ids

    wrong = [model_id for model_id in snippet_model_ids(card.read_text(encoding="utf-8")) if model_id != repo_id]
    if wrong:
        return [Problem("README.md", f"the usage snippet loads {wrong[0]!r}, not {repo_id!r}; rewrite the card with "
                                     f"`internvlx card {folder} --repo-id {repo_id} --license ID --overwrite`.")]
    return []


def _check_provenance(folder: Path) -> list[Problem]:
    from ..provenance import PROVENANCE_FILE, read_provenance

    try:
        read_provenance(folder)
    except ValueError as error:
        return [Problem(PROVENANCE_FILE, " ".join(str(error).split()))]
    return []


def _read_configs(folder: Path, problems: list[Problem]) -> dict[str, dict[str, Any]]:
    configs = {}
    for name in (*_CONFIG_FILES_WITH_AUTO_MAP, "adapter_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            problems.append(Problem(name, f"not valid JSON {json_error_text(error)}; restore it or save the model "
                                          "again."))
            continue
        except UnicodeDecodeError:
            problems.append(Problem(name, "not UTF-8 text; restore it or save the model again."))
            continue
        if not isinstance(data, dict):
            problems.append(Problem(name, "must hold a JSON object; restore it or save the model again."))
            continue
        configs[name] = data
    return configs


# ------------------------------------------------------------------------------------------------- remote code


def _auto_maps(data: Any, depth: int = 0) -> list[dict[str, Any]]:
    """Every ``auto_map`` dict in a config (processor configs nest one per sub-processor)."""
    if depth > 3 or not isinstance(data, dict):
        return []
    found = [data["auto_map"]] if isinstance(data.get("auto_map"), dict) else []
    for value in data.values():
        found += _auto_maps(value, depth + 1)
    return found


def _references(configs: dict[str, dict[str, Any]]) -> list[tuple[str, str, str]]:
    """``(config file, module, class)`` for every local class reference of every auto_map."""
    refs = []
    for name, data in configs.items():
        for auto_map in _auto_maps(data):
            for value in auto_map.values():
                for ref in value if isinstance(value, (list, tuple)) else [value]:
                    if not isinstance(ref, str) or "--" in ref or "." not in ref:
                        continue  # None (no slow/fast variant) or a class in another repository
                    module, _, cls = ref.rpartition(".")
                    refs.append((name, module, cls))
    return list(dict.fromkeys(refs))


def _check_remote_code(folder: Path, configs: dict[str, dict[str, Any]]) -> list[Problem]:
    problems = []
    needed: dict[str, str] = {}  # module file -> who needs it
    classes: dict[str, set[str]] = {}
    for config_name, module, cls in _references(configs):
        needed.setdefault(f"{module.replace('.', '/')}.py", f"{config_name} auto_map")
        classes.setdefault(f"{module.replace('.', '/')}.py", set()).add(cls)
    seen: set[str] = set()
    while needed:
        file, wanted_by = needed.popitem()
        if file in seen:
            continue
        seen.add(file)
        path = folder / file
        if not path.is_file():
            problems.append(Problem(file, f"missing remote-code file (needed by {wanted_by}); save the model and "
                                          "processor with save_pretrained, which copies it, or copy it from the "
                                          "internvlx_hf package."))
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=file)
        except (SyntaxError, UnicodeDecodeError) as error:
            problems.append(Problem(file, f"cannot be parsed as Python ({error}); restore it."))
            continue
        defined = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        for cls in sorted(classes.get(file, set()) - defined):
            problems.append(Problem(file, f"defines no class {cls!r}, which {wanted_by} names; restore the file."))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            elif isinstance(node, ast.ImportFrom) and node.level == 1:
                siblings = [node.module] if node.module else [alias.name for alias in node.names]
                for sibling in siblings:
                    needed.setdefault(f"{sibling.replace('.', '/')}.py", file)
                continue
            else:
                continue
            for module in modules:
                if module.split(".")[0] == "internvlx_hf":
                    problems.append(Problem(file, f"imports {module!r} (line {node.lineno}), which machines loading "
                                                  "the checkpoint do not have; remote code may import only torch, "
                                                  "transformers, PIL, the standard library and its sibling files."))
    return problems


# ------------------------------------------------------------------------------------------ configs and tokenizer


def _check_model_config(folder: Path, configs: dict[str, dict[str, Any]]) -> list[Problem]:
    config = configs.get("config.json")
    if config is None and (folder / "config.json").is_file():
        return []  # there, but not a JSON object: _read_configs said so
    if config is None:
        return [Problem("config.json", "missing; save the model with save_pretrained (or `internvlx convert`).")]
    if config.get("model_type") != "internvlx":
        return [Problem("config.json", f"model_type is {config.get('model_type')!r}, not 'internvlx'; convert the "
                                       "checkpoint with `internvlx convert`.")]
    problem = config_key_problem(config)
    if problem is not None:
        return [Problem("config.json", f"{problem}; {DAMAGED_HINT}.")]
    auto_map = config.get("auto_map") or {}
    missing = [key for key in ("AutoConfig", "AutoModel") if key not in auto_map]
    if missing:
        return [Problem("config.json", f"auto_map lacks {', '.join(missing)}, so trust_remote_code=True cannot find "
                                       "the classes; save the model again with save_pretrained.")]
    return []


def _check_tokenizer_and_processor(folder: Path, configs: dict[str, dict[str, Any]]) -> list[Problem]:
    problems = []
    if "tokenizer_config.json" not in configs or not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        problems.append(Problem(".", "no tokenizer (tokenizer_config.json with tokenizer.json or tokenizer.model); "
                                     "save the processor (or tokenizer) into the folder with save_pretrained."))
    processor = configs.get("processor_config.json") or configs.get("preprocessor_config.json")
    if processor is None:
        problems.append(Problem(".", "no processor config (processor_config.json); save the processor into the "
                                     "folder with save_pretrained (`internvlx convert` does)."))
    elif not any("AutoProcessor" in auto_map for auto_map in _auto_maps(processor)):
        name = "processor_config.json" if "processor_config.json" in configs else "preprocessor_config.json"
        problems.append(Problem(name, "its auto_map has no AutoProcessor entry, so AutoProcessor.from_pretrained("
                                      "..., trust_remote_code=True) cannot find the processor; save the processor "
                                      "again with save_pretrained."))
    return problems


# ------------------------------------------------------------------------------------------------------ weights


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header (no tensor data is read)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(size - 8, 100_000_000):
            raise ValueError("header length beyond the end of the file")
        header = json.loads(handle.read(length))
    return {name: tuple(info["shape"]) for name, info in header.items() if name != "__metadata__"}


def _check_weights(folder: Path, config: dict[str, Any] | None) -> list[Problem]:
    problems = []
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files: list[Path] = []
    for index in indexes:
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
            problems.append(Problem(index.name, f"not a valid index ({type(error).__name__}: {error}); save again."))
            continue
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                tensors = sum(1 for v in weight_map.values() if v == shard)
                problems.append(Problem(index.name, f"names the shard {shard} ({tensors} tensors), which is "
                                                    "missing; copy it into the folder or save the model again."))
            else:
                files.append(folder / shard)
    if not indexes:
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else \
            sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("adapter_model"))
        if not files:
            problems.append(Problem(".", "no weights (model.safetensors, or shards with a "
                                         "model.safetensors.index.json); save the model with save_pretrained."))
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        try:
            shapes.update(safetensors_shapes(path))
        except (ValueError, OSError, KeyError, TypeError) as error:
            problems.append(Problem(path.name, f"not a readable safetensors file ({error}); save the model again."))
    if not shapes or config is None or config.get("model_type") != "internvlx":
        return problems
    label = indexes[0].name if indexes else files[0].name if len(files) == 1 else "*.safetensors"
    # With a shard missing (reported above), its tensors are missing too; say it once.
    return problems + _check_shapes(folder, shapes, label, report_missing=not problems)


def expected_shapes(folder: Path) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """Parameter/buffer shapes of the model config.json describes (built on the meta device), and the names that
    may be absent because they are tied to another tensor."""
    import torch

    from ..modeling import InternVLXConfig, InternVLXForConditionalGeneration

    config = InternVLXConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = InternVLXForConditionalGeneration(config)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}, tied


def _check_shapes(folder: Path, shapes: dict[str, tuple[int, ...]], label: str,
                  report_missing: bool = True) -> list[Problem]:
    try:
        expected, tied = expected_shapes(folder)
    except (ValueError, TypeError, KeyError) as error:
        return [Problem("config.json", f"does not describe a valid model ({' '.join(str(error).split())}).")]
    problems = []
    missing = sorted(set(expected) - set(shapes) - tied)
    unexpected = sorted(set(shapes) - set(expected))
    mismatched = sorted(name for name in set(expected) & set(shapes) if expected[name] != shapes[name])

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    if mismatched:
        examples = some([f"{n} {list(shapes[n])} (config: {list(expected[n])})" for n in mismatched])
        problems.append(Problem(label, f"{len(mismatched)} tensor(s) do not match config.json's shapes: {examples}; "
                                "the weights and config.json come from different models."))
    if missing and report_missing:
        problems.append(Problem(label, f"{len(missing)} tensor(s) of the model are missing: {some(missing)}; save "
                                "the model again."))
    if unexpected:
        problems.append(Problem(label, f"{len(unexpected)} tensor(s) are not part of the model config.json describes:"
                                f" {some(unexpected)}; the weights and config.json come from different models."))
    return problems


def _check_adapter(folder: Path, adapter: AdapterBase) -> list[Problem]:
    problems = []
    if not (folder / "adapter_model.safetensors").is_file():
        problems.append(Problem("adapter_model.safetensors", "missing; save the adapter with "
                                                             "save_pretrained(safe_serialization=True)."))
    if adapter.config is None:
        return problems  # already reported by _read_configs
    if (adapter.own, adapter.card) == (None, None):
        problems.append(Problem("adapter_config.json", f"base_model_name_or_path is {adapter.declared!r}, not a Hub "
                                                       "id, and the "
                                                       "card names no base_model, so PeftModel cannot find the base "
                                                       "model; write the card with `internvlx card "
                                                       f"{folder} --base-model OWNER/NAME --license ID --overwrite` "
                                                       "(push uploads adapter_config.json with that id)."))
    return problems


__all__ = ["PICKLE_SUFFIXES", "PreflightError", "Problem", "adapter_bases", "expected_shapes", "preflight",
           "safetensors_shapes"]
