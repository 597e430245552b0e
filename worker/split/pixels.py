"""Pixels between processes through shared memory, never pickled.

An intake process writes each large tensor of a prepared item into a shared-memory block of its
own (``Arena``; blocks are reused once the item's answer is back) and sends a ``ShmTensor``
(the block's name, shape and dtype) in its place; the model process maps the block and reads
the tensor where it lies (``Attached``): one copy in the intake process, none on the way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections import defaultdict
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import torch

MIN_SHARED_BYTES = 16 * 1024
"""Tensors at least this large travel through shared memory; smaller ones are pickled."""


@dataclass(frozen=True, slots=True)
class ShmTensor:
    """A tensor that lies in a shared-memory block (by name)."""

    block: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        itemsize: int = getattr(torch, self.dtype).itemsize
        return math.prod(self.shape) * itemsize


class Arena:
    """An intake process's shared-memory blocks, by size; a block is reused once released."""

    def __init__(self) -> None:
        self._free: defaultdict[int, list[SharedMemory]] = defaultdict(list)
        self._all: list[SharedMemory] = []
        self._lock = threading.Lock()
        self.bytes_shared = 0
        """Bytes written into shared memory (one copy per tensor, in this process)."""

    def pack(self, item: Any) -> tuple[Any, list[SharedMemory]]:
        """The item with its large tensor fields moved to shared memory, and the blocks used."""
        if not dataclasses.is_dataclass(item) or isinstance(item, type):
            return item, []
        blocks: list[SharedMemory] = []
        changes: dict[str, ShmTensor] = {}
        for field in dataclasses.fields(item):
            value = getattr(item, field.name)
            if isinstance(value, torch.Tensor) and value.nbytes >= MIN_SHARED_BYTES:
                ref, block = self._put(value)
                changes[field.name] = ref
                blocks.append(block)
        if not changes:
            return item, []
        return dataclasses.replace(item, **changes), blocks  # type: ignore[type-var]

    def _put(self, tensor: torch.Tensor) -> tuple[ShmTensor, SharedMemory]:
        size = tensor.nbytes
        with self._lock:
            block = self._free[size].pop() if self._free[size] else None
        if block is None:
            block = SharedMemory(create=True, size=size)
            with self._lock:
                self._all.append(block)
        view = torch.frombuffer(block.buf, dtype=tensor.dtype, count=tensor.numel())
        view.view(tensor.shape).copy_(tensor)
        del view
        self.bytes_shared += size
        dtype = str(tensor.dtype).removeprefix("torch.")
        return ShmTensor(block.name, tuple(tensor.shape), dtype), block

    def release(self, blocks: list[SharedMemory]) -> None:
        with self._lock:
            for block in blocks:
                self._free[block.size].append(block)

    def close(self) -> None:
        with self._lock:
            blocks, self._all = self._all, []
            self._free.clear()
        for block in blocks:
            with contextlib.suppress(BufferError):  # a view remains: freed at exit
                block.close()
            block.unlink()


class Attached:
    """The model process's side: blocks of one intake process, mapped once and kept."""

    def __init__(self, *, creator_elsewhere: bool = True) -> None:
        self._blocks: dict[str, SharedMemory] = {}
        self._creator_elsewhere = creator_elsewhere
        """False when this process created the blocks too (one process: a test)."""

    def unpack(self, item: Any) -> Any:
        if not dataclasses.is_dataclass(item) or isinstance(item, type):
            return item
        changes = {
            field.name: self._tensor(value)
            for field in dataclasses.fields(item)
            if isinstance(value := getattr(item, field.name), ShmTensor)
        }
        return dataclasses.replace(item, **changes) if changes else item  # type: ignore[type-var]

    def _tensor(self, ref: ShmTensor) -> torch.Tensor:
        block = self._blocks.get(ref.block)
        if block is None:
            block = SharedMemory(name=ref.block)
            # Python 3.11 registers attached blocks too, and would unlink them at this process's
            # exit: the intake process that created a block owns it.
            if self._creator_elsewhere:
                resource_tracker.unregister(block._name, "shared_memory")  # type: ignore[attr-defined]
            self._blocks[ref.block] = block
        dtype = getattr(torch, ref.dtype)
        flat = torch.frombuffer(block.buf, dtype=dtype, count=math.prod(ref.shape))
        return flat.view(ref.shape)

    def close(self) -> None:
        for block in self._blocks.values():
            # A tensor that still maps it: the OS unmaps it at exit.
            with contextlib.suppress(BufferError):
                block.close()
        self._blocks.clear()


class Stager:
    """The model process on CUDA: an item's ``pixel_values`` go to the GPU as the item arrives,
    on a stream of their own, so that copy overlaps the batch the model thread is running (the
    next batch's host-to-device copy runs during this one's pass). Elsewhere it does nothing."""

    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        self.device = device
        self.dtype = dtype
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def stage(self, item: Any) -> Any:
        pixels = getattr(item, "pixel_values", None)
        if self.stream is None or not isinstance(pixels, torch.Tensor) or pixels.is_cuda:
            return item
        with torch.cuda.stream(self.stream):
            moved = pixels.to(self.device, self.dtype, non_blocking=True)
        # The model thread reads it on its own stream: the allocator must not hand the memory to
        # this stream again before that read is done.
        moved.record_stream(torch.cuda.current_stream(self.device))
        self.stream.synchronize()  # this connection's thread waits, not the model thread
        return dataclasses.replace(item, pixel_values=moved)
