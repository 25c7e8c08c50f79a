//go:build unix

package worker

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"
)

// runToExit starts command under a supervisor whose OOM kill count is
// oom, calls during(pid) once it runs, and returns how it ended.
func runToExit(t *testing.T, command []string, oom *atomic.Int64, during func(pid int)) (*Exit, *observer.ObservedLogs) {
	t.Helper()
	core, logs := observer.New(zapcore.InfoLevel)
	s := NewSupervisor(zap.New(core))
	if oom != nil {
		s.oomKills = func() (int64, bool) { return oom.Load(), true }
	} else {
		s.oomKills = func() (int64, bool) { return 0, false }
	}
	// Nothing answers here: the process never becomes ready.
	if err := s.Start(SupervisorSpec{Command: command, URL: "http://127.0.0.1:1", RestartMin: time.Hour}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	var l *life
	for deadline := time.Now().Add(30 * time.Second); l == nil; time.Sleep(10 * time.Millisecond) {
		if l = s.current(); l == nil && time.Now().After(deadline) {
			t.Fatal("the command did not start")
		}
	}
	if during != nil {
		during(l.pid)
	}
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		t.Fatal("the command did not end")
	}
	return l.exit, logs
}

// waitFile waits until the command created path.
func waitFile(t *testing.T, path string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(path); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never appeared", path)
		}
	}
}

// A SIGKILL while the kernel's OOM kill count rises is reported as out of
// memory; one without is reported as a SIGKILL comfyume did not send.
func TestSupervisorTellsOutOfMemory(t *testing.T) {
	for _, oomKilled := range []bool{true, false} {
		flag := filepath.Join(t.TempDir(), "loading")
		var count atomic.Int64
		count.Store(4)
		ex, _ := runToExit(t, []string{"sh", "-c", "echo loading a 70 GB model; touch " + flag + "; exec sleep 600"}, &count, func(pid int) {
			waitFile(t, flag)
			if oomKilled {
				count.Add(1) // what the kernel's OOM killer counts when it kills
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
		})
		msg := ex.Message()
		if ex.Signal != "SIGKILL" || ex.OOM != oomKilled || !strings.Contains(msg, "loading a 70 GB model") {
			t.Fatalf("oom %v: %+v %q", oomKilled, ex, msg)
		}
		if oomKilled && !strings.Contains(msg, "ComfyUI was killed by signal SIGKILL: out of memory") {
			t.Fatalf("OOM kill told as %q", msg)
		}
		if !oomKilled && !strings.Contains(msg, "not sent by comfyume") {
			t.Fatalf("unexplained SIGKILL told as %q", msg)
		}
	}
}

// A flood of output (a 20 MB line, thousands of lines) is logged in
// bounded lines, and the tail a job is told is bounded too.
func TestSupervisorBoundsOutput(t *testing.T) {
	script := `head -c 20000000 /dev/zero | tr '\0' x; echo; i=0; while [ $i -lt 3000 ]; do echo "line $i $(printf '%0400d' 0)"; i=$((i+1)); done; echo the end; exit 5`
	ex, logs := runToExit(t, []string{"sh", "-c", script}, nil, nil)
	if ex.Code != 5 || ex.Signal != "" {
		t.Fatalf("exit %+v", ex)
	}
	if n := len(ex.Tail); n == 0 || n > TailLines || len(strings.Join(ex.Tail, "\n")) > TailBytes+TailLines {
		t.Fatalf("tail of %d lines, %d bytes", n, len(strings.Join(ex.Tail, "\n")))
	}
	if ex.Tail[len(ex.Tail)-1] != "the end" {
		t.Fatalf("tail ends with %q", ex.Tail[len(ex.Tail)-1])
	}
	long, lines := 0, 0
	for _, e := range logs.All() {
		if s, ok := e.ContextMap()["stream"]; ok && s == "stdout" {
			lines++
			if len(e.Message) > MaxLogLine {
				t.Fatalf("a logged line of %d bytes", len(e.Message))
			}
			if e.ContextMap()["bytes_dropped"] != nil {
				long++
			}
		}
	}
	if lines != 3002 || long != 1 {
		t.Fatalf("%d lines logged, %d cut", lines, long)
	}
}

// The supervisor tells a command that cannot start, and keeps trying.
func TestSupervisorCommandMissing(t *testing.T) {
	ex, _ := runToExit(t, []string{filepath.Join(t.TempDir(), "no-such-comfyui")}, nil, nil)
	if !strings.HasPrefix(ex.Reason(), "ComfyUI could not be started: ") {
		t.Fatalf("reason %q", ex.Reason())
	}
}

func TestLineSplitter(t *testing.T) {
	var got []string
	ls := &lineSplitter{max: 5, emit: func(b []byte, cut int) {
		got = append(got, string(b)+strings.Repeat("+", cut))
	}}
	for _, p := range []string{"ab", "c\r\n", "10%\r20%\r", "30%\nlonger line\n", "\r\n", "tail"} {
		ls.write([]byte(p))
	}
	ls.flush()
	want := []string{"abc", "30%", "longe++++++", "tail"}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("lines %q, want %q", got, want)
	}
}

func TestMemoryCgroupFiles(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	v2 := write("v2", "0::/system.slice/comfy.service\n")
	if f := memoryCgroupFiles(v2, "/sys/fs/cgroup"); len(f) != 1 || f[0] != "/sys/fs/cgroup/system.slice/comfy.service/memory.events" {
		t.Fatalf("v2: %v", f)
	}
	v1 := write("v1", "5:cpu,cpuacct:/\n4:memory:/docker/abc\n0::/\n")
	if f := memoryCgroupFiles(v1, "/c"); len(f) != 2 || f[0] != "/c/memory.events" || f[1] != "/c/memory/docker/abc/memory.oom_control" {
		t.Fatalf("v1: %v", f)
	}
	if f := memoryCgroupFiles(write("evil", "0::/../../etc\n"), "/c"); len(f) != 1 || f[0] != "/c/etc/memory.events" {
		t.Fatalf("path out of the cgroup root: %v", f)
	}
	if n, ok := parseOOMKill([]byte("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\n")); !ok || n != 2 {
		t.Fatalf("memory.events: %d %v", n, ok)
	}
	if n, ok := parseOOMKill([]byte("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")); !ok || n != 7 {
		t.Fatalf("memory.oom_control: %d %v", n, ok)
	}
}

// The line splitter never keeps more than its bound, whatever it reads.
func FuzzLineSplitter(f *testing.F) {
	f.Add([]byte("a\r\nb\rc\n"), 3)
	f.Add(bytes.Repeat([]byte("x"), 100), 7)
	f.Fuzz(func(t *testing.T, data []byte, max int) {
		if max <= 0 || max > 1<<12 {
			max = 16
		}
		total := 0
		ls := &lineSplitter{max: max, emit: func(b []byte, cut int) {
			if len(b) > max || bytes.ContainsAny(b, "\r\n") {
				t.Fatalf("line %q over %d or with a line break", b, max)
			}
			total += len(b) + cut
		}}
		ls.write(data)
		ls.flush()
		if total > len(data) {
			t.Fatalf("%d bytes emitted from %d", total, len(data))
		}
		if cap(ls.line) > max+64 && cap(ls.line) > 2*max {
			t.Fatalf("buffer grew to %d", cap(ls.line))
		}
	})
}

func FuzzParseOOMKill(f *testing.F) {
	f.Add([]byte("oom 1\noom_kill 1\n"))
	f.Add([]byte("oom_kill -1\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if n, ok := parseOOMKill(b); ok && n < 0 {
			t.Fatalf("negative count %d", n)
		}
	})
}

// A job is told only the lines printed since it came, even once the tail
// dropped older lines.
func TestExitMessageSince(t *testing.T) {
	e := &Exit{Code: 1, Tail: []string{"c", "d"}, TailFrom: 2}
	for since, want := range map[int64]string{0: "c\nd", 2: "c\nd", 3: "d", 4: "", 10: ""} {
		got := e.MessageSince(since)
		if tail, _ := strings.CutPrefix(got, e.Reason()+"; its last lines:\n"); tail != want && !(want == "" && got == e.Reason()) {
			t.Fatalf("since %d: %q", since, got)
		}
	}
}

// A ComfyUI that never answers is stopped after ready_timeout and
// started again; one that ignores SIGTERM is killed after stop_timeout.
func TestSupervisorTimeouts(t *testing.T) {
	flag := filepath.Join(t.TempDir(), "up")
	s := NewSupervisor(nil)
	script := "trap '' TERM; touch " + flag + "; while :; do sleep 0.05; done"
	if err := s.Start(SupervisorSpec{Command: []string{"sh", "-c", script}, URL: "http://127.0.0.1:1",
		ReadyTimeout: 300 * time.Millisecond, StopTimeout: 300 * time.Millisecond, RestartMin: time.Hour}); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	waitFile(t, flag)
	l := s.current()
	select {
	case <-l.done:
	case <-time.After(30 * time.Second):
		t.Fatal("a ComfyUI that never answers was not stopped")
	}
	if l.exit.Signal != "SIGKILL" || !strings.Contains(l.exit.Reason(), "not ready after 300ms") {
		t.Fatalf("exit %+v: %s", l.exit, l.exit.Reason())
	}
	// The supervisor then waits to start it again, and says why.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		st := s.Status()
		if st.State == StateRestarting && st.LastExit == l.exit.Reason() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("status %+v", st)
		}
	}
}

// `env PATH …` is where the command's program is looked up (a venv's
// python), not only in the worker's own PATH.
func TestSupervisorProgramFromEnvPath(t *testing.T) {
	bin := t.TempDir()
	if err := os.WriteFile(filepath.Join(bin, "venv-comfyui"), []byte("#!/bin/sh\necho from the venv\nexit 4\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	s := NewSupervisor(nil)
	if err := s.Start(SupervisorSpec{Command: []string{"venv-comfyui"}, Env: []string{"PATH=" + bin + ":/usr/bin:/bin"},
		URL: "http://127.0.0.1:1", RestartMin: time.Hour}); err != nil {
		t.Fatal(err)
	}
	defer s.Stop()
	var l *life
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if l = s.current(); l != nil && l.ended() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the command did not end")
		}
	}
	if l.exit.Code != 4 || strings.Join(l.exit.Tail, "|") != "from the venv" {
		t.Fatalf("exit %+v", l.exit)
	}
}
