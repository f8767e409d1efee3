#!/usr/bin/env bash
# The main job: `muonkit bench` (muon vs adamw on the charlm task); extra arguments pass through.
# `bench.sh hf-lm ...` also installs the hf extra (transformers), which that task builds its models with.
extras="bench"
needed="numpy matplotlib tqdm"
for arg in "$@"; do
    if [ "$arg" = "hf-lm" ]; then
        extras="bench,hf"
        needed="$needed transformers"
    fi
done
source "$(dirname "$0")/setup.sh"
exec muonkit bench "$@"
