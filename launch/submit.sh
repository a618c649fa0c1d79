#!/usr/bin/env bash
# Submit a UNIFIT run to a Ray cluster started with launch/start_head.sh (+ join_worker.sh):
#
#   RAY_ADDRESS=http://127.0.0.1:6381 launch/submit.sh +experiment=cyber_500k [Hydra overrides]
#
# RAY_ADDRESS is the head's dashboard (start_head.sh prints it: port = its GCS port + 2; from another
# machine tunnel it: ssh -L 6381:127.0.0.1:6381 HEAD). This checkout is uploaded as the job's working dir
# (runs/ and .git/ left out), so the head runs your code; the nodes need UNIFIT's dependencies installed
# and `ray[default]` on the head (dashboard + job server). The driver runs on the head with cluster=ray
# unless you choose a cluster, and writes its run under UNIFIT_RUNS_DIR (default ~/unifit-runs on the
# head; the uploaded working dir is temporary) unless you pass run_dir=. Put UNIFIT_CACHE and HF_HOME on
# a filesystem every node sees, or each node downloads the weights itself.
# Follow a job: ray job logs -f JOB_ID; stop it: ray job stop JOB_ID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard of the head, e.g. http://127.0.0.1:6381 (launch/start_head.sh prints it)}"

args=("$@")
[[ " $* " == *" cluster="* || " $* " == *" +cluster="* ]] || args+=(cluster=ray)
# Single quotes: ${oc.env:HOME} and ${name} are Hydra interpolations, resolved by the driver on the head.
# shellcheck disable=SC2016
runs_dir=${UNIFIT_RUNS_DIR:-'${oc.env:HOME}/unifit-runs'}
[[ " $* " == *" run_dir="* ]] || args+=("run_dir=$runs_dir/"'${name}')

# `ray job submit` joins the entrypoint into one shell command line: quote every argument for that shell.
entrypoint=$(printf '%q ' bash launch/run_driver.sh "${args[@]}")
runtime_env=$(python -c 'import json, os; print(json.dumps({"excludes": ["runs/", ".git/"], "env_vars": {
    "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}}))')
exec ray job submit --working-dir . --runtime-env-json "$runtime_env" -- "$entrypoint"
