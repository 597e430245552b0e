from __future__ import annotations

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
