package caddymodule_test

import (
	"encoding/json"
	"image/color"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
)

// Two users on one gateway: B never sees A's jobs, events, previews or
// outputs, whatever B guesses.
func TestTwoUsersSeeOnlyTheirOwn(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	alice := g.openBrowser("alice", "tab-a", true)
	bob := g.openBrowser("bob", "tab-b", true)

	a := g.queue("alice", alice.SID, samplerWorkflow("a", 3))
	frames := alice.untilJobEnd(a.PromptID, 30*time.Second)
	ref := outputRef(t, frames, "3")
	bob.noFrameFor(a.PromptID, 200*time.Millisecond)

	var page jobsPage
	g.getJSON("bob", "/api/jobs", &page)
	if findJob(page.Jobs, a.PromptID) != nil {
		t.Fatalf("bob lists alice's job")
	}
	var hist map[string]any
	g.getJSON("bob", "/history/"+a.PromptID, &hist)
	if len(hist) != 0 {
		t.Fatalf("bob reads alice's history: %v", hist)
	}
	g.getJSON("bob", "/history", &hist)
	if _, ok := hist[a.PromptID]; ok {
		t.Fatalf("bob's history lists alice's job")
	}
	st, _, _ := g.do("bob", "GET", "/api/jobs/"+a.PromptID, nil)
	if st != 404 {
		t.Fatalf("bob's job detail of alice's job: %d", st)
	}
	st, _, _ = g.do("bob", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 404 {
		t.Fatalf("bob's /view of alice's output: %d", st)
	}
	st, _, _ = g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 {
		t.Fatalf("alice's /view of her output: %d", st)
	}
	// bob cannot cancel alice's work.
	a2 := g.queue("alice", alice.SID, samplerWorkflow("a2", 3))
	g.do("bob", "POST", "/api/jobs/"+a2.PromptID+"/cancel", nil)
	g.do("bob", "POST", "/api/interrupt", map[string]any{"prompt_id": a2.PromptID})
	g.do("bob", "POST", "/api/queue", map[string]any{"delete": []string{a2.PromptID}})
	frames = alice.untilJobEnd(a2.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("bob disturbed alice's job: %v", types(frames))
	}

	// bob opens a socket with alice's clientId: still nothing of hers.
	spy := g.openBrowser("bob", "tab-a", true)
	a3 := g.queue("alice", alice.SID, samplerWorkflow("a3", 3))
	alice.untilJobEnd(a3.PromptID, 30*time.Second)
	spy.noFrameFor(a3.PromptID, 200*time.Millisecond)
}

// A browser that reconnects with its clientId mid-job keeps receiving that
// job's events, including what happened while it was away.
func TestReconnectMidJobKeepsEvents(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 30 * time.Millisecond})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	b := g.openBrowser("alice", "tab-1", true)
	a := g.queue("alice", b.SID, samplerWorkflow("re", 10))
	b.waitType("progress", 10*time.Second)
	b.conn.Close()
	// The job finishes while the tab is away.
	g.waitStatus("alice", a.PromptID, "completed", 30*time.Second)

	b2 := g.openBrowser("alice", "tab-1", true)
	if b2.SID != "tab-1" {
		t.Fatalf("sid %q", b2.SID)
	}
	frames := b2.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "executed") < 0 || indexOf(frames, "execution_success") < 0 {
		t.Fatalf("reconnected browser missed the end of the job: %v", types(frames))
	}
}

// Garbage or oversized frames from one browser close that socket only.
func TestBadBrowserFramesCloseOnlyThatSocket(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	good := g.openBrowser("alice", "good", true)
	for _, payload := range [][]byte{[]byte("this is not json"), []byte(`{"type":"x","data":` + strings.Repeat("[", 10) + strings.Repeat(" ", 2<<20) + `}`)} {
		bad := g.openBrowser("alice", "bad", false)
		_ = bad.conn.WriteMessage(websocket.TextMessage, payload)
		deadline := time.After(5 * time.Second)
	drain:
		for {
			select {
			case _, ok := <-bad.frames:
				if !ok {
					break drain
				}
			case <-deadline:
				t.Fatalf("socket that sent garbage (%d bytes) stayed open", len(payload))
			}
		}
	}
	a := g.queue("alice", good.SID, samplerWorkflow("ok", 2))
	frames := good.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("good socket affected: %v", types(frames))
	}
}

// Bad requests get ComfyUI's error shapes and statuses.
func TestBadRequests(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), "max_body_size 64KiB"))
	for _, body := range []string{"{not json", "[1,2]", `"prompt"`, `{"prompt": 5}`, `{"client_id": "x"}`, "{} trailing"} {
		st, b, _ := g.do("alice", "POST", "/api/prompt", body)
		var e struct {
			Error struct {
				Type    string `json:"type"`
				Message string `json:"message"`
			} `json:"error"`
			NodeErrors any `json:"node_errors"`
		}
		if st != 400 || json.Unmarshal(b, &e) != nil || e.Error.Type == "" || e.Error.Message == "" || e.NodeErrors == nil {
			t.Fatalf("body %q: %d %s", body, st, b)
		}
	}
	huge := `{"prompt": {}, "extra_data": {"x": "` + strings.Repeat("a", 100<<10) + `"}}`
	st, b, _ := g.do("alice", "POST", "/api/prompt", huge)
	if st != 413 || !strings.Contains(string(b), "error") {
		t.Fatalf("huge body: %d %s", st, b)
	}
	views := map[string]int{
		"filename=../x.png&subfolder=comfyume/abc&type=output":    400,
		"filename=/etc/passwd&subfolder=comfyume/abc&type=output": 400,
		"filename=x.png&subfolder=comfyume/abc&type=bogus":        400,
		"filename=x.png&subfolder=comfyume/../../..&type=output":  403,
		"filename=x.png&subfolder=comfyume/abc&type=output":       404,
		"subfolder=comfyume/abc&type=output":                      404,
		"filename=passwd&subfolder=comfyume/..%2F..%2Fetc":        403,
	}
	for q, want := range views {
		st, _, _ := g.do("alice", "GET", "/api/view?"+q, nil)
		if st != want {
			t.Errorf("/view?%s: %d, want %d", q, st, want)
		}
	}
	// Other /view requests are home's.
	home.PutInput("", "home.png", pngBytes(t, 2, 2, color.NRGBA{1, 2, 3, 255}))
	st, _, _ = g.do("alice", "GET", "/api/view?filename=home.png&type=input", nil)
	if st != 200 {
		t.Fatalf("home's /view: %d", st)
	}
}
