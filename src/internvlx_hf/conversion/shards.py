"""Streaming safetensors I/O: read source tensors one at a time, write output shards one tensor at a time.

The converter knows every output tensor's name, dtype and shape before it reads any data (safetensors headers,
or the memory-mapped pickles, give shapes for free). So each output shard's header can be written first and the
tensor bytes appended as they are produced: the writer never holds more than the tensor in hand, and peak memory
stays near the largest tensor (plus the pages of the source shard being read), whatever the checkpoint size.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError, read_json_file

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_WEIGHTS_NAME = "pytorch_model.bin"
PICKLE_WEIGHTS_INDEX_NAME = "pytorch_model.bin.index.json"

# safetensors dtype tags (https://github.com/huggingface/safetensors, format spec).
_DTYPE_TO_ST = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_ST_TO_DTYPE = {tag: dtype for dtype, tag in _DTYPE_TO_ST.items()}


def dtype_from_safetensors(tag: str, where: str = "a tensor") -> torch.dtype:
    try:
        return _ST_TO_DTYPE[tag]
    except KeyError:
        supported = ", ".join(sorted(_ST_TO_DTYPE))
        raise ConversionError(
            f"{where} has the safetensors dtype {tag!r}, which the converter does not read (supported: {supported}); "
            "save that tensor in one of those dtypes (e.g. bfloat16) first."
        ) from None


def _corrupt(path: Path, reason: str) -> ConversionError:
    return ConversionError(
        f"{path} is not a valid safetensors file: {reason}. The download is probably incomplete or corrupt; "
        "download this file again from the original checkpoint."
    )


def nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------------------------------ reading


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype


class SourceShard:
    """One weight file of the source checkpoint (safetensors, or a pickle when explicitly allowed)."""

    def __init__(self, path: Path, allow_pickle: bool):
        self.path = path
        self.is_pickle = path.suffix != ".safetensors"
        if self.is_pickle and not allow_pickle:
            raise ConversionError(
                f"{path} is a pickle; loading pickles can run arbitrary code. Pass --allow-pickle "
                "(allow_pickle=True) to read it with torch.load(weights_only=True), or convert it to safetensors first."
            )

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes without reading tensor data (file order).

        A safetensors header is checked against the file before anything is converted: every tensor's byte range
        must match its dtype and shape, the ranges must tile the data section, and the file must be exactly as
        long as the header says (a truncated download fails here, not halfway through the conversion).
        """
        if self.is_pickle:
            state = self._load_pickle()
            infos = {key: TensorInfo(tuple(t.shape), t.dtype) for key, t in state.items()}
            del state
            return infos
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as handle:
                if size < 8:
                    raise _corrupt(self.path, "the file is empty" if size == 0 else f"the file has only {size} bytes")
                (length,) = struct.unpack("<Q", handle.read(8))
                if length > size - 8:
                    raise _corrupt(self.path, f"its header length ({length} bytes) exceeds the file ({size} bytes)")
                header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _corrupt(self.path, f"its header is not JSON ({error})") from None
        except OSError as error:
            raise ConversionError(f"cannot read {self.path} ({error.strerror or error}); check that it is a readable "
                                  "file.") from None
        if not isinstance(header, dict):
            raise _corrupt(self.path, "its header is not a JSON object")
        header.pop("__metadata__", None)
        infos, ranges = {}, []
        for key, meta in header.items():
            try:
                shape = tuple(int(n) for n in meta["shape"])
                start, end = (int(n) for n in meta["data_offsets"])
                tag = meta["dtype"]
            except (KeyError, TypeError, ValueError):
                raise _corrupt(self.path, f"the header entry of tensor {key!r} is malformed ({meta!r})") from None
            dtype = dtype_from_safetensors(tag, where=f"tensor {key!r} of {self.path}")
            if min(shape, default=0) < 0 or end - start != nbytes(shape, dtype) or start < 0:
                raise _corrupt(self.path, f"tensor {key!r} ({tag} {list(shape)}) has the byte range [{start}, {end}), "
                                          "which does not fit its dtype and shape")
            infos[key] = TensorInfo(shape, dtype)
            ranges.append((start, end, key))
        ranges.sort()
        position = 0
        for start, end, key in ranges:
            if start != position:
                raise _corrupt(self.path, f"the data of tensor {key!r} starts at byte {start}, expected {position} "
                                          "(overlapping or gapped tensors)")
            position = end
        expected_size = 8 + length + position
        if size != expected_size:
            state = "truncated" if size < expected_size else "longer than its header says"
            raise _corrupt(self.path, f"it is {state} ({size} bytes, the header describes {expected_size})")
        return {key: infos[key] for _, _, key in ranges}

    def iter_tensors(self, keys: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` one at a time; the file is closed (unmapped) when the iteration ends."""
        if self.is_pickle:
            state = self._load_pickle()
            try:
                for key in keys:
                    yield key, state[key]
            finally:
                del state
            return
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                for key in keys:
                    yield key, handle.get_tensor(key)
        except (SafetensorError, OSError) as error:  # the file changed since its header was checked
            raise _corrupt(self.path, f"reading it failed ({error})") from None

    def _load_pickle(self) -> dict[str, torch.Tensor]:
        import pickle

        def load(mmap: bool):
            return torch.load(self.path, map_location="cpu", weights_only=True, mmap=mmap)

        try:
            try:
                # mmap keeps the pickle's storages on disk until touched (zipfile format); older files need a
                # full load.
                state = load(mmap=True)
            except RuntimeError:
                state = load(mmap=False)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, AttributeError) as error:
            # weights_only refuses anything but tensors and plain containers; a corrupt file fails to unpickle
            raise ConversionError(
                f"cannot load {self.path} with torch.load(weights_only=True) ({_unpickling_reason(error)}); the file "
                "is corrupt or holds more than tensors. Download it again, or convert the original to safetensors."
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConversionError(f"{self.path} does not hold a flat state dict of tensors")
        return state


def _unpickling_reason(error: BaseException) -> str:
    """The cause inside torch.load's long weights_only message (which otherwise suggests weights_only=False)."""
    text = str(error)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, flags=re.S)
    reason = match.group(1) if match else (text.strip().splitlines() or [type(error).__name__])[0]
    return " ".join(reason.split()).split(". Please use")[0]


def find_weight_files(src: Path, allow_pickle: bool) -> list[SourceShard]:
    """The weight files of an OpenGVLab-layout folder, safetensors first (index, then a single file)."""
    for index_name, single_name in ((SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME),
                                    (PICKLE_WEIGHTS_INDEX_NAME, PICKLE_WEIGHTS_NAME)):
        index_path = src / index_name
        if index_path.is_file():
            index = read_json_file(index_path, "weight index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ConversionError(
                    f"{index_path} has no weight_map of tensor name -> file name; copy the index again from the "
                    "original checkpoint."
                )
            names = sorted(set(weight_map.values()))
            missing = [name for name in names if not (src / name).is_file()]
            if missing:
                raise ConversionError(
                    f"{index_path} lists weight files that are not in {src}: {missing}; download the complete "
                    "checkpoint (every shard the index names)."
                )
            if not names:
                raise ConversionError(f"{index_path} has an empty weight_map")
            return [SourceShard(src / name, allow_pickle) for name in names]
        if (src / single_name).is_file():
            return [SourceShard(src / single_name, allow_pickle)]
    raise ConversionError(
        f"no weights in {src}: expected {SAFE_WEIGHTS_NAME}, {SAFE_WEIGHTS_INDEX_NAME} (+ shards), "
        f"or with --allow-pickle {PICKLE_WEIGHTS_NAME} / {PICKLE_WEIGHTS_INDEX_NAME}."
    )


# ------------------------------------------------------------------------------------------------------------ writing


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return nbytes(self.shape, self.dtype)


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Split the ordered tensor list into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards if shards[-1] else []


def shard_file_names(num_shards: int) -> list[str]:
    if num_shards == 1:
        return [SAFE_WEIGHTS_NAME]
    return [f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors" for i in range(num_shards)]


class StreamingSafetensorsWriter:
    """Write a known list of tensors into safetensors shards, strictly in order, one tensor at a time.

    ``write`` must be called with the tensors in the order given to the constructor; it checks names, shapes and
    dtypes against the plan, so a bug cannot produce a file whose header disagrees with its data.
    """

    def __init__(self, directory: Path, tensors: list[OutputTensor], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        self.directory = Path(directory)
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.file_names = shard_file_names(len(self.shards))
        self.metadata = {"format": "pt", **(metadata or {})}
        self._order = [(shard_index, spec) for shard_index, shard in enumerate(self.shards) for spec in shard]
        self._position = 0
        self._handle = None
        self._shard_index = -1

    @property
    def total_bytes(self) -> int:
        return sum(spec.nbytes for _, spec in self._order)

    @property
    def weight_map(self) -> dict[str, str]:
        return {spec.name: self.file_names[i] for i, spec in self._order}

    def _open_shard(self, shard_index: int) -> None:
        self._close_handle()
        header: dict[str, dict] = {}
        offset = 0
        for spec in self.shards[shard_index]:
            header[spec.name] = {
                "dtype": _DTYPE_TO_ST[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        header["__metadata__"] = self.metadata
        encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
        encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
        self._handle = open(self.directory / self.file_names[shard_index], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)))
        self._handle.write(encoded)
        self._shard_index = shard_index

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._position >= len(self._order):
            raise RuntimeError(f"unexpected tensor {name!r}: every planned tensor was already written")
        shard_index, spec = self._order[self._position]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise RuntimeError(
                f"tensor out of plan: got {name} {tuple(tensor.shape)} {tensor.dtype}, expected {spec.name} "
                f"{spec.shape} {spec.dtype}"
            )
        if shard_index != self._shard_index:
            self._open_shard(shard_index)
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        if data.numel():
            # Little-endian bytes, as safetensors stores them; a uint8 view avoids numpy's missing bfloat16.
            data.view(torch.uint8).numpy().tofile(self._handle)
        self._position += 1

    def close(self) -> list[str]:
        """Finish the last shard; write the index when there is more than one shard. Returns the file names."""
        if self._position != len(self._order):
            missing = [spec.name for _, spec in self._order[self._position:]][:5]
            raise RuntimeError(f"{len(self._order) - self._position} planned tensors were not written, e.g. {missing}")
        self._close_handle()
        if len(self.file_names) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
            with open(self.directory / SAFE_WEIGHTS_INDEX_NAME, "w", encoding="utf-8") as handle:
                json.dump(index, handle, indent=2, sort_keys=True)
                handle.write("\n")
        return list(self.file_names)

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
