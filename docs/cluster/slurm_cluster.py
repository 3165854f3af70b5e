"""Dask workers as SLURM jobs (dask-jobqueue), for ``grade --cluster``.

Run it on the coordinator (a login node that can submit jobs), in the course folder:

    pip install dask-jobqueue
    python docs/cluster/slurm_cluster.py submissions/

It starts a scheduler here, asks SLURM for worker jobs, and grades through them. Every node needs
the course package at this machine's version (a shared virtual environment is simplest).
"""

import subprocess
import sys

from dask_jobqueue import SLURMCluster

cluster = SLURMCluster(
    queue="standard",  # edit: your partition (PBSCluster takes the same arguments)
    cores=4,  # cores per job
    processes=4,  # one worker process per core: one notebook at a time each
    memory="16GB",  # per job; a grading kernel takes about 0.5-2 GB
    walltime="02:00:00",
    job_script_prologue=[
        "source ~/venvs/course/bin/activate",  # edit: the environment with the course
        "export DASK_DISTRIBUTED__WORKER__DAEMON=False",  # workers start a grading process
        # quiet: no profiler, slow ticks and monitors (README.md, "Keep Dask quiet")
        "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False",
        "export DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s",
        "export DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=2s",
        "export DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL=1s",
    ],
)
cluster.scale(jobs=8)  # 8 jobs x 4 workers = 32 notebooks at a time
print("scheduler:", cluster.scheduler_address, "dashboard:", cluster.dashboard_link)
submissions = sys.argv[1] if len(sys.argv) > 1 else "submissions"
command = [sys.executable, "-m", "autograder", "grade", submissions]
done = subprocess.run([*command, "--cluster", cluster.scheduler_address], check=False)
cluster.close()
sys.exit(done.returncode)
