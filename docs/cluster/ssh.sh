#!/usr/bin/env bash
# Dask workers on SSH hosts for `python -m autograder grade --cluster tcp://$SCHEDULER:8786`.
# Every host needs the course package at the coordinator's version:
#   pip install "soft-prompts-course[instructor,cluster]"
set -euo pipefail

SCHEDULER="${SCHEDULER:-$(hostname -f)}"
HOSTS=(grader1 grader2 grader3)          # edit: the machines that grade
PROCS_PER_HOST="${PROCS_PER_HOST:-4}"     # one worker process per 1-2 cores

dask scheduler --port 8786 --dashboard-address :8787 &
SCHEDULER_PID=$!
trap 'kill "$SCHEDULER_PID"; for h in "${HOSTS[@]}"; do ssh "$h" pkill -f "dask worker" || true; done' EXIT

for host in "${HOSTS[@]}"; do
    # not daemonic (a worker starts a grading process); quiet (README.md, "Keep Dask quiet")
    ssh "$host" "DASK_DISTRIBUTED__WORKER__DAEMON=False \
        DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s \
        DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=2s \
        DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL=1s \
        nohup dask worker tcp://$SCHEDULER:8786 \
        --nthreads 1 --nworkers $PROCS_PER_HOST > dask-worker.log 2>&1 &"
done

python -m autograder grade "${1:-submissions}" --cluster "tcp://$SCHEDULER:8786"
