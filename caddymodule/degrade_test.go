package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// startValkey runs a private Valkey server (the binary scripts/test.sh
// found) on a free port, so a test can stop and restart it.
func startValkey(t *testing.T, port int) *exec.Cmd {
	t.Helper()
	bin := valkeyServer(t)
	cmd := exec.Command(bin, "--port", fmt.Sprint(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	cmd.Env = append(os.Environ(), "LD_LIBRARY_PATH="+os.Getenv("COMFYUME_TEST_VALKEY_LD_PATH"))
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for i := 0; i < 100; i++ {
		if c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 50*time.Millisecond); err == nil {
			c.Close()
			return cmd
		}
		time.Sleep(30 * time.Millisecond)
	}
	t.Fatal("valkey did not start")
	return nil
}

// valkeyServer returns the Valkey binary scripts/test.sh found, skipping
// the test without one (failing it in CI).
func valkeyServer(t *testing.T) string {
	t.Helper()
	bin := os.Getenv("COMFYUME_TEST_VALKEY_SERVER")
	if bin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("COMFYUME_TEST_VALKEY_SERVER not set: scripts/test.sh sets it")
		}
		t.Skip("needs COMFYUME_TEST_VALKEY_SERVER (run scripts/test.sh)")
	}
	return bin
}

// Valkey goes down: new prompts get a ComfyUI-shaped 503 and nothing is
// half-written; the running job's events still reach its browser; when
// Valkey is back, prompts work again.
func TestValkeyDownAnswers503AndRecovers(t *testing.T) {
	_, s3 := sharedEnv(t)
	port := freePort(t)
	vk := startValkey(t, port)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 60 * time.Millisecond})
	cf := sharedCaddyfile(testPrefix(), fmt.Sprintf("127.0.0.1:%d", port), s3, home.URL(), gpu.URL(), "")
	cf = strings.Replace(cf, "max_jobs 1", "max_jobs 2", 1)
	g := startCaddy(t, cf)
	tab := g.openBrowser("alice", "", true)
	running := g.queue("alice", tab.SID, samplerWorkflow("during", 8))
	tab.waitType("progress", 10*time.Second)

	_ = vk.Process.Signal(syscall.SIGKILL)
	_ = vk.Wait()
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("refused", 1), "client_id": tab.SID})
	var e struct {
		Error struct {
			Type    string `json:"type"`
			Message string `json:"message"`
		} `json:"error"`
		NodeErrors any `json:"node_errors"`
	}
	if st != 503 || json.Unmarshal(body, &e) != nil || e.Error.Message == "" || e.NodeErrors == nil {
		t.Fatalf("prompt while Valkey is down: %d %s", st, body)
	}
	before := len(gpu.Prompts())
	frames := tab.untilJobEnd(running.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("running job while Valkey is down: %v", types(frames))
	}
	if before != 1 {
		t.Fatalf("refused prompt reached the GPU (%d prompts)", before)
	}

	startValkey(t, port)
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, body, _ = g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("after", 1), "client_id": tab.SID})
		if st == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no recovery after Valkey came back: %d %s", st, body)
		}
		time.Sleep(200 * time.Millisecond)
	}
	var a promptAnswer
	_ = json.Unmarshal(body, &a)
	frames = tab.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job after recovery: %v", types(frames))
	}
}

// Caddy and Valkey started together (a compose file): Valkey answering a
// moment after Caddy starts does not stop Caddy from starting.
func TestCaddyWaitsForValkeyAtStart(t *testing.T) {
	_, s3 := sharedEnv(t)
	valkeyServer(t)
	port := freePort(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	started := make(chan struct{})
	go func() {
		defer close(started)
		time.Sleep(700 * time.Millisecond)
		startValkey(t, port)
	}()
	g := startCaddy(t, sharedCaddyfile(testPrefix(), fmt.Sprintf("127.0.0.1:%d", port), s3, home.URL(), gpu.URL(), ""))
	<-started
	tab := g.openBrowser("alice", "", true)
	a := g.queue("alice", tab.SID, samplerWorkflow("late", 1))
	if frames := tab.untilJobEnd(a.PromptID, 20*time.Second); indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job: %v", types(frames))
	}
}
