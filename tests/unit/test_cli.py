from __future__ import annotations

from pathlib import Path

import pytest

from producer.cli import build_parser, main


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for command in ("caption", "result", "demo"):
        assert command in out


def test_caption_options_parse() -> None:
    args = build_parser().parse_args(
        ["caption", "s3://b-1/k.jpg", "--prompt", "a photography of", "--num-beams", "3", "--wait"]
    )
    assert (args.image, args.prompt, args.num_beams, args.wait) == (
        "s3://b-1/k.jpg",
        "a photography of",
        3,
        True,
    )


def test_invalid_job_is_refused_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    # No Redis runs at this URL: validation must fail first, with exit code 2.
    assert (
        main(
            [
                "--redis-url",
                "redis://127.0.0.1:1/0",
                "caption",
                "s3://b-1/k.jpg",
                "--max-new-tokens",
                "-3",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    # One clean line: the field and what is wrong, not pydantic's multi-line dump.
    assert err == "invalid job: max_new_tokens: Input should be greater than or equal to 1\n"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"blipq {version('blipq')}\n"


def test_vqa_and_match_options_parse() -> None:
    args = build_parser().parse_args(["vqa", "s3://b-1/k.jpg", "--question", "what color?"])
    assert (args.question, args.model, args.max_new_tokens) == ("what color?", "vqa-base", 10)
    args = build_parser().parse_args(["match", "s3://b-1/k.jpg", "--text", "a", "--text", "b c"])
    assert (args.text, args.model) == (["a", "b c"], "itm-base")


def test_every_job_command_validates_first(capsys: pytest.CaptureFixture[str]) -> None:
    url = ["--redis-url", "redis://127.0.0.1:1/0"]
    assert main([*url, "vqa", "s3://b-1/k.jpg", "--question", ""]) == 2
    assert main([*url, "match", "not-s3", "--text", "a"]) == 2
    assert main([*url, "caption", "s3://b-1/k.jpg", "--candidates", "99"]) == 2
    assert "invalid job" in capsys.readouterr().err


def test_demo_model_names_a_fixture_or_a_path(tmp_path: Path) -> None:
    from producer.cli import demo

    for name in ("shapes-blip2-opt", "shapes-blip2-t5"):
        source, _ = demo._model_source(name)
        assert source == str(demo.FIXTURE_MODELS / name)
        assert demo._is_shapes(source) and demo._is_blip2(source)
    caption, _ = demo._model_source("shapes-caption")
    assert demo._is_shapes(caption) and not demo._is_blip2(caption)
    assert demo._model_source(str(tmp_path)) == (str(tmp_path), "given with --model")
    assert not demo._is_shapes(str(tmp_path))
    assert demo._model_source("no-such-fixture")[0] == "no-such-fixture"


def test_demo_vqa_truth_covers_the_shapes_samples() -> None:
    import json

    from producer.cli import demo

    captions = json.loads((demo.SHAPES_SAMPLES / "truth.json").read_text())
    answers = json.loads((demo.SHAPES_SAMPLES / "vqa.json").read_text())
    assert set(answers) == set(captions)
    for name, questions in answers.items():
        shapes = captions[name].count(" and ") + 1
        assert questions["how many shapes are there?"] == ("one", "two")[shapes - 1]
        assert {"yes", "no"} <= set(questions.values()), name
