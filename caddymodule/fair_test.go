package caddymodule_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/caddymodule"
	"github.com/comfyume/comfyume/comfytest"
)

// Users take turns on a shared GPU: bob's one prompt runs right after
// alice's current one, not after her whole batch. Waiting jobs show their
// place; a user over max_queued is told so.
func TestFairQueueAcrossUsers(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 40 * time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "pool gpu {", "pool gpu {\n\t\t\tmax_queued 4", 1)
	g := startCaddy(t, cf)
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		var page jobsPage
		g.getJSON("alice", "/api/jobs", &page)
		for _, j := range page.Jobs {
			t.Logf("job %v %v pos=%v", j["id"], j["status"], j["queue_position"])
		}
		for _, p := range gpu.Prompts() {
			t.Logf("gpu ran %s", p.PromptID)
		}
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		_ = os.WriteFile(filepath.Join(os.TempDir(), "fair-stacks.txt"), buf[:n], 0o644)
	})
	alice := g.openBrowser("alice", "", true)
	bob := g.openBrowser("bob", "", true)

	var ids []string
	for i := 0; i < 5; i++ { // one runs, four wait
		ids = append(ids, g.queue("alice", alice.SID, samplerWorkflow("a", 3)).PromptID)
	}
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("a", 1), "client_id": alice.SID})
	var e struct {
		Error struct{ Message, Details string } `json:"error"`
	}
	if st != 429 || json.Unmarshal(body, &e) != nil || e.Error.Message == "" {
		t.Fatalf("over max_queued: %d %s", st, body)
	}
	b1 := g.queue("bob", bob.SID, samplerWorkflow("b", 1)).PromptID

	var page jobsPage
	g.getJSON("bob", "/api/jobs?status=pending", &page)
	if j := findJob(page.Jobs, b1); j == nil || j["queue_position"] != float64(1) {
		t.Fatalf("bob's waiting job: %v", page.Jobs)
	}
	g.getJSON("alice", "/api/jobs?status=pending", &page)
	if len(page.Jobs) != 4 {
		t.Fatalf("alice's waiting jobs: %v", page.Jobs)
	}

	bob.untilJobEnd(b1, 30*time.Second)
	alice.untilJobEnd(ids[4], 20*time.Second)
	var order []string
	for _, p := range gpu.Prompts() {
		order = append(order, p.PromptID)
	}
	want := []string{ids[0], b1, ids[1], ids[2], ids[3], ids[4]}
	if strings.Join(order, ",") != strings.Join(want, ",") {
		t.Fatalf("GPU order %v, want %v (bob second)", order, want)
	}
}

// A pool whose max_queued is not set still bounds one user's waiting jobs
// (DefaultMaxQueued), so one script cannot fill the gateway's memory with
// prompts; others still get their turn.
func TestDefaultMaxQueued(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 200 * time.Millisecond})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	alice := g.openBrowser("alice", "", true)
	bob := g.openBrowser("bob", "", true)
	// One runs (max_jobs 1), DefaultMaxQueued wait.
	for i := 0; i <= caddymodule.DefaultMaxQueued; i++ {
		g.queue("alice", alice.SID, samplerWorkflow("a", 50))
	}
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("a", 1), "client_id": alice.SID})
	var e struct {
		Error struct{ Message, Details string } `json:"error"`
	}
	if st != 429 || json.Unmarshal(body, &e) != nil || !strings.Contains(e.Error.Details, "100 prompts waiting") {
		t.Fatalf("alice over the default max_queued: %d %s", st, body)
	}
	b := g.queue("bob", bob.SID, samplerWorkflow("b", 1)).PromptID
	var page jobsPage
	g.getJSON("bob", "/api/jobs?status=pending", &page)
	if j := findJob(page.Jobs, b); j == nil || j["queue_position"] != float64(1) {
		t.Fatalf("bob's job is not next: %v", page.Jobs)
	}
}
