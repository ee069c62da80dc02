"""Initialisation of the modules an upgrade adds (a new projector type, LVTC projectors, a router).

The paper trains these in its stage 1; the converter only has to start them sensibly and reproducibly:

* everything starts from the model's own `_init_weights` (Linear: N(0, initializer_range^2), zero bias; norms: 1;
  PVTC `cls_scale`: N(0, 1) as the reference draws it), with a fixed seed;
* modules whose output is *added* to the LLM's hidden states (the extra LVTC LR projectors injected before layers
  ``s, s+i, ...`` and the HR projector added to the upsampled states at layer ``k``) get a zero output layer, so the
  upgraded model starts as the source model plus an identity branch: the extra LR injections change nothing and
  layer ``k`` sees the plain upsampled LR states. For an MLP projector that is `linear_2`; for PVTC it is the query
  projections, every attention output projection and every SwiGLU down projection (its output is then exactly 0);
* a replaced main projector (``--projector``) feeds the LLM directly, so it cannot be an identity branch: it keeps
  the model init (its stage-1 training is what aligns it);
* with ``init_lr_from_mlp1`` the extra LR projectors are copies of InternVL2's trained ``mlp1`` instead (they are
  planned as copies of the source tensors and never reach this module);
* a router added to a checkpoint without one (``--add-router``: its pooling, gate and 64-token projector) is drawn as
  its constructors draw it (`ViRRouter.reset_parameters`) and stays off until `--preset vico` trains it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch
from torch import nn

ZERO_INIT_RULES = {
    "mlp": (r"linear_2\.(weight|bias)",),
    "pvtc": (
        r"(local|global)_query\.proj\.weight",
        r"(local|global)_layers\.\d+\.attn\.o_proj\.weight",
        r"(local|global)_layers\.\d+\.mlp\.down_proj\.weight",
    ),
}
_RESIDUAL_MODULES = (r"model\.lvtc_lr_projectors\.\d+", r"model\.lvtc_hr_projector")


def _owning_module(name: str) -> str:
    for pattern in (r"model\.lvtc_lr_projectors\.\d+", r"model\.lvtc_hr_projector", r"model\.multi_modal_projector",
                    r"model\.vir"):
        match = re.match(pattern + r"\.", name)
        if match:
            return match.group(0)[:-1]
    raise ValueError(f"{name} is not in a module the converter may initialise")


def describe_init(module_name: str) -> str:
    """One line for the summary: how the parameters of ``module_name`` were initialised."""
    if any(re.fullmatch(p, module_name) for p in _RESIDUAL_MODULES):
        return "model init, output layer zeroed (starts as an identity branch)"
    if module_name == "model.vir":
        return "an untrained router and 64-token projector, off until trained (--preset vico)"
    return "model init (_init_weights)"


def group_new_parameters(names: list[str]) -> dict[str, list[str]]:
    """Owning module -> its new parameter names, in model order."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(_owning_module(name), []).append(name)
    return groups


def initialise_new_parameters(meta_model: nn.Module, names: list[str], projector_types: dict[str, str],
                              dtype_of: dict[str, torch.dtype], seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every name in ``names`` (parameters of ``meta_model``, built on the meta device).

    ``projector_types`` maps each owning module ("model.lvtc_hr_projector", ...) to "mlp" or "pvtc". One module is
    materialised at a time and put back on the meta device afterwards, so memory stays at one projector.
    """
    wanted = set(names)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name, members in group_new_parameters(names).items():
            module = meta_model.get_submodule(module_name)
            module.to_empty(device="cpu")
            with torch.no_grad():
                if module_name == "model.vir":  # as its constructors draw it (some parameters no Linear holds)
                    module.reset_parameters()
                for submodule in module.modules() if module_name != "model.vir" else ():
                    meta_model._init_weights(submodule)
                if any(re.fullmatch(p, module_name) for p in _RESIDUAL_MODULES):
                    rules = ZERO_INIT_RULES[projector_types[module_name]]
                    for local_name, parameter in module.named_parameters():
                        if any(re.fullmatch(rule, local_name) for rule in rules):
                            parameter.zero_()
            parameters = dict(module.named_parameters())
            for name in members:
                if name in wanted:
                    tensor = parameters[name[len(module_name) + 1:]].detach()
                    yield name, tensor.to(dtype_of[name]).clone()
            module.to("meta")
