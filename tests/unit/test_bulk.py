"""Bulk runs, the pure parts: manifests, run ids, progress math, output files."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pytest
from rich.console import Console

from producer.bulk import (
    BulkError,
    BulkResult,
    CsvWriter,
    JsonlWriter,
    ParquetWriter,
    ProgressLine,
    RunStatus,
    check_run_id,
    compute_progress,
    content_digest,
    derive_run_id,
    flat_row,
    format_duration,
    items_from,
    job_id_for,
    manifest_format,
    open_writer,
    read_manifest,
    render_progress,
    split_prefix,
)
from producer.cli import build_parser
from producer.protocol.jobs import (
    CaptionJob,
    CaptionOutput,
    ErrorCode,
    JobResult,
    MatchJob,
    VqaJob,
)

# --- manifests -----------------------------------------------------------------------------------


def test_jsonl_manifest_rows_override_defaults() -> None:
    text = "\n".join(
        [
            '{"image": "s3://imgs/a.jpg"}',
            "# a comment, then a blank line",
            "",
            '{"image": "s3://imgs/b.jpg", "question": "what shape?", "max_new_tokens": 5}',
        ]
    )
    items = read_manifest(
        text, fmt="jsonl", kind="vqa", defaults={"question": "what color?", "model": "tiny-vqa"}
    )
    assert [item.key for item in items] == ["s3://imgs/a.jpg", "s3://imgs/b.jpg"]
    first, second = (item.job for item in items)
    assert isinstance(first, VqaJob) and isinstance(second, VqaJob)
    assert (first.question, first.model, first.max_new_tokens) == ("what color?", "tiny-vqa", 10)
    assert (second.question, second.model, second.max_new_tokens) == ("what shape?", "tiny-vqa", 5)


def test_csv_manifest_cells_texts_and_ids() -> None:
    text = (
        "id,image,texts,model\n"
        'r1,s3://imgs/a.jpg,"[""a red square"", ""a blue circle""]",\n'
        "r2,s3://imgs/a.jpg,a green triangle,tiny-match\n"
    )
    items = read_manifest(text, fmt="csv", kind="match", defaults={"model": "itm-x"})
    assert [item.key for item in items] == ["r1", "r2"]
    one, two = (item.job for item in items)
    assert isinstance(one, MatchJob) and isinstance(two, MatchJob)
    assert one.texts == ["a red square", "a blue circle"]
    assert one.model == "itm-x"  # an empty cell is absent: the default holds
    assert (two.texts, two.model) == (["a green triangle"], "tiny-match")


@pytest.mark.parametrize(
    ("fmt", "text", "message"),
    [
        ("jsonl", '{"image": "s3://imgs/a.jpg"}\n{"image": "s3://imgs/a.jpg"}', "also on m:1"),
        ("jsonl", '{"image": "s3://imgs/a.jpg"}\nnot json', "m:2: not JSON"),
        ("jsonl", '["s3://imgs/a.jpg"]', "m:1: expected a JSON object"),
        ("jsonl", '{"picture": "s3://imgs/a.jpg"}', 'm:1: needs an "image"'),
        ("jsonl", '{"image": "http://imgs/a.jpg"}', "m:1: image"),
        ("jsonl", '{"image": "s3://imgs/a.jpg", "bogus": 1}', "m:1: bogus"),
        ("jsonl", '{"image": "s3://imgs/a.jpg", "max_new_tokens": -1}', "max_new_tokens"),
        ("jsonl", '{"image": "s3://imgs/a.jpg", "kind": "vqa"}', "kind 'vqa' in a caption run"),
        ("jsonl", "# nothing\n", "m: no rows"),
        ("csv", "picture\ns3://imgs/a.jpg\n", "header needs an image column"),
        ("csv", "image\ns3://imgs/a.jpg,extra\n", "m:2: more cells"),
    ],
)
def test_manifest_errors_name_the_line(fmt: str, text: str, message: str) -> None:
    with pytest.raises(BulkError, match=message):
        read_manifest(text, fmt=fmt, kind="caption", source="m")  # type: ignore[arg-type]


def test_manifest_format_by_extension() -> None:
    assert manifest_format("a/b.CSV") == "csv"
    assert manifest_format("rows.jsonl") == manifest_format("rows.ndjson") == "jsonl"
    with pytest.raises(BulkError, match=r"\.jsonl or \.csv"):
        manifest_format("rows.txt")


def test_items_from_uris_jobs_and_mappings() -> None:
    items = items_from(["s3://imgs/a.jpg", "s3://imgs/b.jpg"], options={"model": "m"})
    assert [(i.key, i.job.kind, i.job.model) for i in items] == [
        ("s3://imgs/a.jpg", "caption", "m"),
        ("s3://imgs/b.jpg", "caption", "m"),
    ]
    ask = VqaJob(image="s3://imgs/a.jpg", question="what?")
    keyed = items_from({"q1": ask, "q2": ask.model_copy(update={"question": "why?"})})
    assert [i.key for i in keyed] == ["q1", "q2"]
    with pytest.raises(BulkError, match="appears twice"):
        items_from([ask, ask])


def test_split_prefix() -> None:
    assert split_prefix("s3://bucket/some/prefix/") == ("bucket", "some/prefix/")
    assert split_prefix("s3://bucket") == ("bucket", "")
    with pytest.raises(BulkError):
        split_prefix("https://bucket/prefix/")


# --- run ids -------------------------------------------------------------------------------------


def test_run_id_is_stable_and_depends_on_every_input() -> None:
    base = derive_run_id("caption", "s3://imgs/p/", {"model": "m", "num_beams": 3})
    assert base == derive_run_id("caption", "s3://imgs/p/", {"num_beams": 3, "model": "m"})
    assert base.startswith("caption-") and len(base) == len("caption-") + 12
    assert check_run_id(base) == base
    others = {
        derive_run_id("vqa", "s3://imgs/p/", {"model": "m", "num_beams": 3}),
        derive_run_id("caption", "s3://imgs/q/", {"model": "m", "num_beams": 3}),
        derive_run_id("caption", "s3://imgs/p/", {"model": "m", "num_beams": 2}),
    }
    assert base not in others and len(others) == 3


def test_content_digest_follows_items() -> None:
    items = items_from(["s3://imgs/a.jpg", "s3://imgs/b.jpg"])
    assert content_digest(items) == content_digest(list(items))
    assert content_digest(items) != content_digest(items[::-1])
    assert content_digest(items) != content_digest(items_from(["s3://imgs/a.jpg"]))


@pytest.mark.parametrize("bad", ["", "-x", "a b", "a/b", "x" * 101, "ü"])
def test_bad_run_ids_are_refused(bad: str) -> None:
    with pytest.raises(BulkError, match="run id"):
        check_run_id(bad)


def test_job_ids_are_per_run_and_item() -> None:
    one = job_id_for("run-1", "s3://imgs/a.jpg")
    assert one == job_id_for("run-1", "s3://imgs/a.jpg")
    assert one != job_id_for("run-2", "s3://imgs/a.jpg")
    assert one != job_id_for("run-1", "s3://imgs/b.jpg")


# --- progress ------------------------------------------------------------------------------------


def test_progress_rate_and_eta() -> None:
    progress = compute_progress(
        total=100, submitted=60, done=40, failed=2, session_done=20, session_elapsed_s=10.0
    )
    assert (progress.rate, progress.eta_s, progress.ok, progress.fraction) == (2.0, 30.0, 38, 0.4)
    text = render_progress(progress, width=10)
    assert text.startswith("[####------] 40/100 done (40%)")
    assert "2 failed, 60 submitted, 2.0/s, elapsed 0:00:10, ETA 0:00:30" in text


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _frames(raw: str) -> list[str]:
    """What a terminal shows, frame by frame: control sequences out, split at CR and LF."""
    return [f for f in re.split(r"[\r\n]", _ANSI.sub("", raw)) if f.strip()]


@pytest.mark.parametrize("total", [240, 1_200_000])
def test_the_terminal_line_fits_80_columns_and_shows_every_figure(total: int) -> None:
    raw = io.StringIO()
    console = Console(file=raw, width=80, force_terminal=True, color_system=None)
    line = ProgressLine(raw, console=console)
    done = total // 2
    # A resumed run: 20 finished in this start, in 10 s; the rest in earlier starts.
    progress = compute_progress(
        total=total, submitted=done + 40, done=done, failed=3, session_done=20,
        session_elapsed_s=10.0,
    )  # fmt: skip
    line.update(progress, force=True)
    line.end(progress)
    frames = _frames(raw.getvalue())
    assert frames and all(len(frame) <= 80 for frame in frames), frames
    last = frames[-1]
    assert f"{done}/{total}" in last and "3 failed" in last and f"{done + 40} sent" in last
    assert "2.0/s" in last  # this start's results only, not the resumed ones
    assert "0:00:10" in last  # elapsed
    assert f"ETA {format_duration((total - done) / 2.0)}" in last
    assert "━" in last  # the bar


def test_off_a_terminal_the_line_is_plain_and_periodic() -> None:
    out = io.StringIO()
    line = ProgressLine(out)
    progress = compute_progress(
        total=10, submitted=5, done=4, failed=1, session_done=4, session_elapsed_s=2.0
    )
    line.update(progress)
    line.update(progress)  # within the period: nothing
    line.end(progress)
    assert out.getvalue().splitlines() == [render_progress(progress)] * 2
    assert "\x1b" not in out.getvalue() and "\r" not in out.getvalue()


def test_progress_edges() -> None:
    resumed = compute_progress(
        total=10, submitted=10, done=6, failed=0, session_done=0, session_elapsed_s=5.0
    )
    assert (resumed.rate, resumed.eta_s) == (0.0, None)  # nothing finished yet in this start
    assert "ETA ?" in render_progress(resumed)
    finished = compute_progress(
        total=10, submitted=10, done=10, failed=1, session_done=10, session_elapsed_s=0.0
    )
    assert (finished.rate, finished.eta_s, finished.fraction) == (0.0, 0.0, 1.0)
    # More done than listed (objects deleted since an earlier start): never above 100 %.
    shrunk = compute_progress(
        total=5, submitted=8, done=8, failed=0, session_done=2, session_elapsed_s=1.0
    )
    assert (shrunk.total, shrunk.fraction, shrunk.eta_s) == (8, 1.0, 0.0)
    assert compute_progress(
        total=3600 * 2, submitted=0, done=0, failed=0, session_done=1, session_elapsed_s=1.0
    ).eta_s == pytest.approx(7200.0)


def test_status_progress_from_redis_fields() -> None:
    meta = {
        "state": "stopped",
        "total": "200",
        "done": "120",
        "failed": "4",
        "session_started_at": "1000.0",
        "session_done_base": "20",
        "updated_at": "1050.0",
    }
    progress = RunStatus("r", meta, submitted=150, runner=None).progress(now=9999.0)
    # A stopped run's rate is measured until its last activity, not until now; no ETA.
    assert (progress.done, progress.failed, progress.submitted, progress.rate) == (
        120,
        4,
        150,
        2.0,
    )
    assert progress.eta_s is None
    running = RunStatus("r", {**meta, "state": "running"}, 150, "h:1:x").progress(now=1100.0)
    assert running.rate == 1.0 and running.eta_s == 80.0


# --- output files --------------------------------------------------------------------------------


def _item(key: str, text: str = "a red\nsquare", ok: bool = True) -> BulkResult:
    if ok:
        result = JobResult(
            job_id=f"id-{key}",
            kind="caption",
            status="ok",
            output=CaptionOutput(caption=text, continuation=text),
            model="tiny",
        )
    else:
        result = JobResult.failure(f"id-{key}", "caption", ErrorCode.NOT_FOUND, "no\nsuch key")
    return BulkResult(key, f"s3://imgs/{key}", result)


def test_flat_row_is_one_line() -> None:
    row = flat_row(_item("a.jpg"))
    assert (row["text"], row["status"], row["error_code"]) == ("a red square", "ok", "")
    assert json.loads(row["output"])["caption"] == "a red\nsquare"
    failed = flat_row(_item("b.jpg", ok=False))
    assert (failed["error_code"], failed["error_message"]) == ("not_found", "no such key")
    assert "\n" not in "".join(str(value) for value in failed.values())


@pytest.mark.parametrize("writer_type", [JsonlWriter, CsvWriter])
def test_writers_append_and_cut_a_torn_last_record(
    tmp_path: Path, writer_type: type[JsonlWriter] | type[CsvWriter]
) -> None:
    path = tmp_path / ("out.jsonl" if writer_type is JsonlWriter else "out.csv")
    writer = writer_type(path)
    assert writer.written() == {}
    writer.write(_item("a.jpg"))
    writer.write(_item("b.jpg", ok=False))
    writer.close(complete=False)
    with path.open("a") as handle:
        handle.write('{"item": "c.jpg", "ima' if writer_type is JsonlWriter else "c.jpg,s3://")
    again = writer_type(path)
    assert again.written() == {"a.jpg": "ok", "b.jpg": "error"}  # the torn record is cut off
    again.write(_item("c.jpg"))
    again.close(complete=True)
    assert writer_type(path).written() == {"a.jpg": "ok", "b.jpg": "error", "c.jpg": "ok"}
    if writer_type is CsvWriter:
        lines = path.read_text().splitlines()
        assert lines[0].startswith("item,image,job_id") and len(lines) == 4  # one header


def test_parquet_journal_becomes_the_file_when_complete(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    path = tmp_path / "out.parquet"
    writer = open_writer(path)
    assert isinstance(writer, ParquetWriter)
    writer.write(_item("a.jpg"))
    writer.close(complete=False)  # stopped early: rows wait in the journal
    assert not path.exists() and writer.journal.exists()
    again = ParquetWriter(path)
    assert again.written() == {"a.jpg": "ok"}
    again.write(_item("b.jpg", ok=False))
    again.close(complete=True)
    assert not again.journal.exists()
    table = pq.read_table(path).to_pylist()
    assert [(r["item"], r["status"], r["text"]) for r in table] == [
        ("a.jpg", "ok", "a red square"),
        ("b.jpg", "error", ""),
    ]
    # A later start (new objects under the prefix) adds to the existing file.
    more = ParquetWriter(path)
    assert set(more.written()) == {"a.jpg", "b.jpg"}
    more.write(_item("c.jpg"))
    more.close(complete=True)
    assert [r["item"] for r in pq.read_table(path).to_pylist()] == ["a.jpg", "b.jpg", "c.jpg"]


def test_open_writer_refuses_unknown_extensions(tmp_path: Path) -> None:
    with pytest.raises(BulkError, match=r"jsonl, \.csv or \.parquet"):
        open_writer(tmp_path / "out.txt")


# --- CLI -----------------------------------------------------------------------------------------


def test_bulk_cli_options_parse() -> None:
    args = build_parser().parse_args(
        ["bulk", "match", "s3://imgs/p/", "--out", "r.csv", "--text", "a", "--text", "b"]
    )
    assert (args.kind, args.prefix, args.out, args.job_texts) == (
        "match",
        "s3://imgs/p/",
        "r.csv",
        ["a", "b"],
    )
    args = build_parser().parse_args(
        ["bulk", "caption", "--manifest", "m.jsonl", "--out", "r.jsonl", "--num-beams", "3"]
    )
    assert (args.manifest, args.job_num_beams, args.job_prompt) == ("m.jsonl", 3, None)
    status = build_parser().parse_args(["status", "caption-0123", "--json"])
    assert (status.run_id, status.json) == ("caption-0123", True)


def test_bulk_cli_refuses_bad_input_before_connecting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from producer.cli import main

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"image": "s3://imgs/a.jpg", "num_beams": 99}\n')
    offline = ["--redis-url", "redis://127.0.0.1:1/0", "bulk", "caption"]
    assert main([*offline, "--manifest", str(manifest), "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "m.jsonl:1: num_beams" in capsys.readouterr().err
    assert main([*offline, "--out", str(tmp_path / "o.jsonl")]) == 2
    assert "one of them" in capsys.readouterr().err
    assert main([*offline, "--manifest", str(manifest), "--out", str(tmp_path / "o.txt")]) == 2


def test_caption_job_round_trip_keeps_key() -> None:
    job = CaptionJob(image="s3://imgs/a b.jpg")
    (item,) = items_from([job])
    assert item.key == "s3://imgs/a b.jpg" and item.job is job
