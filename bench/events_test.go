package bench

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
)

// BenchmarkGPUEvents measures GPU-job events (issue 7) flowing from fake
// GPUs to browsers over two paths:
//
//   - path=caddy:   browser → Caddy reverse_proxy → fake GPU
//   - path=gateway: browser → comfyume (the README's Caddyfile: a pool of
//     the same fake GPUs with max_jobs 1000, store memory, outputs on
//     disk, a home) → fake GPU
//
// The fake GPUs (comfytest, Version "2026") and the browsers run in a
// helper process (this test binary with COMFYUME_BENCH_ROLE=events), so
// the CPU time measured in this process is the proxy's alone. There is
// one fake GPU per browser socket (a ComfyUI server runs one job at a
// time): with plain Caddy, socket i reaches GPU i through an X-GPU header
// matcher; the gateway's pool holds all of them and picks one per job.
// Each browser socket is its own user (X-User) and its own clientId.
//
// A browser opens /ws?clientId=…, sends the frontend's feature_flags, then
// runs jobs back to back: POST /api/prompt with its client_id, read until
// executing{node: null} of that prompt. A job is EmptyImage 8×8 (a new
// colour each time, so nothing is cached) → FakeSampler of 1000 steps →
// SaveImage. Every step sends progress_state and progress; every 100th
// step also a 64 KiB preview (type 4: the browser declared
// supports_preview_metadata) before its progress. So a job is 1000
// progress, 1000 progress_state, 10 previews and ~10 lifecycle frames.
//
// The fake reports (comfytest.Options.OnSend) when each frame was produced
// (queued for its socket) and written; the browser looks these up when the
// frame arrives (same machine, same clock). p50/p99 are from production to
// the browser's read: a proxy that does not keep up makes frames wait in
// the GPU's socket queue, and that counts. write-p50/p99 leave that wait
// out (GPU's write → browser's read).
//
// Modes:
//   - blast/sockets=S: the GPU sends steps with no delay (throughput;
//     latency there is mostly queueing in front of the slowest hop).
//   - paced/sockets=20: one step every 2 ms on each GPU, on a fixed clock
//     (the path's latency at a realistic, steady rate).
//
// b.N is jobs per socket. Reported: events/s (every WebSocket message the
// browsers got), preview-MB/s, progress latency p50/p99 (and from the
// GPU's write, write-p50/p99), preview p50,
// cpu-ns/event (CPU time of this process, i.e. the proxy, per event),
// allocs/event and B/event (the proxy's heap allocations per event),
// helper-cpu-ns/event (the fake GPUs and browsers, for reference),
// lost-progress/job and lost-previews/job (sent by the GPU minus received
// by the browser).
func BenchmarkGPUEvents(b *testing.B) {
	rig := startEventsRig(b)
	modes := []struct {
		name    string
		sockets int
		site    string
	}{
		{"blast/sockets=1", 1, "blast"},
		{"blast/sockets=20", eventsGPUs, "blast"},
		{"paced/sockets=20", eventsGPUs, "paced"},
	}
	for _, m := range modes {
		b.Run(m.name, func(b *testing.B) {
			for _, path := range []string{"caddy", "gateway"} {
				b.Run("path="+path, func(b *testing.B) {
					rig.runEvents(b, rig.base(path, m.site), m.sockets)
				})
			}
		})
	}
}

// BenchmarkPromptPost measures POST /api/prompt with a 1 MiB UI workflow
// in extra_data (what the ComfyUI frontend sends for a large graph) through
// plain Caddy reverse_proxy and through the gateway, to the same idle fake
// GPU (in the helper process, like the browser). After each answer the
// browser waits for the job's end (untimed for the latency) before the next
// POST. Reported: p50-ms, p99-ms of the POST, and cpu-ms/op: CPU time of
// this process (the proxy) per POST, including the relay of its short
// job's events.
func BenchmarkPromptPost(b *testing.B) {
	rig := startEventsRig(b)
	for _, path := range []string{"caddy", "gateway"} {
		b.Run("path="+path, func(b *testing.B) {
			rig.runPrompts(b, rig.base(path, "blast"))
		})
	}
}

// eventsSteps is the sampler steps of a job: 1000, or BENCH_STEPS (to
// tell what a job costs from what an event costs: the same run with two
// job lengths; see BENCHMARKS.md).
var eventsSteps = func() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_STEPS")); err == nil && n > 0 {
		return n
	}
	return 1000
}()

const (
	eventsGPUs         = 20
	eventsPreviewEvery = 100
	eventsPreviewBytes = 64 << 10
	eventsPace         = 2 * time.Millisecond
)

type eventsRig struct {
	helper *child
	ports  map[string]int
}

func startEventsRig(b *testing.B) *eventsRig {
	raiseFileLimit()
	helper := startChild(b, "events")
	v, err := helper.call("setup " + strconv.Itoa(eventsGPUs))
	if err != nil {
		b.Fatal(err)
	}
	var gpus struct {
		Home  string
		Blast []string
		Paced []string
	}
	if err := json.Unmarshal([]byte(v), &gpus); err != nil {
		b.Fatal(err)
	}
	host := func(u string) string { return strings.TrimPrefix(u, "http://") }
	var cf strings.Builder
	cf.WriteString(`{` + caddyGlobals + `
	comfyume {
`)
	for _, pool := range []struct {
		name string
		urls []string
	}{{"blast", gpus.Blast}, {"paced", gpus.Paced}} {
		fmt.Fprintf(&cf, "\t\tpool %s {\n", pool.name)
		for _, u := range pool.urls {
			fmt.Fprintf(&cf, "\t\t\tupstream %s {\n\t\t\t\tmax_jobs 1000\n\t\t\t}\n", u)
		}
		cf.WriteString("\t\t}\n")
	}
	cf.WriteString(`		store memory
		outputs disk {DATA}
	}
}
`)
	for _, site := range []struct {
		name string
		urls []string
	}{{"blast", gpus.Blast}, {"paced", gpus.Paced}} {
		fmt.Fprintf(&cf, "\n:{PORT:caddy-%s} {\n\tbind 127.0.0.1\n", site.name)
		for i, u := range site.urls {
			fmt.Fprintf(&cf, "\t@gpu%d header X-GPU %d\n\treverse_proxy @gpu%d %s\n", i, i, i, host(u))
		}
		cf.WriteString("}\n")
		fmt.Fprintf(&cf, `
:{PORT:gateway-%s} {
	bind 127.0.0.1
	comfyume {
		home %s
		run_on %s
		user {http.request.header.X-User}
		max_body_size 100MiB
	}
	reverse_proxy %s
}
`, site.name, gpus.Home, site.name, host(gpus.Home))
	}
	return &eventsRig{helper: helper, ports: startCaddy(b, cf.String())}
}

func (r *eventsRig) base(path, site string) string {
	return fmt.Sprintf("http://127.0.0.1:%d", r.ports[path+"-"+site])
}

// eventsSpec is what the benchmark asks of the helper.
type eventsSpec struct {
	Base    string
	Sockets int
	Jobs    int // per socket
}

// eventsResult is what the helper measured.
type eventsResult struct {
	Elapsed      time.Duration
	Jobs         int
	Frames       int64 // every message the browsers got while jobs ran
	PreviewBytes int64
	Progress     int64 // progress frames received of the jobs
	ProgressSent int64 // progress frames the GPUs wrote for the jobs
	Previews     int64
	PreviewsSent int64
	// Latency quantiles in ns (GPU write → browser read).
	P50, P99, PreviewP50 int64
	// The same from the GPU's write instead (time queued in the fake's
	// socket queue left out).
	WriteP50, WriteP99 int64
	// Progress frames whose send time was not found (should be 0).
	Untimed   int64
	HelperCPU time.Duration
}

// proxyCost is what the proxy (this process) spent on a timed command:
// CPU time, and heap allocations (count and bytes).
type proxyCost struct {
	cpu           time.Duration
	allocs, bytes uint64
}

// measure has the helper open the browsers of spec, times its command cmd
// (with the proxy's CPU and allocations), decodes the helper's result into
// res and closes the browsers again.
func (r *eventsRig) measure(b *testing.B, cmd string, spec eventsSpec, res any) (cost proxyCost) {
	b.StopTimer()
	js, _ := json.Marshal(spec)
	if _, err := r.helper.call("open " + string(js)); err != nil {
		b.Fatal(err)
	}
	defer func() {
		if _, err := r.helper.call("close"); err != nil {
			b.Fatal(err)
		}
	}()
	var ms0, ms1 runtime.MemStats
	runtime.ReadMemStats(&ms0)
	cpu0 := cpuTime()
	b.StartTimer()
	v, err := r.helper.call(cmd + " " + string(js))
	b.StopTimer()
	cost.cpu = cpuTime() - cpu0
	runtime.ReadMemStats(&ms1)
	cost.allocs, cost.bytes = ms1.Mallocs-ms0.Mallocs, ms1.TotalAlloc-ms0.TotalAlloc
	if err != nil {
		b.Fatal(err)
	}
	if err := json.Unmarshal([]byte(v), res); err != nil {
		b.Fatal(err)
	}
	return cost
}

func (r *eventsRig) runEvents(b *testing.B, base string, sockets int) {
	var res eventsResult
	cost := r.measure(b, "run", eventsSpec{Base: base, Sockets: sockets, Jobs: b.N}, &res)
	sec := res.Elapsed.Seconds()
	b.ReportMetric(float64(res.Frames)/sec, "events/s")
	b.ReportMetric(float64(res.PreviewBytes)/sec/1e6, "preview-MB/s")
	b.ReportMetric(float64(res.P50)/1e3, "p50-µs")
	b.ReportMetric(float64(res.P99)/1e3, "p99-µs")
	b.ReportMetric(float64(res.PreviewP50)/1e3, "preview-p50-µs")
	b.ReportMetric(float64(res.WriteP50)/1e3, "write-p50-µs")
	b.ReportMetric(float64(res.WriteP99)/1e3, "write-p99-µs")
	b.ReportMetric(float64(cost.cpu.Nanoseconds())/float64(res.Frames), "cpu-ns/event")
	b.ReportMetric(float64(cost.allocs)/float64(res.Frames), "allocs/event")
	b.ReportMetric(float64(cost.bytes)/float64(res.Frames), "B/event")
	b.ReportMetric(float64(res.HelperCPU.Nanoseconds())/float64(res.Frames), "helper-cpu-ns/event")
	b.ReportMetric(float64(res.ProgressSent-res.Progress)/float64(res.Jobs), "lost-progress/job")
	b.ReportMetric(float64(res.PreviewsSent-res.Previews)/float64(res.Jobs), "lost-previews/job")
	if res.Untimed > 0 {
		b.ReportMetric(float64(res.Untimed), "untimed-progress")
	}
}

// promptResult is what the helper measured for POSTs.
type promptResult struct {
	Lat []int64 // ns per POST
}

func (r *eventsRig) runPrompts(b *testing.B, base string) {
	var res promptResult
	cost := r.measure(b, "prompt", eventsSpec{Base: base, Sockets: 1, Jobs: b.N}, &res)
	slices.Sort(res.Lat)
	b.ReportMetric(quantileMs(res.Lat, 0.50), "p50-ms")
	b.ReportMetric(quantileMs(res.Lat, 0.99), "p99-ms")
	b.ReportMetric(float64(cost.cpu.Nanoseconds())/float64(b.N)/1e6, "cpu-ms/op")
}

// ---- the helper process: fake GPUs, a home, browsers ----

// sendTimes records, per prompt, when the fake GPUs wrote each progress
// frame and preview (by step) and how many they wrote.
type sendTimes struct {
	jobs sync.Map // prompt id → *jobSends
}

type jobSends struct {
	// Unix ns when the GPU produced (queued) each progress frame, by value,
	// and each preview, by step; and when it wrote each progress frame.
	progress     []atomic.Int64 // eventsSteps+1 of each
	previews     []atomic.Int64
	written      []atomic.Int64
	progressSent atomic.Int64
	previewsSent atomic.Int64
}

func (st *sendTimes) job(id string) *jobSends {
	if j, ok := st.jobs.Load(id); ok {
		return j.(*jobSends)
	}
	j, _ := st.jobs.LoadOrStore(id, &jobSends{
		progress: make([]atomic.Int64, eventsSteps+1),
		previews: make([]atomic.Int64, eventsSteps+1),
		written:  make([]atomic.Int64, eventsSteps+1),
	})
	return j.(*jobSends)
}

func (st *sendTimes) onSend(f comfytest.SentFrame) {
	if f.PromptID == "" || (f.Type != "progress" && f.Type != "preview") {
		return
	}
	j := st.job(f.PromptID)
	ok := f.Value >= 0 && f.Value <= eventsSteps
	if f.Type == "progress" {
		if ok {
			j.progress[f.Value].Store(f.Queued.UnixNano())
			j.written[f.Value].Store(f.Time.UnixNano())
		}
		j.progressSent.Add(1)
		return
	}
	if ok {
		j.previews[f.Value].Store(f.Queued.UnixNano())
	}
	j.previewsSent.Add(1)
}

type eventsHelper struct {
	sent     sendTimes
	servers  []*comfytest.Server
	browsers []*evBrowser
	gen      int
	color    atomic.Int64
	client   *http.Client
}

// runEventsHelper serves the fake GPUs and plays the browsers. Commands:
// "setup <n>", "open <spec>", "run <spec>", "prompt <spec>", "close".
func runEventsHelper(in io.Reader, out io.Writer) int {
	h := &eventsHelper{client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}}}
	if path := os.Getenv("BENCH_HELPER_CPUPROFILE"); path != "" {
		f, err := os.Create(path)
		if err == nil && pprof.StartCPUProfile(f) == nil {
			defer func() { pprof.StopCPUProfile(); f.Close() }()
		}
	}
	defer func() {
		for _, s := range h.servers {
			s.Close()
		}
	}()
	return serveCommands(in, out, func(args []string) (string, error) {
		var spec eventsSpec
		if len(args) > 1 && args[0] != "setup" {
			if err := json.Unmarshal([]byte(strings.Join(args[1:], " ")), &spec); err != nil {
				return "", err
			}
		}
		switch args[0] {
		case "setup":
			n, err := strconv.Atoi(args[1])
			if err != nil {
				return "", err
			}
			return h.setup(n)
		case "open":
			return "", h.open(spec)
		case "run":
			return h.run(spec)
		case "prompt":
			return h.prompts(spec)
		case "close":
			for _, br := range h.browsers {
				br.conn.Close()
			}
			h.browsers = nil
			h.client.CloseIdleConnections()
			return "", nil
		}
		return "", fmt.Errorf("unknown command %q", args[0])
	})
}

func (h *eventsHelper) listen(opts comfytest.Options) (string, error) {
	s := comfytest.New(opts)
	if err := s.Listen("127.0.0.1:0"); err != nil {
		return "", err
	}
	h.servers = append(h.servers, s)
	return s.URL(), nil
}

func (h *eventsHelper) setup(n int) (string, error) {
	var out struct {
		Home  string
		Blast []string
		Paced []string
	}
	var err error
	if out.Home, err = h.listen(comfytest.Options{Version: "2026", Name: "home"}); err != nil {
		return "", err
	}
	for i := 0; i < n; i++ {
		common := comfytest.Options{Version: "2026", Steps: eventsSteps, PreviewEvery: eventsPreviewEvery,
			PreviewBytes: eventsPreviewBytes, OnSend: h.sent.onSend}
		blast, paced := common, common
		blast.Name, blast.StepDelay = fmt.Sprintf("blast%d", i), -1
		paced.Name, paced.StepDelay, paced.FixedRate = fmt.Sprintf("paced%d", i), eventsPace, true
		u, err := h.listen(blast)
		if err != nil {
			return "", err
		}
		out.Blast = append(out.Blast, u)
		if u, err = h.listen(paced); err != nil {
			return "", err
		}
		out.Paced = append(out.Paced, u)
	}
	v, err := json.Marshal(out)
	return string(v), err
}

// open dials the browser sockets and runs one short warm-up job on each.
func (h *eventsHelper) open(spec eventsSpec) error {
	h.gen++
	for i := 0; i < spec.Sockets; i++ {
		br, err := h.dial(spec.Base, i, fmt.Sprintf("ev%d-%d", h.gen, i))
		if err != nil {
			return err
		}
		h.browsers = append(h.browsers, br)
	}
	return h.each(func(br *evBrowser) error {
		_, err := br.job(h, 10, nil)
		return err
	})
}

func (h *eventsHelper) each(f func(*evBrowser) error) error {
	errs := make([]error, len(h.browsers))
	var wg sync.WaitGroup
	for i, br := range h.browsers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(br)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (h *eventsHelper) run(spec eventsSpec) (string, error) {
	for _, br := range h.browsers {
		br.reset()
	}
	cpu0 := cpuTime()
	t0 := time.Now()
	err := h.each(func(br *evBrowser) error {
		for j := 0; j < spec.Jobs; j++ {
			if _, err := br.job(h, eventsSteps, nil); err != nil {
				return err
			}
		}
		return nil
	})
	res := eventsResult{Elapsed: time.Since(t0), HelperCPU: cpuTime() - cpu0}
	if err != nil {
		return "", err
	}
	var lat, plat, wlat []int64
	for _, br := range h.browsers {
		br.mu.Lock()
		s := br.stats
		br.mu.Unlock()
		res.Jobs += int(s.jobs)
		res.Frames += s.frames
		res.PreviewBytes += s.previewBytes
		res.Progress += s.progress
		res.ProgressSent += s.progressSent
		res.Previews += s.previews
		res.PreviewsSent += s.previewsSent
		res.Untimed += s.untimed
		lat = append(lat, s.lat...)
		plat = append(plat, s.previewLat...)
		wlat = append(wlat, s.writeLat...)
	}
	q := func(v []int64, p float64) int64 {
		if len(v) == 0 {
			return 0
		}
		slices.Sort(v)
		return v[int(p*float64(len(v)-1))]
	}
	res.P50, res.P99, res.PreviewP50 = q(lat, 0.50), q(lat, 0.99), q(plat, 0.50)
	res.WriteP50, res.WriteP99 = q(wlat, 0.50), q(wlat, 0.99)
	v, err := json.Marshal(res)
	return string(v), err
}

func (h *eventsHelper) prompts(spec eventsSpec) (string, error) {
	if len(h.browsers) != 1 {
		return "", errors.New("prompt needs one open socket")
	}
	br := h.browsers[0]
	body := promptBody(br.sid, comfytest.UIWorkflow(1<<20))
	var res promptResult
	for i := 0; i < spec.Jobs; i++ {
		// A new colour each time, like the events jobs, so the GPU runs it.
		b := bytes.Replace(body, []byte(`"color":9334509`), fmt.Appendf(nil, `"color":%d`, h.color.Add(1)), 1)
		d, err := br.job(h, 0, b)
		if err != nil {
			return "", err
		}
		res.Lat = append(res.Lat, d.Nanoseconds())
	}
	v, err := json.Marshal(res)
	return string(v), err
}

// evBrowser is one browser tab: a socket and a user.
type evBrowser struct {
	sid, user, gpu, base string
	conn                 *websocket.Conn
	ends                 chan string // prompt ids whose executing{node: null} arrived

	mu    sync.Mutex
	stats evStats
}

type evStats struct {
	jobs, untimed             int64
	frames, previewBytes      int64
	progress, progressSent    int64
	previews, previewsSent    int64
	lat, previewLat, writeLat []int64
}

func (br *evBrowser) reset() {
	br.mu.Lock()
	br.stats = evStats{}
	br.mu.Unlock()
}

func (h *eventsHelper) dial(base string, i int, sid string) (*evBrowser, error) {
	br := &evBrowser{sid: sid, user: fmt.Sprintf("user%d", i), gpu: strconv.Itoa(i), base: base, ends: make(chan string, 16)}
	hdr := http.Header{"X-User": {br.user}, "X-Gpu": {br.gpu}}
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(base, "http")+"/ws?clientId="+sid, hdr)
	if err != nil {
		return nil, err
	}
	// What the frontend sends first.
	if err := c.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true,"supports_manager_v4_ui":true}}`)); err != nil {
		c.Close()
		return nil, err
	}
	br.conn = c
	go br.read(&h.sent)
	return br, nil
}

var (
	keyType     = []byte(`"type"`)
	keyPromptID = []byte(`"prompt_id"`)
	keyValue    = []byte(`"value"`)
	keyNode     = []byte(`"node"`)
)

// after returns what follows `"key":` in m (spaces skipped), or nil.
func after(m, key []byte) []byte {
	i := bytes.Index(m, key)
	if i < 0 {
		return nil
	}
	m = bytes.TrimLeft(m[i+len(key):], " ")
	if len(m) == 0 || m[0] != ':' {
		return nil
	}
	return bytes.TrimLeft(m[1:], " ")
}

// str reads the JSON string at the start of m (no escapes expected).
func str(m []byte) []byte {
	if len(m) < 2 || m[0] != '"' {
		return nil
	}
	end := bytes.IndexByte(m[1:], '"')
	if end < 0 {
		return nil
	}
	return m[1 : 1+end]
}

// read counts and times every frame until the socket closes. Frames are
// attributed to the prompt named by the last text frame with a prompt_id
// (a preview has none in type 1, and this scanner does not open type 4's).
func (br *evBrowser) read(sent *sendTimes) {
	var (
		cur   string
		js    *jobSends
		step  int
		frame bytes.Buffer
	)
	for {
		typ, r, err := br.conn.NextReader()
		if err != nil {
			close(br.ends)
			return
		}
		frame.Reset()
		if _, err := frame.ReadFrom(r); err != nil {
			close(br.ends)
			return
		}
		now := time.Now().UnixNano()
		m := frame.Bytes()
		br.mu.Lock()
		br.stats.frames++
		if typ == websocket.BinaryMessage {
			br.stats.previews++
			br.stats.previewBytes += int64(len(m))
			if js != nil && step+1 <= eventsSteps {
				if t := js.previews[step+1].Load(); t > 0 {
					br.stats.previewLat = append(br.stats.previewLat, now-t)
				}
			}
			br.mu.Unlock()
			continue
		}
		if id := str(after(m, keyPromptID)); id != nil && string(id) != cur {
			cur = string(id)
			js = sent.job(cur)
			step = 0
		}
		t := str(after(m, keyType))
		switch string(t) {
		case "progress":
			br.stats.progress++
			v, _ := strconv.Atoi(string(number(after(m, keyValue))))
			step = v
			if js != nil && v >= 0 && v <= eventsSteps && js.progress[v].Load() > 0 {
				br.stats.lat = append(br.stats.lat, now-js.progress[v].Load())
				br.stats.writeLat = append(br.stats.writeLat, now-js.written[v].Load())
			} else {
				br.stats.untimed++
			}
		case "executing":
			if bytes.HasPrefix(after(m, keyNode), []byte("null")) && js != nil {
				br.stats.jobs++
				br.stats.progressSent += js.progressSent.Load()
				br.stats.previewsSent += js.previewsSent.Load()
				sent.jobs.Delete(cur)
				br.mu.Unlock()
				br.ends <- cur
				cur, js = "", nil
				continue
			}
		}
		br.mu.Unlock()
	}
}

// number cuts m at the end of the integer it starts with.
func number(m []byte) []byte {
	for i, c := range m {
		if (c < '0' || c > '9') && c != '-' {
			return m[:i]
		}
	}
	return m
}

// eventsPrompt is a job of steps sampler steps on an 8×8 image of a new
// colour, sent as the frontend sends it (without a workflow).
func (h *eventsHelper) eventsPrompt(clientID string, steps int) []byte {
	return fmt.Appendf(nil, `{"client_id":%q,"prompt":{`+
		`"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":%d}},`+
		`"2":{"class_type":"FakeSampler","inputs":{"image":["1",0],"steps":%d}},`+
		`"3":{"class_type":"SaveImage","inputs":{"images":["2",0],"filename_prefix":"ev"}}},`+
		`"extra_data":{}}`, clientID, h.color.Add(1)&0xffffff, steps)
}

// job posts a prompt (body, or an events job of steps steps when body is
// nil) and waits for its end. It returns how long the POST took.
func (br *evBrowser) job(h *eventsHelper, steps int, body []byte) (time.Duration, error) {
	if body == nil {
		body = h.eventsPrompt(br.sid, steps)
	}
	req, err := http.NewRequest("POST", br.base+"/api/prompt", bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("X-User", br.user)
	req.Header.Set("X-Gpu", br.gpu)
	t0 := time.Now()
	resp, err := h.client.Do(req)
	if err != nil {
		return 0, err
	}
	var buf bytes.Buffer
	_, _ = buf.ReadFrom(resp.Body)
	resp.Body.Close()
	d := time.Since(t0)
	var a struct {
		PromptID string `json:"prompt_id"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(buf.Bytes(), &a) != nil || a.PromptID == "" {
		return 0, fmt.Errorf("POST %s/api/prompt: %d %.300s", br.base, resp.StatusCode, buf.Bytes())
	}
	timeout := time.After(2 * time.Minute)
	for {
		select {
		case id, ok := <-br.ends:
			if !ok {
				return 0, fmt.Errorf("%s: socket closed before the end of %s", br.sid, a.PromptID)
			}
			if id == a.PromptID {
				return d, nil
			}
		case <-timeout:
			return 0, fmt.Errorf("%s: no end of %s in 2 minutes", br.sid, a.PromptID)
		}
	}
}
