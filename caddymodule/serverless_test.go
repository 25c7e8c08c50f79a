package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/worker"
)

// A job that hangs on the GPU (no event for `watchdog`) is interrupted
// there, ends with an error the UI shows, and frees its slot.
func TestWatchdogEndsSilentJobs(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	gpu.FailNext("hang")
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "pool gpu {", "pool gpu {\n\t\t\twatchdog 500ms", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	stuck := g.queue("alice", b.SID, samplerWorkflow("stuck", 1))
	next := g.queue("alice", b.SID, samplerWorkflow("next", 1))
	frames := b.untilJobEnd(stuck.PromptID, 30*time.Second)
	i := indexOf(frames, "execution_error")
	if i < 0 || !strings.Contains(frames[i].str("exception_message"), "sent nothing") {
		t.Fatalf("stuck job: %v", types(frames))
	}
	frames = b.untilJobEnd(next.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("the slot was not freed: %v", types(frames))
	}
}

// A job whose GPU keeps sending events is never cut by the watchdog,
// however long it runs: here 20 steps 100 ms apart under a 500 ms
// watchdog.
func TestWatchdogSparesTalkingJobs(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 100 * time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "pool gpu {", "pool gpu {\n\t\t\twatchdog 500ms", 1)
	_, b, long := aliceQueues(t, cf, "long", 20)
	frames := b.untilJobEnd(long.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("a job that kept sending events was cut: %v", types(frames))
	}
}

// An endpoint that dies while our job still waits in its own queue: the
// job moves to the pool's other endpoint and completes there.
func TestFailoverBeforeStart(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu1 := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu1"})
	gpu2 := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu2"})
	// Someone else's job keeps gpu1 busy, so ours waits in gpu1's queue.
	gpu1.FailNext("hang")
	other, _ := json.Marshal(map[string]any{"prompt": samplerWorkflow("other", 1)})
	resp, err := http.Post(gpu1.URL()+"/prompt", "application/json", bytes.NewReader(other))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu1.URL(), ""), "\t\t}\n\t\toutputs", "\t\t\tupstream "+gpu2.URL()+"\n\t\t}\n\t\toutputs", 1)
	cf = strings.Replace(cf, "max_jobs 1", "max_jobs 1\n\t\t\t\tlost_timeout 300ms", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("moves", 1))
	// It went to gpu1 (listed first, equally idle) and waits there.
	deadline := time.Now().Add(10 * time.Second)
	for len(gpu1.Prompts()) < 2 {
		if time.Now().After(deadline) {
			t.Fatalf("job not sent to gpu1")
		}
		time.Sleep(10 * time.Millisecond)
	}
	gpu1.Kill()
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("failover: %v", types(frames))
	}
	ran := false
	for _, p := range gpu2.Prompts() {
		ran = ran || p.PromptID == a.PromptID
	}
	if !ran {
		t.Fatalf("job did not run on gpu2")
	}
}

// A deployment scaled to zero: the first prompt is held while a replica
// cold-starts (the browser is told), then runs; nothing fails.
func TestColdStartIsHeldNotFailed(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	d := comfytest.StartBalancer(t, comfytest.BalancerOptions{
		Replicas: 1, Server: comfytest.Options{Version: "2026"}, ColdStart: 1500 * time.Millisecond,
		ExtraHandler: func(_ int, comfy *comfytest.Server) http.Handler {
			mux := http.NewServeMux()
			mux.Handle(dispatch.WorkerPath, worker.NewServer(comfy.URL(), worker.Options{}))
			mux.Handle("/", comfy.Handler())
			return mux
		},
	})
	d.ScaleToZero()
	cf := strings.Replace(poolCaddyfile(home.URL(), d.URL(), ""), "max_jobs 1", "max_jobs 1\n\t\t\t\ttransport worker", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("cold", 1))
	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	n := notices(frames, "Waiting for a GPU")
	if indexOf(frames, "execution_success") < 0 || n == 0 {
		t.Fatalf("cold start: %d notices, %v", n, types(frames))
	}
}

// The GPU-side Caddyfile adapts and provisions the worker handler.
func TestWorkerDirectiveAdapts(t *testing.T) {
	comfy := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, `{
	admin off
}
:{PORT} {
	bind 127.0.0.1
	comfyume_worker {
		comfyui `+comfy.URL()+`
		token {env.COMFYUME_TEST_WORKER_TOKEN}
		heartbeat 5s
		idle 5m
	}
	reverse_proxy `+strings.TrimPrefix(comfy.URL(), "http://")+`
}`)
	// GET on the job path is the platform health check (no token needed).
	st, body, _ := g.do("", "GET", dispatch.WorkerPath, nil)
	if st != 200 || !strings.Contains(string(body), "ready") {
		t.Fatalf("worker status: %d %s", st, body)
	}
	// Other paths reach ComfyUI.
	if st, _, _ := g.do("", "GET", "/system_stats", nil); st != 200 {
		t.Fatalf("pass-through: %d", st)
	}
}

// fallback home: a pool nobody answers for runs the job on the user's own
// ComfyUI after cold_start_timeout; the browser is told, gets its output,
// and the job is listed once.
func TestFallbackHome(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	dead := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cf := strings.Replace(poolCaddyfile(home.URL(), dead, ""), "pool gpu {", "pool gpu {\n\t\t\tcold_start_timeout 500ms\n\t\t\tfallback home", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("fb", 1))
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	told := notices(frames, "your own ComfyUI") > 0
	if indexOf(frames, "execution_success") < 0 || !told {
		t.Fatalf("fallback: told=%v %v", told, types(frames))
	}
	ran := false
	for _, p := range home.Prompts() {
		ran = ran || p.PromptID == a.PromptID
	}
	if !ran {
		t.Fatalf("the job did not run on home")
	}
	ref := outputRef(t, frames, "3")
	if st, _, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil); st != 200 {
		t.Fatalf("output: %d", st)
	}
	var page jobsPage
	g.getJSON("alice", "/api/jobs", &page)
	n := 0
	for _, j := range page.Jobs {
		if j["id"] == a.PromptID {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("job listed %d times: %v", n, page.Jobs)
	}
}

// transport worker-async: a platform that only answers asynchronously
// (Prefer: respond-async, then status and result polling). The browser is
// shown the platform's status meanwhile, then gets the job's events and
// its output; a rejected prompt ends as an error the UI shows.
func TestAsyncPlatformTransport(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	comfy := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	mux := http.NewServeMux()
	mux.Handle(dispatch.WorkerPath, worker.NewServer(comfy.URL(), worker.Options{}))
	mux.Handle("/", comfy.Handler())
	backend := httptest.NewServer(mux)
	t.Cleanup(backend.Close)
	platform := comfytest.StartAsyncPlatformWith(t, comfytest.AsyncPlatformOptions{Backend: backend.URL, Deployment: "comfy-h200", QueueDelay: 2500 * time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), platform.DeploymentURL(), ""), "max_jobs 1", "max_jobs 1\n\t\t\t\ttransport worker-async", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("async", 2))
	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	told := notices(frames, "GPU job ") > 0
	if !told || indexOf(frames, "execution_success") < 0 {
		t.Fatalf("async job: told=%v %v", told, types(frames))
	}
	ref := outputRef(t, frames, "3")
	want, _ := comfy.OutputFile("output", "", ref["filename"].(string))
	if st, got, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil); st != 200 || !bytes.Equal(got, want) {
		t.Fatalf("async output: %d", st)
	}
}

// A deployment marked down is probed often only while jobs wait for it:
// once nothing waits, the gateway leaves it alone (a scaled-to-zero
// deployment nobody needs is not woken every 250 ms). With the queue
// shared in Valkey, where "nothing waits" is asked of the store.
func TestNoProbesWhileNothingWaits(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	d := comfytest.StartBalancer(t, comfytest.BalancerOptions{Replicas: 1, Server: comfytest.Options{Version: "2026"}, ColdStart: time.Minute})
	d.ScaleToZero()
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), d.URL(), "")
	cf = strings.Replace(cf, "pool gpu {", "pool gpu {\n\t\t\tcold_start_timeout 1s", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("never", 1))
	frames := b.untilJobEnd(a.PromptID, 20*time.Second)
	if indexOf(frames, "execution_error") < 0 {
		t.Fatalf("job for a deployment that never starts: %v", types(frames))
	}
	probes := func() int {
		n := 0
		for _, r := range d.Requests() {
			if r.Path == "/system_stats" {
				n++
			}
		}
		return n
	}
	while := probes()
	time.Sleep(1500 * time.Millisecond)
	if after := probes() - while; after > 1 {
		t.Fatalf("%d probes in 1.5 s with nothing waiting (%d while the job waited)", after, while)
	}
	if while == 0 {
		t.Fatalf("no probes while the job waited")
	}
}

// Circuit breaker: an endpoint that keeps refusing (503, a deployment
// stuck starting) stops getting jobs after a few failures, so it does not
// eat the queue: the pool's healthy endpoint runs them all.
func TestCircuitBreakerSparesBadEndpoint(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	bad := comfytest.StartBalancer(t, comfytest.BalancerOptions{Replicas: 1, Server: comfytest.Options{Version: "2026"}, ColdStart: time.Hour})
	bad.ScaleToZero()
	good := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "good"})
	// The bad endpoint is listed first: with equal load it is tried first.
	cf := strings.Replace(poolCaddyfile(home.URL(), bad.URL(), ""), "\t\t}\n\t\toutputs", "\t\t\tupstream "+good.URL()+"\n\t\t}\n\t\toutputs", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	const jobs = 8
	for i := 0; i < jobs; i++ {
		a := g.queue("alice", b.SID, samplerWorkflow(fmt.Sprint("cb", i), 1))
		if frames := b.untilJobEnd(a.PromptID, 30*time.Second); indexOf(frames, "execution_success") < 0 {
			t.Fatalf("job %d: %v", i, types(frames))
		}
	}
	// Each send to the comfyui transport begins with its event socket.
	tries := 0
	for _, r := range bad.Requests() {
		if r.WebSocket {
			tries++
		}
	}
	t.Logf("the refusing endpoint got %d of %d jobs' sends", tries, jobs)
	if len(good.Prompts()) != jobs || tries > dispatch.FailuresToOpen+1 {
		t.Fatalf("good endpoint ran %d of %d jobs; the refusing one was sent %d", len(good.Prompts()), jobs, tries)
	}
}
