"""configs/ and infra/: every YAML parses, configs load through the CLI's own validation,
and the infrastructure manifests point at files that exist in this repository."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import fields

import pytest
import yaml

from pipeline.config import EmbedConfig, build_config
from pipeline.errors import UsageError
from pipeline.config import MineConfig, build_mine_config
from tests.conftest import REPO, assert_one_line_error, cli

CONFIGS = os.path.join(REPO, "configs")
INFRA = os.path.join(REPO, "infra")
EMBED_CONFIGS = ["local.yaml", "s3.yaml", "cluster.yaml"]
IMAGE_ROOT = "/home/ray/embedpipe"  # WORKDIR of infra/Dockerfile


def yaml_files() -> list[str]:
    found = glob.glob(os.path.join(CONFIGS, "*.yaml")) + glob.glob(os.path.join(INFRA, "**", "*.yaml"), recursive=True)
    return sorted(os.path.relpath(p, REPO) for p in found)


def load(relpath: str):
    with open(os.path.join(REPO, relpath), encoding="utf-8") as f:
        return yaml.safe_load(f)


def test_the_expected_files_exist():
    names = set(yaml_files())
    assert {f"configs/{n}" for n in EMBED_CONFIGS + ["mine.yaml", "runtime_env.yaml"]} <= names
    assert {"infra/kuberay/rayjob.yaml", "infra/kuberay/raycluster.yaml", "infra/cluster-launcher/aws-gpu.yaml"} <= names
    assert os.path.isfile(os.path.join(INFRA, "Dockerfile"))


@pytest.mark.parametrize("relpath", yaml_files())
def test_every_yaml_parses_to_a_mapping(relpath):
    assert isinstance(load(relpath), dict)


@pytest.mark.parametrize("name", EMBED_CONFIGS)
def test_embed_configs_load_through_the_cli_validation_and_document_every_field(name):
    path = os.path.join(CONFIGS, name)
    config = build_config(path)  # as `embedpipe embed --config` does, input and output from the file
    assert isinstance(config, EmbedConfig) and config.input and config.output
    text = open(path, encoding="utf-8").read()
    undocumented = [f.name for f in fields(EmbedConfig) if not re.search(rf"^#? ?{f.name}:.*#", text, re.M)]
    assert not undocumented, f"{name} does not document {undocumented}"


def test_cluster_config_is_a_gpu_run_from_s3_to_s3():
    config = build_config(os.path.join(CONFIGS, "cluster.yaml"))
    assert config.input.startswith("s3://") and config.output.startswith("s3://")
    assert config.device == "cuda" and config.ray_address == "auto"
    assert config.storage_options == {}  # never credentials in a file


def test_mine_config_loads_through_the_cli_validation_and_documents_every_field():
    path = os.path.join(CONFIGS, "mine.yaml")
    config = build_mine_config(path)
    assert isinstance(config, MineConfig) and config.embeddings and config.output and config.top_k == 100
    assert build_mine_config(path, top_k=7).top_k == 7  # flags override the file
    text = open(path, encoding="utf-8").read()
    undocumented = [f.name for f in fields(MineConfig) if not re.search(rf"^#? ?{f.name}:.*#", text, re.M)]
    assert not undocumented


def test_mine_config_unknown_key_and_bad_value_are_named(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("mine:\n  embeddings: e\n  output: o\n  topk: 5\n")
    with pytest.raises(UsageError, match="unknown key 'topk'"):
        build_mine_config(str(path))
    path.write_text("embeddings: e\noutput: o\nthreshold: high\n")
    with pytest.raises(UsageError, match="--threshold must be a cosine"):
        build_mine_config(str(path))
    path.write_text("output: o\n")
    with pytest.raises(UsageError, match="--embeddings is required"):
        build_mine_config(str(path))


def test_mine_cli_reads_config_and_names_an_unknown_key(tmp_path):
    (tmp_path / "m.yaml").write_text("embeddings: e\noutput: o\nblock: 5\n")
    assert_one_line_error(cli("mine", "--config", str(tmp_path / "m.yaml")), 2, "unknown key 'block'")
    (tmp_path / "ok.yaml").write_text(f"embeddings: {tmp_path / 'nope'}\noutput: {tmp_path / 'o'}\n")
    assert_one_line_error(cli("mine", "--config", str(tmp_path / "ok.yaml")), 2, "no such directory")


def test_embed_cli_loads_the_cluster_config_and_plans_for_this_machine(tmp_path):
    """Through the CLI as a user runs it: cluster.yaml with local paths, dry run; a machine without GPUs
    is refused for device: cuda in one line, and planned on CPU with --device auto."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("one\ntwo\n")
    base = ["embed", "--config", "configs/cluster.yaml", "--input", str(tmp_path / "in"), "--output",
            str(tmp_path / "out"), "--ray-address", "", "--dry-run"]
    assert_one_line_error(cli(*base), 2, "--device cuda: the Ray cluster has no GPUs")
    proc = cli(*base, "--device", "auto", "--dtype", "auto")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "a.txt (txt, 8 B): 2 documents (counted)" in proc.stdout and "device cpu" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_runtime_env_is_a_valid_ray_runtime_env_that_keeps_the_venv_and_data_out():
    from ray.runtime_env import RuntimeEnv

    data = load("configs/runtime_env.yaml")
    env = RuntimeEnv(**data)  # Ray's own validation of the fields
    assert env["working_dir"] == "."
    assert {".venv/", "data/", "output/", ".git/"} <= set(data["excludes"])
    assert not any(k.startswith("AWS_") and "KEY" in k for k in data.get("env_vars", {}))


# --------------------------------------------------------------------------- infra


def repo_references(text: str) -> set[str]:
    """Paths of jobs/ and configs/ files named in a text (entry points and configs)."""
    return set(re.findall(r"\b((?:jobs|configs)/[\w.-]+\.(?:py|yaml))", text))


def test_dockerfile_copies_existing_files_into_the_image_root_and_installs_the_project():
    text = open(os.path.join(INFRA, "Dockerfile"), encoding="utf-8").read()
    assert re.search(r"^FROM rayproject/ray:2\.60\.\d+-py311-gpu$", text, re.M)  # the Ray version embedpipe pins
    assert re.search(rf"^WORKDIR {IMAGE_ROOT}$", text, re.M)
    copied = []
    for line in re.findall(r"^COPY (.+)$", text, re.M):
        sources = [w for w in line.split() if not w.startswith("--")][:-1]
        copied += [s.rstrip("/") for s in sources]
    assert copied and all(os.path.exists(os.path.join(REPO, s)) for s in copied), copied
    assert {"pyproject.toml", "pipeline", "jobs", "configs"} <= set(copied)
    assert "README.md" in copied  # pyproject's readme: `pip install .` needs it
    assert 'pip install --no-cache-dir "torch==2.13.0"' in text and "pip install --no-cache-dir ." in text


@pytest.mark.parametrize("name", ["rayjob.yaml", "raycluster.yaml"])
def test_kuberay_manifests_have_a_gpu_worker_group_on_the_project_image(name):
    data = load(f"infra/kuberay/{name}")
    assert data["apiVersion"] == "ray.io/v1" and data["kind"] == ("RayJob" if name == "rayjob.yaml" else "RayCluster")
    spec = data["spec"]["rayClusterSpec"] if data["kind"] == "RayJob" else data["spec"]
    assert spec["rayVersion"].startswith("2.60")
    groups = spec["workerGroupSpecs"]
    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu") for g in groups for c in g["template"]["spec"]["containers"]]
    assert any(int(n or 0) >= 1 for n in gpu_limits)
    images = {c["image"] for g in [spec["headGroupSpec"], *groups] for c in g["template"]["spec"]["containers"]}
    assert images == {"YOUR_REGISTRY/embedpipe:0.1.0"}
    assert "YOUR_REGISTRY/embedpipe:0.1.0" in open(os.path.join(INFRA, "Dockerfile")).read()  # the tag it builds


def test_rayjob_runs_the_real_entry_point_and_config_from_the_image():
    data = load("infra/kuberay/rayjob.yaml")
    entrypoint = data["spec"]["entrypoint"]
    assert entrypoint.split()[:2] == ["python", "jobs/embed.py"]
    referenced = repo_references(entrypoint)
    assert referenced == {"jobs/embed.py", "configs/cluster.yaml"}
    assert all(os.path.isfile(os.path.join(REPO, p)) for p in referenced)
    runtime_env = yaml.safe_load(data["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == IMAGE_ROOT  # where the Dockerfile put jobs/ and configs/


def test_cluster_launcher_yaml_passes_rays_own_validation_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    data = load("infra/cluster-launcher/aws-gpu.yaml")
    validate_config(prepare_config(data))  # Ray's schema (ray-schema.json) and its checks
    types = data["available_node_types"]
    assert any(t.get("resources", {}).get("GPU", 0) >= 1 and t.get("min_workers", 0) >= 1 for t in types.values())
    assert data["docker"]["image"] == "YOUR_REGISTRY/embedpipe:0.1.0"


def test_every_entry_point_and_config_named_in_infra_and_docs_exists():
    texts = [open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(INFRA, "**", "*"), recursive=True) if os.path.isfile(p)]
    texts.append(open(os.path.join(REPO, "README.md"), encoding="utf-8").read())
    texts += [open(p, encoding="utf-8").read() for p in glob.glob(os.path.join(REPO, "jobs", "*.py"))]
    referenced = set().union(*(repo_references(t) for t in texts))
    assert {"jobs/embed.py", "jobs/mine.py", "configs/cluster.yaml", "configs/runtime_env.yaml"} <= referenced
    missing = sorted(p for p in referenced if not os.path.isfile(os.path.join(REPO, p)))
    assert not missing
