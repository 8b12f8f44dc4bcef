"""docker/: no Docker engine runs here, so check by reading that the files say what the stack does.

The backend and worker commands of the image must be the ones backend/stack.py runs (and so the
end-to-end test and `subdisc up`), and Label Studio must get the env vars the notes require.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from backend import stack
from workers.connection import DEFAULT_QUEUE

DOCKER = Path(__file__).resolve().parents[1] / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text()


def test_compose_has_the_four_services(services):
    assert {"label-studio", "redis", "backend", "worker"} <= set(services)


def test_label_studio_image_is_the_version_we_test(services):
    assert services["label-studio"]["image"] == f"heartexlabs/label-studio:{stack.LABEL_STUDIO_VERSION}"


def test_label_studio_env_matches_the_headless_run(services):
    env = services["label-studio"]["environment"]
    wanted = stack.label_studio_env(username="u", password="p", token="t", document_root="/data")
    assert set(wanted) <= set(env)
    for key in ("LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN", "ML_BLOCK_LOCAL_IP", "SSRF_PROTECTION_ENABLED",
                "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED", "LATEST_VERSION_CHECK", "SENTRY_DSN",
                stack.FAST_PREDICTION_IMPORT):
        assert str(env[key]).lower() == wanted[key], key
    # The token Label Studio creates is the one the backend posts predictions with.
    assert env["LABEL_STUDIO_USER_TOKEN"] == services["backend"]["environment"]["LABEL_STUDIO_API_KEY"]


def _mount_target(volumes: list[str], source_var: str = "SUBDISC_PHOTOS") -> str:
    hits = [v for v in volumes if source_var in v]
    assert len(hits) == 1, volumes
    return hits[0].rsplit(":", 2)[1] if hits[0].endswith((":ro", ":rw")) else hits[0].rsplit(":", 1)[1]


def test_local_files_are_shared_below_the_document_root(services):
    root = services["label-studio"]["environment"]["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    photos = _mount_target(services["label-studio"]["volumes"])
    # A storage path must be a sub-folder of the document root, never the root itself.
    assert Path(photos).parent == Path(root)
    for name in ("backend", "worker"):
        assert services[name]["environment"]["SUBDISC_LOCAL_FILES_ROOT"] == root
        assert _mount_target(services[name]["volumes"]) == photos
    setup = services["setup"]["command"]
    assert setup[setup.index("--images") + 1] == photos


def test_redis_is_append_only(services):
    command = services["redis"]["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])


def test_backend_command_is_the_one_the_stack_runs(services, dockerfile):
    port = 9090
    expected = ["subdisc", *stack.backend_args("0.0.0.0", port, 2)]
    assert services["backend"]["command"] == expected
    cmd = re.search(r"^CMD (\[.*\])\s*$", dockerfile, re.M)
    assert cmd and json.loads(cmd.group(1)) == expected
    assert f"EXPOSE {port}" in dockerfile
    # The same sub-command and options parse in our own CLI.
    from backend.cli import build_parser
    args = build_parser().parse_args(expected[1:])
    assert args.command == "serve"


def test_worker_command_is_the_one_the_stack_runs(services):
    url = services["worker"]["environment"]["SUBDISC_REDIS_URL"]
    assert services["worker"]["command"] == ["python", "-m", "workers.worker",
                                             *stack.worker_args(url, DEFAULT_QUEUE)]
    assert urlsplit(url).hostname == "redis"
    assert int(services["worker"]["deploy"]["replicas"].split(":-")[-1].rstrip("}")) >= 1


def test_services_reach_each_other_by_name_not_localhost(services):
    for name in ("backend", "worker", "setup"):
        env = services[name]["environment"]
        assert urlsplit(env["LABEL_STUDIO_URL"]).hostname == "label-studio"
        assert urlsplit(env["SUBDISC_REDIS_URL"]).hostname == "redis"
    setup = services["setup"]["command"]
    backend_url = urlsplit(setup[setup.index("--backend") + 1])
    assert backend_url.hostname == "backend"
    backend_cmd = services["backend"]["command"]
    assert backend_url.port == int(backend_cmd[backend_cmd.index("--port") + 1])
    assert setup[:3] == ["python", "-m", "backend.ls_setup"]


def test_dockerfile_installs_wheels_only(dockerfile):
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert len(stages) == 1 and stages[0].startswith("python:3.11-slim")
    for compiling in ("cmake", "build-essential", "libopenblas", "--no-binary", "apt-get"):
        assert compiling not in dockerfile
    assert "pip install --no-cache-dir --prefer-binary ." in dockerfile
