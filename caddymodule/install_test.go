package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/comfyume/comfyume/comfytest"
)

var (
	unknownNode  = map[string]any{"1": map[string]any{"class_type": "NoSuchNode", "inputs": map[string]any{}}}
	missingModel = map[string]any{
		"1": map[string]any{"class_type": "FakeCheckpointImage", "inputs": map[string]any{"ckpt_name": "missing_model.safetensors"}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "m"}},
	}
)

// refusedAtOnce asserts the answers ComfyUI gives for a node and a model
// its install lacks: 400 missing_node_type naming the node, and 400
// value_not_in_list on the node with the model.
func refusedAtOnce(t *testing.T, g *gateway, user string) {
	t.Helper()
	st, body, _ := g.do(user, "POST", "/api/prompt", map[string]any{"prompt": unknownNode})
	var e struct {
		Error struct {
			Type, Message string
			ExtraInfo     map[string]any `json:"extra_info"`
		} `json:"error"`
		NodeErrors json.RawMessage `json:"node_errors"`
	}
	if st != 400 || json.Unmarshal(body, &e) != nil || e.Error.Type != "missing_node_type" ||
		!strings.Contains(e.Error.Message, "NoSuchNode") || e.Error.ExtraInfo["class_type"] != "NoSuchNode" || e.NodeErrors == nil {
		t.Fatalf("unknown node while the pool is cold: %d %s", st, body)
	}
	st, body, _ = g.do(user, "POST", "/api/prompt", map[string]any{"prompt": missingModel})
	var ve struct {
		NodeErrors map[string]struct {
			Errors []struct {
				Type string `json:"type"`
			} `json:"errors"`
		} `json:"node_errors"`
	}
	if st != 400 || json.Unmarshal(body, &ve) != nil || len(ve.NodeErrors["1"].Errors) != 1 || ve.NodeErrors["1"].Errors[0].Type != "value_not_in_list" {
		t.Fatalf("missing model while the pool is cold: %d %s", st, body)
	}
}

// The pool's last known install outlives a config reload (which makes
// its pools anew): with every GPU gone, a prompt needing a node or model
// the pool lacks is still refused at once, as ComfyUI would; a prompt the
// install can run is accepted and waits.
func TestColdPoolRefusesUnknownNodesAfterReload(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	dir := t.TempDir()
	cf := strings.ReplaceAll(poolCaddyfile(home.URL(), gpu.URL(), ""), "{DATA}", dir)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("warm", 1))
	b.untilJobEnd(a.PromptID, 30*time.Second)

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
	gpu.Kill()
	refusedAtOnce(t, g, "alice")
	ok := g.queue("alice", b.SID, samplerWorkflow("fine", 1))
	g.waitStatus("alice", ok.PromptID, "pending", 5*time.Second)
	if n := len(gpu.Prompts()); n != 1 {
		t.Fatalf("%d prompts reached the GPU, want 1 (the first)", n)
	}
}

// A pool never seen warm is not checked: the prompt is accepted and waits,
// as before (the gateway cannot know the install).
func TestNeverWarmPoolAcceptsAsBefore(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	dead := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	g := startCaddy(t, poolCaddyfile(home.URL(), dead, ""))
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": unknownNode})
	var a promptAnswer
	if st != 200 || json.Unmarshal(body, &a) != nil || a.PromptID == "" {
		t.Fatalf("never-warm pool: %d %s", st, body)
	}
}

// With Valkey the last known install is shared and survives restarts:
// replica B saw the pool warm; replica A never did, and after every GPU is
// gone A still refuses a prompt the install cannot run, at once.
func TestColdPoolRefusesUnknownNodesAcrossReplicas(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	b := startReplica(t, cf)
	tab := b.openBrowser("alice", "", true)
	warm := b.queue("alice", tab.SID, samplerWorkflow("warm", 1))
	tab.untilJobEnd(warm.PromptID, 30*time.Second)
	b.kill()
	gpu.Kill()

	a := startCaddy(t, cf)
	refusedAtOnce(t, a, "bob")
	ok := a.queue("bob", "", samplerWorkflow("fine", 1))
	a.waitStatus("bob", ok.PromptID, "pending", 5*time.Second)
}
