"""Stand-in for transformers' ``tests/exporters/test_export.py``, which the source distribution does not ship.

``ModelTesterMixin`` derives from ``ExportTesterMixin`` (torch.export / ExecuTorch checks). InternVL-X is not an
export target (LVTC changes the sequence length between layers, which torch.export would have to trace as a
data-dependent shape), so the stand-in adds no tests.
"""


class ExportTesterMixin:
    """Empty: see the module docstring."""
