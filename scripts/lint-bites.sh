#!/usr/bin/env bash
# The clock, randomness and ordering rule bites (README, "Development"): clippy, checking
# src/lint_bites.rs inside the deciding crate (feature lint-bites), must refuse a call of
# every method that clippy.toml lists, and a `for` over a hash map. Fails when one passes:
# a path clippy does not resolve (it only warns, or with allow-invalid says nothing), or a
# lost `deny` in src/lib.rs.
set -uo pipefail
cd "$(dirname "$0")/.."

if out=$(cargo clippy -p gatehouse --lib --features lint-bites --message-format=short 2>&1); then
	echo "clippy accepted src/lint_bites.rs: the rule does not bite" >&2
	exit 1
fi
expected=$(grep -o '^ *{ path = "[^"]*"' clippy.toml | cut -d'"' -f2 | sort -u)
refused=$(grep '^src/lint_bites\.rs:[0-9:]* error: use of a disallowed method `' <<<"$out" |
	sed 's/.*`\(.*\)`$/\1/' | sort -u)
status=0
missing=$(comm -23 <(echo "$expected") <(echo "$refused"))
if [ -n "$missing" ]; then
	echo "clippy.toml entries that did not fire in the deciding crate:" >&2
	echo "$missing" >&2
	status=1
fi
if ! grep -q '^src/lint_bites\.rs:[0-9:]* error: iteration over unordered hash-based type' <<<"$out"; then
	echo "a for loop over a HashMap was not refused (clippy::iter_over_hash_type)" >&2
	status=1
fi
other=$(grep -E '^[^ ]+:[0-9]+:[0-9]+: (error|warning)' <<<"$out" | grep -v '^src/lint_bites\.rs:')
if [ -n "$other" ]; then
	echo "clippy complained outside src/lint_bites.rs:" >&2
	echo "$other" >&2
	status=1
fi
if [ $status -ne 0 ]; then
	echo "$out" >&2
	exit 1
fi
echo "clippy refused all $(wc -l <<<"$expected") banned calls and the hash-map loop in the deciding crate"
