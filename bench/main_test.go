package bench

import (
	"fmt"
	"os"
	"syscall"
	"testing"
	"time"
)

// roleEnv selects a helper role when the test binary is re-executed by the
// idle-socket memory benchmark (see memory_test.go) or the GPU-events
// benchmarks (events_test.go). The helpers keep the browsers, homes and
// fake GPUs out of the measured process.
const roleEnv = "COMFYUME_BENCH_ROLE"

func TestMain(m *testing.M) {
	switch role := os.Getenv(roleEnv); role {
	case "":
		os.Exit(m.Run())
	case "fleet":
		raiseFileLimit()
		os.Exit(runFleet(os.Stdin, os.Stdout))
	case "events":
		raiseFileLimit()
		os.Exit(runEventsHelper(os.Stdin, os.Stdout))
	case "home":
		raiseFileLimit()
		os.Exit(runHomeChild(os.Stdin, os.Stdout))
	default:
		fmt.Fprintf(os.Stderr, "unknown %s=%q\n", roleEnv, role)
		os.Exit(2)
	}
}

// raiseFileLimit lifts the soft open-files limit to the hard one and
// returns the limit in effect.
func raiseFileLimit() uint64 {
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil {
		return 1024
	}
	if rl.Cur < rl.Max {
		rl.Cur = rl.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &rl)
		_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl)
	}
	return rl.Cur
}

// cpuTime is the CPU time (user+system) this process has used so far.
// Benchmarks report it per operation: unlike wall time, it barely moves
// when other processes compete for the machine's cores.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
