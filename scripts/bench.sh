#!/usr/bin/env bash
# The main job: `muonkit bench` (muon vs adamw on the charlm task); extra arguments pass through.
extras="bench"
needed="numpy matplotlib tqdm"
source "$(dirname "$0")/setup.sh"
exec muonkit bench "$@"
