from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine import configure_process
from worker.models.registry import served_kinds
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(
        json.dumps({"architectures": ["BlipForConditionalGeneration"]})
    )
    monkeypatch.setenv("BLIPQ_MODELS", json.dumps({"mine": str(tmp_path)}))
    monkeypatch.setenv("BLIPQ_SERVE", "mine, caption-large")
    monkeypatch.setenv("BLIPQ_MAX_BATCH_SIZE", "32")
    monkeypatch.setenv("BLIPQ_S3_ALLOWED_BUCKETS", "a-bucket,b-bucket")
    settings = Settings()
    assert settings.serve == ["mine", "caption-large"]
    assert [s.family for s in settings.served()] == ["caption", "caption"]
    assert settings.model_map()["caption-large"].source == "Salesforce/blip-image-captioning-large"
    assert settings.s3_allowed_buckets == ["a-bucket", "b-bucket"]
    assert settings.worker_concurrency == 68
    assert served_kinds(settings.served()) == ["caption"]


def test_defaults_point_at_the_real_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("BLIPQ_MODELS", "BLIPQ_SERVE"):
        monkeypatch.delenv(name, raising=False)
    spec = Settings().served()[0]
    assert (spec.name, spec.source) == ("caption-base", "Salesforce/blip-image-captioning-base")


def test_serving_an_unknown_model_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPQ_SERVE", "nope")
    with pytest.raises(ValueError, match="BLIPQ_MODELS"):
        Settings()


def test_producer_imports_neither_torch_nor_worker() -> None:
    code = (
        "import sys, producer, producer.cli, producer.client, producer.cli.embedded,"
        " producer.cli.demo;"
        "heavy = ('torch', 'transformers', 'worker', 'PIL');"
        "bad = [m for m in sys.modules if m.split('.')[0] in heavy];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_no_module_under_producer_mentions_worker() -> None:
    for path in (REPO / "producer").rglob("*.py"):
        for line in path.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import worker", "from worker")), (path, line)


def test_the_worker_process_hands_the_gil_over_at_the_configured_interval() -> None:
    before = sys.getswitchinterval()
    try:
        configure_process(Settings(gil_switch_interval_ms=0.7))
        assert sys.getswitchinterval() == pytest.approx(0.0007)
        configure_process(Settings())
        assert sys.getswitchinterval() == pytest.approx(0.0005)
    finally:
        sys.setswitchinterval(before)


def test_celery_logs_every_task_only_when_asked() -> None:
    import logging

    from worker.celery.app import quiet_task_logs

    loggers = [logging.getLogger(n) for n in ("celery.app.trace", "celery.worker.strategy")]
    before = [logger.level for logger in loggers]
    try:
        quiet_task_logs(Settings())
        assert all(not logger.isEnabledFor(logging.INFO) for logger in loggers)
        assert all(logger.isEnabledFor(logging.WARNING) for logger in loggers)
        quiet_task_logs(Settings(log_every_task=True))
        assert all(logger.level == logging.NOTSET for logger in loggers)  # the root's level
    finally:
        for logger, level in zip(loggers, before, strict=True):
            logger.setLevel(level)
