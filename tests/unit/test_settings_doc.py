"""The settings table of the docs is generated from worker.settings.Settings and must equal it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from worker import settings_doc
from worker.settings import Settings

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / settings_doc.PAGE


def _cells(line: str) -> list[str]:
    """A table row's cells, split on the pipes that are not escaped."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def _table() -> dict[str, list[str]]:
    lines = settings_doc.render().splitlines()
    return {_cells(line)[0].strip("`"): _cells(line) for line in lines[2:]}


def test_one_row_per_field_in_declaration_order() -> None:
    names = list(_table())
    assert names == [f"BLIPQ_{field.upper()}" for field in Settings.model_fields]
    # The connection settings producers share come first, then the worker's own.
    assert names[0] == "BLIPQ_REDIS_URL" and "BLIPQ_MAX_BATCH_SIZE" in names


def test_every_row_has_four_cells() -> None:
    lines = settings_doc.render().splitlines()
    assert lines[0] == "| variable | type | default | meaning |"
    for line in lines:
        assert len(_cells(line)) == 4, line


@pytest.mark.parametrize(
    ("variable", "kind", "default"),
    [
        ("BLIPQ_MAX_BATCH_SIZE", "integer, >= 1, <= 1024", "`16`"),
        ("BLIPQ_SERVE", "comma-separated list (or JSON array)", "`caption-base`"),
        ("BLIPQ_DTYPE", "`auto` \\| `float32` \\| `float16` \\| `bfloat16`", "`auto`"),
        ("BLIPQ_METRICS_PORT", "integer, >= 1, <= 65535", "—"),
        ("BLIPQ_S3_SECRET_ACCESS_KEY", "string (secret)", "—"),
        ("BLIPQ_WARMUP", "boolean", "`true`"),
        ("BLIPQ_MODELS", "JSON object", "`{}`"),
        ("BLIPQ_TASK_TIME_LIMIT_S", "number, > 0", "`600.0`"),
        ("BLIPQ_S3_CONNECT_TIMEOUT_S", "number, > 0", "`5.0`"),
        ("BLIPQ_INTAKE_PROCESSES", "`auto` or integer, >= 0, <= 256", "`auto`"),
    ],
)
def test_rows_show_type_limits_and_default(variable: str, kind: str, default: str) -> None:
    row = _table()[variable]
    assert row[1:3] == [kind, default]


def test_defaults_are_the_settings_defaults() -> None:
    table = _table()
    for name, info in Settings.model_fields.items():
        shown = table[f"BLIPQ_{name.upper()}"][2]
        value = info.get_default(call_default_factory=True, validated_data={})
        if value is None or value == []:
            assert shown == "—", name
        elif isinstance(value, bool):
            assert shown == f"`{str(value).lower()}`", name
        elif isinstance(value, int | float | str):
            assert shown == f"`{value}`", name
        else:
            assert shown.startswith("`"), name


def test_descriptions_come_from_the_fields_with_pipes_escaped() -> None:
    row = _table()["BLIPQ_DEVICE"]
    assert row[3] == "auto \\| cpu \\| cuda \\| cuda:N"
    assert Settings.model_fields["device"].description == "auto | cpu | cuda | cuda:N"


def test_each_variable_really_sets_its_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLIPQ_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("BLIPQ_TASK_TIME_LIMIT_S", "42")
    monkeypatch.setenv("BLIPQ_S3_CONNECT_TIMEOUT_S", "3")
    settings = Settings()
    assert (settings.max_batch_size, settings.task_time_limit_s) == (7, 42.0)
    assert settings.s3_connect_timeout_s == 3.0


def test_output_does_not_depend_on_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    before = settings_doc.render()
    monkeypatch.setenv("BLIPQ_MAX_BATCH_SIZE", "99")
    monkeypatch.setenv("BLIPQ_SERVE", "caption-large")
    assert settings_doc.render() == before


def test_docs_table_is_the_generated_one() -> None:
    document = PAGE.read_text()
    assert document.count(settings_doc.BEGIN) == 1 and document.count(settings_doc.END) == 1
    assert settings_doc.table_in(document) == settings_doc.render(), (
        f"{settings_doc.PAGE} is stale: run `python -m worker.settings_doc --update`"
    )


def test_settings_page_is_published_and_linked() -> None:
    """The page is in the site's navigation, and the README and the operations page link to it."""
    nav = (REPO / "mkdocs.yml").read_text()
    page = settings_doc.PAGE.relative_to("docs").as_posix()
    assert re.search(rf"^\s*- [^:\n]+: {re.escape(page)}$", nav, re.MULTILINE), nav
    assert "docs/reference/settings.md" in (REPO / "README.md").read_text()
    assert "reference/settings.md" in (REPO / "docs" / "operations.md").read_text()


def test_the_settings_table_left_the_readme() -> None:
    assert settings_doc.BEGIN not in (REPO / "README.md").read_text()


def test_check_says_whether_the_table_is_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "settings.md"
    path.write_text(f"# Settings\n{settings_doc.BEGIN}\n| old | table |\n{settings_doc.END}\n")
    assert settings_doc.main(["--check", str(path)]) == 1
    assert "stale settings table" in capsys.readouterr().err
    assert settings_doc.main(["--update", str(path)]) == 0
    assert settings_doc.main(["--check", str(path)]) == 0


def test_update_and_check_default_to_the_docs_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    assert settings_doc.main(["--check"]) == 0


def test_update_rewrites_only_the_table(tmp_path: Path) -> None:
    stale = f"# Doc\n\nbefore\n{settings_doc.BEGIN}\n| old | table |\n{settings_doc.END}\nafter\n"
    path = tmp_path / "doc.md"
    path.write_text(stale)
    assert settings_doc.main(["--update", str(path)]) == 0
    updated = path.read_text()
    assert updated.startswith(f"# Doc\n\nbefore\n{settings_doc.BEGIN}\n")
    assert updated.endswith(f"{settings_doc.END}\nafter\n")
    assert settings_doc.table_in(updated) == settings_doc.render()
    assert settings_doc.replace_table(updated, settings_doc.render()) == updated


def test_update_refuses_a_document_without_markers() -> None:
    with pytest.raises(ValueError, match="markers"):
        settings_doc.replace_table("# no table here\n", settings_doc.render())


def test_module_prints_the_table() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.settings_doc"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout == settings_doc.render()
