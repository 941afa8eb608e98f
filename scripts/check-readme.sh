#!/usr/bin/env bash
# The README test (run by .ci/run): every command in README.md's ```bash and
# ```sh blocks must work as written from a clone of this repository.
#   - a command naming a repository path (scripts/x.sh, .ci/run) needs that
#     file tracked by git and executable; a command naming a program (cargo,
#     curl) needs it on PATH;
#   - the cheap ones, those asking for --help, are run and must exit 0 and
#     print a usage text;
#   - every relative link and every backquoted repository path in README.md
#     and docs/ must exist in git;
#   - no file users read (README.md, docs/, deploy/, browser-test/, config/)
#     may point outside the repository (../shared and the like).
# Prints one line per check and `readme: N passed, M failed`.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/daisi-ws/target}"

passed=0
failed=0
ok() { passed=$((passed + 1)); echo "ok   $*"; }
fail() { failed=$((failed + 1)); echo "FAIL $*"; }
tracked() { git ls-files --error-unmatch -- "$1" >/dev/null 2>&1 || [ -n "$(git ls-files -- "$1" | head -n1)" ]; }

# 1. Fenced commands, one per line (backslash continuations joined, comments dropped).
commands="$(awk '
  /^```(bash|sh)[[:space:]]*$/ { inblock = 1; next }
  /^```/ { inblock = 0; cont = ""; next }
  inblock {
    line = $0
    if (cont != "") { line = cont " " line; cont = "" }
    if (line ~ /\\$/) { sub(/\\$/, "", line); cont = line; next }
    sub(/[[:space:]]+#.*$/, "", line)
    sub(/^[[:space:]]+/, "", line)
    if (line != "" && line !~ /^#/) print line
  }
' README.md)"
if [ -z "$commands" ]; then
  fail "README.md has no \`\`\`bash command"
fi
while IFS= read -r cmd; do
  [ -n "$cmd" ] || continue
  read -r -a words <<<"$cmd"
  prog="${words[0]}"
  [ "$prog" = "bash" ] && [ ${#words[@]} -gt 1 ] && prog="${words[1]}"
  if [[ "$prog" == */* ]]; then
    if ! tracked "$prog"; then
      fail "\`$cmd\`: $prog is not in the repository"
      continue
    fi
    if [ "${words[0]}" != "bash" ] && [ ! -x "$prog" ]; then
      fail "\`$cmd\`: $prog is not executable"
      continue
    fi
  elif ! command -v "$prog" >/dev/null 2>&1; then
    fail "\`$cmd\`: $prog is not on PATH"
    continue
  fi
  if [[ " $cmd " == *" --help "* ]]; then
    set +e
    out="$(timeout 1200 bash -c "$cmd" 2>&1)"
    rc=$?
    set -e
    if [ "$rc" -ne 0 ]; then
      fail "\`$cmd\` exited $rc: $(tail -n 5 <<<"$out")"
    elif ! grep -qi "usage" <<<"$out"; then
      fail "\`$cmd\` printed no usage: $(tail -n 3 <<<"$out")"
    else
      ok "\`$cmd\` runs"
    fi
  else
    ok "\`$cmd\` names an existing command"
  fi
done <<<"$commands"

# 2. Links and backquoted paths in the docs users read.
for doc in README.md docs/*.md; do
  [ -f "$doc" ] || continue
  dir="$(dirname "$doc")"
  bad=()
  while IFS= read -r link; do
    [ -n "$link" ] || continue
    target="${link%%#*}"
    [ -n "$target" ] || continue
    path="$target"
    [ "$dir" != "." ] && [ -e "$dir/$target" ] && path="$dir/$target"
    tracked "${path%/}" || bad+=("($target)")
  done < <(grep -o '](\([^)]*\))' "$doc" | sed 's/^](\(.*\))$/\1/' | grep -v '^[a-z]*:' || true)
  while IFS= read -r p; do
    [ -n "$p" ] || continue
    tracked "${p%/}" || bad+=("\`$p\`")
  done < <(grep -o '`\(\.ci\|scripts\|docs\|config\|deploy\|browser-test\|proto\|edge\|router\|common\|dev-stack\|loadtest\|testkit\)/[A-Za-z0-9_./-]*`' "$doc" | tr -d '`' | grep -v '[*{]' || true)
  if [ ${#bad[@]} -eq 0 ]; then ok "$doc: every link and path exists"; else fail "$doc: missing ${bad[*]}"; fi
done

# 3. Nothing users read points outside the repository.
outside="$(git grep -n -E '\.\./shared|/work/shared|\.\./\.\./' -- README.md docs deploy browser-test config \
  ':!*.lock' ':!*package-lock.json' || true)"
if [ -z "$outside" ]; then ok "no path outside the repository"; else fail "paths outside the repository:"$'\n'"$outside"; fi

echo "readme: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
