#!/usr/bin/env bash
# The whole pipeline, every stage through its own script, chained as a user runs them:
#
#   generated data (synthetic.py) or FineWeb-Edu ─ fineweb.py ─> token shards
#     ─ pretrain.py ─> pretrain.pt ─ hellaswag.py ─> pretrain_hellaswag_val.json
#     ─ sft.py ─> best_sft.pt [─ sample_comparisons.py: small only] ─ reward_model.py ─> reward_model.pt
#     ─ ppo.py ─> ppo_latest.pt ─ dpo.py ─> dpo_latest.pt ─ eval_summaries.py ─> runs/<name>/eval/eval.json ─ summarize.py
#   then report.py (runs/<name>/report.md, report.json) and plot.py (runs/<name>/*.png)
#
#   ./run.sh small                 # the CPU demo on the generated world (what `make demo` runs)
#   ./run.sh tiny                  # the same chain at test size: about a minute on 2 cores
#   ./run.sh gpt2                  # the real run: FineWeb-Edu, HellaSwag, TL;DR; torchrun over all visible GPUs
#   NPROC=2 PRETRAIN_ARGS="--micro-batch 16" SFT_ARGS="--micro-batch 8" RM_ARGS="--micro-batch 4" \
#       PPO_ARGS="--micro-batch 4 --gen-batch 32" ./run.sh gpt2               # two T4s
#   ./run.sh small --force         # redo every stage after the data (the old checkpoints go to checkpoints/small/previous/)
#   ./run.sh small --name try2     # a second run beside the first: checkpoints/try2/, runs/try2/
#
# Everything is written under the current directory: data/ (shared by runs of the same preset),
# checkpoints/<name>/ and runs/<name>/ (<name> defaults to the preset). A stage that finished before is
# skipped; one that was interrupted continues from its last checkpoint (--resume), so rerunning the same
# command after a crash or Ctrl-C picks up where it stopped. Each stage starts (or is skipped) with a line
# "== stage i/N: NAME", N being the number of stages the preset runs (tiny 11, small 12, gpt2 11). Data preparation is never redone (it is
# deterministic and resumes itself); delete data/ to redo it.
#
# Environment: PYTHON (default .venv/bin/python beside this script, else python3), NPROC (gpt2: processes
# per node, default: the number of visible GPUs), and extra flags per stage appended last, so they win:
# FINEWEB_ARGS, PRETRAIN_ARGS, HELLASWAG_ARGS, SFT_ARGS, COMPARISONS_ARGS, RM_ARGS, PPO_ARGS, DPO_ARGS, EVAL_ARGS.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

# --- arguments
PRESET="" NAME="" FORCE=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --force) FORCE=1 ;;
    --name) [[ $# -ge 2 && -n "$2" ]] || die "--name needs a value"; NAME="$2"; shift ;;
    --name=*) NAME="${1#--name=}" ;;
    tiny|small|gpt2) [[ -z "$PRESET" ]] || die "give one preset, not '$PRESET' and '$1'"; PRESET="$1" ;;
    *) die "unknown argument '$1'; usage: ./run.sh small|tiny|gpt2 [--force] [--name NAME]" ;;
  esac
  shift
done
[[ -n "$PRESET" ]] || die "give a preset; usage: ./run.sh small|tiny|gpt2 [--force] [--name NAME]"
NAME="${NAME:-$PRESET}"
[[ "$NAME" =~ ^[A-Za-z0-9][A-Za-z0-9._-]*$ ]] \
  || die "--name may hold letters, digits, '.', '_' and '-' only, starting with a letter or digit, got '$NAME'"

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
CKPT="checkpoints/$NAME"
RUN="runs/$NAME"
mkdir -p "$CKPT" "$RUN/.done"
if [[ $FORCE == 1 ]]; then
  # every stage starts afresh: the earlier run's outputs move to $CKPT/previous/ (replacing an older set), so that
  # no stage of this run - interrupted and rerun without --force - resumes from or skips on one of them
  rm -f "$RUN"/.done/* "$RUN/times.tsv"
  shopt -s nullglob; OLD=("$CKPT"/*.pt "$CKPT"/*.json "$CKPT"/comparisons_sf[t]); shopt -u nullglob
  if [[ ${#OLD[@]} -gt 0 ]]; then
    rm -rf "$CKPT/previous"; mkdir -p "$CKPT/previous"; mv "${OLD[@]}" "$CKPT/previous/"
    echo "== --force: the earlier run's ${#OLD[@]} checkpoint files moved to $CKPT/previous/"
  fi
fi

# --- launcher: one process on a CPU, torchrun over the GPUs of this node for the real run
if [[ "$PRESET" == gpt2 ]]; then
  NPROC="${NPROC:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}"
  NPROC="${NPROC:-1}"; [[ "$NPROC" -ge 1 ]] || NPROC=1
  launch() { if [[ "$NPROC" -gt 1 ]]; then "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" "$@"
             else "$PYTHON" "$@"; fi; }
else
  # the generated world is local: nothing may reach for a hub
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  launch() { "$PYTHON" "$@"; }
fi
py() { "$PYTHON" "$@"; }
show() {  # the command as you would type it
  local how=$1; shift
  case "$how" in
    py) echo "+ $PYTHON $*" ;;
    launch) if [[ "$PRESET" == gpt2 && "$NPROC" -gt 1 ]]; then echo "+ torchrun --standalone --nproc_per_node=$NPROC $*"
            else echo "+ $PYTHON $*"; fi ;;
  esac
}
args() { read -r -a _extra <<< "${1:-}"; }  # word-split one *_ARGS variable into _extra

# --- stage bookkeeping
# the stages this preset runs, in order: each says "== stage i/N: NAME" when it starts or is skipped
case "$PRESET" in
  tiny)  STAGES=(synthetic fineweb pretrain hellaswag sft reward_model ppo dpo eval summarize report) ;;
  small) STAGES=(synthetic fineweb pretrain hellaswag sft comparisons reward_model ppo dpo eval summarize report) ;;
  gpt2)  STAGES=(fineweb hellaswag_gpt2 pretrain hellaswag sft reward_model ppo dpo eval summarize report) ;;
esac
announce() {  # announce STAGE: its place among this preset's STAGES
  local i
  for i in "${!STAGES[@]}"; do
    if [[ "${STAGES[$i]}" == "$1" ]]; then echo "== stage $((i + 1))/${#STAGES[@]}: $1"; return 0; fi
  done
  die "run.sh: stage '$1' is missing from the $PRESET preset's STAGES"
}
finished() {  # finished STAGE OUTPUT...: true when STAGE completed before and its outputs are all there
  local stage=$1; shift
  [[ -f "$RUN/.done/$stage" ]] || return 1
  for f in "$@"; do [[ -e "$f" ]] || return 1; done
  echo "== $stage: done before, skipped (--force redoes it)"
}
resume_or_fresh() {  # resume_or_fresh STAGE LATEST_CKPT: --resume when an interrupted run left LATEST_CKPT
  if [[ $FORCE == 0 && -f "$2" ]]; then RESUME=(--resume); echo "== $1: continuing from $2"
  else RESUME=(); rm -f "$RUN/$1/log.jsonl"; fi  # a fresh start must not append to an old run's log
}
run_stage() {  # run_stage STAGE COMMAND...: run it, time it, mark it done
  local stage=$1; shift
  echo "== $stage"
  show "$@"
  local t0=$SECONDS
  "$@"
  printf '%s\t%s\n' "$stage" "$((SECONDS - t0))" >> "$RUN/times.tsv"
  touch "$RUN/.done/$stage"
}
shards_complete() {  # fineweb.py marks a finished conversion in progress.json (an unfinished one it continues)
  grep -q '"complete": *true' "$SHARDS/progress.json" 2>/dev/null && echo "== fineweb: $SHARDS complete, skipped"
}
T_START=$SECONDS

# --- data
case "$PRESET" in
  tiny|small)
    SYN="data/synthetic"; SHARDS="data/synthetic_shards"; SYN_FLAGS=(--seed 0)
    SHARD_FLAGS=()
    if [[ "$PRESET" == tiny ]]; then  # the tiny world is ~9k tokens: small shards so that some are train shards
      SYN="data/synthetic_tiny"; SHARDS="data/synthetic_tiny_shards"; SYN_FLAGS+=(--preset tiny); SHARD_FLAGS=(--shard-tokens 2048)
    fi
    announce synthetic
    if [[ -f "$SYN/manifest.json" ]]; then echo "== synthetic: $SYN exists, skipped"
    else run_stage synthetic py "$ROOT/synthetic.py" --out "$SYN" "${SYN_FLAGS[@]}"; fi
    announce fineweb
    args "${FINEWEB_ARGS:-}"
    if ! shards_complete; then
      run_stage fineweb py "$ROOT/fineweb.py" --preset "$PRESET" --input "$SYN/pretrain.jsonl" --out-dir "$SHARDS" \
        --workers 1 "${SHARD_FLAGS[@]}" "${_extra[@]}"
    fi
    ;;
  gpt2)
    SHARDS="data/fineweb_edu"
    announce fineweb
    args "${FINEWEB_ARGS:-}"
    if ! shards_complete; then run_stage fineweb py "$ROOT/fineweb.py" --out-dir "$SHARDS" "${_extra[@]}"; fi
    # OpenAI's GPT-2 124M on HellaSwag val: the reference figure, and it fetches the split that
    # pretrain.py then evaluates every --eval-every steps
    announce hellaswag_gpt2
    if ! finished hellaswag_gpt2 "$CKPT/gpt2_hellaswag_val.json"; then
      run_stage hellaswag_gpt2 launch "$ROOT/hellaswag.py" --preset gpt2 --hf gpt2 --out "$CKPT/gpt2_hellaswag_val.json"
    fi
    ;;
esac

# --- pretrain
announce pretrain
if ! finished pretrain "$CKPT/pretrain.pt"; then
  resume_or_fresh pretrain "$CKPT/pretrain.pt"
  args "${PRETRAIN_ARGS:-}"
  case "$PRESET" in
    # tiny: evaluations at the start and the end only, so that the whole chain takes about a minute
    tiny)  FLAGS=(--preset tiny --hellaswag-path "$SYN/hellaswag/hellaswag_val.jsonl" --eval-every 0 --max-steps 20) ;;
    # small: the demo's time budget (about 4-5 minutes of a 2-core CPU)
    small) FLAGS=(--preset small --hellaswag-path "$SYN/hellaswag/hellaswag_val.jsonl") ;;
    gpt2)  FLAGS=(--preset gpt2) ;;
  esac
  run_stage pretrain launch "$ROOT/pretrain.py" "${FLAGS[@]}" --data-dir "$SHARDS" --ckpt pretrain.pt --ckpt-dir "$CKPT" \
    --run-name "$NAME/pretrain" "${RESUME[@]}" "${_extra[@]}"
fi

# --- HellaSwag of the pretrained model (all rows of the split; pretrain.py logged a subset during training)
announce hellaswag
if ! finished hellaswag "$CKPT/pretrain_hellaswag_val.json"; then
  args "${HELLASWAG_ARGS:-}"
  case "$PRESET" in
    tiny|small) FLAGS=(--preset "$PRESET" --data-dir "$SYN/hellaswag") ;;
    gpt2)       FLAGS=(--preset gpt2) ;;
  esac
  run_stage hellaswag launch "$ROOT/hellaswag.py" "${FLAGS[@]}" --ckpt pretrain.pt --ckpt-dir "$CKPT" "${_extra[@]}"
fi

# --- SFT
announce sft
if ! finished sft "$CKPT/best_sft.pt"; then
  resume_or_fresh sft "$CKPT/sft_latest.pt"
  args "${SFT_ARGS:-}"
  case "$PRESET" in
    tiny)  FLAGS=(--preset tiny --data "$SYN/tldr" --gold-samples 8 --eval-every 0) ;;
    small) FLAGS=(--preset small --data "$SYN/tldr" --gold-samples 64) ;;
    gpt2)  FLAGS=(--preset gpt2) ;;
  esac
  run_stage sft launch "$ROOT/sft.py" "${FLAGS[@]}" --init pretrain.pt --ckpt-dir "$CKPT" --run-name "$NAME/sft" \
    "${RESUME[@]}" "${_extra[@]}"
fi

# --- comparisons for the reward model. The real run uses people's comparisons of policy samples
# (CarperAI); on the small world the rater labels pairs of the SFT model's own samples, which is what
# lets PPO raise the gold score (the variant comparisons do not). The tiny model's samples are noise
# with nothing to tell apart, so tiny keeps the variants.
COMPARISONS="${SYN:-}/comparisons"  # gpt2 has no SYN (and passes no --data: CarperAI's comparisons)
if [[ "$PRESET" == small ]]; then
  COMPARISONS="$CKPT/comparisons_sft"
  announce comparisons
  if ! finished comparisons "$COMPARISONS/manifest.json"; then
    args "${COMPARISONS_ARGS:-}"
    run_stage comparisons py "$ROOT/sample_comparisons.py" --policy best_sft.pt --ckpt-dir "$CKPT" --data "$SYN/tldr" \
      --out "$COMPARISONS" --train-posts 1600 --valid-posts 400 --samples-per-post 3 --batch-size 128 "${_extra[@]}"
  fi
fi

# --- reward model
announce reward_model
if ! finished reward_model "$CKPT/reward_model.pt"; then
  resume_or_fresh reward_model "$CKPT/reward_model_latest.pt"
  args "${RM_ARGS:-}"
  case "$PRESET" in
    tiny|small) FLAGS=(--preset "$PRESET" --data "$COMPARISONS" --sft-data "$SYN/tldr") ;;
    gpt2)  FLAGS=(--preset gpt2) ;;
  esac
  run_stage reward_model launch "$ROOT/reward_model.py" "${FLAGS[@]}" --init best_sft.pt --ckpt-dir "$CKPT" \
    --run-name "$NAME/reward_model" "${RESUME[@]}" "${_extra[@]}"
fi

# --- PPO
announce ppo
if ! finished ppo "$CKPT/ppo_latest.pt"; then
  resume_or_fresh ppo "$CKPT/ppo_latest.pt"
  args "${PPO_ARGS:-}"
  case "$PRESET" in
    tiny)  FLAGS=(--preset tiny --data "$SYN/tldr" --eval-every 0 --max-steps 2) ;;
    small) FLAGS=(--preset small --data "$SYN/tldr") ;;
    gpt2)  FLAGS=(--preset gpt2) ;;
  esac
  run_stage ppo launch "$ROOT/ppo.py" "${FLAGS[@]}" --sft best_sft.pt --rm reward_model.pt --ckpt ppo_latest.pt \
    --ckpt-dir "$CKPT" --run-name "$NAME/ppo" "${RESUME[@]}" "${_extra[@]}"
fi

# --- DPO: the SFT model aligned directly on the reward model's comparisons (no reward model, no rollouts),
# compared with PPO by the evaluation stage
announce dpo
if ! finished dpo "$CKPT/dpo_latest.pt"; then
  resume_or_fresh dpo "$CKPT/dpo_latest.pt"
  args "${DPO_ARGS:-}"
  case "$PRESET" in
    tiny|small) FLAGS=(--preset "$PRESET" --comparisons "$COMPARISONS" --gold on) ;;
    gpt2)  FLAGS=(--preset gpt2) ;;
  esac
  run_stage dpo launch "$ROOT/dpo.py" "${FLAGS[@]}" --sft best_sft.pt --ckpt-dir "$CKPT" --run-name "$NAME/dpo" \
    "${RESUME[@]}" "${_extra[@]}"
fi

# --- evaluation: greedy summaries of the test posts by SFT, PPO and DPO (cached), ROUGE, win rates by the reward
# model, KL to SFT (and the gold score on the generated world; a judge LM with EVAL_ARGS="--judge NAME")
announce eval
if ! finished eval "$RUN/eval/eval.json"; then
  args "${EVAL_ARGS:-}"
  case "$PRESET" in
    tiny|small) FLAGS=(--data "$SYN/tldr" --posts 400 --comparisons "$SYN/comparisons") ;;
    gpt2)       FLAGS=(--posts 1000) ;;
  esac
  run_stage eval py "$ROOT/eval_summaries.py" "${FLAGS[@]}" --policies best_sft.pt ppo_latest.pt dpo_latest.pt --sft best_sft.pt \
    --rm reward_model.pt --ckpt-dir "$CKPT" --out-dir "$RUN/eval" "${_extra[@]}"
fi

# --- serve: summarize.py with the PPO policy (report.py puts the SFT model's summary of a held-out post beside it)
POST="I (24F) need advice about my roommate (25M), who keeps eating my food. It's been like this for two months now. \
I've already tried leaving a polite note on the fridge, but nothing changed. Should I confront him about it?"
announce summarize
echo "== summarize"
echo "+ $PYTHON $ROOT/summarize.py --ckpt ppo_latest.pt --ckpt-dir $CKPT --subreddit roommates --title \"Need advice about my roommate\" \"$POST\""
py "$ROOT/summarize.py" --ckpt ppo_latest.pt --ckpt-dir "$CKPT" --subreddit roommates --title "Need advice about my roommate" "$POST"

# --- report (from the stages' records only) and plots
announce report
py "$ROOT/report.py" --run-dir "$RUN" --ckpt-dir "$CKPT"
py "$ROOT/plot.py" --run-dir "$RUN"
echo "== done in $((SECONDS - T_START)) s: $RUN/report.md, $RUN/*.png, checkpoints in $CKPT/"
echo "   try it: $PYTHON summarize.py --ckpt-dir $CKPT \"your post\""
