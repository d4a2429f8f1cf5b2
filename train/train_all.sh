#!/usr/bin/env bash
# Retrain every shipped model, in dependency order (the VAE before the latent model). CPU, ~1 hour.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
$PY train/train_classifier.py --data digits --epochs 30 --shift 1 --seed 0
$PY train/train_classifier.py --data fashion --epochs 3 --seed 0
$PY train/train_classifier.py --data fashion --arch mlp --epochs 10 --shift 1 --seed 1 --threads 1 --name fashion_classifier_heldout
$PY train/train_diffusion.py --model digits --steps 2000 --seed 0
$PY train/train_diffusion.py --model fashion --steps 2500 --seed 0
$PY train/train_vae.py --steps 1200 --seed 0
$PY train/train_diffusion.py --model fashion_latent --steps 1500 --seed 0
