package main

import (
	"strings"
	"testing"
	"time"
)

// feed runs go test -json lines through a summary and returns what it
// wrote and whether it reported success.
func feed(t *testing.T, verbose bool, lines ...string) (string, bool) {
	t.Helper()
	var out strings.Builder
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := newSummary(&out, verbose, now)
	for _, l := range lines {
		s.line(l, now)
	}
	ok := s.finish()
	return out.String(), ok
}

// Recorded from `go test -json` over a package that does not build, a
// failing subtest, a panicking test, a passing and a skipped test.
var mixed = []string{
	`{"ImportPath":"brk/a [brk/a.test]","Action":"build-output","Output":"# brk/a [brk/a.test]\n"}`,
	`{"ImportPath":"brk/a [brk/a.test]","Action":"build-output","Output":"a/a.go:2:23: cannot use \"x\" (untyped string constant) as int value in return statement\n"}`,
	`{"ImportPath":"brk/a [brk/a.test]","Action":"build-fail"}`,
	`{"Action":"start","Package":"brk/a"}`,
	`{"Action":"output","Package":"brk/a","Output":"FAIL\tbrk/a [build failed]\n"}`,
	`{"Action":"fail","Package":"brk/a","Elapsed":0,"FailedBuild":"brk/a [brk/a.test]"}`,
	`{"Action":"start","Package":"brk/b"}`,
	`{"Action":"run","Package":"brk/b","Test":"TestOK"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestOK","Output":"=== RUN   TestOK\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestOK","Output":"    b_test.go:9: quiet detail\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestOK","Output":"--- PASS: TestOK (0.00s)\n"}`,
	`{"Action":"pass","Package":"brk/b","Test":"TestOK"}`,
	`{"Action":"run","Package":"brk/b","Test":"TestSkip"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestSkip","Output":"--- SKIP: TestSkip (0.00s)\n"}`,
	`{"Action":"skip","Package":"brk/b","Test":"TestSkip"}`,
	`{"Action":"run","Package":"brk/b","Test":"TestB"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestB","Output":"=== RUN   TestB\n"}`,
	`{"Action":"run","Package":"brk/b","Test":"TestB/s"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestB/s","Output":"=== RUN   TestB/s\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestB/s","Output":"    b_test.go:3: hello\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestB/s","Output":"    b_test.go:3: boom\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestB/s","Output":"--- FAIL: TestB/s (0.00s)\n"}`,
	`{"Action":"fail","Package":"brk/b","Test":"TestB/s","Elapsed":0}`,
	`{"Action":"output","Package":"brk/b","Test":"TestB","Output":"--- FAIL: TestB (0.00s)\n"}`,
	`{"Action":"fail","Package":"brk/b","Test":"TestB","Elapsed":0}`,
	`{"Action":"run","Package":"brk/b","Test":"TestP"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestP","Output":"=== RUN   TestP\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestP","Output":"--- FAIL: TestP (0.00s)\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestP","Output":"panic: oops [recovered, repanicked]\n"}`,
	`{"Action":"output","Package":"brk/b","Test":"TestP","Output":"\tb_test.go:4 +0x25\n"}`,
	`{"Action":"fail","Package":"brk/b","Test":"TestP","Elapsed":0}`,
	`{"Action":"output","Package":"brk/b","Output":"FAIL\tbrk/b\t0.007s\n"}`,
	`{"Action":"fail","Package":"brk/b","Elapsed":0.008}`,
	`{"Action":"start","Package":"ok/c"}`,
	`{"Action":"output","Package":"ok/c","Output":"PASS\n"}`,
	`{"Action":"output","Package":"ok/c","Output":"ok  \tok/c\t0.1s\n"}`,
	`{"Action":"pass","Package":"ok/c"}`,
}

// Failing tests' output appears in full, in order, passing tests' does
// not, build errors and package lines do, and the run ends with the
// totals line and a failure.
func TestFailuresInFullAndTotals(t *testing.T) {
	out, ok := feed(t, false, mixed...)
	if ok {
		t.Error("a run with failures reported success")
	}
	for _, want := range []string{
		"a/a.go:2:23: cannot use",
		"FAIL\tbrk/a [build failed]\n",
		"=== RUN   TestB\n=== RUN   TestB/s\n    b_test.go:3: hello\n    b_test.go:3: boom\n--- FAIL: TestB/s (0.00s)\n--- FAIL: TestB (0.00s)\n",
		"panic: oops [recovered, repanicked]\n\tb_test.go:4 +0x25\n",
		"ok  \tok/c\t0.1s\n",
		"Failed:\n  brk/a (build failed)\n  brk/b TestB\n  brk/b TestP\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
	if !strings.HasSuffix(out, "\n1 passed, 2 failed, 1 skipped (and 1 package(s) failed outside any test)\n") {
		t.Errorf("no totals line at the end:\n%s", out)
	}
	for _, not := range []string{"quiet detail", "PASS\n"} {
		if strings.Contains(out, not) {
			t.Errorf("output shows %q of a passing run:\n%s", not, out)
		}
	}
	if v, _ := feed(t, true, mixed...); !strings.Contains(v, "quiet detail") {
		t.Errorf("-v hides passing tests' output:\n%s", v)
	}
}

// A passing run says so and succeeds.
func TestAllPassed(t *testing.T) {
	out, ok := feed(t, false,
		`{"Action":"start","Package":"ok/c"}`,
		`{"Action":"run","Package":"ok/c","Test":"TestA"}`,
		`{"Action":"run","Package":"ok/c","Test":"TestA/sub"}`,
		`{"Action":"pass","Package":"ok/c","Test":"TestA/sub"}`,
		`{"Action":"pass","Package":"ok/c","Test":"TestA"}`,
		`{"Action":"output","Package":"ok/c","Output":"ok  \tok/c\t0.1s\n"}`,
		`{"Action":"pass","Package":"ok/c"}`,
		`go: downloading example.com/x v1.0.0`,
	)
	if !ok || !strings.HasSuffix(out, "\n1 passed, 0 failed, 0 skipped\n") || !strings.Contains(out, "go: downloading example.com/x") {
		t.Errorf("ok=%v:\n%s", ok, out)
	}
}

// A test binary that timed out or crashed leaves tests unfinished: their
// output is shown and they count as failed, also when go test itself was
// killed before the package ended.
func TestUnfinishedTestsFail(t *testing.T) {
	out, ok := feed(t, false,
		`{"Action":"start","Package":"p"}`,
		`{"Action":"run","Package":"p","Test":"TestHang"}`,
		`{"Action":"output","Package":"p","Test":"TestHang","Output":"=== RUN   TestHang\n"}`,
		`{"Action":"output","Package":"p","Test":"TestHang","Output":"panic: test timed out after 20m0s\n"}`,
		`{"Action":"output","Package":"p","Output":"FAIL\tp\t1200.1s\n"}`,
		`{"Action":"fail","Package":"p"}`,
		`{"Action":"start","Package":"q"}`,
		`{"Action":"run","Package":"q","Test":"TestCut"}`,
		`{"Action":"output","Package":"q","Test":"TestCut","Output":"last words\n"}`,
	)
	if ok {
		t.Error("unfinished tests reported success")
	}
	for _, want := range []string{"panic: test timed out after 20m0s\n", "last words\n", "p TestHang (did not finish)", "q TestCut (did not finish)", "\n0 passed, 2 failed, 0 skipped\n"} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q:\n%s", want, out)
		}
	}
}

// While nothing is said for a while, a line tells what is going on.
func TestHeartbeat(t *testing.T) {
	var out strings.Builder
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	s := newSummary(&out, false, t0)
	s.heartbeat(t0.Add(30*time.Second), time.Minute)
	if out.String() != "" {
		t.Fatalf("spoke before a quiet minute: %q", out.String())
	}
	s.heartbeat(t0.Add(61*time.Second), time.Minute)
	if !strings.Contains(out.String(), "… compiling test binaries (1m1s so far)") {
		t.Errorf("%q", out.String())
	}
	s.line(`{"Action":"start","Package":"slow/pkg"}`, t0.Add(90*time.Second))
	out.Reset()
	s.heartbeat(t0.Add(200*time.Second), time.Minute)
	if !strings.Contains(out.String(), "3m20s so far; still running: slow/pkg (1m50s)") {
		t.Errorf("%q", out.String())
	}
}
