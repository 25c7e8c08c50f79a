package caddymodule_test

import (
	"fmt"
	"net/http"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/worker"
)

// workerDeployment is a serverless deployment: replicas behind a
// non-sticky balancer, each running the worker handler in front of its own
// ComfyUI (what `comfyume_worker` does in the GPU container).
func workerDeployment(t *testing.T, replicas int, token string) *comfytest.Balancer {
	return comfytest.StartBalancer(t, comfytest.BalancerOptions{
		Replicas:   replicas,
		Server:     comfytest.Options{Version: "2026", StepDelay: 5 * time.Millisecond},
		PathPrefix: "/deployment",
		Token:      token,
		ExtraHandler: func(_ int, comfy *comfytest.Server) http.Handler {
			ws := worker.NewServer(comfy.URL(), worker.Options{Heartbeat: time.Second})
			mux := http.NewServeMux()
			mux.Handle(dispatch.WorkerPath, ws)
			mux.Handle("/", comfy.Handler())
			return mux
		},
	})
}

// Behind a load balancer that sends each request to any replica, ComfyUI's
// own multi-request conversation breaks: the prompt runs on one replica
// while its events are announced on another's socket.
func TestNonStickyBalancerBreaksPlainTransport(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	lb := comfytest.StartBalancer(t, comfytest.BalancerOptions{Replicas: 2, Server: comfytest.Options{Version: "2026"}})
	cf := strings.Replace(poolCaddyfile(home.URL(), lb.URL(), ""), "pool gpu {", "pool gpu {\n\t\t\twatchdog 1s", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("plain", 1))
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") >= 0 {
		t.Skip("the balancer happened to keep the conversation on one replica")
	}
	if indexOf(frames, "execution_error") < 0 {
		t.Fatalf("frames %v", types(frames))
	}
}

// The worker transport: 20 users × 5 prompts over 2 serverless deployments
// of 2 replicas each behind non-sticky balancers. Every job completes,
// every output reaches its owner and nobody else, and users take turns.
func TestPinnedJobsBehindNonStickyBalancers(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	d1 := workerDeployment(t, 2, "tok")
	d2 := workerDeployment(t, 2, "tok")
	cf := `{
	admin off
	comfyume {
		pool gpu {
			upstream ` + d1.URL() + ` {
				transport worker
				header Authorization "Bearer tok"
				max_jobs 1
			}
			upstream ` + d2.URL() + ` {
				transport worker
				header Authorization "Bearer tok"
				max_jobs 1
			}
		}
		outputs disk {DATA}
	}
}

:{PORT} {
	bind 127.0.0.1
	comfyume {
		home ` + home.URL() + `
		run_on gpu
		user {http.request.header.X-User}
	}
	reverse_proxy ` + strings.TrimPrefix(home.URL(), "http://") + `
}
`
	g := startCaddy(t, cf)
	const users, perUser = 20, 5
	type started struct {
		user string
		at   time.Time
	}
	var (
		mu     sync.Mutex
		starts []started
		jobs   = map[string][]string{}
		refs   = map[string][]map[string]any{}
	)
	browsers := make([]*browser, users)
	for u := 0; u < users; u++ {
		browsers[u] = g.openBrowser(fmt.Sprintf("user%02d", u), "", true)
	}
	// Each user queues a burst, one user after another (the worst case for
	// a first-come queue: the last user would wait for 95 jobs).
	for u := 0; u < users; u++ {
		name := fmt.Sprintf("user%02d", u)
		for i := 0; i < perUser; i++ {
			a := g.queue(name, browsers[u].SID, samplerWorkflow(fmt.Sprintf("%s_%d", name, i), 2))
			jobs[name] = append(jobs[name], a.PromptID)
		}
	}
	var wg sync.WaitGroup
	for u := 0; u < users; u++ {
		wg.Add(1)
		go func(u int) {
			defer wg.Done()
			name := fmt.Sprintf("user%02d", u)
			mine := map[string]bool{}
			for _, id := range jobs[name] {
				mine[id] = true
			}
			done := 0
			deadline := time.Now().Add(90 * time.Second)
			for done < perUser {
				var f wsFrame
				select {
				case f = <-browsers[u].frames:
				case <-time.After(time.Until(deadline)):
					t.Errorf("%s: %d of %d jobs done", name, done, perUser)
					return
				}
				if pid := f.str("prompt_id"); pid != "" && !mine[pid] {
					t.Errorf("%s received a frame of another user's job: %s", name, f.data)
					return
				}
				switch {
				case f.Type == "execution_start":
					mu.Lock()
					starts = append(starts, started{name, time.Now()})
					mu.Unlock()
				case f.Type == "executed":
					out, _ := f.Data["output"].(map[string]any)
					imgs, _ := out["images"].([]any)
					for _, it := range imgs {
						mu.Lock()
						refs[name] = append(refs[name], it.(map[string]any))
						mu.Unlock()
					}
				case f.Type == "execution_error":
					t.Errorf("%s: %s", name, f.data)
				case f.Type == "executing" && f.Data["node"] == nil && mine[f.str("prompt_id")]:
					done++
				}
			}
		}(u)
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	// Outputs: each user's own load; another user's request gets 404.
	for u := 0; u < users; u++ {
		name := fmt.Sprintf("user%02d", u)
		if len(refs[name]) != perUser {
			t.Fatalf("%s got %d outputs", name, len(refs[name]))
		}
		for _, ref := range refs[name] {
			if st, body, _ := g.do(name, "GET", "/api/view?"+viewQuery(ref), nil); st != 200 || len(body) < 8 || string(body[1:4]) != "PNG" {
				t.Fatalf("%s's output: %d", name, st)
			}
			other := fmt.Sprintf("user%02d", (u+1)%users)
			if st, _, _ := g.do(other, "GET", "/api/view?"+viewQuery(ref), nil); st != 404 {
				t.Fatalf("%s read %s's output: %d", other, name, st)
			}
		}
	}
	// Fairness: every user's first job starts among the first ones, by the
	// start times the GPU servers reported (execution_start_time).
	type start struct {
		user string
		at   float64
	}
	var all []start
	for u := 0; u < users; u++ {
		name := fmt.Sprintf("user%02d", u)
		var page jobsPage
		g.getJSON(name, "/api/jobs", &page)
		for _, j := range page.Jobs {
			at, _ := j["execution_start_time"].(float64)
			all = append(all, start{name, at})
		}
	}
	sort.SliceStable(all, func(a, b int) bool { return all[a].at < all[b].at })
	first := map[string]int{}
	for i, s := range all {
		if _, ok := first[s.user]; !ok {
			first[s.user] = i + 1
		}
	}
	worst := 0
	for _, rank := range first {
		worst = max(worst, rank)
	}
	t.Logf("last user to start did so as job %d of %d (browsers saw %d starts)", worst, len(all), len(starts))
	// Both deployments and several replicas did the work.
	used := 0
	for _, d := range []*comfytest.Balancer{d1, d2} {
		for i := 0; i < 2; i++ {
			if len(d.Replica(i).Prompts()) > 0 {
				used++
			}
		}
	}
	if used < 2 {
		t.Fatalf("only %d replicas ran jobs", used)
	}
}
