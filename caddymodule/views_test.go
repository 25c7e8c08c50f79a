package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/relay"
)

type jobsPage struct {
	Jobs       []map[string]any `json:"jobs"`
	Pagination struct {
		Offset  *float64 `json:"offset"`
		Limit   *float64 `json:"limit"`
		Total   *float64 `json:"total"`
		HasMore *bool    `json:"has_more"`
	} `json:"pagination"`
}

func findJob(jobs []map[string]any, id string) map[string]any {
	for _, j := range jobs {
		if j["id"] == id {
			return j
		}
	}
	return nil
}

// checkFrontendShape applies what the current frontend's schema requires of
// every listed job: one bad item empties the whole panel.
func checkFrontendShape(t *testing.T, p jobsPage) {
	t.Helper()
	if p.Pagination.Offset == nil || p.Pagination.Limit == nil || p.Pagination.Total == nil || p.Pagination.HasMore == nil {
		t.Fatalf("pagination incomplete: %+v", p.Pagination)
	}
	for _, j := range p.Jobs {
		if _, ok := j["create_time"].(float64); !ok {
			t.Fatalf("job without numeric create_time: %v", j)
		}
		if _, ok := j["id"].(string); !ok {
			t.Fatalf("job without id: %v", j)
		}
		switch j["status"] {
		case "pending", "in_progress", "completed", "failed", "cancelled":
		default:
			t.Fatalf("job status %v", j["status"])
		}
	}
}

// The job panel lists home's jobs and the user's remote jobs even when home
// is a ComfyUI from before the jobs API, with rewritten output refs.
func TestJobViewsMergeHomeAndRemote(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2024-12", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	b := g.openBrowser("alice", "", true)

	// A job of alice's that ran on home itself. (Home is shared: its jobs
	// are told apart by their client_id, alice's sid there.)
	direct, _ := json.Marshal(map[string]any{"prompt": samplerWorkflow("home", 1), "client_id": relay.SharedSID("alice", b.SID)})
	resp, err := http.Post(home.URL()+"/prompt", "application/json", bytes.NewReader(direct))
	if err != nil {
		t.Fatal(err)
	}
	var homeJob promptAnswer
	_ = json.NewDecoder(resp.Body).Decode(&homeJob)
	resp.Body.Close()

	a := g.queue("alice", b.SID, samplerWorkflow("remote", 2))
	var frames []wsFrame
	for _, f := range b.untilJobEnd(a.PromptID, 30*time.Second) {
		if f.str("prompt_id") == a.PromptID { // not the home job's, also alice's
			frames = append(frames, f)
		}
	}
	ref := outputRef(t, frames, "3")
	// Wait for home's job too.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var h map[string]any
		g.getJSON("alice", "/history/"+homeJob.PromptID, &h)
		if len(h) > 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}

	var page jobsPage
	g.getJSON("alice", "/api/jobs?status=completed,failed,cancelled&limit=64&offset=0", &page)
	checkFrontendShape(t, page)
	rj := findJob(page.Jobs, a.PromptID)
	if rj == nil || findJob(page.Jobs, homeJob.PromptID) == nil {
		t.Fatalf("jobs panel lacks a job: %v", page.Jobs)
	}
	if rj["status"] != "completed" || rj["outputs_count"] != float64(1) {
		t.Fatalf("remote job %v", rj)
	}
	po, _ := rj["preview_output"].(map[string]any)
	if po["subfolder"] != ref["subfolder"] || po["filename"] != ref["filename"] || po["nodeId"] != "3" {
		t.Fatalf("preview_output %v, want ref %v", po, ref)
	}
	if *page.Pagination.Total != 2 || *page.Pagination.HasMore {
		t.Fatalf("pagination %+v", page.Pagination)
	}
	// Pagination across both sources.
	var p1 jobsPage
	g.getJSON("alice", "/api/jobs?status=completed&limit=1&offset=0", &p1)
	checkFrontendShape(t, p1)
	if len(p1.Jobs) != 1 || !*p1.Pagination.HasMore || *p1.Pagination.Total != 2 {
		t.Fatalf("page 1: %+v", p1)
	}
	var queued jobsPage
	g.getJSON("alice", "/api/jobs?status=in_progress,pending&limit=200&offset=0", &queued)
	checkFrontendShape(t, queued)
	if len(queued.Jobs) != 0 {
		t.Fatalf("finished jobs listed as queued: %v", queued.Jobs)
	}
	st, body, _ := g.do("alice", "GET", "/api/jobs?status=bogus", nil)
	if st != 400 || !strings.Contains(string(body), "error") {
		t.Fatalf("bad status param: %d %s", st, body)
	}

	// Details and history carry the rewritten refs.
	var detail map[string]any
	g.getJSON("alice", "/api/jobs/"+a.PromptID, &detail)
	outs, _ := detail["outputs"].(map[string]any)
	n3, _ := outs["3"].(map[string]any)
	imgs, _ := n3["images"].([]any)
	if len(imgs) != 1 || imgs[0].(map[string]any)["subfolder"] != ref["subfolder"] {
		t.Fatalf("job detail outputs %v", detail["outputs"])
	}
	if _, ok := detail["workflow"].(map[string]any)["prompt"].(map[string]any)["3"]; !ok {
		t.Fatalf("job detail workflow %v", detail["workflow"])
	}
	var hist map[string]struct {
		Prompt  []any                     `json:"prompt"`
		Outputs map[string]map[string]any `json:"outputs"`
		Status  struct {
			StatusStr string `json:"status_str"`
			Completed bool   `json:"completed"`
			Messages  []any  `json:"messages"`
		} `json:"status"`
	}
	g.getJSON("alice", "/api/history/"+a.PromptID, &hist)
	e, ok := hist[a.PromptID]
	if !ok || !e.Status.Completed || e.Status.StatusStr != "success" || len(e.Prompt) != 5 || e.Prompt[1] != a.PromptID || len(e.Status.Messages) < 2 {
		t.Fatalf("history entry %+v", hist)
	}
	g.getJSON("alice", "/history?max_items=64", &hist)
	if _, ok := hist[a.PromptID]; !ok {
		t.Fatalf("history list lacks remote job")
	}
	if _, ok := hist[homeJob.PromptID]; !ok {
		t.Fatalf("history list lacks home job")
	}
	var q struct {
		Running []any `json:"queue_running"`
		Pending []any `json:"queue_pending"`
	}
	g.getJSON("alice", "/queue", &q)
	if q.Running == nil || q.Pending == nil || len(q.Running)+len(q.Pending) != 0 {
		t.Fatalf("queue %+v", q)
	}
	var ps struct {
		ExecInfo struct {
			QueueRemaining *int `json:"queue_remaining"`
		} `json:"exec_info"`
	}
	g.getJSON("alice", "/api/prompt", &ps)
	if ps.ExecInfo.QueueRemaining == nil || *ps.ExecInfo.QueueRemaining != 0 {
		t.Fatalf("GET /prompt %+v", ps)
	}

	// Deleting from history hides the remote job from its owner's views.
	st, _, _ = g.do("alice", "POST", "/api/history", map[string]any{"delete": []string{a.PromptID}})
	if st != 200 {
		t.Fatalf("POST /history: %d", st)
	}
	g.getJSON("alice", "/api/jobs?status=completed", &page)
	if findJob(page.Jobs, a.PromptID) != nil {
		t.Fatalf("deleted job still listed")
	}
}

// Waiting and running jobs count in queue_remaining, /queue and /api/jobs,
// and cancel acts on the right job only.
func TestQueueCountsAndCancel(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 50 * time.Millisecond})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	b := g.openBrowser("alice", "", true)

	first := g.queue("alice", b.SID, samplerWorkflow("one", 40))
	second := g.queue("alice", b.SID, samplerWorkflow("two", 1))
	third := g.queue("alice", b.SID, samplerWorkflow("three", 1))
	b.waitType("execution_start", 10*time.Second)

	var ps struct {
		ExecInfo struct {
			QueueRemaining int `json:"queue_remaining"`
		} `json:"exec_info"`
	}
	g.getJSON("alice", "/prompt", &ps)
	if ps.ExecInfo.QueueRemaining != 3 {
		t.Fatalf("queue_remaining %d, want 3", ps.ExecInfo.QueueRemaining)
	}
	var queued jobsPage
	g.getJSON("alice", "/api/jobs?status=in_progress,pending&limit=200&offset=0", &queued)
	checkFrontendShape(t, queued)
	if j := findJob(queued.Jobs, first.PromptID); j == nil || j["status"] != "in_progress" {
		t.Fatalf("running job: %v", queued.Jobs)
	}
	if j := findJob(queued.Jobs, second.PromptID); j == nil || j["status"] != "pending" {
		t.Fatalf("waiting job: %v", queued.Jobs)
	}
	var q struct {
		Running [][]any `json:"queue_running"`
		Pending [][]any `json:"queue_pending"`
	}
	g.getJSON("alice", "/api/queue", &q)
	if len(q.Running) != 1 || q.Running[0][1] != first.PromptID || len(q.Pending) != 2 {
		t.Fatalf("queue %v", q)
	}
	// Cancel the third while it waits; it never reaches the GPU.
	st, _, _ := g.do("alice", "POST", "/api/jobs/"+third.PromptID+"/cancel", nil)
	if st != 200 {
		t.Fatalf("cancel: %d", st)
	}
	// An unknown id is a harmless no-op.
	st, _, _ = g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": "00000000-0000-4000-8000-000000000000"})
	if st != 200 {
		t.Fatalf("interrupt unknown: %d", st)
	}
	// Interrupt the running one: the browser sees execution_interrupted.
	st, _, _ = g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": first.PromptID})
	if st != 200 {
		t.Fatalf("interrupt: %d", st)
	}
	frames := b.untilJobEnd(first.PromptID, 30*time.Second)
	if indexOf(frames, "execution_interrupted") < 0 {
		t.Fatalf("no execution_interrupted: %v", types(frames))
	}
	frames = b.untilJobEnd(second.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("second job: %v", types(frames))
	}
	for _, p := range gpu.Prompts() {
		if p.PromptID == third.PromptID {
			t.Fatalf("cancelled job reached the GPU")
		}
	}
	var done jobsPage
	g.getJSON("alice", "/api/jobs", &done)
	checkFrontendShape(t, done)
	want := map[string]string{first.PromptID: "cancelled", second.PromptID: "completed", third.PromptID: "cancelled"}
	for id, st := range want {
		if j := findJob(done.Jobs, id); j == nil || j["status"] != st {
			t.Fatalf("job %s: %v, want %s", id, j, st)
		}
	}
	g.getJSON("alice", "/prompt", &ps)
	if ps.ExecInfo.QueueRemaining != 0 {
		t.Fatalf("queue_remaining after all: %d", ps.ExecInfo.QueueRemaining)
	}
}

// Bulk cancel, queue clear and history clear act on this user's jobs only,
// and unknown ids are harmless.
func TestBulkCancelAndClears(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 50 * time.Millisecond})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	alice := g.openBrowser("alice", "", true)
	bob := g.openBrowser("bob", "", true)
	running := g.queue("alice", alice.SID, samplerWorkflow("run", 30))
	w1 := g.queue("alice", alice.SID, samplerWorkflow("w1", 1))
	w2 := g.queue("alice", alice.SID, samplerWorkflow("w2", 1))
	alice.waitType("execution_start", 10*time.Second)

	// bob clears "his" queue: alice's waiting jobs stay.
	if st, _, _ := g.do("bob", "POST", "/api/queue", map[string]any{"clear": true}); st != 200 {
		t.Fatalf("bob's clear: %d", st)
	}
	bobs := g.queue("bob", bob.SID, samplerWorkflow("bob", 1))
	var page jobsPage
	g.getJSON("alice", "/api/jobs?status=pending", &page)
	if findJob(page.Jobs, w1.PromptID) == nil || findJob(page.Jobs, w2.PromptID) == nil {
		t.Fatalf("bob's clear removed alice's jobs: %v", page.Jobs)
	}
	// alice cancels the running one and w1 in one call, plus an unknown id.
	st, _, _ := g.do("alice", "POST", "/api/jobs/cancel", map[string]any{"job_ids": []string{running.PromptID, w1.PromptID, "00000000-0000-4000-8000-000000000000"}})
	if st != 200 {
		t.Fatalf("bulk cancel: %d", st)
	}
	frames := alice.untilJobEnd(running.PromptID, 30*time.Second)
	if indexOf(frames, "execution_interrupted") < 0 {
		t.Fatalf("running job not interrupted: %v", types(frames))
	}
	// alice clears her queue: w2 never runs.
	if st, _, _ := g.do("alice", "POST", "/api/queue", map[string]any{"clear": true}); st != 200 {
		t.Fatalf("alice's clear: %d", st)
	}
	bob.untilJobEnd(bobs.PromptID, 30*time.Second)
	time.Sleep(200 * time.Millisecond)
	for _, p := range gpu.Prompts() {
		if p.PromptID == w1.PromptID || p.PromptID == w2.PromptID {
			t.Fatalf("cancelled job %s reached the GPU", p.PromptID)
		}
	}
	g.getJSON("alice", "/api/jobs", &page)
	for _, id := range []string{running.PromptID, w1.PromptID, w2.PromptID} {
		if j := findJob(page.Jobs, id); j == nil || j["status"] != "cancelled" {
			t.Fatalf("job %s: %v", id, j)
		}
	}
	// History clear hides alice's finished jobs from her views only.
	if st, _, _ := g.do("alice", "POST", "/api/history", map[string]any{"clear": true}); st != 200 {
		t.Fatalf("history clear: %d", st)
	}
	g.getJSON("alice", "/api/jobs", &page)
	if len(page.Jobs) != 0 {
		t.Fatalf("after history clear: %v", page.Jobs)
	}
	g.getJSON("bob", "/api/jobs", &page)
	if j := findJob(page.Jobs, bobs.PromptID); j == nil || j["status"] != "completed" {
		t.Fatalf("bob's job after alice's clear: %v", page.Jobs)
	}
}

// history_limit: when a job ends, the user's oldest ended jobs beyond the
// limit are forgotten (as ComfyUI forgets old history); other users' jobs
// are not touched.
func TestHistoryLimit(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}", "outputs disk {DATA}\n\t\thistory_limit 2", 1)
	g := startCaddy(t, cf)
	bob := g.openBrowser("bob", "", true)
	bobs := g.queue("bob", bob.SID, samplerWorkflow("bob", 1))
	bob.untilJobEnd(bobs.PromptID, 20*time.Second)
	b := g.openBrowser("alice", "", true)
	var ids []string
	for i := 0; i < 3; i++ {
		a := g.queue("alice", b.SID, samplerWorkflow(fmt.Sprint("h", i), 1))
		b.untilJobEnd(a.PromptID, 20*time.Second)
		ids = append(ids, a.PromptID)
	}
	// Trimming follows the job's end: wait until it has happened.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var page jobsPage
		g.getJSON("alice", "/api/jobs", &page)
		if len(page.Jobs) == 2 {
			if findJob(page.Jobs, ids[0]) != nil || findJob(page.Jobs, ids[1]) == nil || findJob(page.Jobs, ids[2]) == nil {
				t.Fatalf("kept the wrong jobs: %v", page.Jobs)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("alice has %d jobs listed, want the newest 2", len(page.Jobs))
		}
		time.Sleep(20 * time.Millisecond)
	}
	var h map[string]any
	g.getJSON("alice", "/history", &h)
	if _, ok := h[ids[0]]; ok || len(h) != 2 {
		t.Fatalf("/history keeps %d entries (the oldest: %v)", len(h), ok)
	}
	var page jobsPage
	g.getJSON("bob", "/api/jobs", &page)
	if findJob(page.Jobs, bobs.PromptID) == nil {
		t.Fatal("bob's job was trimmed by alice's")
	}
}
