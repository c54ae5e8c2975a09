#!/usr/bin/env bash
# The test suite, with everything it needs: each step below says what it does; the first that fails stops it.
# It runs in the active virtual environment, or in ./.venv, which it makes the first time.
set -euo pipefail
cd "$(dirname "$0")"

# Chromium and nginx, for the test that renders the status page in a headless browser and the one that runs two
# instances behind nginx: installed only where that can be done (as root, with apt-get) and one is missing.
if ! { command -v chromium >/dev/null && command -v nginx >/dev/null; } && command -v apt-get >/dev/null \
  && [ "$(id -u)" = 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends chromium nginx >/dev/null
fi

# A virtual environment for the test packages in .venv (made once, then reused), unless one is active already:
# the Python that Debian, Ubuntu or Homebrew ships will not install packages outside one (PEP 668).
if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || python3 -m venv .venv
  . .venv/bin/activate
fi

# The Python packages the tests use (pytest, httpx, the OpenAI and Anthropic SDKs, ruff, ...).
pip install -r requirements-dev.txt

# Lint (the rules in pyproject.toml) and formatting: both must find nothing.
ruff check .
ruff format --check .

# Two real claude CLIs, into ./.cli: the newest on npm, and the oldest supported.
npm install --no-save --prefer-online --prefix .cli/latest @anthropic-ai/claude-code@latest
npm install --no-save --prefer-online --prefix .cli/oldest @anthropic-ai/claude-code@2.1.197

# The Vercel AI SDK, at versions that run on Node.js 20, into ./.cli/ai.
npm install --no-save --prefer-online --prefix .cli/ai ai@6.0.325 @ai-sdk/openai@3.0.139 zod@4.6.7

# The whole suite, on the newest CLI.
python -m pytest

# The real-CLI tests again, on the oldest CLI.
CLAUDE_TEST_BIN=.cli/oldest/node_modules/.bin/claude python -m pytest -k test_real_
