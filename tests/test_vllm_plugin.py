"""The vLLM plugin's parts that need no vLLM: how it is found, that the package does not import vLLM, LVTC's rows."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points
from types import SimpleNamespace

import torch

from internvlx_hf.vllm.layout import LVTCLayout, lvtc_layout_of
from internvlx_hf.vllm.lvtc import lvtc_positions
from tiny import tiny_config


def test_entry_point_names_the_register_function():
    plugins = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert plugins.get("internvlx") == "internvlx_hf.vllm:register"


def test_the_package_and_the_plugin_module_do_not_import_vllm():
    code = ("import sys, internvlx_hf, internvlx_hf.vllm, internvlx_hf.vllm.config_hook; "
            "internvlx_hf.InternVLXConfig; print(sorted(m for m in sys.modules if m.split('.')[0] == 'vllm'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_layout_of_a_config():
    assert lvtc_layout_of(tiny_config()) is None
    assert lvtc_layout_of(tiny_config(lvtc=dict(expand_layer=4), layers=4)) is None  # k = depth: nothing expands
    layout = lvtc_layout_of(tiny_config(lvtc=dict(expand_layer=2), layers=4))
    assert (layout.short_per_tile, layout.long_per_tile, layout.expand_layer) == (4, 16, 2)


def test_lvtc_position_rows():
    """Row 0: long positions; row 1: short positions + the request's unused slots; row 2: -1 - slot in tiles."""
    layout = LVTCLayout(expand_layer=1, short_side=1, long_side=2, upsample_mode="nearest", hr_scale="none",
                        injection_layers=())
    # 2 text tokens, <img>, two tiles of 4 slots (1 LR slot + 3 unused each), </img>, 1 text token
    is_embed = torch.tensor([False] + [True] * 8 + [False])
    feature = SimpleNamespace(mm_position=SimpleNamespace(offset=2, length=10, is_embed=is_embed))
    rows, delta = lvtc_positions(layout, 13, [feature])
    assert delta == 0
    assert rows[0].tolist() == list(range(13))
    # short layout: t t <img> lr lr </img> t = positions 0..6, shifted by the 6 unused slots
    unused = 6
    short = [0, 1, 2, 3, None, None, None, 4, None, None, None, 5, 6]
    real = [i for i, s in enumerate(short) if s is not None]
    assert [rows[1, i].item() - unused for i in real] == [short[i] for i in real]
    assert rows[1, -1].item() == 12  # the last prompt token: its shifted short position is its long one
    assert rows[2].tolist() == [0, 1, 2, -1, -2, -3, -4, -1, -2, -3, -4, 11, 12]
