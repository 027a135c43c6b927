#!/usr/bin/env bash
# Idempotent set-up for `make demo` / `make test`: a virtualenv in .venv with a CPU torch and
# pinned dependencies. Re-running is cheap: a stamp records what was installed.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${CKPT_IR_TORCH:-torch==2.13.0}

step() { echo "setup: $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating $VENV with $("$PY" --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.ckpt-ir-setup"
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  step "$VENV is up to date"
  exit 0
fi
step "upgrading pip"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, pinned: any unpinned torch requirement resolved later would otherwise pull the
# newest CUDA build (several GB). An already-installed torch that satisfies the pin is kept.
if "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  step "keeping the installed torch $("$VENV/bin/python" -c "import torch; print(torch.__version__)")"
else
  step "installing $TORCH_SPEC (CPU build; a few minutes on a fresh machine)"
  "$VENV/bin/python" -m pip install -q "$TORCH_SPEC"
fi
step "installing ckpt-ir and its test dependencies (pinned by constraints.txt)"
"$VENV/bin/python" -m pip install -q -c constraints.txt -e ".[test]"
# verl's FSDP checkpoint manager for the verl-fsdp client tests, without verl's requirements
# (Ray, vLLM, a CUDA stack): --no-deps, each package pinned by constraints.txt.
step "installing verl 0.9.1 and the few modules its checkpoint manager imports (--no-deps)"
"$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt verl omegaconf \
  antlr4-python3-runtime tensordict pyvers cloudpickle orjson importlib_metadata zipp
# torchtitan's models, state-dict adapters and checkpointer for the torchtitan client tests,
# without its training requirements (datasets, torchdata, wandb, tensorboard, which the models
# and the checkpointer never import): --no-deps, each package pinned by constraints.txt.
step "installing torchtitan 0.3.0 and the few modules its models and checkpointer import (--no-deps)"
"$VENV/bin/python" -m pip install -q --no-deps -c constraints.txt torchtitan spmd_types tyro \
  docstring_parser
echo "$want" > "$stamp"
step "done"
