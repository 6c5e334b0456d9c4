"""How many threads torch gets: the flag, OMP_NUM_THREADS, or one per physical core."""
import subprocess
import sys

from conftest import ENTRY, clean_env, demo_workdir

from modules.threads import physical_cores, resolve_threads


def test_the_flag_wins_over_omp_num_threads():
    assert resolve_threads(3, "1", cores=8, local_procs=1) == (3, "--threads")


def test_omp_num_threads_is_respected_without_the_flag():
    assert resolve_threads(None, "5", cores=8, local_procs=4) == (5, "OMP_NUM_THREADS")


def test_the_default_is_one_thread_per_physical_core_shared_among_local_processes():
    assert resolve_threads(None, None, cores=8, local_procs=1)[0] == 8
    assert resolve_threads(None, None, cores=8, local_procs=2)[0] == 4
    assert resolve_threads(None, None, cores=8, local_procs=3)[0] == 2      # never 3 x 3 > 8 threads
    assert resolve_threads(None, None, cores=2, local_procs=4)[0] == 1      # at least one
    assert resolve_threads(None, "", cores=6, local_procs=1)[0] == 6         # empty: not set


def test_an_unusable_omp_num_threads_falls_back_to_the_default(caplog):
    assert resolve_threads(None, "lots", cores=4, local_procs=1)[0] == 4
    assert resolve_threads(None, "0", cores=4, local_procs=2)[0] == 2
    assert "OMP_NUM_THREADS='lots' is not a positive whole number" in caplog.text


def test_physical_cores_is_a_positive_count_within_the_usable_cpus():
    import os
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


def test_the_flag_reaches_torch_in_a_real_run(tmp_path):
    """OMP_NUM_THREADS=1 would give torch 1 thread; --threads 3 must override it. The run
    stops at the missing dataset, after the threads are set (what torch reports is logged)."""
    work = demo_workdir(tmp_path / "work")
    env = {**clean_env(), "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(ENTRY), "--preset=1", "--set", "dataset_dir=nowhere"]
    flagged = subprocess.run([*args, "--threads", "3"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert flagged.returncode == 2 and "torch threads: 3 (--threads)" in flagged.stderr, flagged.stderr[-2000:]
    plain = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert "torch threads: 1 (OMP_NUM_THREADS)" in plain.stderr, plain.stderr[-2000:]
    bad = subprocess.run([*args, "--threads", "0"], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --threads 0: give a whole number of at least 1."
