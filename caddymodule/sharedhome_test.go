package caddymodule_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// homeRequests returns the requests home received whose path ends with
// suffix, with their Comfy-User header.
func homeRequests(home *comfytest.Server, method, suffix string) (users []string) {
	for _, r := range home.Requests() {
		if r.Method == method && strings.HasSuffix(r.Path, suffix) {
			users = append(users, strings.Join(r.Header.Values("Comfy-User"), ","))
		}
	}
	return users
}

// One home for every user of the site: user data requests carry each
// user's own Comfy-User (ComfyUI's --multi-user header), whatever the
// client sent; the routes that act on all of home's users are refused or
// kept to the user's own jobs.
func TestSharedHome(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), "")) // home has no placeholder: shared

	st, body := g.send("alice", "POST", "/api/userdata/workflows%2Fmine.json?overwrite=true", []byte(`{"nodes":[]}`), "Comfy-User", "bob")
	if st != 200 {
		t.Fatalf("alice saves a workflow: %d %s", st, body)
	}
	if got := homeRequests(home, "POST", "/userdata/workflows%2Fmine.json"); len(got) != 1 || got[0] != "alice" {
		t.Fatalf("alice's save reached home as Comfy-User %q, want alice", got)
	}
	g.send("bob", "GET", "/api/userdata?dir=workflows", nil)
	g.send("bob", "GET", "/api/settings", nil, "Comfy-User", "alice")
	if got := homeRequests(home, "GET", "/userdata"); len(got) != 1 || got[0] != "bob" {
		t.Fatalf("bob's listing reached home as Comfy-User %q, want bob", got)
	}
	if got := homeRequests(home, "GET", "/settings"); len(got) != 1 || got[0] != "bob" {
		t.Fatalf("bob's settings reached home as Comfy-User %q, want bob", got)
	}

	// Routes that act on every user of home: refused, ComfyUI-shaped.
	for _, p := range []string{"/internal/logs", "/api/internal/logs/raw", "/api/internal/files/output", "/api//internal/./logs"} {
		st, body := g.send("alice", "GET", p, nil)
		var e struct {
			Error struct{ Type, Message string } `json:"error"`
		}
		if st != 403 || json.Unmarshal(body, &e) != nil || e.Error.Type != "shared_home" {
			t.Errorf("GET %s on a shared home: %d %s", p, st, body)
		}
	}
	if st, body := g.send("alice", "POST", "/api/free", []byte(`{"unload_models":true}`)); st != 403 {
		t.Errorf("POST /free on a shared home: %d %s", st, body)
	}
	for _, r := range home.Requests() {
		if strings.Contains(r.Path, "internal") || strings.HasSuffix(r.Path, "/free") {
			t.Errorf("home received %s %s", r.Method, r.Path)
		}
	}
	// Interrupt without a prompt_id and the clears stay with alice's jobs:
	// home, where others' jobs run, never hears of them.
	for _, p := range []string{"/api/interrupt", "/api/queue", "/api/history"} {
		body := `{"clear":true}`
		if p == "/api/interrupt" {
			body = `{}`
		}
		if st, b := g.send("alice", "POST", p, []byte(body)); st != 200 {
			t.Fatalf("POST %s: %d %s", p, st, b)
		}
		if got := homeRequests(home, "POST", strings.TrimPrefix(p, "/api")); len(got) != 0 {
			t.Errorf("POST %s reached the shared home", p)
		}
	}
}

// A home per user (a placeholder in its URL) is the user's own: nothing is
// refused or rewritten on the way.
func TestPerUserHomeIsUntouched(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	hostport := strings.TrimPrefix(home.URL(), "http://")
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "home "+home.URL(), "home http://{http.request.header.X-Home}", 1)
	cf = strings.Replace(cf, "reverse_proxy "+hostport, "reverse_proxy {http.request.header.X-Home}", 1)
	g := startCaddy(t, cf)
	if st, b := g.send("alice", "GET", "/api/internal/logs", nil, "X-Home", hostport); st == 403 {
		t.Fatalf("/internal/logs on alice's own home: %d %s", st, b)
	}
	g.send("alice", "POST", "/api/interrupt", []byte(`{}`), "X-Home", hostport)
	g.send("alice", "GET", "/api/settings", nil, "X-Home", hostport, "Comfy-User", "alice-profile-2")
	if got := homeRequests(home, "GET", "/internal/logs"); len(got) != 1 {
		t.Errorf("/internal/logs did not reach alice's own home")
	}
	if got := homeRequests(home, "POST", "/interrupt"); len(got) != 1 {
		t.Errorf("interrupt did not reach alice's own home")
	}
	if got := homeRequests(home, "GET", "/settings"); len(got) != 1 || got[0] != "alice-profile-2" {
		t.Errorf("alice's own profile choice on her own home: %q", got)
	}
}

// A home URL from the environment ({env.*}) is the same for everyone: the
// home is shared, and treated as such.
func TestSharedHomeFromEnvironment(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	t.Setenv("COMFYUME_TEST_HOME", home.URL())
	g := startCaddy(t, strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "home "+home.URL(), "home {env.COMFYUME_TEST_HOME}", 1))
	if st, body := g.send("alice", "GET", "/api/internal/logs", nil); st != 403 || !strings.Contains(string(body), "shared_home") {
		t.Fatalf("/internal/logs on a home from {env.*}: %d %s", st, body)
	}
	g.send("alice", "GET", "/api/settings", nil, "Comfy-User", "bob")
	if got := homeRequests(home, "GET", "/settings"); len(got) != 1 || got[0] != "alice" {
		t.Fatalf("settings reached home as Comfy-User %q, want alice", got)
	}
}

// homeOnlyCaddyfile is poolCaddyfile with prompts run on the (shared) home.
func homeOnlyCaddyfile(home, gpu string) string {
	return strings.Replace(poolCaddyfile(home, gpu, ""), "run_on gpu", "run_on home", 1)
}

// On a shared home, bob opens a socket with alice's clientId (read from
// home's queue, or guessed). ComfyUI keeps one socket per clientId, the
// newest: had the gateway dialed home with the clientId as given, bob's
// link would take over alice's at home, and bob would get her job's
// progress, previews and outputs while her tab heard nothing more. Each
// user's clientId reaches a shared home as a sid of that user's own, and
// the prompts passed on to it carry that sid: alice keeps her events, bob
// gets none, and home's queue never shows alice's clientId.
func TestSharedHomeSocketsAreEachUsers(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home", KeepReplacedSockets: true, StepDelay: 20 * time.Millisecond})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, homeOnlyCaddyfile(home.URL(), gpu.URL()))
	alice := g.openBrowser("alice", "", false)
	alice.waitType("status", 5*time.Second) // home's: her link to home is up

	// Alice's first job: what bob can read of it at home.
	first := g.queue("alice", alice.SID, samplerWorkflow("first", 1))
	alice.untilJobEnd(first.PromptID, 10*time.Second)
	for _, p := range []string{"/api/queue", "/api/history", "/api/history/" + first.PromptID, "/api/jobs", "/api/jobs/" + first.PromptID} {
		if st, b := g.send("bob", "GET", p, nil); strings.Contains(string(b), alice.SID) {
			t.Errorf("GET %s shows bob alice's clientId: %d %s", p, st, b)
		}
	}
	for _, r := range home.Prompts() {
		if r.ClientID == alice.SID {
			t.Errorf("alice's prompt reached the shared home with her clientId as given")
		}
	}

	bob := g.openBrowser("bob", alice.SID, false)
	bob.waitType("status", 5*time.Second) // home's: his link to home is up
	job := g.queue("alice", alice.SID, samplerWorkflow("second", 20))
	frames := alice.untilJobEnd(job.PromptID, 20*time.Second)
	if n := len(frames); n < 20 {
		t.Errorf("alice got %d frames of her job: %v", n, types(frames))
	}
	bob.noFrameFor(job.PromptID, 500*time.Millisecond)
}

// On a shared home, home's queue and history hold every user's jobs. Bob
// sees none of alice's (their prompts, workflows and outputs), and what he
// names of hers — to delete from the queue or the history, to interrupt,
// to cancel — never reaches home; alice sees and acts on her own.
func TestSharedHomeJobsAreEachUsers(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home", StepDelay: 20 * time.Millisecond})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, homeOnlyCaddyfile(home.URL(), gpu.URL()))
	alice := g.openBrowser("alice", "", false)
	done := g.queue("alice", alice.SID, samplerWorkflow("done", 1))
	alice.untilJobEnd(done.PromptID, 10*time.Second)
	running := g.queue("alice", alice.SID, samplerWorkflow("running", 100))
	alice.waitType("execution_start", 10*time.Second)
	waiting := g.queue("alice", alice.SID, samplerWorkflow("waiting", 1))
	ids := []string{done.PromptID, running.PromptID, waiting.PromptID}

	for _, p := range []string{"/api/queue", "/api/history", "/api/history/" + done.PromptID, "/api/jobs",
		"/api/jobs/" + done.PromptID, "/api/jobs/" + running.PromptID, "/api/prompt"} {
		st, b := g.send("bob", "GET", p, nil)
		for _, id := range ids {
			if strings.Contains(string(b), id) {
				t.Errorf("GET %s shows bob alice's job %s: %d %s", p, id, st, b)
			}
		}
	}
	before := len(home.Requests())
	for _, c := range []struct{ path, body string }{
		{"/api/queue", `{"delete":["` + waiting.PromptID + `"]}`},
		{"/api/history", `{"delete":["` + done.PromptID + `"]}`},
		{"/api/interrupt", `{"prompt_id":"` + running.PromptID + `"}`},
		{"/api/jobs/" + waiting.PromptID + "/cancel", ``},
		{"/api/jobs/cancel", `{"job_ids":["` + running.PromptID + `"]}`},
	} {
		if st, b := g.send("bob", "POST", c.path, []byte(c.body)); st != 200 {
			t.Errorf("bob's POST %s: %d %s", c.path, st, b)
		}
	}
	for _, r := range home.Requests()[before:] {
		if r.Method == "POST" {
			t.Errorf("bob's request reached the shared home: %s %s", r.Method, r.Path)
		}
	}

	// Alice's own: listed, and hers to act on.
	for _, c := range []struct{ path, id string }{{"/api/queue", running.PromptID}, {"/api/queue", waiting.PromptID},
		{"/api/history", done.PromptID}, {"/api/jobs", running.PromptID}, {"/api/jobs", done.PromptID}, {"/api/jobs/" + done.PromptID, done.PromptID}} {
		if st, b := g.send("alice", "GET", c.path, nil); st != 200 || !strings.Contains(string(b), c.id) {
			t.Errorf("GET %s does not show alice her job %s: %d %s", c.path, c.id, st, b)
		}
	}
	g.send("alice", "POST", "/api/queue", []byte(`{"delete":["`+waiting.PromptID+`"]}`))
	g.send("alice", "POST", "/api/interrupt", []byte(`{"prompt_id":"`+running.PromptID+`"}`))
	frames := alice.untilJobEnd(running.PromptID, 20*time.Second)
	if indexOf(frames, "execution_interrupted") < 0 {
		t.Errorf("alice's interrupt of her own job: %v", types(frames))
	}
	if st, b := g.send("alice", "GET", "/api/queue", nil); strings.Contains(string(b), waiting.PromptID) {
		t.Errorf("alice's delete of her own waiting job: %d %s", st, b)
	}
}

// A pool's `fallback home` runs alice's job on the shared home, sent by
// the gateway's own link: bob sees nothing of it at home and cannot
// interrupt it there; alice has it listed once, from the gateway.
func TestSharedHomeFallbackJobIsTheUsers(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home", StepDelay: 20 * time.Millisecond})
	dead := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cf := strings.Replace(poolCaddyfile(home.URL(), dead, ""), "pool gpu {", "pool gpu {\n\t\t\tcold_start_timeout 300ms\n\t\t\tfallback home", 1)
	g := startCaddy(t, cf)
	alice := g.openBrowser("alice", "", true)
	a := g.queue("alice", alice.SID, samplerWorkflow("fb", 50))
	alice.waitType("execution_start", 10*time.Second)
	if n := len(home.Prompts()); n != 1 {
		t.Fatalf("home received %d prompts", n)
	}
	for _, p := range []string{"/api/queue", "/api/jobs", "/api/jobs/" + a.PromptID} {
		if st, b := g.send("bob", "GET", p, nil); strings.Contains(string(b), a.PromptID) {
			t.Errorf("GET %s shows bob alice's job: %d %s", p, st, b)
		}
	}
	g.send("bob", "POST", "/api/interrupt", []byte(`{"prompt_id":"`+a.PromptID+`"}`))
	if got := homeRequests(home, "POST", "/interrupt"); len(got) != 0 {
		t.Errorf("bob's interrupt of alice's job reached home")
	}
	var page jobsPage
	g.getJSON("alice", "/api/jobs", &page)
	if n := len(page.Jobs); n != 1 || page.Jobs[0]["id"] != a.PromptID {
		t.Errorf("alice's jobs: %v", page.Jobs)
	}
	frames := alice.untilJobEnd(a.PromptID, 20*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Errorf("alice's job: %v", types(frames))
	}
}

// A shared home sends some frames to every socket: a job's
// display_component and progress text always, and the progress and
// previews of a prompt sent to it without a client_id. Bob gets none of
// those of alice's job, nor of a job that is nobody's; alice gets those of
// her own.
func TestSharedHomeBroadcastsAreEachUsers(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home", StepDelay: 20 * time.Millisecond})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, homeOnlyCaddyfile(home.URL(), gpu.URL()))
	alice := g.openBrowser("alice", "", false)
	bob := g.openBrowser("bob", "", false)
	alice.waitType("status", 5*time.Second) // home's: the links are up
	bob.waitType("status", 5*time.Second)

	// A job of nobody's, sent to home directly: its progress goes to
	// every socket at home.
	var nobody promptAnswer
	homePost(t, home, "/prompt", map[string]any{"prompt": samplerWorkflow("nobody", 5)}, &nobody)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if resp, err := http.Get(home.URL() + "/history/" + nobody.PromptID); err == nil {
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if len(bytes.TrimSpace(b)) > 2 {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the job of nobody's did not end")
		}
	}

	job := g.queue("alice", alice.SID, samplerWorkflow("mine", 100))
	for f := alice.next(10 * time.Second); !(f.Type == "executing" && f.str("node") == "2"); f = alice.next(10 * time.Second) {
	}
	home.SendRaw(false, []byte(`{"type":"display_component","data":{"node_id":"2","component":"ChatHistoryWidget","props":{"history":"alice's secret chat"}}}`))
	text := binary.BigEndian.AppendUint32(nil, 3)
	text = binary.BigEndian.AppendUint32(text, 1)
	text = append(text, "2alice's secret text"...)
	home.SendRaw(true, text)
	home.SendRaw(false, []byte(`{"type":"marker","data":{}}`))

	got := map[string]bool{}
	for f := alice.next(10 * time.Second); f.Type != "marker"; f = alice.next(10 * time.Second) {
		got[f.Type] = true
		got["text"] = got["text"] || bytes.Contains(f.data, []byte("secret text"))
	}
	if !got["display_component"] || !got["text"] {
		t.Errorf("alice did not get her own job's display_component and text: %v", got)
	}
	for f := bob.next(10 * time.Second); f.Type != "marker"; f = bob.next(10 * time.Second) {
		if bytes.Contains(f.data, []byte("secret")) || f.str("prompt_id") == nobody.PromptID || f.str("prompt_id") == job.PromptID || !f.text {
			t.Errorf("bob got a frame of another's job: %s", f.data)
		}
	}
	alice.untilJobEnd(job.PromptID, 20*time.Second)
}

// The UI's clear buttons and its interrupt without an id act on alice's
// own jobs at a shared home, by id, and never on bob's.
func TestSharedHomeClearsAreEachUsers(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home", StepDelay: 20 * time.Millisecond})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, homeOnlyCaddyfile(home.URL(), gpu.URL()))
	alice := g.openBrowser("alice", "", false)
	bob := g.openBrowser("bob", "", false)
	aliceDone := g.queue("alice", alice.SID, samplerWorkflow("a", 1))
	alice.untilJobEnd(aliceDone.PromptID, 10*time.Second)
	bobDone := g.queue("bob", bob.SID, samplerWorkflow("b", 1))
	bob.untilJobEnd(bobDone.PromptID, 10*time.Second)
	running := g.queue("alice", alice.SID, samplerWorkflow("running", 200))
	alice.waitType("execution_start", 10*time.Second)
	bobWaiting := g.queue("bob", bob.SID, samplerWorkflow("bw", 1))
	aliceWaiting := g.queue("alice", alice.SID, samplerWorkflow("aw", 1))

	for _, p := range []string{"/api/queue", "/api/history"} {
		if st, b := g.send("alice", "POST", p, []byte(`{"clear":true}`)); st != 200 {
			t.Fatalf("alice's clear of %s: %d %s", p, st, b)
		}
	}
	if st, b := g.send("alice", "POST", "/api/interrupt", []byte(`{}`)); st != 200 {
		t.Fatalf("alice's interrupt: %d %s", st, b)
	}
	if frames := alice.untilJobEnd(running.PromptID, 20*time.Second); indexOf(frames, "execution_interrupted") < 0 {
		t.Errorf("alice's interrupt did not stop her job: %v", types(frames))
	}
	if frames := bob.untilJobEnd(bobWaiting.PromptID, 20*time.Second); indexOf(frames, "execution_success") < 0 {
		t.Errorf("bob's waiting job after alice's clear: %v", types(frames))
	}
	_, b := g.send("alice", "GET", "/api/history", nil)
	_, q := g.send("alice", "GET", "/api/queue", nil)
	if strings.Contains(string(b), aliceDone.PromptID) || strings.Contains(string(q)+string(b), aliceWaiting.PromptID) {
		t.Errorf("alice's clears left her jobs: queue %s history %s", q, b)
	}
	if _, b := g.send("bob", "GET", "/api/history", nil); !strings.Contains(string(b), bobDone.PromptID) {
		t.Errorf("alice's clear of the history took bob's job: %s", b)
	}
}
