#!/usr/bin/env bash
# The packages the lent GPU machine lacks, carried in. That machine has no network, and one device
# call carries at most 64 MiB, this checkout's working tree included (29 MiB in 2026-12, exports/
# the bulk). Its image (Python 3.12, torch 2.11+cu130, CUDA 13 and cuDNN 9 as NVIDIA's pip wheels,
# onnxruntime 1.30 without the CUDA provider) has no litserve, FastAPI, uvicorn, pydantic or
# jsonschema, and no wrk.
#
# Which ONNX Runtime: PyPI's onnxruntime-gpu is built for CUDA 13 from 1.27.0 on. Its wheel metadata
# (pip install --dry-run --report) asks for nvidia-cuda-runtime-cu13~=13.0 and nvidia-cudnn-cu13~=9.0
# in 1.27.0, nvidia-cuda-runtime~=13.0 and nvidia-cudnn-cu13~=9.0 from 1.28.0 to 1.31.1; 1.26.0 and
# earlier ask for the -cu12 wheels (CUDA 12). Before 1.27 CUDA 13 builds came from ONNX Runtime's own
# feed, not PyPI (microsoft/onnxruntime issues 26238 and 27944), which these machines cannot reach.
# So 1.31.1 runs on the device's own CUDA 13 and cuDNN 9 wheels (torch's), with nothing more to
# carry. Its cp312 manylinux_2_28 wheel is 255.6 MB (the CUDA provider library alone is 284 MB
# unpacked; xz shrinks it by a fifth only), so it travels in chunks, one per call, while the
# machine stays warm.
#
#   bench/gpu_wheels.sh fetch            # here: .gpu/base/ (wheels and wrk's .debs) and .gpu/ort-NN/
#                                        # (onnxruntime-gpu in chunks); prints the device calls to make
#   bench/gpu_wheels.sh split FILE       # here: FILE in chunks .gpu/ort-NN/ (fetch does it)
#   bench/gpu_wheels.sh stash            # device: keep the carried chunks in $STASH for the next call
#   bench/gpu_wheels.sh install          # device: stash, join and sha256-check the chunks, install
#                                        # everything into $SITE; writes $STASH/env.sh to source
#
# .gpu/ is ignored by git. Without every chunk, install says so and installs the rest: serving then
# runs TorchScript on CUDA alone, and bench/gpu_serve.sh says ONNX Runtime CUDA was not measured.
set -euo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
GPU=${GPU_DIR:-.gpu}
STASH=${STASH:-/tmp/digitserve-gpu}
SITE=${SITE:-/tmp/site}
ORT=${ORT:-onnxruntime-gpu==1.31.1}
CARRY_LIMIT=$((64 * 1024 * 1024))
# In the device image already (KINDS.md's list, 2026-11-17): not carried.
DEVICE_HAS=(numpy pillow httpx httpcore h11 anyio idna certifi click attrs packaging tqdm jinja2 markupsafe pyyaml
            uvloop annotated_doc)
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 --platform manylinux_2_17_x86_64
          --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64)

tree_bytes() {  # what every device call carries anyway: tracked and untracked, not ignored, files
  git ls-files -z --cached --others --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}'
}

split_file() {  # FILE [CHUNK_BYTES]: .gpu/ort-NN/part.NN, each with the whole file's name, sha256 and count
  local file=$1 chunk=${2:-} work name
  if [ -z "$chunk" ]; then  # as large as a call allows beside the tree, 4 MiB to spare (others may add files)
    chunk=$((CARRY_LIMIT - $(tree_bytes) - 4 * 1024 * 1024))
  fi
  work=$(mktemp -d)
  name=$(basename "$file")
  rm -rf "$GPU"/ort-*
  split -b "$chunk" -d -a 2 "$file" "$work/part."
  local parts=("$work"/part.*) n=0
  local sum
  sum=$(sha256sum "$file" | cut -d' ' -f1)
  for part in "${parts[@]}"; do
    n=$((n + 1))
    mkdir -p "$GPU/ort-$(printf %02d $n)"
    mv "$part" "$GPU/ort-$(printf %02d $n)/"
    printf '%s %s %s\n' "$sum" "$name" "${#parts[@]}" > "$GPU/ort-$(printf %02d $n)/WHOLE"
  done
  rm -rf "$work"
  echo "$name: $(stat -c %s "$file") bytes in ${#parts[@]} chunks of at most $chunk bytes, sha256 $sum"
}

fetch() {
  local work
  work=$(mktemp -d)
  rm -rf "$GPU/base" && mkdir -p "$GPU/base"
  "$PYTHON" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))' \
    > "$work/requirements.txt"
  "$PYTHON" -m pip download -q "${PLATFORM[@]}" -d "$work/all" -r "$work/requirements.txt"
  for wheel in "$work"/all/*.whl; do
    local project
    project=$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')
    [[ " ${DEVICE_HAS[*]} " == *" $project "* ]] || mv "$wheel" "$GPU/base/"
  done
  # wrk: the load generator bench/harness.py prefers (Debian's; its only library beyond glibc and OpenSSL 3 is LuaJIT)
  (cd "$GPU/base" && apt-get download -q wrk libluajit-5.1-2 >/dev/null) || echo "wrk: not fetched (bench.load will be used)"
  "$PYTHON" -m pip download -q --no-deps "${PLATFORM[@]}" -d "$work/ort" "$ORT"
  split_file "$work"/ort/*.whl
  rm -rf "$work"
  local tree base parts
  tree=$(tree_bytes)
  base=$(du -sb "$GPU/base" | cut -f1)
  parts=("$GPU"/ort-*)
  echo "base: $(ls "$GPU/base" | wc -l) files, $base bytes; the working tree: $tree bytes"
  echo "Device calls, back to back while the machine stays warm (it goes back after ~30 s idle):"
  for part in "${parts[@]:0:${#parts[@]}-1}"; do
    echo "  carry [\"$part\"]: bench/gpu_wheels.sh stash"
  done
  local last=${parts[-1]}
  if [ $((tree + base + $(du -sb "$last" | cut -f1))) -le $CARRY_LIMIT ]; then
    echo "  carry [\"$last\", \"$GPU/base\"]: bench/gpu.sh"
  else
    echo "  carry [\"$last\"]: bench/gpu_wheels.sh stash"
    echo "  carry [\"$GPU/base\"]: bench/gpu.sh"
  fi
}

stash() {  # the chunks and base files this call carried, kept outside the checkout
  mkdir -p "$STASH/ort" "$STASH/base"
  local carried=("$GPU"/ort-*/*) base=("$GPU"/base/*)
  [ ${#carried[@]} -eq 0 ] || cp -f "${carried[@]}" "$STASH/ort/"
  [ ${#base[@]} -eq 0 ] || cp -f "${base[@]}" "$STASH/base/"
  local held=("$STASH"/ort/part.*) whole="- - ?"
  [ -f "$STASH/ort/WHOLE" ] && whole=$(cat "$STASH/ort/WHOLE")
  echo "stash: ${#held[@]} of ${whole##* } chunks held, $(ls "$STASH/base" | wc -l) base files"
}

install() {
  stash
  local wheels=("$STASH"/base/*.whl)
  if [ -f "$STASH/ort/WHOLE" ]; then
    local sum name count held=("$STASH"/ort/part.*)
    read -r sum name count < "$STASH/ort/WHOLE"
    if [ ${#held[@]} -eq "$count" ]; then
      cat "${held[@]}" > "$STASH/$name"
      if ! echo "$sum  $STASH/$name" | sha256sum -c --quiet - 2>/dev/null; then
        echo "install: $name does not match its sha256 after joining the chunks" >&2
        exit 1
      fi
      wheels+=("$STASH/$name")
    else
      echo "install: $name: ${#held[@]} of $count chunks here, not installed (ONNX Runtime CUDA blocked)"
    fi
  fi
  if [ ${#wheels[@]} -gt 0 ]; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
  fi
  for deb in "$STASH"/base/*.deb; do
    dpkg -x "$deb" "$STASH/root"
  done
  # Sourced by bench/gpu.sh: the carried packages before the image's (its onnxruntime is the CPU build)
  cat > "$STASH/env.sh" <<EOF
export PYTHONPATH=$SITE\${PYTHONPATH:+:\$PYTHONPATH}
export PATH=$STASH/root/usr/bin:\$PATH
export LD_LIBRARY_PATH=$STASH/root/usr/lib/x86_64-linux-gnu\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
EOF
  echo "install: ${#wheels[@]} wheels into $SITE; source $STASH/env.sh"
}

case "${1:-}" in
  fetch) fetch ;;
  split) split_file "$2" "${CHUNK:-}" ;;
  stash) stash ;;
  install) install ;;
  *) echo "usage: bench/gpu_wheels.sh fetch | split FILE | stash | install" >&2; exit 2 ;;
esac
