package caddymodule_test

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/dispatch"
)

// An operator sees the pools through Caddy's admin API — GET
// /comfyume/pools — and Prometheus metrics at the admin /metrics: jobs
// running and waiting, endpoint health, jobs ended.
func TestAdminPoolsAndMetrics(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "admin off", "admin "+admin, 1)
	g := startCaddy(t, cf)
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + admin + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	pools := func() []dispatch.PoolStatus {
		t.Helper()
		st, body := get("/comfyume/pools")
		var ps []dispatch.PoolStatus
		if st != 200 || json.Unmarshal([]byte(body), &ps) != nil || len(ps) != 1 {
			t.Fatalf("GET /comfyume/pools: %d %s", st, body)
		}
		return ps
	}

	gpu.FailNext("hang") // the first job runs until interrupted
	b := g.openBrowser("alice", "", true)
	first := g.queue("alice", b.SID, samplerWorkflow("a", 1))
	b.waitType("execution_start", 10*time.Second)
	second := g.queue("alice", b.SID, samplerWorkflow("b", 1))

	p := pools()[0]
	e := p.Endpoints[0]
	if p.Name != "gpu" || p.Running != 1 || p.Waiting != 1 || !e.Up || e.Jobs != 1 || e.MaxJobs != 1 || e.Transport != "comfyui" || e.URL != gpu.URL() {
		t.Fatalf("pool while one job runs and one waits: %+v", p)
	}
	st, m := get("/metrics")
	for _, want := range []string{
		`comfyume_pool_waiting_jobs{pool="gpu"} 1`,
		`comfyume_pool_running_jobs{pool="gpu"} 1`,
		`comfyume_endpoint_up{endpoint="` + gpu.URL() + `",pool="gpu"} 1`,
		`comfyume_browser_sockets 1`,
	} {
		if st != 200 || !strings.Contains(m, want) {
			t.Fatalf("/metrics lacks %s:\n%s", want, grepLines(m, "comfyume_"))
		}
	}

	// Cancel the hanging job: both end; the counters say how.
	if st, _, _ := g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": first.PromptID}); st != 200 {
		t.Fatalf("interrupt: %d", st)
	}
	b.untilJobEnd(second.PromptID, 20*time.Second)
	if p := pools()[0]; p.Running != 0 || p.Waiting != 0 || p.Endpoints[0].Jobs != 0 {
		t.Fatalf("pool after both ended: %+v", p)
	}
	_, m = get("/metrics")
	if !strings.Contains(m, `comfyume_jobs_ended_total{status="completed"} 1`) || !strings.Contains(m, `comfyume_jobs_ended_total{status="cancelled"} 1`) {
		t.Fatalf("ended counters:\n%s", grepLines(m, "comfyume_jobs_ended"))
	}
	if st, _ := get("/comfyume/pools?x"); st != 200 {
		t.Fatalf("GET with a query: %d", st)
	}
	req, _ := http.NewRequest(http.MethodPost, "http://"+admin+"/comfyume/pools", nil)
	req.Header.Set("Origin", "http://"+admin)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST /comfyume/pools: %v %v", err, resp)
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// With the queue in Valkey, GET /comfyume/pools counts the jobs waiting
// in the shared queue.
func TestAdminPoolsWithSharedQueue(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cf := strings.Replace(sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), ""), "admin off", "admin "+admin, 1)
	g := startCaddy(t, cf)
	gpu.FailNext("hang")
	b := g.openBrowser("alice", "", true)
	first := g.queue("alice", b.SID, samplerWorkflow("a", 1))
	b.waitType("execution_start", 10*time.Second)
	g.queue("alice", b.SID, samplerWorkflow("b", 1))
	g.queue("bob", "", samplerWorkflow("c", 1))
	resp, err := http.Get("http://" + admin + "/comfyume/pools")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var ps []dispatch.PoolStatus
	if err := json.NewDecoder(resp.Body).Decode(&ps); err != nil || len(ps) != 1 {
		t.Fatalf("pools: %v %v", ps, err)
	}
	if p := ps[0]; p.Waiting != 2 || p.Running != 1 || p.Endpoints[0].Jobs != 1 {
		t.Fatalf("pool with one job running and two waiting in Valkey: %+v", p)
	}
	g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": first.PromptID})
}
