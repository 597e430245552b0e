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
    assert "max_new_tokens" in capsys.readouterr().err
