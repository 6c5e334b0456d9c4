"""How many CPU threads torch uses: `--threads N`, else OMP_NUM_THREADS, else one per
physical core shared among torchrun's local processes."""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path

log = logging.getLogger("simulgen")


def resolve_threads(flag: int | None, omp_env: str | None, cores: int, local_procs: int) -> tuple[int, str]:
    """(threads, where the number came from). The flag wins, then a valid OMP_NUM_THREADS,
    else `cores` divided among the `local_procs` processes of this machine (never more
    threads than cores in all), at least 1."""
    if flag is not None:
        return flag, "--threads"
    if omp_env is not None and omp_env.strip():
        try:
            value = int(omp_env)
        except ValueError:
            value = 0
        if value >= 1:
            return value, "OMP_NUM_THREADS"
        log.warning("OMP_NUM_THREADS=%r is not a positive whole number; ignored", omp_env)
    return max(1, cores // max(1, local_procs)), f"{cores} physical core(s) / {max(1, local_procs)} process(es)"


def usable_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (hyper-threads counted once),
    capped by a cgroup CPU quota; the number of usable CPUs where the topology is unknown."""
    cpus = usable_cpus()
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(),
                       topo.joinpath("core_id").read_text().strip()))
        except OSError:
            cores = set()
            break
    count = len(cores) or len(cpus)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def configure_threads(flag: int | None, doing: str = "training") -> int:
    """Set torch's intra-op threads; warn once when the machine is already busy (`doing`: what will be slower)."""
    import torch
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads, source = resolve_threads(flag, os.environ.get("OMP_NUM_THREADS"), physical_cores(), local)
    torch.set_num_threads(threads)
    log.info("torch threads: %d (%s)", torch.get_num_threads(), source)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return threads
    cpus = len(usable_cpus())
    if load > cpus and os.environ.get("RANK", "0") == "0":
        log.warning("the 1-minute load average is %.1f on %d CPU(s): other processes are using them, so %s "
                    "will be slower than usual (see --threads)", load, cpus, doing)
    return threads
