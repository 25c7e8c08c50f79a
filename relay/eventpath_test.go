package relay_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/relay"
)

// blastGPU is a GPU server that answers POST /prompt and then sends the
// job's events as fast as its socket takes them: execution_start,
// executing, Progress progress events with a Previews type-4 preview of
// PreviewBytes spread among them, executed, execution_success and
// executing{node:null}. It knows nothing else of ComfyUI.
type blastGPU struct {
	Progress, Previews, PreviewBytes int
	// OwnIDs makes it ignore the gateway's prompt_id (servers before
	// 2025-07).
	OwnIDs bool

	srv   *httptest.Server
	mu    sync.Mutex
	conns map[string]*gpuConn
	jobs  int // prompts taken
}

type gpuConn struct {
	mu sync.Mutex
	c  *websocket.Conn
}

func startBlastGPU(t testing.TB, g *blastGPU) *blastGPU {
	g.conns = map[string]*gpuConn{}
	g.srv = httptest.NewServer(http.HandlerFunc(g.serve))
	t.Cleanup(g.srv.Close)
	return g
}

func (g *blastGPU) serve(w http.ResponseWriter, r *http.Request) {
	switch r.URL.Path {
	case "/ws":
		c, err := (&websocket.Upgrader{}).Upgrade(w, r, nil)
		if err != nil {
			return
		}
		sid := r.URL.Query().Get("clientId")
		gc := &gpuConn{c: c}
		g.mu.Lock()
		g.conns[sid] = gc
		g.mu.Unlock()
		gc.send(websocket.TextMessage, []byte(`{"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "`+sid+`"}}`))
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				return
			}
		}
	case "/prompt":
		var body struct {
			PromptID string `json:"prompt_id"`
			ClientID string `json:"client_id"`
		}
		if err := json.NewDecoder(r.Body).Decode(&body); err != nil {
			http.Error(w, err.Error(), 400)
			return
		}
		id := body.PromptID
		if id == "" || g.OwnIDs {
			id = uuid.NewString()
		}
		g.mu.Lock()
		gc := g.conns[body.ClientID]
		g.jobs++
		g.mu.Unlock()
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"prompt_id": %q, "number": 1, "node_errors": {}}`, id)
		if gc != nil {
			go g.run(gc, id)
		}
	default:
		http.NotFound(w, r)
	}
}

func (c *gpuConn) send(typ int, b []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	_ = c.c.WriteMessage(typ, b)
}

func (g *blastGPU) run(c *gpuConn, id string) {
	time.Sleep(5 * time.Millisecond) // the answer reaches the gateway first, as a queued job's would
	text := func(s string) { c.send(websocket.TextMessage, []byte(s)) }
	text(`{"type": "execution_start", "data": {"prompt_id": "` + id + `", "timestamp": 1}}`)
	text(`{"type": "executing", "data": {"node": "1", "display_node": "1", "prompt_id": "` + id + `"}}`)
	// Preview k (from 1) is PreviewBytes of the byte k, so that a browser
	// can tell one from another and a mixed-up one from both.
	preview := func(k int) []byte {
		md := `{"node_id": "1", "prompt_id": "` + id + `", "display_node_id": "1", "parent_node_id": null, "real_node_id": "1", "image_type": "image/jpeg"}`
		b := binary.BigEndian.AppendUint32(nil, 4)
		b = binary.BigEndian.AppendUint32(b, uint32(len(md)))
		b = append(b, md...)
		return append(b, bytes.Repeat([]byte{byte(k)}, g.PreviewBytes)...)
	}
	every := 0
	if g.Previews > 0 {
		every = g.Progress / g.Previews
	}
	for i := 1; i <= g.Progress; i++ {
		text(fmt.Sprintf(`{"type": "progress", "data": {"value": %d, "max": %d, "prompt_id": "%s", "node": "1"}}`, i, g.Progress, id))
		if every > 0 && i%every == 0 {
			c.send(websocket.BinaryMessage, preview(i/every))
		}
	}
	text(`{"type": "executed", "data": {"node": "1", "display_node": "1", "output": {"text": ["done"]}, "prompt_id": "` + id + `"}}`)
	text(`{"type": "execution_success", "data": {"prompt_id": "` + id + `", "timestamp": 2}}`)
	text(`{"type": "executing", "data": {"node": null, "prompt_id": "` + id + `"}}`)
}

// eventGateway is a relay.Gateway with one pool on gpu, served over HTTP
// as user alice.
func eventGateway(t testing.TB, gpu string, limits dispatch.EventLimits) string {
	return eventGatewaySendBuffer(t, gpu, limits, 0)
}

// eventGatewaySendBuffer is eventGateway whose connections to browsers
// have a socket send buffer of sndbuf bytes (0: the system's).
func eventGatewaySendBuffer(t testing.TB, gpu string, limits dispatch.EventLimits, sndbuf int) string {
	return eventGatewayPool(t, []string{gpu}, limits, sndbuf)
}

// eventGatewayPool is eventGatewaySendBuffer with a pool of several GPUs.
func eventGatewayPool(t testing.TB, gpus []string, limits dispatch.EventLimits, sndbuf int) string {
	blobs, err := relay.NewDiskBlobs(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	g, err := relay.New(relay.Config{Blobs: blobs, Events: limits})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	var ups []*dispatch.Upstream
	for _, gpu := range gpus {
		up, err := dispatch.NewUpstream(gpu, dispatch.UpstreamOptions{})
		if err != nil {
			t.Fatal(err)
		}
		ups = append(ups, up)
	}
	g.Manager().SetPool(&dispatch.Pool{Name: "gpu", Upstreams: ups})
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !g.ServeHTTP(w, r, relay.Site{User: "alice", RunOn: "gpu"}) {
			http.NotFound(w, r)
		}
	}))
	if sndbuf > 0 {
		srv.Config.ConnState = func(c net.Conn, s http.ConnState) {
			if tc, ok := c.(*net.TCPConn); ok && s == http.StateNew {
				_ = tc.SetWriteBuffer(sndbuf)
			}
		}
	}
	srv.Start()
	t.Cleanup(srv.Close)
	return srv.URL
}

// jobSeen is what a browser saw of one job.
type jobSeen struct {
	id       string   // the job's prompt_id
	types    []string // JSON event types, in order
	progress int
	previews int
	lastRaw  []byte // the last progress frame
	ids      map[string]bool
}

// runBrowserJob queues a prompt for the browser session sid and reads
// conn until the job's executing{node:null} (readJob).
func runBrowserJob(t testing.TB, base string, conn *websocket.Conn, sid string) jobSeen {
	return readJob(t, conn, postBlastJob(t, base, sid))
}

// readJob reads a browser socket until job id's executing{node:null}. It
// checks that every progress event and every preview is exactly what the
// blastGPU sent, in order (progress values and preview numbers count up
// by one) and under the job's prompt_id.
func readJob(t testing.TB, conn *websocket.Conn, id string) jobSeen {
	seen := &jobSeen{id: id, ids: map[string]bool{}}
	readJobs(t, conn, map[string]*jobSeen{id: seen})
	return *seen
}

// checkProgress checks a progress frame: the job's, and the next value.
func (seen *jobSeen) checkProgress(t testing.TB, b []byte) {
	t.Helper()
	var m struct {
		Type string `json:"type"`
		Data struct {
			Value    int    `json:"value"`
			PromptID string `json:"prompt_id"`
		} `json:"data"`
	}
	if err := json.Unmarshal(b, &m); err != nil || m.Type != "progress" || m.Data.PromptID != seen.id || m.Data.Value != seen.progress+1 {
		t.Fatalf("progress frame %q after value %d of job %s (%v)", b, seen.progress, seen.id, err)
	}
	seen.progress++
	seen.lastRaw = b
}

// checkPreview checks a type-4 preview: the job's, and the next preview,
// every byte of its image the preview's number.
func (seen *jobSeen) checkPreview(t testing.TB, b []byte) {
	t.Helper()
	if len(b) < 8 || binary.BigEndian.Uint32(b) != 4 || uint64(binary.BigEndian.Uint32(b[4:])) > uint64(len(b)-8) {
		t.Fatalf("preview frame of %d bytes starts %x", len(b), b[:min(len(b), 16)])
	}
	n := binary.BigEndian.Uint32(b[4:])
	var md struct {
		PromptID string `json:"prompt_id"`
	}
	img := b[8+n:]
	if err := json.Unmarshal(b[8:8+n], &md); err != nil || md.PromptID != seen.id {
		t.Fatalf("preview metadata %q of job %s (%v)", b[8:8+n], seen.id, err)
	}
	k := byte(seen.previews + 1)
	if len(img) == 0 || bytes.Count(img, []byte{k}) != len(img) {
		t.Fatalf("preview %d of job %s: %d bytes, %d of them %d (starts %x)", k, seen.id, len(img), bytes.Count(img, []byte{k}), k, img[:min(len(img), 16)])
	}
	seen.previews++
}

func openBrowser(t testing.TB, base string) (*websocket.Conn, string) {
	sid := "tab-" + uuid.NewString()[:8]
	return openTab(t, base, sid, websocket.DefaultDialer), sid
}

// openTab opens a browser socket of session sid with d.
func openTab(t testing.TB, base, sid string, d *websocket.Dialer) *websocket.Conn {
	conn, _, err := d.Dial("ws"+strings.TrimPrefix(base, "http")+"/ws?clientId="+sid, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	if err := conn.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true}}`)); err != nil {
		t.Fatal(err)
	}
	return conn
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkGatewayJobEvents runs jobs of 1000 progress events and 10
// previews of 64 KiB from a GPU through the gateway to one browser; one op
// is one job. cpu-µs/event is the whole process's CPU (fake GPU and
// browser included) per event.
func BenchmarkGatewayJobEvents(b *testing.B) {
	for _, own := range []bool{false, true} {
		b.Run(fmt.Sprintf("own-ids=%v", own), func(b *testing.B) {
			gpu := startBlastGPU(b, &blastGPU{Progress: 1000, Previews: 10, PreviewBytes: 64 << 10, OwnIDs: own})
			base := eventGateway(b, gpu.srv.URL, dispatch.EventLimits{})
			conn, sid := openBrowser(b, base)
			runBrowserJob(b, base, conn, sid) // warm up: the stream is dialed
			b.ResetTimer()
			cpu0 := cpuTime()
			events := 0
			for i := 0; i < b.N; i++ {
				seen := runBrowserJob(b, base, conn, sid)
				events += seen.progress + seen.previews + len(seen.types)
			}
			b.StopTimer()
			b.ReportMetric(float64((cpuTime()-cpu0).Microseconds())/float64(events), "cpu-µs/event")
			b.ReportMetric(float64(events)/float64(b.N), "events/job")
		})
	}
}

// A browser that keeps up gets every progress event and every preview of
// a GPU job, in order, under the job's prompt_id — also from a server that
// made its own ids.
func TestFastBrowserGetsEveryEvent(t *testing.T) {
	for _, own := range []bool{false, true} {
		t.Run(fmt.Sprintf("own-ids=%v", own), func(t *testing.T) {
			gpu := startBlastGPU(t, &blastGPU{Progress: 1000, Previews: 10, PreviewBytes: 64 << 10, OwnIDs: own})
			base := eventGateway(t, gpu.srv.URL, dispatch.EventLimits{})
			conn, sid := openBrowser(t, base)
			for job := 0; job < 3; job++ {
				seen := runBrowserJob(t, base, conn, sid)
				if seen.progress != 1000 || seen.previews != 10 {
					t.Fatalf("job %d: browser got %d of 1000 progress events and %d of 10 previews", job, seen.progress, seen.previews)
				}
				if want := []string{"execution_start", "executing", "executed", "execution_success", "executing"}; !slices.Equal(seen.types, want) {
					t.Fatalf("job %d: browser got %v, want %v", job, seen.types, want)
				}
				if len(seen.ids) != 1 || !bytes.Contains(seen.lastRaw, []byte(`"value": 1000`)) {
					t.Fatalf("job %d: prompt_ids %v, last progress %s", job, seen.ids, seen.lastRaw)
				}
			}
		})
	}
}

// The GPU stream's reader lends its memory to the event path instead of
// copying each event: what every tab gets must still be exactly what the
// GPU sent. Here a second tab of the session reads nothing until the job
// is over for the first, through a small receive buffer, so its frames
// wait in its queue — written from where they lie while its connection
// takes them, then copied, then written by another goroutine — while the
// reader goes on reading over the memory they were lent from.
func TestLentFramesReachEveryTabIntact(t *testing.T) {
	const progress, previews = 2000, 20
	gpu := startBlastGPU(t, &blastGPU{Progress: progress, Previews: previews, PreviewBytes: 64 << 10})
	base := eventGatewaySendBuffer(t, gpu.srv.URL, dispatch.EventLimits{}, 32<<10)
	conn, sid := openBrowser(t, base)
	behind := openTab(t, base, sid, smallReadDialer(64<<10))
	for job := 0; job < 3; job++ {
		seen := runBrowserJob(t, base, conn, sid)
		late := readJob(t, behind, seen.id)
		for _, s := range []jobSeen{seen, late} {
			if s.progress != progress || s.previews != previews {
				t.Fatalf("job %d: a tab got %d of %d progress events and %d of %d previews", job, s.progress, progress, s.previews, previews)
			}
		}
	}
}

// smallReadDialer dials browser sockets with a receive buffer of n bytes:
// a browser that is often behind.
func smallReadDialer(n int) *websocket.Dialer {
	d := *websocket.DefaultDialer
	d.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetReadBuffer(n)
		}
		return c, err
	}
	return &d
}

// Two jobs of one browser tab run at once on two GPUs: two stream readers
// lend their memory to the same socket, each writing its own frames from
// where they lie while the other's may wait in the socket's queue or on a
// batch under way. Through a small receive buffer, so that writes are often
// half done, the tab still gets every event of both jobs exactly as each
// GPU sent it.
func TestTwoGPUsLendToOneTab(t *testing.T) {
	const progress, previews = 2000, 20
	var gpus []string
	var servers []*blastGPU
	for range 2 {
		gpu := startBlastGPU(t, &blastGPU{Progress: progress, Previews: previews, PreviewBytes: 16 << 10})
		gpus = append(gpus, gpu.srv.URL)
		servers = append(servers, gpu)
	}
	base := eventGatewayPool(t, gpus, dispatch.EventLimits{}, 32<<10)
	sid := "tab-" + uuid.NewString()[:8]
	conn := openTab(t, base, sid, smallReadDialer(32<<10))
	for round := 0; round < 3; round++ {
		jobs := map[string]*jobSeen{}
		for range 2 {
			id := postBlastJob(t, base, sid)
			jobs[id] = &jobSeen{id: id, ids: map[string]bool{}}
		}
		readJobs(t, conn, jobs)
		for i, gpu := range servers {
			gpu.mu.Lock()
			n := gpu.jobs
			gpu.mu.Unlock()
			if n != round+1 {
				t.Fatalf("round %d: GPU %d ran %d jobs, want one per round (the two jobs at once)", round, i, n)
			}
		}
		for id, seen := range jobs {
			if seen.progress != progress || seen.previews != previews {
				t.Fatalf("round %d, job %s: the tab got %d of %d progress events and %d of %d previews", round, id, seen.progress, progress, seen.previews, previews)
			}
		}
	}
}

// postBlastJob submits a blastGPU job for session sid and returns its id.
func postBlastJob(t testing.TB, base, sid string) string {
	body := `{"client_id": "` + sid + `", "prompt": {"1": {"class_type": "Blast", "inputs": {}}}}`
	resp, err := http.Post(base+"/prompt", "application/json", strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	var a struct {
		PromptID string `json:"prompt_id"`
	}
	err = json.NewDecoder(resp.Body).Decode(&a)
	resp.Body.Close()
	if err != nil || a.PromptID == "" {
		t.Fatalf("POST /prompt: %d %v", resp.StatusCode, err)
	}
	return a.PromptID
}

// readJobs reads a tab running several jobs at once until each has ended
// (its executing{node:null}), checking each job's progress and previews as
// readJob does, and recording the types and prompt_ids of its other
// frames. With one job, every frame is taken for that job's.
func readJobs(t testing.TB, conn *websocket.Conn, jobs map[string]*jobSeen) {
	ended := 0
	_ = conn.SetReadDeadline(time.Now().Add(60 * time.Second))
	for ended < len(jobs) {
		typ, b, err := conn.ReadMessage()
		if err != nil {
			t.Fatalf("reading the browser socket: %v", err)
		}
		var id string
		var m struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		}
		if typ == websocket.BinaryMessage {
			if len(b) < 8 || uint64(binary.BigEndian.Uint32(b[4:])) > uint64(len(b)-8) {
				t.Fatalf("preview frame of %d bytes starts %x", len(b), b[:min(len(b), 16)])
			}
			var md struct {
				PromptID string `json:"prompt_id"`
			}
			_ = json.Unmarshal(b[8:8+binary.BigEndian.Uint32(b[4:])], &md)
			id = md.PromptID
		} else {
			if err := json.Unmarshal(b, &m); err != nil {
				t.Fatalf("browser got %q: %v", b, err)
			}
			if m.Type == "status" || m.Type == "feature_flags" {
				continue
			}
			id, _ = m.Data["prompt_id"].(string)
		}
		seen := jobs[id]
		if seen == nil && len(jobs) == 1 {
			for _, only := range jobs {
				seen = only
			}
		}
		if seen == nil {
			t.Fatalf("a frame of no job being read (%q): %.80q", id, b)
		}
		switch {
		case typ == websocket.BinaryMessage:
			seen.checkPreview(t, b)
		case m.Type == "progress":
			seen.checkProgress(t, b)
		default:
			if id != "" {
				seen.ids[id] = true
			}
			seen.types = append(seen.types, m.Type)
			if m.Type == "executing" && m.Data["node"] == nil && id == seen.id {
				ended++
			}
		}
	}
}
