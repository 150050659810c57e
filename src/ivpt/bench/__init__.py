"""Speed and memory of every model kind, measured side by side on this machine (``ivpt bench``).

What is measured, per group of models built at one image size and one ``n_pro``:

- forward: eval mode, ``torch.no_grad``, one batch of ``batch`` images; the reference is the plain frozen timm
  backbone's ``forward_features`` on the same batch;
- train step: exactly what the trainer does per optimiser step — :func:`ivpt.engine.trainer.compute_loss` (one forward
  of the clean and the warped view together for ivpt / last_layer_parts with equivariance on, all loss terms),
  backward, global grad-norm clip, Adam step on the model's ``param_groups``, ``zero_grad``;
- peak memory of the first forward / first train step (the warm-up run) above what was resident before it
  (model, inputs): activations, gradients, workspace, plus the Adam state the first step creates (8 bytes per
  trainable parameter). CUDA: ``torch.cuda.max_memory_allocated`` minus the allocation before the run. CPU
  (tracemalloc cannot see torch's allocations): the kernel's resident-set high-water mark (``VmHWM``), reset
  through ``/proc/self/clear_refs`` after ``malloc_trim`` hands freed heap pages back, minus the resident set
  before the run. Where that reset is not possible, each measurement runs in a fresh subprocess
  (``python -m ivpt.bench probe``) and reports its max-RSS delta instead.

Runs interleave the models (A B C A B C ...) so that machine noise — other jobs on a shared CPU — is spread over
all of them. The headline ``ratios`` divide minimum times: load from other processes only ever adds time, and a
burst of it slows single runs (with 2 OpenMP threads on 2 busy cores, by up to 4×), so the fastest run is the
best estimate of a model's own cost; ``ratios_median`` divide medians, and the raw times are kept. Per-image
times are time / ``batch``: a train step of ivpt processes 2·batch images internally but trains on ``batch``
distinct ones. Backbone weights are random (no
download): speed does not depend on the values.

Groups: ``main`` (every kind at ``img_size``), then (full run only) growth with the image size (224, 336, 448,
518) and with the number of prompted stages (``n_pro`` of length 2..5), each with the backbone and VPT-deep as
the references measured in the same interleaved loop. ``--quick`` measures ``main`` only with few repeats.

Precision: ``amp`` (none | bf16 | fp16) autocasts every forward and train step, the backbone reference's too
(fp16 train steps go through a GradScaler, as the trainer's). Besides the models: the images/s of the real
training DataLoader for the CPU and the ``data.gpu_augment`` path (:mod:`ivpt.bench.loader`), and the
projection of the paper recipe on CUB from the measured numbers (:func:`project`). ``--profile`` adds operator
tables and where an ivpt train step's time goes, by phase (:mod:`ivpt.bench.phases`).
"""
from __future__ import annotations

from .measure import _probe_main, _probe_subprocess, measure_peak_mb, time_group
from .options import (
    BACKBONE,
    CUB_TEST_IMAGES,
    CUB_TRAIN_IMAGES,
    KINDS,
    PAPER_EPOCHS,
    BenchOptions,
    Entry,
    Group,
    plan,
    targets,
)
from .report import _targets, project, render_markdown
from .run import run_bench

__all__ = ["BenchOptions", "Entry", "Group", "project", "render_markdown", "run_bench", "targets"]
