#!/usr/bin/env bash
# Run the test suite (installs into .venv on first use, and Debian's chromium for the web page's browser
# test when it is missing). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
bash scripts/browser_deps.sh
python -m pytest -q "$@"
