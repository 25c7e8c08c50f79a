//go:build unix

package caddymodule_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/dispatch"
)

// The GPU side as an operator deploys it: `comfyume_worker { command … }`
// runs ComfyUI (here the fake ComfyUI binary) as a child of Caddy. The
// tests run one Caddy holding both the gateway (a pool with one
// `transport worker` upstream) and the GPU worker site, so the browser's
// jobs travel the whole way.

// supervised is a Caddy running a gateway and a supervised GPU worker.
type supervised struct {
	*gateway
	worker    string // the worker site, http://127.0.0.1:port
	comfyPort int
	log       string // Caddy's JSON log file
	dir       string
}

// supervisedCaddyfile: site {PORT} is the gateway, whose pool's only
// upstream is the worker site {WPORT}, whose comfyume_worker runs
// `command` (with {CPORT} the port ComfyUI is to serve on).
func supervisedCaddyfile(home, command, extra string) string {
	return `{
	admin off
	log {
		output file {LOG}
		format json
		level DEBUG
	}
	comfyume {
		pool gpu {
			upstream http://127.0.0.1:{WPORT} {
				transport worker
				max_jobs 1
			}
		}
		outputs disk {DATA}
	}
}

:{PORT} {
	bind 127.0.0.1
	comfyume {
		home ` + home + `
		run_on gpu
		user {http.request.header.X-User}
	}
	reverse_proxy ` + strings.TrimPrefix(home, "http://") + `
}

:{WPORT} {
	bind 127.0.0.1
	comfyume_worker {
		comfyui http://127.0.0.1:{CPORT}
		command ` + command + `
		restart_backoff 100ms 1s
		stop_timeout 5s
		` + extra + `
	}
	reverse_proxy 127.0.0.1:{CPORT}
}`
}

func startSupervised(t *testing.T, cf string) *supervised {
	t.Helper()
	s := &supervised{comfyPort: freePort(t), dir: t.TempDir()}
	wport := freePort(t)
	s.worker = fmt.Sprintf("http://127.0.0.1:%d", wport)
	s.log = filepath.Join(s.dir, "caddy.log")
	cf = strings.NewReplacer("{WPORT}", strconv.Itoa(wport), "{CPORT}", strconv.Itoa(s.comfyPort), "{LOG}", s.log, "{DATA}", filepath.Join(s.dir, "data")).Replace(cf)
	s.gateway = startCaddy(t, cf)
	return s
}

// status is the worker's GET /comfyume/job answer.
type workerStatus struct {
	code    int
	Ready   bool `json:"ready"`
	Running int  `json:"running"`
	ComfyUI *struct {
		State    string `json:"state"`
		PID      int    `json:"pid"`
		Restarts int    `json:"restarts"`
		LastExit string `json:"last_exit"`
	} `json:"comfyui"`
}

func (s *supervised) status(t *testing.T) workerStatus {
	t.Helper()
	w := &gateway{t: t, Base: s.worker}
	code, body, _ := w.do("", "GET", dispatch.WorkerPath, nil)
	st := workerStatus{code: code}
	if err := json.Unmarshal(body, &st); err != nil {
		t.Fatalf("worker status %d: %s", code, body)
	}
	return st
}

// waitStatus polls the worker's status until ok says so.
func (s *supervised) waitStatus(t *testing.T, what string, ok func(workerStatus) bool) workerStatus {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		st := s.status(t)
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: last status %d %+v %+v", what, st.code, st, st.ComfyUI)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func ready(st workerStatus) bool { return st.code == 200 && st.Ready }

// logEntries reads Caddy's log file: the entries of logger, in order.
func (s *supervised) logEntries(t *testing.T, logger string) []map[string]any {
	t.Helper()
	f, err := os.Open(s.log)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []map[string]any
	sc := bufio.NewScanner(f)
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		var e map[string]any
		if json.Unmarshal(sc.Bytes(), &e) == nil && e["logger"] == logger {
			out = append(out, e)
		}
	}
	return out
}

const comfyLogger = "http.handlers.comfyume_worker.comfyui"

func exceptionMessage(frames []wsFrame) string {
	if i := indexOf(frames, "execution_error"); i >= 0 {
		return frames[i].str("exception_message")
	}
	return ""
}

// A slow start: the worker answers 503 (and the gateway holds the job)
// until ComfyUI serves; then the job runs. ComfyUI's output is in Caddy's
// log.
func TestSupervisedComfyUISlowStart(t *testing.T) {
	fake := fakeComfyBinary(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gate := filepath.Join(t.TempDir(), "loaded")
	s := startSupervised(t, supervisedCaddyfile(home.URL(), fake+" -listen 127.0.0.1 -port {CPORT} -version 2026 -name gpu -wait-for "+gate, ""))

	st := s.waitStatus(t, "ComfyUI started", func(st workerStatus) bool { return st.ComfyUI != nil && st.ComfyUI.PID != 0 })
	if st.code != 503 || st.Ready || st.ComfyUI.State != "starting" {
		t.Fatalf("while ComfyUI loads: %d %+v %+v", st.code, st, st.ComfyUI)
	}
	b := s.openBrowser("alice", "", true)
	a := s.queue("alice", b.SID, samplerWorkflow("slow", 2))
	// Still loading: the worker refuses jobs with 503, the gateway holds.
	if st := s.status(t); st.code != 503 {
		t.Fatalf("status while loading: %d", st.code)
	}
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job after a slow start: %v %q", types(frames), exceptionMessage(frames))
	}
	if st := s.status(t); !ready(st) || st.ComfyUI.State != "ready" || st.ComfyUI.Restarts != 0 {
		t.Fatalf("after start: %d %+v %+v", st.code, st, st.ComfyUI)
	}
	// ComfyUI's own lines reached Caddy's log.
	found := false
	for _, e := range s.logEntries(t, comfyLogger) {
		msg, _ := e["msg"].(string)
		found = found || (strings.Contains(msg, "fakecomfy: loading") && e["stream"] == "stderr")
	}
	if !found {
		t.Fatalf("ComfyUI's output is not in Caddy's log: %v", s.logEntries(t, comfyLogger))
	}
}

// ComfyUI dies in the middle of a job: the browser gets an
// execution_error saying how (exit code, or signal) with the last lines
// ComfyUI printed; ComfyUI is started again and the next job runs.
func TestSupervisedComfyUICrashMidJob(t *testing.T) {
	fake := fakeComfyBinary(t)
	for _, tc := range []struct {
		name, flags, want string
	}{
		{"exit code", "-crash-code 7", "ComfyUI exited with code 7"},
		{"signal", "-crash-signal KILL", "ComfyUI was killed by signal SIGKILL"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
			marker := filepath.Join(t.TempDir(), "crashed")
			cmd := fake + " -listen 127.0.0.1 -port {CPORT} -version 2026 -step 20ms -crash-after-steps 3 -crash-once " + marker + " " + tc.flags
			s := startSupervised(t, supervisedCaddyfile(home.URL(), cmd, ""))
			first := s.waitStatus(t, "ready", ready)

			// Bob's job runs first (one step of the three before the crash).
			bob := s.openBrowser("bob", "", true)
			bj := s.queue("bob", bob.SID, samplerWorkflow("bob", 1))
			if frames := bob.untilJobEnd(bj.PromptID, 60*time.Second); indexOf(frames, "execution_success") < 0 {
				t.Fatalf("bob's job: %v", types(frames))
			}
			b := s.openBrowser("alice", "", true)
			a := s.queue("alice", b.SID, samplerWorkflow("crash", 8))
			frames := b.untilJobEnd(a.PromptID, 60*time.Second)
			msg := exceptionMessage(frames)
			if !strings.Contains(msg, tc.want) || !strings.Contains(msg, "fakecomfy: crashing after 3 sampler steps") ||
				!strings.Contains(msg, "executing prompt "+a.PromptID) {
				t.Fatalf("the browser was told %q (frames %v)", msg, types(frames))
			}
			// Only what ComfyUI printed during alice's job: not bob's lines.
			if strings.Contains(msg, bj.PromptID) {
				t.Fatalf("alice was shown lines of bob's job: %q", msg)
			}
			// Started again; the next job runs.
			again := s.waitStatus(t, "restarted", func(st workerStatus) bool { return ready(st) && st.ComfyUI.Restarts == 1 })
			if again.ComfyUI.PID == first.ComfyUI.PID || !strings.Contains(again.ComfyUI.LastExit, tc.want) {
				t.Fatalf("after the crash: %+v", again.ComfyUI)
			}
			c := s.queue("alice", b.SID, samplerWorkflow("after", 4))
			if frames := b.untilJobEnd(c.PromptID, 60*time.Second); indexOf(frames, "execution_success") < 0 {
				t.Fatalf("job after the restart: %v %q", types(frames), exceptionMessage(frames))
			}
		})
	}
}

// A command that exits at once is started again after a wait that
// doubles each time (restart_backoff 100ms 1s), not in a tight loop; the
// status says why it is not ready.
func TestSupervisedComfyUIRestartBackoff(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	s := startSupervised(t, supervisedCaddyfile(home.URL(), `sh -c "echo no such model >&2; exit 3"`, ""))
	// (The count goes up before the next start is logged: at 6, six
	// starts are.)
	st := s.waitStatus(t, "six restarts", func(st workerStatus) bool { return st.ComfyUI != nil && st.ComfyUI.Restarts >= 6 })
	if st.code != 503 || st.ComfyUI.LastExit != "ComfyUI exited with code 3" {
		t.Fatalf("status of a failing command: %d %+v", st.code, st.ComfyUI)
	}
	var starts []float64
	for _, e := range s.logEntries(t, comfyLogger) {
		if e["msg"] == "started ComfyUI" {
			starts = append(starts, e["ts"].(float64))
		}
	}
	if len(starts) < 6 {
		t.Fatalf("%d starts logged", len(starts))
	}
	wait := 0.1
	for i := 1; i < 6; i++ {
		gap := starts[i] - starts[i-1]
		if gap < wait-0.001 {
			t.Fatalf("start %d came %.3fs after the one before; the wait should be %.1fs (gaps from %v)", i, gap, wait, starts)
		}
		wait = min(wait*2, 1)
	}
	// The lines it printed are in the log, for the operator.
	found := false
	for _, e := range s.logEntries(t, comfyLogger) {
		found = found || e["msg"] == "no such model"
	}
	if !found {
		t.Fatal("the command's output is not in Caddy's log")
	}
}

// Stopping Caddy stops ComfyUI and whatever it started (its process
// group): nothing is left running.
func TestSupervisedComfyUIStopsWithCaddy(t *testing.T) {
	fake := fakeComfyBinary(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	pidFile := filepath.Join(t.TempDir(), "helper.pid")
	// ComfyUI that started a helper process of its own.
	cmd := `sh -c "sleep 600 & echo $! > ` + pidFile + `; exec ` + fake + ` -listen 127.0.0.1 -port {CPORT} -version 2026"`
	s := startSupervised(t, supervisedCaddyfile(home.URL(), cmd, ""))
	st := s.waitStatus(t, "ready", ready)
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	helper, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	comfyPID := st.ComfyUI.PID
	if !alive(comfyPID) || !alive(helper) {
		t.Fatalf("ComfyUI %d (%v) or its helper %d (%v) not running", comfyPID, alive(comfyPID), helper, alive(helper))
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	// ComfyUI was reaped before Stop returned; the helper got its SIGKILL
	// and dies as soon as the kernel gets to it.
	for deadline := time.Now().Add(10 * time.Second); alive(comfyPID) || alive(helper); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("after Caddy stopped: ComfyUI %d alive %v, its helper %d alive %v", comfyPID, alive(comfyPID), helper, alive(helper))
		}
	}
	stopped := false
	for _, e := range s.logEntries(t, comfyLogger) {
		stopped = stopped || (e["msg"] == "ComfyUI ended" && strings.Contains(fmt.Sprint(e["reason"]), "Caddy is stopping"))
	}
	if !stopped {
		t.Fatal("the log does not say ComfyUI was stopped with Caddy")
	}
}

// alive: the process exists and is not a zombie waiting for its parent.
func alive(pid int) bool {
	if pid <= 0 {
		return false
	}
	if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
		// pid (comm) state ...
		if i := strings.LastIndexByte(string(b), ')'); i > 0 && i+2 < len(b) {
			return b[i+2] != 'Z'
		}
	}
	return syscall.Kill(pid, 0) == nil
}

// A config reload with the same command keeps ComfyUI (and the job it
// runs); one that changes the command starts the new one.
func TestSupervisedComfyUISurvivesReload(t *testing.T) {
	fake := fakeComfyBinary(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	base := fake + " -listen 127.0.0.1 -port {CPORT} -version 2026 -step 30ms"
	cf := supervisedCaddyfile(home.URL(), base, "")
	s := startSupervised(t, cf)
	first := s.waitStatus(t, "ready", ready)

	reload := func(extra, command string) {
		t.Helper()
		port := strings.TrimPrefix(s.Base, "http://127.0.0.1:")
		wport := strings.TrimPrefix(s.worker, "http://127.0.0.1:")
		text := strings.NewReplacer("{PORT}", port, "{WPORT}", wport, "{CPORT}", strconv.Itoa(s.comfyPort), "{LOG}", s.log,
			"{DATA}", filepath.Join(s.dir, "data")).Replace(supervisedCaddyfile(home.URL(), command, extra))
		cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(text), nil)
		if err != nil {
			t.Fatal(err)
		}
		if err := caddy.Load(cfg, false); err != nil {
			t.Fatal(err)
		}
		// The old server closes its idle connections: a POST on one of
		// them would end in EOF.
		dropIdleConnections()
	}

	b := s.openBrowser("alice", "", true)
	a := s.queue("alice", b.SID, samplerWorkflow("during", 12))
	b.waitType("progress", 30*time.Second)
	reload("heartbeat 2s", base) // same command, other settings
	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job across a reload: %v %q", types(frames), exceptionMessage(frames))
	}
	if st := s.status(t); !ready(st) || st.ComfyUI.PID != first.ComfyUI.PID || st.ComfyUI.Restarts != 0 {
		t.Fatalf("ComfyUI after a reload with the same command: %+v (was pid %d)", st.ComfyUI, first.ComfyUI.PID)
	}

	// A new command replaces ComfyUI.
	reload("", base+" -name changed")
	st := s.waitStatus(t, "the new command", func(st workerStatus) bool { return ready(st) && st.ComfyUI.PID != first.ComfyUI.PID })
	if alive(first.ComfyUI.PID) {
		t.Fatalf("the old ComfyUI %d still runs", first.ComfyUI.PID)
	}
	var stats struct {
		Devices []struct {
			Name string `json:"name"`
		} `json:"devices"`
	}
	w := &gateway{t: t, Base: s.worker}
	w.getJSON("", "/system_stats", &stats)
	if len(stats.Devices) == 0 || !strings.Contains(stats.Devices[0].Name, "changed") {
		t.Fatalf("not the new command's ComfyUI (pid %d): %+v", st.ComfyUI.PID, stats)
	}
	c := s.queue("alice", b.SID, samplerWorkflow("after", 2))
	if frames := b.untilJobEnd(c.PromptID, 60*time.Second); indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job after the new command: %v %q", types(frames), exceptionMessage(frames))
	}
}

// The README's GPU-side snippet adapts as written; wrong uses of the
// command options are refused with the reason.
func TestWorkerCommandOptionsAdapt(t *testing.T) {
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	const start = "```caddyfile\n:8080 {\n\tcomfyume_worker {\n\t\tcommand "
	i := strings.Index(string(readme), start)
	if i < 0 {
		t.Fatal("the README's comfyume_worker command example is gone")
	}
	snippet := string(readme[i+len("```caddyfile\n"):])
	snippet = snippet[:strings.Index(snippet, "```")]
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(snippet), nil)
	if err != nil {
		t.Fatalf("README snippet: %v\n%s", err, snippet)
	}
	for _, want := range []string{`"command":["python","main.py","--listen","127.0.0.1","--port","8188"]`, `"dir":"/opt/ComfyUI"`, `"env":{"PYTORCH_CUDA_ALLOC_CONF":"expandable_segments:True"}`} {
		if !strings.Contains(string(cfg), want) {
			t.Fatalf("adapted config lacks %s: %s", want, cfg)
		}
	}
	for _, bad := range []struct{ block, want string }{
		{"command", "wrong argument count"},
		{"command x\n\t\tenv ONLY", "env takes a variable name and its value"},
		{"command x\n\t\trestart_backoff 5s 1s", "shorter than the shortest"},
		{"command x\n\t\tstop_timeout soon", "is not a duration"},
		{"dir /opt/ComfyUI", "need a command"},
	} {
		_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(":8080 {\n\tcomfyume_worker {\n\t\t"+bad.block+"\n\t}\n}\n"), nil)
		if err == nil || !strings.Contains(err.Error(), bad.want) {
			t.Fatalf("%q: %v, want %q", bad.block, err, bad.want)
		}
	}
}
