package bench

import (
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// BenchmarkPromptOverhead measures POST /api/prompt as the ComfyUI
// frontend sends it: a small API-format prompt (EmptyImage → FakeSampler →
// SaveImage) plus the UI graph, about 1 MiB of JSON, in
// extra_data.extra_pnginfo.workflow. Three servers take turns on every
// iteration (which one goes first rotates), so that load changes on a
// shared machine hit them alike:
//
//   - direct: the fake GPU itself, no gateway (the floor)
//   - memory: comfyume with `store memory` (jobs in the process)
//   - valkey: comfyume with `store valkey` (jobs in Valkey)
//
// The two comfyume servers are separate processes built from
// ./cmd/comfyume, identical but for the store: outputs on disk, one pool
// with the same fake GPU (comfytest, Version "2026", StepDelay 1ms) and
// `max_jobs 0`, so every prompt takes the direct path (sent to the GPU
// before the answer) and none waits in comfyume's queue. The GPU never
// has a backlog either: after each answer the timer stops until the job
// has ended and the server has sent the queue count that follows (so it
// is done with the job: outputs captured, record saved). Every POST
// therefore meets idle servers; ns/op counts only the POSTs.
//
// Sub-benchmarks:
//
//   - history=0: every POST is by a new user (X-User header; the browser
//     socket of that user is opened, untimed, before the POST).
//   - history=grows: one user per server and sub-benchmark call, so the
//     i-th POST is by a user with i earlier jobs. Reported in addition:
//     the least-squares slope of latency over i (ms per earlier job).
//
// Reported: p50/p99 per server, added-p50-ms = p50(valkey) − p50(memory),
// added-paired-p50-ms = the median of the per-iteration differences
// valkey − memory (less sensitive to load changes), and each comfyume
// process's CPU time per job (the POST and the job's lifecycle).
func BenchmarkPromptOverhead(b *testing.B) {
	env := needShared(b)
	bin := buildComfyume(b)
	home := comfytest.New(comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.New(comfytest.Options{Version: "2026", Name: "gpu", StepDelay: time.Millisecond})
	for _, s := range []*comfytest.Server{home, gpu} {
		if err := s.Listen("127.0.0.1:0"); err != nil {
			b.Fatal(err)
		}
		defer s.Close()
	}
	prefix := env.newPrefix(b)
	caddyfile := func(store string) string {
		return `{` + sharedGlobals + `
	comfyume {
		pool gpu {
			upstream ` + gpu.URL() + ` {
				max_jobs 0
			}
		}
		` + store + `
		outputs disk {DATA}/outputs
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
	}
	body := promptBody("bench-tab", comfytest.UIWorkflow(1<<20))
	b.Logf("POST /api/prompt body: %d bytes", len(body))
	type server struct {
		name string
		base string
		p    *proc // nil for direct
		lat  []int64
		cpu0 time.Duration
	}
	servers := []*server{
		{name: "direct", base: gpu.URL()},
		{name: "memory", p: startProc(b, bin, caddyfile("store memory"))},
		{name: "valkey", p: startProc(b, bin, caddyfile(env.storeValkey(prefix)))},
	}
	for _, s := range servers {
		if s.p != nil {
			s.base = s.p.base
		}
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()
	var users int
	newUser := func() string { users++; return fmt.Sprintf("u%d", users) }
	open := func(tb testing.TB, s *server, user string) *jobWatcher {
		w := watchJobs(tb, "ws"+strings.TrimPrefix(s.base, "http")+"/ws?clientId=bench-tab", user)
		select { // the greeting: the server has set the socket up
		case <-w.events:
		case <-time.After(10 * time.Second):
			tb.Fatalf("%s: no greeting on the socket", s.name)
		}
		return w
	}
	post := func(tb testing.TB, s *server, user string) (int64, string) {
		t0 := time.Now()
		id, err := postPrompt(client, s.base, user, body)
		d := time.Since(t0)
		if err != nil {
			tb.Fatalf("%s: %v", s.name, err)
		}
		return d.Nanoseconds(), id
	}
	wait := func(tb testing.TB, s *server, w *jobWatcher, id string) {
		if err := w.wait(id, time.Minute); err != nil {
			tb.Fatalf("%s: %v", s.name, err)
		}
	}
	// Warm up: connections, the GPU's object_info, Valkey's scripts.
	for _, s := range servers {
		user := newUser()
		w := open(b, s, user)
		for i := 0; i < 2; i++ {
			_, id := post(b, s, user)
			wait(b, s, w, id)
		}
		w.close()
	}
	start := func(b *testing.B) {
		for _, s := range servers {
			s.lat = make([]int64, 0, b.N)
			if s.p != nil {
				s.cpu0 = s.p.cpu()
			}
		}
		b.ResetTimer()
	}
	report := func(b *testing.B) {
		b.StopTimer()
		byName := map[string]*server{}
		for _, s := range servers {
			byName[s.name] = s
			sorted := slices.Clone(s.lat)
			slices.Sort(sorted)
			b.ReportMetric(quantileMs(sorted, 0.50), s.name+"-p50-ms")
			b.ReportMetric(quantileMs(sorted, 0.99), s.name+"-p99-ms")
			if s.p != nil {
				b.ReportMetric(float64(s.p.cpu()-s.cpu0)/float64(b.N)/1e6, s.name+"-cpu-ms/job")
			}
		}
		mem, vk := byName["memory"].lat, byName["valkey"].lat
		diffs := make([]int64, len(mem))
		for i := range mem {
			diffs[i] = vk[i] - mem[i]
		}
		slices.Sort(diffs)
		b.ReportMetric(quantileMs(diffs, 0.50), "added-paired-p50-ms")
		slices.Sort(mem)
		slices.Sort(vk)
		b.ReportMetric(quantileMs(vk, 0.50)-quantileMs(mem, 0.50), "added-p50-ms")
	}

	b.Run("history=0", func(b *testing.B) {
		start(b)
		for i := 0; i < b.N; i++ {
			for k := range servers {
				s := servers[(i+k)%len(servers)]
				b.StopTimer()
				user := newUser()
				w := open(b, s, user)
				b.StartTimer()
				d, id := post(b, s, user)
				b.StopTimer()
				s.lat = append(s.lat, d)
				wait(b, s, w, id)
				w.close()
				b.StartTimer()
			}
		}
		report(b)
	})

	b.Run("history=grows", func(b *testing.B) {
		b.StopTimer()
		watchers := map[*server]*jobWatcher{}
		user := map[*server]string{}
		for _, s := range servers {
			user[s] = newUser()
			watchers[s] = open(b, s, user[s])
		}
		start(b)
		for i := 0; i < b.N; i++ {
			for k := range servers {
				s := servers[(i+k)%len(servers)]
				d, id := post(b, s, user[s])
				b.StopTimer()
				s.lat = append(s.lat, d)
				wait(b, s, watchers[s], id)
				b.StartTimer()
			}
		}
		b.StopTimer()
		for _, s := range servers {
			b.ReportMetric(slopeMs(s.lat), s.name+"-ms/earlier-job")
			watchers[s].close()
		}
		report(b)
	})
}

// slopeMs is the least-squares slope of lat[i] (ns) over i, in ms.
func slopeMs(lat []int64) float64 {
	n := float64(len(lat))
	if n < 2 {
		return 0
	}
	var sx, sy, sxx, sxy float64
	for i, v := range lat {
		x, y := float64(i), float64(v)/1e6
		sx, sy, sxx, sxy = sx+x, sy+y, sxx+x*x, sxy+x*y
	}
	return (n*sxy - sx*sy) / (n*sxx - sx*sx)
}

// promptBody is a POST /api/prompt body like the ComfyUI frontend's:
// the API prompt, the socket's client_id, and the UI graph in
// extra_data.extra_pnginfo.workflow.
func promptBody(clientID string, workflow json.RawMessage) []byte {
	body, err := json.Marshal(map[string]any{
		"client_id": clientID,
		"prompt": map[string]any{
			"1": map[string]any{"class_type": "EmptyImage", "inputs": map[string]any{"width": 64, "height": 48, "batch_size": 1, "color": 0x8e6eed}},
			"2": map[string]any{"class_type": "FakeSampler", "inputs": map[string]any{"image": []any{"1", 0}, "steps": 2}},
			"3": map[string]any{"class_type": "SaveImage", "inputs": map[string]any{"images": []any{"2", 0}, "filename_prefix": "bench"}},
		},
		"extra_data": map[string]any{"extra_pnginfo": map[string]any{"workflow": workflow}},
	})
	if err != nil {
		panic(err)
	}
	return body
}
