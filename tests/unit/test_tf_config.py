"""TF_CONFIG construction and launcher detection, on simulated Open MPI and SLURM environments."""

import json
import sys

import pytest

from launch import tf_config
from launch.tf_config import (Launcher, build_tf_config, choose_gpu, detect_launcher, expand_nodelist,
                              expand_tasks_per_node, slurm_worker_addresses, worker_addresses)


def ompi_env(rank, size, local_rank, local_size):
    return {
        "OMPI_COMM_WORLD_RANK": str(rank),
        "OMPI_COMM_WORLD_SIZE": str(size),
        "OMPI_COMM_WORLD_LOCAL_RANK": str(local_rank),
        "OMPI_COMM_WORLD_LOCAL_SIZE": str(local_size),
    }


def srun_env(procid, localid, node, nodelist="gpu[01-02]", tasks="4(x2)", ntasks=8):
    """What srun sets in each task of `srun -N2 --ntasks-per-node=4`."""
    return {
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_STEP_NODELIST": nodelist,
        "SLURM_TASKS_PER_NODE": tasks,
        "SLURM_STEP_TASKS_PER_NODE": tasks,
        "SLURMD_NODENAME": node,
    }


class TestDetectLauncher:
    def test_plain_process(self):
        assert detect_launcher({}) == Launcher(kind="none")

    def test_reads_os_environ_by_default(self, monkeypatch):
        for k in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID"):
            monkeypatch.delenv(k, raising=False)
        monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
        monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
        monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "0")
        launcher = detect_launcher()
        assert (launcher.kind, launcher.rank, launcher.size) == ("openmpi", 2, 4)

    @pytest.mark.parametrize("rank,local_rank", [(0, 0), (3, 1), (5, 1)])
    def test_open_mpi(self, rank, local_rank):
        launcher = detect_launcher(ompi_env(rank, 6, local_rank, 2))
        assert launcher.kind == "openmpi" and launcher.is_mpi and launcher.multi_worker
        assert (launcher.rank, launcher.size, launcher.local_rank, launcher.local_size) == (rank, 6, local_rank, 2)

    def test_open_mpi_single_rank_is_not_multi_worker(self):
        assert not detect_launcher(ompi_env(0, 1, 0, 1)).multi_worker

    def test_mpirun_inside_slurm_allocation_is_open_mpi(self):
        # mpirun in a batch script: every rank inherits SLURM_PROCID=0 from the batch step.
        env = {**srun_env(0, 0, "gpu01"), **ompi_env(5, 8, 1, 4)}
        launcher = detect_launcher(env)
        assert (launcher.kind, launcher.rank, launcher.local_rank) == ("openmpi", 5, 1)
        assert launcher.job_id == "4242"

    def test_mpich(self):
        launcher = detect_launcher({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1"})
        assert (launcher.kind, launcher.rank, launcher.size, launcher.local_rank) == ("mpich", 1, 2, 1)

    def test_slurm_srun_step(self):
        launcher = detect_launcher(srun_env(6, 2, "gpu02"))
        assert launcher.kind == "slurm" and not launcher.is_mpi
        assert (launcher.rank, launcher.size, launcher.local_rank, launcher.local_size) == (6, 8, 2, 4)
        assert launcher.nodes == ("gpu01", "gpu02")
        assert launcher.tasks_per_node == (4, 4)
        assert launcher.job_id == "4242"

    def test_slurm_batch_script_is_a_plain_process(self):
        env = srun_env(0, 0, "gpu01")
        del env["SLURM_STEP_ID"]
        assert detect_launcher(env).kind == "none"

    def test_slurm_step_vars_win_over_job_vars(self):
        # An `srun -n 2` step inside a 2-node, 8-task allocation.
        env = srun_env(1, 1, "gpu01")
        env.update(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NODELIST="gpu01", SLURM_STEP_TASKS_PER_NODE="2")
        launcher = detect_launcher(env)
        assert (launcher.size, launcher.nodes, launcher.tasks_per_node) == (2, ("gpu01",), (2,))

    def test_slurm_inconsistent_counts(self):
        env = srun_env(0, 0, "gpu01", tasks="4,3")
        with pytest.raises(ValueError, match=r"adds up to 7 tasks but SLURM_STEP_NUM_TASKS=8"):
            detect_launcher(env)

    def test_slurm_incomplete(self):
        env = srun_env(0, 0, "gpu01")
        del env["SLURM_LOCALID"]
        with pytest.raises(ValueError, match=r"SLURM_LOCALID.*srun"):
            detect_launcher(env)

    def test_malformed_rank(self):
        with pytest.raises(ValueError, match=r"OMPI_COMM_WORLD_RANK must be an integer\. Received: .*'x'"):
            detect_launcher({**ompi_env(0, 2, 0, 2), "OMPI_COMM_WORLD_RANK": "x"})

    def test_rank_out_of_range(self):
        with pytest.raises(ValueError, match=r"Received: rank=4, size=4"):
            detect_launcher(ompi_env(4, 4, 0, 4))


class TestNodelist:
    @pytest.mark.parametrize("text,expected", [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("gpu[08-10],login1", ["gpu08", "gpu09", "gpu10", "login1"]),
        ("a[1-2]b[1-2]", ["a1b1", "a1b2", "a2b1", "a2b2"]),
        ("n[9-11]-ib", ["n9-ib", "n10-ib", "n11-ib"]),
        ("x,y[1],z", ["x", "y1", "z"]),
    ])
    def test_expand(self, text, expected):
        assert expand_nodelist(text) == expected

    @pytest.mark.parametrize("text,match", [
        ("gpu[01-03", r"Unbalanced '\['"),
        ("gpu01]", r"Unbalanced '\]'"),
        ("gpu[3-1]", "Descending range"),
        ("gpu[a-b]", "Bad range"),
        ("", "empty"),
    ])
    def test_malformed(self, text, match):
        with pytest.raises(ValueError, match=match):
            expand_nodelist(text)

    @pytest.mark.parametrize("text,expected", [
        ("4", [4]), ("2(x3),1", [2, 2, 2, 1]), ("1,2", [1, 2]),
    ])
    def test_tasks_per_node(self, text, expected):
        assert expand_tasks_per_node(text) == expected

    def test_tasks_per_node_malformed(self):
        with pytest.raises(ValueError, match=r"Expected e\.g\. '2\(x3\),1'\. Received: '2\(3\)'"):
            expand_tasks_per_node("2(3)")


class TestSlurmAddresses:
    def test_block_distribution(self):
        for procid in range(8):
            node = "gpu01" if procid < 4 else "gpu02"
            launcher = detect_launcher(srun_env(procid, procid % 4, node))
            addresses = slurm_worker_addresses(launcher, 20000)
            assert addresses == [f"gpu01:{20000 + i}" for i in range(4)] + [f"gpu02:{20000 + i}" for i in range(4)]
            assert addresses[procid] == f"{node}:{20000 + procid % 4}"

    def test_uneven_nodes(self):
        launcher = detect_launcher(srun_env(2, 0, "b", nodelist="a,b", tasks="2,1", ntasks=3))
        assert slurm_worker_addresses(launcher, 30000) == ["a:30000", "a:30001", "b:30000"]

    def test_cyclic_distribution_is_rejected(self):
        # With --distribution=cyclic, task 1 lands on the second node.
        launcher = detect_launcher(srun_env(1, 0, "gpu02"))
        with pytest.raises(ValueError, match=r"task 1 runs on gpu02.*--distribution=block"):
            slurm_worker_addresses(launcher, 20000)

    @pytest.mark.parametrize("port", [80, 65534])
    def test_port_range(self, port):
        launcher = detect_launcher(srun_env(0, 0, "gpu01"))
        with pytest.raises(ValueError, match=f"Received: port_base={port}"):
            slurm_worker_addresses(launcher, port)

    def test_needs_slurm(self):
        with pytest.raises(ValueError, match="kind='none'"):
            slurm_worker_addresses(Launcher(), 20000)


class TestBuildTfConfig:
    def test_every_rank_sees_the_same_cluster(self):
        addresses = ["h1:1001", "h1:1002", "h2:1001", "h2:1002"]
        configs = [build_tf_config(r, addresses) for r in range(4)]
        assert all(c["cluster"] == {"worker": addresses} for c in configs)
        assert [c["task"] for c in configs] == [{"type": "worker", "index": r} for r in range(4)]

    def test_json_is_what_tensorflow_reads(self):
        parsed = json.loads(tf_config.tf_config_json(1, ["localhost:5000", "localhost:5001"]))
        assert parsed == {"cluster": {"worker": ["localhost:5000", "localhost:5001"]},
                          "task": {"type": "worker", "index": 1}}

    def test_ipv6_address(self):
        assert build_tf_config(0, ["[::1]:5000"])["cluster"]["worker"] == ["[::1]:5000"]

    @pytest.mark.parametrize("addresses,match", [
        ([], "at least one"),
        (["h1"], r"'host:port'.*Received: 'h1'"),
        (["h1:0"], r"Received: 'h1:0'"),
        (["h1:70000"], r"Received: 'h1:70000'"),
        (["h1:1", "h1:1"], "unique"),
    ])
    def test_bad_addresses(self, addresses, match):
        with pytest.raises(ValueError, match=match):
            build_tf_config(0, addresses)

    @pytest.mark.parametrize("rank", [-1, 2, True, "0"])
    def test_bad_rank(self, rank):
        with pytest.raises(ValueError, match=r"`rank` must be an int in \[0, 2\)"):
            build_tf_config(rank, ["h:1", "h:2"])


class TestWorkerAddresses:
    def test_single_host_uses_loopback(self):
        assert worker_addresses([("vm", 5000), ("vm", 5001)]) == ["localhost:5000", "localhost:5001"]

    def test_several_hosts_keep_names_in_rank_order(self):
        assert worker_addresses([("a", 1), ("b", 1), ("a", 2)]) == ["a:1", "b:1", "a:2"]

    def test_duplicate(self):
        with pytest.raises(ValueError, match=r"same address: \['localhost:5000'\]"):
            worker_addresses([("vm", 5000), ("vm", 5000)])

    def test_ports_are_distinct_while_reserved(self):
        socks = [tf_config.reserve_port() for _ in range(4)]
        try:
            ports = [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()
        assert len(set(ports)) == 4
        assert worker_addresses([("h", p) for p in ports])

    def test_free_port_can_be_bound(self):
        import socket

        port = tf_config.pick_free_port()
        with socket.socket() as s:
            s.bind(("", port))


class TestChooseGpu:
    @pytest.mark.parametrize("local_rank,num_gpus,expected", [
        (0, 0, None), (3, 0, None),  # CPU-only host
        (0, 4, 0), (3, 4, 3),        # one GPU per local rank
        (2, 1, 0),                   # scheduler already isolated one GPU per task
    ])
    def test_choice(self, local_rank, num_gpus, expected):
        assert choose_gpu(local_rank, num_gpus) == expected

    def test_every_local_rank_gets_its_own_gpu(self):
        assert sorted(choose_gpu(r, 8) for r in range(8)) == list(range(8))

    def test_more_ranks_than_gpus(self):
        with pytest.raises(ValueError, match=r"Local rank 4 has no GPU.*only 4 GPUs.*ppr:4:node"):
            choose_gpu(4, 4)


def test_importing_launch_helpers_imports_neither_tensorflow_nor_mpi():
    import os
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys, launch, launch.tf_config, launch.data; "
            "bad = [m for m in ('tensorflow', 'mpi4py', 'mpi4py.MPI', 'keras') if m in sys.modules]; "
            "sys.exit(bool(bad) and print(bad) or 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
