package caddymodule_test

import (
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/comfyume/comfyume/comfytest"
)

// A config reload mid-job keeps the job, the browser's socket and the
// captured outputs: the gateway's state lives as long as Caddy does.
func TestConfigReloadKeepsJobsAndSockets(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 40 * time.Millisecond})
	dir := t.TempDir()
	cf := strings.ReplaceAll(poolCaddyfile(home.URL(), gpu.URL(), ""), "{DATA}", dir)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	first := g.queue("alice", b.SID, samplerWorkflow("before", 2))
	frames := b.untilJobEnd(first.PromptID, 30*time.Second)
	ref := outputRef(t, frames, "3")

	a := g.queue("alice", b.SID, samplerWorkflow("during", 8))
	b.waitType("progress", 10*time.Second)

	// Reload with a changed config (a new header toward the GPU).
	port := strings.TrimPrefix(g.Base, "http://127.0.0.1:")
	changed := strings.ReplaceAll(strings.Replace(cf, "max_jobs 1", "max_jobs 1\n\t\t\t\theader X-Reloaded yes", 1), "{PORT}", port)
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(changed), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := caddy.Load(cfg, false); err != nil {
		t.Fatal(err)
	}
	// The old server closes its idle connections: a POST on one of
	// them would end in EOF.
	dropIdleConnections()

	frames = b.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job across reload: %v", types(frames))
	}
	var page jobsPage
	g.getJSON("alice", "/api/jobs", &page)
	if findJob(page.Jobs, first.PromptID) == nil || findJob(page.Jobs, a.PromptID) == nil {
		t.Fatalf("jobs forgotten by reload: %v", page.Jobs)
	}
	if st, _, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil); st != 200 {
		t.Fatalf("output after reload: %d", st)
	}
	// New jobs use the new config.
	c := g.queue("alice", b.SID, samplerWorkflow("after", 1))
	b.untilJobEnd(c.PromptID, 30*time.Second)
	ps := gpu.Prompts()
	if last := ps[len(ps)-1]; last.PromptID != c.PromptID || last.Header.Get("X-Reloaded") != "yes" {
		t.Fatalf("new config not in effect: %v", last.Header)
	}
}
