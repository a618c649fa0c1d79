#!/usr/bin/env bash
# slurm/sweep.sh [Hydra overrides for every run]
#
# The paper's grid: four 7B models x {Pithy, All} x {NE, no NE}. Each model is one run (one sbatch job of
# slurm/unifit.sbatch) whose `variants` already hold the four data x NEFTune combinations
# (conf/experiment/cyber_500k.yaml), so 4 runs cover the 16 cells. Run from the repository root.
#
# One generation and one selection for all models: every job names the same generator (+model@generator)
# and scoring base (+model@scorer) and the same content-addressed store (shared_dir=$runs/shared), so
# generate, sample, train_scorer and score (and select, without the scorer check) have equal fingerprints in every run.
#   1. A GPU job runs those five stages once (run directory <runs>/<experiment>-shared; outputs in
#      <runs>/shared/<stage>/<fingerprint>): the data set with its Self-Instruct baseline, one scoring model,
#      the IFD of every instance, the Pithy subset.
#   2. One GPU job per model, each starting after job 1 succeeded (afterok), runs all stages with `model=`
#      that model: generate..score (and select with select.agreement_fraction=0) are found finished in the store and
#      linked into its run directory (timings.json marks them shared); select reruns to check the shared scorer
#      against this model on a small sample (same Pithy subset), then finetune, evaluate and report run.
#   3. A CPU job runs `python -m unifit.report` over the model runs once they have all ended (Table 1 +
#      Figures 3-5 in one report).
#
# Environment: SWEEP_MODELS (default "llama2_7b mistral_7b baichuan2_7b qwen_7b"), SWEEP_GENERATOR and
# SWEEP_SCORER (conf/model/ names; default the first model), SWEEP_EXPERIMENT (default cyber_500k), SWEEP_RUNS
# (default runs), SWEEP_SBATCH_ARGS (flags for every GPU job, e.g. "--partition=gpu --account=me --nodes=2"),
# SWEEP_CPU_SBATCH_ARGS (flags for the report job), SWEEP_DRY_RUN=1 (print the sbatch commands, submit nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

read -r -a models <<<"${SWEEP_MODELS:-llama2_7b mistral_7b baichuan2_7b qwen_7b}"
experiment=${SWEEP_EXPERIMENT:-cyber_500k}
runs=${SWEEP_RUNS:-runs}
generator=${SWEEP_GENERATOR:-${models[0]}}
scorer=${SWEEP_SCORER:-${models[0]}}
read -r -a gpu_args <<<"${SWEEP_SBATCH_ARGS:-}"
read -r -a cpu_args <<<"${SWEEP_CPU_SBATCH_ARGS:-}"
cpu_args=(--nodes=1 --ntasks=1 --cpus-per-task=4 --gpus-per-node=0 --time=02:00:00 "${cpu_args[@]}")
# What makes the shared stages' fingerprints equal across jobs; "$@" comes last and goes to every job alike.
common=("+experiment=$experiment" "+model@generator=$generator" "+model@scorer=$scorer" "shared_dir=$runs/shared")

submit() {  # sbatch ARGS... -> job id (dry run: print the command; the id is a placeholder named after the job)
    if [[ -n ${SWEEP_DRY_RUN:-} ]]; then
        printf 'sbatch' >&2
        printf ' %q' "$@" >&2
        echo >&2
        local arg
        for arg in "$@"; do
            if [[ $arg == --job-name=* ]]; then echo "<${arg#--job-name=}>"; fi
        done
    else
        sbatch --parsable "$@" | cut -d';' -f1
    fi
}

shared=$(submit "${gpu_args[@]}" --job-name=unifit-shared slurm/unifit.sbatch "${common[@]}" "model=${models[0]}" \
    "run_dir=$runs/$experiment-shared" "stages=[generate,sample,train_scorer,score,select]" "$@")

jobs=() dirs=()
for model in "${models[@]}"; do
    dirs+=("$runs/$experiment-$model")
    jobs+=("$(submit "${gpu_args[@]}" --job-name="unifit-$model" --dependency="afterok:$shared" --kill-on-invalid-dep=yes slurm/unifit.sbatch \
        "${common[@]}" "model=$model" "run_dir=${dirs[-1]}" "$@")")
done

report_dir=$runs/$experiment-sweep-report
report=$(submit "${cpu_args[@]}" --job-name=unifit-report --dependency="afterany:$(IFS=:; echo "${jobs[*]}")" --wrap \
    "python -m unifit.report $(printf '%q ' "${dirs[@]}")--out $(printf %q "$report_dir")")

echo "submitted: shared stages $shared (generator $generator, scorer $scorer), runs ${jobs[*]} (${models[*]}), report $report"
echo "results: ${dirs[*]}; shared stages: $runs/shared; the combined report (Table 1, Figures 3-5): $report_dir/report.html"
echo "watch: squeue -u ${USER:-$(id -un)}; W&B (offline): wandb sync $runs/$experiment-*/wandb/offline-run-*"
