package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// validationError is ComfyUI's 400 for a prompt that fails validation.
type validationError struct {
	Error struct {
		Type      string         `json:"type"`
		Details   string         `json:"details"`
		ExtraInfo map[string]any `json:"extra_info"`
	} `json:"error"`
	NodeErrors map[string]struct {
		Errors []struct {
			Type    string `json:"type"`
			Details string `json:"details"`
		} `json:"errors"`
		DependentOutputs []string `json:"dependent_outputs"`
	} `json:"node_errors"`
}

// A prompt of 4000 nodes naming a model the pool lacks is refused with a
// bounded answer: the first 50 nodes, and how many more fail. (The old
// answer repeated every output node in every node's error: 104 MiB.)
func TestHugeInvalidPromptGetsBoundedAnswer(t *testing.T) {
	var models []string
	for i := 0; i < 25; i++ {
		models = append(models, fmt.Sprintf("model_%02d.safetensors", i))
	}
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", Models: models})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	const nodes = 4000
	prompt := map[string]any{}
	for i := 0; i < nodes; i++ {
		prompt[fmt.Sprintf("%04d", i)] = map[string]any{"class_type": "FakeCheckpointImage", "inputs": map[string]any{"ckpt_name": "missing.safetensors"}}
	}
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": prompt})
	var ve validationError
	if st != 400 || json.Unmarshal(body, &ve) != nil || ve.Error.Type != "prompt_outputs_failed_validation" {
		t.Fatalf("status %d, body %.300s", st, body)
	}
	if len(body) > 64<<10 {
		t.Fatalf("answer is %d bytes", len(body))
	}
	if len(ve.NodeErrors) != 50 {
		t.Fatalf("node_errors names %d nodes, want the first 50", len(ve.NodeErrors))
	}
	first := ve.NodeErrors["0000"]
	if len(first.Errors) != 1 || first.Errors[0].Type != "value_not_in_list" ||
		first.Errors[0].Details != "ckpt_name: 'missing.safetensors' not in (list of length 25)" {
		t.Fatalf("first node's error: %+v", first)
	}
	if len(first.DependentOutputs) != 1 || first.DependentOutputs[0] != "0000" {
		t.Fatalf("dependent_outputs %v", first.DependentOutputs)
	}
	if !strings.Contains(ve.Error.Details, "(and 3950 more nodes with errors)") || ve.Error.ExtraInfo["omitted_node_errors"] != float64(3950) {
		t.Fatalf("details do not count the rest: %q %v", ve.Error.Details[len(ve.Error.Details)-80:], ve.Error.ExtraInfo)
	}
}

// 120 LoadImage nodes naming files the user does not have: the answer
// names the first 50, each with its own output only.
func TestManyMissingInputsGetBoundedAnswer(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	const nodes = 120
	prompt := map[string]any{}
	for i := 0; i < nodes; i++ {
		prompt[fmt.Sprintf("%03d", i)] = map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": fmt.Sprintf("missing%d.png", i)}}
	}
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": prompt})
	var ve validationError
	if st != 400 || json.Unmarshal(body, &ve) != nil {
		t.Fatalf("status %d, body %.300s", st, body)
	}
	if len(ve.NodeErrors) != 50 || len(body) > 32<<10 {
		t.Fatalf("node_errors names %d nodes in %d bytes, want 50", len(ve.NodeErrors), len(body))
	}
	if e := ve.NodeErrors["000"]; len(e.Errors) != 1 || e.Errors[0].Details != "image - Invalid image file: missing0.png" || len(e.DependentOutputs) != 1 {
		t.Fatalf("first node's error: %+v", e)
	}
	if !strings.Contains(ve.Error.Details, "(and 70 more nodes with errors)") {
		t.Fatalf("details do not count the rest: %q", ve.Error.Details)
	}
}

// Page numbers past int64's range, or whose sum is, answer 200 with a
// clamped page (they panicked on a slice before).
func TestOverflowingPageQueries(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	b := g.openBrowser("alice", "", true)
	for i := 0; i < 2; i++ {
		a := g.queue("alice", b.SID, samplerWorkflow(fmt.Sprint("o", i), 1))
		b.untilJobEnd(a.PromptID, 20*time.Second)
	}
	var page jobsPage
	g.getJSON("alice", "/api/jobs?limit=9223372036854775807&offset=1", &page)
	if len(page.Jobs) != 1 {
		t.Fatalf("/api/jobs page has %d jobs, want 1", len(page.Jobs))
	}
	g.getJSON("alice", "/api/jobs?limit=1&offset=9223372036854775807", &page)
	if len(page.Jobs) != 0 {
		t.Fatalf("/api/jobs page past the end has %d jobs", len(page.Jobs))
	}
	var h map[string]any
	g.getJSON("alice", "/history?max_items=9223372036854775807&offset=1", &h)
	if len(h) != 1 {
		t.Fatalf("/history page has %d entries, want 1", len(h))
	}
	h = nil
	g.getJSON("alice", "/history?max_items=99999999999999999999&offset=-5", &h)
	if len(h) != 2 {
		t.Fatalf("/history page has %d entries, want 2", len(h))
	}
}
