#!/usr/bin/env bash
# CI's check of the published leaderboard: leaderboards/ (but for its study files and screenshots) and the
# README's leaderboard block are exactly what `harness report` renders from the committed results.db, and
# `harness verify` re-derives ${HARNESS_VERIFY_CELLS:-2} stored cells of the undefended classifier (the
# cheapest to rebuild: only the base classifier is trained) on ${HARNESS_VERIFY_SAMPLES:-64} samples each.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
if [ ! -f results.db ]; then
  echo "no committed results.db: nothing to check"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# render from a copy, so the committed store is never touched (opening a store may upgrade its schema)
cp results.db README.md "$tmp/"
(cd "$tmp" && harness report --db results.db --out leaderboards --readme README.md >/dev/null)
if ! diff -r --exclude=studies --exclude=screenshots --exclude=out leaderboards "$tmp/leaderboards" >"$tmp/diff.txt" \
   || ! diff README.md "$tmp/README.md" >>"$tmp/diff.txt"; then
  echo "the committed leaderboard differs from what \`harness report --readme README.md\` renders from results.db:"
  head -n 40 "$tmp/diff.txt"
  exit 1
fi
echo "leaderboards/ and the README's block are what harness report renders from results.db"
cp results.db "$tmp/verify.db"
harness verify --db "$tmp/verify.db" --defense none --cells "${HARNESS_VERIFY_CELLS:-2}" \
  --samples "${HARNESS_VERIFY_SAMPLES:-64}"
