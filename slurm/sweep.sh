#!/usr/bin/env bash
# slurm/sweep.sh [Hydra overrides for every run]
#
# The paper's grid: four 7B models x {Pithy, All} x {NE, no NE}. Each model is one run (one sbatch job of
# slurm/unifit.sbatch) whose `variants` already hold the four data x NEFTune combinations
# (conf/experiment/cyber_500k.yaml), so 4 jobs cover the 16 cells. Run from the repository root.
#
# What is shared and what is not:
#   * Generation is shared: one data set for all models, as in the paper. Job 1 generates it with the first
#     model (stages=[generate], in that model's run directory); a small CPU job merges its shards into
#     <first run>/shared_instances.parquet; the other models import that file (data.path), so their
#     generate stage is a copy, not a second 500K-instance generation.
#   * The first model's full run reuses its own generate/ (same config -> same fingerprint -> skipped) and
#     also keeps the Self-Instruct baseline, so Figure 3 (diversity) comes from that run.
#   * Selection is per model: the scoring model is the base model fine-tuned on the K-per-leaf sample, so
#     each model trains its own scorer and ranks the data by its own IFD; Table 1 times it per model.
#   * A last CPU job runs `python -m unifit.report` over the four runs once they have all ended.
#
# Environment: SWEEP_MODELS (default "llama2_7b mistral_7b baichuan2_7b qwen_7b"; the first one generates),
# SWEEP_EXPERIMENT (default cyber_500k), SWEEP_RUNS (default runs), SWEEP_SBATCH_ARGS (flags for every GPU
# job, e.g. "--partition=gpu --account=me --nodes=2"), SWEEP_CPU_SBATCH_ARGS (flags for the two CPU jobs),
# SWEEP_DRY_RUN=1 (print the sbatch commands, submit nothing).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

read -r -a models <<<"${SWEEP_MODELS:-llama2_7b mistral_7b baichuan2_7b qwen_7b}"
experiment=${SWEEP_EXPERIMENT:-cyber_500k}
runs=${SWEEP_RUNS:-runs}
read -r -a gpu_args <<<"${SWEEP_SBATCH_ARGS:-}"
read -r -a cpu_args <<<"${SWEEP_CPU_SBATCH_ARGS:-}"
cpu_args=(--nodes=1 --ntasks=1 --cpus-per-task=4 --gpus-per-node=0 --time=02:00:00 "${cpu_args[@]}")
first=${models[0]}
run_dir() { echo "$runs/$experiment-$1"; }
shared=$(run_dir "$first")/shared_instances.parquet

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

generate=$(submit "${gpu_args[@]}" --job-name="unifit-generate-$first" slurm/unifit.sbatch \
    "+experiment=$experiment" "model=$first" "run_dir=$(run_dir "$first")" "stages=[generate]" "$@")
merge=$(submit "${cpu_args[@]}" --job-name=unifit-merge --dependency="afterok:$generate" --wrap \
    "python -c 'import sys, pyarrow.parquet as pq; pq.write_table(pq.read_table(sys.argv[1]), sys.argv[2])' $(
        printf %q "$(run_dir "$first")/generate/instances") $(printf %q "$shared")")

jobs=() dirs=()
for model in "${models[@]}"; do
    if [[ $model == "$first" ]]; then
        after=$generate extra=()
    else
        after=$merge extra=("data.path=$shared" "data.format=parquet")
    fi
    jobs+=("$(submit "${gpu_args[@]}" --job-name="unifit-$model" --dependency="afterok:$after" slurm/unifit.sbatch \
        "+experiment=$experiment" "model=$model" "run_dir=$(run_dir "$model")" "${extra[@]}" "$@")")
    dirs+=("$(run_dir "$model")")
done

report_dir=$runs/$experiment-sweep-report
report=$(submit "${cpu_args[@]}" --job-name=unifit-report --dependency="afterany:$(IFS=:; echo "${jobs[*]}")" --wrap \
    "python -m unifit.report $(printf '%q ' "${dirs[@]}")--out $(printf %q "$report_dir")")

echo "submitted: generate $generate, merge $merge, runs ${jobs[*]} (${models[*]}), report $report"
echo "results: ${dirs[*]}; the combined report (Table 1, Figures 3-5): $report_dir/report.html"
echo "watch: squeue -u $USER; W&B (offline): wandb sync $runs/$experiment-*/wandb/offline-run-*"
