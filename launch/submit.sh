#!/usr/bin/env bash
# Submit a UNIFIT run to a Ray cluster started with launch/start_head.sh (+ join_worker.sh):
#
#   RAY_ADDRESS=http://127.0.0.1:6381 launch/submit.sh +experiment=cyber_500k [Hydra overrides]
#
# RAY_ADDRESS is the head's dashboard (start_head.sh prints it: port = its GCS port + 2; from another
# machine tunnel it: ssh -L 6381:127.0.0.1:6381 HEAD). This checkout is uploaded as the job's working dir
# (without .git/ and what .gitignore lists, runs/ included), so the head runs your code; the nodes need
# UNIFIT's dependencies installed. The driver runs on the head with cluster=ray unless you choose a
# cluster, and writes its run under UNIFIT_RUNS_DIR (default ~/unifit-runs on the head) unless you pass an
# absolute run_dir= (the uploaded working dir is temporary). Put UNIFIT_CACHE and HF_HOME on a filesystem
# every node sees, or each node downloads the weights itself.
# This script waits for the job and exits non-zero if it failed; Ctrl-C stops following it, not the job.
# Follow a job: ray job logs -f JOB_ID; stop it: ray job stop JOB_ID.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

fail() { echo "submit.sh: error: $*" >&2; exit 2; }

[[ ${RAY_ADDRESS:-} == http://* || ${RAY_ADDRESS:-} == https://* ]] ||
    fail "set RAY_ADDRESS to the URL of the head's dashboard, e.g. http://127.0.0.1:6381 (launch/start_head.sh prints it)," \
         "not its GCS address; got '${RAY_ADDRESS:-}'"

args=("$@")
chosen_cluster=false chosen_run_dir=false
for arg in "$@"; do
    case ${arg#"${arg%%[!+]*}"} in  # without Hydra's leading + or ++
        cluster=*) chosen_cluster=true ;;
        run_dir=/* | 'run_dir=${'*) chosen_run_dir=true ;;
        run_dir=*) fail "$arg: a relative run_dir would land in the job's temporary copy of this checkout on the head; give an absolute path" ;;
    esac
done
[[ $chosen_cluster == true ]] || args+=(cluster=ray)
# Single quotes: ${oc.env:HOME} and ${name} are Hydra interpolations, resolved by the driver on the head.
# shellcheck disable=SC2016
runs_dir=${UNIFIT_RUNS_DIR:-'${oc.env:HOME}/unifit-runs'}
[[ $chosen_run_dir == true ]] || args+=("run_dir=$runs_dir/"'${name}')

# `ray job submit` would answer an unreachable or job-less address with a traceback: check it first.
python - "$RAY_ADDRESS" <<'PY'
import sys

from ray.job_submission import JobSubmissionClient

try:
    JobSubmissionClient(sys.argv[1]).list_jobs()
except (OSError, RuntimeError, ValueError, KeyError) as error:  # refused, an HTTP error, not Ray's dashboard
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"submit.sh: error: no Ray job server at RAY_ADDRESS={sys.argv[1]} ({reason}); start the head with "
          "launch/start_head.sh (dashboard on, ray[default] installed) and use the address it prints, "
          "through `ssh -L` from another machine", file=sys.stderr)
    sys.exit(2)
PY

runtime_env=$(python -c 'import json, os; print(json.dumps({"excludes": [".git/", "runs/"], "env_vars": {
    "RAY_AUTH_MODE": os.environ.get("RAY_AUTH_MODE", "disabled"), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}}))')
# The CLI quotes the entrypoint's words itself (shlex.join) for the shell that runs it on the head.
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" -- bash launch/run_driver.sh "${args[@]}"
