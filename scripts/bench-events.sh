#!/usr/bin/env bash
# Runs the issue-7 table (BENCHMARKS.md, "GPU-job events (issue 7)"):
# BenchmarkGPUEvents, BenchmarkPromptPost and the idle-socket memory of
# plain Caddy vs the gateway, ROUNDS rounds one after the other (so load
# changes hit both paths alike), appends everything to OUT, then prints the
# benchstat tables and the ratios against the goals.
#
#   bash scripts/bench-events.sh [ROUNDS] [OUT]      # defaults: 3, bench-events.txt
#
# BLAST_BENCHTIME (default 20x: jobs per socket in blast; a 1000-step job
# there takes about 10 ms, and 5 of them per round scattered the ratio by
# ±20 %), EVENTS_BENCHTIME (default 5x: jobs per socket, paced), PROMPT_BENCHTIME
# (default 20x: POSTs) and IDLE (default 1; 0 skips the idle-socket rows)
# tune it.
#
# CPUS says where the processes run: "shared" (the proxy, Caddy or the
# gateway, shares the machine's CPUs with the helper process that plays
# the fake GPUs and the browsers), "pinned" (the proxy alone on CPU 0, the
# helper on the others, with taskset: a load test's load generator apart
# from what it loads, as in a deployment where GPUs and browsers are other
# machines; the proxy then runs with GOMAXPROCS 1, a one-vCPU container)
# or "both" (the default: each round runs shared, then pinned). Pinned
# rows are marked "(pinned)"; BENCHMARKS.md, "Session 18", says why both.
# About 1.5 min per round (both) on a quiet 2-core machine. To only print
# the tables of an earlier file: bash scripts/bench-events.sh --report FILE
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
BS=(go run golang.org/x/perf/cmd/benchstat@latest)

report() {
	local out=$1
	echo
	echo "=== benchstat (columns: caddy, then gateway as a change against it)"
	"${BS[@]}" -filter '.name:GPUEvents' -row '.fullname cpus' -col '/path@(caddy gateway)' "$out" || true
	"${BS[@]}" -filter '.name:PromptPost' -row '.fullname cpus' -col '/path@(caddy gateway)' "$out" || true
	if grep -q '^BenchmarkIdleSocketMemory' "$out"; then
		"${BS[@]}" -filter '.name:IdleSocketMemory' -col '/path@(reverse_proxy comfyume-home-reachable)' "$out" || true
	fi
	echo
	echo "=== medians and ratios (gateway ÷ caddy), against the issue-7 goals"
	ratios <"$out"
}

# ratios prints, per case and metric, the median of each path and their
# ratio, and whether the goal holds (on that ratio); "per-round" is the
# median of the rounds' own ratios, each gateway run against the caddy run
# just before it: the machine's load drifts between rounds (a shared host
# moves both paths' CPU per event by ±20 % within minutes), and a round's
# two runs see the same load.
ratios() {
	awk '
	function median(key,   n, i, j, v, t) {
		n = split(vals[key], v, " ")
		for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j-1] + 0 > v[j] + 0; j--) { t = v[j]; v[j] = v[j-1]; v[j-1] = t }
		return n % 2 ? v[(n+1)/2] : (v[n/2] + v[n/2+1]) / 2
	}
	function goal(c, unit, g, r,   blast, paced) {
		blast = c ~ /blast/; paced = c ~ /paced/
		if (unit == "events/s" && blast) return r >= 1.0 ? "ok (>= 1.0x)" : "MISSED (>= 1.0x)"
		if (unit == "cpu-ns/event") return r <= 1.5 ? "ok (<= 1.5x)" : "MISSED (<= 1.5x)"
		if ((unit == "p50-µs" || unit == "p99-µs") && paced) return r <= 1.1 ? "ok (<= 1.1x)" : "MISSED (<= 1.1x)"
		if (unit ~ /^lost-/) return g == 0 ? "ok (0)" : "MISSED (0)"
		if (unit == "p50-ms" && c ~ /PromptPost/) return r <= 1.3 ? "ok (<= 1.3x)" : "MISSED (<= 1.3x)"
		if (unit == "rss-B/socket" && c ~ /home-reachable/) return g <= 24576 ? "ok (<= 24 KiB)" : "MISSED (<= 24 KiB)"
		return ""
	}
	/^# round [0-9]+ of/ { round = $3 }
	/^cpus: / { cpus = $2 }
	/^Benchmark(GPUEvents|PromptPost|IdleSocketMemory)/ {
		name = $1; sub(/-[0-9]+$/, "", name)
		path = name; sub(/.*\/path=/, "", path)
		c = name; sub(/\/path=[^\/]*$/, "", c)
		if (c ~ /IdleSocketMemory/) {
			if (path == "reverse_proxy") path = "caddy"; else if (path == "comfyume-home-reachable") path = "gateway"; else next
			c = c "/home-reachable"
		}
		if (cpus == "pinned") c = c " (pinned)"
		for (i = 3; i < NF; i += 2) {
			key = c SUBSEP $(i+1)
			if (!(key in seen)) { seen[key] = 1; order[++nk] = key }
			vals[key SUBSEP path] = vals[key SUBSEP path] " " $i
			# The ratio of the round: gateway against the caddy run just
			# before it (the same load), once both are in.
			cur[key SUBSEP path] = $i
			if (path == "gateway" && (key SUBSEP "caddy") in cur && cur[key SUBSEP "caddy"] != 0 && round != "") {
				rr[key] = rr[key] " " $i / cur[key SUBSEP "caddy"]
				delete cur[key SUBSEP "caddy"]
			}
		}
	}
	END {
		printf "%-36s %-20s %14s %14s %8s %9s  %s\n", "case", "metric", "caddy", "gateway", "ratio", "per-round", "goal"
		for (k = 1; k <= nk; k++) {
			key = order[k]
			if (!((key SUBSEP "caddy") in vals) || !((key SUBSEP "gateway") in vals)) continue
			split(key, p, SUBSEP)
			cm = median(key SUBSEP "caddy"); gm = median(key SUBSEP "gateway")
			r = cm != 0 ? gm / cm : 0
			rs = cm != 0 ? sprintf("%7.2fx", r) : "      -"
			vals[key SUBSEP "rr"] = rr[key]
			pr = rr[key] != "" ? sprintf("%8.2fx", median(key SUBSEP "rr")) : "        -"
			printf "%-36s %-20s %14.6g %14.6g %s %s  %s\n", p[1], p[2], cm, gm, rs, pr, goal(p[1], p[2], gm, r)
		}
	}'
}

if [[ ${1:-} == --report ]]; then
	report "${2:?usage: bench-events.sh --report FILE}"
	exit 0
fi

# outputsFS names the file system the gateway's captured outputs go to
# (under TMPDIR), and warns when it is an ext4 without a journal: there
# every new file or folder costs a scan of the recently deleted inodes, so
# the gateway's per-job capture grows dearer the more files the machine
# deleted lately (BENCHMARKS.md, "Session 16").
outputsFS() {
	local dir=${TMPDIR:-/tmp} fs dev
	fs=$(findmnt -no FSTYPE -T "$dir" 2>/dev/null | head -1 || true)
	dev=$(findmnt -no SOURCE -T "$dir" 2>/dev/null | head -1 || true)
	echo "# outputs under $dir: ${fs:-unknown file system}${dev:+ on $dev}"
	# A journaled ext4 has its journal listed in /proc/fs/jbd2/<device>-<n>.
	if [[ $fs == ext4 && $dev == /dev/* && -d /proc/fs/jbd2 ]] && ! compgen -G "/proc/fs/jbd2/${dev#/dev/}-*" >/dev/null; then
		echo "# WARNING: $dir is on an ext4 without a journal, where each new file or folder is dearer" \
			"the more files were deleted lately: the gateway's per-job capture is measured far dearer than" \
			"on a server. Set TMPDIR to a journaled file system (BENCHMARKS.md, Session 16)." >&2
	fi
}

case ${CPUS:-both} in
shared) modes=(shared) ;;
pinned) modes=(pinned) ;;
both) modes=(shared pinned) ;;
*) echo "CPUS is shared, pinned or both" >&2; exit 2 ;;
esac
if [[ ${modes[*]} == *pinned* ]] && { ! command -v taskset >/dev/null || (($(nproc) < 2)); }; then
	echo "CPUS=pinned needs taskset (util-linux) and at least 2 CPUs" >&2
	exit 2
fi
rounds=${1:-3}
out=${2:-bench-events.txt}
[[ $out == /* ]] || out="$root/$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go test -c -o "$tmp/bench.test" ./bench/
cd bench
outputsFS | tee -a "$out"
for ((i = 1; i <= rounds; i++)); do
	echo "# round $i of $rounds, $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD), load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out"
	for cpus in "${modes[@]}"; do
		# A benchstat configuration line: the runs below are of this mode.
		echo "cpus: $cpus" | tee -a "$out"
		run=("$tmp/bench.test")
		if [[ $cpus == pinned ]]; then
			export BENCH_HELPER_CPUS="1-$(($(nproc) - 1))"
			run=(taskset -c 0 "$tmp/bench.test")
		else
			unset BENCH_HELPER_CPUS
		fi
		"${run[@]}" -test.run '^$' -test.bench 'GPUEvents/blast' -test.benchtime "${BLAST_BENCHTIME:-20x}" | tee -a "$out"
		"${run[@]}" -test.run '^$' -test.bench 'GPUEvents/paced' -test.benchtime "${EVENTS_BENCHTIME:-5x}" | tee -a "$out"
		"${run[@]}" -test.run '^$' -test.bench 'PromptPost' -test.benchtime "${PROMPT_BENCHTIME:-20x}" | tee -a "$out"
	done
	echo "cpus: shared" | tee -a "$out"
	if [[ ${IDLE:-1} != 0 ]]; then
		"$tmp/bench.test" -test.run '^$' -test.bench 'IdleSocketMemory/path=(reverse_proxy|comfyume-home-reachable)$' -test.benchtime 1x | tee -a "$out"
	fi
	echo "# round $i done, load $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$out"
done
report "$out"
