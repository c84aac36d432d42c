#!/usr/bin/env bash
# Builds the fuzz targets (cargo-fuzz on the stable toolchain: no sanitizer), replays the
# kept regression inputs (fuzz/regressions/<target>/, crashes found and fixed), then runs
# each target for FUZZ_SECONDS (default 30) from the seeds (fuzz/seeds/<target>/) and the
# regression inputs. A crash fails the script; libFuzzer leaves it in fuzz/artifacts/.
#   scripts/fuzz.sh [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

secs=${FUZZ_SECONDS:-30}
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(core_message state_file uapi netlink_dump)

cargo fuzz build -s none
for t in "${targets[@]}"; do
	inputs=()
	if [ -d "regressions/$t" ]; then
		while IFS= read -r -d '' f; do inputs+=("$f"); done < <(find "regressions/$t" -type f -print0)
	fi
	if [ ${#inputs[@]} -gt 0 ]; then
		echo "fuzz: $t: replaying ${#inputs[@]} regression inputs"
		cargo fuzz run -s none "$t" "${inputs[@]}"
	fi
	corpus=$(mktemp -d)
	trap 'rm -rf "$corpus"' EXIT
	seeds=()
	for d in "seeds/$t" "regressions/$t"; do [ -d "$d" ] && seeds+=("$d"); done
	echo "fuzz: $t: running for ${secs}s"
	cargo fuzz run -s none "$t" "$corpus" "${seeds[@]}" -- -max_total_time="$secs" -print_final_stats=1
	rm -rf "$corpus"
done
echo "fuzz: all targets ran without a crash"
