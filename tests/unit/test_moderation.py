"""Moderation: policy validation, the decision, and ITC-shortlist + ITM scores (tiny model)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from producer.protocol.errors import JobFailure
from producer.protocol.jobs import ErrorCode, MatchJob, ModerationJob
from tests.fixtures.images import sample_jpegs
from worker.models import moderation
from worker.models.base import Placement
from worker.models.blip_match import MatchRunner, Moderated
from worker.models.moderation import Policy, PolicyError, load_policy
from worker.settings import Settings

CPU = Placement(torch.device("cpu"), torch.float32)
REPO = Path(__file__).resolve().parents[2]


def policy_dict(**overrides: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "name": "test",
        "version": "1",
        "model": "tiny",
        "k": 3,
        "categories": [
            {
                "name": "animals",
                "prompts": ["a cat", "two dogs on a couch"],
                "review_threshold": 0.4,
                "block_threshold": 0.6,
            },
            {
                "name": "red",
                "prompts": ["a red circle", "a picture of a red square on the left"],
                "review_threshold": 0.5,
                "block_threshold": 0.7,
            },
            {
                "name": "red_triangle",
                "parent": "red",
                "prompts": ["a red triangle", "a red triangle and a blue square"],
                "review_threshold": 0.5,
                "block_threshold": 0.5,
            },
            {
                "name": "vehicles",
                "prompts": ["a car on the street", "a bus", "a train", "a boat in the water"],
                "review_threshold": 0.45,
                "block_threshold": 0.55,
            },
        ],
    }
    raw.update(overrides)
    return raw


def write(tmp_path: Path, raw: dict[str, Any], name: str = "test.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --- policy files --------------------------------------------------------------------------------


def _category(index: int, **changes: Any) -> dict[str, Any]:
    raw = policy_dict()
    raw["categories"][index].update(changes)
    return raw


def _cycle() -> dict[str, Any]:
    raw = _category(0, parent="red_triangle")  # animals -> red_triangle -> red -> animals
    raw["categories"][1]["parent"] = "animals"
    return raw


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            _category(2, parent="colours"),
            ["categories[2] ('red_triangle').parent: 'colours' is not a category"],
        ),
        (_category(0, prompts=[]), ["categories[0] ('animals').prompts: empty"]),
        (_category(1, prompts=["a red circle", "  "]), ["categories[1] ('red').prompts", "empty"]),
        (
            _category(3, review_threshold=0.9, block_threshold=0.5),
            ["categories[3] ('vehicles')", "review_threshold (0.9) must not exceed"],
        ),
        (_category(1, block_threshold=1.5), ["categories[1] ('red').block_threshold", "1"]),
        (_category(3, name="animals"), ["categories[3] ('animals').name: duplicate category name"]),
        (_cycle(), ["categories[0] ('animals').parent: parents form a cycle"]),
        (policy_dict(k=0), ["k:", "greater than or equal to 1"]),
        (policy_dict(categories=[]), ["categories:", "at least 1"]),
        (policy_dict(colour="red"), ["colour:", "Extra inputs"]),
        (_category(0, threshold=0.5), ["categories[0] ('animals').threshold", "Extra inputs"]),
    ],
)
def test_invalid_policies_name_the_file_and_the_field(
    tmp_path: Path, raw: dict[str, Any], expected: list[str]
) -> None:
    path = write(tmp_path, raw)
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, message


def test_unreadable_files_and_names_that_differ_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(PolicyError, match="not valid YAML"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot be read"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(PolicyError, match="expected a mapping"):
        load_policy(tmp_path / "list.yaml")
    with pytest.raises(PolicyError, match="configured as 'other'"):
        load_policy(write(tmp_path, policy_dict()), "other")


def test_a_parent_may_have_no_prompts_and_versions_are_text(tmp_path: Path) -> None:
    raw = policy_dict(version=3)
    raw["categories"][1]["prompts"] = []  # red has a child, so it may rely on it alone
    policy = load_policy(write(tmp_path, raw))
    assert policy.version == "3"
    assert policy.prompts[:3] == ["a cat", "two dogs on a couch", "a red triangle"]
    assert policy.prompt_owners[:3] == [0, 0, 2]


def test_shipped_policies_load_and_are_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BLIPQ_POLICIES", raising=False)
    paths = Settings().policy_map()
    assert Path(paths["default"]) == REPO / "worker" / "policies" / "default.yaml"
    assert Path(paths["shapes"]) == REPO / "tests" / "fixtures" / "policies" / "shapes.yaml"
    policies = moderation.load_policies(paths)
    default = policies["default"]
    assert default.model == "itm-base"
    names = {category.name for category in default.categories}
    for expected in (
        "explicit_nudity",
        "suggestive",
        "violence",
        "weapons",
        "visually_disturbing",
        "drugs_and_tobacco",
        "alcohol",
        "hate_symbols",
        "gambling",
        "rude_gestures",
    ):
        assert expected in names
    assert "PLACEHOLDERS" in (REPO / "worker" / "policies" / "default.yaml").read_text()
    assert policies["shapes"].model == "shapes-match"


def test_extra_policies_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = write(tmp_path, policy_dict())
    monkeypatch.setenv("BLIPQ_POLICIES", f'{{"test": "{path}"}}')
    assert Settings().policy_map()["test"] == str(path)


# --- the decision --------------------------------------------------------------------------------


def test_flags_and_decision() -> None:
    assert moderation.flag(0.49, 0.5, 0.8) == "none"
    assert moderation.flag(0.5, 0.5, 0.8) == "review"
    assert moderation.flag(0.8, 0.5, 0.8) == "block"
    assert moderation.flag(0.9, 0.9, 0.9) == "block"
    assert moderation.decide([]) == "allow"
    assert moderation.decide(["none", "none"]) == "allow"
    assert moderation.decide(["none", "review"]) == "review"
    assert moderation.decide(["review", "block", "none"]) == "block"


def test_scores_roll_up_to_parents_and_unlisted_prompts_score_zero() -> None:
    raw = policy_dict()
    raw["categories"].append(
        {
            "name": "deep",
            "parent": "red_triangle",
            "prompts": ["a small red triangle"],
            "review_threshold": 0.9,
            "block_threshold": 0.95,
        }
    )
    policy = Policy.model_validate(raw)
    # prompts: 0-1 animals, 2-3 red, 4-5 red_triangle, 6-9 vehicles, 10 deep
    out = moderation.moderate(policy, {1: 0.3, 2: 0.2, 4: 0.55, 10: 0.96})
    scores = {c.name: c.score for c in out.categories}
    assert scores == {
        "animals": 0.3,
        "red": 0.96,  # its own 0.2, child 0.55, grandchild 0.96
        "red_triangle": 0.96,
        "vehicles": 0.0,  # none of its prompts was shortlisted
        "deep": 0.96,
    }
    flags = {c.name: c.flagged for c in out.categories}
    assert flags == {
        "animals": "none",
        "red": "block",
        "red_triangle": "block",
        "vehicles": "none",
        "deep": "block",
    }
    assert out.decision == "block"
    assert (out.policy, out.version) == ("test", "1")
    assert out.categories[2].parent == "red"
    assert out.categories[2].review_threshold == 0.5

    review = moderation.moderate(policy, {0: 0.45, 5: 0.1})
    assert review.decision == "review"
    assert [c.flagged for c in review.categories] == ["review", "none", "none", "none", "none"]
    assert moderation.moderate(policy, {}).decision == "allow"


# --- scoring with a tiny model -------------------------------------------------------------------


def images(count: int, seed: int = 5) -> list[Image.Image]:
    return [Image.open(io.BytesIO(d)).convert("RGB") for d in sample_jpegs(count, seed=seed)]


def tiny_runner(directory: Path, policies: dict[str, Policy]) -> MatchRunner:
    from worker.settings import ModelSpec

    runner = MatchRunner(ModelSpec(name="tiny", source=str(directory), family="match"), CPU)
    runner.load()
    runner.use_policies(policies)
    return runner


def jobs_for(count: int, policy: str = "test") -> list[ModerationJob]:
    return [
        ModerationJob(image=f"s3://bkt/{i}.jpg", model="tiny", policy=policy) for i in range(count)
    ]


def reference(model: Any, processor: Any, policy: Policy, image: Image.Image) -> dict[str, Any]:
    """Brute force with the public forward: ITC and ITM for every prompt, one at a time."""
    itm, itc = [], []
    for prompt in policy.prompts:
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        with torch.inference_mode():
            itm.append(model(**inputs).itm_score.softmax(dim=-1)[0, 1].item())
            itc.append(model(**inputs, use_itm_head=False).itm_score[0, 0].item())
    shortlist = sorted(range(len(itc)), key=lambda i: -itc[i])[: policy.k]
    owners = policy.prompt_owners
    own = [max((itm[i] for i in shortlist if owners[i] == c), default=0.0) for c in range(4)]
    return {"shortlist": set(shortlist), "scores": moderation.rolled_up(policy, own), "itm": itm}


def test_shortlist_and_itm_equal_a_brute_force_reference(tiny_match_dir: Path) -> None:
    policy = Policy.model_validate(policy_dict())
    runner = tiny_runner(tiny_match_dir, {"test": policy})
    pics = images(4)
    items = [runner.prepare(job, pic) for job, pic in zip(jobs_for(4), pics, strict=True)]
    bank = runner.prompt_bank(policy)
    with torch.inference_mode():
        embeds = runner.model.vision_model(
            pixel_values=torch.stack([item.pixel_values for item in items])
        ).last_hidden_state
        shortlists = moderation.shortlist_scores(runner.model, bank, embeds, policy.k)
    outputs = runner.run_batch(items)

    from transformers import BlipForImageTextRetrieval, BlipProcessor

    processor = BlipProcessor.from_pretrained(tiny_match_dir)
    model = BlipForImageTextRetrieval.from_pretrained(tiny_match_dir).eval()
    for pic, shortlist, got in zip(pics, shortlists, outputs, strict=True):
        ref = reference(model, processor, policy, pic)
        assert set(shortlist) == ref["shortlist"]
        for prompt, probability in shortlist.items():
            assert abs(probability - ref["itm"][prompt]) < 1e-5
        assert isinstance(got, Moderated)
        for category, expected in zip(got.output.categories, ref["scores"], strict=True):
            assert abs(category.score - expected) < 1e-5, (category.name, category.score, expected)
        # with k=3 of 10 prompts, some category always gets 0 (nothing shortlisted)
        assert sum(c.score == 0.0 for c in got.output.categories) >= 1


def test_batched_equals_one_at_a_time(tiny_match_dir: Path) -> None:
    policy = Policy.model_validate(policy_dict(k=5))
    runner = tiny_runner(tiny_match_dir, {"test": policy})
    pics = images(7, seed=9)
    items = [runner.prepare(job, pic) for job, pic in zip(jobs_for(7), pics, strict=True)]
    batched = runner.run_batch(items)
    assert len(batched) == 7
    for item, got in zip(items, batched, strict=True):
        (alone,) = runner.run_batch([item])
        assert got.output.decision == alone.output.decision
        for a, b in zip(got.output.categories, alone.output.categories, strict=True):
            assert a.name == b.name and a.flagged == b.flagged
            assert abs(a.score - b.score) < 1e-5


def test_prompts_are_encoded_once_and_each_image_once(tiny_match_dir: Path) -> None:
    policy = Policy.model_validate(policy_dict())
    runner = tiny_runner(tiny_match_dir, {})  # no policy yet: nothing encoded
    calls = {"text": 0, "itm": 0, "vision": 0, "images": 0}

    def on_text(_module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        key = "itm" if kwargs.get("encoder_hidden_states") is not None else "text"
        calls[key] += 1

    def on_vision(_module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        calls["vision"] += 1
        calls["images"] += len(kwargs["pixel_values"])

    runner.model.text_encoder.register_forward_pre_hook(on_text, with_kwargs=True)
    runner.model.vision_model.register_forward_pre_hook(on_vision, with_kwargs=True)
    runner.use_policies({"test": policy})  # written for this model: encoded at once
    assert calls == {"text": 1, "itm": 0, "vision": 0, "images": 0}
    pics = images(5)
    for batch in ([0, 1, 2], [3], [4, 0]):
        jobs = jobs_for(len(batch))
        runner.run_batch([runner.prepare(jobs[i], pics[b]) for i, b in enumerate(batch)])
    # still one text encoding of the prompts; one vision pass and one ITM pass per batch
    assert calls == {"text": 1, "itm": 3, "vision": 3, "images": 6}

    lazy = tiny_runner(tiny_match_dir, {})
    lazy.policies = {"test": policy}  # bypass use_policies: encoded on first use
    counted = {"text": 0}
    lazy.model.text_encoder.register_forward_pre_hook(
        lambda _m, _a, kw: counted.__setitem__(
            "text", counted["text"] + (kw.get("encoder_hidden_states") is None)
        ),
        with_kwargs=True,
    )
    for _ in range(2):
        lazy.run_batch([lazy.prepare(jobs_for(1)[0], pics[0])])
    assert counted["text"] == 1


def test_unknown_policy_and_wrong_model_are_invalid_jobs(tiny_match_dir: Path) -> None:
    policy = Policy.model_validate(policy_dict())
    other = Policy.model_validate(policy_dict(name="other", model="itm-base"))
    runner = tiny_runner(tiny_match_dir, {"test": policy, "other": other})
    pic = images(1)[0]
    with pytest.raises(JobFailure) as info:
        runner.prepare(jobs_for(1, policy="nope")[0], pic)
    assert info.value.code == ErrorCode.INVALID_JOB
    assert "unknown moderation policy 'nope'" in info.value.message
    assert "['other', 'test']" in info.value.message
    with pytest.raises(JobFailure) as info:
        runner.prepare(jobs_for(1, policy="other")[0], pic)
    assert info.value.code == ErrorCode.INVALID_JOB
    assert "model='itm-base'" in info.value.message


def test_match_and_moderation_items_never_share_a_batch(tiny_match_dir: Path) -> None:
    first = Policy.model_validate(policy_dict())
    second = Policy.model_validate(policy_dict(name="second"))
    runner = tiny_runner(tiny_match_dir, {"test": first, "second": second})
    pic = images(1)[0]
    match = runner.prepare(MatchJob(image="s3://bkt/a.jpg", model="tiny", texts=["a cat"]), pic)
    one = runner.prepare(jobs_for(1)[0], pic)
    two = runner.prepare(jobs_for(1, policy="second")[0], pic)
    keys = {runner.group_key(match), runner.group_key(one), runner.group_key(two)}
    assert len(keys) == 3
    with pytest.raises(ValueError, match="one batch"):
        runner.run_batch([match, one])
    assert runner.kinds == ("match", "moderate")


def test_bind_validates_every_configured_policy(
    tiny_match_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write(tmp_path, policy_dict(), "test.yaml")
    runner = tiny_runner(tiny_match_dir, {})
    monkeypatch.setenv("BLIPQ_POLICIES", f'{{"test": "{good}"}}')
    runner.bind({}, Settings())
    assert {"default", "test"} <= set(runner.policies)
    assert set(runner._prompt_banks) == {"test"}  # only the policy written for this model

    raw = policy_dict()
    raw["categories"][2]["parent"] = "colours"
    bad = write(tmp_path, raw, "bad.yaml")
    monkeypatch.setenv("BLIPQ_POLICIES", f'{{"test": "{bad}"}}')
    with pytest.raises(PolicyError, match=r"bad\.yaml.*'colours'"):
        runner.bind({}, Settings())
