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
	g := startCaddy(t, workshopCaddyfile(home.URL(), d1.URL(), d2.URL(), "outputs disk {DATA}"))
	runWorkshop(t, []*gateway{g}, d1, d2)
}

// The same workshop through two gateway replicas sharing Valkey and S3,
// behind a non-sticky balancer of their own: each prompt goes to either
// replica, each browser is on one of them. The fair order holds across
// both (one shared queue) and every job still reaches its owner.
func TestPinnedWorkshopAcrossReplicas(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	d1 := workerDeployment(t, 2, "tok")
	d2 := workerDeployment(t, 2, "tok")
	prefix := testPrefix()
	cf := workshopCaddyfile(home.URL(), d1.URL(), d2.URL(), `store valkey {
			address `+valkeyAddr+`
			prefix `+prefix+`
			lease_ttl 2s
		}
		outputs s3 {
			endpoint http://`+s3[0]+`
			bucket `+s3[3]+`
			prefix `+prefix+`
			access_key `+s3[1]+`
			secret_key `+s3[2]+`
			region us-east-1
		}`)
	a := startCaddy(t, cf)
	b := startReplica(t, cf)
	runWorkshop(t, []*gateway{a, &b.gateway}, d1, d2)
}

// workshopCaddyfile: a pool of two pinned deployments, max_jobs 1 each.
func workshopCaddyfile(home, d1, d2, state string) string {
	return `{
	admin off
	comfyume {
		pool gpu {
			upstream ` + d1 + ` {
				transport worker
				header Authorization "Bearer tok"
				max_jobs 1
			}
			upstream ` + d2 + ` {
				transport worker
				header Authorization "Bearer tok"
				max_jobs 1
			}
		}
		` + state + `
	}
}

:{PORT} {
	bind 127.0.0.1
	comfyume {
		home ` + home + `
		run_on gpu
		user {http.request.header.X-User}
	}
	reverse_proxy ` + strings.TrimPrefix(home, "http://") + `
}
`
}

// runWorkshop: 20 users × 5 prompts, queued in bursts one user after the
// other, through the gateways in turn. Every job completes, every output
// reaches its owner only, and users take turns.
func runWorkshop(t *testing.T, gws []*gateway, d1, d2 *comfytest.Balancer) {
	g := gws[0]
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
		browsers[u] = gws[u%len(gws)].openBrowser(fmt.Sprintf("user%02d", u), "", true)
	}
	// Each user queues a burst, one user after another (the worst case for
	// a first-come queue: the last user would wait for 95 jobs).
	submitStart := time.Now()
	for u := 0; u < users; u++ {
		name := fmt.Sprintf("user%02d", u)
		for i := 0; i < perUser; i++ {
			a := gws[(u+i)%len(gws)].queue(name, browsers[u].SID, samplerWorkflow(fmt.Sprintf("%s_%d", name, i), 20))
			jobs[name] = append(jobs[name], a.PromptID)
		}
	}
	submitEnd := time.Now()
	t.Logf("queued %d prompts in %s", users*perUser, submitEnd.Sub(submitStart).Round(time.Millisecond))
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
			if st, body, _ := gws[(u+1)%len(gws)].do(name, "GET", "/api/view?"+viewQuery(ref), nil); st != 200 || len(body) < 8 || string(body[1:4]) != "PNG" {
				t.Fatalf("%s's output: %d", name, st)
			}
			other := fmt.Sprintf("user%02d", (u+1)%users)
			if st, _, _ := g.do(other, "GET", "/api/view?"+viewQuery(ref), nil); st != 404 {
				t.Fatalf("%s read %s's output: %d", other, name, st)
			}
		}
	}
	// Fairness, by the start times the GPU servers reported
	// (execution_start_time).
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
	// Each user's mean place in the start order, against everyone's: with
	// first-come-first-served the last user's jobs would be places 96–100
	// (mean 98 vs 50.5, ratio 1.94); taking turns keeps it near 1.2 when
	// the prompts are queued faster than the GPUs run them.
	sum, perUserSum := 0.0, map[string]float64{}
	for i, s := range all {
		sum += float64(i + 1)
		perUserSum[s.user] += float64(i + 1)
	}
	mean, maxMean := sum/float64(len(all)), 0.0
	for _, v := range perUserSum {
		maxMean = max(maxMean, v/perUser)
	}
	t.Logf("last user to start did so as job %d of %d; worst user's mean place %.1f vs %.1f overall (ratio %.2f); browsers saw %d starts",
		worst, len(all), maxMean, mean, maxMean/mean, len(starts))
	// The jobs that had not started when the last prompt was queued all
	// waited together: users take turns among them. Past the jobs being
	// sent at that moment (one per endpoint), nobody has a second start
	// before everyone with a job left had a first (give or take one pair
	// started on the two endpoints at about the same time).
	var later []start
	for _, s := range all {
		if s.at > float64(submitEnd.UnixMilli()) {
			later = append(later, s)
		}
	}
	left := map[string]bool{}
	for _, s := range later {
		left[s.user] = true
	}
	round := map[string]int{}
	seconds := 0
	window := later[min(len(later), 2):min(len(later), len(left)+2)]
	for _, s := range window {
		if round[s.user]++; round[s.user] == 2 {
			seconds++
		}
	}
	t.Logf("%d jobs of %d users were waiting together; %d users had a second start before everyone had a first", len(later), len(left), seconds)
	if len(later) < 30 {
		t.Fatalf("only %d jobs still waited when the last prompt was queued: the GPUs outran the test", len(later))
	}
	if seconds > 1 {
		t.Fatalf("users did not take turns: %v", window)
	}
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

// The GPU container running a pinned job dies mid-job: the browser gets an
// execution_error saying the stream ended, the job is listed as failed, and
// the endpoint's slot is free again — the user's next prompt runs (on the
// deployment's other replica).
func TestPinnedReplicaDeathMidJob(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	d := workerDeployment(t, 2, "")
	g := startCaddy(t, strings.Replace(poolCaddyfile(home.URL(), d.URL(), ""), "max_jobs 1", "max_jobs 1\n\t\t\t\ttransport worker", 1))
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("dies", 200))
	b.waitType("progress", 10*time.Second)
	victim := -1
	for i := 0; i < 2; i++ {
		if len(d.Replica(i).Prompts()) > 0 {
			victim = i
		}
	}
	if victim < 0 {
		t.Fatal("no replica runs the job")
	}
	d.Kill(victim)
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	i := indexOf(frames, "execution_error")
	if i < 0 || !strings.Contains(frames[i].str("exception_message"), "stream") {
		t.Fatalf("no clear error after the replica died: %v", types(frames))
	}
	var j map[string]any
	g.getJSON("alice", "/api/jobs/"+a.PromptID, &j)
	if j["status"] != "failed" {
		t.Fatalf("job status %v", j["status"])
	}
	next := g.queue("alice", b.SID, samplerWorkflow("after", 1))
	if frames := b.untilJobEnd(next.PromptID, 30*time.Second); indexOf(frames, "execution_success") < 0 {
		t.Fatalf("the next prompt: %v", types(frames))
	}
}
