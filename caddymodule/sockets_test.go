package caddymodule_test

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/relay"
)

// gpuLog records when a fake GPU logged each line (job start and end).
type gpuLog struct {
	mu    sync.Mutex
	lines map[string]time.Time
}

func newGPULog() *gpuLog { return &gpuLog{lines: map[string]time.Time{}} }

func (l *gpuLog) logf(format string, args ...any) {
	// Only the two lines the tests look at; the fake puts its name first.
	format = strings.TrimPrefix(format, "[%s] ")
	if len(args) < 2 {
		return
	}
	id, _ := args[1].(string)
	l.mu.Lock()
	defer l.mu.Unlock()
	switch format {
	case "executing prompt %s":
		l.lines["start "+id] = time.Now()
	case "prompt %s finished: %s":
		l.lines["end "+id] = time.Now()
	}
}

// at waits (up to d) for a logged event and returns its time.
func (l *gpuLog) at(t *testing.T, what string, d time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		l.mu.Lock()
		at, ok := l.lines[what]
		l.mu.Unlock()
		if ok {
			return at
		}
		if time.Now().After(deadline) {
			t.Fatalf("the GPU never logged %q", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// openStuck opens n browser sockets of user on clientID that do not read:
// with receive buffers of 256 KiB, the gateway's writes to them block once
// a few MiB are in flight.
func openStuck(t *testing.T, g *gateway, user, clientID string, n int) []*websocket.Conn {
	t.Helper()
	d := g.dialer()
	d.HandshakeTimeout = 5 * time.Second
	d.NetDialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
		if tc, ok := c.(*net.TCPConn); ok {
			_ = tc.SetReadBuffer(256 << 10)
		}
		return c, err
	}
	u := g.wsURL("/ws?clientId=" + clientID)
	var out []*websocket.Conn
	for i := 0; i < n; i++ {
		c, _, err := d.Dial(u, http.Header{"X-User": {user}})
		if err != nil {
			t.Fatalf("stuck socket %d: %v", i, err)
		}
		t.Cleanup(func() { c.Close() })
		out = append(out, c)
	}
	return out
}

// stallCheck runs the scenario of both stall tests: mallory has 20 sockets
// on one tab that never read while her job sends 12 previews of 1 MiB;
// bob's one-step job waits for the GPU slot behind hers. Bob's job must
// start within 1 s of hers ending on the GPU, and bob's browser must see
// its end within 1 s of the GPU sending it.
func stallCheck(t *testing.T, sockets, submit *gateway, gl *gpuLog) {
	openStuck(t, sockets, "mallory", "stuck", 20)
	bob := sockets.openBrowser("bob", "", true)
	noisy := submit.queue("mallory", "stuck", samplerWorkflow("noisy", 12))
	quiet := submit.queue("bob", bob.SID, samplerWorkflow("quiet", 1))

	frames := bob.untilJobEnd(quiet.PromptID, 20*time.Second)
	seen := time.Now()
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("bob's job did not succeed: %v", types(frames))
	}
	noisyEnd := gl.at(t, "end "+noisy.PromptID, time.Second)
	quietStart := gl.at(t, "start "+quiet.PromptID, time.Second)
	quietEnd := gl.at(t, "end "+quiet.PromptID, time.Second)
	if wait := quietStart.Sub(noisyEnd); wait > time.Second {
		t.Fatalf("the GPU slot stayed taken %v after mallory's job ended on the GPU", wait)
	}
	if late := seen.Sub(quietEnd); late > time.Second {
		t.Fatalf("bob saw his job end %v after the GPU", late)
	}
}

// stallServers starts the home server and the GPU (1 MiB previews, a step
// every 20 ms) of the stall tests.
func stallServers(t *testing.T) (home, gpu *comfytest.Server, gl *gpuLog) {
	home = comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gl = newGPULog()
	gpu = comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", PreviewBytes: 1 << 20, StepDelay: 20 * time.Millisecond, Logf: gl.logf})
	return home, gpu, gl
}

// Twenty sockets of one user that never read hold up nobody: not that
// user's own job (its GPU slot frees at once), not another user's events.
func TestStuckSocketsStallNobody(t *testing.T) {
	home, gpu, gl := stallServers(t)
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	stallCheck(t, g, g, gl)
}

// The same with the site served over HTTPS: the gateway writes to the
// browsers through TLS, which it cannot do without blocking, so whatever
// must not wait (the GPU's event reader, a job) hands those writes on.
func TestStuckTLSSocketsStallNobody(t *testing.T) {
	home, gpu, gl := stallServers(t)
	g := startCaddyTLS(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	stallCheck(t, g, g, gl)
}

// The same over HTTPS with a bus (Valkey): the gateway publishes each event
// on it and hands it to its own sockets itself.
func TestStuckTLSSocketsStallNobodyWithBus(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home, gpu, gl := stallServers(t)
	g := startCaddyTLS(t, sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), ""))
	stallCheck(t, g, g, gl)
}

// The same across two replicas sharing Valkey: the stuck sockets and bob's
// browser are on one replica, the jobs run on the other, so every frame
// crosses the bus into the first replica's subscription.
func TestStuckSocketsStallNobodyAcrossReplicas(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home, gpu, gl := stallServers(t)
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	a := startCaddy(t, cf)
	b := startReplica(t, cf)
	stallCheck(t, a, &b.gateway, gl)
}

// Two tabs of one job: the one that reads gets every progress event and
// every preview, in order, unaffected by the other, which reads nothing
// until the job is over and then finds every lifecycle event, the last
// progress and the latest preview, its socket still open.
func TestSlowTabGetsLatestFastTabGetsAll(t *testing.T) {
	const steps = 12
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gl := newGPULog()
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", PreviewBytes: 1 << 20, StepDelay: 50 * time.Millisecond, Logf: gl.logf})
	g := startCaddy(t, strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk", "max_socket_queue 3MiB\n\t\toutputs disk", 1))

	fast := g.openBrowser("alice", "tab", true)
	slow := openStuck(t, g, "alice", "tab", 1)[0]
	_ = slow.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true}}`))
	a := g.queue("alice", "tab", samplerWorkflow("two", steps))

	frames := fast.untilJobEnd(a.PromptID, 30*time.Second)
	seen := time.Now()
	if late := seen.Sub(gl.at(t, "end "+a.PromptID, time.Second)); late > time.Second {
		t.Fatalf("the reading tab saw the job end %v after the GPU", late)
	}
	progress, previews := 0, 0
	for _, f := range frames {
		if f.Type == "progress" && f.str("node") == "2" {
			progress++
			if v, _ := f.Data["value"].(float64); int(v) != progress {
				t.Fatalf("progress %v arrived as the %d-th", f.Data["value"], progress)
			}
		}
		if !f.text && f.binary == 4 {
			previews++
		}
	}
	if progress != steps || previews != steps {
		t.Fatalf("reading tab got %d progress and %d previews, want %d each", progress, previews, steps)
	}
	want := lifecycle(frames)

	// Now the slow tab reads what was kept for it.
	_ = slow.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got []wsFrame
	var lastPreview []byte
	lastProgress := 0.0
	for {
		typ, data, err := slow.ReadMessage()
		if err != nil {
			t.Fatalf("slow tab: %v after %v", err, types(got))
		}
		f := parseFrame(typ, data)
		got = append(got, f)
		if !f.text && f.binary == 4 {
			lastPreview = data
		}
		if f.Type == "progress" && f.str("node") == "2" {
			lastProgress, _ = f.Data["value"].(float64)
		}
		if f.Type == "executing" && f.Data["node"] == nil && f.str("prompt_id") == a.PromptID {
			break
		}
	}
	if have := lifecycle(got); strings.Join(have, " ") != strings.Join(want, " ") {
		t.Fatalf("slow tab's lifecycle events\n%v\nwant\n%v", have, want)
	}
	var fastLast []byte
	for _, f := range frames {
		if !f.text && f.binary == 4 {
			fastLast = f.data
		}
	}
	if lastPreview == nil || string(lastPreview) != string(fastLast) {
		t.Fatalf("slow tab's last preview (%d bytes) is not the job's last", len(lastPreview))
	}
	if int(lastProgress) != steps {
		t.Fatalf("slow tab's last progress is %v, want %d", lastProgress, steps)
	}
	t.Logf("slow tab got %d frames, the reading tab %d", len(got), len(frames))
}

// lifecycle lists the job events a browser must never miss.
func lifecycle(frames []wsFrame) []string {
	var out []string
	for _, f := range frames {
		switch f.Type {
		case "execution_start", "execution_cached", "executing", "executed", "execution_success", "execution_error":
			out = append(out, f.Type+":"+f.str("node"))
		}
	}
	return out
}

func parseFrame(typ int, data []byte) wsFrame {
	f := wsFrame{text: typ == websocket.TextMessage, data: data}
	if f.text {
		var m struct {
			Type string         `json:"type"`
			Data map[string]any `json:"data"`
		}
		_ = json.Unmarshal(data, &m)
		f.Type, f.Data = m.Type, m.Data
	} else if len(data) >= 4 {
		f.binary = uint32(data[0])<<24 | uint32(data[1])<<16 | uint32(data[2])<<8 | uint32(data[3])
	}
	return f
}

// One user may open max_sockets_per_user sockets; the next is refused with
// a close reason; another user is unaffected, and a closed socket frees its
// place.
func TestSocketCapPerUser(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk", "max_sockets_per_user 3\n\t\toutputs disk", 1))
	var tabs []*browser
	for i := 0; i < 3; i++ {
		tabs = append(tabs, g.openBrowser("alice", "", false))
	}
	u := "ws" + strings.TrimPrefix(g.Base, "http") + "/ws"
	c, _, err := websocket.DefaultDialer.Dial(u, http.Header{"X-User": {"alice"}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
	_, _, err = c.ReadMessage()
	ce, ok := err.(*websocket.CloseError)
	if !ok || ce.Code != websocket.ClosePolicyViolation || ce.Text != "too many open sockets for this user (limit 3)" {
		t.Fatalf("4th socket: %v, want close 1008 with the limit", err)
	}
	g.openBrowser("bob", "", false) // bob has his own count

	tabs[0].conn.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		c, _, err := websocket.DefaultDialer.Dial(u, http.Header{"X-User": {"alice"}})
		if err != nil {
			t.Fatal(err)
		}
		_ = c.SetReadDeadline(time.Now().Add(5 * time.Second))
		_, _, err = c.ReadMessage()
		c.Close()
		if err == nil {
			break // the closed tab's place is free again
		}
		if time.Now().After(deadline) {
			t.Fatalf("closing a tab did not free its place: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Two tabs on one clientId: home (like ComfyUI) keeps one socket per
// clientId and drops the other each time one dials. The gateway backs off
// instead of re-dialing in a loop.
func TestHomeRedialBacksOff(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	g.openBrowser("alice", "twin", false)
	g.openBrowser("alice", "twin", false)
	time.Sleep(3 * time.Second)
	dials := 0
	for _, r := range home.Requests() {
		if r.Path == "/ws" {
			dials++
		}
	}
	// Backing off from 0.5 s, each tab dials about 3 times in 3 s.
	if dials > 12 {
		t.Fatalf("home was dialed %d times in 3 s by two tabs", dials)
	}
	t.Logf("%d dials", dials)
}

// homePost sends a request body straight to a fake home (as the frontend
// would with home as its only server) and decodes the answer into out. A
// prompt meant for a user's socket on a shared home names the user's sid
// there (relay.SharedSID), as the gateway's own would.
func homePost(t *testing.T, home *comfytest.Server, path string, body, out any) {
	t.Helper()
	b, _ := json.Marshal(body)
	resp, err := http.Post(home.URL()+path, "application/json", bytes.NewReader(b))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 {
		t.Fatalf("POST home %s: %d %s", path, resp.StatusCode, rb)
	}
	if out != nil {
		if err := json.Unmarshal(rb, out); err != nil {
			t.Fatalf("POST home %s answered %s", path, rb)
		}
	}
}

// A shared home writes to its sockets one after the other, as ComfyUI
// does (its publish loop awaits each send, and a send waits while the
// socket's buffer is full): a socket that is not read would hold up every
// user of that home. Mallory's tab never reads while a job of hers at home
// sends large previews; the gateway keeps reading her home socket (and
// drops, then closes, what her tab cannot take), so bob, another user of
// that home, still gets home's news at once: his queued job's status
// arrives while mallory's job is still running. (Before, her home socket's
// reader waited up to 10 s for each write to her tab, and home stopped
// sending to anyone until her job was long over.)
func TestStuckSocketStallsNoOneOnASharedHome(t *testing.T) {
	var written atomic.Int64 // what home wrote to mallory's socket
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home", SerialSend: true,
		PreviewBytes: 256 << 10, StepDelay: 10 * time.Millisecond,
		OnSend: func(f comfytest.SentFrame) {
			if f.SID == relay.SharedSID("mallory", "stuck") {
				written.Add(int64(f.Bytes))
			}
		}})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	openStuck(t, g, "mallory", "stuck", 1)
	bob := g.openBrowser("bob", "", true)

	var noisy struct {
		PromptID string `json:"prompt_id"`
	}
	homePost(t, home, "/prompt", map[string]any{"prompt": samplerWorkflow("noisy", 400), "client_id": relay.SharedSID("mallory", "stuck")}, &noisy)
	// Until home wrote mallory 40 MB, or her socket took nothing more for a
	// second (home's writes to it wait).
	last, since := int64(0), time.Now()
	for deadline := time.Now().Add(30 * time.Second); ; {
		n := written.Load()
		if n >= 40<<20 || time.Since(since) > time.Second {
			break
		}
		if n != last {
			last, since = n, time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("home wrote %d bytes to mallory's socket", n)
		}
		time.Sleep(20 * time.Millisecond)
	}
	homePost(t, home, "/prompt", map[string]any{"prompt": samplerWorkflow("quiet", 1), "client_id": relay.SharedSID("bob", bob.SID)}, nil)
	for {
		f := bob.next(30 * time.Second)
		if f.Type != "status" {
			continue
		}
		st, _ := f.Data["status"].(map[string]any)
		info, _ := st["exec_info"].(map[string]any)
		if n, _ := info["queue_remaining"].(float64); n >= 2 {
			break
		}
	}
	resp, err := http.Get(home.URL() + "/history/" + noisy.PromptID)
	if err != nil {
		t.Fatal(err)
	}
	h, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if len(bytes.TrimSpace(h)) > 2 {
		t.Fatalf("bob heard of his queued job only after mallory's job ended (home wrote her %d MB)", written.Load()>>20)
	}
}
