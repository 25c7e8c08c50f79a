// Command testsummary reads `go test -json` on its standard input and
// writes what a person wants to read: each package's result as it
// finishes, the full output of every failing test (and of tests a crash or
// timeout left unfinished), build errors, a line every minute while
// nothing else is said (which packages are still running, or that the
// test binaries are still compiling), and at the end the failed tests
// again and one line of totals:
//
//	41 passed, 1 failed, 3 skipped
//
// counting top-level tests (subtests are part of their test). It exits 1
// when anything failed, including a package that failed outside a test
// (a build error, a crash in TestMain). scripts/test.sh pipes go test
// through it:
//
//	go test -json ./... | go run ./scripts/testsummary [-v]
//
// With -v every test's output is shown as it comes, as `go test -v` does.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"
)

func main() {
	verbose := flag.Bool("v", false, "show every test's output, not only failing tests'")
	quiet := flag.Duration("quiet", time.Minute, "say what is still running after this long without output")
	flag.Parse()
	s := newSummary(os.Stdout, *verbose, time.Now())
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(os.Stdin)
		sc.Buffer(make([]byte, 64<<10), 16<<20)
		for sc.Scan() {
			lines <- sc.Text()
		}
		if err := sc.Err(); err != nil {
			fmt.Fprintln(os.Stderr, "testsummary: reading go test's output:", err)
		}
		close(lines)
	}()
	tick := time.NewTicker(*quiet / 4)
	defer tick.Stop()
	for {
		select {
		case line, ok := <-lines:
			if !ok {
				if !s.finish() {
					os.Exit(1)
				}
				return
			}
			s.line(line, time.Now())
		case now := <-tick.C:
			s.heartbeat(now, *quiet)
		}
	}
}

// event is one line of `go test -json` (cmd/test2json's TestEvent, plus
// the build events of `go test -json`).
type event struct {
	Time        time.Time
	Action      string
	Package     string
	Test        string
	Output      string
	ImportPath  string
	FailedBuild string
}

type summary struct {
	out     io.Writer
	verbose bool

	buf     map[string][]string  // package \x00 test → its output not yet shown
	started map[string]time.Time // packages whose test binary runs
	begun   time.Time            // when go test started
	said    time.Time            // last output written
	failedT map[string]bool      // package → a test of it failed

	passed, failed, skipped int
	failedOutside           int      // packages failed outside any test
	failures                []string // "package TestName", in order
}

func newSummary(out io.Writer, verbose bool, now time.Time) *summary {
	return &summary{out: out, verbose: verbose, begun: now, said: now, buf: map[string][]string{}, started: map[string]time.Time{}, failedT: map[string]bool{}}
}

func key(pkg, test string) string { return pkg + "\x00" + test }

func (s *summary) write(now time.Time, text string) {
	io.WriteString(s.out, text)
	s.said = now
}

// flush writes and forgets what test of pkg has buffered.
func (s *summary) flush(now time.Time, pkg, test string) {
	k := key(pkg, test)
	if lines := s.buf[k]; len(lines) > 0 {
		s.write(now, strings.Join(lines, ""))
	}
	delete(s.buf, k)
}

// line handles one line of go test's output.
func (s *summary) line(line string, now time.Time) {
	var e event
	if !strings.HasPrefix(line, "{") || json.Unmarshal([]byte(line), &e) != nil {
		s.write(now, line+"\n") // not an event: go's own messages
		return
	}
	switch e.Action {
	case "build-output":
		s.write(now, e.Output)
	case "start":
		s.started[e.Package] = now
	case "output":
		switch {
		case e.Test == "" && e.Output == "PASS\n" && !s.verbose:
		case e.Test == "" || s.verbose:
			s.write(now, e.Output)
		default:
			k := key(e.Package, e.Test)
			s.buf[k] = append(s.buf[k], e.Output)
		}
	case "pass", "skip", "fail":
		if e.Test == "" {
			s.packageDone(e, now)
			return
		}
		top := !strings.Contains(e.Test, "/")
		switch e.Action {
		case "pass":
			if top {
				s.passed++
			}
			delete(s.buf, key(e.Package, e.Test))
		case "skip":
			if top {
				s.skipped++
			}
			delete(s.buf, key(e.Package, e.Test))
		case "fail":
			// The parents' lines first (=== RUN), then the test's own.
			parts := strings.Split(e.Test, "/")
			for i := 1; i <= len(parts); i++ {
				s.flush(now, e.Package, strings.Join(parts[:i], "/"))
			}
			if top {
				s.failed++
				s.failures = append(s.failures, e.Package+" "+e.Test)
			}
			s.failedT[e.Package] = true
		}
	}
}

// packageDone ends a package: tests it left unfinished (the binary
// crashed or timed out) are shown in full and count as failed.
func (s *summary) packageDone(e event, now time.Time) {
	delete(s.started, e.Package)
	var left []string
	prefix := e.Package + "\x00"
	for k := range s.buf {
		if strings.HasPrefix(k, prefix) {
			left = append(left, strings.TrimPrefix(k, prefix))
		}
	}
	sort.Strings(left)
	for _, test := range left {
		s.flush(now, e.Package, test)
		if !strings.Contains(test, "/") {
			s.failed++
			s.failures = append(s.failures, e.Package+" "+test+" (did not finish)")
			s.failedT[e.Package] = true
		}
	}
	if e.Action == "fail" && !s.failedT[e.Package] {
		s.failedOutside++
		why := "outside any test"
		if e.FailedBuild != "" {
			why = "build failed"
		}
		s.failures = append(s.failures, e.Package+" ("+why+")")
	}
}

// heartbeat says what is going on after quiet without output.
func (s *summary) heartbeat(now time.Time, quiet time.Duration) {
	if now.Sub(s.said) < quiet {
		return
	}
	s.write(now, s.status(now)+"\n")
}

func (s *summary) status(now time.Time) string {
	if len(s.started) == 0 {
		return fmt.Sprintf("… compiling test binaries (%s so far)", round(now.Sub(s.begun)))
	}
	var pkgs []string
	for p := range s.started {
		pkgs = append(pkgs, p)
	}
	sort.Slice(pkgs, func(i, j int) bool {
		if !s.started[pkgs[i]].Equal(s.started[pkgs[j]]) {
			return s.started[pkgs[i]].Before(s.started[pkgs[j]])
		}
		return pkgs[i] < pkgs[j]
	})
	parts := make([]string, len(pkgs))
	for i, p := range pkgs {
		parts[i] = fmt.Sprintf("%s (%s)", p, round(now.Sub(s.started[p])))
	}
	return fmt.Sprintf("… %s so far; still running: %s", round(now.Sub(s.begun)), strings.Join(parts, ", "))
}

func round(d time.Duration) time.Duration { return d.Round(time.Second) }

// finish writes what is left, the failures and the totals line, and
// reports whether everything passed.
func (s *summary) finish() bool {
	now := time.Now()
	// Packages that never ended (go test was killed): show their tests.
	var pkgs []string
	for p := range s.started {
		pkgs = append(pkgs, p)
	}
	sort.Strings(pkgs)
	for _, p := range pkgs {
		s.packageDone(event{Package: p, Action: "fail"}, now)
	}
	if len(s.failures) > 0 {
		s.write(now, "\nFailed:\n")
		for _, f := range s.failures {
			s.write(now, "  "+f+"\n")
		}
	}
	line := fmt.Sprintf("\n%d passed, %d failed, %d skipped", s.passed, s.failed, s.skipped)
	if s.failedOutside > 0 {
		line += fmt.Sprintf(" (and %d package(s) failed outside any test)", s.failedOutside)
	}
	s.write(now, line+"\n")
	return s.failed == 0 && s.failedOutside == 0
}
