"""What inference loads: a checkpoint onto a device (`load_checkpoint`, for `internvlx chat`, `eval` and the
server's device choice) and a video's frames (`load_video_frames`, for `chat` and `demo`).

Below the command line: bad input is a `ValueError` / `FileNotFoundError` / `QuantizationUnavailable` whose one-line
message names the input and the fix (the command line prints it as ``internvlx COMMAND: error: ...``).
"""

from __future__ import annotations

from typing import Any


def device_map_for(name: str) -> str:
    """``from_pretrained``'s device_map for a device name: weights go straight to the device (no CPU copy first);
    "auto" spreads a model over every GPU (accelerate) when there is one, else "cpu"."""
    import torch

    if name == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N, mps or auto.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here; use --device cpu (or auto).")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available here; use --device cpu (or auto).")
    return str(device)


def load_checkpoint(model: str, dtype: str = "auto", device: str = "auto", processor=None,
                    load_in_bits: int | None = None):
    """``(model, processor)`` of a checkpoint folder or Hub id, on ``device``, in eval mode; ``processor``: the
    checkpoint's processor when the caller has loaded it already.

    ``load_in_bits`` 4 or 8: the weights are quantized while loading (bitsandbytes, `internvlx_hf.quantization`:
    projectors and lm_head stay in ``dtype``); 4-bit layers then compute in ``dtype`` (float32 for auto). A missing
    bitsandbytes is `QuantizationUnavailable` (one line naming the extra; the commands check it before any work).
    """
    import torch
    from transformers import AutoModel, AutoProcessor

    from .hub.resolve import read_internvlx_config, resolve_model
    from .quantization import check_kept_modules, quantized_loading_kwargs

    device_map = device_map_for(device)
    path = resolve_model(model)
    read_internvlx_config(path, f"MODEL {str(model)!r}")
    what = None if load_in_bits is None else f"--load-in-{load_in_bits}bit"
    kwargs = quantized_loading_kwargs(path, load_in_bits, dtype, what=what,
                                      device=None if device_map == "auto" else device_map)
    if processor is None:
        processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    loaded = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch_dtype, device_map=device_map,
                                       **kwargs).eval()
    if load_in_bits is not None:
        check_kept_modules(loaded, kwargs["quantization_config"].llm_int8_skip_modules)
    return loaded, processor


def load_video_frames(path: str, frames: int, bound: tuple[float, float] | None = None) -> list[Any]:
    """``frames`` frames of the video file or frame folder ``path`` (at the centres of equal segments of the video,
    or of ``bound``, seconds), as InternVL2's load_video takes them; a missing file, an unreadable video or a missing
    PyAV is a `ValueError` naming the video."""
    from .processing.video import load_video

    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    try:
        return load_video(path, num_segments=frames, bound=bound)
    except (OSError, ImportError) as error:
        raise ValueError(str(error)) from None


__all__ = ["device_map_for", "load_checkpoint", "load_video_frames"]
