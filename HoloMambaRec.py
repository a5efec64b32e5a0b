"""HoloMambaRec: metadata-aware sequential recommendation with holographic binding and a Mamba encoder.

Each item embedding is bound to its attribute embedding by circular convolution (holographic reduced
representations, computed with the FFT); the sequence of bound embeddings goes through a shallow Mamba
selective state-space encoder that scores the next item over the whole catalog. Around the model: SASRec,
RAMRec (SASRec with a per-user episodic memory), GRU4Rec and an item-only Mamba ablation; loaders for
MovieLens-1M, Amazon Beauty, generic CSV and RecBole atomic files; benchmark, ablation, grid search,
compression, long-term memory, efficiency and statistics stages; figures.

    python HoloMambaRec.py --quick                      # whole pipeline on built-in synthetic data (CPU, ~1 min)
    python HoloMambaRec.py --data_dir=../shared/datasets # the paper's pipeline on ML-1M and Beauty
    python HoloMambaRec.py --help                       # every config key with its meaning, grouped by role

From Python (the API the notebooks use):

    import HoloMambaRec as hm
    data = hm.load_dataset("ml-1m", data_dir="../shared/datasets")
    model = hm.build_model("HoloMamba", data, max_len=200)
    result = hm.fit(model, data)                         # early stopping on validation NDCG@10
    print(hm.evaluate(model, data, "test"))              # full-ranking HR / NDCG / MRR
    hm.save(model, "holomamba.pt"); model = hm.load("holomamba.pt")

Protocol: leave-one-out (last item = test, second-to-last = validation), full ranking over the catalog with
each user's earlier items excluded (--exclude_seen), model selection on validation NDCG@10 only, the test
split evaluated once per run with the best weights.

Sections, in the order data flows: §1 configuration · §2 data · §3 holographic operations · §4 selective scan ·
§5 models · §6 training · §7 evaluation · §8 runs and result files · §9 stages · §10 figures · §11 Python API
and command line.
"""
from __future__ import annotations

import argparse
import ast
import concurrent.futures
import contextlib
import copy
import csv
import datetime
import functools
import gc
import gzip
import hashlib
import importlib.util
import io
import itertools
import json
import math
import multiprocessing
import os
import re
import signal
import socket
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import pandas as pd
import torch
from filelock import FileLock
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm.auto import tqdm

__version__ = "0.2.0"


# =====================================================================================================
# §1 Configuration: one table of keys
# =====================================================================================================
# Every key has a default, a role, a check and a meaning. Everything else is derived from this table:
# --help (grouped by role), validation of every config a stage builds, the run hash (data + model +
# training roles: what changes a trained model) and the data-cache key (data role). GLOBAL_CONFIG, the
# key -> default dict of the paper's script, is built from it; editing GLOBAL_CONFIG (in a notebook, say)
# changes the defaults of every later call. Lists are comma-separated strings, so a config is plain data,
# stored in every checkpoint and every run record.
STAGE_NAMES = ("benchmark", "ablation", "grid", "compression", "efficiency", "memory", "stats", "figures", "recommend",
               "paper", "ddp")
MODEL_NAMES = ("HoloMamba", "Mamba-ItemOnly", "SASRec", "GRU4Rec", "RAMRec", "HoloMamba-Shuffled")
BUILTIN_DATASETS = ("ml-1m", "amazon-beauty", "synthetic")
METRIC_KS = (5, 10, 20)

ROLES = {
    "stage": "what to run, and the stages' own settings (never part of a run's identity)",
    "data": "which data, and how it is filtered (the data-cache key; part of the run hash)",
    "model": "architecture (part of the run hash)",
    "training": "optimisation and model selection (part of the run hash)",
    "evaluation": "how a finished run is measured and sliced",
    "system": "where and how it runs: device, kernels, data location (numerically neutral)",
    "output": "where results, figures and checkpoints go",
}
HASHED_ROLES = ("data", "model", "training")


class ConfigError(ValueError):
    """A bad --key=value, an unknown key, or a value out of range."""


class DataError(RuntimeError):
    """A dataset, checkpoint or result file that is missing, corrupt, or empty after filtering."""


class TrainingError(RuntimeError):
    """Training or evaluation produced a non-finite loss or non-finite scores: the weights diverged or are corrupt."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during fit(): carries the training state (weights, best weights, optimizer, history) so that the
    run can be saved and continued with --resume."""

    def __init__(self, state):
        super().__init__("interrupted")
        self.state = state


class Key(NamedTuple):
    default: object
    role: str
    check: Callable | None  # value -> None when fine, else what is wrong ("must be > 0")
    meaning: str


def as_list(value, kind=str):
    """Parse a comma-separated config string into a list of `kind`."""
    return [kind(v.strip()) for v in str(value).split(",") if v.strip()]


def above(low):
    return lambda v: None if v > low else f"must be > {low}"


def at_least(low):
    return lambda v: None if v >= low else f"must be >= {low}"


def fraction(closed_low=True, closed_high=False):
    """A value in [0, 1) by default; the brackets of the message follow the arguments."""
    lo, hi = ("[" if closed_low else "("), ("]" if closed_high else ")")

    def check(v):
        ok = (v >= 0 if closed_low else v > 0) and (v <= 1 if closed_high else v < 1)
        return None if ok else f"must be in {lo}0, 1{hi}"
    return check


def one_of(*options):
    return lambda v: None if v in options else f"choose {', '.join(options)}"


def names_in(*options):
    """A non-empty comma list whose every element is one of options."""
    def check(v):
        names = as_list(v)
        return None if names and all(n in options for n in names) else f"choose from {', '.join(options)}"
    return check


def positive_ints(allow_zero=False):
    def check(v):
        try:
            values = as_list(v, int)
        except ValueError:
            values = []
        ok = values and all(x >= 0 if allow_zero else x > 0 for x in values)
        return None if ok else "must be a comma list of positive integers"
    return check


def optional(check):
    """check, with the empty string allowed (the key is then unset)."""
    return lambda v: None if v in ("", None) else check(v)


def dataset_names(v):
    names = as_list(v)
    if names and all(n in BUILTIN_DATASETS or n.startswith(("csv:", "recbole:", "frame:")) for n in names):
        return None
    return f"choose from {', '.join(BUILTIN_DATASETS)}, csv:<dir>, recbole:<dir>/<name>"


def device_name(v):
    return None if re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) else "choose auto, cpu, cuda or cuda:N"


def grid_spec(v):
    try:
        parse_grid(v)
    except ConfigError as exc:
        return str(exc)
    return None


DEFAULT_GRID = "d_model=64,128;n_layers=1,2;dropout=0.2,0.5;attribute_mode=first,all"

CONFIG_TABLE = {
    # ---- stage --------------------------------------------------------------------------------------
    "stage": Key("all", "stage", names_in(*STAGE_NAMES, "all"),
                 "comma list of stages: " + ", ".join(STAGE_NAMES) + "; all = benchmark, ablation, grid, compression"),
    "preset": Key("default", "stage", None, "hyper-parameter preset merged over these defaults: default, paper, best, quick"),
    "quick": Key(False, "stage", None, "shorthand for --preset=quick: the whole pipeline on synthetic data in about a minute on a CPU"),
    "models": Key("HoloMamba,SASRec,GRU4Rec", "stage", names_in(*MODEL_NAMES), "models of the benchmark, compression and cold-start slices: " + ", ".join(MODEL_NAMES)),
    "seeds": Key("42", "stage", positive_ints(allow_zero=True), "comma list of random seeds; every (dataset, model) is trained once per seed"),
    "resume": Key(False, "stage", None, "reuse the checkpoint of a finished run with the same run hash instead of training it again"),
    "grid": Key(DEFAULT_GRID, "stage", grid_spec, "grid of the grid stage: key=v1,v2;key=v1,... over data, model and training keys"),
    "grid_max_trials": Key(0, "stage", at_least(0), "run at most this many grid trials (0 = all)"),
    "bundle_windows": Key("1,2,4,8", "stage", positive_ints(), "compression stage: temporal bundling windows k, untrained and trained"),
    "compression_len": Key(200, "stage", at_least(2), "compression stage: history length fed to the bundled model"),
    "efficiency_lengths": Key("50,200,512,1024,2048,4096,8192", "stage", positive_ints(), "efficiency stage: sequence lengths"),
    "memory_lens": Key("", "stage", optional(positive_ints()), "memory stage: the memory_len values compared, e.g. 200,500,1000 (empty: memory_len alone)"),
    "memory_full_window": Key(True, "stage", None, "memory stage: also train HoloMamba with one window over the max_len + memory_len items (false: their rows already in memory.csv are kept)"),
    "efficiency_batch": Key(64, "stage", above(0), "efficiency stage: training / inference batch size (the longest lengths get fewer: see efficiency_tokens)"),
    "efficiency_tokens": Key(131072, "stage", above(0), "efficiency stage: a length L runs a batch of min(efficiency_batch, efficiency_tokens // L), so batch x L stays constant at the longest lengths"),
    "efficiency_mixers": Key("mamba", "stage", names_in("mamba", "mamba2"), "efficiency stage: HoloMamba is also measured with each of these mixers that is not the config's own, side by side (rows named HoloMamba (Mamba-1) or HoloMamba (Mamba-2); the config's own mixer's rows are named HoloMamba)"),
    "efficiency_items": Key(3416, "stage", above(0), "efficiency stage: catalog size of the sequence-length rows (ML-1M's)"),
    "efficiency_catalogs": Key("10000,100000,1000000", "stage", positive_ints(), "efficiency stage: catalog sizes for full vs sampled softmax"),
    "efficiency_negatives": Key(256, "stage", above(0), "efficiency stage: negatives of the sampled-softmax catalog rows"),
    "checkpoint": Key("", "stage", None, "recommend stage: the checkpoint to recommend from (a .pt written by a run or by save())"),
    "user": Key("", "stage", None, "recommend stage: a known user's raw id: top-k after their whole history"),
    "history": Key("", "stage", None, "recommend stage: a new user's raw item ids, oldest first, comma-separated"),
    "users_file": Key("", "stage", None, "recommend stage: a CSV of users (column 'user', or the first column): top-k of each, written to results_dir/recommendations.csv"),
    "k": Key(10, "stage", above(0), "recommend stage: recommendations per user"),
    "efficiency_target_ndcg": Key(0.15, "stage", fraction(closed_low=False), "efficiency stage: time-to-quality threshold of validation NDCG@10 on ML-1M"),
    # ---- data ---------------------------------------------------------------------------------------
    "dataset": Key("ml-1m,amazon-beauty", "data", dataset_names, "comma list: ml-1m, amazon-beauty, synthetic, csv:<dir>, recbole:<dir>/<name>"),
    "min_user_count": Key(5, "data", at_least(0), "k-core: keep users with at least this many interactions (iterated with items)"),
    "min_item_count": Key(5, "data", at_least(0), "k-core: keep items with at least this many interactions"),
    "attribute_mode": Key("all", "data", one_of("first", "specific", "all", "modulo"), "first (the item's first attribute, as the paper) | specific (its rarest attribute) | all (every attribute) | modulo (paper's Beauty parity: item_id % 50)"),
    "max_attributes": Key(8, "data", above(0), "at most this many attributes per item in 'all' mode"),
    "columns": Key("", "data", None, "csv datasets: the user, item and (optional) timestamp column names, e.g. user_id,item_id,ts (empty: recognised by name)"),
    "attribute_max_share": Key(0.5, "data", fraction(closed_low=False, closed_high=True), "drop attribute tokens carried by more than this share of the items (they tell items apart no better than nothing)"),
    # ---- model --------------------------------------------------------------------------------------
    "max_len": Key(50, "model", at_least(2), "length of the input window (most recent items)"),
    "d_model": Key(64, "model", above(0), "embedding / hidden width"),
    "n_layers": Key(2, "model", above(0), "encoder layers (Mamba blocks, transformer blocks or GRU layers)"),
    "d_state": Key(16, "model", above(0), "Mamba state size N per channel"),
    "d_conv": Key(4, "model", above(0), "Mamba depthwise causal convolution width"),
    "expand": Key(2, "model", above(0), "Mamba inner width = expand * d_model"),
    "mixer": Key("mamba", "model", one_of("mamba", "mamba2"), "HoloMamba's sequence mixer: mamba (Mamba-1, selective scan, A and Δ per channel) | mamba2 (Mamba-2 / SSD: A and Δ per head of headdim channels, B and C shared; mamba-ssm's chunked Triton scan on CUDA)"),
    "headdim": Key(32, "model", above(0), "mixer=mamba2: channels per head (must divide expand * d_model)"),
    "ffn": Key(True, "model", None, "position-wise feed-forward sublayer after each Mamba block (as Mamba4Rec)"),
    "dropout": Key(0.2, "model", fraction(), "dropout on embeddings and sublayer outputs"),
    "n_heads": Key(1, "model", above(0), "SASRec attention heads"),
    "binding": Key("item", "model", one_of("item", "roles", "both"), "HoloMamba's item vector: item (e + α·e ⊛ mean attribute, the paper) | roles (e + Σ_f g_f·role_f ⊛ attribute_f, one role per attribute field) | both"),
    "frequency_mixing": Key(0, "model", at_least(0), "HoloMamba: popularity buckets (log2 of an item's training count, the last one open-ended), each with a learned weight on the item-specific part and one on the attribute part of the item vector, both starting at 1 (0 = off)"),
    "item_dropout": Key(0.0, "model", fraction(), "HoloMamba, training: drop the id part of an input item's vector with this probability, keeping its attributes"),
    "bundle_k": Key(1, "model", above(0), "temporal bundling window of HoloMamba in training and inference: k items -> 1 token (1 = off)"),
    "memory_slots": Key(0, "model", at_least(0), "HoloMamba long-term holographic associative memory: slots of width d_model (0 = off; 8 is typical)"),
    "memory_len": Key(0, "model", at_least(0), "items older than the max_len window that the memory folds in, in training and evaluation"),
    "memory_binding": Key("fft", "model", one_of("fft", "bipolar"), "memory keys: fft (circular convolution, unit-modulus keys) | bipolar (elementwise ±1 keys)"),
    "memory_writes": Key("older", "model", one_of("older", "all"), "what the memory holds: older (only the memory_len items before the encoder's window, which the window drops; slots decay on horizons spread from 4 items to memory_len) | all (every item, the window's too, every slot decaying by 0.95 at the start: the earlier design)"),
    "ramrec_slots": Key(32, "model", above(0), "RAMRec: episodic memory entries per user (past hidden states; lowest retention replaced)"),
    "ramrec_writes": Key(4, "model", above(0), "RAMRec: hidden states stored per user and training window (every max_len // writes)"),
    "ramrec_k_min": Key(2, "model", at_least(1), "RAMRec: entries retrieved for peaked similarities (zero entropy)"),
    "ramrec_k_max": Key(8, "model", at_least(1), "RAMRec: entries retrieved for flat similarities (maximal entropy)"),
    "ramrec_decay": Key(0.9, "model", fraction(closed_low=False, closed_high=True), "RAMRec: every retention score of a user's bank is multiplied by this at each write to it"),
    # ---- training -----------------------------------------------------------------------------------
    "epochs": Key(200, "training", above(0), "maximum training epochs (early stopping usually ends sooner)"),
    "batch_size": Key(128, "training", above(0), "training sequences per step"),
    "lr": Key(1e-3, "training", above(0), "AdamW learning rate"),
    "weight_decay": Key(0.0, "training", at_least(0), "AdamW weight decay"),
    "warmup_epochs": Key(0, "training", at_least(0), "linear learning-rate warm-up, in epochs"),
    "weight_average": Key(0.0, "training", at_least(0), "Polyak averaging: validation, model selection, the test and the checkpoint use an exponential moving average of the weights over about this many epochs (0 = off; the optimizer trains the raw weights)"),
    "grad_clip": Key(1.0, "training", at_least(0), "gradient-norm clipping (0 = off)"),
    "label_smoothing": Key(0.0, "training", fraction(), "label smoothing of the softmax cross-entropy"),
    "num_negatives": Key(0, "training", at_least(0), "0 = full softmax; n > 0 = sampled softmax with n popularity-sampled negatives and logQ correction"),
    "train_window": Key("last", "training", one_of("last", "random"), "training window per user and epoch: last (the most recent max_len items, standard) | random (a random crop of the history)"),
    "attribute_loss": Key(0.0, "training", at_least(0), "weight of next-attribute prediction: each state, unbound by each field's role, classifies the next item's attribute of that field"),
    "pretrain_epochs": Key(0, "training", at_least(0), "attribute pre-training: the first this many epochs train only the model's attribute objectives (attribute_loss, agreement_loss, masked_attribute_loss), without the next-item loss and without validation; then next-item training as usual (within epochs)"),
    "attribute_smoothing": Key(0.0, "training", fraction(), "HoloMamba: label smoothing toward the target's attribute neighbours: this share of the target's probability moves to the items that share its attributes (the items of each attribute equally, its attributes averaged); the shuffled control smooths toward its shuffled attributes, the item-only ablation ignores it"),
    "attribute_neighbours": Key(0, "training", at_least(0), "HoloMamba, attribute smoothing's neighbours: 0 = per attribute, the items that carry it (as in attribute_smoothing); K > 0 = the K items that share the most attribute tokens with the target (ties to the more popular), weighted by the tokens they share (computed once per model build, over all item pairs)"),
    "agreement_loss": Key(0.0, "training", at_least(0), "weight of item-attribute agreement: an item's vector, unbound by each field's role, classifies its own attribute of that field"),
    "cloze_loss": Key(0.0, "training", at_least(0), "weight of masked-item (Cloze) prediction, as in BERT4Rec: input items are masked with probability mask_prob, and the same two-sided context as masked_attribute_loss scores each masked item against every item (full softmax); reads no attributes, so Mamba-ItemOnly takes it too (0 = off)"),
    "masked_attribute_loss": Key(0.0, "training", at_least(0), "weight of masked-attribute prediction (S3Rec's MAP in holographic form): input items are masked with probability mask_prob, and each masked position's two-sided context (the causal encoder's state plus a backward encoder's), unbound by each field's role, classifies the masked item's attribute of that field"),
    "mask_prob": Key(0.2, "training", fraction(closed_low=False), "masked-attribute prediction: share of the input items masked"),
    "warm_start": Key("off", "training", one_of("off", "frozen", "all"), "memory extensions (RAMRec; HoloMamba with memory_slots): start from the trained base model of the same seed and config (SASRec; the window alone), trained first when missing, with its validation as epoch 0, so the selected weights validate at least as well as the base: off (train from scratch) | frozen (only the memory's parameters train) | all (everything trains)"),
    "memory_loss": Key(0.1, "training", at_least(0), "weight of the holographic memory's reconstruction loss (read back what was written)"),
    "amp": Key(True, "training", None, "bf16 autocast on CUDA (the CPU always trains in fp32)"),
    "patience": Key(10, "training", at_least(1), "evaluations without a better validation NDCG@10 before training stops"),
    "eval_every": Key(1, "training", above(0), "evaluate on validation every this many epochs"),
    "time_limit": Key(0.0, "training", at_least(0), "stop training a run after this many minutes (0 = no limit); the best weights so far are kept"),
    "stop_at_ndcg": Key(0.0, "training", fraction(closed_high=True), "stop training once validation NDCG@10 reaches this (0 = off)"),
    "exclude_seen": Key("auto", "training", one_of("auto", "true", "false"), "rank only items the user has not interacted with before the target (as the published baselines), in model selection, the test and recommendations; auto = true unless some user repeats an item in the data"),
    # ---- evaluation ---------------------------------------------------------------------------------
    "eval_batch_size": Key(1024, "evaluation", above(0), "users per evaluation batch"),
    "cold_user_fraction": Key(0.2, "evaluation", fraction(closed_low=False, closed_high=True), "cold-start slice: the users with the shortest training histories (this fraction)"),
    "cold_item_max_count": Key(10, "evaluation", at_least(0), "cold-item slice: test targets seen at most this many times in training"),
    "long_history": Key(200, "evaluation", at_least(0), "memory stage: the long-history slice holds users with more training items than this"),
    # ---- system -------------------------------------------------------------------------------------
    "device": Key("auto", "system", device_name, "auto | cpu | cuda | cuda:N"),
    "scan_backend": Key("auto", "system", one_of("auto", "cuda", "parallel", "reference"), "auto (cuda when mamba-ssm imports on a GPU, else parallel there; reference on the CPU) | cuda (mamba-ssm kernel) | parallel (PyTorch log-depth scan) | reference (loop over time); chosen once per model and device"),
    "ssd_chunk": Key(64, "system", above(0), "mixer=mamba2 on CUDA: the chunked scan's chunk length in steps"),
    "ce_chunk": Key(65536, "system", at_least(0), "full softmax over a catalog larger than this many items, where neither fused kernel is taken (ce_kernel=torch, or no Triton): the cross-entropy in chunks of this many items, recomputed in the backward, never holding the batch x length x catalog logits (0 = never)"),
    "ce_kernel": Key("auto", "system", one_of("auto", "triton", "cce", "torch"), "full-softmax cross-entropy: auto (on a CUDA GPU of compute capability 8.0 on, under bf16 autocast, the script's own fused log-sum-exp kernels, FusedLogSumExp, through Triton, which comes with PyTorch's CUDA builds; else cut-cross-entropy's fused kernel when the package imports, the chunked loss over catalogs above ce_chunk, F.cross_entropy) | triton (FusedLogSumExp: the logits never reach GPU memory) | cce (cut-cross-entropy's kernel at every catalog size) | torch (F.cross_entropy, chunked over catalogs above ce_chunk)"),
    "cuda_graphs": Key(True, "system", None, "capture the training step as a CUDA graph on CUDA (full softmax, no DDP / warm-up)"),
    "jobs": Key(1, "system", above(0), "benchmark, ablation and grid stages: train up to this many runs at once, each in its own worker process (they share one GPU, or take the visible GPUs in turn); 1 = one after another in this process"),
    "compile": Key(False, "system", None, "torch.compile the training forward (fused element-wise kernels; on CUDA still captured as a CUDA graph) and the streaming step (on CUDA captured in GraphedStream's graph)"),
    "data_dir": Key(os.environ.get("HOLOMAMBA_DATA_DIR", "data"), "system", None, "dataset folder (env HOLOMAMBA_DATA_DIR sets the default)"),
    "cache_dir": Key(os.environ.get("HOLOMAMBA_CACHE_DIR", "data/cache"), "system", None, "prepared datasets, keyed by the source files' checksums and the data keys, so a file is parsed once ('' = off; env HOLOMAMBA_CACHE_DIR sets the default)"),
    "download": Key(True, "system", None, "download missing official files into data_dir (needs internet)"),
    # ---- output -------------------------------------------------------------------------------------
    "results_dir": Key("results/{dataset}/{preset}", "output", None, "CSV / JSON / Markdown outputs and one JSON record per run (runs/); {dataset} and {preset} name the run's folder, so a run never writes over another's (the paper's results are in results/paper)"),
    "figures_dir": Key("{results_dir}/figures", "output", None, "PNG figures, drawn from this run's result files"),
    "checkpoint_dir": Key("checkpoints/{dataset}/{preset}", "output", None, "best weights of each run, with their config, raw ids and data fingerprint"),
    "grid_csv": Key("{results_dir}/grid_search_results.csv", "output", None, "grid-search log: one row per finished trial, appended as it finishes (the paper's: ./grid_search_results.csv)"),
    "paper_dir": Key("paper", "output", None, "paper stage: LaTeX tables (tables/*.tex, tables/numbers.tex) and figures (figures/*.pdf, *.png) drawn from results_dir and grid_csv only, for paper/main.tex"),
}
GLOBAL_CONFIG = {name: key.default for name, key in CONFIG_TABLE.items()}

# Checks that involve two keys: (key named in the error, predicate over the config, what is wrong).
CROSS_CHECKS = [
    ("n_heads", lambda c: c["d_model"] % c["n_heads"] == 0, "must divide d_model"),
    ("headdim", lambda c: c["mixer"] != "mamba2" or c["expand"] * c["d_model"] % c["headdim"] == 0,
     "must divide expand * d_model"),
    ("memory_slots", lambda c: not (c["memory_slots"] and c["bundle_k"] > 1), "cannot be combined with bundle_k > 1"),
    ("memory_len", lambda c: not c["memory_slots"] or c["memory_writes"] == "all" or c["memory_len"] > 0,
     "must be > 0 with --memory_slots and --memory_writes=older (the memory holds the items before the window)"),
    ("attribute_loss", lambda c: c["binding"] != "item" or not c["attribute_loss"], "needs --binding=roles or both"),
    ("agreement_loss", lambda c: c["binding"] != "item" or not c["agreement_loss"], "needs --binding=roles or both"),
    ("masked_attribute_loss", lambda c: c["binding"] != "item" or not c["masked_attribute_loss"],
     "needs --binding=roles or both"),
    ("frequency_mixing", lambda c: c["binding"] != "item" or not c["frequency_mixing"], "needs --binding=roles or both"),
    ("cloze_loss", lambda c: not c["cloze_loss"] or (c["memory_slots"] == 0 and c["bundle_k"] == 1),
     "cannot be combined with memory_slots or bundle_k > 1"),
    ("pretrain_epochs", lambda c: not c["pretrain_epochs"] or c["attribute_loss"] or c["agreement_loss"]
     or c["masked_attribute_loss"], "needs --attribute_loss, --agreement_loss or --masked_attribute_loss (the "
     "objectives it trains)"),
    ("pretrain_epochs", lambda c: c["pretrain_epochs"] < c["epochs"], "must be below epochs"),
    ("attribute_smoothing", lambda c: c["label_smoothing"] + c["attribute_smoothing"] < 1,
     "label_smoothing + attribute_smoothing must stay below 1 (the target keeps the rest)"),
    ("ramrec_k_max", lambda c: c["ramrec_k_max"] >= c["ramrec_k_min"], "must be >= ramrec_k_min"),
    ("ramrec_slots", lambda c: c["ramrec_slots"] >= c["ramrec_k_max"], "must be >= ramrec_k_max"),
    ("ramrec_writes", lambda c: c["ramrec_writes"] <= c["ramrec_slots"], "must be in [1, ramrec_slots]"),
    ("jobs", lambda c: c["jobs"] == 1 or int(os.environ.get("WORLD_SIZE", "1")) <= 1,
     "must be 1 under torchrun (its processes already share the runs)"),
]

# Presets are merged over GLOBAL_CONFIG; a key named after a dataset holds that dataset's own values.
# Precedence: defaults < preset < preset[dataset] < --config file < command line (or API keywords).
PRESETS = {
    "default": {
        "ml-1m": {"max_len": 200},
        "amazon-beauty": {"max_len": 50, "dropout": 0.5},
    },
    # The paper's protocol: 10 epochs, L=50, d=96, N=16, batch 64, lr 1e-3, 3 layers (ML-1M) / 2 (Beauty).
    "paper": {
        "epochs": 10, "max_len": 50, "d_model": 96, "d_state": 16, "batch_size": 64, "lr": 1e-3,
        "attribute_mode": "first", "ffn": False, "dropout": 0.1, "patience": 10, "exclude_seen": False,
        "ml-1m": {"n_layers": 3},
        "amazon-beauty": {"n_layers": 2, "attribute_mode": "modulo"},
    },
    # Chosen on validation NDCG@10 (seed 42) in grid_search_results.csv and the sweeps in README; test never consulted.
    "best": {
        "epochs": 200, "patience": 10,
        "ml-1m": {"max_len": 200, "train_window": "random", "batch_size": 256, "lr": 2e-3},
        "amazon-beauty": {"max_len": 50, "dropout": 0.5, "label_smoothing": 0.1, "attribute_mode": "all",
                          "binding": "roles", "attribute_loss": 0.5, "attribute_smoothing": 0.1},
    },
    "quick": {
        "dataset": "synthetic", "models": "HoloMamba,SASRec,GRU4Rec", "max_len": 20, "d_model": 32,
        "n_layers": 1, "epochs": 6, "batch_size": 64, "lr": 3e-3, "patience": 3, "dropout": 0.1,
        "grid_max_trials": 2,
        "compression_len": 32, "bundle_windows": "1,2,4", "efficiency_lengths": "32,128", "efficiency_batch": 16,
        "efficiency_catalogs": "1000,10000",
    },
}


def coerce(key, value):
    """value (a command-line string, a JSON value or a Python value) as the type of key's default."""
    if key not in GLOBAL_CONFIG:
        raise ConfigError(f"unknown config key '{key}' (python HoloMambaRec.py --help lists the keys)")
    default = GLOBAL_CONFIG[key]
    kind = type(default)
    try:
        if kind is str and isinstance(value, bool):  # a switch that also has 'auto': true / false
            return str(value).lower()
        if isinstance(value, str) and kind is not str:
            if kind is bool:
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                return value.lower() in ("1", "true", "yes")
            return kind(value)
        if kind is bool and isinstance(value, bool):
            return value
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is str and isinstance(value, str):
            return value
    except ValueError:
        pass
    raise ConfigError(f"--{key}={value}: expected {kind.__name__}")


def validate_config(cfg):
    """Raise ConfigError naming the first key whose value is out of range (every key, then the cross checks)."""
    unknown = sorted(set(cfg) - set(CONFIG_TABLE))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}' (python HoloMambaRec.py --help lists the keys)")
    for name, key in CONFIG_TABLE.items():
        value = cfg[name]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name}={value}: must be a finite number")
        problem = key.check(value) if key.check else None
        if problem:
            raise ConfigError(f"--{name}={value}: {problem}")
    for name, ok, problem in CROSS_CHECKS:
        if not ok(cfg):
            raise ConfigError(f"--{name}={cfg[name]}: {problem}")


class Config(Mapping):
    """A resolved, validated configuration: read-only. A variant is made with replace(), which validates it
    again, so no stage can build a config that skips the checks."""

    def __init__(self, values):
        values = {k: coerce(k, v) for k, v in values.items()}
        missing = sorted(set(CONFIG_TABLE) - set(values))
        if missing:
            raise ConfigError(f"config lacks the key '{missing[0]}'")
        validate_config(values)
        self._values = values

    def __getitem__(self, key):
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self):
        return len(self._values)

    def __repr__(self):
        return f"Config({self._values!r})"

    def replace(self, **changes):
        return Config({**self._values, **changes})

    def of_role(self, *roles):
        return {k: v for k, v in self._values.items() if CONFIG_TABLE[k].role in roles}


SWITCH = {"true": True, "false": False}  # exclude_seen's explicit values; 'auto' is resolved for the data


HASHED_WHEN_SET = ("pretrain_epochs", "attribute_smoothing", "frequency_mixing", "warm_start", "masked_attribute_loss",
                   "mask_prob", "mixer", "headdim", "cloze_loss", "weight_average", "attribute_neighbours")


def run_hash(cfg):
    """Short hash of the keys that change a trained model: the data, model and training roles. Outputs, stages,
    seeds, presets and where it runs are not part of it (the seed is part of a run's identity separately).
    exclude_seen is hashed as the boolean it was before 'auto' existed, so a run keeps its hash; a run resolves
    'auto' for its data before it is hashed (RunStore.run). Keys added later (HASHED_WHEN_SET) count only when
    set away from their default, so the runs made before them keep their hashes; memory_writes counts only for a
    memory that holds the older items alone (memory_writes=all is the design the earlier memory runs had)."""
    values = Config(cfg).of_role(*HASHED_ROLES)
    values["exclude_seen"] = SWITCH.get(values["exclude_seen"], values["exclude_seen"])
    for key in HASHED_WHEN_SET:
        if values[key] == GLOBAL_CONFIG[key]:
            del values[key]
    if not values["memory_slots"] or values["memory_writes"] == "all":  # the memories made before the key hash as then
        del values["memory_writes"]
    blob = json.dumps(sorted(values.items()))
    return hashlib.sha1(blob.encode()).hexdigest()[:8]


def resolve_config(overrides=None, dataset=None):
    """defaults < preset < preset[dataset] < overrides, as one validated Config. With `dataset`, the config of
    that one dataset (its preset entry merged, cfg['dataset'] set to it)."""
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(GLOBAL_CONFIG))
    if unknown:
        raise ConfigError(f"unknown config key '{unknown[0]}' (python HoloMambaRec.py --help lists the keys)")
    if overrides.get("quick") and "preset" not in overrides:
        overrides["preset"] = "quick"
    preset_name = overrides.get("preset", GLOBAL_CONFIG["preset"])
    if preset_name not in PRESETS:
        raise ConfigError(f"--preset={preset_name}: unknown preset (choose from {', '.join(PRESETS)})")
    preset = PRESETS[preset_name]
    values = dict(GLOBAL_CONFIG)
    values.update({k: v for k, v in preset.items() if not isinstance(v, dict)})
    if dataset is not None:
        values.update(preset.get(dataset, {}))
    values.update(overrides)
    values.update(output_paths(values))  # named for the invocation's datasets, the same in every dataset's config
    if dataset is not None:
        values["dataset"] = dataset
    return Config(values)


def output_paths(values):
    """The output keys with {dataset} (the invocation's datasets, e.g. ml-1m+amazon-beauty, csv-mydata), {preset}
    and {results_dir} filled in."""
    label = "+".join(dataset_label(d) for d in as_list(values["dataset"])) or "none"
    fill = {"dataset": label, "preset": values["preset"]}
    out = {k: str(values[k]).replace("{dataset}", fill["dataset"]).replace("{preset}", fill["preset"])
           for k in ("results_dir", "checkpoint_dir")}
    out.update({k: str(values[k]).replace("{dataset}", fill["dataset"]).replace("{preset}", fill["preset"])
                .replace("{results_dir}", out["results_dir"]) for k in ("figures_dir", "grid_csv")})
    return out


def dataset_label(name):
    """A folder-safe name of a dataset: ml-1m, csv-mydata (for csv:path/to/mydata), recbole-toy."""
    kind, sep, rest = name.partition(":")
    label = f"{kind}-{Path(rest).stem or Path(rest).name}" if sep else name
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", label)


def config(dataset=None, **overrides):
    """Public: a validated Config from keyword overrides, e.g. config("ml-1m", preset="best", d_model=128).
    With one dataset, that dataset's preset entry is merged too."""
    if dataset is not None and len(as_list(dataset)) > 1:
        return resolve_config(dict(overrides, dataset=dataset))
    return resolve_config(overrides, dataset)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so main() can turn every problem into one line and exit 2."""

    class Exit(Exception):
        def __init__(self, status):
            self.status = status

    def error(self, message):
        raise ConfigError(message.replace("argument ", "", 1))

    def exit(self, status=0, message=None):
        if message:
            print(message, file=sys.stderr, end="")
        raise self.Exit(status)


class KeyValueHelp(argparse.HelpFormatter):
    """--key=default in the left column, so the help reads like the config table."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=120)

    def _format_action_invocation(self, action):
        if action.option_strings and action.nargs != 0:
            return f"{action.option_strings[0]}={action.metavar}"
        return super()._format_action_invocation(action)


def argument_parser():
    """The command line, built from CONFIG_TABLE: one group per role, one option per key (every option takes
    --key=value; a boolean key alone means true). Values stay strings here and are typed by coerce()."""
    parser = ArgumentParser(prog="python HoloMambaRec.py", formatter_class=KeyValueHelp, allow_abbrev=False,
                            usage="%(prog)s [--quick] [--config=FILE.json] [--key=value ...]",
                            description="Metadata-aware sequential recommendation: holographic binding + Mamba. "
                                        "Every key below is also a key of GLOBAL_CONFIG.")
    parser.add_argument("--version", action="version", version=f"HoloMambaRec {__version__}")
    parser.add_argument("--config", metavar="FILE.json", default=argparse.SUPPRESS,
                        help="read keys from a JSON object (keys as in GLOBAL_CONFIG); the command line wins")
    for role, meaning in ROLES.items():
        group = parser.add_argument_group(f"{role} keys", meaning)
        for name, key in CONFIG_TABLE.items():
            if key.role != role:
                continue
            shown = str(key.default).lower() if isinstance(key.default, bool) else (str(key.default) or '""')
            switch = isinstance(key.default, bool) or (isinstance(key.default, str) and key.check is not None
                                                       and key.check("true") is None)  # exclude_seen: auto/true/false
            flag = {"nargs": "?", "const": "true"} if switch else {}
            group.add_argument(f"--{name}", dest=name, metavar=shown, default=argparse.SUPPRESS,
                               help=key.meaning.replace("%", "%%"), **flag)
    return parser


def parse_cli(argv):
    """--key=value arguments (and --config=FILE.json) -> dict of typed overrides; the command line wins over
    the file. '-' and '_' are the same in key names."""
    argv = [re.sub(r"^--([\w-]+)", lambda m: "--" + m.group(1).replace("-", "_"), a) for a in argv]
    known, rest = argument_parser().parse_known_args(argv)
    if rest:
        arg = rest[0]
        if arg.startswith("--"):
            raise ConfigError(f"unknown config key '{arg[2:].partition('=')[0]}' (python HoloMambaRec.py --help lists the keys)")
        raise ConfigError(f"unexpected argument '{arg}': use --key=value")
    given = vars(known)
    overrides = read_config_file(given.pop("config")) if "config" in given else {}
    overrides.update({key: coerce(key, text) for key, text in given.items()})
    return overrides


def read_config_file(path):
    """Keys of a JSON object file, typed like GLOBAL_CONFIG."""
    try:
        values = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"--config={path}: cannot read it ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise ConfigError(f"--config={path}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config={path}: expected a JSON object of config keys")
    return {key: coerce(key, value) for key, value in values.items()}


# =====================================================================================================
# §2 Data: download, parse, filter, split, batches
# =====================================================================================================
# Every loader returns the same normalised pair: a DataFrame (user, item, time) in file order, and a dict
# raw item id -> list of attribute tokens. prepare_dataset turns it into a SequenceData, and everything
# after that is dataset-blind.
DOWNLOADS = {
    "ml-1m": [("ml-1m.zip", "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
               "c4d9eecfca2ab87c1945afe126590906")],
    "amazon-beauty": [
        ("reviews_Beauty_5.json.gz",
         "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/reviews_Beauty_5.json.gz", None),
        ("meta_Beauty.json.gz",
         "https://snap.stanford.edu/data/amazon/productGraph/categoryFiles/meta_Beauty.json.gz", None),
    ],
}
DATA_FORMAT = 1  # bump when the preparation of a dataset changes: cached datasets of another format are not read
SYNTHETIC = {"n_users": 600, "n_items": 300, "n_attributes": 15, "min_len": 12, "max_len": 40, "seed": 0}


def download_file(url, dest, md5=None):
    """Stream `url` to a temporary file beside `dest`, check its MD5 (where known) and that it is the archive its
    name says (a server error page saved as .gz is refused), then rename it into place. On any failure the
    temporary file, and the folders this call created, are removed."""
    import requests

    created = [p for p in [dest.parent, *dest.parent.parents] if not p.exists()]
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    digest = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, requests.get(url, stream=True, timeout=60) as resp:
            resp.raise_for_status()
            total = int(resp.headers.get("content-length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                for chunk in resp.iter_content(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if md5 and digest.hexdigest() != md5:
            raise DataError(f"{url}: checksum {digest.hexdigest()} != expected {md5}; try again later")
        check_archive(Path(tmp), dest.name, url)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        for folder in created:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def check_archive(path, name, url):
    """A downloaded .gz must be gzip and a .zip a zip archive: servers answer errors with HTML pages."""
    head = path.read_bytes()[:4] if path.stat().st_size else b""
    if (name.endswith(".gz") and head[:2] != b"\x1f\x8b") or (name.endswith(".zip") and head[:2] != b"PK"):
        raise DataError(f"{url} did not send a {name.rsplit('.', 1)[-1]} archive (it starts with {head!r}, e.g. an "
                        "error page); try again later, or fetch the file by hand into --data_dir")


def find_dataset_files(name, cfg):
    """Paths of the official files of `name`, looked up in data_dir and data_dir/name; downloaded if allowed."""
    data_dir = Path(cfg["data_dir"]).expanduser()
    found = []
    for filename, url, md5 in DOWNLOADS[name]:
        candidates = [data_dir / filename, data_dir / name / filename]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None and cfg["download"]:
            path = data_dir / name / filename
            try:
                download_file(url, path, md5)
            except DataError:
                raise
            except Exception as exc:  # no network, HTTP error, ...
                path = None
                reason = f"download failed ({type(exc).__name__}: {exc})"
        else:
            reason = "download is off (--download=false)"
        if path is None:
            raise DataError(f"{name}: {filename} not found in {data_dir} or {data_dir / name}; {reason}. "
                            f"Fetch {url} and put it there, or point --data_dir (or HOLOMAMBA_DATA_DIR) at its folder.")
        found.append(path)
    return found


def csv_files(spec):
    """(interactions file, attribute file or None) of a csv:<dir or file> dataset; .tsv files work alike."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        path = next((folder / f"interactions.{x}" for x in ("csv", "tsv") if (folder / f"interactions.{x}").is_file()),
                    folder / "interactions.csv")
    else:
        path = folder
    if not path.is_file():
        raise DataError(f"{path} not found: a csv dataset is a folder with interactions.csv (or .tsv), or the file "
                        "itself, with a user, an item and optionally a timestamp column")
    attributes = [path.parent / f"item_attributes.{x}" for x in ("csv", "tsv")]
    return path, next((a for a in attributes if a.is_file()), None)


def recbole_files(spec):
    """(.inter file, .item file or None) of a recbole:<dir>/<name> dataset."""
    base = Path(spec).expanduser()
    inter = base.with_suffix(".inter") if base.suffix != ".inter" else base
    if not inter.is_file():
        raise DataError(f"{inter} not found: a recbole dataset is recbole:<dir>/<name> with <name>.inter there")
    items = inter.with_suffix(".item")
    return inter, items if items.is_file() else None


def dataset_files(cfg):
    """The source files of cfg['dataset'] (downloaded when missing and allowed); the synthetic set has none."""
    name = cfg["dataset"]
    if name in DOWNLOADS:
        return find_dataset_files(name, cfg)
    if name.startswith("csv:"):
        return list(csv_files(name[len("csv:"):]))
    if name.startswith("recbole:"):
        return list(recbole_files(name[len("recbole:"):]))
    if name.startswith("frame:"):
        raise DataError(f"{name} is an in-memory DataFrame: pass the DataFrame itself to load_dataset")
    return []


@contextlib.contextmanager
def reading(path, official=False):
    """Turn low-level decoding errors of a file into one DataError that names the file and what to do: an
    official download can be fetched again, a user's own file must be fixed."""
    try:
        yield
    except DataError:
        raise
    except (EOFError, OSError, zlib.error, zipfile.BadZipFile, UnicodeDecodeError, ValueError, KeyError, SyntaxError,
            pd.errors.ParserError) as exc:
        fix = "delete it and download it again" if official else "fix the file (or point the dataset at another)"
        raise DataError(f"{path} is unreadable or corrupt ({type(exc).__name__}: {exc}); {fix}") from None


def load_ml1m(path):
    """MovieLens-1M from GroupLens ml-1m.zip: ratings.dat and movies.dat (latin-1, genres 'A|B|C')."""
    with reading(path, official=True), zipfile.ZipFile(path) as zf:
        ratings = zf.read("ml-1m/ratings.dat").decode("latin-1")
        movies = zf.read("ml-1m/movies.dat").decode("latin-1")
    with reading(path, official=True):
        df = pd.read_csv(io.StringIO(ratings.replace("::", "\t")), sep="\t", header=None,
                         names=["user", "item", "rating", "time"], dtype=np.int64)
        genres = pd.read_csv(io.StringIO(movies.replace("::", "\t")), sep="\t", header=None,
                             names=["item", "title", "genres"], dtype={"item": np.int64, "genres": str},
                             quoting=csv.QUOTE_NONE)
    attributes = {i: [f"genre:{x}" for x in g.split("|") if x] for i, g in zip(genres["item"], genres["genres"].fillna(""))}
    return df[["user", "item", "time"]], attributes


_ASIN = re.compile(r"""['"]asin['"]\s*:\s*['"]([^'"]+)['"]""")


def load_amazon_beauty(reviews_path, meta_path):
    """Amazon 2014 Beauty 5-core reviews + metadata categories (meta lines are Python dict literals)."""
    with reading(reviews_path, official=True), gzip.open(reviews_path, "rt", encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    df = pd.DataFrame(rows)
    missing = {"reviewerID", "asin", "unixReviewTime"} - set(df.columns)
    if missing:
        raise DataError(f"{reviews_path} lacks the column(s) {sorted(missing)}; is it the Amazon 2014 reviews file?")
    df = df.rename(columns={"reviewerID": "user", "asin": "item", "unixReviewTime": "time"})[["user", "item", "time"]]
    wanted = set(df["item"])
    attributes = {}
    with reading(meta_path, official=True), gzip.open(meta_path, "rt", encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            m = _ASIN.search(line)
            if not m or m.group(1) not in wanted:
                continue  # parse only the items that were reviewed: the full meta file is large
            meta = ast.literal_eval(line)
            if not isinstance(meta, dict) or not isinstance(meta.get("categories", []), list):
                raise DataError(f"{meta_path}, line {number}: not an item's metadata (a dict with 'asin' and "
                                "'categories'); is it the Amazon 2014 metadata file?")
            tokens = [str(t) for path in meta.get("categories", []) for t in (path if isinstance(path, list) else [path])]
            if meta.get("brand"):
                tokens.append("brand:" + str(meta["brand"]))
            attributes[meta["asin"]] = list(dict.fromkeys(tokens))
    if not attributes:
        raise DataError(f"{meta_path} holds no metadata for any reviewed item (0 of {len(wanted)} asins): is it the "
                        "metadata of the same category? HoloMamba would otherwise train without attributes")
    return df, attributes


COLUMN_NAMES = {  # names recognised for each column of a csv dataset, compared in lower case
    "user": ("user", "user_id", "userid", "uid", "customer_id", "visitor_id", "reviewer_id", "reviewerid"),
    "item": ("item", "item_id", "itemid", "iid", "product_id", "movie_id", "asin", "track_id"),
    "time": ("timestamp", "time", "ts", "datetime", "date", "unix_time", "event_time", "unixreviewtime"),
}


def read_table(path):
    """A CSV or, by extension (.tsv, .tab), tab-separated file, every cell as text."""
    with reading(path):
        return pd.read_csv(path, sep="\t" if Path(path).suffix in (".tsv", ".tab") else ",", dtype=str,
                           keep_default_na=False)


def pick_columns(df, path, columns):
    """{'user': name, 'item': name, 'time': name or None}: from `columns` (user,item[,time]) or by name."""
    if columns:
        names = as_list(columns)
        if len(names) not in (2, 3):
            raise DataError(f"--columns={columns}: give user,item or user,item,timestamp column names")
        missing = [n for n in names if n not in df.columns]
        if missing:
            raise DataError(f"{path} has no column {missing[0]!r} (--columns={columns}); its columns: {list(df.columns)}")
        return dict(zip(("user", "item", "time"), names + [None] * (3 - len(names))))
    lower = {c.lower(): c for c in df.columns}
    found = {role: next((lower[n] for n in names if n in lower), None) for role, names in COLUMN_NAMES.items()}
    for role in ("user", "item"):
        if found[role] is None:
            raise DataError(f"{path}: no {role} column among {list(df.columns)}; name it {role}, or map the columns "
                            "with --columns=USER,ITEM[,TIMESTAMP]")
    return found


def parse_times(values, path, first_line=2):
    """Timestamps as numbers (epoch or any number) or date strings, as int64. A value that is neither, or blank,
    is an error naming the file and its line: never a silent sort of text."""
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.notna().all():
        return numbers.to_numpy()
    dates = pd.to_datetime(values, errors="coerce", format="mixed")
    if dates.notna().all():
        return dates.astype("int64").to_numpy()
    parsed = dates if dates.notna().sum() > numbers.notna().sum() else numbers
    bad = int(np.flatnonzero(parsed.isna().to_numpy())[0])
    raise DataError(f"{path}, line {bad + first_line}: timestamp {values.iloc[bad]!r} is neither a number nor a date; "
                    "fix or remove that row")


def load_csv_dataset(path, attr_path=None, columns=""):
    """Your own data: interactions with a user, an item and optionally a timestamp column (named as in
    COLUMN_NAMES, or mapped with --columns), CSV or TSV by extension; optional item_attributes with item and
    attributes columns ('|'-separated). Without a timestamp the file order is the time order. Exact duplicate
    rows are dropped and counted."""
    df = read_table(path)
    chosen = pick_columns(df, path, columns)
    if chosen["time"] is None:
        print(f"{path}: no timestamp column, so each user's events are taken in file order", file=sys.stderr)
        time = np.arange(len(df))
    else:
        time = parse_times(df[chosen["time"]], path)
    df = pd.DataFrame({"user": df[chosen["user"]].to_numpy(), "item": df[chosen["item"]].to_numpy(), "time": time})
    duplicates = int(df.duplicated().sum())
    if duplicates:
        print(f"{path}: dropped {duplicates} duplicate row(s) (same user, item and time)", file=sys.stderr)
        df = df.drop_duplicates(ignore_index=True)
    attributes = {}
    if attr_path is not None:
        meta = read_table(attr_path)
        item_column = next((c for c in meta.columns if c.lower() in COLUMN_NAMES["item"]), None)
        if item_column is None or "attributes" not in meta.columns:
            raise DataError(f"{attr_path} needs the columns item,attributes ('|'-separated attributes)")
        attributes = {i: [a for a in s.split("|") if a] for i, s in zip(meta[item_column], meta["attributes"])}
        if len(df) and not set(attributes) & set(df["item"]):
            raise DataError(f"{attr_path} names none of the items of {path}: check its item column")
    return df, attributes


def read_atomic(path):
    """A RecBole atomic file: tab-separated, header 'name:type' fields. Returns a DataFrame keyed by name."""
    with reading(path):
        df = pd.read_csv(path, sep="\t", dtype=str, quoting=csv.QUOTE_NONE)
    df.columns = [c.split(":")[0] for c in df.columns]
    return df


def load_recbole_dataset(inter, item_file=None):
    """RecBole atomic files <name>.inter (user_id, item_id, timestamp) and optional <name>.item."""
    df = read_atomic(inter)
    missing = {"user_id", "item_id", "timestamp"} - set(df.columns)
    if missing:
        raise DataError(f"{inter} lacks the field(s) {sorted(missing)}")
    df = df.rename(columns={"user_id": "user", "item_id": "item", "timestamp": "time"})[["user", "item", "time"]]
    df["time"] = parse_times(df["time"], inter)
    attributes = {}
    if item_file is not None:
        meta = read_atomic(item_file).fillna("")
        if "item_id" not in meta.columns:
            raise DataError(f"{item_file} lacks the field item_id (its fields: {list(meta.columns)})")
        fields = [c for c in meta.columns if c != "item_id"]
        for item, *values in zip(meta["item_id"], *(meta[f] for f in fields)):
            attributes[item] = [f"{f}:{t}" for f, v in zip(fields, values) for t in str(v).split() if t]
    return df, attributes


def synthetic_interactions(n_users=600, n_items=300, n_attributes=15, min_len=12, max_len=40, seed=0):
    """A deterministic dataset whose next item depends on attribute-level patterns: each item has one
    attribute; users walk a hidden attribute chain (attribute a -> successor[a] with prob. 0.8) and pick
    a popularity-weighted item of the current attribute, so knowing an item's attribute helps."""
    rng = np.random.default_rng(seed)
    item_attr = np.arange(n_items) % n_attributes
    rng.shuffle(item_attr)
    successor = rng.permutation(n_attributes)
    members = [np.flatnonzero(item_attr == a) for a in range(n_attributes)]
    weights = [1.0 / np.arange(1, len(m) + 1) for m in members]
    weights = [w / w.sum() for w in weights]
    rows = []
    for user in range(n_users):
        attr = rng.integers(n_attributes)
        for t in range(rng.integers(min_len, max_len + 1)):
            rows.append((user, int(rng.choice(members[attr], p=weights[attr])), t))
            attr = successor[attr] if rng.random() < 0.8 else rng.integers(n_attributes)
    df = pd.DataFrame(rows, columns=["user", "item", "time"])
    return df, {i: [f"attr{item_attr[i]}"] for i in range(n_items)}


def load_raw(name, files, columns=""):
    """(interactions, attributes) of dataset `name` from its source files (see dataset_files)."""
    if name == "ml-1m":
        return load_ml1m(*files)
    if name == "amazon-beauty":
        return load_amazon_beauty(*files)
    if name == "synthetic":
        return synthetic_interactions(**SYNTHETIC)
    if name.startswith("csv:"):
        return load_csv_dataset(*files, columns=columns)
    return load_recbole_dataset(*files)


def k_core_filter(df, min_user, min_item):
    """Drop users/items below their minimum count, repeatedly, until both conditions hold."""
    while True:
        item_ok = df.groupby("item")["user"].transform("size") >= min_item
        df = df[item_ok]
        user_ok = df.groupby("user")["item"].transform("size") >= min_user
        df = df[user_ok]
        if item_ok.all() and user_ok.all():
            return df


class Catalog(NamedTuple):
    """What a model needs to know about the data: catalog and user counts and the attribute table."""
    n_items: int
    n_users: int
    n_attributes: int
    item_attributes: torch.Tensor  # (n_items + 1, A) attribute ids, 0 = none; row 0 is padding
    attribute_fields: torch.Tensor | None = None  # (n_items + 1, A) field of each attribute (1..n_fields), 0 = none
    n_fields: int = 1
    item_counts: torch.Tensor | None = None  # (n_items + 1,) training-split counts (popularity); None: unknown


class EvalSplit(NamedTuple):
    """The valid or test split of every user, for ranking: inputs (U, L) left-padded, targets (U,), user rows
    (U,), ends (U,) where the inputs end in each history (exclusive), and the items to exclude from each
    user's ranking as (flat ids, CSR offsets (U + 1,)), or None."""
    inputs: torch.Tensor
    targets: torch.Tensor
    users: torch.Tensor
    ends: torch.Tensor
    seen: tuple | None

    def to(self, device):
        seen = None if self.seen is None else (self.seen[0].to(device), self.seen[1])
        return EvalSplit(self.inputs.to(device), self.targets.to(device), self.users.to(device),
                         self.ends.to(device), seen)


class IdIndex:
    """What a trained model needs to take and give raw ids: the raw id of every item (item i at i - 1) and user,
    every user's history (internal item ids, oldest first), whether some user repeats an item, and a fingerprint
    of the data. Raw ids are matched as text, so 1193 and "1193" name the same movie."""

    def __init__(self, items, users, histories, fingerprint, has_repeats):
        self.items, self.users = list(items), list(users)
        self.histories = [np.asarray(h, dtype=np.int64) for h in histories]
        self.fingerprint, self.has_repeats = fingerprint, bool(has_repeats)
        self.item_of = {str(raw): i + 1 for i, raw in enumerate(self.items)}
        self.user_of = {str(raw): row for row, raw in enumerate(self.users)}

    def item_ids(self, raw_items, skip_unknown=False):
        """Internal ids of raw item ids; an unknown id is an error naming it, or skipped with skip_unknown."""
        ids = [self.item_of.get(str(raw)) for raw in raw_items]
        unknown = [raw for raw, i in zip(raw_items, ids) if i is None]
        if unknown and not skip_unknown:
            raise DataError(f"unknown item id(s) {unknown[:5]}: not in the catalog the model was trained on "
                            f"({len(self.items)} items); skip them with skip_unknown=True")
        return np.array([i for i in ids if i is not None], dtype=np.int64)

    def row(self, user, add=False):
        """The row of a raw user id; with add, a new user gets a new, empty row; otherwise unknown is an error."""
        row = self.user_of.get(str(user))
        if row is None and add:
            row = self.user_of[str(user)] = len(self.users)
            self.users.append(user)
            self.histories.append(np.zeros(0, dtype=np.int64))
        if row is None:
            raise DataError(f"unknown user '{user}': not among the {len(self.users)} users the model was trained on; "
                            "give their items as a history instead")
        return row

    def payload(self):
        """Plain data for a checkpoint (torch.load(weights_only=True) reads it)."""
        lengths = torch.as_tensor([len(h) for h in self.histories], dtype=torch.long)
        flat = np.concatenate(self.histories) if self.histories else np.zeros(0, dtype=np.int64)
        return {"items": [as_plain(x) for x in self.items], "users": [as_plain(x) for x in self.users],
                "history_items": torch.as_tensor(flat, dtype=torch.int32), "history_lengths": lengths,
                "fingerprint": self.fingerprint, "has_repeats": self.has_repeats}

    @classmethod
    def from_payload(cls, p):
        histories = np.split(p["history_items"].numpy().astype(np.int64), np.cumsum(p["history_lengths"].numpy())[:-1])
        return cls(p["items"], p["users"], histories, p["fingerprint"], p["has_repeats"])


def as_plain(value):
    """A numpy scalar as the Python int / float / str it holds."""
    return value.item() if hasattr(value, "item") else value


def data_fingerprint(sequences, raw_items, raw_users, item_attributes):
    """sha256 (16 hex digits) of the prepared data: every sequence, the raw ids and the attribute table."""
    digest = hashlib.sha256()
    digest.update(np.array([len(x) for x in sequences], dtype=np.int64).tobytes())
    digest.update(np.concatenate(sequences).astype(np.int64).tobytes())
    digest.update(json.dumps([str(x) for x in raw_items] + [str(x) for x in raw_users]).encode())
    digest.update(item_attributes.numpy().astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


@dataclass
class SequenceData:
    """A dataset after filtering: each user's item ids in time order (items 1..n; 0 is padding)."""
    name: str
    n_users: int
    n_items: int
    n_attributes: int
    n_interactions: int
    item_attributes: torch.Tensor  # (n_items + 1, A) attribute ids, 0 = none; row 0 is padding
    sequences: list  # per user, np.int64 array of item ids in time order
    item_counts: torch.Tensor  # (n_items + 1,) training-split interaction counts (popularity)
    attribute_fields: torch.Tensor | None = None  # (n_items + 1, A) field of each attribute, 0 = none
    n_fields: int = 1
    raw_items: np.ndarray | None = None  # raw id of item i at position i - 1
    raw_users: np.ndarray | None = None  # raw id of the user of each sequence
    has_repeats: bool = False  # some user interacted with the same item more than once

    @property
    def catalog(self):
        return Catalog(self.n_items, self.n_users, self.n_attributes, self.item_attributes,
                       self.attribute_fields, self.n_fields, self.item_counts)

    def eval_split(self, which, length, exclude_seen=True, device="cpu"):
        """Leave-one-out split: 'valid' predicts the second-to-last item from the items before it, 'test' the
        last item from all before it; inputs are the most recent `length` of them."""
        cut = {"valid": 2, "test": 1}[which]
        histories = [s[:-cut] for s in self.sequences]
        inputs = left_pad([h[-length:] for h in histories], length)
        targets = torch.as_tensor(np.array([s[-cut] for s in self.sequences]))
        ends = torch.as_tensor([len(h) for h in histories])
        seen = None
        if exclude_seen:
            offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])])
            seen = (torch.as_tensor(np.concatenate(histories)), torch.as_tensor(offsets))
        return EvalSplit(inputs, targets, torch.arange(self.n_users), ends, seen).to(device)

    def train_lengths(self):
        return torch.as_tensor([len(s) - 2 for s in self.sequences])

    @functools.cached_property
    def index(self):
        """Raw ids, histories and fingerprint (IdIndex): what a model built on this data keeps in its checkpoint."""
        items = self.raw_items if self.raw_items is not None else np.arange(1, self.n_items + 1)
        users = self.raw_users if self.raw_users is not None else np.arange(self.n_users)
        return IdIndex(items, users, self.sequences, data_fingerprint(self.sequences, items, users, self.item_attributes),
                       self.has_repeats)

    def stats(self):
        """Counts after filtering; attributes = distinct attribute values of the kept items, with how many an
        item has (mean, and the share of items with none) and the number of attribute fields."""
        table = self.item_attributes[1:]
        used = table.unique()
        per_item = table.gt(1).sum(1).double()
        return {"dataset": self.name, "users": self.n_users, "items": self.n_items,
                "interactions": self.n_interactions, "attributes": int((used > 1).sum()),
                "attributes_per_item": round(per_item.mean().item(), 3),
                "items_without_attributes": round(per_item.eq(0).double().mean().item(), 4),
                "attribute_fields": int(self.attribute_fields[1:][table > 1].unique().numel())}


class TrainingWindows:
    """Every user's training history (all but the last two items) as one flat tensor on the device, cut into
    (input, target) windows of max_len per epoch by index arithmetic: "last" takes the most recent window
    (the standard), "random" a window ending anywhere from the first full window to the most recent. `trained`
    (default max_len) is the part of a window that has targets: a memory model reads max_len + memory_len items
    and trains on the last max_len, so its random windows end anywhere from the first full `trained` span, as
    its window alone's do, with fewer older items in front early in a history."""

    def __init__(self, data, max_len, device, trained=None):
        histories = [s[:-2] for s in data.sequences]
        self.lengths = torch.as_tensor([len(h) for h in histories], device=device)
        self.starts = torch.cumsum(self.lengths, 0) - self.lengths
        self.flat = torch.as_tensor(np.concatenate(histories), device=device)
        self.max_len, self.trained = max_len, trained or max_len
        self.offsets = torch.arange(-max_len - 1, 0, device=device)

    def window_ends(self, mode, generator=None):
        """Exclusive end of each user's window (inputs and targets), in history positions."""
        if mode == "last":
            return self.lengths
        low = self.lengths.clamp(max=self.trained + 1)
        u = torch.rand(len(low), generator=generator).to(low.device)
        return low + (u * (self.lengths - low + 1)).long().clamp(max=self.lengths - low)

    def cut(self, ends):
        """(inputs, targets) of the windows ending at ends; the inputs end one position earlier, at ends - 1."""
        index = ends[:, None] + self.offsets  # (U, max_len + 1) positions, negative = padding
        window = torch.where(index >= 0, self.flat[(self.starts[:, None] + index).clamp(min=0)], 0)
        return window[:, :-1], window[:, 1:]


def left_pad(arrays, length):
    """Stack int arrays right-aligned into a (len(arrays), length) tensor, zeros on the left."""
    out = np.zeros((len(arrays), length), dtype=np.int64)
    for row, a in enumerate(arrays):
        a = a[-length:]
        if len(a):
            out[row, length - len(a):] = a
    return torch.from_numpy(out)


def prepare_dataset(name, df, raw_attributes, cfg):
    """Normalise a raw (user, item, time) table: k-core filter, map ids (items 1..n, attributes 1..m),
    order each user's events by time with ties in file order, and build per-user sequences."""
    if df.empty:
        raise DataError(f"{name}: no interactions were read")
    df = df.reset_index(drop=True).assign(order=np.arange(len(df)))
    df = k_core_filter(df, cfg["min_user_count"], max(cfg["min_item_count"], 1))
    df = df[df.groupby("user")["item"].transform("size") >= 3]  # leave-one-out needs train, valid and test
    if df.empty:
        lower = [f"--{k}" for k in ("min_user_count", "min_item_count") if cfg[k] > 3 - (k == "min_item_count") * 2]
        advice = f"lower {' / '.join(lower)}" if lower else "leave-one-out needs at least 3 interactions per user"
        raise DataError(f"{name}: no user is left after {cfg['min_user_count']}-core / {cfg['min_item_count']}-core "
                        f"filtering with 3 interactions per user at least; {advice}")
    items = np.sort(df["item"].unique())
    item_index = {raw: i + 1 for i, raw in enumerate(items)}
    df = df.assign(item=df["item"].map(item_index)).sort_values(["user", "time", "order"])
    starts = np.flatnonzero(df["user"].ne(df["user"].shift()).to_numpy())
    bounds = np.append(starts, len(df))
    seq_items = df["item"].to_numpy(np.int64)
    sequences = [seq_items[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    item_attributes, n_attributes, attribute_fields, n_fields = attribute_table(items, raw_attributes, cfg)
    counts = np.zeros(len(items) + 1, dtype=np.int64)
    np.add.at(counts, np.concatenate([s[:-2] for s in sequences]), 1)
    return SequenceData(name, len(sequences), len(items), n_attributes, len(df), item_attributes,
                        sequences, torch.from_numpy(counts), attribute_fields, n_fields, items,
                        df["user"].to_numpy()[starts], bool(df.duplicated(["user", "item"]).any()))


def attribute_table(items, raw_attributes, cfg):
    """Attribute ids and fields of every item: (ids (n_items + 1, A), n_attributes, fields (n_items + 1, A),
    n_fields). Row 0 is padding; id 1 is reserved for 'no attribute', so an item without metadata never gets the
    padding id 0. A token 'name:value' belongs to field 'name' (RecBole columns, brand:, genre:); a plain token
    to the field of its position in the item's list (category paths). Tokens carried by more than
    attribute_max_share of the items are dropped first. Modes: first, the item's first token; specific, its
    rarest token (the most specific category); all, up to max_attributes tokens; modulo, the paper's public
    script for Beauty (item_id % 50), kept for parity only."""
    mode, n = cfg["attribute_mode"], len(items)
    if mode == "modulo":
        table = torch.zeros(n + 1, 1, dtype=torch.long)
        table[1:, 0] = torch.arange(1, n + 1) % 50 + 2  # ids 2..51 (1 stays 'no attribute')
        return table, 51, table.gt(0).long(), 1
    lists = [list(dict.fromkeys(raw_attributes.get(raw) or [])) for raw in items]
    share = {}
    for tokens in lists:
        for t in tokens:
            share[t] = share.get(t, 0) + 1 / n
    lists = [[(t, t.split(":", 1)[0] if ":" in t else f"#{j}") for j, t in enumerate(tokens)
              if share[t] <= cfg["attribute_max_share"]] for tokens in lists]
    if mode == "specific":
        lists = [sorted(tokens, key=lambda tf: share[tf[0]])[:1] for tokens in lists]
    width = cfg["max_attributes"] if mode == "all" else 1
    vocab, field_ids = {"<none>": 1}, {}
    ids, fields = [[0] * width], [[0] * width]
    for tokens in lists:
        tokens = tokens[:width] or [("<none>", "#0")]
        ids.append([vocab.setdefault(t, len(vocab) + 1) for t, _ in tokens] + [0] * (width - len(tokens)))
        fields.append([field_ids.setdefault(f, len(field_ids) + 1) for _, f in tokens] + [0] * (width - len(tokens)))
    return torch.tensor(ids, dtype=torch.long), len(vocab), torch.tensor(fields, dtype=torch.long), len(field_ids)


def excludes_seen(cfg, data):
    """cfg['exclude_seen'] resolved for data: auto excludes a user's earlier items from the ranking unless some
    user repeats an item (then a repeated target would be an automatic miss, and a repeat never recommended)."""
    return SWITCH.get(str(cfg["exclude_seen"]).lower(), not data.has_repeats)


def fitted_config(cfg, data):
    """cfg for data, as a run is hashed and trained: exclude_seen 'auto' resolved, and max_len cut to the longest
    input a user has (a longer window is padding only, and an absurd one would exhaust memory)."""
    longest = max(max(len(s) for s in data.sequences) - 1, 2)  # the test input: everything but the last item
    return Config(cfg).replace(exclude_seen=str(excludes_seen(cfg, data)).lower(),
                               max_len=min(cfg["max_len"], longest))


def data_key(cfg, files):
    """What identifies a prepared dataset: the data role's keys and the source files (path, size, mtime)."""
    stamps = tuple((str(Path(p).resolve()), Path(p).stat().st_size, Path(p).stat().st_mtime_ns) for p in files if p)
    return tuple(sorted(Config(cfg).of_role("data").items())) + stamps


def read_dataset(cfg, files=None):
    """Read, filter and index cfg['dataset'] (one dataset) from its source files, or from the cache of a
    dataset prepared from the same files (same checksums) with the same data keys."""
    files = dataset_files(cfg) if files is None else files
    cache = cache_path(cfg, files)
    if cache is not None and cache.is_file():
        try:
            return sequence_data_from(torch.load(cache, map_location="cpu", weights_only=True))
        except Exception as exc:  # a torn or foreign cache file is rebuilt, never trusted
            print(f"{cache}: unreadable cache ({type(exc).__name__}), parsing the source files again", file=sys.stderr)
    data = prepare_dataset(cfg["dataset"], *load_raw(cfg["dataset"], files, cfg["columns"]), cfg)
    if cache is not None:
        with contextlib.suppress(OSError):  # a read-only cache folder only costs the next parse
            with atomic_path(cache) as tmp:
                torch.save(sequence_data_payload(data), tmp)
    return data


def cache_path(cfg, files):
    """Where the prepared dataset is cached: named by the sha256 of the data keys and of the source files'
    bytes; None without a cache folder or source files."""
    real = [Path(f) for f in files if f]
    if not cfg["cache_dir"] or not real:
        return None
    digest = hashlib.sha256(json.dumps([__version__, DATA_FORMAT, sorted(Config(cfg).of_role("data").items())]).encode())
    for path in real:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                digest.update(block)
    return Path(cfg["cache_dir"]) / f"{dataset_label(cfg['dataset'])}-{digest.hexdigest()[:20]}.pt"


def sequence_data_payload(data):
    """A SequenceData as plain data (tensors, lists, numbers) for torch.save / weights_only loading."""
    return {"name": data.name, "counts": [data.n_users, data.n_items, data.n_attributes, data.n_interactions, data.n_fields],
            "item_attributes": data.item_attributes, "attribute_fields": data.attribute_fields,
            "item_counts": data.item_counts, "lengths": torch.as_tensor([len(s) for s in data.sequences]),
            "items": torch.as_tensor(np.concatenate(data.sequences), dtype=torch.int32),
            "raw_items": [as_plain(x) for x in data.raw_items], "raw_users": [as_plain(x) for x in data.raw_users],
            "has_repeats": data.has_repeats}


def sequence_data_from(p):
    flat = p["items"].numpy().astype(np.int64)
    sequences = np.split(flat, np.cumsum(p["lengths"].numpy())[:-1])
    n_users, n_items, n_attributes, n_interactions, n_fields = p["counts"]
    return SequenceData(p["name"], n_users, n_items, n_attributes, n_interactions, p["item_attributes"], sequences,
                        p["item_counts"], p["attribute_fields"], n_fields, np.array(p["raw_items"], dtype=object),
                        np.array(p["raw_users"], dtype=object), p["has_repeats"])


def catalog_only(n_items, n_attributes=50):
    """A catalog of n_items (attribute id % n_attributes) and no users: enough to build a model."""
    attributes = (torch.arange(n_items + 1) % n_attributes + 1).unsqueeze(1)
    attributes[0] = 0
    return Catalog(n_items, 0, n_attributes, attributes, attributes.gt(0).long(), 1)


# =====================================================================================================
# §3 Holographic reduced representations: bind, unbind, bundle
# =====================================================================================================
def _fft_dtype(x):
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def bind(a, b):
    """Circular convolution a ⊛ b along the last dimension, via the FFT (fp32 at least)."""
    n, dtype = a.shape[-1], _fft_dtype(a)
    spectrum = torch.fft.rfft(a.to(dtype), n=n) * torch.fft.rfft(b.to(dtype), n=n)
    return torch.fft.irfft(spectrum, n=n).to(a.dtype)


def involution(a):
    """a*[i] = a[-i mod n]: the approximate inverse of a under binding (exact for unitary vectors)."""
    return torch.cat([a[..., :1], a[..., 1:].flip(-1)], dim=-1)


def unbind(c, a, exact=True, eps=1e-12):
    """Recover b from c = a ⊛ b. exact: spectral division (regularised by eps); else correlation c ⊛ a*."""
    if not exact:
        return bind(c, involution(a))
    n, dtype = c.shape[-1], _fft_dtype(c)
    fa = torch.fft.rfft(a.to(dtype), n=n)
    fc = torch.fft.rfft(c.to(dtype), n=n)
    return torch.fft.irfft(fc * fa.conj() / (fa.abs() ** 2 + eps), n=n).to(c.dtype)


def bundle(x, dim=-2):
    """Superpose vectors by addition (the HRR 'bundle')."""
    return x.sum(dim)


def unitary_vectors(count, dim, generator=None):
    """Random vectors whose Fourier coefficients all have modulus 1: binding with them is invertible and
    norm-preserving, and their involution is their exact inverse."""
    phase = torch.rand(count, dim // 2 + 1, generator=generator) * 2 * math.pi
    spectrum = torch.polar(torch.ones_like(phase), phase)
    spectrum[:, 0] = torch.sign(spectrum[:, 0].real).to(spectrum.dtype)
    if dim % 2 == 0:
        spectrum[:, -1] = torch.sign(spectrum[:, -1].real).to(spectrum.dtype)
    return torch.fft.irfft(spectrum, n=dim)


# =====================================================================================================
# §4 Selective state-space scan (Mamba-1): three backends, chosen once per model
# =====================================================================================================
# h_t = exp(Δ_t A) h_{t-1} + Δ_t B_t x_t ;  y_t = C_t · h_t + D x_t
# Shapes: u, delta (b, l, d); A (d, n); B, C (b, l, n); D (d,). Three backends compute the same thing:
# `reference` (a Python loop over time, the readable definition), `parallel` (a log-depth scan in PyTorch,
# no loop over time), `cuda` (mamba-ssm's fused kernel). Tests hold them equal.
def selective_scan_reference(u, delta, A, B, C, D, state=None):
    b, l, d = u.shape
    h = u.new_zeros(b, d, A.shape[1]) if state is None else state
    ys = []
    for t in range(l):
        h = torch.exp(delta[:, t, :, None] * A) * h + (delta[:, t, :, None] * u[:, t, :, None]) * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, dim=1) + u * D, h


def _doubling_scan(decay, x):
    """h_t = decay_t * h_{t-1} + x_t over dim 1 (h_{-1} = 0) in ceil(log2 l) vectorised doubling steps."""
    l, step = x.shape[1], 1
    while step < l:
        x = torch.cat([x[:, :step], x[:, step:] + decay[:, step:] * x[:, :-step]], dim=1)
        decay = torch.cat([decay[:, :step], decay[:, step:] * decay[:, :-step]], dim=1)
        step *= 2
    return x


def _inclusive_scan(decay, x, chunk=64):
    """The doubling scan inside chunks of `chunk` steps, the state carried from chunk to chunk: O(l log chunk)
    work and small intermediates, where one doubling scan over a long l would copy the whole (b, l, d, n)
    tensor log2(l) times. The loop runs over l / chunk chunks, not over time steps."""
    if x.shape[1] <= chunk:
        return _doubling_scan(decay, x)
    outs, carry = [], None
    for start in range(0, x.shape[1], chunk):
        d, xs = decay[:, start:start + chunk], x[:, start:start + chunk]
        if carry is not None:
            xs = torch.cat([xs[:, :1] + d[:, :1] * carry.unsqueeze(1), xs[:, 1:]], dim=1)
        outs.append(_doubling_scan(d, xs))
        carry = outs[-1][:, -1]
    return torch.cat(outs, dim=1)


class LinearScan(torch.autograd.Function):
    """h = scan(decay, x) with a hand-written backward (a reverse scan), so that autograd keeps only
    decay and h instead of every doubling step's intermediates."""

    @staticmethod
    def forward(ctx, decay, x):
        h = _inclusive_scan(decay, x)
        ctx.save_for_backward(decay, h)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        decay, h = ctx.saved_tensors
        # g_t = grad_h_t + decay_{t+1} g_{t+1}: the same scan run backwards in time. (grad_h arrives with
        # the einsum's strides; scanning a contiguous copy is several times faster on the CPU.)
        next_decay = torch.cat([decay[:, 1:], torch.zeros_like(decay[:, :1])], dim=1)
        g = _inclusive_scan(next_decay.flip(1).contiguous(), grad_h.flip(1).contiguous()).flip(1)
        h_prev = torch.cat([torch.zeros_like(h[:, :1]), h[:, :-1]], dim=1)
        return g * h_prev, g


def selective_scan_parallel(u, delta, A, B, C, D, state=None):
    dtype, work = u.dtype, torch.promote_types(u.dtype, torch.float32)  # fp32 at least
    u, delta, A, B, C, D = (t.to(work) for t in (u, delta, A, B, C, D))
    state = None if state is None else state.to(work)
    decay = torch.exp(delta.unsqueeze(-1) * A)  # (b, l, d, n)
    x = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # (b, l, d, n)
    if state is not None:  # fold an initial state into the first input
        x = torch.cat([x[:, :1] + decay[:, :1] * state.unsqueeze(1), x[:, 1:]], dim=1)
    h = LinearScan.apply(decay, x)
    y = torch.einsum("bldn,bln->bld", h, C) + u * D
    return y.to(dtype), h[:, -1]


def import_kernel_module(name):
    """Import the module `name` (dotted) without running its top package's __init__, and with torch.compile as
    the identity while it loads. mamba-ssm's __init__ imports its language models and, through them,
    transformers; cut-cross-entropy's imports a torch.compile wrapper, and its kernel module decorates a helper
    we never call (the argsort of gradient filtering, which cce_kernel turns off) with torch.compile, which
    loads the compiler stack: seconds of every run's start (README, Efficiency) for kernels that need none of
    it. Every module of the package loaded here leaves sys.modules again (the caller keeps what it took from
    them), so a later `import mamba_ssm` by the user loads the whole package as usual."""
    top = name.partition(".")[0]
    if top == name or top in sys.modules:
        return importlib.import_module(name)
    spec = importlib.util.find_spec(top)
    if spec is None:
        raise ImportError(f"No module named {top!r}")
    compile_ = torch.compile
    sys.modules[top] = importlib.util.module_from_spec(spec)  # a stub: the package's path, not its __init__
    torch.compile = lambda model=None, **options: model if model is not None else (lambda fn: fn)
    try:
        return importlib.import_module(name)
    finally:
        torch.compile = compile_
        for loaded in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
            del sys.modules[loaded]


KERNELS = {"selective_scan": ("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
           "causal_conv1d": ("causal_conv1d", "causal_conv1d_fn"),
           "ssd": ("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined")}


@functools.lru_cache(maxsize=None)
def cuda_kernel(name):
    """KERNELS[name], imported on first use on a CUDA device: mamba-ssm's selective_scan_fn, causal-conv1d's
    causal_conv1d_fn, or mamba-ssm's Mamba-2 chunked scan mamba_chunk_scan_combined ("ssd"); None for a package
    that is missing or was built for another torch / CUDA (the chunked scan also needs Triton)."""
    module, attribute = KERNELS[name]
    try:
        return getattr(import_kernel_module(module), attribute)
    except Exception:
        return None


def selective_scan_cuda(u, delta, A, B, C, D, state=None):
    if state is not None:
        raise ValueError("the cuda scan starts from a zero state")
    tr = lambda t: t.transpose(1, 2).contiguous()  # noqa: E731  (b, l, x) -> (b, x, l)
    y, last = cuda_kernel("selective_scan")(tr(u), tr(delta.to(u.dtype)), A.float(), tr(B).to(u.dtype),
                                            tr(C).to(u.dtype), D.float(), return_last_state=True)
    return y.transpose(1, 2), last


SCAN_BACKENDS = {"reference": selective_scan_reference, "parallel": selective_scan_parallel,
                 "cuda": selective_scan_cuda}
MIXERS = {"mamba": "selective_scan", "mamba2": "ssd"}  # the mixer's kernel in KERNELS
MIXER_LABELS = {"mamba": "Mamba-1", "mamba2": "Mamba-2"}


def pick_scan_backend(name, device, mixer="mamba"):
    """auto: the mixer's mamba-ssm kernel on CUDA when it imports, else the parallel scan on a GPU, and on the CPU
    the plain loop over time, which is 2 to 46 times faster there than the parallel scan's copies (README)."""
    device = torch.device(device)
    kernel = cuda_kernel(MIXERS[mixer]) if device.type == "cuda" else None
    if name == "auto":
        if device.type != "cuda":
            return "reference"
        name = "cuda" if kernel is not None else "parallel"
    if name == "cuda" and kernel is None:
        needs = "the mamba-ssm package" + (" and Triton" if mixer == "mamba2" else "")
        raise ConfigError(f"--scan_backend=cuda needs a CUDA device and {needs} (pip install mamba-ssm); "
                          "use --scan_backend=parallel")
    return name


class MambaBlock(nn.Module):
    """Mamba-1 mixer: input projection, depthwise causal conv, input-dependent (Δ, B, C), diagonal
    A = -exp(A_log), SiLU-gated output. `mask` (b, l, 1) makes left padding inert: padded steps neither
    feed nor decay the state, so outputs equal those of the unpadded sequence. The scan backend is chosen
    once (use_backend), never per call. The plain forward and the streaming step go through three hooks that
    Mamba2Block overrides: split_projection, ssm_inputs and ssm_parameters."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, scan_backend="parallel"):
        super().__init__()
        d_inner, self.dt_rank = expand * d_model, math.ceil(d_model / 16)
        self.d_state, self.d_conv = d_state, d_conv
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        with torch.no_grad():
            self.dt_proj.bias.copy_(initial_dt_bias(d_inner))
        self.use_backend(scan_backend)

    def use_backend(self, name):
        """Scan with SCAN_BACKENDS[name] from now on ("cuda" also takes causal-conv1d's kernel when it imports)."""
        self.scan_backend, self.scan = name, SCAN_BACKENDS[name]
        self.conv_kernel = cuda_kernel("causal_conv1d") if name == "cuda" else None

    def split_projection(self, projected):
        """The input projection's output -> (the convolution's input, the gate, what else the SSM reads)."""
        x, z = projected.chunk(2, dim=-1)
        return x, z, None

    def ssm_inputs(self, x, extra=None):
        """The convolution's output -> (the scan's input, Δ, B, C), each (.., channels)."""
        dt, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        return x, F.softplus(self.dt_proj(dt)), B, C

    def ssm_parameters(self):
        """(A (d_inner, d_state), D (d_inner,)) in fp32."""
        return -torch.exp(self.A_log.float()), self.D.float()

    def forward(self, hidden, mask=None):
        if mask is not None:
            hidden = hidden * mask
        if self.scan_backend == "cuda":
            return self.forward_kernels(hidden, mask)
        x, z, extra = self.split_projection(self.in_proj(hidden))
        x = F.silu(self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))
        if mask is not None:  # padded steps feed nothing, so the state stays zero through the left padding
            x = x * mask
        x, delta, B, C = self.ssm_inputs(x, extra)
        A, D = self.ssm_parameters()
        y, _ = self.scan(x, delta, A, B, C, D)
        return self.out_proj(y * F.silu(z))

    def forward_kernels(self, hidden, mask=None):
        """forward in the kernels' (b, channels, l) layout from the input projection on: no transposed copies of
        the wide activations, Δ's bias and softplus and the SiLU gate fused into the scan kernel, every tensor in
        the dtype the kernels take (bf16 under autocast)."""
        length = hidden.shape[1]
        xz = torch.matmul(self.in_proj.weight, hidden.transpose(1, 2))  # (b, 2 d_inner, l)
        x, z = xz.chunk(2, dim=1)
        if self.conv_kernel is not None:
            x = self.conv_kernel(x, self.conv.weight.squeeze(1), self.conv.bias, activation="silu")
        else:
            x = F.silu(self.conv(x)[..., :length])
        if mask is not None:
            x = x * mask.transpose(1, 2).to(x.dtype)
        dt, B, C = torch.matmul(self.x_proj.weight, x).split([self.dt_rank, self.d_state, self.d_state], dim=1)
        delta = torch.matmul(self.dt_proj.weight, dt)  # (b, d_inner, l), before bias and softplus
        y = cuda_kernel("selective_scan")(x, delta, -torch.exp(self.A_log.float()), B, C, self.D.float(), z=z,
                                          delta_bias=self.dt_proj.bias.float(), delta_softplus=True)
        return F.linear(y.transpose(1, 2), self.out_proj.weight)

    def init_state(self, batch, device):
        return (torch.zeros(batch, self.conv.in_channels, self.d_conv, device=device),
                torch.zeros(batch, self.out_proj.in_features, self.d_state, device=device))

    def step(self, hidden, state):
        """One time step: hidden (b, d_model) -> output (b, d_model), new state. O(1) in history length."""
        conv_state, ssm_state = state
        x, z, extra = self.split_projection(self.in_proj(hidden))
        conv_state = torch.cat([conv_state[..., 1:], x.unsqueeze(-1)], dim=-1)
        x = F.silu((conv_state * self.conv.weight.squeeze(1)).sum(-1) + self.conv.bias)
        x, delta, B, C = self.ssm_inputs(x, extra)
        A, D = self.ssm_parameters()
        y, ssm_state = selective_scan_reference(x.unsqueeze(1), delta.unsqueeze(1), A, B.unsqueeze(1),
                                                C.unsqueeze(1), D, ssm_state)
        return self.out_proj(y[:, 0] * F.silu(z)), (conv_state, ssm_state)


def initial_dt_bias(width):
    """Δ starts log-uniform in [1e-3, 1e-1], as in Mamba: the bias is softplus^-1(Δ)."""
    dt = torch.exp(torch.rand(width) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    return dt + torch.log(-torch.expm1(-dt))


class Mamba2Block(MambaBlock):
    """Mamba-2 mixer (SSD): one projection gives the gate z, the scan input x, B, C (one group, shared by the
    heads) and one Δ per head; x, B and C go through the causal convolution together; A is one scalar per head.
    The recurrence is Mamba-1's with Δ tied over a head's `headdim` channels and A tied over those channels and
    the state, so the reference and parallel backends and the streaming step reuse Mamba-1's scans with the
    per-head values repeated. On CUDA, mamba-ssm's chunked scan (Triton, matrix products on tensor cores over
    chunks of `chunk` steps) with Δ's bias and softplus and the SiLU gate fused. As in Mamba-2, A starts uniform
    in [1, 16] per head; unlike it there is no normalisation inside the block (the encoder normalises around it)."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, headdim=32, chunk=64, scan_backend="parallel"):
        nn.Module.__init__(self)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ConfigError(f"mixer=mamba2 needs expand * d_model ({d_inner}) divisible by headdim ({headdim})")
        self.d_state, self.d_conv, self.headdim, self.chunk = d_state, d_conv, headdim, chunk
        self.heads, width = d_inner // headdim, d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, width + d_inner + self.heads, bias=False)
        self.conv = nn.Conv1d(width, width, d_conv, groups=width, padding=d_conv - 1)
        self.dt_bias = nn.Parameter(initial_dt_bias(self.heads))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)
        self.use_backend(scan_backend)

    def split_projection(self, projected):
        width = self.conv.in_channels
        return projected.split([width, width - 2 * self.d_state, self.heads], dim=-1)

    def ssm_inputs(self, xbc, dt):
        x, B, C = xbc.split([xbc.shape[-1] - 2 * self.d_state, self.d_state, self.d_state], dim=-1)
        return x, F.softplus(dt + self.dt_bias).repeat_interleave(self.headdim, dim=-1), B, C

    def ssm_parameters(self):
        A = -torch.exp(self.A_log.float()).repeat_interleave(self.headdim)
        return A.unsqueeze(-1).expand(-1, self.d_state), self.D.float().repeat_interleave(self.headdim)

    def forward_kernels(self, hidden, mask=None):
        """forward through mamba-ssm's chunked scan, in the (b, l, heads, headdim) layout it takes: no transposes
        but the convolution's, every tensor in the dtype the kernel takes (bf16 under autocast)."""
        xbc, z, dt = self.split_projection(self.in_proj(hidden))
        xbc = F.silu(self.conv(xbc.transpose(1, 2))[..., : hidden.shape[1]].transpose(1, 2))
        if mask is not None:
            xbc = xbc * mask.to(xbc.dtype)
        x, B, C = xbc.split([z.shape[-1], self.d_state, self.d_state], dim=-1)
        heads = lambda t: t.unflatten(-1, (self.heads, self.headdim))  # noqa: E731
        y = cuda_kernel("ssd")(heads(x), dt, -torch.exp(self.A_log.float()), B.unsqueeze(2), C.unsqueeze(2),
                               self.chunk, D=self.D.float(), z=heads(z), dt_bias=self.dt_bias.float(),
                               dt_softplus=True)
        return self.out_proj(y.flatten(-2))


def make_mixer(cfg):
    """The Mamba block that cfg['mixer'] names, with the config's sizes."""
    if cfg["mixer"] == "mamba2":
        return Mamba2Block(cfg["d_model"], cfg["d_state"], cfg["d_conv"], cfg["expand"], cfg["headdim"],
                           cfg["ssd_chunk"])
    return MambaBlock(cfg["d_model"], cfg["d_state"], cfg["d_conv"], cfg["expand"])


# =====================================================================================================
# §5 Models: one contract
# =====================================================================================================
# forward(Batch) -> Output. A Batch holds item ids (b, l), left-padded; in training the next item at each
# position; and for models with per-user memory (reads_users) the user rows and where each window ends in
# the user's history. A model returns its hidden states, the target each state predicts (0 = none, no loss)
# and its own auxiliary loss, already weighted. The score of item i for a state h is h · output_table()[i].
# So the loss, the ranking and the trainer never ask which model they hold; what differs between models
# (streaming, bundling, per-user memory, CUDA-graph safety) is a method or a capability flag of the model.
class Batch(NamedTuple):
    """items (b, l) left-padded ids; targets (b, l) next item at each position (training only); users (b,)
    user rows and ends (b,) the exclusive end of the inputs in each user's history: column j holds history
    position ends - l + j (read by reads_users models, ignored by the others)."""
    items: torch.Tensor
    targets: torch.Tensor | None = None
    users: torch.Tensor | None = None
    ends: torch.Tensor | None = None


class Output(NamedTuple):
    """hidden (b, t, d) states; targets (b, t) the item each state predicts, 0 where there is none (training
    only); aux_loss the model's own weighted auxiliary loss (0.0 when it has none)."""
    hidden: torch.Tensor
    targets: torch.Tensor | None = None
    aux_loss: torch.Tensor | float = 0.0


def next_targets(batch, width):
    """The targets of the last `width` positions, 0 where the input is padding; None outside training."""
    if batch.targets is None:
        return None
    items, targets = batch.items[:, -width:], batch.targets[:, -width:]
    return torch.where(items.gt(0), targets, 0)


def small_init(embedding, std=0.02):
    """N(0, std) weights with the padding row at exactly zero (nn.init would overwrite it)."""
    nn.init.normal_(embedding.weight, std=std)
    if embedding.padding_idx is not None:
        with torch.no_grad():
            embedding.weight[embedding.padding_idx].zero_()
    return embedding


class FeedForward(nn.Module):
    def __init__(self, d_model, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        return self.net(x)


class Recommender(nn.Module):
    """The shared contract: forward(Batch) -> Output, output_table(), score_next(Batch). Capabilities:
    reads_users (per-user state in the module: one process, no DDP), graph_safe (the training step can be
    captured as a CUDA graph), recurrent (init_state / step stream one interaction at a time),
    has_attribute_objectives (an auxiliary attribute loss that attribute pre-training can train alone),
    extends(cfg) (the model a memory extension adds its memory to, which warm_start starts from)."""
    name = ""
    reads_users = False
    graph_safe = True
    recurrent = False
    has_attribute_objectives = False  # pre-training (pretrain_epochs) trains them alone first
    scan_backend = ""  # the scan backend of Mamba models ("" for the others)

    @classmethod
    def extends(cls, cfg):
        """(name, config) of the model this one adds a memory to under cfg, or None (not an extension)."""
        return None

    def __init__(self, cfg, catalog):
        super().__init__()
        self.config, self.catalog = dict(cfg), catalog
        self.input_len = cfg["max_len"]  # items the model reads per user (a memory model reads more)
        self.index = None  # IdIndex of the data it was built for: raw ids and histories (build_model, load)
        self.streams, self.stream_table = {}, None  # observe(): recurrent state per user row, the output table
        self.stepper = None  # stream_step(): step, compiled with --compile

    def stream_step(self, state, item, table=None):
        """step(), through torch.compile when the model's config sets compile: a step is a few hundred tiny
        operations, and one compiled function takes HoloMamba's from 1.34 to 0.44 ms on the CPU (batch 1, two
        cores, efficiency stage: README); on CUDA GraphedStream captures the compiled step, so its graph replays
        fewer, fused kernels. Compiled once, in about 14 s."""
        if self.stepper is None:
            self.stepper = torch.compile(self.step) if self.config.get("compile") else self.step
        return self.stepper(state, item, table)

    def train(self, mode=True):
        self.stream_table = None  # weights may change: the cached output table of observe() is stale
        return super().train(mode)

    def id_index(self):
        if self.index is None:
            raise DataError(f"this {self.name} has no raw-id index: build it from a dataset (build_model(name, data)) "
                            "or load a checkpoint saved from such a model")
        return self.index

    def excluding_seen(self, exclude_seen=None):
        """exclude_seen given, else the model's own setting ('auto': unless its data has repeated items)."""
        if exclude_seen is not None:
            return bool(exclude_seen)
        return excludes_seen(self.config, self.id_index())  # the index knows whether its data has repeats

    @torch.no_grad()
    def recommend(self, user=None, history=None, k=10, exclude_seen=None, skip_unknown=False):
        """Top-k [(raw item id, score)] after a known user's whole history (user=raw id) or after a new user's
        items (history=[raw item ids], oldest first). exclude_seen (default: the model's setting) leaves out the
        items of that history."""
        if (user is None) == (history is None):
            raise ValueError("give either user= (a known user's raw id) or history= (raw item ids), not both")
        index = self.id_index()
        if user is not None:
            row = index.row(user)
            return self.top_k([index.histories[row]], [row], k, exclude_seen)[0]
        return self.top_k([index.item_ids(list(history), skip_unknown)], [None], k, exclude_seen)[0]

    @torch.no_grad()
    def recommend_many(self, users, k=10, exclude_seen=None, batch_size=1024):
        """Top-k of many known users, in batches: a DataFrame (user, rank, item, score)."""
        index, rows = self.id_index(), []
        for start in range(0, len(users), batch_size):
            part = list(users[start:start + batch_size])
            ids = [index.row(u) for u in part]
            for user, recs in zip(part, self.top_k([index.histories[r] for r in ids], ids, k, exclude_seen)):
                rows += [{"user": user, "rank": rank + 1, "item": item, "score": score}
                         for rank, (item, score) in enumerate(recs)]
        return pd.DataFrame(rows, columns=["user", "rank", "item", "score"])

    def top_k(self, histories, rows, k, exclude_seen=None, scores=None):
        """[(raw item, score)] * len(histories): the model's next-item scores after each history (or `scores`
        given), seen items masked when excluded."""
        index, device = self.id_index(), model_device(self)
        if scores is None:
            self.eval()
            items = left_pad([h[-self.input_len:] for h in histories], self.input_len).to(device)
            known = all(r is not None for r in rows)
            users = torch.as_tensor(rows, device=device) if known else None
            ends = torch.as_tensor([len(h) for h in histories], device=device) if known else None
            with autocast(self.config, device):
                scores = self.score_next(Batch(items, users=users, ends=ends))
        if self.excluding_seen(exclude_seen):
            offsets = torch.as_tensor(np.concatenate([[0], np.cumsum([len(h) for h in histories])]))
            flat = torch.as_tensor(np.concatenate([np.zeros(0, dtype=np.int64), *histories]), device=scores.device)
            mask_seen(scores, (flat, offsets), 0)
        top = scores.topk(min(k, scores.shape[1]), dim=1)
        return [[(index.items[i], float(v)) for i, v in zip(ids.tolist(), vals.tolist()) if math.isfinite(v)]
                for ids, vals in zip(top.indices, top.values)]

    @torch.no_grad()
    def observe(self, user, item, k=10, exclude_seen=None):
        """Fold one new interaction (raw ids) into the model and return the user's top-k after it. A recurrent
        model takes one O(1) step of the user's state (its first observation of a user steps through their
        history once); the others read the window again. A new user starts an empty history."""
        index = self.id_index()
        row = index.row(user, add=True)
        new = index.item_ids([item])
        if not self.recurrent:
            index.histories[row] = np.concatenate([index.histories[row], new])
            return self.top_k([index.histories[row]], [row], k, exclude_seen)[0]
        device = model_device(self)
        self.eval()
        if self.stream_table is None:
            self.stream_table = self.output_table()[1:].float()
        state = self.streams.get(row)
        if state is None:
            state = self.init_state(1)
            for earlier in index.histories[row]:
                _, state = self.stream_step(state, torch.tensor([earlier], device=device), self.stream_table)
        scores, self.streams[row] = self.stream_step(state, torch.as_tensor(new, device=device), self.stream_table)
        index.histories[row] = np.concatenate([index.histories[row], new])
        return self.top_k([index.histories[row]], [row], k, exclude_seen, scores=scores.clone())[0]

    def output_table(self):
        """(n_items + 1, d) output vectors; row 0 (padding) is never ranked."""
        return self.item_emb.weight

    def attribute_neighbours(self, table):
        """(n_items + 1, d): per item, the output vector that attribute smoothing moves probability toward; None
        for a model that reads no attributes (attribute smoothing then leaves its loss alone)."""
        return None

    def score_next(self, batch):
        """(b, n_items) fp32 scores for items 1..n after the last position of each sequence."""
        return exact_scores(self(batch).hidden[:, -1], self.output_table()[1:])

    def reads(self, batch):
        """How much a memory extension uses its read at the last position of each row ({name: (b,) tensor});
        {} for a model without a memory."""
        return {}

    def set_scan_backend(self, name):
        """Models without a scan ignore it."""

    def init_state(self, batch):
        raise NotImplementedError(f"{self.name} has no recurrent state: score_next re-reads the window")

    def step(self, state, item, table=None):
        raise NotImplementedError(f"{self.name} has no recurrent state: score_next re-reads the window")


def leaves(state):
    """The tensors of a recurrent state (a tensor, or lists / tuples of them), in order."""
    return [state] if torch.is_tensor(state) else [t for part in state for t in leaves(part)]


class GraphedStream:
    """Streaming inference of a recurrent model on CUDA, one interaction per user per call, as one replayed
    CUDA graph: the users' states live in static buffers that the graph updates in place, so a call costs a
    copy of the new items and one launch. stream(items (b,)) -> scores (b, n_items), valid until the next call."""

    def __init__(self, model, batch):
        device = model_device(model)
        self.model = model.eval()
        with torch.no_grad(), autocast(model.config, device):
            self.table = model.output_table()[1:]
        self.state = model.init_state(batch)
        self.items = torch.ones(batch, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):  # warm-up outside the graph (lazy initialisation, kernel selection)
                self.fold()
        torch.cuda.current_stream(device).wait_stream(side)
        for t in leaves(self.state):
            t.zero_()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.scores = self.fold()

    def fold(self):
        with torch.no_grad(), autocast(self.model.config, self.items.device):
            scores, new = self.model.stream_step(self.state, self.items, self.table)
            for old, fresh in zip(leaves(self.state), leaves(new)):
                old.copy_(fresh)
        return scores

    def __call__(self, items):
        self.items.copy_(items)
        self.graph.replay()
        return self.scores


def chunked(fn, *args):
    """fn(*args), its activations recomputed in the backward pass when a gradient is wanted (fn draws no random
    numbers, so no RNG state is kept, which CUDA graph capture would not allow)."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
    return fn(*args)


def rms_normalise(x, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class HolographicMemory(nn.Module):
    """Multi-slot holographic associative memory (after the Holographic Associative Memory Transformer).
    Each of S slots of width d holds a superposition of key ⊛ value pairs. Writing an item x: the slot
    decays passively (λ_s = sigmoid of a learned logit) and adds gate_s(x) · key_s(x) ⊛ value(x); with
    bipolar keys the binding is an elementwise product with ±1. Reading with a query q: RMS-normalise each
    slot, unbind it with a key from the learned retrieval head, mix the slots with learned softmax weights.
    Normalising at read time keeps writing a linear recurrence: a scan over a sequence, O(S·d) per step."""

    def __init__(self, d, slots=8, binding="fft", horizon=None):
        """horizon: slot s starts with decay λ_s = 1 - 1/h_s, h_s spread geometrically from 4 items to horizon
        (at least 16), so that slots keep the recent and the distant past apart; None: λ ≈ 0.95 for every slot."""
        super().__init__()
        self.slots, self.binding = slots, binding
        self.write_key = nn.Linear(d, slots * d, bias=False)
        self.read_key = nn.Linear(d, slots * d, bias=False)
        self.value = nn.Linear(d, d)
        self.gate = nn.Linear(d, slots)
        self.slot_weights = nn.Linear(d, slots)
        if horizon is None:
            logits = torch.full((slots,), 3.0)
        else:  # logit(1 - 1/h) = log(h - 1)
            logits = torch.log(torch.logspace(math.log10(4), math.log10(max(horizon, 16)), slots) - 1)
        self.decay_logit = nn.Parameter(logits)

    def keys(self, head, x):
        """(..., S, d) keys: unit-modulus spectra (binding is then an exact rotation, undone by the
        involution) or ±1 vectors (with a straight-through gradient)."""
        k = head(x).unflatten(-1, (self.slots, -1))
        if self.binding == "bipolar":
            return k + (torch.sign(k) - k).detach()
        spectrum = torch.fft.rfft(k.to(_fft_dtype(k)))  # fp32 at least
        return torch.fft.irfft(spectrum / (spectrum.abs() + 1e-6), n=k.shape[-1]).to(k.dtype)

    def bind_pair(self, key, value):
        return key * value if self.binding == "bipolar" else bind(key, value)

    def unbind_pair(self, trace, key):
        return trace * key if self.binding == "bipolar" else unbind(trace, key, exact=False)

    def writes(self, x):
        """What x adds to each slot, with the keys and value it used: (..., S, d), (..., S, d), (..., d)."""
        key, value = self.keys(self.write_key, x), self.value(x)
        gate = torch.sigmoid(self.gate(x)).unsqueeze(-1)
        return gate * self.bind_pair(key, value.unsqueeze(-2)), key, value

    def decay(self):
        return torch.sigmoid(self.decay_logit).unsqueeze(-1)  # (S, 1)

    def write_sequence(self, x, mask, start=None):
        """Memory after every position of x (b, l, d): M_t = λ M_{t-1} + write(x_t), padding neither writing
        nor decaying, from the memory `start` (b, S, d) before x (default empty). Returns (M (b, l, S, d), keys,
        values)."""
        add, key, value = self.writes(x)
        real = mask[..., None, None]  # (b, l, 1, 1)
        work = torch.promote_types(add.dtype, torch.float32)  # the scan in fp32 at least
        decay = torch.where(real > 0, self.decay().to(work), torch.ones((), dtype=work, device=add.device))
        memory = LinearScan.apply(decay.expand(add.shape).contiguous(), (add * real).to(work))
        if start is not None:  # start decays once per real write
            memory = memory + self.decay().to(work) ** real.to(work).cumsum(1) * start[:, None].to(work)
        return memory, key, value

    def fold(self, x, mask, after=None):
        """The memory (b, S, d) after writing all of x (b, l, d): Σ_t λ^(real writes after t) write(x_t). after
        (b, l): the real writes after each position, when x is part of a longer span (default: those in mask)."""
        add = self.writes(x)[0]
        real = mask[..., None, None].to(torch.promote_types(add.dtype, torch.float32))
        after = real.flip(1).cumsum(1).flip(1) - real if after is None else after[..., None, None].to(real.dtype)
        return (self.decay().to(real.dtype) ** after * add * real).sum(1)

    def fold_in_chunks(self, x, mask, chunk=128):
        """fold(x, mask) with its gradient, `chunk` positions at a time under activation checkpointing (a chunk's
        writes are recomputed in the backward pass), so its memory grows with chunk, not with the history."""
        after = mask.flip(1).cumsum(1).flip(1) - mask
        parts = [chunked(self.fold, x[:, i:i + chunk], mask[:, i:i + chunk], after[:, i:i + chunk])
                 for i in range(0, x.shape[1], chunk)]
        return torch.stack(parts).sum(0)

    def recall_miss(self, memory, x, mask, chunk=128):
        """reconstruction_loss of memory (b, S, d) over the items x (b, l, d) it holds, `chunk` positions at a
        time under activation checkpointing."""
        misses = [chunked(self.recall_miss_sum, memory, x[:, i:i + chunk], mask[:, i:i + chunk])
                  for i in range(0, x.shape[1], chunk)]
        return torch.stack(misses).sum() / mask.sum().clamp(min=1)

    def recall_miss_sum(self, memory, x, mask):
        _, key, value = self.writes(x)
        return self.reconstruction_loss(memory[:, None], key, value, mask) * mask.sum().clamp(min=1)

    def write(self, memory, x):
        """One streaming write: memory (b, S, d), x (b, d)."""
        return self.decay() * memory + self.writes(x)[0]

    def read(self, memory, query):
        """Retrieve with query (..., d) from memory (..., S, d)."""
        retrieved = self.unbind_pair(rms_normalise(memory), self.keys(self.read_key, query))
        weights = torch.softmax(self.slot_weights(query), dim=-1).unsqueeze(-1)
        return (weights * retrieved).sum(-2)

    def reconstruction_loss(self, memory, key, value, mask):
        """Mean 1 - cos(read back with the write keys, value written) over real positions."""
        recalled = self.unbind_pair(rms_normalise(memory), key).mean(-2)
        miss = 1 - F.cosine_similarity(recalled.float(), value.float(), dim=-1)
        return (miss * mask).sum() / mask.sum().clamp(min=1)


def popularity_buckets(counts, n_buckets):
    """Bucket of each item's training count: floor(log2(1 + count)), the last bucket open-ended (padding: 0)."""
    return torch.log2(counts.double() + 1).floor().long().clamp(max=n_buckets - 1)


def attribute_overlap_neighbours(item_attributes, k, item_counts=None):
    """(ids, weights), each (n_items + 1, k): for each item, the k other items that share the most attribute
    tokens with it (among equals the more popular first, when training counts are given), weighted by the tokens
    shared, normalised to sum 1; an item that shares no token with any other (padding too) gets weights 0. The
    shared counts are one product of the item-token incidence matrix with itself, taken in blocks of rows."""
    n = len(item_attributes)
    incidence = torch.zeros(n, int(item_attributes.max()) + 1).scatter_(1, item_attributes, 1.0)
    incidence[:, :2] = 0  # 0 padding, 1 'no attribute'
    incidence[0] = 0
    order = torch.zeros(n) if item_counts is None else item_counts.double().argsort().argsort().float() / n
    ids, weights, rows = [], [], max(1, 2 ** 24 // n)
    for start in range(0, n, rows):
        shared = incidence[start:start + rows] @ incidence.T  # (rows, n) tokens in common
        own = torch.arange(start, min(start + rows, n))
        shared[own - start, own] = 0
        top = (shared + order).topk(min(k, n - 1), dim=1).indices  # order < 1: it only ranks equal counts
        ids.append(top)
        weights.append(shared.gather(1, top))
    weights = torch.cat(weights)
    return torch.cat(ids), weights / weights.sum(1, keepdim=True).clamp(min=1)


class HoloMamba(Recommender):
    """Items bound to their attributes, then Mamba blocks with pre-norm residuals (and an optional feed-forward
    sublayer). The item vector (binding):
      item   e_i = x_i + α · x_i ⊛ ā_i                       (the paper: ā_i the mean of i's attribute vectors)
      roles  e_i = x_i + Σ_f g_f · r_f ⊛ ā_{i,f}              (role-filler: r_f a fixed unitary role per field f,
                                                             ā_{i,f} the mean of i's attributes in field f)
      both   the sum of the two attribute terms.
    The role-filler term is shared by every item with the same attribute, so a rarely seen item borrows from
    its category and brand, on the input and on the output side (scores are tied to e). It also stays
    separable: unbinding e_i with r_f returns ā_{i,f} plus noise, and since <h, r_f ⊛ a> = <h ⊛ r_f*, a>, the
    attribute part of an item's score is the state unbound by each role, scored against the attribute. The
    attribute objectives train exactly that: attribute_loss asks each state, unbound by r_f, for the next item's
    attribute of field f; agreement_loss asks each target item's vector the same of its own attributes;
    masked_attribute_loss masks input items and asks each masked position's two-sided context (the causal state
    plus a backward encoder's, which exists for this objective only) for the masked item's attributes.
    frequency_mixing=B weighs the two parts of e_i by the item's popularity bucket b(i) = min(floor(log2(1 + count)),
    B - 1): e_i = u_b(i) · (item part) + s_b(i) · (role fillers), u and s learned, starting at 1.
    Optional: temporal bundling (bundle_k) and a long-term holographic memory (memory_slots) over memory_len
    older items (memory_writes: older, only those, or all, the window's items too; see memory_stream)."""
    name, recurrent, use_binding = "HoloMamba", True, True

    @classmethod
    def extends(cls, cfg):
        """With a memory: the same model with neither the memory nor the older items it folds in."""
        cfg = Config(cfg)
        return (cls.name, cfg.replace(memory_slots=0, memory_len=0, warm_start="off")) if cfg["memory_slots"] else None

    def __init__(self, cfg, catalog):
        super().__init__(cfg, catalog)
        d, self.bundle_k = cfg["d_model"], cfg["bundle_k"]
        self.item_emb = small_init(nn.Embedding(catalog.n_items + 1, d, padding_idx=0))
        self.attr_emb = small_init(nn.Embedding(catalog.n_attributes + 1, d, padding_idx=0))
        self.register_buffer("item_attributes", catalog.item_attributes, persistent=False)
        self.alpha = nn.Parameter(torch.tensor(1.0))
        self.emb_norm = nn.LayerNorm(d)
        self.dropout = nn.Dropout(cfg["dropout"])
        self.mixers = nn.ModuleList(make_mixer(cfg) for _ in range(cfg["n_layers"]))
        self.mixer_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg["n_layers"]))
        n_ffn = cfg["n_layers"] if cfg["ffn"] else 0
        self.ffns = nn.ModuleList(FeedForward(d, cfg["dropout"]) for _ in range(n_ffn))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(n_ffn))
        self.final_norm = nn.LayerNorm(d)
        self.memory_writes = cfg["memory_writes"]
        horizon = cfg["memory_len"] if self.memory_writes == "older" else None
        self.memory = (HolographicMemory(d, cfg["memory_slots"], cfg["memory_binding"], horizon)
                       if cfg["memory_slots"] else None)
        self.memory_gate = nn.Linear(d, d) if self.memory else None
        self.memory_out = nn.Linear(d, d, bias=False) if self.memory else None
        if self.memory is not None:  # starts closed: at initialisation the model is its window alone
            nn.init.zeros_(self.memory_out.weight)
        self.memory_loss = cfg["memory_loss"]
        if self.memory is not None:
            self.input_len = cfg["max_len"] + cfg["memory_len"]
        self.scan_backend = "parallel"
        self.binding, self.item_dropout = cfg["binding"], cfg["item_dropout"]
        self.attribute_loss, self.agreement_loss = cfg["attribute_loss"], cfg["agreement_loss"]
        self.masked_attribute_loss, self.mask_prob = cfg["masked_attribute_loss"], cfg["mask_prob"]
        self.cloze_loss = cfg["cloze_loss"]
        if self.binding != "item":  # fixed roles from their own generator: the other weights start as without them
            fields = catalog.attribute_fields
            roles = unitary_vectors(catalog.n_fields + 1, d, torch.Generator().manual_seed(0))
            self.register_buffer("roles", roles * torch.arange(catalog.n_fields + 1).gt(0)[:, None], persistent=False)
            self.register_buffer("attribute_fields", fields, persistent=False)
            same_field = (fields[:, :, None] == fields[:, None, :]).sum(-1)  # values of the slot's field in the item
            self.register_buffer("slot_weights", fields.gt(0) / same_field.clamp(min=1), persistent=False)
            self.field_gain = nn.Parameter(torch.ones(catalog.n_fields + 1))
        self.neighbour_count = cfg["attribute_neighbours"] if self.use_binding else 0
        self.set_attribute_neighbours(catalog.item_counts)
        self.frequency_mixing = cfg["frequency_mixing"]
        if self.frequency_mixing:
            if catalog.item_counts is None:
                raise ConfigError("--frequency_mixing needs the items' training counts, which this catalog lacks")
            self.register_buffer("popularity_bucket", popularity_buckets(catalog.item_counts, self.frequency_mixing),
                                 persistent=False)
            self.item_mix = nn.Parameter(torch.ones(self.frequency_mixing))
            self.attribute_mix = nn.Parameter(torch.ones(self.frequency_mixing))
        if (self.use_binding and self.masked_attribute_loss) or self.cloze_loss:  # last: the others start as without
            self.mask_vector = nn.Parameter(torch.randn(d))  # in place of a normalised item vector, of its scale
            self.backward_mixers = nn.ModuleList(make_mixer(cfg) for _ in range(cfg["n_layers"]))
            self.backward_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg["n_layers"] + 1))
        # what this variant never reads is frozen (AdamW skips it either way); DDP would wait for its gradient
        unread = ["alpha"] if self.binding == "roles" else []
        if not self.use_binding:
            unread = ["alpha", "attr_emb.weight", "field_gain", "item_mix", "attribute_mix"]
        for name, param in self.named_parameters():
            if name in unread:
                param.requires_grad_(False)

    def set_attribute_neighbours(self, item_counts):
        """attribute_neighbours=K: each item's K overlap neighbours and their weights, from this model's attribute
        table (the shuffled control calls it again on its shuffled table)."""
        if self.neighbour_count:
            ids, weights = attribute_overlap_neighbours(self.item_attributes, self.neighbour_count, item_counts)
            self.register_buffer("neighbour_ids", ids, persistent=False)
            self.register_buffer("neighbour_weights", weights, persistent=False)

    def set_scan_backend(self, name):
        self.scan_backend = name
        for mixer in [*self.mixers, *getattr(self, "backward_mixers", [])]:
            mixer.use_backend(name)

    def item_vectors(self, ids=None, drop=0.0):
        """The holographic item vector of `binding` (see the class) of each id; ids None: of every item, from the
        whole tables (no lookup, whose backward would sort a million ids to sum one gradient row each). With
        several attributes, item binding distributes over their bundle: Σ_j x ⊛ a_j = x ⊛ Σ_j a_j, so one FFT
        product binds them all. `drop` zeroes the item-specific part (x and x ⊛ ā) of each vector with that
        probability, keeping the roles."""
        e = self.item_emb.weight if ids is None else self.item_emb(ids)
        if self.use_binding and self.binding != "roles":
            attrs = self.item_attributes if ids is None else self.item_attributes[ids]
            a = self.attr_emb(attrs).sum(-2) / attrs.gt(0).sum(-1, keepdim=True).clamp(min=1)
            e = e + self.alpha * bind(e, a)
        if drop:
            e = e * (torch.rand(ids.shape, device=ids.device) >= drop).unsqueeze(-1).to(e.dtype)
        if self.use_binding and self.binding != "item":
            fillers = self.role_fillers(ids)
            if self.frequency_mixing:  # how much of each part an item of this popularity gets
                bucket = self.popularity_bucket if ids is None else self.popularity_bucket[ids]
                e = e * self.item_mix[bucket].unsqueeze(-1).to(e.dtype)
                fillers = fillers * self.attribute_mix[bucket].unsqueeze(-1).to(fillers.dtype)
            e = e + fillers
        return e

    def bound_attributes(self):
        """(F + 1, V + 1, d): every attribute vector bound to every field's role, r_f ⊛ a_v. Binding is linear,
        so this small table (one FFT product per field and value, once per call) gives the role fillers of any
        item by lookup, and the attribute scores of any vector by one matrix product."""
        return bind(self.roles.unsqueeze(1), self.attr_emb.weight.unsqueeze(0))

    def role_fillers(self, ids):
        """Σ_f g_f · r_f ⊛ ā_{i,f} for each id: every attribute slot bound to its field's role, the values of one
        field averaged, the fields weighted by learned gains. The gains are folded into the bound table and the
        slots are looked up with an embedding: its backward sums the many repeats of a popular attribute with a
        sorted segment reduction, where indexing's backward would pile atomic adds onto a few rows."""
        table = self.bound_attributes() * self.field_gain[:, None, None]
        fields, attrs, weights = ((t if ids is None else t[ids]) for t in
                                  (self.attribute_fields, self.item_attributes, self.slot_weights))
        filled = F.embedding(fields * table.shape[1] + attrs, table.flatten(0, 1))  # (..., A, d)
        return (filled * weights.unsqueeze(-1).to(filled.dtype)).sum(-2)

    def embed(self, ids):
        """Encoder input: the normalised item vector (item dropout in training)."""
        return self.emb_norm(self.item_vectors(ids, self.item_dropout if self.training else 0.0))

    def attribute_objectives(self, hidden, targets, seq=None, drawn=None):
        """The weighted attribute losses of training (see the class); 0.0 when none is set. drawn: masked_pass(seq)
        when another objective shares it."""
        if not (self.training and targets is not None and self.has_attribute_objectives):
            return 0.0
        loss = self.attribute_loss * self.unbinding_loss(hidden, targets) if self.attribute_loss else 0.0
        if self.agreement_loss:
            loss = loss + self.agreement_loss * self.unbinding_loss(self.item_vectors(targets), targets)
        if self.masked_attribute_loss and seq is not None:
            loss = loss + self.masked_attribute_loss * self.masked_attribute_prediction(seq, drawn)
        return loss

    def unbinding_loss(self, vectors, items):
        """Mean cross-entropy over the attribute vocabulary of each field's unbinding of vectors (b, t, d), for
        every attribute slot of items (b, t) ('no attribute' and padding, item 0 included, carry none)."""
        attrs, fields = self.item_attributes[items], self.attribute_fields[items]  # (b, t, A)
        labels = torch.where(attrs > 1, attrs, -100).flatten()
        table = self.bound_attributes().to(vectors.dtype)  # (F + 1, V + 1, d)
        # <v ⊛ r_f*, a> = <v, r_f ⊛ a>, so one product scores every field
        scores = torch.einsum("btd,fvd->btfv", vectors, table)  # (b, t, F + 1, V + 1)
        logits = scores.gather(2, fields.unsqueeze(-1).expand(*fields.shape, scores.shape[-1]))
        return (F.cross_entropy(logits.flatten(0, -2).float(), labels, ignore_index=-100, reduction="sum")
                / labels.ne(-100).sum().clamp(min=1))

    def masked_pass(self, seq):
        """(masked, context): each real input item masked with probability mask_prob, and masked_context there."""
        masked = seq.gt(0) & (torch.rand(seq.shape, device=seq.device) < self.mask_prob)
        return masked, self.masked_context(seq, masked)

    def masked_attribute_prediction(self, seq, drawn=None):
        """S3Rec's masked-attribute prediction in holographic form: each input item is replaced by a learned mask
        vector with probability mask_prob; the masked sequence runs through the causal encoder and, reversed,
        through a backward encoder of its own; at a masked position the sum of the two states has seen every item
        but the masked one, and its unbinding by each role classifies the masked item's attributes. drawn: a
        masked_pass(seq) to use instead of a new one."""
        masked, context = drawn or self.masked_pass(seq)
        return self.unbinding_loss(context, torch.where(masked, seq, 0))

    def cloze_objective(self, seq, drawn=None):
        """The weighted masked-item (Cloze) loss of training (0.0 when off or not training): masked_context at each
        masked position scores every item through the output table; the cross-entropy of the masked item, averaged
        over the masked positions. Every position is scored and the unmasked ones ignored, so shapes stay fixed
        (no host synchronisation: the step can still be a CUDA graph). drawn: as masked_attribute_prediction."""
        if not (self.training and self.cloze_loss):
            return 0.0
        masked, context = drawn or self.masked_pass(seq)
        logits = (context @ self.output_table()[1:].to(context.dtype).T).flatten(0, 1).float()
        labels = torch.where(masked, seq - 1, -1).flatten()
        loss = F.cross_entropy(logits, labels, ignore_index=-1, reduction="sum") / masked.sum().clamp(min=1)
        return self.cloze_loss * loss

    def masked_context(self, seq, masked):
        """(b, t, d): the causal encoder's state plus the backward encoder's, over seq with the items where masked
        (b, t) replaced by the mask vector: at a masked position, every item of the row but that one."""
        e = self.embed(seq)
        e = torch.where(masked.unsqueeze(-1), self.mask_vector.to(e.dtype), e)
        mask = seq.gt(0).unsqueeze(-1).to(e.dtype)
        x = self.dropout(e) * mask
        back, back_mask = x.flip(1), mask.flip(1)  # reversed, the padding trails, so no real step reads it
        for mixer, norm in zip(self.backward_mixers, self.backward_norms):
            back = back + self.dropout(mixer(norm(back), back_mask))
        return self.encode(x, mask) + self.backward_norms[-1](back).flip(1)

    def attribute_neighbours(self, table):
        """(n_items + 1, d): for each item, the mean over its attributes of the mean output vector of the items
        that carry the attribute; the item's own vector where it has none. With uniform weights on the items of an
        attribute, the smoothed target's expected logit is h · neighbour (see attribute_smoothing_term). With
        attribute_neighbours=K: the mean of its K overlap neighbours' vectors, weighted by the tokens shared."""
        if not self.use_binding:
            return None
        if self.neighbour_count:  # the weighted mean of the item's overlap neighbours (attribute_neighbours)
            weights = self.neighbour_weights.to(table.dtype)
            near = (F.embedding(self.neighbour_ids, table) * weights.unsqueeze(-1)).sum(-2)
            return torch.where(weights.sum(-1, keepdim=True) > 0, near, table)
        attrs = self.item_attributes
        slots = attrs.gt(1).to(table.dtype)  # 0 padding, 1 'no attribute'
        sums = torch.zeros(self.attr_emb.num_embeddings, table.shape[1], device=table.device, dtype=table.dtype)
        sums.index_add_(0, attrs.flatten(), (table.unsqueeze(1) * slots.unsqueeze(-1)).flatten(0, 1))
        counts = torch.zeros(len(sums), device=table.device, dtype=table.dtype).index_add_(0, attrs.flatten(),
                                                                                        slots.flatten())
        centroids = sums / counts.clamp(min=1).unsqueeze(-1)
        n_slots = slots.sum(-1, keepdim=True)
        # a lookup, not indexing: the backward of indexing serialises the many repeats of padding and of common
        # attributes (30 ms a step on Beauty), the embedding's backward reduces them as sorted segments
        mean = (F.embedding(attrs, centroids) * slots.unsqueeze(-1)).sum(-2) / n_slots.clamp(min=1)
        return torch.where(n_slots > 0, mean, table)

    @property
    def has_attribute_objectives(self):
        return bool(self.use_binding and (self.attribute_loss or self.agreement_loss or self.masked_attribute_loss))

    def output_table(self):
        """Scores are tied to the (unnormalised) item vectors, so attributes shape the output side too."""
        return self.item_vectors()

    def encode(self, x, mask, final=True):
        """The residual stream after the blocks, through the final norm (final=False: before it)."""
        for i, (mixer, norm) in enumerate(zip(self.mixers, self.mixer_norms)):
            x = x + self.dropout(mixer(norm(x), mask))
            if self.ffns:
                x = x + self.dropout(self.ffns[i](self.ffn_norms[i](x)))
        return self.final_norm(x) if final else x

    def memory_read(self, x, memory):
        """The residual stream x (..., d) plus the memory's gated read, queried with final_norm(x), and the
        gate: memory_out starts at zero, so at initialisation this is x itself and the model its window alone;
        the read joins before the final norm, which keeps the scores' scale, as a residual branch with the
        same dropout as the blocks'."""
        query = self.final_norm(x)
        gate = torch.sigmoid(self.memory_gate(query))
        return x + self.dropout(gate * self.memory_out(self.memory.read(memory.to(x.dtype), query))), gate

    def forward(self, batch):
        """One state per position; with temporal bundling (bundle_k > 1) one per window of k items, windows
        aligned to the end of the sequence; with the memory, the last max_len positions."""
        if self.bundle_k > 1:
            return self.bundled(batch, self.bundle_k)
        if self.memory is not None:
            return self.with_memory(batch)
        seq = batch.items
        mask = seq.gt(0).unsqueeze(-1).to(self.item_emb.weight.dtype)
        hidden = self.encode(self.dropout(self.embed(seq)) * mask, mask)
        targets = next_targets(batch, hidden.shape[1])
        both = self.training and self.cloze_loss and self.use_binding and self.masked_attribute_loss
        drawn = self.masked_pass(seq) if both else None  # the two masked objectives share one draw and one pass
        return Output(hidden, targets, self.attribute_objectives(hidden, targets, seq, drawn)
                      + self.cloze_objective(seq, drawn))

    def with_memory(self, batch):
        """The encoder reads the last max_len items; the holographic memory folds in every item of the batch
        (older ones included) and each output adds a gated read of the memory at that position. The
        reconstruction loss, weighted by memory_loss, is the auxiliary loss."""
        x, memory, aux = self.memory_stream(batch)
        hidden = self.final_norm(self.memory_read(x, memory)[0])
        return Output(hidden, next_targets(batch, hidden.shape[1]), aux)

    def memory_stream(self, batch):
        """(residual stream of the window before the final norm, memory at each of its positions (b, l or 1, S, d),
        weighted reconstruction loss). memory_writes=older: the memory holds the items older than the window
        (what the window drops), the same for each of the window's positions, and learns from them (the
        reconstruction loss reads them back). memory_writes=all: every item is written, the window's too; the
        older ones are folded in without gradient (as Transformer-XL caches its memory), so the memory learns to
        write and read from the window's items, and the reconstruction loss reads those back."""
        seq = batch.items
        w = min(self.config["max_len"], seq.shape[1])
        mask = seq.gt(0).to(self.item_emb.weight.dtype)
        older, held = seq[:, :-w], mask[:, :-w]  # (b, 0) when nothing is older than the window
        start = None
        if self.memory_writes == "all" and older.shape[1]:
            with torch.no_grad():
                start = self.memory.fold(self.embed(older), held)
        e, m = self.embed(seq[:, -w:]), mask[:, -w:]
        x = self.encode(self.dropout(e) * m.unsqueeze(-1), m.unsqueeze(-1), final=False)
        if self.memory_writes == "all":
            memory, key, value = self.memory.write_sequence(e, m, start)
            return x, memory, self.memory_loss * self.memory.reconstruction_loss(memory, key, value, m)
        if not older.shape[1]:  # an empty memory, which reads as zero
            return x, x.new_zeros(len(seq), 1, self.memory.slots, x.shape[-1]), 0.0
        older = self.dropout(self.embed(older))
        memory = self.memory.fold_in_chunks(older, held)
        miss = self.memory.recall_miss(memory, older, held) if self.memory_loss else 0.0
        return x, memory[:, None], self.memory_loss * miss

    @torch.no_grad()
    def reads(self, batch):
        """How much the memory is used at the last position of each row: {gate: the read gate's mean opening,
        share: the added read's norm over the residual stream's}, each (b,)."""
        if self.memory is None:
            return {}
        x, memory, _ = self.memory_stream(batch)
        x, memory = x[:, -1].float(), memory[:, -1].float()
        read, gate = self.memory_read(x, memory)
        return {"gate": gate.mean(-1), "share": (read - x).norm(dim=-1) / x.norm(dim=-1)}

    def bundled(self, batch, k):
        """Temporal bundling: each window of k consecutive item embeddings becomes one token,
        sum_j role_j ⊛ e_j, with role_j the unit impulse at j (binding with it is a cyclic shift, so every
        position stays recoverable by unbinding). The encoder then reads l / k tokens, and each state's target
        is the item after its window's last item. A model trained with bundle_k = k learned this input; any
        other model meets it untrained, at inference only (see bundling)."""
        b, l = batch.items.shape
        seq = F.pad(batch.items, ((-l) % k, 0))
        e = self.embed(seq) * seq.gt(0).unsqueeze(-1)
        windows = e.view(b, -1, k, e.shape[-1])
        tokens = bundle(torch.stack([torch.roll(windows[:, :, j], shifts=j, dims=-1) for j in range(k)], dim=2))
        mask = seq.view(b, -1, k).gt(0).any(-1, keepdim=True).to(e.dtype)
        hidden = self.encode(self.dropout(tokens) * mask, mask)
        if batch.targets is None:
            return Output(hidden)
        last_items, targets = (F.pad(t, ((-l) % k, 0))[:, k - 1::k] for t in (batch.items, batch.targets))
        return Output(hidden, torch.where(last_items.gt(0), targets, 0))

    @contextlib.contextmanager
    def bundling(self, k):
        """Read windows of k items as one token inside the block (k = 1: plain), whatever the model trained on."""
        trained, self.bundle_k = self.bundle_k, k
        try:
            yield self
        finally:
            self.bundle_k = trained

    def init_state(self, batch):
        """Per-user streaming state: (conv window, SSM state) per layer, plus the memory (S, d) if any; with
        memory_writes=older also the ids of the last max_len items (the window), whose oldest enters the memory
        when a new item arrives."""
        device = self.item_emb.weight.device
        state = [m.init_state(batch, device) for m in self.mixers]
        if self.memory is not None:
            state.append(torch.zeros(batch, self.memory.slots, self.item_emb.embedding_dim, device=device))
        if self.memory is not None and self.memory_writes == "older":
            state.append(torch.zeros(batch, self.config["max_len"], dtype=torch.long, device=device))
        return state

    def step(self, state, item, table=None):
        """Streaming inference: fold one new item (b,) into the per-user state; returns (scores (b, n_items),
        new state). The attribute comes from the item table, as in the full forward. `table` is
        output_table()[1:], which a server computes once rather than at every step."""
        if self.bundle_k > 1:
            raise ValueError("streaming steps are per item; this model was trained with bundle_k > 1")
        x, new_state, extra = self.embed(item), [], state[len(self.mixers):]
        if self.memory is not None and self.memory_writes == "all":
            memory = self.memory.write(extra[0], x)
        elif self.memory is not None:  # the item leaving the window enters the memory
            memory, window = extra
            leaving = window[:, 0]
            memory = torch.where(leaving.gt(0)[:, None, None], self.memory.write(memory, self.embed(leaving)), memory)
            extra = [memory, torch.cat([window[:, 1:], item[:, None]], 1)]
        for i, (mixer, norm) in enumerate(zip(self.mixers, self.mixer_norms)):
            out, s = mixer.step(norm(x), state[i])
            x, new_state = x + out, new_state + [s]
            if self.ffns:
                x = x + self.ffns[i](self.ffn_norms[i](x))
        if self.memory is not None:
            x = self.memory_read(x, memory)[0]
            new_state += [memory, *extra[1:]]
        hidden = self.final_norm(x)
        table = self.output_table()[1:] if table is None else table
        return exact_scores(hidden, table), new_state


class MambaItemOnly(HoloMamba):
    """The item-only ablation: HoloMamba with the same parameters, attributes never bound."""
    name, use_binding = "Mamba-ItemOnly", False

    def attribute_objectives(self, hidden, targets, seq=None, drawn=None):
        return 0.0  # no attributes, no attribute losses


class HoloMambaShuffled(HoloMamba):
    """The control: HoloMamba reading every item's attributes from another item (one fixed permutation of the
    items' attribute rows), so attribute frequencies, the attribute vocabulary and the architecture are those of
    HoloMamba, and only the link between an item and its attributes is gone."""
    name = "HoloMamba-Shuffled"

    def __init__(self, cfg, catalog):
        super().__init__(cfg, catalog)
        order = torch.cat([torch.zeros(1, dtype=torch.long),
                           1 + torch.randperm(catalog.n_items, generator=torch.Generator().manual_seed(0))])
        for name in ("item_attributes", "attribute_fields", "slot_weights"):
            if hasattr(self, name):
                setattr(self, name, getattr(self, name)[order])
        self.set_attribute_neighbours(catalog.item_counts)  # the neighbours of the shuffled attributes


class CausalSelfAttentionBlock(nn.Module):
    """Pre-norm transformer block (attention + feed-forward) for SASRec."""

    def __init__(self, d_model, n_heads, dropout):
        super().__init__()
        self.n_heads, self.p = n_heads, dropout
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ffn = FeedForward(d_model, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, attn_mask):
        b, l, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, l, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(b, l, d)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SASRec(Recommender):
    """Self-attentive sequential recommendation (Kang & McAuley 2018): scaled item embeddings plus
    learned positions, causal self-attention that never attends to padding, tied output embeddings."""
    name = "SASRec"

    def __init__(self, cfg, catalog):
        super().__init__(cfg, catalog)
        d = cfg["d_model"]
        self.item_emb = small_init(nn.Embedding(catalog.n_items + 1, d, padding_idx=0))
        self.pos_emb = small_init(nn.Embedding(cfg["max_len"], d))
        self.dropout = nn.Dropout(cfg["dropout"])
        self.blocks = nn.ModuleList(CausalSelfAttentionBlock(d, cfg["n_heads"], cfg["dropout"])
                                    for _ in range(cfg["n_layers"]))
        self.final_norm = nn.LayerNorm(d)

    def forward(self, batch):
        hidden = self.final_norm(self.encode(batch.items))
        return Output(hidden, next_targets(batch, hidden.shape[1]))

    def encode(self, seq):
        """The residual stream after the last block, before the final norm."""
        b, l = seq.shape
        valid = seq.gt(0)
        pos = torch.arange(l, device=seq.device)
        x = self.item_emb(seq) * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(pos + self.pos_emb.num_embeddings - l)
        x = self.dropout(x) * valid.unsqueeze(-1)
        causal = pos[None, :] <= pos[:, None]
        # a query sees earlier real items, and itself (so padded rows are never empty)
        attn_mask = (causal & valid[:, None, :]) | torch.eye(l, dtype=torch.bool, device=seq.device)
        attn_mask = attn_mask.unsqueeze(1)
        for block in self.blocks:
            x = block(x, attn_mask) * valid.unsqueeze(-1)
        return x


def adaptive_depth(scores, eligible, k_min, k_max):
    """RAMRec's retrieval depth per query: K = k_min + round(h · (k_max − k_min)), at most the number of
    eligible entries, where h in [0, 1] is the entropy of softmax(scores) over the eligible entries divided by
    its maximum log(n_eligible). Peaked similarities retrieve few entries, flat ones many."""
    n = eligible.sum(-1)
    p = torch.softmax(scores.masked_fill(~eligible, torch.finfo(scores.dtype).min), -1) * eligible
    h = -torch.special.xlogy(p, p).sum(-1) / n.clamp(min=2).log()  # n <= 1: the entropy is 0
    return (k_min + torch.round(h.clamp(0, 1) * (k_max - k_min))).long().minimum(n)


class RAMRec(SASRec):
    """RAMRec (RecSys 2025, "Dynamic Memory-Augmented Sequential Recommendation with Adaptive Retrieval"), as
    we read it: a SASRec encoder plus a per-user episodic memory bank of its past hidden states, keyed by the
    real user id. A training forward stores a few states of each window (detached), tagged with their absolute
    positions in the user's history (the stored state m_j is final_norm(h) at that position). The state h at
    position p reads the top-K entries by q·k_j / sqrt(d), q = W_q final_norm(h), k_j = W_k m_j, with K from
    the entropy of those similarities (adaptive_depth); it attends over them, r = Σ w_j V(m_j), and fuses r
    through a gate: final_norm(h + sigmoid(W_g [final_norm(h); r]) ⊙ W_o r).
    Leakage: position p reads only entries tagged t < p. A stored state is causal (it saw items <= t), so no
    training position retrieves a state that saw its own target p + 1; training windows end before the
    validation item and the bank is read-only in eval mode, so evaluation never reads a state that saw a
    held-out item. Without users, or with no eligible entry, the output is exactly the SASRec encoder's."""
    name = "RAMRec"
    reads_users = True
    graph_safe = False  # the bank changes in place at every training step

    @classmethod
    def extends(cls, cfg):
        return SASRec.name, Config(cfg).replace(warm_start="off")

    def __init__(self, cfg, catalog):
        super().__init__(cfg, catalog)
        d, slots = cfg["d_model"], cfg["ramrec_slots"]
        self.k_min, self.k_max, self.writes = cfg["ramrec_k_min"], cfg["ramrec_k_max"], cfg["ramrec_writes"]
        self.decay = cfg["ramrec_decay"]
        self.query, self.key, self.value = (nn.Linear(d, d) for _ in range(3))
        self.out = nn.Linear(d, d, bias=False)  # no bias: an empty read (r = 0) adds exactly nothing
        nn.init.zeros_(self.out.weight)  # and zero: at initialisation every read adds nothing (SASRec exactly)
        self.gate = nn.Linear(2 * d, d)
        n_users = catalog.n_users
        self.register_buffer("bank", torch.zeros(n_users, slots, d))  # stored hidden states
        self.register_buffer("tags", torch.full((n_users, slots), -1))  # absolute position, -1 = empty
        self.register_buffer("usage", torch.zeros(n_users, slots))  # retrievals (decayed)
        self.register_buffer("quality", torch.zeros(n_users, slots))  # mean attention weight received

    def forward(self, batch):
        seq, users = batch.items, batch.users
        if users is None:
            plain = self.final_norm(self.encode(seq))
            return Output(plain, next_targets(batch, plain.shape[1]))
        h, plain, added, _, _, positions = self.fusion(batch)
        out = self.final_norm(h + added)
        if self.training:
            self.write(users, positions, seq, plain)
        return Output(out, next_targets(batch, out.shape[1]))

    def fusion(self, batch):
        """(h, final_norm(h), the gated read added to h, the gate, the retrieval depth K, the positions), in fp32."""
        seq, users, ends = batch.items, batch.users, batch.ends
        h = self.encode(seq)
        positions = (ends - seq.shape[1])[:, None] + torch.arange(seq.shape[1], device=seq.device)
        with torch.autocast(seq.device.type, enabled=False):  # similarities and fusion in fp32
            h = h.float()
            plain = self.final_norm(h)
            r, depth = self.read(users, positions, seq.gt(0), plain)
            gate = torch.sigmoid(self.gate(torch.cat([plain, r], -1)))
            return h, plain, gate * self.out(r), gate, depth, positions

    @torch.no_grad()
    def reads(self, batch):
        """How much the bank is used at the last position of each row: {gate: the gate's mean opening, share: the
        added read's norm over the residual stream's, depth: the retrieval depth K}, each (b,)."""
        h, _, added, gate, depth, _ = self.fusion(batch)
        return {"gate": gate[:, -1].mean(-1), "share": added[:, -1].norm(dim=-1) / h[:, -1].norm(dim=-1),
                "depth": depth[:, -1].float()}

    def read(self, users, positions, real, query):
        """(r (b, l, d), K (b, l)): for the state at each position p, attention over the top-K entries of the
        user's bank tagged t < p; zero where none is eligible. In training, usage counts the retrievals of each
        entry and quality keeps the running mean of the attention weight it received."""
        bank, tags = self.bank[users], self.tags[users][:, None, :]  # (b, S, d), (b, 1, S)
        scores = self.query(query) @ self.key(bank).transpose(1, 2) / math.sqrt(bank.shape[-1])  # (b, l, S)
        eligible = (tags >= 0) & (tags < positions[..., None]) & real[..., None]
        depth = adaptive_depth(scores.detach(), eligible, self.k_min, self.k_max)  # (b, l)
        top, slot = scores.masked_fill(~eligible, float("-inf")).topk(self.k_max, -1)  # fixed K_max, then a mask
        chosen = torch.arange(self.k_max, device=scores.device) < depth[..., None]
        w = torch.softmax(top.masked_fill(~chosen, torch.finfo(top.dtype).min), -1) * chosen
        weights = torch.zeros_like(scores).scatter(-1, slot, w)  # (b, l, S)
        if self.training:
            with torch.no_grad():
                hits = torch.zeros_like(scores).scatter(-1, slot, chosen.float()).sum(1)  # (b, S)
                usage = self.usage[users] + hits
                self.quality[users] += (weights.sum(1) - hits * self.quality[users]) / usage.clamp(min=1)
                self.usage[users] = usage
        return weights @ self.value(bank), depth

    @torch.no_grad()
    def write(self, users, positions, seq, states):
        """Store the states at every (l // writes)-th position back from the window's last, with their absolute
        positions as tags. An entry with the same tag is refreshed (new state, its usage and quality kept);
        otherwise empty slots go first, then the lowest retention score quality + usage, both decayed at each
        write. A new entry starts at usage 1 (as if retrieved once), quality 0. The users of a batch are
        distinct (rows of one permutation)."""
        l, slots = seq.shape[1], self.tags.shape[1]
        stride = max(1, l // self.writes)
        cols = l - 1 - stride * torch.arange(min(self.writes, (l - 1) // stride + 1), device=seq.device)
        new = torch.where(seq[:, cols] > 0, positions[:, cols], -1)  # (b, W) tags; -1: padding, not stored
        tags, usage, quality = self.tags[users], self.decay * self.usage[users], self.decay * self.quality[users]
        same = (tags[:, None, :] == new[..., None]) & (new[..., None] >= 0)  # (b, W, S): a refreshed entry
        kept_usage = torch.where(same.any(-1), (same * usage[:, None]).sum(-1), 1.0)
        kept_quality = (same * quality[:, None]).sum(-1)
        tags = tags.masked_fill(same.any(1), -1)  # the old copy's slot is free
        slot = (quality + usage).masked_fill(tags < 0, float("-inf")).topk(len(cols), -1, largest=False).indices
        slot = slot.masked_fill(new < 0, slots)  # padding goes to a spill column, dropped

        def put(table, value):
            index = slot.view(slot.shape + (1,) * (table.dim() - 2)).expand(value.shape)
            return torch.cat([table, table[:, :1]], 1).scatter(1, index, value)[:, :slots]

        self.tags[users] = put(tags, new)
        self.bank[users] = put(self.bank[users], states[:, cols])
        self.usage[users] = put(usage, kept_usage)
        self.quality[users] = put(quality, kept_quality)


class GRU4Rec(Recommender):
    """GRU over the item sequence (Hidasi et al. 2016, with full cross-entropy). The GRU has no biases, so a
    zero input on a zero state leaves the state at zero: left padding (zero embeddings) is inert without
    packing, which keeps the step free of host synchronisation."""
    name, recurrent = "GRU4Rec", True

    def __init__(self, cfg, catalog):
        super().__init__(cfg, catalog)
        d = cfg["d_model"]
        self.item_emb = small_init(nn.Embedding(catalog.n_items + 1, d, padding_idx=0))
        self.dropout = nn.Dropout(cfg["dropout"])
        self.gru = nn.GRU(d, d, num_layers=cfg["n_layers"], batch_first=True, bias=False)
        self.final_norm = nn.LayerNorm(d)

    def forward(self, batch):
        with torch.autocast(batch.items.device.type, enabled=False):  # the recurrence in fp32
            out, _ = self.gru(self.dropout(self.item_emb(batch.items)))
        hidden = self.final_norm(self.dropout(out))
        return Output(hidden, next_targets(batch, hidden.shape[1]))

    def init_state(self, batch):
        return torch.zeros(self.gru.num_layers, batch, self.gru.hidden_size, device=self.item_emb.weight.device)

    def step(self, state, item, table=None):
        """Streaming inference: one GRU step per new item; returns (scores (b, n_items), new state)."""
        out, state = self.gru(self.item_emb(item).unsqueeze(1), state)
        table = self.item_emb.weight[1:] if table is None else table
        return exact_scores(self.final_norm(out[:, 0]), table), state


MODELS = {cls.name: cls for cls in (HoloMamba, MambaItemOnly, SASRec, GRU4Rec, RAMRec, HoloMambaShuffled)}
assert tuple(MODELS) == MODEL_NAMES


def default_config(data, overrides):
    """The defaults for data (its preset entry merged when it is a named dataset), with keyword overrides."""
    name = getattr(data, "name", None)
    named = name is not None and dataset_names(name) is None and len(as_list(name)) == 1
    return config(name if named else None, **overrides)


def model_class(name):
    """The class of model `name` (one of MODEL_NAMES); an unknown name is a ConfigError."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}' (choose from {', '.join(MODEL_NAMES)})")
    return MODELS[name]


def build_model(name, data, cfg=None, device=None, **overrides):
    """Model `name` (one of MODEL_NAMES) for the catalog of `data` (a SequenceData or a Catalog). cfg defaults
    to the defaults for data; keyword overrides change keys (build_model("HoloMamba", data, d_model=128)).
    The scan backend is chosen once, for `device` (default cfg['device']): cfg['scan_backend'], where auto
    means the mamba-ssm kernel on CUDA when it imports, else the PyTorch parallel scan."""
    cfg = default_config(data, overrides) if cfg is None else Config(cfg).replace(**overrides)
    device = pick_device(cfg["device"]) if device is None else torch.device(device)
    catalog = data.catalog if isinstance(data, SequenceData) else data
    model = model_class(name)(cfg, catalog)
    model.index = data.index if isinstance(data, SequenceData) else None
    model.set_scan_backend(pick_scan_backend(cfg["scan_backend"], device, cfg["mixer"]))
    return model.to(device)


# =====================================================================================================
# §6 Training: one loss over Output, an eager and a graphed step, fit -> FitResult
# =====================================================================================================
def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name}: no CUDA device is visible; use --device=cpu")
    return torch.device(name)


def set_seed(seed):
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def autocast(cfg, device):
    if device.type == "cuda" and cfg["amp"]:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def exact_scores(hidden, table):
    """hidden (b, d) · table (n, d)^T in fp32 even under autocast: bf16 scores would tie and inflate ranks."""
    with torch.autocast(hidden.device.type, enabled=False):
        return hidden.float() @ table.float().T


def unwrap(model):
    """The Recommender inside a DistributedDataParallel and/or torch.compile wrapper."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or model._orig_mod
    return model


def model_device(model):
    return next(unwrap(model).parameters()).device


def is_main_process():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def popularity_log_q(item_counts, device):
    """log q(i) of the sampled softmax: training popularity + 1 (padding 0 never drawn)."""
    counts = item_counts.to(device).double() + 1
    counts[0] = 0
    return (counts / counts.sum()).log().float()


def chunk_statistics(hidden, part):
    """One chunk of the catalog: per row of the logits z = hidden · part^T, (max z, Σ exp(z - max z), Σ z), in fp32
    at least (the product in the inputs' dtype)."""
    z = (hidden @ part.T).to(torch.promote_types(hidden.dtype, torch.float32))
    top = z.amax(1)
    return top, torch.exp(z - top[:, None]).sum(1), z.sum(1)


def chunk_logit_gradient(hidden, part, lse, weight, floor):
    """One chunk: d loss / d logits bar the target, (softmax - floor) · row weight, in the inputs' dtype (the
    softmax arithmetic in lse's)."""
    z = (hidden @ part.T).to(lse.dtype)
    return ((torch.exp(z - lse[:, None]) - floor) * weight[:, None]).to(hidden.dtype)


@functools.lru_cache(maxsize=None)
def fused_chunk_ops(device_type):
    """(chunk_statistics, chunk_logit_gradient) for tensors on device_type: on CUDA each compiled, so that one
    kernel reads a chunk's logits once for all its element-wise work and reductions (eager would write and read
    them again for every operation: at 1M items that traffic is most of the step); as they are elsewhere, and
    where Triton, which compiles them, is missing."""
    if device_type != "cuda" or importlib.util.find_spec("triton") is None:
        return chunk_statistics, chunk_logit_gradient
    return torch.compile(chunk_statistics, dynamic=False), torch.compile(chunk_logit_gradient, dynamic=False)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits h · W^T over a catalog W (V, d), the catalog taken `chunk` items at a
    time: the (N, V) logits never exist at once (a running log-sum-exp), and the backward recomputes each chunk's
    logits. With label smoothing ε, as F.cross_entropy: loss = lse - (1 - ε) z_target - ε · mean_v z_v; rows whose
    target is negative are ignored. The matrix products run in the inputs' dtype (next_item_loss passes bf16 under
    CUDA autocast), the softmax arithmetic in fp32, each chunk's element-wise work fused on CUDA (fused_chunk_ops).
    tests/test_loss.py holds it equal to F.cross_entropy."""

    @staticmethod
    def forward(ctx, hidden, table, targets, smoothing, chunk):
        statistics, _ = fused_chunk_ops(hidden.device.type)
        valid = targets.ge(0)
        safe = targets.clamp(min=0)
        top = None
        for start in range(0, len(table), chunk):
            chunk_top, chunk_total, chunk_sum = statistics(hidden, table[start:start + chunk])
            if top is None:
                top, total, sum_logits = chunk_top, chunk_total, chunk_sum
                continue
            new_top = torch.maximum(top, chunk_top)
            total = total * torch.exp(top - new_top) + chunk_total * torch.exp(chunk_top - new_top)
            top, sum_logits = new_top, sum_logits + chunk_sum
        lse = top + torch.log(total)
        target_logits = (hidden * table[safe]).sum(1).to(lse.dtype)
        rows = lse - (1 - smoothing) * target_logits - smoothing * sum_logits / len(table)
        count = valid.sum().clamp(min=1)
        ctx.save_for_backward(hidden, table, safe, lse, valid, count)
        ctx.smoothing, ctx.chunk = smoothing, chunk
        return (rows * valid).sum() / count

    @staticmethod
    def backward(ctx, grad):
        hidden, table, safe, lse, valid, count = ctx.saved_tensors
        _, logit_gradient = fused_chunk_ops(hidden.device.type)
        eps, n = ctx.smoothing, len(table)
        work = lse.dtype
        weight = (grad * valid / count).to(work)  # d loss / d row
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=work)
        grad_table = torch.zeros(table.shape, device=table.device, dtype=work)
        for start in range(0, n, ctx.chunk):
            part = table[start:start + ctx.chunk]
            p = logit_gradient(hidden, part, lse, weight, eps / n)  # (N, chunk), in the inputs' dtype
            grad_hidden += (p @ part).to(work)
            grad_table[start:start + ctx.chunk] = (p.T @ hidden).to(work)
        target = (1 - eps) * weight[:, None]
        grad_hidden -= target * table[safe].to(work)
        grad_table.index_add_(0, safe, -target * hidden.to(work))
        return grad_hidden.to(hidden.dtype), grad_table.to(table.dtype), None, None, None


# The fused log-sum-exp's Triton kernels (triton_lse below). `tl` is triton.language once they are first used: the
# script imports Triton only then, so that start-up and CPU machines never pay for it.
tl = None
LSE_BLOCKS = (64, 128, 4)  # rows, items and warps of one program of the kernels below


def lse_forward_kernel(h_ptr, w_ptr, top_ptr, total_ptr, N, V, D, span,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """For BLOCK_N rows of h (N, D) and the span of items of w (V, D) that this program's split holds: the running
    maximum and Σ exp(z - maximum) of the logits z = h w^T, read tile by tile from registers (never stored)."""
    rows, split, dims = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), tl.program_id(1), tl.arange(0, BLOCK_D)
    h = tl.load(h_ptr + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
    top = tl.full([BLOCK_N], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, span, BLOCK_V):
        cols = split * span + start + tl.arange(0, BLOCK_V)
        w = tl.load(w_ptr + cols[:, None] * D + dims[None, :], mask=(cols[:, None] < V) & (dims[None, :] < D), other=0.0)
        z = tl.where(cols[None, :] < V, tl.dot(h, tl.trans(w)), float("-inf"))
        new_top = tl.maximum(top, tl.max(z, 1))
        total = total * tl.exp(top - new_top) + tl.sum(tl.exp(z - new_top[:, None]), 1)
        top = new_top
    tl.store(top_ptr + split * N + rows, top, mask=rows < N)
    tl.store(total_ptr + split * N + rows, total, mask=rows < N)


def lse_grad_hidden_kernel(h_ptr, w_ptr, lse_ptr, g_ptr, out_ptr, N, V, D, span,
                           BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """This split's part of d/dh of Σ_n g_n lse_n: Σ_v g_n softmax(z_n)_v w_v over its span of items."""
    rows, split, dims = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N), tl.program_id(1), tl.arange(0, BLOCK_D)
    h = tl.load(h_ptr + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
    g = tl.load(g_ptr + rows, mask=rows < N, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start in range(0, span, BLOCK_V):
        cols = split * span + start + tl.arange(0, BLOCK_V)
        w = tl.load(w_ptr + cols[:, None] * D + dims[None, :], mask=(cols[:, None] < V) & (dims[None, :] < D), other=0.0)
        p = tl.where(cols[None, :] < V, tl.exp(tl.dot(h, tl.trans(w)) - lse[:, None]) * g[:, None], 0.0)
        acc += tl.dot(p.to(w.dtype), w)
    tl.store(out_ptr + split * N * D + rows[:, None] * D + dims[None, :], acc,
             mask=(rows[:, None] < N) & (dims[None, :] < D))


def lse_grad_table_kernel(h_ptr, w_ptr, lse_ptr, g_ptr, out_ptr, N, V, D, span,
                          BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """This split's part of d/dw of Σ_n g_n lse_n for BLOCK_V items: Σ_n g_n softmax(z_n)_v h_n over its span of rows."""
    cols, split, dims = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V), tl.program_id(1), tl.arange(0, BLOCK_D)
    w = tl.load(w_ptr + cols[:, None] * D + dims[None, :], mask=(cols[:, None] < V) & (dims[None, :] < D), other=0.0)
    acc = tl.zeros([BLOCK_V, BLOCK_D], tl.float32)
    for start in range(0, span, BLOCK_N):
        rows = split * span + start + tl.arange(0, BLOCK_N)
        h = tl.load(h_ptr + rows[:, None] * D + dims[None, :], mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0)
        lse = tl.load(lse_ptr + rows, mask=rows < N, other=0.0)
        g = tl.load(g_ptr + rows, mask=rows < N, other=0.0)
        p = tl.where(rows[:, None] < N, tl.exp(tl.dot(h, tl.trans(w)) - lse[:, None]) * g[:, None], 0.0)
        acc += tl.dot(tl.trans(p.to(h.dtype)), h)
    tl.store(out_ptr + split * V * D + cols[:, None] * D + dims[None, :], acc,
             mask=(cols[:, None] < V) & (dims[None, :] < D))


@functools.lru_cache(maxsize=None)
def triton_lse():
    """The three kernels above compiled by Triton (triton.jit on first use), or None where Triton does not import."""
    global tl
    try:
        import triton
        import triton.language
    except ImportError:
        return None
    tl = triton.language
    kernels = (lse_forward_kernel, lse_grad_hidden_kernel, lse_grad_table_kernel)
    return tuple(triton.jit(kernel) for kernel in kernels)


def lse_splits(total, block, other_tiles, programs):
    """(splits, span): the `total` rows or items cut into splits of `span` (a multiple of block), enough that
    other_tiles x splits programs keep every multiprocessor busy (about `programs` of them)."""
    splits = max(1, min(-(-total // block), -(-programs // other_tiles)))
    span = -(-total // (splits * block)) * block
    return -(-total // span), span


class FusedLogSumExp(torch.autograd.Function):
    """lse_n = log Σ_v exp(h_n · w_v) for h (N, d) and a catalog w (V, d), through Triton kernels that form each
    tile of logits in registers and never store it: the forward keeps a running maximum and sum per row, the
    backward recomputes the tiles for d/dh (one pass over the items per block of rows) and for d/dw (one pass
    over the rows per block of items). Products in the inputs' dtype (bf16 under autocast), accumulated and
    exponentiated in fp32. Splits of the items (forward, d/dh) or rows (d/dw) give every multiprocessor work,
    their partial results combined here. tests/test_gpu.py holds it equal to torch.logsumexp."""

    @staticmethod
    def forward(ctx, hidden, table):
        forward_kernel, _, _ = triton_lse()
        (n, d), v = hidden.shape, len(table)
        block_n, block_v, warps = LSE_BLOCKS
        block_d, programs = max(16, 1 << (d - 1).bit_length()), 4 * multiprocessors(hidden.device)
        hidden, table = hidden.contiguous(), table.contiguous()
        splits, span = lse_splits(v, block_v, -(-n // block_n), programs)
        top = torch.empty(splits, n, device=hidden.device, dtype=torch.float32)
        total = torch.empty_like(top)
        forward_kernel[(-(-n // block_n), splits)](hidden, table, top, total, n, v, d, span, BLOCK_N=block_n,
                                                   BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps)
        peak = top.max(0).values
        lse = peak + torch.log((total * torch.exp(top - peak)).sum(0))
        ctx.save_for_backward(hidden, table, lse)
        ctx.sizes = (block_n, block_v, warps, block_d, programs)
        return lse

    @staticmethod
    def backward(ctx, grad):
        hidden, table, lse = ctx.saved_tensors
        _, hidden_kernel, table_kernel = triton_lse()
        block_n, block_v, warps, block_d, programs = ctx.sizes
        (n, d), v = hidden.shape, len(table)
        grad = grad.float().contiguous()
        splits, span = lse_splits(v, block_v, -(-n // block_n), programs)
        grad_hidden = torch.empty(splits, n, d, device=hidden.device, dtype=torch.float32)
        hidden_kernel[(-(-n // block_n), splits)](hidden, table, lse, grad, grad_hidden, n, v, d, span,
                                                  BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps)
        splits, span = lse_splits(n, block_n, -(-v // block_v), programs)
        grad_table = torch.empty(splits, v, d, device=hidden.device, dtype=torch.float32)
        table_kernel[(-(-v // block_v), splits)](hidden, table, lse, grad, grad_table, n, v, d, span,
                                                 BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=warps)
        return grad_hidden.sum(0).to(hidden.dtype), grad_table.sum(0).to(table.dtype)


def multiprocessors(device):
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


@functools.lru_cache(maxsize=None)
def cce_kernel():
    """cut-cross-entropy's fused linear cross-entropy (pip install cut-cross-entropy; Triton, CUDA only) as
    rows(hidden (N, d), table (V, d), targets (N,)) -> per-row loss: logits are formed and reduced on chip and
    recomputed in the backward. Called without its ignore mask (whose nonzero() would sync the host and break
    CUDA-graph capture) and with exact gradients (filter_eps=None). None where it does not import."""
    try:
        cce = import_kernel_module("cut_cross_entropy.cce")
        CCEParams, linear_cross_entropy_apply = cce.CCEParams, cce.linear_cross_entropy_apply
    except Exception:
        return None

    def rows(hidden, table, targets):
        params = CCEParams(targets=targets, valids=None, softcap=None, reduction="none", filter_eps=None,
                           shift=False, batch_shape=targets.shape)
        return linear_cross_entropy_apply(hidden, table, params)
    return rows


def uses_cce(cfg, device):
    """Whether the full softmax goes through cce_kernel: on CUDA, under bf16 autocast (its backward takes half
    precision), when the package imports."""
    usable = (device.type == "cuda" and cce_kernel() is not None and torch.is_autocast_enabled("cuda")
              and torch.get_autocast_dtype("cuda") in (torch.bfloat16, torch.float16))
    if cfg["ce_kernel"] == "cce" and not usable:
        raise ConfigError("--ce_kernel=cce needs a CUDA device, --amp=true and the cut-cross-entropy package "
                          "(pip install cut-cross-entropy); use --ce_kernel=torch")
    return usable and cfg["ce_kernel"] != "torch"


def fused_cross_entropy(hidden, table, targets, smoothing, kernel="cce"):
    """The full-softmax loss of next_item_loss through a fused kernel (targets < 0 carry none): cce_kernel's rows,
    or with kernel="triton" lse - z_target from FusedLogSumExp. Label smoothing ε is added in closed form:
    smoothed row = row + ε (z_target - mean_v z_v), with mean_v z_v = h · mean_v w_v."""
    dtype = torch.get_autocast_dtype("cuda")
    h, w = hidden.to(dtype).contiguous(), table.to(dtype).contiguous()
    valid, safe = targets.ge(0), targets.clamp(min=0)
    rows = FusedLogSumExp.apply(h, w) if kernel == "triton" else cce_kernel()(h, w, safe)
    if kernel == "triton" or smoothing:
        with torch.autocast("cuda", enabled=False):
            target_logits = (h.float() * F.embedding(safe, w).float()).sum(-1)
            if kernel == "triton":
                rows = rows - target_logits
            if smoothing:
                rows = rows + smoothing * (target_logits - h.float() @ w.float().mean(0))
    return (rows * valid).sum() / valid.sum().clamp(min=1)


def loss_path(cfg, n_items, device):
    """Which cross-entropy next_item_loss takes for a catalog of n_items under cfg and the current autocast state:
    triton (FusedLogSumExp), cut-cross-entropy, chunked, torch (F.cross_entropy) or sampled."""
    if cfg["num_negatives"]:
        return "sampled"
    usable = device.type == "cuda" and torch.is_autocast_enabled("cuda") and triton_lse() is not None
    fits = (n_items + 1) * cfg["d_model"] < 2 ** 31  # the kernels index the table with 32-bit offsets
    if cfg["ce_kernel"] == "triton":
        if not usable:
            raise ConfigError("--ce_kernel=triton needs a CUDA device, --amp=true and Triton (it comes with "
                              "PyTorch's CUDA builds); use --ce_kernel=torch")
        if not fits:
            raise ConfigError(f"--ce_kernel=triton indexes the output table with 32-bit offsets: {n_items} items x "
                              f"d_model {cfg['d_model']} is too large; use --ce_kernel=torch (chunked over --ce_chunk)")
        return "triton"
    # auto: on GPUs with bf16 tensor cores (a T4 or V100 keeps the paths below), faster than both of them at every
    # catalog measured (README, Efficiency)
    if cfg["ce_kernel"] == "auto" and usable and fits and torch.cuda.get_device_capability(device)[0] >= 8:
        return "triton"
    chunked = cfg["ce_chunk"] and n_items > cfg["ce_chunk"]
    if uses_cce(cfg, device) and not (chunked and cfg["ce_kernel"] == "auto"):
        return "cut-cross-entropy"  # above ce_chunk the chunked loss is faster (README, Efficiency)
    return "chunked" if chunked else "torch"


def attribute_smoothing_term(hidden, table, targets, neighbours):
    """What attribute smoothing adds to the mean cross-entropy (targets 0 carry none): moving a share ε of the
    target's probability to a distribution q over its attribute neighbours turns the row's loss
    lse - z_t into lse - (1 - ε) z_t - ε Σ_j q_j z_j = (lse - z_t) + ε (z_t - h · c_t), with c_t = Σ_j q_j w_j
    the neighbour vector of t (Recommender.attribute_neighbours); this returns the mean of z_t - h · c_t, in fp32."""
    with torch.autocast(hidden.device.type, enabled=False):
        h = hidden.float()
        gap = (h * F.embedding(targets, table - neighbours).float()).sum(-1)  # lookups (see attribute_neighbours)
        valid = targets.gt(0).to(gap.dtype)
        return (gap * valid).sum() / valid.sum().clamp(min=1)


def next_item_loss(out, table, cfg, item_log_q=None, item_weight=1.0, neighbours=None):
    """Cross-entropy of each state's target (targets 0 carry no loss) plus the model's auxiliary loss: full
    softmax over all items (no host synchronisation, so the step can be captured in a CUDA graph; through the
    fused kernel of ce_kernel, or in chunks of ce_chunk items over a larger catalog), or sampled softmax with
    popularity-sampled negatives and logQ correction (cfg num_negatives > 0). item_weight scales the next-item
    term (0 in attribute pre-training). With neighbours (the model's attribute_neighbours of table),
    attribute_smoothing moves that share of each target's probability to its attribute neighbours."""
    hidden, targets = out.hidden, out.targets
    path = loss_path(cfg, len(table) - 1, hidden.device)
    if path in ("triton", "cut-cross-entropy"):
        loss = fused_cross_entropy(hidden.flatten(0, 1), table[1:], targets.flatten() - 1, cfg["label_smoothing"],
                                   "triton" if path == "triton" else "cce")
    elif path == "chunked":  # products in the autocast dtype: the backward runs outside autocast
        autocast_on = hidden.is_cuda and torch.is_autocast_enabled("cuda")
        dtype = torch.get_autocast_dtype("cuda") if autocast_on else hidden.dtype
        loss = ChunkedCrossEntropy.apply(hidden.flatten(0, 1).to(dtype), table[1:].to(dtype), targets.flatten() - 1,
                                         cfg["label_smoothing"], cfg["ce_chunk"])
    elif path == "torch":
        logits = (hidden @ table[1:].T).flatten(0, 1).float()
        loss = F.cross_entropy(logits, targets.flatten() - 1, ignore_index=-1, label_smoothing=cfg["label_smoothing"])
    else:
        loss = sampled_cross_entropy(hidden, targets, table, item_log_q, cfg)
    if cfg["attribute_smoothing"] and neighbours is not None:
        loss = loss + cfg["attribute_smoothing"] * attribute_smoothing_term(hidden, table, targets, neighbours)
    return out.aux_loss + item_weight * loss


def sampled_cross_entropy(hidden, targets, table, item_log_q, cfg):
    """Sampled softmax: num_negatives popularity-sampled negatives per batch, logQ-corrected."""
    keep = targets.gt(0)
    hidden, targets = hidden[keep], targets[keep]
    negatives = torch.multinomial(item_log_q.exp(), cfg["num_negatives"], replacement=True)
    pos = (hidden * table[targets]).sum(-1, keepdim=True) - item_log_q[targets].unsqueeze(1)
    neg = hidden @ table[negatives].T - item_log_q[negatives]
    neg = neg.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([pos, neg], dim=1).float()
    return F.cross_entropy(logits, torch.zeros_like(targets), label_smoothing=cfg["label_smoothing"])


class WeightAverage:
    """Polyak averaging of a model's parameters: after every optimizer step the average moves toward the weights
    with decay min(1 - 1 / (epochs * steps_per_epoch), (1 + t) / (10 + t)) at update t, so it spans about
    `epochs` epochs and forgets the random start within the first steps. `applied()` swaps it into the model in
    place (a captured CUDA graph keeps its tensors) and back."""

    def __init__(self, model, epochs, steps_per_epoch):
        self.params = [p.detach() for p in model.parameters()]  # the parameters' own storage
        self.decay = 1.0 - 1.0 / max(epochs * steps_per_epoch, 1.0)
        self.reset()

    def reset(self, state=None):
        """Start the average at the model's weights now, or go on from a state_dict() (an interrupted run's)."""
        self.shadow, self.updates = [p.clone() for p in self.params], 0
        if state:
            self.load_state_dict(state)

    @torch.no_grad()
    def update(self):
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, self.params, 1.0 - decay)

    @torch.no_grad()
    def swap(self):
        for p, s in zip(self.params, self.shadow):
            held = p.clone()
            p.copy_(s)
            s.copy_(held)

    @contextlib.contextmanager
    def applied(self):
        """The averaged weights in the model for the block, the trained ones back after it."""
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def state_dict(self):
        return {"updates": self.updates, "shadow": [s.detach().cpu().clone() for s in self.shadow]}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        for s, saved in zip(self.shadow, state["shadow"], strict=True):
            s.copy_(saved)


class EagerStep:
    """One optimisation step: forward, loss, backward, gradient clipping, AdamW (with linear warm-up), and the
    weight average's update when cfg sets weight_average."""

    def __init__(self, model, runner, cfg, item_log_q=None, steps_per_epoch=1, optimizer_options=None):
        self.model, self.runner, self.cfg, self.item_log_q = model, runner, cfg, item_log_q
        self.device, self.steps, self.steps_per_epoch = model_device(model), 0, steps_per_epoch
        self.item_weight = torch.ones((), device=self.device)  # a tensor, so a captured graph sees its changes
        fused = {"fused": True} if self.device.type == "cuda" else {}  # one kernel for all parameters
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                           **(optimizer_options or fused))
        self.average = WeightAverage(model, cfg["weight_average"], steps_per_epoch) if cfg["weight_average"] else None

    def evaluated_weights(self):
        """The weights that validation reads and model selection keeps: the average when there is one."""
        return self.average.applied() if self.average else contextlib.nullcontext()

    def load_optimizer_state(self, state):
        """An optimizer state saved by any step (eager or graphed), keeping this step's own kernel options
        (fused, capturable), which load_state_dict would take from the saved groups."""
        options = {k: v for k, v in self.optimizer.param_groups[0].items() if k in ("fused", "capturable")}
        self.optimizer.load_state_dict(state)
        for group in self.optimizer.param_groups:
            group.update(options)

    def forward_backward(self, batch):
        with autocast(self.cfg, self.device):
            table = self.model.output_table()
            neighbours = self.model.attribute_neighbours(table) if self.cfg["attribute_smoothing"] else None
            loss = next_item_loss(self.runner(batch), table, self.cfg, self.item_log_q, self.item_weight, neighbours)
        loss.backward()
        if self.cfg["grad_clip"] > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg["grad_clip"])
        self.optimizer.step()
        return loss.detach()

    def __call__(self, batch):
        warmup = self.cfg["warmup_epochs"] * self.steps_per_epoch
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg["lr"] * (min(1.0, (self.steps + 1) / warmup) if warmup else 1.0)
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        loss = self.forward_backward(batch)
        if self.average:
            self.average.update()
        return loss


class GraphedStep(EagerStep):
    """The same step captured once as a CUDA graph and replayed, which removes the per-kernel launch cost that
    dominates small recommenders. The batch shape is then fixed: a short last batch is padded with empty rows
    (they carry no loss). Fused, capturable AdamW."""

    def __init__(self, model, runner, cfg, item_log_q=None, steps_per_epoch=1):
        super().__init__(model, runner, cfg, item_log_q, steps_per_epoch, {"fused": True, "capturable": True})
        self.graph = None

    def __call__(self, batch):
        if len(batch.items) < self.cfg["batch_size"]:
            pad = self.cfg["batch_size"] - len(batch.items)
            batch = Batch(*(None if t is None else F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad)) for t in batch))
        if self.graph is None:
            self.capture(batch)
        for static, t in zip(self.static, batch):
            if t is not None:
                static.copy_(t)
        self.graph.replay()
        if self.average:
            self.average.update()
        return self.static_loss.clone()

    def capture(self, batch):
        """Warm up on a side stream, record the step, then restore the weights and optimizer state the
        warm-up changed (a fresh optimizer's state back to zero, a resumed one's to what it was), so training
        starts exactly where the eager path would."""
        saved = {k: v.clone() for k, v in self.model.state_dict().items()}
        before = {p: {k: v.clone() for k, v in st.items() if torch.is_tensor(v)} for p, st in self.optimizer.state.items()}
        self.static = Batch(*(None if t is None else t.clone() for t in batch))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                self.optimizer.zero_grad(set_to_none=True)
                self.forward_backward(self.static)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.static_loss = self.forward_backward(self.static)
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                v.copy_(saved[k])
            for param, state in self.optimizer.state.items():
                for name, t in state.items():
                    if name in before.get(param, {}):
                        t.copy_(before[param][name])
                    else:
                        t.zero_()


def graph_blockers(model, runner, cfg, device):
    """Why the training step cannot be a CUDA graph (empty: it can)."""
    return [why for why, blocked in (
        ("not on CUDA", device.type != "cuda"), ("--cuda_graphs=false", not cfg["cuda_graphs"]),
        ("sampled softmax draws negatives on the host", cfg["num_negatives"] > 0),
        ("DDP wrapper", in_ddp(runner)), ("learning-rate warm-up", cfg["warmup_epochs"] > 0),
        (f"{model.name} changes its state in place", not model.graph_safe)) if blocked]


def in_ddp(runner):
    """Whether runner (a model, or a torch.compile / DDP wrapper of one) trains under DistributedDataParallel."""
    while runner is not None:
        if isinstance(runner, nn.parallel.DistributedDataParallel):
            return True
        runner = getattr(runner, "_orig_mod", None)
    return False


def make_train_step(model, runner, cfg, item_log_q=None, steps_per_epoch=1):
    step = GraphedStep if not graph_blockers(model, runner, cfg, model_device(model)) else EagerStep
    return step(model, runner, cfg, item_log_q, steps_per_epoch)


@dataclass
class FitResult:
    """What training produced: the best weights (by validation NDCG@10) and one history row per evaluation."""
    best_state: dict
    history: list
    train_seconds: float
    world_size: int = 1  # ranks that trained it (DDP)
    graphed: bool = False  # the step was a replayed CUDA graph

    @property
    def best_epoch(self):
        return max(self.history, key=lambda h: h["valid_ndcg@10"])["epoch"]

    @property
    def epochs(self):
        return self.history[-1]["epoch"]

    @property
    def stopped_by(self):
        return self.history[-1]["stopped_by"]


def training_runner(model, cfg, distributed=True):
    """(runner, ranks, this rank): what the training step calls, the model in DistributedDataParallel when
    distributed under torchrun (batch_size is then the global batch and must split over the ranks), and under
    torch.compile when cfg sets compile; (model, 1, 0) in one process without compile."""
    world, rank = world_and_rank() if distributed else (1, 0)
    runner = model
    if world > 1:
        if model.reads_users:  # DDP would broadcast rank 0's bank over the others' at every step
            raise ConfigError(f"{model.name} keeps its per-user memory in one process: run it without torchrun")
        if cfg["batch_size"] % world:
            raise ConfigError(f"--batch_size={cfg['batch_size']} is the global batch and must split evenly over the "
                              f"{world} ranks: give a multiple of {world}")
        device = model_device(model)
        runner = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg["compile"]:
        runner = torch.compile(runner)
    return runner, world, rank


def rank0_decides(value):
    """Rank 0's value on every rank (a small picklable value; unchanged without a process group)."""
    if not torch.distributed.is_initialized():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def fit(model, data, cfg=None, *, distributed=False, desc="train", resume=None, **overrides):
    """Train `model` on data's training windows with AdamW and early stopping on validation NDCG@10; returns a
    FitResult (the model keeps its last weights: load result.best_state for the best). cfg defaults to the
    config the model was built with; keyword overrides change training keys (fit(model, data, epochs=5)).
    With distributed=True under torchrun the model is wrapped in DistributedDataParallel and the recipe stays
    the one-process recipe: batch_size is the global batch, each of the W ranks takes every W-th sequence of
    it (batch_size / W) and DDP averages their gradients, so the steps, their number and the learning rate
    are those of one process. Ctrl-C raises Interrupted with the training state, which `resume` takes back
    to continue after the last finished epoch."""
    cfg = Config(cfg if cfg is not None else model.config).replace(**overrides)
    device = model_device(model)
    windows = TrainingWindows(data, model.input_len, device, cfg["max_len"])
    valid = data.eval_split("valid", model.input_len, excludes_seen(cfg, data), device)
    runner, world, rank = training_runner(model, cfg, distributed)
    step = make_train_step(model, runner, cfg.replace(batch_size=cfg["batch_size"] // world),
                           popularity_log_q(data.item_counts, device), math.ceil(data.n_users / cfg["batch_size"]))
    generator = torch.Generator().manual_seed(torch.initial_seed())
    history, best, best_state, stale, first, train_seconds, earlier = [], -1.0, None, 0, 0, 0.0, 0.0
    if resume is not None:  # continue an interrupted run after its last finished epoch
        model.load_state_dict(resume["model"])
        if resume["optimizer"] is not None:  # None: a warm start (RunStore.warm_start), fresh optimizer
            step.load_optimizer_state(resume["optimizer"])
        history, best, best_state, stale = resume["history"], resume["best"], resume["best_state"], resume["stale"]
        first, train_seconds, earlier = resume["epoch"], resume["train_seconds"], resume["seconds"]
        generator.manual_seed(torch.initial_seed() + first)
        if step.average:  # an interrupted run's average goes on; a warm start's begins at the base's weights
            step.average.reset(resume.get("average"))
    start = time.perf_counter() - earlier
    bar = tqdm(range(first, cfg["epochs"]), desc=desc, leave=False, disable=not is_main_process() or bool(WORKER),
               initial=first, total=cfg["epochs"])
    try:
        for epoch in bar:
            model.train()
            pretraining = epoch < cfg["pretrain_epochs"] and model.has_attribute_objectives
            step.item_weight.fill_(0.0 if pretraining else 1.0)
            epoch_start = time.perf_counter()
            ends = windows.window_ends(cfg["train_window"], generator)
            train_x, train_y = windows.cut(ends)
            order = torch.randperm(len(train_x), generator=generator).to(device)
            total = torch.zeros((), device=device)
            for i in range(0, len(order), cfg["batch_size"]):
                if len(order) - i < world:  # a last batch too short to give every rank a row (at most W - 1 left out)
                    break
                idx = order[i:i + cfg["batch_size"]][rank::world]
                users = (idx, ends[idx] - 1) if model.reads_users else ()  # inputs end one before the window
                total += step(Batch(train_x[idx], train_y[idx], *users))
            if world > 1:  # the history's loss is the mean over all ranks
                torch.distributed.all_reduce(total)
                total /= world
            synchronize(device)
            train_seconds += time.perf_counter() - epoch_start
            if pretraining or ((epoch + 1) % cfg["eval_every"] and epoch + 1 != cfg["epochs"]):
                continue
            with step.evaluated_weights():  # selection keeps the weights that validation read
                metrics = full_ranking_metrics(rank_targets(model, valid, cfg))
                if metrics["ndcg@10"] > best:
                    best, stale, best_state = metrics["ndcg@10"], 0, copy.deepcopy(model.state_dict())
                else:
                    stale += 1
            history.append({"epoch": epoch + 1, "loss": total.item() / step.steps_per_epoch,
                            "valid_ndcg@10": metrics["ndcg@10"], "valid_hr@10": metrics["hr@10"],
                            "train_seconds": train_seconds, "seconds": time.perf_counter() - start})
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", ndcg10=f"{metrics['ndcg@10']:.4f}")
            if not math.isfinite(history[-1]["loss"]):
                raise TrainingError(f"{desc}: the training loss became {history[-1]['loss']} at epoch {epoch + 1}; "
                                    "lower --lr or raise --grad_clip")
            reason = ("patience" if stale >= cfg["patience"] else
                      "time_limit" if cfg["time_limit"] and history[-1]["seconds"] > 60 * cfg["time_limit"] else
                      "stop_at_ndcg" if cfg["stop_at_ndcg"] and metrics["ndcg@10"] >= cfg["stop_at_ndcg"] else None)
            reason = rank0_decides(reason)  # a rank whose clock stopped it alone would leave the others waiting
            history[-1]["stopped_by"] = reason or ("epochs" if epoch + 1 == cfg["epochs"] else "")
            if reason:
                break
    except KeyboardInterrupt:  # keep what was learnt: the weights at the interruption, the best ones, the optimizer
        raise Interrupted({"model": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                           "optimizer": step.optimizer.state_dict(), "best_state": best_state, "history": history,
                           "best": best, "stale": stale, "epoch": history[-1]["epoch"] if history else first,
                           "train_seconds": train_seconds, "seconds": time.perf_counter() - start,
                           "average": step.average.state_dict() if step.average else None}) from None
    return FitResult(best_state, history, train_seconds, world, isinstance(step, GraphedStep))


# =====================================================================================================
# §7 Evaluation: full ranking of every user's target
# =====================================================================================================
def ranks_of_targets(scores, targets):
    """0-based rank of each target among all items (items 1..n in columns 0..n-1); ties count in the
    target's favour only against items with exactly equal score."""
    target_scores = scores.gather(1, (targets - 1).unsqueeze(1))
    return (scores > target_scores).sum(1)


def mask_seen(scores, seen, first):
    """Set to -inf the scores of the items that users first .. first + len(scores) - 1 interacted with
    before their target. A target the user had already seen can then never be ranked in the top k."""
    items, offsets = seen
    last = first + len(scores)
    lengths = (offsets[first + 1:last + 1] - offsets[first:last]).to(scores.device)
    rows = torch.repeat_interleave(torch.arange(len(scores), device=scores.device), lengths)
    scores[rows, items[offsets[first]:offsets[last]] - 1] = float("-inf")
    return scores


def full_ranking_metrics(ranks, ks=METRIC_KS):
    """HR@k, NDCG@k, MRR@k for each k, and MRR over the full ranking, from 0-based target ranks."""
    ranks = ranks.double()
    out = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = hit.double().mean().item()
        out[f"ndcg@{k}"] = (hit / torch.log2(ranks + 2)).mean().item()
        out[f"mrr@{k}"] = (hit / (ranks + 1)).mean().item()
    out["mrr"] = (1.0 / (ranks + 1)).mean().item()
    return out


@torch.no_grad()
def rank_targets(model, split, cfg=None):
    """Full-ranking rank of every user's target in `split` (an EvalSplit on the model's device), batched on
    the device (no per-user loop); the split's seen items are excluded. The model scores each user's last
    state against its whole output table, whatever model it is."""
    cfg = Config(cfg if cfg is not None else model.config)
    model.eval()
    ranks, batch = [], cfg["eval_batch_size"]
    finite = torch.ones((), dtype=torch.bool, device=model_device(model))
    with autocast(cfg, model_device(model)):
        table = model.output_table()[1:]
        for i in range(0, len(split.inputs), batch):
            rows = slice(i, i + batch)
            out = model(Batch(split.inputs[rows], users=split.users[rows], ends=split.ends[rows]))
            scores = exact_scores(out.hidden[:, -1], table)
            finite &= torch.isfinite(scores).all()  # NaN compares false with everything: it would rank first
            if split.seen is not None:
                mask_seen(scores, split.seen, i)
            ranks.append(ranks_of_targets(scores, split.targets[rows]))
    if not finite.item():  # one host sync per evaluation
        raise TrainingError(f"{model.name}'s scores are not finite (NaN or inf): its weights diverged or are corrupt; "
                            "retrain it (lower --lr), or delete the checkpoint it was loaded from")
    return torch.cat(ranks)


def evaluate(model, data, which="test", cfg=None):
    """Full-ranking metrics (HR, NDCG, MRR at 5, 10, 20 and the full MRR) of `model` on data's valid or test
    split; cfg (default: the model's own config) decides exclude_seen and the batch size."""
    cfg = Config(cfg if cfg is not None else model.config)
    split = data.eval_split(which, model.input_len, excludes_seen(cfg, data), model_device(model))
    return full_ranking_metrics(rank_targets(model, split, cfg))


# =====================================================================================================
# §8 Runs, checkpoints and result files
# =====================================================================================================
# A run is one (dataset, model, seed, run hash). A RunStore, passed to every stage, memoises the prepared
# datasets and the finished runs of one invocation; a finished run is a small Run record (identity, metrics,
# history, checkpoint path, per-user ranks), and its module is loaded from the checkpoint only when a stage
# needs it. Result files are written atomically (a unique temporary name in the target folder, then a
# rename) and merged under the folder's lock.
METRIC_COLUMNS = [f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in METRIC_KS] + ["mrr"]
CHECKPOINT_KEYS = {"model", "config", "catalog", "state_dict"}


def safe_name(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a unique temporary path beside `path`; on success it is renamed over `path`, on failure removed.
    A crash therefore never leaves half a file, and two writers never share a temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_csv(path, rows):
    with atomic_path(path) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


def write_json(path, obj):
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, default=float))


def update_json(path, entries):
    """Merge entries into a JSON object file under its folder's lock (other datasets' entries are kept)."""
    path = Path(path)
    with folder_lock(path.parent):
        try:
            old = json.loads(path.read_text()) if path.is_file() and path.stat().st_size else {}
        except ValueError as exc:
            raise DataError(f"{path} is not valid JSON ({exc}); move it away and rerun") from None
        write_json(path, {**old, **entries})


def write_text(path, text):
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save(model, path, **info):
    """Save a model as a self-describing checkpoint: the code version, its name, full config, catalog (item and
    user counts, attribute table and fields), its raw-id index (raw item and user ids, every user's history, the
    data's fingerprint) and weights, plus any JSON-like `info` (metrics, epoch, history). Load it with load() on
    any device (torch.load(path, weights_only=True) reads it too)."""
    catalog = model.catalog
    payload = {"format": "holomambarec", "version": __version__, "model": model.name, "config": dict(model.config),
               "catalog": {"n_items": catalog.n_items, "n_users": catalog.n_users, "n_attributes": catalog.n_attributes,
                           "item_attributes": catalog.item_attributes.cpu(), "n_fields": catalog.n_fields,
                           "attribute_fields": None if catalog.attribute_fields is None else catalog.attribute_fields.cpu(),
                           "item_counts": None if catalog.item_counts is None else catalog.item_counts.cpu()},
               "index": None if model.index is None else model.index.payload(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}, **info}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_weights(model, state_dict, source):
    """load_state_dict with one clear error when the weights do not fit the model."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise DataError(f"{source} does not fit this {model.name} ({first}): it was saved with another config; delete "
                        "it, or run without --resume") from None


def read_checkpoint(path):
    """A checkpoint's payload, read with weights_only=True (a pickle that runs code is refused)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: no such checkpoint") from None
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not a readable HoloMambaRec checkpoint ({type(exc).__name__}: {first}); delete it, "
                        "or run without --resume") from None
    missing = CHECKPOINT_KEYS - set(payload) if isinstance(payload, dict) else CHECKPOINT_KEYS
    if missing:
        raise DataError(f"{path} is an old-format or foreign checkpoint: it lacks {sorted(missing)}; "
                        "retrain it with this version of HoloMambaRec")
    return payload


def load(path, device=None):
    """Rebuild the model saved at `path` (see save) on `device` (default: CUDA when visible), its scan backend
    chosen again for that device; returned in eval mode."""
    payload = read_checkpoint(path)
    device = pick_device("auto" if device is None else str(device))
    cfg = dict(payload["config"])
    if cfg.get("memory_slots") and "memory_writes" not in cfg:
        cfg["memory_writes"] = "all"  # saved before the key existed: the memory wrote every item
    if cfg.get("scan_backend") == "cuda" and pick_scan_backend("auto", device, cfg.get("mixer", "mamba")) != "cuda":
        cfg["scan_backend"] = "auto"  # trained with the CUDA kernel; the parallel scan computes the same here
    with torch.random.fork_rng(devices=[]):  # the random initialisation is overwritten: leave the caller's RNG alone
        model = build_model(payload["model"], Catalog(**payload["catalog"]), cfg, device)
    load_weights(model, payload["state_dict"], path)
    model.index = IdIndex.from_payload(payload["index"]) if payload.get("index") else None
    return model.eval()


@dataclass
class Run:
    """A finished run: identity, how training ended, metrics per split, the learning curve, the checkpoint
    path and the config; `ranks` (per-user target ranks of each split) stays in memory only."""
    dataset: str
    model: str
    seed: int
    config: str  # run_hash of the config
    epochs: int
    stopped_by: str
    best_epoch: int
    train_seconds: float
    scan_backend: str
    metrics: dict
    history: list
    checkpoint: str
    cfg: dict
    data_fingerprint: str = ""
    world_size: int = 1  # ranks that trained it (DDP under torchrun)
    graphed: bool = False  # its training step was a replayed CUDA graph
    ranks: dict = field(default_factory=dict, repr=False)

    @property
    def name(self):
        return run_name(self.dataset, self.model, self.seed, self.config)

    def record(self):
        return {k: v for k, v in self.__dict__.items() if k != "ranks"}


def freeze_base(model, model_name, cfg):
    """warm_start=frozen: only the parameters a memory extension adds to its base model stay trainable."""
    base_name, base_cfg = model_class(model_name).extends(cfg)
    with torch.device("meta"):  # the base's parameter names, without allocating it
        names = set(dict(model_class(base_name)(base_cfg, model.catalog).named_parameters()))
    for name, param in model.named_parameters():
        param.requires_grad_(param.requires_grad and name not in names)


def run_config(model_name, cfg):
    """cfg as model_name's run is hashed: warm_start counts only for a memory extension."""
    cfg = Config(cfg)
    return cfg if model_class(model_name).extends(cfg) else cfg.replace(warm_start="off")


def run_name(dataset, model, seed, tag):
    return safe_name(f"{dataset}_{model}_seed{seed}_{tag}")


class RunStore:
    """The state of one invocation, passed explicitly to every stage: prepared datasets (memoised by their
    data key), finished runs (memoised by identity) and the output folders."""

    def __init__(self, cfg, given=()):
        self.cfg, self.given = Config(cfg), set(given)  # given: the keys the user set (the rest are defaults)
        self.results_dir, self.checkpoint_dir = Path(cfg["results_dir"]), Path(cfg["checkpoint_dir"])
        self.figures_dir, self.grid_csv = Path(cfg["figures_dir"]), Path(cfg["grid_csv"])
        self.resume = cfg["resume"]
        self.datasets, self.runs = {}, {}

    def dataset(self, cfg):
        """cfg['dataset'] read, filtered and indexed once per data key (data-role keys and source files)."""
        files = dataset_files(cfg)
        key = data_key(cfg, files)
        if key not in self.datasets:
            data = self.datasets[key] = read_dataset(cfg, files)
            if cfg["exclude_seen"] == "auto" and is_main_process():
                print(f"[{cfg['dataset']}] exclude_seen=auto -> {str(excludes_seen(cfg, data)).lower()}: "
                      + ("some user repeats an item" if data.has_repeats else "no user repeats an item"), file=sys.stderr)
        return self.datasets[key]

    def run_key(self, cfg, model_name, seed):
        """A run's identity: (dataset, model, seed, hash of cfg as fitted to its data); run_name(*key) names its files."""
        return cfg["dataset"], model_name, seed, run_hash(fitted_config(run_config(model_name, cfg), self.dataset(cfg)))

    def run(self, cfg, model_name, seed, distributed=True, reuse=None):
        """Train (or with resume, reload) model_name on cfg['dataset'] with early stopping on validation, then
        rank the valid and test splits once with the best weights. Saved as a checkpoint and a JSON record. With
        resume, a finished run on the same data is reloaded, and a run cut short by Ctrl-C continues from its
        <name>.partial.pt. reuse=True reloads a finished run whatever --resume says."""
        data = self.dataset(cfg)
        fitted = fitted_config(run_config(model_name, cfg), data)
        if fitted["max_len"] < cfg["max_len"]:
            print(f"[{cfg['dataset']}] max_len={cfg['max_len']} is longer than the longest history: using "
                  f"{fitted['max_len']}", file=sys.stderr)
        cfg, key = fitted, self.run_key(cfg, model_name, seed)
        if key in self.runs:
            return self.runs[key]
        device, tag = pick_device(cfg["device"]), f"[{cfg['dataset']} | {model_name} | seed {seed}]"
        checkpoint = self.checkpoint_dir / f"{run_name(*key)}.pt"
        partial = checkpoint.with_suffix(".partial.pt")
        record_path = self.results_dir / "runs" / f"{run_name(*key)}.json"
        set_seed(seed)
        model = build_model(model_name, data, cfg, device)
        reuse = self.resume if reuse is None else reuse
        stored = self.finished(record_path, checkpoint, data, tag) if reuse else None
        shared = distributed and torch.distributed.is_initialized()  # DDP: every rank holds the same weights
        if stored:
            load_weights(model, read_checkpoint(checkpoint)["state_dict"], checkpoint)
            info = {k: stored[k] for k in ("epochs", "stopped_by", "best_epoch", "train_seconds", "history")}
            info.update({k: stored.get(k, v) for k, v in (("world_size", 1), ("graphed", False))})
            tqdm.write(f"{tag} resumed from {checkpoint}", file=sys.stderr)
        else:
            state = self.interrupted(partial, key, data, tag) if reuse else None
            if state is None and cfg["warm_start"] != "off":
                state = self.warm_start(model, model_name, cfg, seed, distributed)
            if cfg["warm_start"] == "frozen":  # also when a Ctrl-C'd warm start continues
                freeze_base(model, model_name, cfg)
            start = time.perf_counter() - (state["seconds"] if state else 0.0)
            try:
                result = fit(model, data, cfg, distributed=distributed, desc=f"{cfg['dataset']} {model_name} seed {seed}",
                             resume=state)
            except Interrupted as stop:
                if stop.state["best_state"] is not None and (is_main_process() or not shared):
                    with atomic_path(partial) as tmp:
                        torch.save({**stop.state, "run": key[-1], "data_fingerprint": data.index.fingerprint}, tmp)
                    tqdm.write(f"{tag} interrupted after epoch {stop.state['epoch']}: its state is in {partial}; "
                               "the same command with --resume continues it", file=sys.stderr)
                raise
            load_weights(model, result.best_state, checkpoint)
            info = {"epochs": result.epochs, "stopped_by": result.stopped_by, "best_epoch": result.best_epoch,
                    "train_seconds": round(time.perf_counter() - start, 2), "history": result.history,
                    "world_size": result.world_size, "graphed": result.graphed}
        ranks = {split: rank_targets(model, data.eval_split(split, model.input_len, excludes_seen(cfg, data), device), cfg).cpu()
                 for split in ("valid", "test")}
        run = Run(cfg["dataset"], model_name, seed, key[-1], scan_backend=model.scan_backend,
                  metrics={s: full_ranking_metrics(r) for s, r in ranks.items()}, checkpoint=str(checkpoint),
                  cfg=dict(cfg), data_fingerprint=data.index.fingerprint, ranks=ranks, **info)
        if not stored and (is_main_process() or not shared):
            save(model, checkpoint, metrics=run.metrics, epoch=run.best_epoch)
            write_json(record_path, run.record())
            partial.unlink(missing_ok=True)
            tqdm.write(f"{tag} " + " ".join(f"{s} HR@10={m['hr@10']:.4f} NDCG@10={m['ndcg@10']:.4f}"
                                            for s, m in run.metrics.items())
                       + f" ({run.train_seconds:.1f}s, best epoch {run.best_epoch}, stopped by {run.stopped_by})",
                       file=sys.stderr)
        if shared:
            torch.distributed.barrier()  # the checkpoint exists before any rank loads it
        self.runs[key] = run
        return run

    def warm_start(self, model, name, cfg, seed, distributed):
        """The training state that starts a memory extension from its base run (Recommender.extends; trained first
        when missing): the base's weights, the memory's own parameters as initialised (they add nothing, so the
        model is the base), and the base's validation as epoch 0, so that fit keeps the base's weights unless
        the memory beats them on validation (freeze_base then keeps the base's weights for warm_start=frozen)."""
        base_name, base_cfg = model_class(name).extends(cfg)
        base = self.run(base_cfg, base_name, seed, distributed, reuse=True)
        weights, own = read_checkpoint(base.checkpoint)["state_dict"], model.state_dict()
        if set(weights) - set(own):
            raise ConfigError(f"{name} cannot start from {base_name}: it lacks {sorted(set(weights) - set(own))[:3]}")
        model.load_state_dict({**own, **weights})
        set_seed(seed)  # the same fine-tuning whether the base was trained or reloaded just now
        data = self.dataset(cfg)
        valid = data.eval_split("valid", model.input_len, excludes_seen(cfg, data), model_device(model))
        metrics = full_ranking_metrics(rank_targets(model, valid, cfg))
        loss = next(h["loss"] for h in base.history if h["epoch"] == base.best_epoch)
        tqdm.write(f"[{cfg['dataset']} | {name} | seed {seed}] starts from {base.name} ({cfg['warm_start']}): "
                   f"valid NDCG@10={metrics['ndcg@10']:.4f}", file=sys.stderr)
        row = {"epoch": 0, "loss": loss, "valid_ndcg@10": metrics["ndcg@10"], "valid_hr@10": metrics["hr@10"],
               "train_seconds": 0.0, "seconds": 0.0, "stopped_by": ""}
        return {"model": model.state_dict(), "optimizer": None, "history": [row], "best": metrics["ndcg@10"],
                "best_state": copy.deepcopy(model.state_dict()), "stale": 0, "epoch": 0, "train_seconds": 0.0,
                "seconds": 0.0}

    def run_all(self, specs):
        """self.run of every (cfg, model_name, seed) in specs, in their order. With --jobs=N > 1 (not under
        torchrun) the runs not held yet train first, N at a time, in worker processes (in_workers); a memory
        extension that starts from its base run (warm_start) waits until the bases have trained."""
        if self.cfg["jobs"] > 1 and not torch.distributed.is_initialized():
            waves = {}  # run key -> (wave, spec): bases and plain runs first, then the extensions
            for cfg, name, seed in specs:
                base = cfg["warm_start"] != "off" and model_class(name).extends(cfg)
                if base:
                    waves.setdefault(self.run_key(base[1], base[0], seed), (0, (base[1], base[0], seed)))
                waves.setdefault(self.run_key(cfg, name, seed), (int(bool(base)), (cfg, name, seed)))
            for wave in (0, 1):
                todo = {key: spec for key, (w, spec) in waves.items() if w == wave and key not in self.runs}
                self.runs.update(zip(todo, in_workers(self, train_run, list(todo.values()))))
        return [self.run(cfg, name, seed) for cfg, name, seed in specs]

    @staticmethod
    def finished(record_path, checkpoint, data, tag):
        """The stored record of a finished run on the same data, or None (then it is trained)."""
        if not (record_path.is_file() and checkpoint.is_file()):
            return None
        try:
            stored = json.loads(record_path.read_text())
        except ValueError as exc:
            raise DataError(f"{record_path} is not a readable run record ({exc}); delete it (and {checkpoint.name}) "
                            "to train the run again, or run without --resume") from None
        if stored.get("data_fingerprint") != data.index.fingerprint:
            tqdm.write(f"{tag} not resumed: {checkpoint} was trained on other data (its fingerprint differs); "
                       "training again", file=sys.stderr)
            return None
        return stored

    @staticmethod
    def interrupted(partial, key, data, tag):
        """The training state a Ctrl-C left in <name>.partial.pt for this run and data, or None."""
        if not partial.is_file():
            return None
        try:
            state = torch.load(partial, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise DataError(f"{partial} is not a readable training state ({type(exc).__name__}); delete it to "
                            "train the run from the start") from None
        if state.get("run") != key[-1] or state.get("data_fingerprint") != data.index.fingerprint:
            return None
        tqdm.write(f"{tag} continuing from {partial} after epoch {state['epoch']}", file=sys.stderr)
        return state

    def model(self, run, device=None):
        """The best weights of a finished run, loaded from its checkpoint (kept only while the caller holds it)."""
        return load(run.checkpoint, run.cfg["device"] if device is None else device)


WORKER = {}  # in a worker process of in_workers: its index and its RunStore, kept between items


def in_workers(store, fn, items, desc="runs"):
    """[fn(store, item) for item in items], computed in min(--jobs, len(items)) worker processes at once. Each
    worker is spawned (a fresh interpreter: CUDA cannot be forked), builds its own RunStore of store's config,
    keeps it between items, and takes the visible GPUs in turn (they share one GPU where there is one). A bar
    counts finished items, and each run prints its line when it ends. A Ctrl-C, or an error in one item, stops
    every worker as a Ctrl-C stops a run in this process (its training state saved for --resume), cancels the
    items not started, and is raised here once the workers are done."""
    if store.cfg["jobs"] == 1 or len(items) <= 1:
        return [fn(store, item) for item in tqdm(items, desc=desc, disable=not is_main_process() or len(items) <= 1)]
    context = multiprocessing.get_context("spawn")
    count, results = context.Value("i", 0), [None] * len(items)
    jobs = min(store.cfg["jobs"], len(items))
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=start_worker,
                                                initargs=(count, dict(store.cfg), sorted(store.given))) as pool:
        futures = {pool.submit(call_in_worker, fn, item): i for i, item in enumerate(items)}
        try:
            for future in tqdm(concurrent.futures.as_completed(futures), total=len(items), desc=f"{desc} ({jobs} jobs)"):
                results[futures[future]] = future.result()
        except BaseException:
            for child in multiprocessing.active_children():  # a worker already interrupted ignores it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGINT)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return results


def start_worker(count, cfg, given):
    """A worker process of in_workers: its index, its GPU (index modulo the visible ones when the device is
    auto or cuda), its share of the CPU threads on the CPU, and its RunStore."""
    with count.get_lock():
        WORKER["index"], count.value = count.value, count.value + 1
    signal.signal(signal.SIGINT, interrupt_worker)
    device = pick_device(cfg["device"])
    if device.type == "cuda" and device.index is None:
        torch.cuda.set_device(WORKER["index"] % torch.cuda.device_count())
    elif device.type == "cpu":
        torch.set_num_threads(max(1, torch.get_num_threads() // cfg["jobs"]))
    WORKER["store"] = RunStore(cfg, given)


def interrupt_worker(*_):
    """A worker's first SIGINT (the terminal's Ctrl-C, or in_workers stopping it) interrupts what it runs; later
    ones are ignored, so that a second signal cannot cut the saving of a run's state short, and the items
    still queued to it are skipped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    WORKER["stopped"] = True
    raise KeyboardInterrupt


def call_in_worker(fn, item):
    if WORKER.get("stopped"):
        raise KeyboardInterrupt
    return fn(WORKER["store"], item)


def train_run(store, spec):
    """One (cfg, model_name, seed) of run_all, trained (or reloaded) in a worker."""
    cfg, name, seed = spec
    if WORKER:  # (a lone item runs in the calling process)
        where = f"cuda:{torch.cuda.current_device()}" if pick_device(cfg["device"]).type == "cuda" else "cpu"
        tqdm.write(f"[{cfg['dataset']} | {name} | seed {seed}] worker {WORKER['index']} ({where})", file=sys.stderr)
    return store.run(cfg, name, seed)


def metric_rows(run, **extra):
    """One results row per split of a run: dataset, model, seed, split, metrics, and provenance."""
    return [{"dataset": run.dataset, "model": run.model, "seed": run.seed, "split": split,
             **{c: round(m[c], 6) for c in METRIC_COLUMNS}, **extra, "config": run.config,
             "exclude_seen": run.cfg["exclude_seen"],
             "epochs": run.epochs, "stopped_by": run.stopped_by, "best_epoch": run.best_epoch,
             "train_seconds": run.train_seconds}
            for split, m in run.metrics.items()]


def append_csv_row(path, row):
    """Append one row to a CSV log under its lock. A plain append writes one whole line and syncs it; a row with
    columns the file lacks (another grid), or a torn last line left by a crash mid-append, makes the file be
    rewritten atomically (temporary file, rename) with the union of the columns, older rows blank there. So the
    log is only ever appended to or atomically replaced, and a crash loses at most the row being written.
    A writer killed mid-rewrite leaves its temporary file; every writer holds the lock, so the next one removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        for stale in path.parent.glob(f".{path.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        text = path.read_text() if path.is_file() else ""
        torn = bool(text) and not text.endswith("\n")
        if torn:
            text = text[:text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text))
        old, header = list(reader), list(reader.fieldnames or [])
        columns = header + [c for c in row if c not in header]
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns)
        if columns != header or torn:
            writer.writeheader()
            writer.writerows(old)
            writer.writerow(row)
            with atomic_path(path) as tmp:
                tmp.write_text(out.getvalue())
        else:
            writer.writerow(row)
            with open(path, "a", newline="") as fh:
                fh.write(out.getvalue())
                fh.flush()
                os.fsync(fh.fileno())


def read_log(path):
    """The rows of an append-only CSV log (empty when it is missing); a torn last line is left out."""
    path = Path(path)
    text = path.read_text() if path.is_file() else ""
    text = text if text.endswith("\n") or not text else text[:text.rfind("\n") + 1]
    if not text.strip():
        return pd.DataFrame(columns=["trial", "dataset"])
    try:
        return pd.read_csv(io.StringIO(text), dtype={"trial": str})
    except (pd.errors.ParserError, ValueError) as exc:
        raise DataError(f"{path} is not a readable CSV ({exc}); move it away (its trials would be trained again)") from None


def claim_trial(log_path, trial):
    """Claim a grid trial before training it, so that processes sharing one grid log never train a trial twice:
    True when this process may train it (it is not in the log yet, and nobody claimed it or its claimant was a
    process of this machine that is gone, e.g. a killed rank). Claims live beside the log in <log>.claims."""
    claims, me = Path(f"{log_path}.claims"), (socket.gethostname(), os.getpid())
    claims.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{claims}.lock"):
        if trial in set(read_log(log_path)["trial"].astype(str)) or claimed_elsewhere(log_path, trial):
            return False  # finished (by another process since this one read the log), or another's to train
        with open(claims, "a") as fh:
            fh.write(f"{trial},{me[0]},{me[1]}\n")
    return True


def wait_for_trial(log_path, trial, poll=5.0):
    """Return once trial is finished in the log or nobody alive holds its claim (then the caller may train it)."""
    said = False
    while trial not in set(read_log(log_path)["trial"].astype(str)) and claimed_elsewhere(log_path, trial):
        if not said:
            tqdm.write(f"waiting for {trial}, which another process is training", file=sys.stderr)
            said = True
        time.sleep(poll)


def claimed_elsewhere(log_path, trial):
    """Whether another live process of this machine, or any process of another machine, claimed trial."""
    claims, me = Path(f"{log_path}.claims"), (socket.gethostname(), os.getpid())
    lines = claims.read_text().splitlines() if claims.is_file() else []
    for line in lines:
        key, host, pid = line.rsplit(",", 2)
        if key == trial and (host, int(pid)) != me and (host != me[0] or process_alive(int(pid))):
            return True
    return False


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def markdown_table(df, columns):
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns) + " |\n"
                   for _, r in df.iterrows())
    return head + body


def summarise(rows):
    """Mean ± std over seeds per (dataset, model, config, split): runs of different configs are never pooled."""
    df = pd.DataFrame(rows).astype({"config": str})
    cols, keys = ["hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"], ["dataset", "model", "config", "split"]
    agg = df.groupby(keys, sort=False)[cols].agg(["mean", "std"]).fillna(0.0)
    out = agg.xs("mean", axis=1, level=1).copy()
    for c in cols:
        out[c] = [f"{m:.4f} ± {s:.4f}" for m, s in zip(agg[(c, "mean")], agg[(c, "std")])]
    out["seeds"] = df.groupby(keys, sort=False)["seed"].nunique()
    return out.reset_index()


@contextlib.contextmanager
def folder_lock(folder):
    """An exclusive lock on a folder (a lock file in it, through filelock, which works on every OS), so that
    processes sharing a results folder take turns to read, merge and rewrite its files."""
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(folder / ".lock"):
        yield


def read_results(path):
    """A results CSV (empty when missing or zero bytes); an unreadable one is a DataError naming it."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    try:
        return pd.read_csv(path, dtype={"config": str})
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not a readable CSV ({type(exc).__name__}: {exc}); move it away and rerun") from None


def upsert_csv(path, rows, key, derive=None):
    """Merge rows into a CSV, replacing earlier rows with the same key columns; written atomically, under
    the folder's lock, so concurrent runs writing to one results folder lose no rows. derive(table) -> table
    may add columns computed across the merged rows before it is written."""
    path = Path(path)
    new = pd.DataFrame(rows)
    with folder_lock(path.parent):
        old = read_results(path)
        if len(old):
            old = old.reindex(columns=list(old.columns) + [c for c in key if c not in old.columns])
            keys = set(map(tuple, new[key].astype(str).to_numpy()))
            old = old[[tuple(r) not in keys for r in old[key].astype(str).to_numpy()]]
            new = pd.concat([old, new], ignore_index=True)
        if derive is not None:
            new = derive(new)
        write_csv(path, new.to_dict("records"))
    return new


# =====================================================================================================
# §9 Stages: stage(store, configs) -> rows
# =====================================================================================================
# `configs` holds one resolved Config per dataset of the invocation; store.cfg is the invocation's own
# (dataset-less) config. A stage asks the store for the runs it needs (shared between stages through the
# store), writes its results as files, and leaves figures to §10.
PAPER_SEQUENCE = ("benchmark", "ablation", "grid", "compression")
MEMORY_STAGE_SLOTS = 8  # memory stage: slots of the window + memory variant when --memory_slots is 0


def seeds(cfg):
    return as_list(cfg["seeds"], int)


def record_runs(store, runs, name, preset):
    """Upsert the runs' metric rows into results/<name>.csv and their learning curves into history.csv."""
    rows = [r for run in runs for r in metric_rows(run, preset=preset)]
    table = upsert_csv(store.results_dir / f"{name}.csv", rows, ["dataset", "model", "seed", "split", "preset", "config"])
    curves = [{"dataset": run.dataset, "model": run.model, "seed": run.seed, "preset": preset, "config": run.config, **h}
              for run in runs for h in run.history]
    upsert_csv(store.results_dir / "history.csv", curves, ["dataset", "model", "seed", "preset", "config", "epoch"])
    return table


def benchmark_stage(store, configs):
    """Every model of cfg['models'] on every dataset and seed; results/benchmark.csv, accuracy.csv, .md, and
    slices.csv (test metrics of every run on all users, short-history users and rarely seen target items)."""
    runs = store.run_all([(cfg, m, s) for cfg in configs for m in as_list(cfg["models"]) for s in seeds(cfg)])
    if not is_main_process():  # under DDP every rank holds the same runs; one writes them
        return [r for run in runs for r in metric_rows(run)]
    preset = store.cfg["preset"]
    record_runs(store, runs, "benchmark", preset)
    slices = [dict(row, seed=run.seed, preset=preset, config=run.config) for cfg in configs
              for run in runs if run.dataset == cfg["dataset"]
              for row in cold_start_rows(cfg, store.dataset(cfg), [run])]
    upsert_csv(store.results_dir / "slices.csv", slices, ["dataset", "model", "seed", "preset", "config", "slice"])
    with folder_lock(store.results_dir):  # the summaries of every process's rows, not of this process's view
        print(write_summaries(store.results_dir, read_results(store.results_dir / "benchmark.csv"), preset))
    return [r for run in runs for r in metric_rows(run)]


def write_summaries(results_dir, table, preset):
    """accuracy.csv (the preset's rows of benchmark.csv: dataset, model, config, seed, split, metrics) and
    benchmark_<preset>.md (mean ± std over seeds of each dataset, model and config). Returns the Markdown."""
    table = table[table["preset"] == preset]
    write_csv(results_dir / "accuracy.csv", table[["dataset", "model", "config", "seed", "split"]
                                                  + [c for c in METRIC_COLUMNS if "mrr@" not in c]].to_dict("records"))
    summary = summarise(table.to_dict("records"))
    text = (f"# Benchmark (preset `{preset}`, mean ± std over seeds; config = run hash)\n\n"
            + markdown_table(summary, ["dataset", "model", "config", "split", "hr@10", "hr@20", "ndcg@10", "ndcg@20",
                                       "mrr", "seeds"]))
    write_text(results_dir / f"benchmark_{preset}.md", text)
    return text


def ablation_stage(store, configs):
    """Holographic binding vs the item-only Mamba on every dataset and seed; results/ablation.csv."""
    runs = store.run_all([(cfg, m, s) for cfg in configs for m in ("HoloMamba", "Mamba-ItemOnly") for s in seeds(cfg)])
    if is_main_process():
        record_runs(store, runs, "ablation", store.cfg["preset"])
    return [r for run in runs for r in metric_rows(run)]


def parse_grid(text):
    """--grid="key=v1,v2;key=v1" -> {key: [values]} typed like GLOBAL_CONFIG. Only keys that change a trained
    model (data, model and training roles, not the dataset itself) can be searched, each once."""
    grid = {}
    for part in filter(str.strip, text.split(";")):
        key, sep, values = part.strip().partition("=")
        key = key.strip()
        if not sep or not as_list(values):
            raise ConfigError(f"--grid: '{part}' is not key=value1,value2")
        if key not in GLOBAL_CONFIG:
            raise ConfigError(f"--grid: unknown config key '{key}' (python HoloMambaRec.py --help lists the keys)")
        if CONFIG_TABLE[key].role not in HASHED_ROLES or key == "dataset":
            raise ConfigError(f"--grid: '{key}' is a {CONFIG_TABLE[key].role} key; a grid searches data, model and "
                              "training keys")
        if key in grid:
            raise ConfigError(f"--grid: '{key}' appears twice")
        grid[key] = [coerce(key, v) for v in as_list(values)]
    if not grid:
        raise ConfigError("--grid is empty: give key=v1,v2;key=v1,...")
    return grid


def grid_trials(cfg):
    grid = parse_grid(cfg["grid"])
    trials = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    return trials[:cfg["grid_max_trials"]] if cfg["grid_max_trials"] else trials


def grid_stage(store, configs):
    """HoloMamba over the grid on every dataset (first seed). Each finished trial is appended to grid_csv at
    once, so a crash loses nothing and a rerun skips finished trials. Under torchrun, with --jobs, or in several
    processes sharing one grid log, each process takes the next trial nobody has claimed, so the trials are dealt
    out as the processes free up and a killed process's unfinished trial is taken again by a rerun. Selection is
    on validation NDCG@10; test is reported beside it."""
    best, path = {}, store.grid_csv
    # ranks wait for the slowest one's last trial, which may take hours: a CPU group that waits that long
    patient = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(days=7)) \
        if torch.distributed.is_initialized() else None
    for cfg in configs:
        dataset = cfg["dataset"]
        done = set(read_log(path)["trial"].astype(str))
        todo = [(cfg, trial) for trial in grid_trials(cfg) if grid_key(store, cfg, trial) not in done]
        in_workers(store, grid_trial, todo, desc=f"grid {dataset}")
        if patient is not None:
            torch.distributed.barrier(group=patient)
        table = read_log(path)
        table = table[(table["dataset"] == dataset) & table.get("valid_ndcg@10", pd.Series(dtype=float)).notna()]
        if len(table):
            top = table.loc[table["valid_ndcg@10"].idxmax()]
            best[dataset] = {k: (v.item() if hasattr(v, "item") else v) for k, v in top.items() if pd.notna(v)}
    if is_main_process():
        update_json(store.results_dir / "grid_best.json", best)
        for dataset, row in best.items():
            print(f"grid best on {dataset} (by validation NDCG@10): "
                  + ", ".join(f"{k}={row[k]}" for k in parse_grid(store.cfg["grid"]) if k in row)
                  + f"  valid NDCG@10={row['valid_ndcg@10']:.4f}")
    return list(best.values())


def grid_key(store, cfg, trial):
    return f"{cfg['dataset']}|{store.run_key(cfg.replace(**trial), 'HoloMamba', 0)[-1]}"  # = its run's hash


def grid_trial(store, spec):
    """One trial (cfg, {key: value}) of the grid stage, unless another process claimed it: trained on the first
    seed and appended to the grid log with its validation and test metrics, or with its error."""
    cfg, trial = spec
    path, key = store.grid_csv, grid_key(store, cfg, trial)
    if not claim_trial(path, key):
        return
    try:
        run = store.run(cfg.replace(**trial), "HoloMamba", seeds(cfg)[0], distributed=False)
    except TrainingError as exc:  # recorded, so that a rerun skips it instead of dying at it again
        append_csv_row(path, {"trial": key, "dataset": cfg["dataset"], **trial, "error": str(exc)})
        tqdm.write(f"grid trial {trial} failed: {exc}", file=sys.stderr)
        return
    append_csv_row(path, {"trial": key, "dataset": cfg["dataset"], **trial,
                          **{f"valid_{c}": round(run.metrics["valid"][c], 6) for c in ("hr@10", "ndcg@10", "mrr")},
                          **{f"test_{c}": round(run.metrics["test"][c], 6) for c in ("hr@10", "ndcg@10", "mrr")},
                          "best_epoch": run.best_epoch, "epochs": run.epochs, "stopped_by": run.stopped_by,
                          "train_seconds": run.train_seconds})


class PeakMemory:
    """Peak memory of a block: GPU max_memory_allocated, or the process's peak RSS (VmHWM, reset first).
    added_mb is the GPU peak above what was allocated on entry: the working memory of the block itself."""

    def __init__(self, device):
        self.device, self.mb, self.added_mb = device, float("nan"), float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.added_mb = self.mb - self.base / 2**20
        else:
            with contextlib.suppress(OSError, StopIteration):
                status = Path("/proc/self/status").read_text().splitlines()
                self.mb = int(next(x for x in status if x.startswith("VmHWM")).split()[1]) / 1024
        return False


def timed(fn, device, repeats=5, warmup=1):
    """Median wall seconds of fn() over repeats, after warm-up (CUDA synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def compression_stage(store, configs):
    """Accuracy / latency / memory of temporal bundling windows k on long histories, untrained (the model
    trained without bundling meets bundled input at inference, as in the paper) and trained (bundle_k = k
    in training), plus the cold-start slices (short-history users, rarely seen target items) of every
    benchmark model. Writes results/compression.csv and results/cold_start.csv."""
    rows, cold = [], []
    for cfg in configs:
        seed, data = seeds(cfg)[0], store.dataset(cfg)
        plain = store.model(store.run(cfg.replace(bundle_k=1), "HoloMamba", seed))
        for k in as_list(cfg["bundle_windows"], int):
            rows.append(bundling_row(plain, cfg, data, k, "untrained" if k > 1 else "none"))
            if k > 1:
                trained = store.model(store.run(cfg.replace(bundle_k=k), "HoloMamba", seed))
                rows.append(bundling_row(trained, cfg, data, k, "trained"))
        cold += cold_start_rows(cfg, data, [store.run(cfg, m, seed) for m in as_list(cfg["models"])])
    upsert_csv(store.results_dir / "compression.csv", rows, ["dataset", "model", "k", "bundling", "history_len"])
    upsert_csv(store.results_dir / "cold_start.csv", cold, ["dataset", "model", "slice"])
    print(pd.DataFrame(rows).to_string(index=False))
    print(pd.DataFrame(cold).to_string(index=False))
    return rows + cold


def bundling_row(model, cfg, data, k, training):
    """Test accuracy, latency of ranking every user, tokens/s and peak memory of `model` reading the last
    compression_len items bundled by k."""
    device = model_device(model)
    split = data.eval_split("test", cfg["compression_len"], excludes_seen(cfg, data), device)

    def rank_all():
        with model.bundling(k):
            return rank_targets(model, split, cfg)

    with PeakMemory(device) as peak:
        metrics = full_ranking_metrics(rank_all().cpu())
    seconds = timed(rank_all, device, repeats=3)
    return {"dataset": data.name, "model": model.name, "k": k, "bundling": training,
            "history_len": cfg["compression_len"], "tokens_per_user": math.ceil(cfg["compression_len"] / k),
            "hr@10": metrics["hr@10"], "ndcg@10": metrics["ndcg@10"], "mrr": metrics["mrr"],
            "latency_ms": 1000 * seconds, "tokens_per_s": len(split.inputs) * cfg["compression_len"] / seconds,
            "ranking_mem_mb": peak.added_mb if device.type == "cuda" else peak.mb, "device": str(device)}


def cold_start_rows(cfg, data, runs):
    """Test metrics of each run on the cold slices, from its stored per-user ranks."""
    lengths = data.train_lengths()
    short = lengths <= torch.quantile(lengths.double(), cfg["cold_user_fraction"]).item()
    rare = data.item_counts[data.eval_split("test", 1, exclude_seen=False).targets] <= cfg["cold_item_max_count"]
    slices = {"short-history users": short, "rare target items": rare}
    return [dict(row, model=run.model) for run in runs for row in slice_metrics(run, data.name, slices)]


def slice_metrics(run, dataset, slices):
    """Test HR@10, NDCG@10 and MRR of a run on all users and on each non-empty slice (boolean user masks),
    from the per-user ranks it stored: no re-evaluation."""
    ranks = run.ranks["test"]
    slices = {"all users": torch.ones_like(ranks, dtype=torch.bool), **slices}
    rows = []
    for name, mask in slices.items():
        if mask.any():
            m = full_ranking_metrics(ranks[mask])
            rows.append({"dataset": dataset, "slice": name, "users": int(mask.sum()),
                         "hr@10": m["hr@10"], "ndcg@10": m["ndcg@10"], "mrr": m["mrr"]})
    return rows


def efficiency_stage(store, configs):
    """Training throughput, peak memory, batch inference latency and streaming step latency of HoloMamba,
    SASRec and GRU4Rec across sequence lengths; full vs sampled softmax across catalog sizes; and the ML-1M
    epoch time and time to validation NDCG@10 >= efficiency_target_ndcg when ML-1M is among the datasets.
    results/efficiency*.csv."""
    cfg = store.cfg
    device = pick_device(cfg["device"])
    rows, catalog = [], []  # each row is written as soon as it is measured: a stage cut short keeps what it finished
    others = [m for m in dict.fromkeys(as_list(cfg["efficiency_mixers"])) if m != cfg["mixer"]]
    variants = [("HoloMamba", "HoloMamba", cfg)]  # (row label, model, config): the config's mixer, then the others
    variants += [(f"HoloMamba ({MIXER_LABELS[m]})", "HoloMamba", cfg.replace(mixer=m)) for m in others]
    variants += [("SASRec", "SASRec", cfg), ("GRU4Rec", "GRU4Rec", cfg)]
    for length in tqdm(as_list(cfg["efficiency_lengths"], int), desc="efficiency"):
        batch = min(cfg["efficiency_batch"], max(1, cfg["efficiency_tokens"] // length))
        for label, name, variant in variants:
            key = {"model": label, "max_len": length, "batch": batch, "device": str(device)}
            rows.append({**measured_or_skipped(key, measure_model, name,
                                               variant.replace(max_len=length, efficiency_batch=batch), device),
                         "model": label})
            upsert_csv(store.results_dir / "efficiency.csv", rows[-1:], ["model", "max_len", "batch", "device"])
    for n in as_list(cfg["efficiency_catalogs"], int):
        for negatives in (0, cfg["efficiency_negatives"]):
            key = {"n_items": n, "softmax": "full" if negatives == 0 else f"sampled ({negatives})", "device": str(device)}
            catalog.append(measured_or_skipped(key, measure_catalog, cfg.replace(max_len=50, num_negatives=negatives),
                                               n, device))
            upsert_csv(store.results_dir / "efficiency_catalog.csv", catalog[-1:], ["n_items", "softmax", "device"])
    print(pd.DataFrame(rows).to_string(index=False))
    print(pd.DataFrame(catalog).to_string(index=False))
    for dataset_cfg in configs:
        if dataset_cfg["dataset"] == "ml-1m":
            time_to_quality(store, dataset_cfg, device)
    return rows + catalog


def measured_or_skipped(key, measure, *args):
    """measure(*args) as a row, or the row's key with the reason it was skipped (out of memory): a setting that
    does not fit never ends the stage."""
    try:
        return {**key, **measure(*args), "skipped": ""}
    except (torch.OutOfMemoryError, MemoryError) as exc:
        reason = f"out of memory: {(str(exc).strip().splitlines() or [''])[0][:160]}"
    except RuntimeError as exc:
        if "out of memory" not in str(exc).lower():
            raise
        reason = f"out of memory: {str(exc).strip().splitlines()[0][:160]}"
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"efficiency: skipped {key}: {reason}", file=sys.stderr)
    return {**key, "skipped": reason}


def time_to_quality(store, cfg, device):
    """HoloMamba under the dataset's config: seconds per training epoch, seconds to rank all users on validation,
    and wall seconds until validation NDCG@10 first reaches efficiency_target_ndcg."""
    threshold = cfg["efficiency_target_ndcg"]
    cfg = cfg.replace(stop_at_ndcg=threshold)
    run = store.run(cfg, "HoloMamba", seeds(cfg)[0])
    last = run.history[-1]
    reached = next((h for h in run.history if h["valid_ndcg@10"] >= threshold), None)
    model = store.model(run, device)
    split = store.dataset(cfg).eval_split("valid", model.input_len, excludes_seen(cfg, store.dataset(cfg)), device)
    summary = {"device": str(device), "scan_backend": run.scan_backend, "epochs": last["epoch"],
               "ml1m_epoch_seconds": last["train_seconds"] / last["epoch"],
               "ml1m_eval_all_users_seconds": timed(lambda: rank_targets(model, split, cfg), device),
               f"seconds_to_valid_ndcg10_{threshold}": reached["seconds"] if reached else None}
    write_json(store.results_dir / "efficiency_ml1m.json", summary)
    print(json.dumps(summary))
    return summary


def fake_batch(n_items, batch, length, device, generator=None):
    seq = torch.randint(1, n_items + 1, (batch, length + 1), generator=generator).to(device)
    return Batch(seq[:, :-1], seq[:, 1:])


STREAM_USERS = 4096  # users stepped at once for the streaming throughput (events / s) of recurrent models


def measure_model(name, cfg, device):
    """One row of the efficiency table for one model at one sequence length (catalog of efficiency_items)."""
    set_seed(0)
    n_items = cfg["efficiency_items"]
    model = build_model(name, catalog_only(n_items), cfg, device)
    batch = fake_batch(n_items, cfg["efficiency_batch"], cfg["max_len"], device)
    train_s, peak_mb = measure_training(model, cfg, batch)
    model.eval()
    with torch.no_grad(), autocast(cfg, device):
        infer_s = timed(lambda: model.score_next(Batch(batch.items)), device, repeats=3)
        step_ms = streaming_step_ms(model, batch.items[:1], device)
        many = torch.randint(1, n_items + 1, (STREAM_USERS, 2), device=device)
        events_per_s = STREAM_USERS * 1000 / streaming_step_ms(model, many, device) if model.recurrent else None
    return {"model": name, "max_len": cfg["max_len"], "batch": cfg["efficiency_batch"], "device": str(device),
            "mixer": cfg["mixer"] if model.scan_backend else "",
            "scan_backend": model.scan_backend, "compiled": cfg["compile"],
            "train_seqs_per_s": cfg["efficiency_batch"] / train_s,
            "train_step_ms": 1000 * train_s, "train_peak_mem_mb": peak_mb,
            "peak_kb_per_token": 1024 * peak_mb / (cfg["efficiency_batch"] * cfg["max_len"]),
            "batch_infer_ms": 1000 * infer_s, "stream_step_ms": step_ms, "stream_events_per_s": events_per_s,
            "stream_mode": "recurrent state" if model.recurrent else "recompute window"}


def streaming_step_ms(model, history, device, steps=20, users=None, ends=None):
    """Median latency of scoring one new interaction for each of the len(history) users: a recurrent O(1) step
    for models with a state (one replayed CUDA graph on CUDA, the eager step elsewhere), a forward over the
    whole window otherwise (with users and ends, a reads_users model reads its bank). The state is prefilled
    with the last 64 items: a step costs the same after any history."""
    if not model.recurrent:
        batch = Batch(history, users=users, ends=ends)
        return 1000 * timed(lambda: model.score_next(batch), device, repeats=steps)
    if device.type == "cuda":
        step = GraphedStream(model, len(history))
    else:
        state, table = model.init_state(len(history)), model.output_table()[1:]

        def step(items):
            nonlocal state
            scores, state = model.stream_step(state, items, table)
            return scores
    for t in range(max(0, history.shape[1] - 64), history.shape[1]):
        step(history[:, t])
    return 1000 * timed(lambda: step(history[:, -1]), device, repeats=steps)


def measure_catalog(cfg, n_items, device):
    """Time and peak memory of one HoloMamba training step with a catalog of n_items (full softmax through the
    fused kernel, or chunked over catalogs larger than ce_chunk; or sampled softmax), and the loss path taken."""
    batch = cfg["efficiency_batch"]
    generator = torch.Generator().manual_seed(0)
    model = build_model("HoloMamba", catalog_only(n_items), cfg, device)
    log_q = torch.full((n_items + 1,), -math.log(n_items), device=device)
    log_q[0] = -float("inf")
    step_s, peak_mb = measure_training(model, cfg, fake_batch(n_items, batch, cfg["max_len"], device, generator), log_q)
    with autocast(cfg, device):
        path = loss_path(cfg, n_items, device)
    return {"step_ms": 1000 * step_s, "peak_mem_mb": peak_mb, "loss": path, "compiled": cfg["compile"]}


def measure_training(model, cfg, batch, item_log_q=None, runner=None, repeats=3):
    """Peak memory of a first training step (graph capture included on CUDA) and median seconds of the next
    `repeats`; the step calls `runner` (default: training_runner's, in one process)."""
    cfg = cfg.replace(batch_size=len(batch.items))  # a graphed step pads any batch up to batch_size
    if runner is None:
        runner, _, _ = training_runner(model, cfg, distributed=False)
    step = make_train_step(model, runner, cfg, item_log_q)
    model.train()
    with PeakMemory(model_device(model)) as peak:
        step(batch)
    return timed(lambda: step(batch), model_device(model), repeats=repeats), peak.mb


def world_and_rank():
    """(ranks, this rank) of the torchrun process group, (1, 0) without one."""
    if torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def gathered(value):
    """value from every rank, in rank order ([value] without a process group)."""
    if not torch.distributed.is_initialized():
        return [value]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def rank_peaks(mb):
    """Every rank's peak memory in MB (a PeakMemory's: GPU, or the process's RSS on the CPU): {per rank
    ('1200.5;1187.0'), max}."""
    peaks = gathered(round(mb, 1))
    return {"peak_mem_mb_per_rank": ";".join(map(str, peaks)), "peak_mem_mb_max": max(peaks)}


def hardware(device):
    """What the ranks ran on, e.g. '2 x NVIDIA H200' or 'cpu'."""
    world, _ = world_and_rank()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return f"{world} x {name}" if world > 1 else name


DDP_KEY = ["what", "dataset", "model", "world_size", "step", "max_len"]


def ddp_stage(store, configs):
    """The multi-GPU check, run once as one process and once under torchrun; both fill results/ddp.csv.
    1. Each model of --models on every dataset (first seed), trained by this invocation's ranks with the
       one-process recipe (batch_size is the global batch: see fit), its runs kept apart by world size and
       step under <results_dir>/ddp/ and <checkpoint_dir>/ddp/: seconds per training epoch, the peak memory
       of every rank (GPU; the process's RSS on the CPU), valid and test metrics, and the test NDCG@10 of its checkpoint reloaded in one
       process on the CPU and on this device.
    2. One training step of each model at the longest of efficiency_lengths (the efficiency stage's batch,
       split over the ranks): step time and peak memory of every rank.
    A torchrun row gets its speed-up over the one-process row with the same step (eager or graphed, if there)
    and its scaling efficiency (speed-up / ranks), and the speed-up over the graphed one-process row. Each row
    is written as soon as it is measured, so a stage cut short keeps the rows it finished."""
    world, _ = world_and_rank()
    device = pick_device(store.cfg["device"])
    step_name = "eager" if world > 1 or device.type != "cuda" or not store.cfg["cuda_graphs"] else "graphed"
    folder = Path("ddp") / f"ranks{world}-{step_name}"
    sub = RunStore(store.cfg.replace(results_dir=str(store.results_dir / folder),
                                     checkpoint_dir=str(store.checkpoint_dir / folder)), store.given)
    sub.datasets = store.datasets
    rows = []
    common = {"world_size": world, "backend": torch.distributed.get_backend() if world > 1 else "none",
              "hardware": hardware(device)}
    for cfg in configs:
        data = store.dataset(cfg)
        for name in as_list(cfg["models"]):
            with PeakMemory(device) as peak:
                run = sub.run(cfg, name, seeds(cfg)[0])
            row = {"what": "training run", "dataset": cfg["dataset"], "model": name, **common,
                   "step": "graphed" if run.graphed else "eager", "max_len": run.cfg["max_len"],
                   "batch": cfg["batch_size"], "batch_per_rank": cfg["batch_size"] // world, "config": run.config,
                   "epochs": run.epochs, "best_epoch": run.best_epoch, "stopped_by": run.stopped_by,
                   "epoch_seconds": run.history[-1]["train_seconds"] / run.history[-1]["epoch"],
                   "wall_seconds": run.train_seconds, **rank_peaks(peak.mb),
                   **{f"{split}_{m}": run.metrics[split][m]
                      for split in ("valid", "test") for m in ("hr@10", "ndcg@10")}}
            if is_main_process():  # the checkpoint in a fresh process's hands: the CPU, then one device
                for where in ("cpu", str(device)) if device.type != "cpu" else ("cpu",):
                    reloaded = load(run.checkpoint, where)
                    row[f"reload_{where.split(':')[0]}_test_ndcg@10"] = evaluate(reloaded, data, "test", cfg)["ndcg@10"]
            rows.append(keep_ddp_row(store, row))
            if world > 1:
                torch.distributed.barrier()
    length = max(as_list(store.cfg["efficiency_lengths"], int))
    batch = min(store.cfg["efficiency_batch"], max(1, store.cfg["efficiency_tokens"] // length))
    batch = max(world, batch - batch % world)
    for name in as_list(store.cfg["models"]):
        cfg = store.cfg.replace(max_len=length, batch_size=batch)
        rows.append(keep_ddp_row(store, {"what": "training step", "dataset": "synthetic catalog", "model": name,
                                         **common, "max_len": length, "batch": batch, "batch_per_rank": batch // world,
                                         **measure_ddp_step(name, cfg, device)}))
    if is_main_process():
        print(read_results(store.results_dir / "ddp.csv").to_string(index=False))
    return rows


def keep_ddp_row(store, row):
    """row merged into results/ddp.csv (by the main process), speed-ups recomputed; returned."""
    if is_main_process():
        upsert_csv(store.results_dir / "ddp.csv", [row], DDP_KEY, with_speedups)
    return row


def measure_ddp_step(name, cfg, device):
    """Median milliseconds of a training step of `name` on cfg['batch_size'] sequences of cfg['max_len'] items
    split over the ranks (DDP when there are several), and the peak memory of each rank in its first step."""
    set_seed(0)
    model = build_model(name, catalog_only(cfg["efficiency_items"]), cfg, device)
    runner, world, rank = training_runner(model, cfg)
    batch = fake_batch(cfg["efficiency_items"], cfg["batch_size"] // world, cfg["max_len"], device,
                       torch.Generator().manual_seed(rank))
    seconds, peak_mb = measure_training(model, cfg, batch, runner=runner, repeats=5)
    return {"step": "eager" if graph_blockers(model, runner, cfg, device) else "graphed",
            "step_ms": 1000 * max(gathered(seconds)), **rank_peaks(peak_mb)}


def with_speedups(table):
    """ddp.csv with, on each row of several ranks, the speed-up over the one-process row of the same measure
    and step, the scaling efficiency (that speed-up / ranks) and the speed-up over the graphed one-process row
    (seconds per epoch for runs, step time for steps)."""
    table = table.drop(columns=[c for c in ("speedup", "scaling_efficiency", "speedup_vs_graphed") if c in table])

    def time_of(row):
        return row["epoch_seconds"] if row["what"] == "training run" else row["step_ms"]

    single = {(r["what"], r["dataset"], r["model"], r["step"]): time_of(r)
              for _, r in table.iterrows() if int(r["world_size"]) == 1}
    for i, r in table.iterrows():
        if int(r["world_size"]) > 1:
            same = single.get((r["what"], r["dataset"], r["model"], r["step"]))
            graphed = single.get((r["what"], r["dataset"], r["model"], "graphed"))
            if same:
                table.loc[i, "speedup"] = same / time_of(r)
                table.loc[i, "scaling_efficiency"] = same / time_of(r) / int(r["world_size"])
            if graphed:
                table.loc[i, "speedup_vs_graphed"] = graphed / time_of(r)
    return table


def memory_stage(store, configs):
    """Each memory extension against the model it extends, on every dataset and seed. HoloMamba (when --models
    names it): the max_len window alone, the same window plus the holographic memory over memory_len older items
    (each of --memory_lens), and one window over max_len + memory_len items. RAMRec (when --models names it)
    against SASRec. Per run: test metrics on all users and on users with more than long_history training items,
    bytes of per-user state, the cost of scoring one new interaction of one user, and how much the memory's
    read is used at the scored position (gate opening, the read's share of the residual stream). Each long
    window is also tested reading only its last max_len items ('full window, reading the last <max_len>'). Writes
    results/memory.csv, and results/memory_depth.csv (RAMRec's retrieval depth K: share of users per K, per variant).
    With warm_start, the extensions start from their bases (RunStore.warm_start); their variants say so.
    Parallel: the same command in several processes sharing results_dir; each trains the runs nobody else has
    claimed (claims in memory_runs.csv.claims, finished runs in memory_runs.csv) and writes the rows of every
    finished run, so the last to finish writes them all."""
    rows, depths, log = [], [], store.results_dir / "memory_runs.csv"
    for cfg in configs:
        lens = as_list(cfg["memory_lens"], int) or [cfg["memory_len"]]
        models = as_list(cfg["models"])
        if "HoloMamba" in models and 0 in lens:
            raise ConfigError("--stage=memory needs --memory_len > 0 or --memory_lens (the older items the memory folds in)")
        if not {"HoloMamba", "RAMRec"} & set(models):
            raise ConfigError("--stage=memory compares the memory of HoloMamba or RAMRec: name one in --models")
        data = store.dataset(cfg)
        long = {f"> {cfg['long_history']} items": data.train_lengths() > cfg["long_history"]}
        window = cfg.replace(memory_slots=0, memory_len=0)
        warm = f", from base ({cfg['warm_start']})" if cfg["warm_start"] != "off" else ""
        variants = [("HoloMamba", "window", 0, window)] if "HoloMamba" in models else []
        for n in lens if "HoloMamba" in models else ():
            variants += [("HoloMamba", "window + memory" + warm, n,
                          cfg.replace(memory_len=n, memory_slots=cfg["memory_slots"] or MEMORY_STAGE_SLOTS))]
            if cfg["memory_full_window"]:
                variants += [("HoloMamba", "full window", n, window.replace(max_len=cfg["max_len"] + n))]
        if "RAMRec" in models:
            variants += [("SASRec", "SASRec", 0, cfg), ("RAMRec", "RAMRec" + warm, 0, cfg)]
        plan = [(seed, *v, run_name(*store.run_key(v[3], v[0], seed))) for seed in seeds(cfg) for v in variants]
        # the runs others start from (warm_start) are claimed first, so another process never trains a base twice
        for seed, name, _, _, config, key in sorted(plan, key=lambda p: model_class(p[1]).extends(p[4]) is not None):
            base = model_class(name).extends(config) if config["warm_start"] != "off" else None
            if base is not None:  # its base may be training in another process: wait rather than train it twice
                wait_for_trial(log, run_name(*store.run_key(base[1], base[0], seed)))
            if claim_trial(log, key):
                store.run(config, name, seed)
                append_csv_row(log, {"trial": key})
        done = set(read_log(log)["trial"].astype(str))
        if len({p[-1] for p in plan} - done):
            tqdm.write(f"[{cfg['dataset']}] memory stage: {len({p[-1] for p in plan} - done)} runs still training in "
                       "other processes; the last process to finish writes their rows", file=sys.stderr)
        for seed, name, variant, n, config, key in plan:
            if key in done:
                measured, depth = memory_run_rows(store.run(config, name, seed, reuse=True), store, data, variant, n,
                                                  cfg["max_len"], long)
                rows, depths = rows + measured, depths + depth
    if not rows:
        return rows
    table = upsert_csv(store.results_dir / "memory.csv", rows, ["dataset", "model", "variant", "memory_len", "seed", "slice"])
    if depths:
        upsert_csv(store.results_dir / "memory_depth.csv", depths, ["dataset", "variant", "seed", "depth"],
                   derive=lambda t: t.fillna({"variant": "RAMRec"}))  # rows from before variants were named
    summary = table.groupby(["dataset", "variant", "memory_len", "slice"], sort=False)[["ndcg@10", "hr@10"]].agg(["mean", "std"])
    print(summary.round(4).to_string())
    return rows


def memory_run_rows(run, store, data, variant, memory_len, window, slices):
    """The memory stage's rows of one finished run (test metrics per slice, with its state bytes, streaming step
    cost and read use) and RAMRec's retrieval depths. A long window ('full window') is also ranked reading only
    its last `window` items: the same weights, so what it gains by reading more at test is told apart from what
    training on longer windows gave it."""
    model = store.model(run)
    device = model_device(model)
    split = data.eval_split("test", model.input_len, excludes_seen(run.cfg, data), device)
    reads = memory_reads(model, split, run.cfg["eval_batch_size"])
    with torch.no_grad(), autocast(run.cfg, device):
        step_ms = streaming_step_ms(model, split.inputs[:1], device, users=split.users[:1], ends=split.ends[:1])
    depths = []
    if "depth" in reads:
        k, users = reads.pop("depth").long().unique(return_counts=True)
        depths = [{"dataset": run.dataset, "variant": variant, "seed": run.seed, "depth": int(a), "users": int(b),
                   "share": round(int(b) / len(split.targets), 6)} for a, b in zip(k, users)]
    info = dict(model=run.model, variant=variant, memory_len=memory_len, seed=run.seed, config=run.config,
                encoder_window=run.cfg["max_len"], items_read=model.input_len, state_bytes=state_bytes(model),
                step_ms=round(step_ms, 4), **{f"read_{k}": round(v.mean().item(), 6) for k, v in reads.items()},
                best_epoch=run.best_epoch, train_seconds=run.train_seconds)
    rows = [{**row, **info} for row in slice_metrics(run, run.dataset, slices)]
    if variant == "full window":
        short = data.eval_split("test", window, excludes_seen(run.cfg, data), device)
        read_less = replace(run, ranks={"test": rank_targets(model, short, run.cfg).cpu()})
        rows += [{**row, **info, "variant": f"full window, reading the last {window}", "items_read": window}
                 for row in slice_metrics(read_less, run.dataset, slices)]
    return rows, depths


def state_bytes(model):
    """Bytes a server keeps per user: a recurrent model's state; otherwise the window of item ids it re-reads,
    plus any per-user buffers (RAMRec's bank, tags, usage and quality)."""
    if model.recurrent:
        return sum(t.numel() * t.element_size() for t in leaves(model.init_state(1)))
    banks = [b for b in model.buffers() if b.dim() and len(b) == model.catalog.n_users] if model.reads_users else []
    return model.input_len * 8 + sum(b[0].numel() * b.element_size() for b in banks)


@torch.no_grad()
def memory_reads(model, split, batch_size):
    """model.reads over the split in batches ({name: (U,) tensor}); {} for a model without a memory."""
    model.eval()
    parts = [model.reads(Batch(split.inputs[i:i + batch_size], users=split.users[i:i + batch_size],
                               ends=split.ends[i:i + batch_size])) for i in range(0, len(split.inputs), batch_size)]
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def figures_stage(store, configs):
    """Nothing to compute: main() draws every figure from the result files after the stages (no training)."""
    return []


def recommend_stage(store, configs):
    """Top-k raw item ids with scores from --checkpoint: for --user (a known user, after their whole history),
    for --history (a new user's items, oldest first), printed; or for every user of --users_file, written to
    results_dir/recommendations.csv in batches. Seen items are left out as the model was trained
    (--exclude_seen=true/false overrides)."""
    cfg = store.cfg
    if not cfg["checkpoint"]:
        raise ConfigError("--stage=recommend needs --checkpoint=PATH (a .pt written by a run or by save())")
    if not (cfg["user"] or cfg["history"] or cfg["users_file"]):
        raise ConfigError("--stage=recommend needs --user=RAW_ID, --history=ITEM,ITEM,... or --users_file=FILE.csv")
    model = load(cfg["checkpoint"], pick_device(cfg["device"]))
    model.id_index()  # fail now on a checkpoint without raw ids
    exclude = None if cfg["exclude_seen"] == "auto" else cfg["exclude_seen"] == "true"
    if cfg["users_file"]:
        with reading(cfg["users_file"]):
            users = pd.read_csv(cfg["users_file"], dtype=str)
        users = users["user"] if "user" in users else users.iloc[:, 0]
        table = model.recommend_many(users.tolist(), cfg["k"], exclude, cfg["eval_batch_size"])
        folder = store.results_dir if "results_dir" in store.given else Path(model.config["results_dir"])
        path = folder / "recommendations.csv"  # beside the results of the run that made the checkpoint
        write_csv(path, table.to_dict("records"))
        print(f"{len(users)} users x top {cfg['k']} -> {path}")
        return table.to_dict("records")
    if cfg["user"]:
        recs = model.recommend(user=cfg["user"], k=cfg["k"], exclude_seen=exclude)
    else:
        recs = model.recommend(history=as_list(cfg["history"]), k=cfg["k"], exclude_seen=exclude)
    rows = [{"rank": rank + 1, "item": item, "score": round(score, 6)} for rank, (item, score) in enumerate(recs)]
    print(pd.DataFrame(rows, columns=["rank", "item", "score"]).to_string(index=False))
    return rows


def stats_stage(store, configs):
    """Print each dataset after filtering as one JSON line."""
    rows = [store.dataset(cfg).stats() for cfg in configs]
    for row in rows:
        print(json.dumps(row))
    return rows


# ---- the paper stage: LaTeX tables and the numbers the text quotes, from the result files only ---------------
# paper/main.tex \input's paper_dir/tables/*.tex and quotes numbers as \hm{key}, defined in tables/numbers.tex, so
# the text never drifts from the CSVs. No data is read and nothing is trained; a missing result file skips its
# table with a note.
DATASET_TITLES = {"ml-1m": "MovieLens-1M", "amazon-beauty": "Amazon Beauty"}
# What the run hashes of the committed results are (README: Results, Attributes); any other hash is shown as itself.
PAPER_VARIANTS = {"b19c663d": "all genres, item form", "3f3a9798": "first category, item form",
                  "460a813d": "both: roles + item form", "ea9a0b15": "roles + attribute loss",
                  "120d03b6": "item form + attribute smoothing 0.1", "aa800c5c": "label smoothing 0.1",
                  "83fe1cdf": "roles + attribute loss + attribute smoothing 0.1", "45164ce4": "label smoothing 0.2"}
# A variant whose recipe changes the loss is held against the item-only run of the same recipe without attributes
# (attribute smoothing 0.1 against uniform label smoothing of the same total mass: 0.1 on ML-1M, 0.1 + 0.1 on
# Beauty); the others against the dataset's first item-only config.
PAPER_ITEM_ONLY = {"120d03b6": "aa800c5c", "83fe1cdf": "45164ce4"}
# Published HR@10 / NDCG@10 under the same protocol (leave-one-out, full ranking, seen items excluded), as collected
# in README: (dataset, method, HR@10, NDCG@10, BibTeX key in paper/references.bib; '' where README names no source).
PUBLISHED = [("ml-1m", "SASRec", 0.3152, 0.1821, "klenitskiy2023turning"),
             ("ml-1m", "Mamba4Rec", 0.3121, 0.1822, "liu2024mamba4rec"),
             ("ml-1m", "LRURec", 0.3264, 0.1930, "yue2024lrurec"),
             ("amazon-beauty", "eSASRec", 0.0928, 0.0523, "tikhonovich2025esasrec"),
             ("amazon-beauty", "SASRec, sampled softmax", 0.0921, 0.0531, ""),
             ("amazon-beauty", "S3Rec, improved loss", 0.1031, 0.0619, "li2023improving"),
             ("amazon-beauty", "BSARec", 0.1008, 0.0611, "shin2024bsarec")]
# The original paper's public script under its own protocol (preset `paper`, one seed), as README reports it.
PAPER_SCRIPT = {"ml-1m": (0.1626, 0.0917), "amazon-beauty": (0.0444, 0.0273)}
PAPER_METRICS = ["hr@10", "hr@20", "ndcg@10", "ndcg@20", "mrr"]
MEMORY_MIN_USERS = 20  # memory table: a slice with fewer users is left out
SLICE_HEADERS = {"all users": "All users", "short-history users": "Short histories",
                 "rare target items": "Rare targets"}
PRESET_KEYS = ["max_len", "d_model", "n_layers", "d_state", "expand", "ffn", "dropout", "batch_size", "lr",
               "epochs", "patience", "label_smoothing", "train_window", "attribute_mode", "binding", "attribute_loss",
               "attribute_smoothing"]


class PaperTable(NamedTuple):
    """One table of the paper: a caption, columns [(header, alignment)] and blocks [(title or '', rows)], each row
    (cells, key): the key names the result the row holds (it is written beside the row as a comment). Optional:
    groups [(title, number of columns)], a header row above the column headers; the font size; the column gap."""
    caption: str
    columns: list
    blocks: list
    groups: list = None
    size: str = r"\small"
    colsep: str = ""


def tex_escape(text):
    return re.sub(r"([&%$#_{}])", r"\\\1", str(text)).replace("~", r"\textasciitilde{}").replace("^", r"\^{}")


def tex_metric(mean, std=None, bold=False):
    """0.2017, bold when asked, with the seeds' standard deviation as \\std{0.0027} (none for one seed)."""
    text = rf"\textbf{{{mean:.4f}}}" if bold else f"{mean:.4f}"
    return text if std is None or not np.isfinite(std) else rf"{text}\std{{{std:.4f}}}"


def tex_count(value, digits=0):
    return f"{value:,.{digits}f}".replace(",", "{,}")


def slug(text):
    return re.sub(r"[^a-z0-9.@]+", "-", str(text).lower().replace(">", "gt")).strip("-")


def relative(value, reference):
    return 100 * (value / reference - 1)


def signed(value, digits=1):
    """+2.6, -0.1, +0.0 (never -0.0): a difference as the text and the tables print it."""
    text = f"{value:+.{digits}f}"
    return "+" + text[1:] if float(text) == 0 else text


def latex_table(name, table, source):
    """The one writer of the paper's tables: booktabs, the caption above, the source file named in it, blocks
    separated by rules (a block may open with a title row), every row followed by its key as a comment."""
    width = len(table.columns)
    lines = [f"% {name}.tex: written by `python HoloMambaRec.py --stage=paper` from {source}; do not edit",
             r"\begin{table}[tbp]", r"\centering" + table.size
             + (rf"\setlength{{\tabcolsep}}{{{table.colsep}}}" if table.colsep else ""),
             rf"\caption{{{table.caption} Source: \texttt{{{tex_escape(source)}}}.}}\label{{tab:{name}}}",
             r"\begin{tabular}{" + "".join(align for _, align in table.columns) + "}", r"\toprule"]
    if table.groups:
        spans, rules, first = [], [], 1
        for title, span in table.groups:
            spans.append(rf"\multicolumn{{{span}}}{{c}}{{{title}}}" if title else " & ".join([""] * span))
            rules += [rf"\cmidrule(lr){{{first}-{first + span - 1}}}"] if title else []
            first += span
        lines += [" & ".join(spans) + r" \\", " ".join(rules)]
    lines += [" & ".join(header for header, _ in table.columns) + r" \\", r"\midrule"]
    for i, (title, rows) in enumerate(table.blocks):
        if i:
            lines.append(r"\midrule")
        if title:
            lines.append(rf"\multicolumn{{{width}}}{{@{{}}l}}{{\textit{{{title}}}}} \\")
        lines += [" & ".join(cells) + rf" \\ % {key}" for cells, key in rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", r"\end{table}", ""])


def numbers_tex(numbers):
    """tables/numbers.tex: one \\hmdef{key}{value} per number the text may quote as \\hm{key}."""
    head = ["% numbers.tex: written by `python HoloMambaRec.py --stage=paper` from the result files; do not edit",
            r"\providecommand{\hmdef}[2]{\expandafter\def\csname hm@#1\endcsname{#2}}"]
    return "\n".join(head + [rf"\hmdef{{{key}}}{{{value}}}" for key, value in sorted(numbers.items())] + [""])


def dataset_title(dataset):
    return DATASET_TITLES.get(dataset, tex_escape(dataset))


def variant_name(config):
    return PAPER_VARIANTS.get(str(config), f"run {config}")


def seed_summary(table, keys, metrics):
    """Mean, standard deviation and seed count of `metrics` per `keys` (in the file's order): runs of different
    configs are never pooled."""
    groups = table.astype({"config": str}).groupby(keys, sort=False)
    stats = groups[metrics].agg(["mean", "std"])
    stats[("seeds", "n")] = groups["seed"].nunique()
    return stats


def chosen_configs(table):
    """{(dataset, model): run hash} of accuracy rows: per dataset and model, the config with the best mean
    validation NDCG@10. The choice uses the validation split only; the test split is never consulted."""
    valid = table[table["split"] == "valid"].astype({"config": str})
    means = valid.groupby(["dataset", "model", "config"], sort=False)["ndcg@10"].mean()
    return {key[:2]: key[2] for key in means.groupby(level=[0, 1], sort=False).idxmax()}


def in_order(values, order):
    """Distinct values, those of `order` first in its order, the rest as they come."""
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + [v for v in values if v not in order]


def accuracy_numbers(stats, chosen, numbers):
    """acc/<dataset>/<model>@<config>/<split>/<metric> (and /std, /seeds) for every run group, and the same
    without @<config> for the config chosen on validation."""
    for (dataset, model, config, split), row in stats.iterrows():
        names = [f"{model}@{config}"] + ([model] if chosen.get((dataset, model)) == config else [])
        for name in names:
            base = f"acc/{dataset}/{name}/{split}"
            numbers[f"{base}/seeds"] = str(int(row[("seeds", "n")]))
            for metric in PAPER_METRICS:
                numbers[f"{base}/{metric}"] = f"{row[(metric, 'mean')]:.4f}"
                numbers[f"{base}/{metric}/std"] = f"{row[(metric, 'std')]:.4f}"


def table_main_results(table, numbers):
    """Test accuracy of every model on every dataset (the config chosen on validation), mean ± std over seeds,
    the best of ours per column in bold, and the published numbers under the same protocol."""
    chosen = chosen_configs(table)
    stats = seed_summary(table, ["dataset", "model", "config", "split"], PAPER_METRICS)
    accuracy_numbers(stats, chosen, numbers)
    blocks, several = [], False
    for dataset in dict.fromkeys(table["dataset"]):
        models = [m for m in in_order(table.loc[table["dataset"] == dataset, "model"], MODEL_NAMES)
                  if m != "HoloMamba-Shuffled"]
        rows = {m: stats.loc[(dataset, m, chosen[(dataset, m)], "test")] for m in models}
        best = {c: max(f"{r[(c, 'mean')]:.4f}" for r in rows.values()) for c in PAPER_METRICS}
        ours = []
        for model, row in rows.items():
            configs = table.loc[(table["dataset"] == dataset) & (table["model"] == model), "config"].nunique()
            several |= configs > 1
            label = tex_escape(model) + (r"$^\dagger$" if configs > 1 else "")
            cells = [label] + [tex_metric(row[(c, "mean")], row[(c, "std")], f"{row[(c, 'mean')]:.4f}" == best[c])
                               for c in PAPER_METRICS]
            ours.append((cells, f"{dataset}/{model}@{chosen[(dataset, model)]}/test"))
            for other in ("SASRec", "Mamba-ItemOnly"):
                if other in rows and other != model:
                    for c in ("hr@10", "ndcg@10"):
                        numbers[f"acc/{dataset}/{model}/test/{c}/vs/{other}"] = \
                            signed(relative(row[(c, 'mean')], rows[other][(c, 'mean')]))
        counts = sorted({int(r[("seeds", "n")]) for r in rows.values()})
        blocks.append((f"{dataset_title(dataset)}: this work, " + " or ".join(map(str, counts)) + " seeds", ours))
        published = [(cells, f"{dataset}/published/{slug(name)}") for cells, name in published_rows(dataset, numbers)]
        if published:
            blocks.append((f"{dataset_title(dataset)}: published, same protocol (HR@10 and NDCG@10 only)", published))
    caption = ("Test accuracy under leave-one-out, full ranking with seen items excluded: mean and standard deviation "
               "over seeds. Bold: the best of our models per column.")
    if several:
        caption += (r" $^\dagger$Several variants were run; the one with the best mean validation NDCG@10 is shown "
                    r"(all of them in Table~\ref{tab:ablation}).")
    columns = [("Model", "l")] + [(c.upper(), "c") for c in PAPER_METRICS]
    return PaperTable(caption, columns, blocks, size=r"\footnotesize", colsep="4pt")


def published_rows(dataset, numbers):
    rows = []
    for where, name, hr, ndcg, key in PUBLISHED:
        if where == dataset:
            numbers[f"pub/{dataset}/{slug(name)}/hr@10"], numbers[f"pub/{dataset}/{slug(name)}/ndcg@10"] = \
                f"{hr:.4f}", f"{ndcg:.4f}"
            cite = rf"~\citep{{{key}}}" if key else ""
            rows.append(([tex_escape(name) + cite, f"{hr:.4f}", "--", f"{ndcg:.4f}", "--", "--"], name))
    return rows


def table_ablation(table, numbers):
    """Every HoloMamba variant and its shuffled-attribute control against the item-only ablation: validation and
    test NDCG@10, test HR@10, and the test NDCG@10 difference in percent and in pooled seed standard deviations."""
    stats, chosen = seed_summary(table, ["dataset", "model", "config", "split"], PAPER_METRICS), chosen_configs(table)
    blocks = []
    for dataset in dict.fromkeys(table["dataset"]):
        part = stats.loc[dataset]
        keys = [(m, c) for m in ("Mamba-ItemOnly", "HoloMamba", "HoloMamba-Shuffled")
                for c in dict.fromkeys(k[1] for k in part.index if k[0] == m)]
        if not any(m == "Mamba-ItemOnly" for m, _ in keys):
            continue
        reference = next(c for m, c in keys if m == "Mamba-ItemOnly")
        rows = []
        for model, config in keys:
            cells = [tex_escape(model), variant_name(config) if model != "Mamba-ItemOnly" else
                     "no attributes" + (f", {PAPER_VARIANTS[config]}" if config in PAPER_ITEM_ONLY.values() else "")]
            for split, c in (("valid", "ndcg@10"), ("test", "hr@10"), ("test", "ndcg@10")):
                cells.append(tex_metric(*part.loc[(model, config, split)][[(c, "mean"), (c, "std")]]))
            if model == "Mamba-ItemOnly":
                cells += ["--", "--"]
            else:
                for split in ("valid", "test"):
                    for c in ("hr@10", "ndcg@10"):
                        base = f"abl/{dataset}/{model}@{config}/{split}/{c}"
                        own = PAPER_ITEM_ONLY.get(config, reference)
                        row, ref = part.loc[(model, config, split)], part.loc[("Mamba-ItemOnly", own, split)]
                        numbers[f"{base}/vs/Mamba-ItemOnly"] = signed(relative(row[(c, 'mean')], ref[(c, 'mean')]))
                        numbers[f"{base}/vs/Mamba-ItemOnly/z"] = signed(pooled_z(row, ref, c))
                        if model == "HoloMamba" and ("HoloMamba-Shuffled", config, split) in part.index:
                            control = part.loc[("HoloMamba-Shuffled", config, split)]
                            numbers[f"{base}/vs/control"] = signed(relative(row[(c, 'mean')], control[(c, 'mean')]))
                            numbers[f"{base}/vs/control/z"] = signed(pooled_z(row, control, c))
                cells += ["$" + numbers[f"abl/{dataset}/{model}@{config}/test/ndcg@10/vs/Mamba-ItemOnly"] + r"$\%",
                          "$" + numbers[f"abl/{dataset}/{model}@{config}/test/ndcg@10/vs/Mamba-ItemOnly/z"] + "$"]
            rows.append((cells, f"{dataset}/{model}@{config}"))
        if (dataset, "HoloMamba") in chosen:  # the variant chosen on validation, also without its hash
            prefix = f"abl/{dataset}/HoloMamba@{chosen[(dataset, 'HoloMamba')]}/"
            numbers.update({f"abl/{dataset}/HoloMamba/" + k[len(prefix):]: v for k, v in list(numbers.items())
                            if k.startswith(prefix)})
        blocks.append((dataset_title(dataset), rows))
    caption = ("Binding against the item-only ablation and the shuffled-attribute control (HoloMamba whose items read "
               "another item's attributes): mean and standard deviation over seeds. $\\Delta$: test NDCG@10 relative "
               "to Mamba-ItemOnly (for attribute smoothing, to item-only with uniform label smoothing of the same "
               "mass); $z$: the same difference in pooled seed standard deviations.")
    columns = [("Model", "l"), ("Variant", r">{\raggedright\arraybackslash}p{3.6cm}"), ("NDCG@10", "c"),
               ("HR@10", "c"), ("NDCG@10", "c"), (r"$\Delta$", "r"), ("$z$", "r")]
    groups = [("", 2), ("Validation", 1), ("Test", 2), ("", 2)]
    return PaperTable(caption, columns, blocks, groups=groups, size=r"\footnotesize", colsep="4pt")


def pooled_z(row, reference, metric):
    pooled = math.sqrt((row[(metric, "std")] ** 2 + reference[(metric, "std")] ** 2) / 2)
    return (row[(metric, "mean")] - reference[(metric, "mean")]) / pooled if pooled else float("nan")


def users_title(dataset, users):
    return f"{dataset_title(dataset)}; users per slice: " + " / ".join(tex_count(n) for n in users.values())


def table_slices(table, numbers):
    """Test NDCG@10 on all users and on the cold slices (short histories, rarely seen targets), mean ± std over
    seeds where the file has several (slices.csv; cold_start.csv holds one run per model)."""
    table = table.assign(**{c: v for c, v in (("config", ""), ("seed", 0)) if c not in table})
    stats = seed_summary(table, ["dataset", "model", "config", "slice"], ["ndcg@10", "hr@10", "users"])
    slices = list(dict.fromkeys(table["slice"]))
    blocks = []
    for dataset in dict.fromkeys(table["dataset"]):
        part = stats.loc[dataset]
        users = {s: int(part.xs(s, level="slice")[("users", "mean")].iloc[0]) for s in slices
                 if s in part.index.get_level_values("slice")}
        rows = []
        for model, config in dict.fromkeys((m, c) for m, c, _ in part.index):
            cells = [tex_escape(model), variant_name(config) if config else "--",
                     str(int(part.loc[(model, config, slices[0])][("seeds", "n")]))]
            for s in slices:
                row = part.loc[(model, config, s)] if (model, config, s) in part.index else None
                cells.append("--" if row is None else tex_metric(row[("ndcg@10", "mean")], row[("ndcg@10", "std")]))
                if row is not None:
                    name = f"{model}@{config}" if config else model
                    numbers[f"slice/{dataset}/{name}/{slug(s)}/ndcg@10"] = f"{row[('ndcg@10', 'mean')]:.4f}"
            rows.append((cells, f"{dataset}/{model}@{config}" if config else f"{dataset}/{model}"))
        for s, n in users.items():
            numbers[f"slice/{dataset}/{slug(s)}/users"] = tex_count(n)
        blocks.append((users_title(dataset, users), rows))
    caption = ("Test NDCG@10 on all users and on the cold slices: the users with the shortest training histories "
               "(20\\%) and the users whose test target was seen at most 10 times in training.")
    columns = [("Model", "l"), ("Variant", r">{\raggedright\arraybackslash}p{4.2cm}"), ("Seeds", "c")] + \
        [(SLICE_HEADERS.get(s, tex_escape(s)), "c") for s in slices]
    return PaperTable(caption, columns, blocks, size=r"\footnotesize")


def table_paper_protocol(table, numbers):
    """The original paper's protocol (preset `paper`: 10 epochs, every item ranked, one seed): our models and
    the paper's public script."""
    table = table[(table["preset"] == "paper") & (table["split"] == "test")]
    blocks = []
    for dataset in dict.fromkeys(table["dataset"]):
        rows = []
        part = table[table["dataset"] == dataset]
        for model in in_order(part["model"], MODEL_NAMES):
            row = part[part["model"] == model].iloc[-1]
            for c in PAPER_METRICS:
                numbers[f"paperprotocol/{dataset}/{model}/{c}"] = f"{row[c]:.4f}"
            rows.append(([tex_escape(model)] + [f"{row[c]:.4f}" for c in PAPER_METRICS], f"{dataset}/{model}"))
        if dataset in PAPER_SCRIPT:
            hr, ndcg = PAPER_SCRIPT[dataset]
            numbers[f"paperprotocol/{dataset}/script/hr@10"], numbers[f"paperprotocol/{dataset}/script/ndcg@10"] = \
                f"{hr:.4f}", f"{ndcg:.4f}"
            rows.append((["original public script", f"{hr:.4f}", "--", f"{ndcg:.4f}", "--", "--"], f"{dataset}/script"))
        blocks.append((dataset_title(dataset), rows))
    caption = ("The original paper's protocol (preset \\texttt{paper}: 10 epochs, $L=50$, $d=96$, every item ranked, "
               "seen items included, one seed), test split. The public script's numbers are as the project's README "
               "reports them.")
    return PaperTable(caption, [("Model", "l")] + [(c.upper(), "c") for c in PAPER_METRICS], blocks)


def devices_of(table):
    return ", ".join(tex_escape(d) for d in dict.fromkeys(table["device"].astype(str)))


def table_efficiency(table, numbers, name="efficiency"):
    """Training throughput, peak training memory, batch inference and one streaming step per model and length."""
    device = devices_of(table)
    numbers[f"{name}/device"] = device
    skipped = table.get("skipped", pd.Series(index=table.index)).map(lambda v: isinstance(v, str) and bool(v))
    blocks = []
    for (length, batch), part in table.groupby(["max_len", "batch"], sort=False):
        rows = []
        for i, row in part.iterrows():
            key = f"{name}/{row['model']}/L{length}"
            if skipped[i]:
                rows.append(([tex_escape(row["model"]), r"\multicolumn{4}{l}{skipped: out of memory}"], key))
                continue
            values = {"seqs_per_s": tex_count(row["train_seqs_per_s"]),
                      "peak_mib": tex_count(row["train_peak_mem_mb"]),
                      "infer_ms": f"{row['batch_infer_ms']:.2f}", "stream_ms": f"{row['stream_step_ms']:.2f}"}
            numbers.update({f"{key}/{k}": v for k, v in values.items()})
            mode = "state" if row["stream_mode"] == "recurrent state" else "window"
            rows.append(([tex_escape(row["model"]), values["seqs_per_s"], values["peak_mib"], values["infer_ms"],
                          f"{values['stream_ms']} ({mode})"], key))
        blocks.append((f"$L={length}$, batch {batch}", rows))
    backends = ", ".join(dict.fromkeys(table.loc[table["model"] == "HoloMamba", "scan_backend"].astype(str)))
    caption = (f"Efficiency on device \\texttt{{{device}}} (as recorded in the file; HoloMamba's scan backend: "
               f"\\texttt{{{tex_escape(backends)}}}). Training: sequences per second and peak memory of one step; "
               "inference: scoring a batch; streaming: one new interaction for one user, by a recurrent state step "
               "(state) or by re-reading the window (window). Random sequences over the stage's default catalog "
               "(ML-1M's size).")
    columns = [("Model", "l"), ("Train seq/s", "r"), ("Peak MiB", "r"), ("Batch ms", "r"), ("Stream ms", "l")]
    return PaperTable(caption, columns, blocks)


def table_efficiency_cpu(table, numbers):
    return table_efficiency(table, numbers, "efficiency_cpu")


def table_catalog(table, numbers):
    """One training step of HoloMamba with full or sampled softmax over growing catalogs."""
    device = devices_of(table)
    numbers["catalog/device"] = device
    rows = []
    for _, row in table.iterrows():
        key = f"catalog/{row['n_items']}/{slug(row['softmax'])}"
        numbers[f"{key}/step_ms"] = f"{row['step_ms']:.1f}"
        numbers[f"{key}/peak_gib"] = f"{row['peak_mem_mb'] / 1024:.1f}"
        rows.append(([tex_count(row["n_items"]), tex_escape(row["softmax"]), numbers[f"{key}/step_ms"],
                      numbers[f"{key}/peak_gib"]], key))
    caption = (f"One HoloMamba training step (batch 64, $L=50$) with the full softmax or a sampled softmax (logQ "
               f"correction) over catalogs of growing size, device \\texttt{{{device}}}.")
    return PaperTable(caption, [("Items", "r"), ("Softmax", "l"), ("Step ms", "r"), ("Peak GiB", "r")], [("", rows)])


def table_compression(table, numbers):
    """Temporal bundling: k items per token, applied at inference to a model trained without it (untrained) or
    used in training (trained): accuracy, the share of NDCG@10 kept, latency and memory of ranking every user."""
    blocks = []
    for dataset, part in table.groupby("dataset", sort=False):
        plain = part[part["k"] == 1].iloc[0]
        rows = []
        for k, group in part.groupby("k", sort=True):
            by = {row["bundling"]: row for _, row in group.iterrows()}
            modes = [m for m in ("none", "untrained", "trained") if m in by]
            for mode in modes:
                base = f"comp/{dataset}/k{k}/{mode}"
                row = by[mode]
                numbers[f"{base}/ndcg@10"], numbers[f"{base}/hr@10"] = f"{row['ndcg@10']:.4f}", f"{row['hr@10']:.4f}"
                numbers[f"{base}/kept"] = f"{100 * row['ndcg@10'] / plain['ndcg@10']:.0f}"
                numbers[f"{base}/latency_ms"] = f"{row['latency_ms']:.1f}"
                numbers[f"{base}/latency_cut"] = f"{-relative(row['latency_ms'], plain['latency_ms']):.0f}"
                numbers[f"{base}/mem_mib"] = tex_count(row["ranking_mem_mb"])
            pair = lambda f: " / ".join(f(by[m]) for m in modes)  # noqa: E731
            rows.append(([str(k), str(int(group["tokens_per_user"].iloc[0])), pair(lambda r: f"{r['hr@10']:.4f}"),
                          pair(lambda r: f"{r['ndcg@10']:.4f}"),
                          pair(lambda r: f"{100 * r['ndcg@10'] / plain['ndcg@10']:.0f}"),
                          pair(lambda r: f"{r['latency_ms']:.1f}"), pair(lambda r: tex_count(r["ranking_mem_mb"]))],
                         f"{dataset}/k{k}"))
        numbers[f"comp/{dataset}/history_len"] = str(int(plain["history_len"]))
        blocks.append((f"{dataset_title(dataset)}, the last {int(plain['history_len'])} items of each user, "
                       f"{tex_escape(plain['model'])}", rows))
    caption = ("Temporal bundling of $k$ items into one token, test split: untrained / trained (bundling applied at "
               "inference to the model trained without it / used in training). Kept: NDCG@10 in percent of $k=1$. "
               f"Latency and working memory of ranking every user on device \\texttt{{{devices_of(table)}}}.")
    columns = [("$k$", "r"), ("Tokens", "r"), ("HR@10", "c"), ("NDCG@10", "c"), (r"Kept \%", "c"), ("ms", "c"),
               ("MiB", "c")]
    return PaperTable(caption, columns, blocks)


def memory_label(variant, memory_len, items_read):
    """'window + memory <memory_len>' and 'full window <items read>', then how it started (', from base
    (frozen)'); the others as they are."""
    kind, comma, start = variant.partition(", ")
    label = f"{kind} {int(items_read if kind == 'full window' else memory_len)}" if memory_len else kind
    return label + comma + start


def memory_order(variant, memory_len):
    """Where a memory.csv variant sits in the table: HoloMamba's window, then per memory_len its memory (trained
    from scratch, then from the window) and the long window; then SASRec and RAMRec (from scratch, then warm)."""
    kind, _, start = variant.partition(", ")
    rank = {"window": 0, "window + memory": 1, "full window": 2, "SASRec": 3, "RAMRec": 4}.get(kind, 5)
    return rank >= 3, int(memory_len), rank, start


def memory_pairs(part):
    """(extension's label, its base's label, number name) for each extension among a dataset's memory rows."""
    pairs = []
    for variant, n in part[["variant", "memory_len"]].drop_duplicates().to_numpy():
        kind, _, start = variant.partition(", ")
        suffix = "-" + slug(start.replace("from base", "warm")) if start else ""
        if kind == "window + memory":
            pairs.append((memory_label(variant, n, 0), "window", f"memory-minus-window-{int(n)}{suffix}"))
        elif kind == "RAMRec":
            pairs.append((variant, "SASRec", f"ramrec-minus-sasrec{suffix}"))
    return pairs


def table_memory(table, numbers):
    """Each memory extension against the model it extends (mean and std over seeds, test split): HoloMamba's
    window alone, with the memory over memory_len older items and one long window; SASRec and RAMRec.
    Numbers: mem/<dataset>/<variant[-memory_len]>/<slice>/<metric>[/std], its state bytes and read share, the
    memory's difference to the window alone and RAMRec's to SASRec per slice."""
    blocks, metrics = [], ["ndcg@10", "hr@10"]
    slices = list(dict.fromkeys(table["slice"]))
    for dataset, part in table.groupby("dataset", sort=False):
        part = part.assign(label=[memory_label(*r) for r in part[["variant", "memory_len", "items_read"]].to_numpy()],
                           order=[memory_order(*r) for r in part[["variant", "memory_len"]].to_numpy()])
        part = part.sort_values("order", kind="stable")  # each base, then what extends it
        stats = seed_summary(part, ["label", "slice"], metrics + ["read_share"])
        users = {s: int(part.loc[part["slice"] == s, "users"].iloc[0]) for s in slices if s in set(part["slice"])}
        numbers.update({f"mem/{dataset}/{slug(s)}/users": tex_count(n) for s, n in users.items()})
        rows = []
        for label, group in part.groupby("label", sort=False):
            first, base = group.iloc[0], f"mem/{dataset}/{slug(label)}"
            numbers[f"{base}/state_bytes"] = tex_count(first["state_bytes"])
            numbers[f"{base}/items_read"] = str(int(first["items_read"]))
            share = stats.loc[(label, slices[0]), ("read_share", "mean")]
            if np.isfinite(share):
                numbers[f"{base}/read_share"] = f"{share:.2f}"
            cells = [tex_escape(label), str(int(first["items_read"])), tex_count(first["state_bytes"])]
            for s in slices:
                if users.get(s, 0) < MEMORY_MIN_USERS:
                    cells += ["--"] * len(metrics)
                    continue
                for metric in metrics:
                    mean, std = stats.loc[(label, s), (metric, "mean")], stats.loc[(label, s), (metric, "std")]
                    numbers[f"{base}/{slug(s)}/{metric}"] = f"{mean:.4f}"
                    if np.isfinite(std):
                        numbers[f"{base}/{slug(s)}/{metric}/std"] = f"{std:.4f}"
                    cells.append(tex_metric(mean, std))
            cells += [f"{share:.2f}" if np.isfinite(share) else "--", str(int(stats.loc[(label, slices[0]), ("seeds", "n")]))]
            rows.append((cells, f"{dataset}/{label}"))
        for extended, plain, name in memory_pairs(part):
            for s in users:
                if (extended, s) in stats.index and (plain, s) in stats.index:
                    for metric in metrics:
                        gap = stats.loc[(extended, s), (metric, "mean")] - stats.loc[(plain, s), (metric, "mean")]
                        numbers[f"mem/{dataset}/{name}/{slug(s)}/{metric}"] = signed(gap, 4)
        blocks.append((users_title(dataset, users), rows))
    columns = [("Variant", "l"), ("Items read", "r"), ("State (B)", "r")]
    columns += [(h, "c") for _ in slices for h in ("NDCG@10", "HR@10")] + [("Read", "r"), ("Seeds", "r")]
    groups = [("", 3)] + [(tex_escape(SLICE_HEADERS.get(s, s if not s.startswith(">") else f"users with {s}")), 2)
                          for s in slices] + [("", 2)]
    caption = ("Memory extensions against the models they extend, test split, mean and standard deviation over seeds. "
               "HoloMamba: the 50-item encoder window alone, the same window plus the holographic memory over the "
               "given number of older items, and one window over all of them; RAMRec against SASRec. State: bytes a "
               "server keeps per user. Read: the memory read's norm over the residual stream's at the scored "
               f"position. A slice with fewer than {MEMORY_MIN_USERS} users is left out (--).")
    return PaperTable(caption, columns, blocks, groups=groups, size=r"\footnotesize", colsep="3pt")


def table_presets(_, numbers):
    """The `best` preset of this version of the script, per dataset (the keys a reader needs to rerun it)."""
    datasets = [d for d, v in PRESETS["best"].items() if isinstance(v, dict)]
    cfgs = {d: resolve_config({"preset": "best"}, d) for d in datasets}
    rows = [([tex_escape(k)] + [tex_escape(str(cfgs[d][k]).lower() if isinstance(cfgs[d][k], bool) else cfgs[d][k])
                                for d in datasets], k) for k in PRESET_KEYS]
    caption = ("Hyper-parameters of the \\texttt{best} preset, chosen on validation NDCG@10 in the grid trials "
               "(seed 42; Beauty's attribute smoothing on three seeds). "
               "HoloMamba reads the attribute keys; the other models ignore them.")
    return PaperTable(caption, [("Key", "l")] + [(dataset_title(d), "l") for d in datasets], [("", rows)])


def grid_numbers(table, numbers):
    """grid/<trial>/valid_ndcg@10 (and valid_hr@10, test_ndcg@10) of every finished trial, grid/<dataset>/trials;
    no table."""
    for _, row in table.iterrows():
        if pd.notna(row.get("valid_ndcg@10")):
            for c in ("valid_ndcg@10", "valid_hr@10", "test_ndcg@10"):
                numbers[f"grid/{row['trial']}/{c}"] = f"{row[c]:.4f}"
    for dataset, part in table.groupby("dataset", sort=False):
        numbers[f"grid/{dataset}/trials"] = str(len(part))


def run_numbers(table, numbers):
    """runs/<preset>/total and /time_limit: how many runs of each preset ended at the time limit rather than by
    patience (or by their epoch budget), and which (runs/<preset>/time_limit_list); no table."""
    table = table[table["split"] == "test"]
    for preset, part in table.groupby("preset", sort=False):
        cut = part[part["stopped_by"] == "time_limit"]
        numbers[f"runs/{preset}/total"], numbers[f"runs/{preset}/time_limit"] = str(len(part)), str(len(cut))
        numbers[f"runs/{preset}/time_limit_list"] = "; ".join(
            f"{run_label(r['model'], r['config'])}, {dataset_title(r['dataset'])}, seed {r['seed']}"
            for _, r in cut.iterrows()) or "none"


def run_label(model, config):
    """HoloMamba (roles + attribute loss): the variant named for the models that have several, else the model."""
    known = model.startswith("HoloMamba") and str(config) in PAPER_VARIANTS
    return tex_escape(model) + (f" ({variant_name(config)})" if known else "")


def time_to_quality_numbers(summary, numbers):
    """ttq/...: the ML-1M epoch time, ranking time and time to the validation threshold (efficiency_ml1m.json)."""
    key = next((k for k in summary if k.startswith("seconds_to_valid_ndcg10_")), "")
    reached = summary.get(key)
    numbers.update({"ttq/device": tex_escape(summary["device"]), "ttq/epochs": str(summary["epochs"]),
                    "ttq/epoch_s": f"{summary['ml1m_epoch_seconds']:.2f}",
                    "ttq/eval_ms": f"{1000 * summary['ml1m_eval_all_users_seconds']:.0f}",
                    "ttq/threshold": key.rsplit("_", 1)[-1],
                    "ttq/seconds": "--" if reached is None else f"{reached:.1f}"})


def in_results(name):
    return lambda cfg: Path(cfg["results_dir"]) / name


PAPER_TABLES = [  # (table name, its result file given the config, or None, writer(data, numbers) -> PaperTable or
    # None for a source that only gives numbers)
    ("main_results", in_results("accuracy.csv"), table_main_results),
    ("ablation", in_results("accuracy.csv"), table_ablation),
    ("slices", in_results("slices.csv"), table_slices),
    ("cold_start", in_results("cold_start.csv"), table_slices),
    ("paper_protocol", in_results("benchmark.csv"), table_paper_protocol),
    ("runs", in_results("benchmark.csv"), run_numbers),
    ("efficiency", in_results("efficiency.csv"), table_efficiency),
    ("efficiency_cpu", in_results("cpu/efficiency.csv"), table_efficiency_cpu),
    ("catalog", in_results("efficiency_catalog.csv"), table_catalog),
    ("compression", in_results("compression.csv"), table_compression),
    ("memory", in_results("memory.csv"), table_memory),
    ("presets", None, table_presets),
    ("time_to_quality", in_results("efficiency_ml1m.json"), time_to_quality_numbers),
    ("grid", lambda cfg: Path(cfg["grid_csv"]), grid_numbers),
]


def read_result_file(path):
    """A CSV as a DataFrame (read_results) or a JSON object; an unreadable file is a DataError naming it."""
    if path.suffix != ".json":
        return read_results(path)
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); move it away and rerun the stage that writes it") from None


def paper_stage(store, configs):
    """The paper's tables, numbers and figures, from the result files only (no data is read, nothing trained):
    paper_dir/tables/<name>.tex for every table whose result file exists (a missing one is skipped with a note),
    paper_dir/tables/numbers.tex (\\hmdef{key}{value}: every number the text quotes as \\hm{key}), and
    paper_dir/figures/*.pdf and *.png (§10). paper/main.tex inputs them: `make -C paper` builds the PDF."""
    cfg = store.cfg
    results, out = Path(cfg["results_dir"]), Path(cfg["paper_dir"])
    if not results.is_dir():
        raise DataError(f"--results_dir={results}: no such folder; the paper stage reads the result files there "
                        "(the committed ones: --results_dir=results/paper)")
    numbers, rows = {}, []
    for name, source, writer in PAPER_TABLES:
        path = source(cfg) if source else None
        if path is not None and not path.is_file():
            print(f"paper: skipped tables/{name}.tex: {path} is missing")
            rows.append({"table": name, "source": str(path), "written": ""})
            continue
        table = writer(read_result_file(path) if path else None, numbers)
        label = (path.relative_to(results).as_posix() if path.is_relative_to(results) else path.name) if path else \
            "PRESETS['best'] in HoloMambaRec.py"
        if table is not None:
            write_text(out / "tables" / f"{name}.tex", latex_table(name, table, label))
        rows.append({"table": name, "source": str(path or ""), "written": str(out / "tables" / f"{name}.tex")
                     if table is not None else ""})
    write_text(out / "tables" / "numbers.tex", numbers_tex(numbers))
    figures = plot_paper_figures(cfg, out / "figures")
    print(f"paper: {sum(bool(r['written']) for r in rows)} tables, {len(numbers)} numbers and {len(figures)} figures "
          f"in {out}; build the PDF with: make -C {out}")
    return rows


STAGES = {"benchmark": benchmark_stage, "ablation": ablation_stage, "grid": grid_stage,
          "compression": compression_stage, "efficiency": efficiency_stage, "memory": memory_stage,
          "stats": stats_stage, "figures": figures_stage, "recommend": recommend_stage, "paper": paper_stage,
          "ddp": ddp_stage}
assert tuple(STAGES) == STAGE_NAMES


# =====================================================================================================
# §10 Figures: (result file -> drawing function), drawn from saved results, never by re-training
# =====================================================================================================
def draw_learning_curves(table, cfg, plt):
    table = table[table["preset"] == cfg["preset"]].astype({"config": str})
    for dataset, part in table.groupby("dataset"):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for colour, ((model, config), runs) in enumerate(part.groupby(["model", "config"])):
            for i, (seed, curve) in enumerate(runs.groupby("seed")):
                ax.plot(curve["epoch"], curve["valid_ndcg@10"], color=f"C{colour % 10}", lw=1,
                        ls="-" if colour < 10 else "--",
                        label=f"{model} {config} ({runs['seed'].nunique()} seeds)" if i == 0 else None)
        ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=f"Learning curves: {dataset}")
        ax.legend(fontsize=8)
        yield fig, f"learning_curves_{safe_name(dataset)}.png"


def draw_ablation(table, cfg, plt):
    table = table[(table["split"] == "test") & (table["preset"] == cfg["preset"])]
    if len(table):
        means = table.groupby(["dataset", "model"])["ndcg@10"].agg(["mean", "std"]).unstack("model")
        fig, ax = plt.subplots(figsize=(6, 4))
        means["mean"].plot.bar(yerr=means["std"].fillna(0), ax=ax, rot=0)
        ax.set(ylabel="test NDCG@10", title="Ablation: holographic binding vs item-only")
        yield fig, "ablation.png"


def draw_grid(table, cfg, plt):
    fig, ax = plt.subplots(figsize=(6, 4))
    for dataset, part in table.groupby("dataset"):
        ax.scatter(part["valid_ndcg@10"], part["test_ndcg@10"], label=dataset)
    ax.set(xlabel="validation NDCG@10", ylabel="test NDCG@10", title="Grid search trials")
    ax.legend()
    yield fig, "grid_search.png"


def draw_grid_trials(table, cfg, plt):
    """Validation NDCG@10 of every grid trial of a dataset, labelled by the keys its grid set, with the item-only
    and SASRec runs of the same preset and first seed (from benchmark.csv) as reference lines."""
    metrics = {"trial", "dataset", "best_epoch", "epochs", "stopped_by", "train_seconds"} | \
        {c for c in table if c.startswith(("valid_", "test_"))}
    bench_path = Path(cfg["results_dir"]) / "benchmark.csv"
    bench = pd.read_csv(bench_path) if bench_path.is_file() else pd.DataFrame(columns=["dataset"])
    for dataset, part in table.groupby("dataset"):
        part = part.sort_values("valid_ndcg@10")
        varying = [k for k in part if k not in metrics and part[k].nunique(dropna=False) > 1]
        labels = ["; ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row[varying].items()
                            if pd.notna(v)) or "base" for _, row in part.iterrows()]
        fig, ax = plt.subplots(figsize=(12, 1.2 + 0.3 * len(part)))
        stopped = part["stopped_by"].fillna("") if "stopped_by" in part else pd.Series("", index=part.index)
        colours = {"patience": "C0", "time_limit": "C3"}
        ax.barh(range(len(part)), part["valid_ndcg@10"], color=[colours.get(s, "0.6") for s in stopped])
        for why, colour in (("ended by patience", "C0"), ("ended by the time limit", "C3"), ("end not recorded", "0.6")):
            ax.barh([0], [0], color=colour, label=why)
        ax.set_yticks(range(len(part)), labels, fontsize=7)
        refs = bench[(bench["dataset"] == dataset) & (bench["split"] == "valid") & (bench["preset"] == cfg["preset"])
                     & (bench["seed"] == seeds(cfg)[0])] if len(bench) else bench
        for colour, model in (("C1", "Mamba-ItemOnly"), ("C2", "SASRec")):
            rows = refs[refs["model"] == model] if len(refs) else refs
            if len(rows):
                ax.axvline(rows["ndcg@10"].iloc[-1], color=colour, ls="--", label=f"{model} (seed {seeds(cfg)[0]})")
        low = part["valid_ndcg@10"].min()
        ax.set_xlim(left=0.9 * low)
        ax.set(xlabel="validation NDCG@10", title=f"Grid trials: {dataset} (HoloMamba)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="lower right")
        yield fig, f"grid_trials_{safe_name(dataset)}.png"


def drawn(specs, cfg, plt, say_missing=False):
    """(figure, name) from every (result file, drawing function) of `specs` whose file exists (a missing one is
    skipped, with a note when say_missing). A source of None draws from the model's definition, not from results."""
    for source, draw in specs:
        path = source(cfg) if source else None
        if path is not None and not path.is_file():
            if say_missing:
                print(f"paper: skipped the figure of {draw.__name__}: {path} is missing")
            continue
        yield from draw(read_results(path) if path else None, cfg, plt)


def plot_figures(cfg):
    """Draw every figure whose result file exists into cfg['figures_dir'] as PNG, in the paper's style (PAPER_RC);
    returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with plt.rc_context(PAPER_RC):
        for fig, name in drawn(FIGURES, cfg, plt):
            path = Path(cfg["figures_dir"]) / (name if name.endswith(".png") else f"{name}.png")
            if fig.get_layout_engine() is None:
                fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=150, format="png", bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


# ---- figures of the paper: vector PDF and PNG in paper_dir/figures (the paper stage draws them); the compression
# ---- and efficiency drawers also draw README's PNGs (FIGURES) ------------------------------------------------
PAPER_RC = {"font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "legend.fontsize": 7, "xtick.labelsize": 7,
            "ytick.labelsize": 7, "pdf.fonttype": 42, "axes.spines.top": False, "axes.spines.right": False}


def plain_title(dataset):
    return DATASET_TITLES.get(dataset, dataset)


def chart_box(ax, x, y, w, h, text, colour, size=7.5):
    from matplotlib.patches import FancyBboxPatch
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.4,rounding_size=1.2", fc=colour, ec="0.25", lw=0.8))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, linespacing=1.35)


def chart_arrow(ax, start, end, text="", style="-|>", offset=(0, 1.6)):
    ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": style, "lw": 0.9, "color": "0.2",
                                                      "shrinkA": 0, "shrinkB": 0})
    if text:
        ax.text((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1], text, ha="center",
                fontsize=6.5, color="0.25")


def draw_architecture(_, cfg, plt):
    """HoloMamba: item and attribute embeddings bound by circular convolution, Mamba blocks, tied output scoring
    (drawn from the model's definition, no result file)."""
    fig, ax = plt.subplots(figsize=(7.0, 3.0))
    ax.set(xlim=(0, 100), ylim=(0, 46))
    ax.axis("off")
    blue, orange, green, grey = "#dbe8f6", "#fde3c8", "#dcefd9", "#eeeeee"
    chart_box(ax, 0.5, 31, 14, 7, "item $i$\nembedding $x_i$", blue, 7)
    chart_box(ax, 0.5, 17.5, 14, 8, "attributes of $i$:\nthe mean per\nfield $f$, $\\bar a_{i,f}$", orange, 7)
    chart_box(ax, 0.5, 4, 14, 8, "one role $r_f$\nper field (fixed,\nunit modulus)", grey, 7)
    chart_box(ax, 20, 11, 21, 27, "bind by FFT:\n"
              "$r \\circledast a = \\mathcal{F}^{-1}(\\mathcal{F}r \\odot \\mathcal{F}a)$\n\n"
              "item vector:\n$e_i = x_i + \\Sigma_f\\, g_f\\, r_f \\circledast \\bar a_{i,f}$\n\n"
              "(paper form:\n$e_i = x_i + \\alpha\\, x_i \\circledast \\bar a_i$)", orange, 6.8)
    chart_arrow(ax, (15.5, 34.5), (19.2, 31))
    chart_arrow(ax, (15.5, 21.5), (19.2, 24))
    chart_arrow(ax, (15.5, 8), (19.2, 16))
    chart_box(ax, 47.5, 4, 24, 37, "Mamba block $\\times N$\n\nLayerNorm, in-proj: $x, z$\n"
              "causal conv, SiLU\n$\\Delta_t, B_t, C_t$ from $x_t$\n\nselective scan:\n"
              "$h_t = e^{\\Delta_t A} h_{t-1} + \\Delta_t B_t x_t$\n$y_t = C_t h_t + D x_t$\n\n"
              "$y_t \\odot \\mathrm{SiLU}(z_t)$, out-proj\n+ residual\nLayerNorm, FFN\n+ residual", blue, 6.8)
    chart_arrow(ax, (41.8, 26), (46.7, 26))
    ax.text(44.2, 21.5, "Layer-\nNorm,\ndrop-\nout", ha="center", va="top", fontsize=6, color="0.25")
    chart_box(ax, 78, 26, 21, 13, "scores $s_{t,j} = h_t^{\\top} e_j$\nfor every item $j$;\n"
              "full-softmax cross-\nentropy on $i_{t+1}$,\nat every position", green, 6.8)
    chart_box(ax, 78, 4, 21, 14, "attribute loss ($\\lambda$):\n$h_t \\circledast r_f^{*}$ scored\n"
              "against every attribute\nof field $f$; cross-\nentropy on $a_{i_{t+1},f}$", green, 6.8)
    chart_arrow(ax, (72.3, 32.5), (77.2, 32.5), "$h_t$", offset=(0, 1.2))
    chart_arrow(ax, (72.3, 14), (77.2, 11), "$h_t$", offset=(0, 1.6))
    ax.plot([30.5, 30.5, 88, 88], [38.6, 44, 44, 41.5], color="0.35", lw=0.9, ls="--")
    chart_arrow(ax, (88, 41.6), (88, 39.6))
    ax.text(59, 44.8, "tied output table: the same (unnormalised) $e_j$ scores every item $j$", ha="center",
            fontsize=6.5, color="0.25")
    yield fig, "architecture"


def run_choices(history):
    """The configs chosen on validation, from learning curves: the best validation NDCG@10 of each run (its best
    epoch), averaged over seeds (chosen_configs)."""
    best = history.groupby(["dataset", "model", "config", "seed"], sort=False)["valid_ndcg@10"].max()
    return chosen_configs(best.rename("ndcg@10").reset_index().assign(split="valid"))


def draw_paper_accuracy(table, cfg, plt):
    """Test NDCG@10, mean and standard deviation over seeds, of each model's config chosen on validation."""
    chosen, test = chosen_configs(table), table[table["split"] == "test"]
    datasets = list(dict.fromkeys(test["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.0, 2.2), squeeze=False, layout="constrained")
    for ax, dataset in zip(axes[0], datasets):
        part = test[test["dataset"] == dataset]
        models = [m for m in in_order(part["model"], MODEL_NAMES) if m != "HoloMamba-Shuffled"]
        values = [part[(part["model"] == m) & (part["config"] == chosen[(dataset, m)])]["ndcg@10"] for m in models]
        ax.errorbar([v.mean() for v in values], range(len(models)), xerr=[v.std() for v in values], fmt="o", ms=3.5,
                    capsize=2.5, color="C0", ecolor="0.3", lw=0.9)
        ax.set_yticks(range(len(models)), models)
        ax.set_ylim(len(models) - 0.5, -0.5)
        ax.set(xlabel="test NDCG@10 (mean ± std over seeds)", title=plain_title(dataset))
        ax.grid(axis="x", lw=0.4, alpha=0.5)
    yield fig, "accuracy"


def draw_paper_learning_curves(table, cfg, plt):
    """Validation NDCG@10 per epoch of each model's chosen config, one line per seed."""
    table = table[table["preset"] == "best"] if "best" in set(table["preset"]) else table
    chosen = run_choices(table)
    datasets = list(dict.fromkeys(table["dataset"]))
    fig, axes = plt.subplots(1, len(datasets), figsize=(7.0, 2.5), squeeze=False, layout="constrained")
    for ax, dataset in zip(axes[0], datasets):
        part = table[table["dataset"] == dataset]
        models = [m for m in in_order(part["model"], MODEL_NAMES) if m != "HoloMamba-Shuffled"]
        for colour, model in enumerate(models):
            runs = part[(part["model"] == model) & (part["config"] == chosen[(dataset, model)])]
            for i, (_, curve) in enumerate(runs.groupby("seed")):
                ax.plot(curve["epoch"], curve["valid_ndcg@10"], color=f"C{colour}", lw=0.8, alpha=0.85,
                        label=model if i == 0 else None)
        ax.set(xlabel="epoch", ylabel="validation NDCG@10", title=plain_title(dataset))
        ax.set_ylim(bottom=0)
        ax.legend(frameon=False)
    yield fig, "learning_curves"


def draw_compression(table, cfg, plt):
    """NDCG@10 and latency of ranking every user against the bundling window k (device in the title)."""
    for dataset, part in table.groupby("dataset", sort=False):
        fig, axes = plt.subplots(1, 2, figsize=(7.0, 2.3), layout="constrained")
        plain = part[part["bundling"] == "none"]
        for colour, mode in enumerate(("untrained", "trained")):
            rows = pd.concat([plain, part[part["bundling"] == mode]]).sort_values("k")
            for ax, column in zip(axes, ("ndcg@10", "latency_ms")):
                ax.plot(rows["k"], rows[column], "o-", color=f"C{colour}", ms=3.5, lw=1, label=f"{mode} bundling")
        for ax, label in zip(axes, ("test NDCG@10", "ranking all users (ms)")):
            ax.set(xlabel="bundling window k (items per token)", ylabel=label)
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
            ax.set_xticks(sorted(part["k"].unique()), [str(k) for k in sorted(part["k"].unique())])
            ax.set_ylim(bottom=0)
        axes[0].legend(frameon=False)
        device = ", ".join(dict.fromkeys(part["device"].astype(str)))
        fig.suptitle(f"{plain_title(dataset)}, last {int(plain['history_len'].iloc[0])} items per user; "
                     f"timings on device: {device}", fontsize=8.5)
        yield fig, f"compression_{safe_name(dataset)}" if table["dataset"].nunique() > 1 else "compression"


def draw_efficiency(table, cfg, plt):
    """Training throughput, peak training memory and one streaming step against the sequence length."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    if "skipped" in table:
        table = table[table["skipped"].isna() | (table["skipped"].astype(str) == "")]
    fig, axes = plt.subplots(1, 3, figsize=(7.0, 2.4), layout="constrained")
    for colour, (model, part) in enumerate(table.groupby("model", sort=False)):
        for ax, column in zip(axes, ("train_seqs_per_s", "train_peak_mem_mb", "stream_step_ms")):
            ax.plot(part["max_len"], part[column], "o-", color=f"C{colour}", ms=3, lw=1, label=model)
    for ax, label in zip(axes, ("training sequences / s", "peak training memory (MiB)", "one streaming step (ms)")):
        ax.set(xlabel="sequence length L", ylabel=label, xscale="log", yscale="log")
        ax.yaxis.set_minor_locator(LogLocator(subs=(2, 5)))
        for axis in (ax.xaxis, ax.yaxis):  # plain numbers (2000, 5000, 10000), not powers of ten
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=3, frameon=False)
    fig.suptitle(f"Timings on device: {', '.join(dict.fromkeys(table['device'].astype(str)))}", fontsize=8.5)
    yield fig, "efficiency"


FIGURES = [  # README's figures (figures_dir, PNG): (path of the result file given the config, drawing function)
    (lambda cfg: Path(cfg["results_dir"]) / "history.csv", draw_learning_curves),
    (lambda cfg: Path(cfg["results_dir"]) / "ablation.csv", draw_ablation),
    (lambda cfg: Path(cfg["results_dir"]) / "compression.csv", draw_compression),
    (lambda cfg: Path(cfg["results_dir"]) / "efficiency.csv", draw_efficiency),
    (lambda cfg: Path(cfg["grid_csv"]), draw_grid),
    (lambda cfg: Path(cfg["grid_csv"]), draw_grid_trials),
]

PAPER_FIGURES = [  # (result file given the config, or None: drawn from the model's definition; drawing function)
    (None, draw_architecture),
    (lambda cfg: Path(cfg["results_dir"]) / "accuracy.csv", draw_paper_accuracy),
    (lambda cfg: Path(cfg["results_dir"]) / "history.csv", draw_paper_learning_curves),
    (lambda cfg: Path(cfg["results_dir"]) / "compression.csv", draw_compression),
    (lambda cfg: Path(cfg["results_dir"]) / "efficiency.csv", draw_efficiency),
]


def save_paper_figure(fig, stem):
    """A figure as vector PDF (no creation date, so a redraw of the same results is the same file) and as PNG,
    cropped to its drawn extent (measured once, for both)."""
    fig.draw_without_rendering()  # the layout engine places the axes first
    box = fig.get_tightbbox(fig.canvas.get_renderer()).padded(0.03)
    paths = []
    for fmt, extra in (("pdf", {"metadata": {"CreationDate": None}}), ("png", {"dpi": 200})):
        with atomic_path(stem.with_suffix(f".{fmt}")) as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches=box, **extra)
        paths.append(stem.with_suffix(f".{fmt}"))
    return paths


def plot_paper_figures(cfg, folder):
    """Draw PAPER_FIGURES whose result file exists into `folder` (PDF and PNG); returns the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    with plt.rc_context(PAPER_RC):
        for fig, name in drawn(PAPER_FIGURES, cfg, plt, say_missing=True):
            written += save_paper_figure(fig, Path(folder) / name)
            plt.close(fig)
    return written


# =====================================================================================================
# §11 Python API and command line
# =====================================================================================================
# The API the notebooks and scripts use: config, load_dataset, build_model, fit, evaluate, save, load
# (with rank_targets, Batch / Output and the model classes for finer work). main() is the command line.
def load_dataset(source="synthetic", cfg=None, *, attributes=None, name="frame", **overrides):
    """A prepared dataset (SequenceData): a built-in one by name ('ml-1m', 'amazon-beauty', 'synthetic'), a
    'csv:DIR' or 'recbole:DIR/NAME' spec, a Config of one dataset, or a pandas DataFrame with columns user,
    item, time (ties in time keep row order) and optional `attributes` {raw item id: [attribute tokens]}. Data
    keys (data_dir, min_user_count, attribute_mode, ...) as keywords, e.g.
    load_dataset("ml-1m", data_dir="../shared/datasets")."""
    if isinstance(source, Mapping):
        return read_dataset(Config(source).replace(**overrides))
    if isinstance(source, pd.DataFrame):
        cfg = (config(**overrides) if cfg is None else Config(cfg).replace(**overrides)).replace(dataset=f"frame:{name}")
        missing = {"user", "item", "time"} - set(source.columns)
        if missing:
            raise DataError(f"the DataFrame lacks the column(s) {sorted(missing)}: expected user, item, time")
        return prepare_dataset(cfg["dataset"], source[["user", "item", "time"]], attributes or {}, cfg)
    cfg = config(source, **overrides) if cfg is None else Config(cfg).replace(dataset=source, **overrides)
    return read_dataset(cfg)


def setup_distributed(overrides):
    """Under torchrun (WORLD_SIZE > 1): one process per GPU (NCCL), several processes sharing GPUs (gloo;
    useful for the grid stage, whose trials are independent), or CPU processes (gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or torch.distributed.is_initialized():
        return overrides
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available() and overrides.get("device", "auto") != "cpu":
        gpu = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(gpu)
        torch.distributed.init_process_group("nccl" if world <= torch.cuda.device_count() else "gloo")
        return dict(overrides, device=f"cuda:{gpu}")
    torch.distributed.init_process_group("gloo")
    return dict(overrides, device="cpu")


OUTPUT_STAGES = {"benchmark", "ablation", "grid", "compression", "efficiency", "memory", "figures", "recommend", "ddp"}


def check_outputs(cfg, stages):
    """Before any training: every output folder can be written (a file is created there and removed), the grid
    log is a file name, and the result files that the stages merge into are readable CSVs. One line names the
    key otherwise, so a bad folder is found in a second rather than after hours of training."""
    if not set(stages) & OUTPUT_STAGES:
        return
    if not cfg["grid_csv"].strip() or Path(cfg["grid_csv"]).is_dir():
        raise ConfigError(f"--grid_csv={cfg['grid_csv']}: give a file name for the grid log")
    for key in ("results_dir", "checkpoint_dir", "figures_dir", "grid_csv"):
        folder = Path(cfg[key]).parent if key == "grid_csv" else Path(cfg[key])
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"--{key}={cfg[key]}: cannot write there ({exc.strerror or exc}); choose a writable "
                              "folder") from None
    for path in Path(cfg["results_dir"]).glob("*.csv"):
        read_results(path)
    read_log(cfg["grid_csv"])


def plan(overrides):
    """The invocation's own config and one config per dataset, all resolved and validated up front."""
    base = resolve_config(overrides)
    return base, [resolve_config(overrides, dataset) for dataset in as_list(base["dataset"])]


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = parse_cli(argv)
        plan(overrides)  # fail now, not after hours, on a bad value of any dataset
        base, configs = plan(setup_distributed(overrides))
        stages = as_list(base["stage"])
        if stages == ["all"]:
            stages = list(PAPER_SEQUENCE) + (["efficiency"] if base["preset"] == "quick" else [])
        device = pick_device(base["device"])
        if is_main_process():
            what = f"checkpoint: {base['checkpoint']}" if stages == ["recommend"] else \
                f"preset: {base['preset']} | datasets: {base['dataset']}"
            print(f"HoloMambaRec {__version__} | stages: {', '.join(stages)} | {what} | device: {device} | mamba-ssm "
                  f"kernel: {device.type == 'cuda' and cuda_kernel('selective_scan') is not None}", file=sys.stderr)
        check_outputs(base, stages)
        store = RunStore(base, given=overrides)
        for stage in stages:
            STAGES[stage](store, configs)
        if is_main_process() and not set(stages) <= {"stats", "recommend", "paper", "ddp"}:
            for path in plot_figures(base):
                print(f"figure: {path}", file=sys.stderr)
        if torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank is done before any closes its connections
    except ArgumentParser.Exit as exc:
        return exc.status
    except (ConfigError, DataError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished runs and trials are saved; a run cut short keeps its best weights so far in "
              "<checkpoint>.partial.pt, and the same command with --resume continues it", file=sys.stderr)
        return 130
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
