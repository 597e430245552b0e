"""The null model family: every step of a caption job except inference (a benchmark instrument).

Served like any model (``BLIPQ_MODELS='{"null": {"source": "null", "family": "null"}}'``), it
measures what the system itself costs per job: queue, S3 fetch, decode, the resize to the
model's input size, batching, storing and publishing the result. ``prepare`` does the resize the
BLIP runners do (bicubic, to the input size) and keeps nothing but a tiny item;
``run_batch`` returns one empty caption per item at once.

Fault injection (off unless a model map entry sets it; no other family accepts it): with
``"crash_on": "TEXT"`` (``{"drill": {"source": "null", "family": "null", "crash_on": "poison"}}``)
the model thread SIGKILLs its own worker process when a batch holds a job whose image URI contains
TEXT, as a crashing decoder or a CUDA fault would: a real poison job, for drills and tests of
redelivery and dead-lettering.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from PIL import Image

from producer.protocol.jobs import CaptionJob, CaptionOutput
from worker.models.base import ModelRunner
from worker.models.resize import resized_uint8

log = logging.getLogger(__name__)

INPUT_SIZE = 384
"""BLIP-base's input resolution (``BlipImageProcessor`` size), used unless the source names one."""


@dataclass(frozen=True, slots=True)
class NullItem:
    job: CaptionJob
    size: tuple[int, int]  # the resized image's (width, height): proof the resize ran


@dataclass(frozen=True, slots=True)
class NullOutput:
    output: CaptionOutput


class NullRunner(ModelRunner[CaptionJob]):
    """Serves caption jobs with empty captions; costs only the preprocessing's resize."""

    kinds = ("caption",)

    def load_prepare(self) -> None:
        # "null" or "null:224" (another input size); nothing is read from disk.
        _, _, size = self.spec.source.partition(":")
        self.input_size = int(size) if size.isdigit() else INPUT_SIZE

    def load_model(self) -> None:
        """No model."""

    def prepare(self, job: CaptionJob, image: Image.Image) -> NullItem:
        side = self.input_size
        # The resize the BLIP runners do (worker.models.base.pixel_values).
        bicubic = Image.Resampling.BICUBIC
        resized = resized_uint8(image, (side, side), bicubic, exact=self.exact_resize)
        return NullItem(job=job, size=(int(resized.shape[2]), int(resized.shape[1])))

    def input_side(self) -> int | None:
        return self.input_size

    def group_key(self, item: NullItem) -> Hashable:
        job = item.job
        return (self.name, job.prompt, job.max_new_tokens, job.min_new_tokens, job.num_beams)

    def run_batch(self, items: list[NullItem]) -> Sequence[NullOutput]:
        marker = self.spec.crash_on
        if marker is not None and any(marker in item.job.image for item in items):
            log.warning("fault injection: a job's image contains %r; killing this worker", marker)
            os.kill(os.getpid(), signal.SIGKILL)
        return self._outputs(items)

    def _outputs(self, items: list[NullItem]) -> list[NullOutput]:
        return [
            NullOutput(CaptionOutput(caption="", continuation="", prompt=item.job.prompt))
            for item in items
        ]

    def warmup(self) -> None:
        job = CaptionJob(image="s3://warm-up/x.jpg", model=self.name)
        self._outputs([self.prepare(job, Image.new("RGB", (64, 64)))])  # never a fault


class SimRunner(NullRunner):
    """The null family with an emulated accelerator: ``run_batch`` sleeps (the GIL released)
    for ``MS`` milliseconds per batch, as a GPU pass keeps the host waiting while it runs.

    ``{"sim": {"source": "sim:20", "family": "sim", "max_batch_size": 32}}`` emulates a device
    that runs 32 images per 20 ms pass: a capacity of 1600 images/s, against which the
    throughput benchmark (``--sim-model 20:32``) measures what the rest of blipq delivers.
    """

    def load_prepare(self) -> None:
        _, _, ms = self.spec.source.partition(":")
        try:
            self.pass_s = float(ms) / 1000
        except ValueError:
            raise ValueError(
                f"model {self.name!r}: a sim source is 'sim:MS' (milliseconds per batch), "
                f"not {self.spec.source!r}"
            ) from None
        self.input_size = INPUT_SIZE

    def run_batch(self, items: list[NullItem]) -> Sequence[NullOutput]:
        time.sleep(self.pass_s)
        return self._outputs(items)
