"""docker/Dockerfile and docker/compose.yaml checked without a Docker engine: what they copy exists, the image runs
as a non-root user, services only bind loopback, secrets come from the environment, the GPU worker asks for GPUs."""

import os
import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "docker" / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_the_dockerfile_copies_what_exists_and_runs_as_a_non_root_user():
    steps = dockerfile()
    assert steps[0][0] == "FROM" and ":" in steps[0][1] and "cuda" in steps[0][1]  # a pinned CUDA runtime base
    for word, rest in steps:
        if word == "COPY":
            *sources, _ = rest.split()
            assert all((ROOT / s).exists() for s in sources), rest
    users = [rest for word, rest in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    last_user = max(i for i, (word, _) in enumerate(steps) if word == "USER")
    assert all(word != "RUN" for word, _ in steps[last_user:]), "nothing runs as root after USER"
    assert steps[-1][0] == "CMD"
    installed = " ".join(rest for word, rest in steps if word == "RUN")
    assert "pip install ." in installed and "-e" not in installed.split("pip install")[-1].split()


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_the_compose_file_holds_the_cluster_and_keeps_secrets_and_ports_in():
    doc = compose()
    services = doc["services"]
    assert {"postgres", "prefect-server", "prefect-worker", "ray-head", "ray-gpu-worker"} <= set(services)
    for name, svc in services.items():
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), (name, port)  # loopback only
        for dep in svc.get("depends_on", {}):
            assert dep in services, (name, dep)
        env = svc.get("environment", {})
        for key, value in (env.items() if isinstance(env, dict) else []):
            if any(word in key for word in ("PASSWORD", "TOKEN", "SECRET")):
                assert str(value).startswith("${"), (name, key)  # from the environment, never written here
    url = services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert url.startswith("postgresql+asyncpg://") and "${POSTGRES_PASSWORD" in url
    gpus = services["ray-gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpus and gpus[0]["capabilities"] == ["gpu"]
    assert services["ray-head"]["image"] == services["prefect-worker"]["image"] == "pixart-pipeline:latest"
    assert services["ray-head"]["build"]["dockerfile"] == "docker/Dockerfile"
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in services["prefect-worker"]["environment"]
    assert services["prefect-worker"]["environment"]["RAY_AUTH_MODE"] == "token"


def image_env() -> dict[str, str]:
    """The environment the image's ENV instructions give a process started without a shell (exec form)."""
    env: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def test_deploying_from_the_worker_image_records_its_code_directory(monkeypatch):
    """`docker compose run --rm prefect-worker prefect deploy --all` (no shell, so no PWD of its own): the pull step's
    directory, templated the way `prefect deploy` does it, is the image's WORKDIR, where prefect.yaml and every
    entrypoint were copied."""
    from prefect.utilities.templating import apply_values

    steps = dockerfile()
    workdir = [rest for word, rest in steps if word == "WORKDIR"][-1]
    copied = {dest: sources for word, rest in steps if word == "COPY" for *sources, dest in [rest.split()]}
    assert "prefect.yaml" in copied["./"]  # into WORKDIR
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    for deployment in project["deployments"]:
        top = deployment["entrypoint"].split("/")[0]
        assert top in copied, deployment["entrypoint"]  # `COPY flows flows`: /app/flows/<file>.py

    for name in list(os.environ):
        monkeypatch.delenv(name)
    for name, value in image_env().items():
        monkeypatch.setenv(name, value)
    pull = apply_values(project["pull"], os.environ, remove_notset=False)  # prefect deploy's own templating
    [[(step, args)]] = [list(s.items()) for s in pull]
    assert step == "prefect.deployments.steps.set_working_directory"
    assert args["directory"] == workdir == "/app"


def test_the_compose_file_and_docker_readme_say_to_deploy_from_the_image():
    header = [line for line in (ROOT / "docker" / "compose.yaml").read_text().splitlines() if line.startswith("#")]
    deploys = [line for line in header if "deploy --all" in line]
    assert deploys and all("run --rm prefect-worker prefect" in line for line in deploys), deploys  # not the host
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "run --rm prefect-worker prefect --no-prompt deploy --all" in readme
    for needed in ("RAY_ADDRESS", "KubeRay", "ray job submit", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE=token",
                   "AWS_ACCESS_KEY_ID", "AwsCredentials", "pixart-gpu"):
        assert needed in readme, needed
    assert "docker/README" in (ROOT / "flows" / "_prefect.py").read_text()  # the missing-limit error points here
