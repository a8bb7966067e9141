"""A real one-node SLURM cluster on this machine, for tests (shared PLATFORM.md's recipe).

Everything lives in a temporary folder: a munge key and socket, slurm.conf with free ports, state and
spool folders, logs. munged, slurmctld and slurmd run in the foreground as children of the test
process, and `stop()` cancels the jobs and ends them. Clients (sbatch, squeue; submitit) find the
cluster through SLURM_CONF.

    cluster = LocalSlurm(tmp_dir); cluster.start()   # raises SlurmUnavailable(reason)
    os.environ.update(cluster.env); ...; cluster.stop()
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    """Why a local SLURM cannot run here (the tests are skipped with this message)."""


def ensure_installed() -> None:
    """Install the Debian packages when a daemon is missing (root and apt-get needed)."""
    if all(shutil.which(d) for d in (*DAEMONS, "sbatch")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and installing them needs root")
    if shutil.which("apt-get") is None:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and there is no apt-get to install them")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(install, capture_output=True, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
        done = subprocess.run(install, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SlurmUnavailable(f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr.strip()[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, timeout_s: float = 30.0) -> None:
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting munged and slurmd needs root")
        ensure_installed()
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = self.root / "munge" / "munge.sock"
        self._spawn("munged", ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={socket_path}",
                               f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={self.root / 'munge' / 'seed'}"])
        self._wait(lambda: socket_path.exists(), timeout_s, "munged did not create its socket")
        self.conf.write_text(self._config(socket_path))
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf)])
        self._wait(self._idle, timeout_s, "the node did not become idle")

    def _config(self, munge_socket: Path) -> str:
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = socket.gethostname().split(".")[0]
        r = self.root
        return "\n".join([
            "ClusterName=wsibenchtest", f"SlurmctldHost={host}", f"SlurmctldPort={free_port()}",
            f"SlurmdPort={free_port()}", "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={munge_socket}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            f"StateSaveLocation={r / 'state'}", f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={r / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "MpiDefault=none", "ReturnToService=2", "SchedulerType=sched/backfill",
            "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none", "MinJobAge=600",
            f"{node} State=UNKNOWN",  # `slurmd -C`: this machine's CPUs and memory
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", "",
        ])

    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **self.env})
        log.close()

    def _idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with code {proc.returncode}: {self.log_tail(name)}")
        out = self.run("sinfo", "-h", "-o", "%T", check=False)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout_s: float, message: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                self.stop()
                raise SlurmUnavailable(f"{message} within {timeout_s:.0f} s; logs in {self.root / 'log'}")
            time.sleep(0.2)

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster."""
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **self.env}, check=check)

    def log_tail(self, name: str) -> str:
        logs = [self.root / "log" / f"{name}.log", self.root / "log" / f"{name}.stdout"]
        text = " | ".join(p.read_text().strip().splitlines()[-1] for p in logs if p.exists() and p.read_text().strip())
        return text or "no log"

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            self.run("scancel", "--full", "-u", "root", check=False)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.3)
        for name in reversed(DAEMONS):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
