#!/bin/bash
# Star Attention inference on a SLURM cluster: one task per GPU, all tasks of the job in one Lightning run.
#
#   sbatch [sbatch options] slurm/predict.sh [star-lightning predict options]
#   sbatch --nodes 2 slurm/predict.sh --config configs/ruler/llama-3.1-8b-128k.yaml --data.path ruler.jsonl
#
# Sizes are ordinary sbatch options and override the defaults below: --nodes, --ntasks-per-node (= GPUs used
# per node), --gpus-per-node, --time, --partition, --signal. Every argument after the script name goes to
# `star-lightning predict`; --trainer.num_nodes / --trainer.devices / --trainer.accelerator are derived from the
# allocation here (Lightning needs them to match it) and must not be given again.
#
# Hosts of several GPUs (a model that does not fit one GPU, e.g. 70B in bf16): set gpus_per_host in the config or
# with --trainer.strategy.gpus_per_host G, and run one task per host: --ntasks-per-node = GPUs per node / G, with
# all GPUs of the node visible to every task (--gpus-per-node, not --gpus-per-task); task r of a node takes GPUs
# r*G .. r*G+G-1. Example, 4 hosts of 2 GPUs for one request at a time:
#   sbatch --nodes 1 --ntasks-per-node 4 --gpus-per-node 8 slurm/predict.sh --config configs/ruler/llama-3.1-70b-32k.yaml
#
# Environment:
#   STAR_ACCELERATOR=cpu   CPU-only cluster (gloo); submit with --gpus-per-node=0 and --ntasks-per-node=N.
#   STAR_LIGHTNING=path    the star-lightning executable (default: the one on PATH, e.g. of an activated venv).
#
# Resuming: --requeue plus --signal=USR1@90 makes every task get SIGUSR1 90 s before the time limit; the tasks
# finish the request in flight, write it, rank 0 requeues the job (scontrol requeue) and the requeued job skips
# the requests already in --output. SIGTERM (scancel, preemption) also stops after the current request (exit 143).
# Pick the --signal lead time longer than one request takes. A task that dies ends the whole step at once
# (srun --kill-on-bad-exit=1); a rank that hangs ends it after --trainer.strategy.timeout_s.
#
#SBATCH --job-name=star-lightning
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=USR1@90
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -euo pipefail

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "slurm/predict.sh: submit it with sbatch (e.g. 'sbatch --nodes 2 slurm/predict.sh --config ...')" >&2
    exit 2
fi

# Lightning treats a job named "bash" or "interactive" as not launched by SLURM (SLURMEnvironment.detect): every task
# would then start its own processes. (Its "srun is available but not used" hint means the same misreading: it
# fires when srun is on PATH and SLURM_NTASKS is unset or the job has one of these names; the tasks below run under
# srun, so it never fires here.)
case "${SLURM_JOB_NAME:-}" in
    bash|interactive)
        echo "slurm/predict.sh: Lightning ignores SLURM for a job named '${SLURM_JOB_NAME}'; submit with another" \
             "--job-name (the default is star-lightning)" >&2
        exit 2
        ;;
esac

nodes="${SLURM_JOB_NUM_NODES}"
if [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]]; then
    tasks_per_node="${SLURM_NTASKS_PER_NODE}"
elif (( SLURM_NTASKS % nodes == 0 )); then
    tasks_per_node=$(( SLURM_NTASKS / nodes ))
else
    echo "slurm/predict.sh: ${SLURM_NTASKS} tasks do not split evenly over ${nodes} nodes; submit with" \
         "--ntasks-per-node=N (one task per GPU)" >&2
    exit 2
fi
accelerator="${STAR_ACCELERATOR:-gpu}"
executable="${STAR_LIGHTNING:-star-lightning}"

# NCCL: a failed or hung collective aborts the process (so srun ends the job) instead of hanging it.
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
export PYTHONUNBUFFERED=1

echo "star-lightning job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): ${nodes} node(s) x" \
     "${tasks_per_node} task(s), accelerator ${accelerator}, on ${SLURM_JOB_NODELIST}"

# Not `exec`: the batch shell stays to report srun's exit status. Lightning reads ranks and the rendezvous address
# from SLURM's environment of each task.
srun --kill-on-bad-exit=1 --ntasks-per-node="${tasks_per_node}" \
    "${executable}" predict \
    --trainer.num_nodes "${nodes}" \
    --trainer.devices "${tasks_per_node}" \
    --trainer.accelerator "${accelerator}" \
    "$@"
