"""``blipq moderation calibrate``: the threshold math, the manifest, the written policy."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
import yaml

from producer.cli import calibrate as cal
from producer.cli import main
from producer.protocol.jobs import AnyJob, CategoryScore, JobResult, ModerationJob, ModerationOutput

# --- threshold math ------------------------------------------------------------------------------


def test_operating_points_walk_down_the_scores_and_keep_ties_together() -> None:
    scores = [0.9, 0.8, 0.8, 0.4, 0.1]
    labels = [True, True, False, True, False]
    points = cal.operating_points(scores, labels)
    assert [p.threshold for p in points] == [0.9, 0.8, 0.4, 0.1]
    assert [p.flagged for p in points] == [1, 3, 4, 5]
    assert [p.true_positives for p in points] == [1, 2, 3, 3]
    assert [round(p.precision, 4) for p in points] == [1.0, 0.6667, 0.75, 0.6]
    assert [round(p.recall, 4) for p in points] == [0.3333, 0.6667, 1.0, 1.0]


def test_threshold_for_precision_takes_the_best_recall_that_keeps_the_target() -> None:
    scores = [0.95, 0.9, 0.7, 0.6, 0.5, 0.3, 0.2]
    labels = [True, True, False, True, True, False, True]
    # precision by threshold: .95 1/1, .9 2/2, .7 2/3, .6 3/4, .5 4/5, .3 4/6, .2 5/7
    point = cal.threshold_for_precision(scores, labels, 0.8)
    assert point is not None
    assert (point.threshold, point.precision, point.recall) == (0.5, 0.8, 0.8)
    strict = cal.threshold_for_precision(scores, labels, 1.0)
    assert strict is not None and strict.threshold == 0.9 and strict.recall == 0.4
    loose = cal.threshold_for_precision(scores, labels, 0.5)
    assert loose is not None and loose.threshold == 0.2 and loose.recall == 1.0


def test_no_threshold_without_positives_or_when_the_target_is_out_of_reach() -> None:
    assert cal.threshold_for_precision([0.9, 0.2], [False, False], 0.5) is None
    # the top score is a negative tied with a positive: precision is 1/2 at 0.9, 2/3 at 0.1
    assert cal.threshold_for_precision([0.9, 0.9, 0.1], [True, False, True], 0.9) is None
    assert cal.best_precision([0.9, 0.9, 0.1], [True, False, True]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="target precision"):
        cal.threshold_for_precision([0.5], [True], 0.0)
    with pytest.raises(ValueError, match="length"):
        cal.operating_points([0.5], [True, False])


def test_review_threshold_never_exceeds_block_threshold() -> None:
    scores = [0.99, 0.97, 0.9, 0.85, 0.7, 0.6, 0.4, 0.3]
    labels = [True, False, True, True, False, True, False, True]
    result = cal.calibrate_category(
        "x", None, scores, labels, block_precision=0.75, review_precision=0.5
    )
    assert result.block is not None and result.review is not None
    assert result.review.threshold <= result.block.threshold
    assert (result.positives, result.negatives) == (5, 3)
    with pytest.raises(ValueError, match="review precision"):
        cal.calibrate_category("x", None, scores, labels, block_precision=0.5, review_precision=0.9)


# --- a whole calibration -------------------------------------------------------------------------


POLICY = [("violence", None), ("weapons", "violence"), ("alcohol", None)]


def output(scores: Sequence[float], version: str = "1") -> ModerationOutput:
    return ModerationOutput(
        policy="default",
        version=version,
        decision="allow",
        categories=[
            CategoryScore(
                name=name,
                parent=parent,
                score=score,
                review_threshold=0.5,
                block_threshold=0.8,
                flagged="none",
            )
            for (name, parent), score in zip(POLICY, scores, strict=True)
        ],
    )


def labelled(*labels: str) -> cal.LabelledImage:
    return cal.LabelledImage("s3://bkt/x.jpg", frozenset(labels))


SAMPLE = [
    (labelled("weapons"), output([0.9, 0.9, 0.1])),  # a weapon is also violence (its parent)
    (labelled("violence"), output([0.8, 0.2, 0.1])),
    (labelled(), output([0.7, 0.6, 0.2])),
    (labelled("alcohol", "graffiti"), output([0.1, 0.1, 0.95])),
    (labelled("alcohol"), output([0.3, 0.1, 0.5])),
    (labelled(), output([0.2, 0.1, 0.6])),
]


def test_calibrate_scores_every_category_and_labels_imply_ancestors() -> None:
    result = cal.calibrate(SAMPLE, block_precision=0.9, review_precision=0.5)
    by_name = {c.name: c for c in result.categories}
    assert result.images == 6
    assert result.unknown_labels == ["graffiti"]
    assert by_name["violence"].positives == 2  # the weapons image counts for violence
    violence = by_name["violence"]
    assert violence.block is not None and violence.block.threshold == 0.8
    assert violence.block.recall == 1.0
    # 0.3 also reaches 0.5 precision (2 of 4), but gains no recall over 0.8: 0.8 is kept
    assert violence.review is not None and violence.review.threshold == 0.8
    weapons = by_name["weapons"]
    assert weapons.block is not None and weapons.block.threshold == 0.9
    alcohol = by_name["alcohol"]
    assert alcohol.block is not None and alcohol.block.threshold == 0.95
    assert alcohol.review is not None and alcohol.review.threshold == 0.5  # 2 of 3 >= .5
    table = cal.format_table(result, 0.9, 0.5)
    assert "violence" in table and "  weapons" in table and "0.8000" in table
    assert "graffiti" in table


def test_unreachable_targets_are_reported_and_keep_base_thresholds() -> None:
    result = cal.calibrate(SAMPLE[2:], block_precision=0.99, review_precision=0.5)
    table = cal.format_table(result, 0.99, 0.5)
    assert "note: violence: no block threshold (no positive images)" in table
    base = {
        "name": "default",
        "version": 2,
        "model": "itm-base",
        "k": 4,
        "categories": [
            {
                "name": n,
                "parent": p,
                "prompts": [f"a {n}"],
                "review_threshold": 0.3,
                "block_threshold": 0.85,
            }
            for n, p in POLICY
        ],
    }
    written = cal.apply_thresholds(base, result, version="2-cal", model="itm-large")
    cats = {c["name"]: c for c in written["categories"]}
    assert cats["violence"]["block_threshold"] == 0.85  # no positives: base kept
    assert cats["violence"]["review_threshold"] == 0.3
    assert cats["alcohol"]["block_threshold"] == 0.95
    assert cats["alcohol"]["review_threshold"] == 0.5
    assert cats["alcohol"]["prompts"] == ["a alcohol"]
    assert (written["version"], written["model"], written["k"]) == ("2-cal", "itm-large", 4)
    assert base["version"] == 2  # the base is not modified


def test_results_of_different_policy_versions_are_refused() -> None:
    changed = ModerationOutput(
        policy="default",
        version="2",
        decision="allow",
        categories=list(reversed(output([0.1, 0.2, 0.3]).categories)),
    )
    with pytest.raises(cal.CalibrationError, match="different versions"):
        cal.calibrate([SAMPLE[0], (labelled(), changed)], block_precision=0.9, review_precision=0.5)


# --- manifest ------------------------------------------------------------------------------------


def test_manifest_lines_are_validated_with_their_line_numbers() -> None:
    good = [
        '{"image": "s3://bkt/a.jpg", "categories": ["violence"]}',
        "",
        "# a comment",
        '{"image": "s3://bkt/b.jpg"}',
    ]
    entries = cal.read_manifest(good, "m.jsonl")
    assert entries == [
        cal.LabelledImage("s3://bkt/a.jpg", frozenset({"violence"})),
        cal.LabelledImage("s3://bkt/b.jpg", frozenset()),
    ]
    bad_lines = {
        "{not json": "m.jsonl:2: not JSON",
        '{"image": "http://x/a.jpg"}': "m.jsonl:2: image must be an s3://",
        '{"image": "s3://bkt/a.jpg", "categories": "violence"}': "list of category names",
        '["s3://bkt/a.jpg"]': 'expected {"image"',
    }
    for line, message in bad_lines.items():
        with pytest.raises(cal.CalibrationError, match=message.replace("{", r"\{")):
            cal.read_manifest([good[0], line], "m.jsonl")
    with pytest.raises(cal.CalibrationError, match="no labelled images"):
        cal.read_manifest(["", "# nothing"], "m.jsonl")


# --- the command, with a client that answers from canned scores -----------------------------------


class FakeClient:
    """Answers moderation jobs from a table of scores by image; fails unknown images."""

    def __init__(self, scores: dict[str, list[float]]) -> None:
        self.scores = scores
        self.jobs: dict[str, ModerationJob] = {}

    def submit_many(self, jobs: Iterable[AnyJob]) -> list[str]:
        ids = []
        for job in jobs:
            assert isinstance(job, ModerationJob)
            job_id = f"job-{len(self.jobs)}"
            self.jobs[job_id] = job
            ids.append(job_id)
        return ids

    def results(self, job_ids: Sequence[str], timeout: float | None = None) -> Iterator[JobResult]:
        for job_id in reversed(job_ids):  # any order
            job = self.jobs[job_id]
            if job.image not in self.scores:
                yield JobResult.failure(job_id, "moderate", "not_found", "no such object")  # type: ignore[arg-type]
                continue
            out = output(self.scores[job.image])
            yield JobResult(job_id=job_id, kind="moderate", status="ok", output=out)

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_calibrate_command_prints_a_table_and_writes_a_valid_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [(f"s3://bkt/{i}.jpg", entry.categories, out) for i, (entry, out) in enumerate(SAMPLE)]
    manifest = tmp_path / "m.jsonl"
    lines = [
        json.dumps({"image": image, "categories": sorted(labels)}) for image, labels, _ in rows
    ]
    manifest.write_text("\n".join([*lines, '{"image": "s3://bkt/missing.jpg"}']) + "\n")
    fake = FakeClient({image: [c.score for c in out.categories] for image, _, out in rows})
    monkeypatch.setattr("producer.cli.blipq._client", lambda args: fake)
    base = tmp_path / "base.yaml"
    base.write_text(
        yaml.safe_dump(
            {
                "name": "default",
                "version": "1",
                "model": "itm-base",
                "k": 3,
                "categories": [
                    {
                        "name": n,
                        "parent": p,
                        "prompts": [f"a photo of {n}"],
                        "review_threshold": 0.5,
                        "block_threshold": 0.8,
                    }
                    for n, p in POLICY
                ],
            },
            sort_keys=False,
        )
    )
    out_path = tmp_path / "calibrated.yaml"
    argv = ["moderation", "calibrate", str(manifest), "--base", str(base), "--write", str(out_path)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "6 images scored" in captured.out
    assert "1 of 7 jobs failed" in captured.err and "missing.jpg" in captured.err
    assert {job.policy for job in fake.jobs.values()} == {"default"}
    text = out_path.read_text()
    assert text.startswith("# Calibrated by `blipq moderation calibrate`")
    written = yaml.safe_load(text)
    stamp = datetime.now(UTC).strftime("%Y%m%d")
    assert written["version"] == f"1-calibrated-{stamp}"
    thresholds = {
        c["name"]: (c["review_threshold"], c["block_threshold"]) for c in written["categories"]
    }
    assert thresholds == {"violence": (0.8, 0.8), "weapons": (0.9, 0.9), "alcohol": (0.5, 0.95)}

    from worker.models.moderation import load_policy  # the worker accepts what the producer wrote

    assert load_policy(out_path, "default").categories[2].block_threshold == 0.95


def test_calibrate_command_refuses_bad_arguments_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "s3://bkt/a.jpg", "categories": []}\n')
    unreachable = ["--redis-url", "redis://127.0.0.1:1/0", "moderation", "calibrate", str(manifest)]
    assert main([*unreachable, "--precision", "0.5", "--review-precision", "0.8"]) == 2
    assert main([*unreachable, "--write", str(tmp_path / "out.yaml")]) == 2
    assert "--write needs --base" in capsys.readouterr().err
    other = tmp_path / "other.yaml"
    other.write_text("name: other\ncategories: []\n")
    assert main([*unreachable, "--base", str(other)]) == 2
    assert "the jobs used policy 'default'" in capsys.readouterr().err
    assert main([*unreachable[:-1], str(tmp_path / "nope.jsonl")]) == 2


def test_moderate_command_parses_and_validates(capsys: pytest.CaptureFixture[str]) -> None:
    from producer.cli import build_parser

    args = build_parser().parse_args(["moderate", "s3://bkt/a.jpg", "--policy", "shapes", "--wait"])
    assert (args.image, args.policy, args.model, args.wait) == (
        "s3://bkt/a.jpg",
        "shapes",
        "itm-base",
        True,
    )
    assert main(["--redis-url", "redis://127.0.0.1:1/0", "moderate", "http://x/a.jpg"]) == 2
    assert "s3://" in capsys.readouterr().err
