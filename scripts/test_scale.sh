#!/usr/bin/env bash
# Real-size tests (tests/scale/): fclm-3b built with random bf16 weights on CPU and one stage-2 LoRA step
# (10–20 minutes on 2 cores, ~12 GB of memory; docs/scale.md). .ci/run calls it after scripts/test.sh.
# Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
FCLM_SCALE_TESTS=1 python -m pytest -q -s tests/scale "$@"
