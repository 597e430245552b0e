"""Pixels cross from an intake process to the model process through shared memory, unpickled."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from producer.protocol.jobs import CaptionJob
from worker.split.pixels import Arena, Attached, ShmTensor


@dataclass(frozen=True, slots=True)
class Item:
    pixels: torch.Tensor
    ids: torch.Tensor
    job: CaptionJob


def test_large_tensors_go_through_shared_memory_and_arrive_equal() -> None:
    arena, attached = Arena(), Attached(creator_elsewhere=False)
    pixels = torch.randn(3, 384, 384)
    item = Item(pixels, torch.tensor([1, 2, 3]), CaptionJob(image="s3://bucket/k.jpg", model="m"))
    try:
        packed, blocks = arena.pack(item)
        assert isinstance(packed.pixels, ShmTensor) and len(blocks) == 1
        assert torch.equal(packed.ids, item.ids)  # small: pickled as it is
        wire = pickle.dumps(packed)
        # BLIP-base's 1.77 MB of pixels are not in the message: the job and a reference are.
        assert pixels.nbytes == 1_769_472 and len(wire) < 4_000
        arrived = attached.unpack(pickle.loads(wire))
        assert torch.equal(arrived.pixels, pixels) and arrived.job == item.job
        assert arena.bytes_shared == pixels.nbytes
        arena.release(blocks)
        again, reused = arena.pack(Item(pixels * 2, item.ids, item.job))
        assert reused[0].name == blocks[0].name  # a released block is used again
        assert torch.equal(attached.unpack(again).pixels, pixels * 2)
    finally:
        attached.close()
        arena.close()


def test_items_without_large_tensors_pass_as_they_are() -> None:
    arena = Arena()
    item = Item(torch.zeros(2), torch.zeros(1), CaptionJob(image="s3://bucket/k.jpg", model="m"))
    assert arena.pack(item) == (item, [])
    assert arena.pack("not a dataclass") == ("not a dataclass", [])
    arena.close()


def test_an_intake_process_without_its_model_process_ends(tmp_path: Path) -> None:
    from worker.split.remote import RemoteModel

    model = RemoteModel(str(tmp_path / "nobody.sock"), connect_s=0.3)
    with pytest.raises(SystemExit, match="no model process answered"):
        model.start()
    model.stop(timeout=1)


def test_small_tensors_reach_a_process_that_is_not_a_child() -> None:
    """A question's token ids stay in the message: they must arrive by value in the model
    process, which multiprocessing's own pickler (file descriptors) cannot reach."""
    import subprocess
    import sys

    from worker.split.remote import dumps

    arena = Arena()
    item = Item(torch.zeros(2), torch.tensor([101, 2054, 102]), CaptionJob(image="s3://bkt/k.jpg"))
    packed, _ = arena.pack(item)
    read = "import pickle, sys; print(pickle.loads(sys.stdin.buffer.read())[3].ids.tolist())"
    out = subprocess.run(
        [sys.executable, "-c", read],
        input=dumps(("submit", 0, ("m",), packed)),
        capture_output=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=120,
    )
    assert out.stdout.decode().strip() == "[101, 2054, 102]"
    arena.close()
