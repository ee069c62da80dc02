"""Stand-in for transformers' ``tests/generation/test_utils.py``, which the source distribution does not ship.

``tests/test_modeling_common.py`` imports ``GenerationTesterMixin`` from it at module level; with this stand-in the
module imports and ``ModelTesterMixin`` can run. ``GenerationTesterMixin`` itself is therefore *not* available from
the sdist: generation conformance (greedy/beam/sampling, cache continuation, assisted and prompt-lookup decoding,
``inputs_embeds``) is covered by this project's own tests in ``tests/test_transformers_conformance.py``,
``tests/test_modeling.py`` and ``tests/test_lvtc.py``.
"""


class GenerationTesterMixin:
    """Empty: its tests live in transformers' git repository only (see the module docstring)."""
