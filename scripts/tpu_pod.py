#!/usr/bin/env python3
"""Run jdit on a Google Cloud TPU pod slice (TPU VMs), through ``gcloud compute tpus tpu-vm``.

Sub-commands, each a thin translation into ``gcloud`` commands (``--dry-run`` prints them,
shell-quoted and one per line, instead of running them):

- ``create``  create the slice (accelerator type, zone, runtime version, spot/preemptible);
- ``install`` install jdit on every worker, into a venv (``~/jdit-venv``), from a git ref (clone
  into ``~/jdit``, ``pip install -e '.[tpu,data]'``) or from a local wheel (copied to every worker);
- ``run``     run one command (``jdit ...``) on every worker at once; ``jdit train`` gets
  ``--distributed`` so that JAX discovers the slice's hosts by itself. Worker 0's output is
  streamed to the terminal, the other workers' outputs go to log files on this machine;
- ``copy``    copy a run directory back from worker 0 (or from ``gs://``);
- ``delete``  delete the slice.

End to end (a v5e slice of 16 chips = 4 hosts; a git install; the training run's directory is
relative to the checkout ``~/jdit`` on each worker)::

    python scripts/tpu_pod.py create jdit-pod --type v5litepod-16 --zone us-west4-a --spot
    python scripts/tpu_pod.py install jdit-pod --zone us-west4-a \\
        --git-ref main --repo https://github.com/ORG/jdit.git
    python scripts/tpu_pod.py run jdit-pod --zone us-west4-a --type v5litepod-16 -- \\
        jdit train --config configs/shapes_tiny.py --workdir runs/shapes
    python scripts/tpu_pod.py copy jdit-pod --zone us-west4-a --from jdit/runs/shapes --to runs/
    python scripts/tpu_pod.py delete jdit-pod --zone us-west4-a

How ``run`` addresses the workers: it starts one ``gcloud compute tpus tpu-vm ssh NAME
--worker=I`` per worker, all at the same time. ``--worker=I`` is gcloud's index into the slice's
network endpoints, i.e. TPU worker I; nothing has to be detected on the worker itself. Worker 0
runs with its output piped through this script to the terminal (and copied to
``LOG_DIR/worker_0.log``); workers 1..N-1 write to ``LOG_DIR/worker_I.log`` here. The script waits
for all of them and exits non-zero if any worker failed (it names the failed workers and their
logs). The number of workers comes from ``--workers N``, else from ``--type`` (see
``hosts_for_type``), else from ``gcloud ... describe`` (the number of network endpoints).

Notes:

- jdit needs Python >= 3.11 on the workers; ``install --python`` names the interpreter for the
  venv (the install fails with a clear message when it is older).
- The workers must share the run directory for checkpoints (every process writes its shards;
  see docs/parallelism.md); process 0 alone writes config.json, metrics.jsonl and sample grids,
  which is what ``copy`` fetches from worker 0.
- A command the user's local shell expands (``~``, ``$VAR``) is expanded here, not on the worker:
  quote such arguments, or use paths relative to the checkout.
- Interrupting ``run`` ends the local ssh sessions; processes on the workers may keep running.

Standard library only (Python 3.11+).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

DEFAULT_TYPE = "v5litepod-16"
DEFAULT_ZONE = "us-west4-a"
DEFAULT_RUNTIME = "v2-alpha-tpuv5-lite"
# No canonical public URL is recorded in the project: pass --repo (or set JDIT_REPO_URL).
REPO_PLACEHOLDER = "https://github.com/<owner>/jdit.git"
REMOTE_VENV = "~/jdit-venv"  # on every worker; ``run`` activates it
REMOTE_CHECKOUT = "~/jdit"  # git installs clone here; ``run`` starts in it when it exists
EXTRAS = "[tpu,data]"
TPU_VM = ("compute", "tpus", "tpu-vm")


class UsageError(Exception):
    """Bad command-line input: reported as ``tpu_pod.py: error: ...`` with exit status 2."""


# --------------------------------------------------------------------------------------------
# The one place where gcloud is invoked.


def gcloud(args: Sequence[str], *, dry_run: bool, wait: bool = True, shell_suffix: str = "",
           **popen_kwargs: Any) -> subprocess.Popen[bytes] | None:
    """Run ``gcloud ARGS`` (or, with ``dry_run``, print it shell-quoted and return None).

    With ``wait`` the call returns after gcloud exits (``returncode`` set); otherwise the
    running process is returned. ``popen_kwargs`` go to ``subprocess.Popen`` (stdout, ...).
    ``shell_suffix`` is only printed (a dry run's redirections, `` &``), never run.
    """
    cmd = ["gcloud", *args]
    if dry_run:
        print(shlex.join(cmd) + shell_suffix, flush=True)
        return None
    try:
        proc = subprocess.Popen(cmd, **popen_kwargs)
    except FileNotFoundError:
        raise SystemExit("tpu_pod.py: `gcloud` not found on PATH (install the Google Cloud CLI, "
                         "or use --dry-run to see the commands)") from None
    if wait:
        proc.wait()
    return proc


def _check(proc: subprocess.Popen[bytes] | None, what: str) -> int:
    """0 for a dry run or success; otherwise report and return gcloud's exit status."""
    if proc is None or proc.returncode == 0:
        return 0
    print(f"tpu_pod.py: {what} failed (gcloud exit status {proc.returncode})", file=sys.stderr)
    return proc.returncode or 1


def _location(args: argparse.Namespace) -> list[str]:
    out = [f"--zone={args.zone}"]
    if args.project:
        out.append(f"--project={args.project}")
    return out


# --------------------------------------------------------------------------------------------
# Workers of a slice.


def hosts_for_type(accelerator_type: str) -> int | None:
    """Hosts (TPU VM workers) of an accelerator type, or None when the rule is not known.

    - v5e (``v5litepod-N``, ``v5e-N``) and v6e (``v6e-N``): N counts chips; slices of up to 8
      chips are one host, larger ones have 4 chips per host (v5litepod-16 -> 4 hosts).
    - v2, v3, v4, v5p (``v4-N``, ``v5p-N``, ...): N counts TensorCores, 8 per host
      (v4-16 -> 2 hosts; v5p-8, which is 4 chips, -> 1 host).
    Anything else (newer generations, custom topologies): pass ``--workers``.
    """
    m = re.fullmatch(r"(v5litepod|v5e|v6e|v2|v3|v4|v5p)-(\d+)", accelerator_type.strip().lower())
    if not m:
        return None
    family, n = m.group(1), int(m.group(2))
    if n <= 0:
        return None
    if family in ("v5litepod", "v5e", "v6e"):
        return 1 if n <= 8 else -(-n // 4)
    return max(1, -(-n // 8))


def _workers(args: argparse.Namespace) -> int:
    if args.workers is not None:
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        return args.workers
    if args.type:
        n = hosts_for_type(args.type)
        if n is None:
            raise UsageError(f"cannot derive the number of workers of accelerator type "
                             f"{args.type!r}: pass --workers N")
        return n
    if args.dry_run:
        raise UsageError("run --dry-run needs --workers N or --type TYPE (otherwise the number of "
                         "workers is read with `gcloud compute tpus tpu-vm describe`)")
    proc = gcloud([*TPU_VM, "describe", args.name, *_location(args),
                   "--format=value(networkEndpoints[].ipAddress)"],
                  dry_run=False, wait=False, stdout=subprocess.PIPE)
    assert proc is not None
    text = proc.communicate()[0].decode(errors="replace")
    if proc.returncode != 0:
        raise SystemExit(f"tpu_pod.py: `gcloud ... describe {args.name}` failed (exit status "
                         f"{proc.returncode}); pass --workers N or --type TYPE")
    endpoints = [e for e in re.split(r"[;,\s]+", text.strip()) if e]
    if not endpoints:
        raise SystemExit(f"tpu_pod.py: {args.name} reports no network endpoints; pass --workers N")
    return len(endpoints)


# --------------------------------------------------------------------------------------------
# Sub-commands.


def cmd_create(args: argparse.Namespace) -> int:
    gargs = [*TPU_VM, "create", args.name, f"--zone={args.zone}",
             f"--accelerator-type={args.type}", f"--version={args.runtime}"]
    if args.project:
        gargs.append(f"--project={args.project}")
    if args.spot:
        gargs.append("--spot")
    if args.preemptible:
        gargs.append("--preemptible")
    return _check(gcloud(gargs, dry_run=args.dry_run), f"creating {args.name}")


def _venv_setup(python: str) -> list[str]:
    py = shlex.quote(python)
    return [
        f"{{ {py} -c 'import sys; sys.exit(sys.version_info < (3, 11))' || "
        f"{{ echo \"jdit needs Python >= 3.11; $({py} --version 2>&1) found: pass --python\" >&2;"
        " exit 1; }; }",
        f"{{ test -x {REMOTE_VENV}/bin/python || {py} -m venv {REMOTE_VENV}; }}",
        f". {REMOTE_VENV}/bin/activate",
        "python -m pip install --quiet --upgrade pip",
    ]


def install_script(args: argparse.Namespace, wheel_name: str | None = None) -> str:
    """The shell command every worker runs for ``install`` (one line, ``&&``-chained)."""
    steps = _venv_setup(args.python)
    if wheel_name is None:
        repo, ref = shlex.quote(args.repo), shlex.quote(args.git_ref)
        steps += [
            f"{{ test -d {REMOTE_CHECKOUT}/.git || git clone {repo} {REMOTE_CHECKOUT}; }}",
            f"cd {REMOTE_CHECKOUT}",
            f"git remote set-url origin {repo}",
            "git fetch --quiet --tags origin",
            # branches and tags by name, or any commit the clone has
            f"{{ git fetch --quiet origin {ref} && git checkout --quiet --detach FETCH_HEAD"
            f" || git checkout --quiet --detach {ref}; }}",
            f"python -m pip install -e {shlex.quote('.' + EXTRAS)}",
        ]
    else:
        steps += [
            f"mkdir -p {REMOTE_CHECKOUT}",
            f"python -m pip install \"$HOME\"/{shlex.quote(wheel_name + EXTRAS)}",
        ]
    steps.append("python -c 'import jdit, jax; print(\"jdit installed; jax\", jax.__version__)'")
    return " && ".join(steps)


def cmd_install(args: argparse.Namespace) -> int:
    if (args.git_ref is None) == (args.wheel is None):
        raise UsageError("install needs exactly one of --git-ref REF and --wheel PATH")
    if args.wheel is not None:
        if args.repo is not None:
            raise UsageError("--repo goes with --git-ref, not with --wheel")
        wheel = Path(args.wheel)
        if not wheel.is_file():
            raise UsageError(f"wheel not found: {args.wheel}")
        if wheel.suffix != ".whl":
            raise UsageError(f"not a wheel (*.whl): {args.wheel}")
        rc = _check(gcloud([*TPU_VM, "scp", str(wheel), f"{args.name}:{wheel.name}",
                            *_location(args), "--worker=all"], dry_run=args.dry_run),
                    "copying the wheel to the workers")
        if rc:
            return rc
        script = install_script(args, wheel.name)
    else:
        args.repo = args.repo or os.environ.get("JDIT_REPO_URL") or REPO_PLACEHOLDER
        if args.repo == REPO_PLACEHOLDER:
            if not args.dry_run:
                raise UsageError("pass --repo URL (or set JDIT_REPO_URL): the git URL of jdit "
                                 "that the workers can clone")
            print(f"tpu_pod.py: note: {REPO_PLACEHOLDER} is a placeholder; pass --repo URL",
                  file=sys.stderr)
        script = install_script(args)
    return _check(gcloud([*TPU_VM, "ssh", args.name, *_location(args), "--worker=all",
                          f"--command={script}"], dry_run=args.dry_run),
                  "installing jdit on the workers")


_EXPLICIT_HOSTS = ("--coordinator", "--num-processes", "--process-id")


def with_distributed(command: Sequence[str]) -> list[str]:
    """``command`` with ``--distributed`` appended when it is a ``jdit train`` (or ``python -m
    jdit.cli train``) run that has neither it nor explicit --coordinator/--num-processes/
    --process-id flags."""
    cmd = list(command)
    if len(cmd) >= 2 and os.path.basename(cmd[0]) == "jdit":
        sub = cmd[1]
    elif len(cmd) >= 4 and re.fullmatch(r"python[0-9.]*", os.path.basename(cmd[0])) \
            and cmd[1:3] == ["-m", "jdit.cli"]:
        sub = cmd[3]
    else:
        return cmd
    explicit = any(a == f or a.startswith(f + "=") for a in cmd for f in _EXPLICIT_HOSTS)
    if sub == "train" and "--distributed" not in cmd and not explicit:
        cmd.append("--distributed")
    return cmd


def remote_command(command: Sequence[str], env: Sequence[str] = ()) -> str:
    """What each worker runs: in the checkout (if any), in the venv, the user's command."""
    exports = []
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise UsageError(f"--env expects NAME=VALUE, got {item!r}")
        exports.append(f"export {key}={shlex.quote(value)}")
    return " && ".join([f"{{ cd {REMOTE_CHECKOUT} 2>/dev/null || cd; }}",
                        f". {REMOTE_VENV}/bin/activate", *exports,
                        f"exec {shlex.join(command)}"])


def _pump(src: IO[bytes], sinks: Sequence[IO[bytes]]) -> None:
    """Copy ``src`` to every sink as it arrives (chunks, so progress bars stream too)."""
    fd = src.fileno()
    while chunk := os.read(fd, 65536):
        for sink in sinks:
            sink.write(chunk)
            sink.flush()


def cmd_run(args: argparse.Namespace) -> int:
    if not args.command:
        raise UsageError("run needs the command after `--`, e.g. "
                         "run NAME -- jdit train --config C --workdir W")
    command = with_distributed(args.command)
    remote = remote_command(command, args.env)
    n = _workers(args)
    log_dir = Path(args.log_dir if args.log_dir is not None else Path("jdit-logs") / args.name)

    def ssh(worker: int) -> list[str]:
        return [*TPU_VM, "ssh", args.name, *_location(args), f"--worker={worker}",
                f"--command={remote}"]

    logs = {w: log_dir / f"worker_{w}.log" for w in range(n)}
    if args.dry_run:  # pasted into a shell, these lines do what the script does
        print(shlex.join(["mkdir", "-p", str(log_dir)]))
        for worker in range(1, n):
            gcloud(ssh(worker), dry_run=True,
                   shell_suffix=f" > {shlex.quote(str(logs[worker]))} 2>&1 &")
        gcloud(ssh(0), dry_run=True, shell_suffix=f" 2>&1 | tee {shlex.quote(str(logs[0]))}")
        print("wait")
        return 0

    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"tpu_pod.py: running on {n} worker(s) of {args.name}: {shlex.join(command)}\n"
          f"tpu_pod.py: worker 0 streams here; workers 1..{n - 1} log to {log_dir}/worker_I.log",
          file=sys.stderr, flush=True)
    procs: dict[int, subprocess.Popen[bytes]] = {}
    with contextlib.ExitStack() as files:
        try:
            for worker in range(1, n):  # the others first: they all wait for each other anyway
                log = files.enter_context(open(logs[worker], "wb"))
                proc = gcloud(ssh(worker), dry_run=False, wait=False, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT)
                assert proc is not None
                procs[worker] = proc
            log0 = files.enter_context(open(logs[0], "wb"))
            proc0 = gcloud(ssh(0), dry_run=False, wait=False, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc0 is not None and proc0.stdout is not None
            procs[0] = proc0
            pump = threading.Thread(target=_pump, daemon=True,
                                    args=(proc0.stdout, [sys.stdout.buffer, log0]))
            pump.start()
            codes = {worker: proc.wait() for worker, proc in sorted(procs.items())}
            pump.join()
        except KeyboardInterrupt:
            for proc in procs.values():
                proc.terminate()
            print(f"\ntpu_pod.py: interrupted; the ssh sessions are closed, but processes on the "
                  f"workers may still run (stop them with: {sys.argv[0]} run {args.name} "
                  f"--zone {args.zone} --workers {n} -- pkill -f 'bin/jdit ')", file=sys.stderr)
            return 130
    failed = {w: c for w, c in codes.items() if c != 0}
    for worker, code in failed.items():
        print(f"tpu_pod.py: worker {worker} failed (exit status {code}); log: {logs[worker]}",
              file=sys.stderr)
    if failed:
        return 1
    print(f"tpu_pod.py: all {n} worker(s) finished; logs in {log_dir}", file=sys.stderr)
    return 0


def cmd_copy(args: argparse.Namespace) -> int:
    if args.dry_run:
        print(shlex.join(["mkdir", "-p", args.to]))
    else:  # an existing folder: the run directory lands inside it, under its own name
        Path(args.to).mkdir(parents=True, exist_ok=True)
    if args.source.startswith("gs://"):
        gargs = ["storage", "cp", "--recursive", args.source, args.to]
        if args.project:
            gargs.append(f"--project={args.project}")
    else:
        gargs = [*TPU_VM, "scp", f"{args.name}:{args.source}", args.to, *_location(args),
                 f"--worker={args.worker}", "--recurse"]
    return _check(gcloud(gargs, dry_run=args.dry_run), f"copying {args.source}")


def cmd_delete(args: argparse.Namespace) -> int:
    return _check(gcloud([*TPU_VM, "delete", args.name, *_location(args), "--quiet"],
                         dry_run=args.dry_run), f"deleting {args.name}")


# --------------------------------------------------------------------------------------------
# Command line.


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpu_pod.py",
        description="Create a Cloud TPU pod slice, install jdit on every worker, run jdit on all "
                    "of them, copy the results back, delete the slice (gcloud compute tpus "
                    "tpu-vm ...).",
        epilog="Example: tpu_pod.py run jdit-pod --zone us-west4-a --type v5litepod-16 -- "
               "jdit train --config configs/shapes_tiny.py --workdir runs/shapes")
    parser.add_argument("--dry-run", action="store_true",
                        help="print every gcloud command (shell-quoted) instead of running it")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("name", help="the TPU (slice) name")
    common.add_argument("--zone", default=DEFAULT_ZONE, help=f"(default: {DEFAULT_ZONE})")
    common.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
    common.add_argument("--dry-run", action="store_true", default=argparse.SUPPRESS,
                        help="print the gcloud commands instead of running them")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    create = sub.add_parser("create", parents=[common], help="create the slice")
    create.add_argument("--type", default=DEFAULT_TYPE,
                        help=f"accelerator type (default: {DEFAULT_TYPE}; e.g. v6e-16, v5p-32)")
    create.add_argument("--runtime", default=DEFAULT_RUNTIME,
                        help=f"TPU VM runtime version (default: {DEFAULT_RUNTIME}; v6e: "
                             "v2-alpha-tpuv6e)")
    price = create.add_mutually_exclusive_group()
    price.add_argument("--spot", action="store_true", help="a Spot slice")
    price.add_argument("--preemptible", action="store_true", help="a preemptible slice")
    create.set_defaults(func=cmd_create, subparser=create)

    install = sub.add_parser(
        "install", parents=[common],
        help="install jdit (with the tpu and data extras) into ~/jdit-venv on every worker")
    source = install.add_mutually_exclusive_group()
    source.add_argument("--git-ref", default=None,
                        help="branch, tag or commit: clone --repo into ~/jdit and pip install -e")
    source.add_argument("--wheel", default=None,
                        help="a local jdit wheel: copied to every worker and pip installed")
    install.add_argument("--repo", default=None,
                         help=f"git URL for --git-ref (default: $JDIT_REPO_URL; {REPO_PLACEHOLDER}"
                              " is only a placeholder)")
    install.add_argument("--python", default="python3",
                         help="interpreter on the workers for the venv, Python >= 3.11 "
                              "(default: python3)")
    install.set_defaults(func=cmd_install, subparser=install)

    run = sub.add_parser(
        "run", parents=[common],
        usage="tpu_pod.py run NAME [options] -- jdit ...",
        help="run one command on every worker (after --); jdit train gets --distributed",
        description="Run one command on every worker at once: one `gcloud ... ssh --worker=I` per "
                    "worker, in parallel. Worker 0's output streams to this terminal (and to "
                    "LOG_DIR/worker_0.log); workers 1..N-1 write LOG_DIR/worker_I.log here. "
                    "Exits non-zero if any worker fails. `jdit train` without --distributed (or "
                    "explicit --coordinator/--num-processes/--process-id) gets --distributed. "
                    "Workers: --workers N, else derived from --type (v5litepod-N / v6e-N: N <= 8 "
                    "chips is 1 host, else N/4; v2/v3/v4/v5p-N: N/8 hosts), else counted with "
                    "`gcloud ... describe` (network endpoints).")
    run.add_argument("--workers", type=int, default=None, help="number of workers (hosts)")
    run.add_argument("--type", default=None,
                     help="the slice's accelerator type, to derive the number of workers")
    run.add_argument("--log-dir", default=None,
                     help="local folder for the workers' logs (default: jdit-logs/NAME)")
    run.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                     help="environment variable for the command on every worker (repeatable)")
    run.set_defaults(func=cmd_run, subparser=run)

    copy = sub.add_parser("copy", parents=[common],
                          help="copy a run directory back (scp --recurse from one worker, or "
                               "gcloud storage cp for gs:// paths)")
    copy.add_argument("--from", dest="source", required=True,
                      help="run directory on the worker (relative to its home) or gs://...")
    copy.add_argument("--to", required=True, help="local folder (created if missing)")
    copy.add_argument("--worker", type=int, default=0, help="worker to copy from (default: 0)")
    copy.set_defaults(func=cmd_copy, subparser=copy)

    delete = sub.add_parser("delete", parents=[common], help="delete the slice")
    delete.set_defaults(func=cmd_delete, subparser=delete)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.cmd != "run" and command:
        args.subparser.error(f"only `run` takes a command after `--` (got {shlex.join(command)})")
    args.command = command
    try:
        return int(args.func(args))
    except UsageError as e:
        args.subparser.error(str(e))  # exits with status 2
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
