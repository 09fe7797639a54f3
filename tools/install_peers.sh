#!/usr/bin/env bash
# Installs the pinned peers that the integration tests compare against, with their own
# code but without their heavy dependencies (vLLM, flash-attn, GPU builds):
# verl 0.9.1 and OpenRLHF 0.11.2 with --no-deps, DeepSpeed's pure-Python package (OpenRLHF's
# model utilities import it at the top; no ops are built), and the small packages their
# modules import. Without them the integration tests skip and say what to run.
set -euo pipefail
PIP="${PIP:-python -m pip}"
$PIP install -q --no-deps verl==0.9.1 openrlhf==0.11.2
DS_BUILD_OPS=0 $PIP install -q --no-deps --no-build-isolation deepspeed==0.19.6
$PIP install -q omegaconf codetiming ray tensordict peft accelerate transformers datasets pandas pyarrow \
  hjson einops pylatexenc sympy psutil py-cpuinfo pydantic msgpack ninja orjson
