"""scripts/tpu_pod.py against a stand-in `gcloud`, and scripts/reproduce_benchmarks.sh --dry-run.

The stand-in is a small Python script put first on PATH: it appends its arguments (JSON, one line
per call) to $FAKE_GCLOUD_RECORD, prints "worker N ok" for `ssh --worker=N`, the slice's
endpoints for `describe`, and exits 0, or 3 for the worker named by $FAKE_GCLOUD_FAIL_WORKER, or
$FAKE_GCLOUD_EXIT for every call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU_POD = ROOT / "scripts" / "tpu_pod.py"
REPRODUCE = ROOT / "scripts" / "reproduce_benchmarks.sh"
TPU_VM = ["compute", "tpus", "tpu-vm"]

FAKE_GCLOUD = """\
#!{python}
import json, os, sys

args = sys.argv[1:]
fd = os.open(os.environ["FAKE_GCLOUD_RECORD"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
os.write(fd, (json.dumps(args) + "\\n").encode())
os.close(fd)
worker = next((a.split("=", 1)[1] for a in args if a.startswith("--worker=")), None)
if "ssh" in args:
    print(f"worker {{worker}} ok", flush=True)
    if worker == os.environ.get("FAKE_GCLOUD_FAIL_WORKER"):
        print(f"worker {{worker}} fails", flush=True)
        sys.exit(3)
elif "describe" in args:
    print(";".join(f"10.0.0.{{i}}" for i in range(int(os.environ["FAKE_GCLOUD_ENDPOINTS"]))))
sys.exit(int(os.environ.get("FAKE_GCLOUD_EXIT", "0")))
"""


class Gcloud:
    """Runs tpu_pod.py with the stand-in gcloud first on PATH; ``calls()`` reads the record."""

    def __init__(self, tmp_path: Path):
        self.cwd = tmp_path / "cwd"
        self.cwd.mkdir()
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        fake = bin_dir / "gcloud"
        fake.write_text(FAKE_GCLOUD.format(python=sys.executable))
        fake.chmod(0o755)
        self.record = tmp_path / "gcloud_calls.jsonl"
        self.env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
                    "FAKE_GCLOUD_RECORD": str(self.record), "FAKE_GCLOUD_ENDPOINTS": "2"}
        self.env.pop("JDIT_REPO_URL", None)

    def __call__(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(TPU_POD), *args], cwd=self.cwd,
                              env={**self.env, **env}, capture_output=True, text=True,
                              timeout=60)

    def calls(self) -> list[list[str]]:
        if not self.record.exists():
            return []
        return [json.loads(line) for line in self.record.read_text().splitlines()]


@pytest.fixture
def gcloud(tmp_path: Path) -> Gcloud:
    return Gcloud(tmp_path)


def _ok(proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _usage_error(proc: subprocess.CompletedProcess[str], *words: str) -> None:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "error:" in proc.stderr
    for word in words:
        assert word in proc.stderr


def _option(call: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in call if a.startswith(name + "=")]
    assert len(values) == 1, (name, call)
    return values[0]


def _shell_syntax_ok(script: str) -> None:
    for shell in ("sh", "bash"):
        if shutil.which(shell):
            check = subprocess.run([shell, "-n", "-c", script], capture_output=True, text=True)
            assert check.returncode == 0, (shell, check.stderr, script)


# ---------------------------------------------------------------------------------- create


def test_create_passes_type_zone_runtime_project_and_spot(gcloud):
    _ok(gcloud("create", "pod", "--type", "v6e-16", "--zone", "europe-west4-a",
               "--runtime", "v2-alpha-tpuv6e", "--project", "my-proj", "--spot"))
    assert gcloud.calls() == [[*TPU_VM, "create", "pod", "--zone=europe-west4-a",
                               "--accelerator-type=v6e-16", "--version=v2-alpha-tpuv6e",
                               "--project=my-proj", "--spot"]]


def test_create_defaults_and_preemptible(gcloud):
    _ok(gcloud("create", "pod", "--preemptible"))
    (call,) = gcloud.calls()
    assert call[:5] == [*TPU_VM, "create", "pod"]
    assert _option(call, "--zone") and _option(call, "--accelerator-type")
    assert _option(call, "--version")
    assert "--preemptible" in call and "--spot" not in call
    assert not any(a.startswith("--project") for a in call)


def test_create_rejects_spot_with_preemptible(gcloud):
    _usage_error(gcloud("create", "pod", "--spot", "--preemptible"))
    assert gcloud.calls() == []


# --------------------------------------------------------------------------------- install


def test_install_from_git_ref_on_every_worker(gcloud):
    _ok(gcloud("install", "pod", "--zone", "us-central2-b", "--project", "p",
               "--git-ref", "v0.1.0", "--repo", "https://example.com/jdit.git"))
    (call,) = gcloud.calls()
    assert call[:5] == [*TPU_VM, "ssh", "pod"]
    assert _option(call, "--zone") == "us-central2-b" and _option(call, "--project") == "p"
    assert _option(call, "--worker") == "all"
    script = _option(call, "--command")
    assert "git clone https://example.com/jdit.git" in script
    assert "v0.1.0" in script
    assert "pip install -e '.[tpu,data]'" in script
    assert "-m venv ~/jdit-venv" in script and ". ~/jdit-venv/bin/activate" in script
    _shell_syntax_ok(script)


def test_install_from_wheel_copies_it_to_every_worker(gcloud, tmp_path):
    wheel = tmp_path / "jdit-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")
    _ok(gcloud("install", "pod", "--zone", "z1", "--wheel", str(wheel)))
    scp, ssh = gcloud.calls()
    assert scp == [*TPU_VM, "scp", str(wheel), f"pod:{wheel.name}", "--zone=z1", "--worker=all"]
    assert ssh[:5] == [*TPU_VM, "ssh", "pod"] and _option(ssh, "--worker") == "all"
    script = _option(ssh, "--command")
    assert "pip install \"$HOME\"/'jdit-0.1.0-py3-none-any.whl[tpu,data]'" in script
    assert ". ~/jdit-venv/bin/activate" in script and "git clone" not in script
    _shell_syntax_ok(script)


def test_install_bad_inputs(gcloud, tmp_path):
    _usage_error(gcloud("install", "pod"), "--git-ref", "--wheel")
    _usage_error(gcloud("install", "pod", "--git-ref", "main", "--wheel", "x.whl"))
    _usage_error(gcloud("install", "pod", "--wheel", str(tmp_path / "missing.whl")),
                 "missing.whl")
    not_a_wheel = tmp_path / "jdit.tar.gz"
    not_a_wheel.write_bytes(b"")
    _usage_error(gcloud("install", "pod", "--wheel", str(not_a_wheel)), "wheel")
    _usage_error(gcloud("install", "pod", "--git-ref", "main"), "--repo")  # only a placeholder
    assert gcloud.calls() == []


def test_install_repo_from_environment(gcloud):
    _ok(gcloud("install", "pod", "--git-ref", "main", JDIT_REPO_URL="https://example.org/j.git"))
    (call,) = gcloud.calls()
    assert "git clone https://example.org/j.git" in _option(call, "--command")


# ------------------------------------------------------------------------------------- run

TRAIN = ["jdit", "train", "--config", "configs/shapes_tiny.py", "--workdir", "runs/a b"]


def _user_command(call: list[str]) -> list[str]:
    """The command a worker runs, from the remote shell line (``... && exec CMD``)."""
    remote = _option(call, "--command")
    _shell_syntax_ok(remote)
    return shlex.split(remote.rsplit("&& exec ", 1)[1])


def test_run_reaches_all_workers_streams_worker_0_and_logs_the_others(gcloud):
    proc = _ok(gcloud("run", "pod", "--zone", "z", "--project", "p", "--workers", "3",
                      "--log-dir", "logs", "--", *TRAIN))
    calls = gcloud.calls()
    assert sorted(_option(c, "--worker") for c in calls) == ["0", "1", "2"]
    for call in calls:
        assert call[:5] == [*TPU_VM, "ssh", "pod"]
        assert _option(call, "--zone") == "z" and _option(call, "--project") == "p"
        assert _user_command(call) == [*TRAIN, "--distributed"]
        assert "~/jdit-venv/bin/activate" in _option(call, "--command")
    assert "worker 0 ok" in proc.stdout
    assert "worker 1 ok" not in proc.stdout and "worker 2 ok" not in proc.stdout
    logs = gcloud.cwd / "logs"
    assert "worker 0 ok" in (logs / "worker_0.log").read_text()
    for worker in (1, 2):
        assert (logs / f"worker_{worker}.log").read_text().strip() == f"worker {worker} ok"


def test_run_default_log_dir(gcloud):
    _ok(gcloud("run", "pod", "--workers", "2", "--", *TRAIN))
    assert (gcloud.cwd / "jdit-logs" / "pod" / "worker_1.log").read_text() == "worker 1 ok\n"


def test_run_adds_distributed_once_and_only_to_train(gcloud):
    _ok(gcloud("run", "pod", "--workers", "2", "--", *TRAIN, "--distributed"))
    for call in gcloud.calls():
        assert _user_command(call).count("--distributed") == 1
    gcloud.record.unlink()
    _ok(gcloud("run", "pod", "--workers", "2", "--", "jdit", "eval", "--workdir", "w"))
    for call in gcloud.calls():
        assert _user_command(call) == ["jdit", "eval", "--workdir", "w"]


def test_run_quotes_the_command_and_exports_env(gcloud):
    odd = ["jdit", "train", "--config", "c.py", "--workdir", "it's here; rm -rf x",
           "--config.train.steps=$((1+1))"]
    _ok(gcloud("run", "pod", "--workers", "1", "--env", "XLA_FLAGS=--a --b", "--", *odd))
    (call,) = gcloud.calls()
    assert _user_command(call) == [*odd, "--distributed"]
    assert "export XLA_FLAGS='--a --b'" in _option(call, "--command")


@pytest.mark.parametrize("failing", ["2", "0"])
def test_run_fails_when_a_worker_fails(gcloud, failing):
    proc = gcloud("run", "pod", "--workers", "3", "--log-dir", "logs", "--", *TRAIN,
                  FAKE_GCLOUD_FAIL_WORKER=failing)
    assert proc.returncode != 0
    assert f"worker {failing} failed" in proc.stderr
    assert len(gcloud.calls()) == 3  # every worker was started
    assert f"worker {failing} fails" in (gcloud.cwd / "logs" / f"worker_{failing}.log").read_text()


@pytest.mark.parametrize("accelerator,workers", [
    ("v5litepod-16", 4), ("v5litepod-8", 1), ("v6e-32", 8), ("v4-32", 4), ("v5p-8", 1)])
def test_run_derives_the_workers_from_the_type(gcloud, accelerator, workers):
    _ok(gcloud("run", "pod", "--type", accelerator, "--", *TRAIN))
    assert sorted(int(_option(c, "--worker")) for c in gcloud.calls()) == list(range(workers))


def test_run_counts_the_workers_with_describe(gcloud):
    _ok(gcloud("run", "pod", "--zone", "z", "--", *TRAIN, FAKE_GCLOUD_ENDPOINTS="4"))
    describe, *ssh = gcloud.calls()
    assert describe[:5] == [*TPU_VM, "describe", "pod"] and "--zone=z" in describe
    assert sorted(int(_option(c, "--worker")) for c in ssh) == [0, 1, 2, 3]


def test_run_bad_inputs(gcloud):
    _usage_error(gcloud("run", "pod", "--workers", "2"), "after `--`")
    _usage_error(gcloud("run", "pod", "--workers", "2", "--"), "after `--`")
    _usage_error(gcloud("run", "pod", "--type", "v7x-8", "--", *TRAIN), "--workers")
    _usage_error(gcloud("run", "pod", "--workers", "0", "--", *TRAIN), "--workers")
    _usage_error(gcloud("run", "pod", "--workers", "1", "--env", "NOVALUE", "--", *TRAIN),
                 "--env")
    _usage_error(gcloud("delete", "pod", "--", "jdit", "train"), "run")
    assert gcloud.calls() == []


# ---------------------------------------------------------------------------- copy, delete


def test_copy_from_worker_0_by_default(gcloud):
    _ok(gcloud("copy", "pod", "--zone", "z", "--from", "jdit/runs/x", "--to", "back"))
    assert gcloud.calls() == [[*TPU_VM, "scp", "pod:jdit/runs/x", "back", "--zone=z",
                               "--worker=0", "--recurse"]]
    assert (gcloud.cwd / "back").is_dir()
    _ok(gcloud("copy", "pod", "--zone", "z", "--from", "r", "--to", "back", "--worker", "2"))
    assert _option(gcloud.calls()[-1], "--worker") == "2"


def test_delete(gcloud):
    _ok(gcloud("delete", "pod", "--zone", "z", "--project", "p"))
    assert gcloud.calls() == [[*TPU_VM, "delete", "pod", "--zone=z", "--project=p", "--quiet"]]


def test_gcloud_failure_is_the_exit_status(gcloud):
    proc = gcloud("delete", "pod", FAKE_GCLOUD_EXIT="5")
    assert proc.returncode == 5 and "failed" in proc.stderr


# --------------------------------------------------------------------------------- dry run


def _printed_gcloud(stdout: str) -> list[list[str]]:
    """The gcloud commands of a dry run (shell redirections of `run`'s lines dropped)."""
    out = []
    for line in stdout.splitlines():
        words = shlex.split(line)
        if words and words[0] == "gcloud":
            for stop in (">", "2>&1", "&", "|"):
                if stop in words:
                    words = words[:words.index(stop)]
            out.append(words[1:])
    return out


@pytest.mark.parametrize("where", ["before", "after"])
def test_dry_run_prints_every_command_and_runs_nothing(gcloud, tmp_path, where):
    wheel = tmp_path / "jdit-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"PK")

    def dry(*args: str) -> list[list[str]]:
        argv = ["--dry-run", *args] if where == "before" else [args[0], "--dry-run", *args[1:]]
        return _printed_gcloud(_ok(gcloud(*argv)).stdout)

    assert dry("create", "pod", "--zone", "z", "--type", "v6e-16", "--runtime", "rt",
               "--project", "p", "--spot") == [
        [*TPU_VM, "create", "pod", "--zone=z", "--accelerator-type=v6e-16", "--version=rt",
         "--project=p", "--spot"]]
    (git,) = dry("install", "pod", "--git-ref", "main", "--repo", "https://example.com/j.git")
    assert "git clone https://example.com/j.git" in _option(git, "--command")
    scp, ssh = dry("install", "pod", "--wheel", str(wheel))
    assert scp[:4] == [*TPU_VM, "scp"] and _option(ssh, "--worker") == "all"
    run = dry("run", "pod", "--type", "v5litepod-16", "--", *TRAIN)
    assert sorted(_option(c, "--worker") for c in run) == ["0", "1", "2", "3"]
    assert all(_user_command(c) == [*TRAIN, "--distributed"] for c in run)
    assert dry("copy", "pod", "--from", "r", "--to", "back") == [
        [*TPU_VM, "scp", "pod:r", "back", f"--zone={_option(run[0], '--zone')}", "--worker=0",
         "--recurse"]]
    assert dry("delete", "pod", "--zone", "z") == [[*TPU_VM, "delete", "pod", "--zone=z",
                                                    "--quiet"]]
    assert gcloud.calls() == [] and not gcloud.record.exists()
    assert list(gcloud.cwd.iterdir()) == []  # no log folder, no copy target


def test_dry_run_of_run_is_a_runnable_shell_script(gcloud):
    proc = _ok(gcloud("--dry-run", "run", "pod", "--workers", "2", "--log-dir", "L", "--",
                      *TRAIN))
    lines = proc.stdout.splitlines()
    assert lines[0] == "mkdir -p L" and lines[-1] == "wait"
    assert lines[1].endswith("> L/worker_1.log 2>&1 &")
    assert lines[2].endswith("2>&1 | tee L/worker_0.log")
    _shell_syntax_ok(proc.stdout)


def test_dry_run_of_run_needs_the_worker_count(gcloud):
    _usage_error(gcloud("--dry-run", "run", "pod", "--", *TRAIN), "--workers")


# ----------------------------------------------------------------------- the rule, directly


def test_hosts_for_type():
    spec = importlib.util.spec_from_file_location("tpu_pod", TPU_POD)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rule = module.hosts_for_type
    assert [rule(t) for t in ("v5litepod-1", "v5litepod-4", "v5litepod-8", "v5litepod-16",
                              "v5litepod-256", "v6e-8", "v6e-64")] == [1, 1, 1, 4, 64, 1, 16]
    assert [rule(t) for t in ("v2-8", "v3-32", "v4-8", "v4-16", "v5p-128")] == [1, 4, 1, 2, 16]
    assert rule("v7x-8") is None and rule("v5litepod-0") is None and rule("nonsense") is None
    assert module.with_distributed(["python", "-m", "jdit.cli", "train"])[-1] == "--distributed"
    assert module.with_distributed(["jdit", "train", "--process-id", "0"]).count(
        "--distributed") == 0


# ------------------------------------------------------------------ reproduce_benchmarks.sh


def _benchmark_commands(*args: str) -> list[list[str]]:
    proc = subprocess.run(["bash", str(REPRODUCE), "--dry-run", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    commands = []
    for line in proc.stdout.splitlines():
        words = shlex.split(line)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            words = words[1:]  # ALLOW_MULTIPLE_LIBTPU_LOAD=1
        assert words and words[0] == "jdit", line
        commands.append(words)
    return commands


def test_reproduce_benchmarks_dry_run_commands_are_known_to_jdit():
    from jdit.cli import BENCHMARKS, bench_parser, build_parser

    parser = build_parser()
    commands = _benchmark_commands()
    assert any(c[1] == "bench" for c in commands) and any(c[1] == "aot" for c in commands)
    unknown = [c for c in commands if c[1] == "bench" and c[2] not in BENCHMARKS]
    assert not unknown, f"`jdit bench` has no sub-command for {unknown}"
    for words in commands:
        assert words[1] in ("bench", "aot"), words
        try:
            if words[1] == "bench":  # each benchmark parses its own arguments
                bench_parser(words[2])[0].parse_args(words[3:])
                continue
            _, extra = parser.parse_known_args(words[1:])
        except SystemExit:
            pytest.fail(f"jdit's parser rejects: {shlex.join(words)}")
        assert all(e.startswith("--config.") and "=" in e for e in extra), words

    missing = []
    for words in commands:
        for i, word in enumerate(words):
            if word == "--config":
                path = words[i + 1]
            elif word.startswith("--config="):
                path = word.split("=", 1)[1]
            else:
                continue
            if ":" in path and path.split(":", 1)[0].endswith(".py"):
                path = path.split(":", 1)[0]
            if not (ROOT / path).is_file():
                missing.append(path)
    missing = sorted(set(missing))
    assert not missing, f"config files named by reproduce_benchmarks.sh do not exist: {missing}"


def test_reproduce_benchmarks_only_and_out():
    commands = _benchmark_commands("--only", "jdit aot", "--out", "reports dir")
    assert commands and all(c[1] == "aot" for c in commands)
    numbers = []
    for words in commands:
        path = words[words.index("--json") + 1]
        match = re.fullmatch(r"reports dir/(\d+)_[a-z0-9_]+\.json", path)
        assert match, path
        numbers.append(int(match.group(1)))
    assert numbers == sorted(set(numbers))  # numbered in document order, one file each
    everything = _benchmark_commands()
    assert len(everything) > len(commands)
    assert all("--json" not in c for c in everything)
