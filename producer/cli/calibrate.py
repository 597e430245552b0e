"""``blipq moderation calibrate``: thresholds for a moderation policy from labelled images.

A manifest is JSON lines, one labelled image each::

    {"image": "s3://bucket/key.jpg", "categories": ["violence"]}

(``categories``: the policy categories the image truly belongs to; ``[]`` for a clean image).
Every image is submitted as a ``ModerationJob``; from the per-category scores of the results,
each category gets the threshold with the highest recall at which flagged images still reach a
target precision: ``--precision`` for blocking, ``--review-precision``
(lower) for review. A label implies the category's ancestors, since a parent's score is the
maximum of its children's.

Producer side only: no torch, no worker code. The threshold math is pure functions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import yaml

from producer.protocol.errors import ResultTimeout
from producer.protocol.jobs import (
    AnyJob,
    JobResult,
    ModerationJob,
    ModerationOutput,
    parse_image_uri,
)


class CalibrationError(ValueError):
    """A manifest, a base policy or the results cannot be used; the message says why."""


# --- the manifest --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabelledImage:
    image: str
    categories: frozenset[str]


def read_manifest(lines: Iterable[str], source: str = "manifest") -> list[LabelledImage]:
    """Parse JSON lines (blank lines and ``#`` comments skipped); errors name the line."""
    entries: list[LabelledImage] = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        where = f"{source}:{number}"
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{where}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict) or not isinstance(row.get("image"), str):
            raise CalibrationError(
                f'{where}: expected {{"image": "s3://...", "categories": [...]}}'
            )
        try:
            parse_image_uri(row["image"])
        except ValueError as exc:
            raise CalibrationError(f"{where}: {exc}") from exc
        labels = row.get("categories", [])
        if not isinstance(labels, list) or not all(isinstance(c, str) and c for c in labels):
            raise CalibrationError(f"{where}: categories must be a list of category names")
        entries.append(LabelledImage(row["image"], frozenset(labels)))
    if not entries:
        raise CalibrationError(f"{source}: no labelled images")
    return entries


# --- threshold math (pure) -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """What flagging every image scoring ``>= threshold`` does on the labelled sample."""

    threshold: float
    precision: float
    recall: float
    flagged: int
    true_positives: int


def operating_points(scores: Sequence[float], labels: Sequence[bool]) -> list[OperatingPoint]:
    """One point per distinct score, highest threshold first (recall never decreases)."""
    if len(scores) != len(labels):
        raise ValueError("scores and labels differ in length")
    positives = sum(labels)
    ranked = sorted(zip(scores, labels, strict=True), key=lambda pair: -pair[0])
    points: list[OperatingPoint] = []
    flagged = hits = 0
    for index, (score, label) in enumerate(ranked):
        flagged += 1
        hits += label
        if index + 1 < len(ranked) and ranked[index + 1][0] == score:
            continue  # ties: a threshold takes all equal scores or none
        points.append(
            OperatingPoint(
                threshold=score,
                precision=hits / flagged,
                recall=hits / positives if positives else 0.0,
                flagged=flagged,
                true_positives=hits,
            )
        )
    return points


def threshold_for_precision(
    scores: Sequence[float], labels: Sequence[bool], target: float
) -> OperatingPoint | None:
    """The threshold with the highest recall whose precision reaches ``target``.

    Of thresholds with equal recall, the highest (it flags the fewest images). None when the
    sample has no positive or no threshold reaches the target.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target precision must be in (0, 1], got {target}")
    best = None
    for point in operating_points(scores, labels):  # recall never decreases along these
        reaches = point.true_positives and point.precision >= target
        if reaches and (best is None or point.recall > best.recall):
            best = point
    return best


def best_precision(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """The highest precision any threshold with at least one true positive reaches."""
    return max(
        (p.precision for p in operating_points(scores, labels) if p.true_positives), default=0.0
    )


@dataclass(frozen=True)
class CategoryCalibration:
    name: str
    parent: str | None
    positives: int
    negatives: int
    block: OperatingPoint | None
    review: OperatingPoint | None
    best_precision: float


def calibrate_category(
    name: str,
    parent: str | None,
    scores: Sequence[float],
    labels: Sequence[bool],
    *,
    block_precision: float,
    review_precision: float,
) -> CategoryCalibration:
    if review_precision > block_precision:
        raise ValueError("the review precision must not exceed the block precision")
    block = threshold_for_precision(scores, labels, block_precision)
    review = threshold_for_precision(scores, labels, review_precision)
    # The best recall at a lower target is at least the best at a higher one, and it is first
    # reached at a threshold no higher: review <= block.
    return CategoryCalibration(
        name=name,
        parent=parent,
        positives=sum(labels),
        negatives=len(labels) - sum(labels),
        block=block,
        review=review,
        best_precision=best_precision(scores, labels),
    )


@dataclass(frozen=True)
class Calibration:
    categories: list[CategoryCalibration]
    images: int
    unknown_labels: list[str] = field(default_factory=list)


def with_ancestors(labels: Iterable[str], parents: Mapping[str, str | None]) -> set[str]:
    """The labels plus every ancestor of each (a parent's score covers its children)."""
    out: set[str] = set()
    for label in labels:
        node: str | None = label
        while node is not None and node not in out:
            out.add(node)
            node = parents.get(node)
    return out


def calibrate(
    scored: Sequence[tuple[LabelledImage, ModerationOutput]],
    *,
    block_precision: float,
    review_precision: float,
) -> Calibration:
    """Thresholds for every category of the policy from labelled, scored images."""
    if not scored:
        raise CalibrationError("no scored images to calibrate on")
    first = scored[0][1]
    parents = {c.name: c.parent for c in first.categories}
    unknown = sorted({label for entry, _ in scored for label in entry.categories} - set(parents))
    truth = [with_ancestors(entry.categories & set(parents), parents) for entry, _ in scored]
    out = []
    for index, category in enumerate(first.categories):
        scores = []
        for _, output in scored:
            if output.categories[index].name != category.name:
                raise CalibrationError("results come from different versions of the policy")
            scores.append(output.categories[index].score)
        labels = [category.name in labelled for labelled in truth]
        out.append(
            calibrate_category(
                category.name,
                category.parent,
                scores,
                labels,
                block_precision=block_precision,
                review_precision=review_precision,
            )
        )
    return Calibration(out, images=len(scored), unknown_labels=unknown)


def format_table(calibration: Calibration, block_precision: float, review_precision: float) -> str:
    """A plain-text table: per category, positives and both operating points."""
    header = (
        f"{'category':<24} {'pos':>5} {'neg':>5} | "
        f"{'block@' + format(block_precision, 'g'):>10} {'prec':>6} {'recall':>6} | "
        f"{'review@' + format(review_precision, 'g'):>10} {'prec':>6} {'recall':>6}"
    )
    lines = [header, "-" * len(header)]
    for c in calibration.categories:
        name = c.name if c.parent is None else f"  {c.name}"
        lines.append(
            f"{name:<24} {c.positives:>5} {c.negatives:>5} | {_point(c.block)} | {_point(c.review)}"
        )
    unreachable = [c for c in calibration.categories if c.block is None]
    for c in unreachable:
        reason = (
            "no positive images"
            if not c.positives
            else f"best precision {c.best_precision:.3f} < {block_precision:g}"
        )
        lines.append(f"note: {c.name}: no block threshold ({reason})")
    if calibration.unknown_labels:
        lines.append(f"note: labels not in the policy, ignored: {calibration.unknown_labels}")
    return "\n".join(lines)


def _point(point: OperatingPoint | None) -> str:
    if point is None:
        return f"{'-':>10} {'-':>6} {'-':>6}"
    return f"{point.threshold:>10.4f} {point.precision:>6.3f} {point.recall:>6.3f}"


def apply_thresholds(
    base: Mapping[str, Any], calibration: Calibration, *, version: str, model: str
) -> dict[str, Any]:
    """A copy of the base policy with the calibrated thresholds (the others kept as they were).

    A category without a block threshold (no positives, target unreachable) keeps its base
    thresholds; one with a review but no block threshold keeps its block threshold, and its
    review threshold is capped by it.
    """
    policy = json.loads(json.dumps(base, default=str))  # a deep, plain copy
    found = {c.name: c for c in calibration.categories}
    for category in policy.get("categories") or []:
        calibrated = found.get(category.get("name"))
        if calibrated is None:
            continue
        block = category.get("block_threshold", 1.0)
        review = category.get("review_threshold", block)
        if calibrated.block is not None:
            block = calibrated.block.threshold
        if calibrated.review is not None:
            review = calibrated.review.threshold
        category["block_threshold"] = _clamp(block)
        category["review_threshold"] = _clamp(min(review, block))
    policy["version"] = version
    policy["model"] = model
    return dict(policy)


def _clamp(value: float) -> float:
    return min(1.0, max(0.0, float(value))) if math.isfinite(value) else 1.0


def policy_yaml(policy: Mapping[str, Any], comment: str) -> str:
    header = "".join(f"# {line}\n" for line in comment.splitlines())
    return header + yaml.safe_dump(dict(policy), sort_keys=False, allow_unicode=True, width=100)


# --- running the jobs ----------------------------------------------------------------------------


class Submitter(Protocol):
    def submit_many(self, jobs: Iterable[AnyJob]) -> list[str]: ...

    def results(
        self, job_ids: Sequence[str], timeout: float | None = None
    ) -> Iterable[JobResult]: ...


@dataclass(frozen=True)
class Scored:
    scored: list[tuple[LabelledImage, ModerationOutput]]
    failed: list[tuple[LabelledImage, str]]


def score_manifest(
    client: Submitter,
    entries: Sequence[LabelledImage],
    *,
    policy: str,
    model: str,
    timeout: float | None,
) -> Scored:
    """Submit one ModerationJob per image; collect outputs (in manifest order) and failures."""
    jobs = [ModerationJob(image=entry.image, policy=policy, model=model) for entry in entries]
    ids = client.submit_many(jobs)
    by_id: dict[str, JobResult] = {}
    try:
        for result in client.results(ids, timeout=timeout):
            by_id[result.job_id] = result
    except ResultTimeout as exc:
        missing = len(ids) - len(by_id)
        raise CalibrationError(f"{missing} of {len(ids)} results missing: {exc}") from exc
    scored, failed = [], []
    for entry, job_id in zip(entries, ids, strict=True):
        result = by_id[job_id]
        if result.ok and isinstance(result.output, ModerationOutput):
            scored.append((entry, result.output))
        else:
            reason = f"{result.error.code}: {result.error.message}" if result.error else "no output"
            failed.append((entry, reason))
    return Scored(scored, failed)


def default_version(base_version: object, now: datetime | None = None) -> str:
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%d")
    return f"{base_version}-calibrated-{stamp}"


def read_base_policy(path: Path, policy: str) -> dict[str, Any]:
    """The base policy YAML whose prompts the written policy keeps (it must be the scored one)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise CalibrationError(f"base policy {path}: {exc}") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("categories"), list):
        raise CalibrationError(f"base policy {path}: not a policy (no categories list)")
    if raw.get("name") != policy:
        raise CalibrationError(
            f"base policy {path} is {raw.get('name')!r}, but the jobs used policy {policy!r}"
        )
    return raw


# --- the command ---------------------------------------------------------------------------------


class _ClientFactory(Protocol):
    def __call__(self, args: argparse.Namespace) -> Any: ...


def add_command(sub: Any, client_factory: _ClientFactory) -> None:
    """Register ``moderation calibrate`` on the CLI's subparsers."""
    moderation = sub.add_parser(
        "moderation",
        help="moderation policies: calibrate thresholds on labelled images",
        description="Tools for moderation policies.",
    )
    tools = moderation.add_subparsers(dest="moderation_command", required=True, metavar="TOOL")
    cal = tools.add_parser(
        "calibrate",
        help="suggest thresholds for a target precision from a labelled manifest",
        description="Submit a moderation job per image of MANIFEST (JSON lines: "
        '{"image": "s3://...", "categories": ["violence"]}), then print, per category, the '
        "thresholds with the highest recall at which flagged images reach the target precisions.",
    )
    cal.add_argument("manifest", type=Path, help="JSONL file of labelled images")
    cal.add_argument("--policy", default="default", help="policy name the worker serves")
    cal.add_argument("--model", default="itm-base", help="ITM model the policy runs on")
    cal.add_argument(
        "--precision", type=float, default=0.9, help="target precision of block (default 0.9)"
    )
    cal.add_argument(
        "--review-precision",
        type=float,
        default=0.5,
        help="target precision of review, at most --precision (default 0.5)",
    )
    cal.add_argument("--write", type=Path, help="write a policy YAML with the thresholds here")
    cal.add_argument(
        "--base", type=Path, help="the policy's YAML file (its prompts are kept; with --write)"
    )
    cal.add_argument("--version", help="version of the written policy (default: base + date)")
    cal.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for results")
    cal.set_defaults(func=lambda args: cmd_calibrate(args, client_factory))


def cmd_calibrate(args: argparse.Namespace, client_factory: _ClientFactory) -> int:
    try:
        if not 0 < args.review_precision <= args.precision <= 1:
            raise CalibrationError("need 0 < --review-precision <= --precision <= 1")
        if args.write and not args.base:
            raise CalibrationError("--write needs --base, the policy YAML whose prompts it keeps")
        base = read_base_policy(args.base, args.policy) if args.base else None
        with args.manifest.open(encoding="utf-8") as lines:
            entries = read_manifest(lines, str(args.manifest))
    except (OSError, CalibrationError) as exc:
        print(f"calibrate: {exc}", file=sys.stderr)
        return 2
    with client_factory(args) as client:
        try:
            scored = score_manifest(
                client, entries, policy=args.policy, model=args.model, timeout=args.timeout
            )
            for entry, reason in scored.failed[:5]:
                print(f"failed: {entry.image}: {reason}", file=sys.stderr)
            if scored.failed:
                print(f"{len(scored.failed)} of {len(entries)} jobs failed", file=sys.stderr)
            result = calibrate(
                scored.scored,
                block_precision=args.precision,
                review_precision=args.review_precision,
            )
        except CalibrationError as exc:
            print(f"calibrate: {exc}", file=sys.stderr)
            return 1
    print(f"policy {args.policy} on {args.model}: {result.images} images scored")
    print(format_table(result, args.precision, args.review_precision))
    if args.write and base is not None:
        version = args.version or default_version(base.get("version", "0"))
        policy = apply_thresholds(base, result, version=version, model=args.model)
        comment = (
            f"Calibrated by `blipq moderation calibrate` from {args.manifest} "
            f"({result.images} images) on {datetime.now(UTC):%Y-%m-%d}: block at precision "
            f">= {args.precision:g}, review at precision >= {args.review_precision:g}.\n"
            f"Base policy: {args.base}. Categories without a reachable threshold keep the "
            "base thresholds."
        )
        args.write.write_text(policy_yaml(policy, comment), encoding="utf-8")
        print(f"wrote {args.write} (version {version})")
    return 0
