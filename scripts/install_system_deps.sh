#!/usr/bin/env bash
# Installs the system programs `scripts/make_samples.py` needs: espeak-ng (speech synthesis) and sox
# (resampling to Mimi's 24 kHz). Installs only what is missing, so a second run changes nothing.
set -euo pipefail

declare -A package_of=([espeak-ng]=espeak-ng [sox]=sox)
missing=()
for program in espeak-ng sox; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${package_of[$program]}")
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "system deps: espeak-ng and sox already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "error: missing ${missing[*]} and apt-get is not available; install them with your package manager" >&2
    exit 1
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo)
    else
        echo "error: missing ${missing[*]}; installing them needs root. Run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
fi

echo "system deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
