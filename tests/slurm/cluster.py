"""A real Slurm cluster on localhost: Debian's packages, two slurmd processes as two nodes.

Everything lives under one directory (configuration, spool, logs, pid files, munge socket and
key), the daemons run in the foreground as children of this process and are stopped by PID, and
the ports are free ones, so the cluster touches nothing of the host's own Slurm or munge. The
one host-wide change is an ``/etc/hosts`` line naming the fake nodes (127.0.0.1), so that a
rendezvous on "the first node of the job" resolves as it does on a real cluster.

    python -m tests.slurm.cluster /tmp/slurm-play   # start, print SLURM_CONF, wait for Ctrl-C
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("sbatch", "srun", "scontrol", "sinfo", "slurmctld", "slurmd", "munged", "mungekey")
NODE_PREFIX = "smoenode"
HOSTS_LINE_TAG = "# sparse-moe local Slurm test nodes"


class ClusterError(RuntimeError):
    """The local cluster could not be installed or started; the message says why."""


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def ensure_installed() -> None:
    """Installs the Slurm and munge packages with apt-get when a binary is missing.

    Services are kept from starting during the install (``policy-rc.d`` exits 101), because
    the cluster below runs its own daemons.
    """
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in BINARIES):
        return
    if shutil.which("apt-get") is None:
        raise ClusterError("the Slurm tests need a real Slurm; it is not installed and apt-get "
                           f"is unavailable to install it (packages: {' '.join(PACKAGES)})")
    if os.geteuid() != 0:
        raise ClusterError("the Slurm tests install Slurm with apt-get, which needs root; "
                           f"run them as root or install {' '.join(PACKAGES)} first")
    policy = Path("/usr/sbin/policy-rc.d")
    created_policy = not policy.exists()
    if created_policy:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]):
            proc = _run(cmd, env=env, timeout=600)
            if proc.returncode != 0:
                raise ClusterError(f"{' '.join(cmd)} failed with status {proc.returncode}:\n"
                                   f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    finally:
        if created_policy:
            policy.unlink(missing_ok=True)


def _free_ports(count: int) -> list[int]:
    """``count`` consecutive free TCP ports (slurmd ports are given as a range)."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            base = sock.getsockname()[1]
        if base + count > 65000:
            continue
        try:
            for port in range(base, base + count):
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", port))
            return list(range(base, base + count))
        except OSError:
            continue
    raise ClusterError(f"no {count} consecutive free ports found")


def _make_fake_gpu(path: Path) -> None:
    """A character device (like /dev/null) standing for a GPU: slurmd ignores plain files."""
    if not path.exists():
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, 3))


class LocalSlurm:
    """A cluster of ``nodes`` fake nodes with ``gpus`` fake GPUs each, rooted at ``root``.

    The GPUs are character devices (``File=`` in gres.conf): slurmd 22.05 drops a GPU GRES
    that names no file ("count-only", ``Count=`` alone) and marks the node INVAL, so a GPU
    count cannot be simulated without them.
    """

    def __init__(self, root: Path, nodes: int = 2, gpus: int = 2) -> None:
        self.root = Path(root)
        self.nodes = [f"{NODE_PREFIX}{i}" for i in range(1, nodes + 1)]
        self.gpus = gpus
        self.conf = self.root / "etc" / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self.processes: dict[str, subprocess.Popen] = {}
        self.added_hosts_line = False

    # ------------------------------------------------------------------ environment
    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (sbatch, scontrol...) and, through them, jobs."""
        return dict(os.environ, SLURM_CONF=str(self.conf),
                    PATH=f"{os.environ.get('PATH', '')}:/usr/sbin")

    def command(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = _run(list(args), env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    # ------------------------------------------------------------------ start / stop
    def start(self, timeout: float = 60) -> None:
        for sub in ("etc", "munge", "spool", "log", "run", "gpu"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._add_hosts_line()
        self._start_munge()
        self._write_config()
        ctld = self._daemon("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self.processes["slurmctld"] = ctld
        for node in self.nodes:
            self.processes[node] = self._daemon(
                f"slurmd-{node}", ["slurmd", "-D", "-f", str(self.conf), "-N", node])
        self._wait_idle(timeout)

    def stop(self) -> None:
        """SIGTERM by PID (slurmd first, munged last), SIGKILL after 20 s; /etc/hosts restored."""
        order = [n for n in self.processes if n not in ("slurmctld", "munged")]
        order += [n for n in ("slurmctld", "munged") if n in self.processes]
        for name in order:
            proc = self.processes.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._remove_hosts_line()

    def __enter__(self) -> "LocalSlurm":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ pieces
    def _daemon(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        try:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        time.sleep(0.2)
        if proc.poll() is not None:
            raise ClusterError(f"{name} exited at once with status {proc.returncode}; see "
                               f"{self.root / 'log'}:\n{self._log_tail(name)}")
        return proc

    def _log_tail(self, name: str) -> str:
        texts = []
        for path in sorted((self.root / "log").glob(f"{name}*")):
            texts.append(f"--- {path}\n" + path.read_text(errors="replace")[-2000:])
        return "\n".join(texts)

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            proc = _run(["mungekey", "--create", "--keyfile", str(key)])
            if proc.returncode != 0:
                raise ClusterError(f"mungekey --create failed: {proc.stderr}")
        munge = self.root / "munge"
        self.processes["munged"] = self._daemon("munged", [
            "munged", "--foreground", "--force", f"--socket={self.munge_socket}",
            f"--key-file={key}", f"--pid-file={munge / 'munged.pid'}",
            f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={munge / 'seed'}"])
        deadline = time.time() + 10
        while not self.munge_socket.exists():
            if time.time() > deadline or self.processes["munged"].poll() is not None:
                raise ClusterError(f"munged did not start:\n{self._log_tail('munged')}")
            time.sleep(0.05)

    def _write_config(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        cpus = os.cpu_count() or 1
        mem_mb = int(_mem_total_kb() / 1024 * 0.9)
        host = socket.gethostname().split(".")[0]
        first, last = node_ports[0], node_ports[-1]
        node_range = f"{NODE_PREFIX}[1-{len(self.nodes)}]"
        gres = ""
        if self.gpus:
            devices = [self.root / "gpu" / f"fake{i}" for i in range(self.gpus)]
            for device in devices:
                _make_fake_gpu(device)
            files = f"{self.root / 'gpu'}/fake[0-{self.gpus - 1}]"
            (self.root / "etc" / "gres.conf").write_text(
                f"NodeName={node_range} Name=gpu File={files}\n")
            gres = f" Gres=gpu:{self.gpus}"
        # A random first job id keeps MASTER_PORT (derived from the job id) away from other runs.
        first_job_id = 1000 + int.from_bytes(os.urandom(2), "little") % 8000
        lines = [
            "ClusterName=smoeci",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # Credentials expire after 10 s instead of 120 s: a requeued job restarts in ~15 s.
            f"AuthInfo=cred_expire=10,socket={self.munge_socket}",
            "MpiDefault=none", "MailProg=/bin/true",
            # pgid, not linuxproc: the job's leftover processes are killed with it.
            # task/affinity: each task is bound to the CPUs it was given, as on real clusters,
            # so a step started without --cpus-per-task shows in the ranks' CPU binding.
            "ProctrackType=proctrack/pgid", "TaskPlugin=task/affinity", "KillWait=10",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=5,bf_interval=5",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory",
            "DefMemPerCPU=512",
            # Impossible requests are refused at submission instead of pending forever.
            "EnforcePartLimits=ALL", "ReturnToService=2", "MinJobAge=3600",
            f"FirstJobId={first_job_id}",
            *(["GresTypes=gpu"] if self.gpus else []),
            f"StateSaveLocation={self.root / 'spool' / 'ctld'}",
            f"SlurmdSpoolDir={self.root / 'spool'}/d-%n",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log'}/slurmd-%n.log",
            f"NodeName={node_range} NodeAddr=127.0.0.1 Port=[{first}-{last}] CPUs={cpus} "
            f"RealMemory={mem_mb}{gres} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.time() + timeout
        states = ""
        while time.time() < deadline:
            for name, proc in self.processes.items():
                if proc.poll() is not None:
                    raise ClusterError(f"{name} exited with status {proc.returncode}:\n"
                                       f"{self._log_tail(name.replace('smoe', 'slurmd-smoe'))}")
            proc = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, timeout=30)
            states = proc.stdout.strip()
            idle = [line for line in states.splitlines() if line.endswith(" idle")]
            if proc.returncode == 0 and len(idle) == len(self.nodes):
                return
            time.sleep(0.3)
        raise ClusterError(f"the nodes did not become idle within {timeout} s (sinfo: {states!r})\n"
                           f"{self._log_tail('slurmctld')}")

    def _add_hosts_line(self) -> None:
        hosts = Path("/etc/hosts")
        text = hosts.read_text()
        if all(_resolves(node) for node in self.nodes):
            return
        line = f"127.0.0.1 {' '.join(self.nodes)} {HOSTS_LINE_TAG}\n"
        hosts.write_text(text + ("" if text.endswith("\n") else "\n") + line)
        self.added_hosts_line = True

    def _remove_hosts_line(self) -> None:
        if not self.added_hosts_line:
            return
        hosts = Path("/etc/hosts")
        kept = [line for line in hosts.read_text().splitlines(keepends=True)
                if not line.rstrip().endswith(HOSTS_LINE_TAG)]
        hosts.write_text("".join(kept))
        self.added_hosts_line = False


def _die_with_parent() -> None:
    """A daemon gets SIGTERM if the process that started it dies without stopping it."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


def _mem_total_kb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1])
    return 4 * 1024 * 1024


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # stop the cluster on SIGTERM too
    ensure_installed()
    with LocalSlurm(Path(sys.argv[1])) as cluster:
        print(f"export SLURM_CONF={cluster.conf}", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
