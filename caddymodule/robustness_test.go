package caddymodule_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"image/color"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
)

// Requests toward upstreams pass ComfyUI's origin check, carry the
// configured token, drop fetch metadata, and keep %2F in user data paths;
// the token never reaches the browser.
func TestHeaderHygiene(t *testing.T) {
	t.Setenv("COMFYUME_TEST_TOKEN", "s3cret")
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	browserHdr := []string{"Origin", g.Base, "Sec-Fetch-Site", "same-origin", "Sec-Fetch-Mode", "cors"}

	// Through reverse_proxy to home: the gateway has checked the fetch
	// metadata (cross-site is refused, csrf_test.go) and strips it.
	st, body, _ := g.do("alice", "POST", "/api/userdata/workflows%2Fmy%20flow.json?overwrite=true", `{"nodes":[]}`, browserHdr[2:]...)
	if st != 200 {
		t.Fatalf("userdata save through gateway: %d %s", st, body)
	}
	found := false
	for _, r := range home.Requests() {
		if strings.Contains(r.Path, "/userdata/workflows%2Fmy") {
			found = true
		}
		if r.Header.Get("Sec-Fetch-Site") != "" {
			t.Fatalf("Sec-Fetch-Site reached home on %s", r.Path)
		}
	}
	if !found {
		t.Fatalf("encoded %%2F path did not reach home intact: %v", home.Requests())
	}

	b := g.openBrowser("alice", "", true)
	st, body, hdr := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("h", 1), "client_id": b.SID}, browserHdr...)
	if st != 200 {
		t.Fatalf("prompt with browser headers: %d %s", st, body)
	}
	var a promptAnswer
	_ = json.Unmarshal(body, &a)
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	for _, r := range gpu.Requests() {
		if r.Header.Get("Authorization") != "Bearer s3cret" {
			t.Fatalf("%s %s without token", r.Method, r.Path)
		}
		if o := r.Header.Get("Origin"); o != "" && o != gpu.URL() {
			t.Fatalf("Origin toward GPU %q", o)
		}
		if r.Header.Get("Sec-Fetch-Site") != "" {
			t.Fatalf("Sec-Fetch-Site reached the GPU")
		}
	}
	leak := func(where string, b []byte) {
		if bytes.Contains(b, []byte("s3cret")) || bytes.Contains(b, []byte(strings.TrimPrefix(gpu.URL(), "http://"))) {
			t.Fatalf("upstream secret or address in %s: %s", where, b)
		}
	}
	leak("prompt answer", body)
	for k, v := range hdr {
		leak("header "+k, []byte(strings.Join(v, " ")))
	}
	for _, f := range frames {
		leak("ws frame", f.data)
	}
	_, jb, _ := g.do("alice", "GET", "/api/jobs/"+a.PromptID, nil)
	leak("job detail", jb)
}

// scriptedGPU is a minimal ComfyUI that sends malformed frames among the
// real ones, to check the gateway skips them and the job still ends.
type scriptedGPU struct {
	*httptest.Server
	mu    sync.Mutex
	conns []*websocket.Conn
	png   []byte
	// view, if set, answers /view instead of the PNG (set it before the
	// first job).
	view http.HandlerFunc
}

func newScriptedGPU(t *testing.T) *scriptedGPU {
	s := &scriptedGPU{png: pngBytes(t, 8, 8, color.NRGBA{9, 99, 199, 255})}
	up := websocket.Upgrader{}
	mux := http.NewServeMux()
	mux.HandleFunc("/ws", func(w http.ResponseWriter, r *http.Request) {
		c, err := up.Upgrade(w, r, nil)
		if err != nil {
			return
		}
		_ = c.WriteMessage(websocket.TextMessage, []byte(`{"type":"status","data":{"status":{"exec_info":{"queue_remaining":0}},"sid":"x"}}`))
		s.mu.Lock()
		s.conns = append(s.conns, c)
		s.mu.Unlock()
		for {
			if _, _, err := c.ReadMessage(); err != nil {
				return
			}
		}
	})
	mux.HandleFunc("/prompt", func(w http.ResponseWriter, r *http.Request) {
		var body struct {
			PromptID string `json:"prompt_id"`
		}
		_ = json.NewDecoder(r.Body).Decode(&body)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"prompt_id":"` + body.PromptID + `","number":0,"node_errors":{}}`))
		go s.run(body.PromptID)
	})
	mux.HandleFunc("/view", func(w http.ResponseWriter, r *http.Request) {
		if s.view != nil {
			s.view(w, r)
			return
		}
		w.Header().Set("Content-Type", "image/png")
		_, _ = w.Write(s.png)
	})
	s.Server = httptest.NewServer(mux)
	t.Cleanup(s.Close)
	return s
}

func (s *scriptedGPU) run(pid string) {
	time.Sleep(20 * time.Millisecond)
	s.mu.Lock()
	c := s.conns[len(s.conns)-1]
	s.mu.Unlock()
	badMeta := make([]byte, 8)
	binary.BigEndian.PutUint32(badMeta, 4)
	binary.BigEndian.PutUint32(badMeta[4:], 1<<30) // metadata longer than the frame
	frames := []struct {
		typ  int
		data string
	}{
		{websocket.TextMessage, `{{{ not json`},
		{websocket.TextMessage, `{"data":{}}`},
		{websocket.TextMessage, `{"type":"execution_start","data":{"prompt_id":"` + pid + `","timestamp":1}}`},
		{websocket.TextMessage, `{"type":"executing","data":"oops"}`},
		{websocket.BinaryMessage, "\x00\x00"},
		{websocket.BinaryMessage, string(badMeta)},
		{websocket.BinaryMessage, "\x00\x00\x00\x09junk"},
		{websocket.TextMessage, `{"type":"executing","data":{"node":"1","display_node":"1","prompt_id":"` + pid + `"}}`},
		{websocket.TextMessage, `{"type":"executed","data":{"node":"1","display_node":"1","output":{"images":[{"filename":"s_00001_.png","subfolder":"","type":"output"}]},"prompt_id":"` + pid + `"}}`},
		{websocket.TextMessage, `{"type":"execution_success","data":{"prompt_id":"` + pid + `","timestamp":2}}`},
	}
	for _, f := range frames {
		_ = c.WriteMessage(f.typ, []byte(f.data))
	}
}

func TestMalformedUpstreamEventsAreSkipped(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := newScriptedGPU(t)
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL, ""))
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("s", 1))
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("job did not end cleanly: %v", types(frames))
	}
	ref := outputRef(t, frames, "1")
	st, got, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 || !bytes.Equal(got, gpu.png) {
		t.Fatalf("captured output: %d", st)
	}
}

// A GPU server that dies mid-job: the browser gets an execution_error it
// shows, the job is listed as failed, and the pool slot is free again.
func TestGPUDeathMidJobEndsWithError(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	gpu.FailNext("hang")
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "max_jobs 1", "max_jobs 1\n\t\t\t\tlost_timeout 300ms", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("d", 1))
	b.waitType("execution_start", 10*time.Second)
	gpu.Kill()
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	i := indexOf(frames, "execution_error")
	if i < 0 || !strings.Contains(frames[i].str("exception_message"), "GPU server") {
		t.Fatalf("no clear execution_error: %v", types(frames))
	}
	var j map[string]any
	g.getJSON("alice", "/api/jobs/"+a.PromptID, &j)
	if j["status"] != "failed" {
		t.Fatalf("job status %v", j["status"])
	}
	var ps struct {
		ExecInfo struct {
			QueueRemaining int `json:"queue_remaining"`
		} `json:"exec_info"`
	}
	g.getJSON("alice", "/prompt", &ps)
	if ps.ExecInfo.QueueRemaining != 0 {
		t.Fatalf("slot not released: queue_remaining %d", ps.ExecInfo.QueueRemaining)
	}
}

// The socket outlives Caddy's idle and read timeouts (the gateway pings and
// owns the hijacked connection) and carries multi-megabyte previews.
func TestSocketSurvivesSilenceAndBigFrames(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", PreviewBytes: 4 << 20})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "admin off", "admin off\n\tservers {\n\t\ttimeouts {\n\t\t\tread_body 300ms\n\t\t\tread_header 300ms\n\t\t\twrite 300ms\n\t\t\tidle 300ms\n\t\t}\n\t}", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	time.Sleep(1500 * time.Millisecond) // 5× every server timeout, no traffic
	a := g.queue("alice", b.SID, samplerWorkflow("big", 2))
	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	big := 0
	for _, f := range frames {
		if !f.text && len(f.data) > 4<<20 {
			big++
		}
	}
	if big == 0 || indexOf(frames, "execution_success") < 0 {
		t.Fatalf("big previews: %d, frames %v", big, types(frames))
	}
}

// The GPU server's event socket breaks mid-job while the server itself
// lives on (a proxy or the network cut it). A short break: the gateway
// reconnects and the job's events go on. A long one (past lost_timeout)
// while the job ends meanwhile: the gateway asks the server over plain
// HTTP, keeps waiting while the job is still in its queue, and finishes
// the job from its /history entry — outputs captured, nothing lost.
func TestEventStreamLossRecoversFromHistory(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 40 * time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "max_jobs 1", "max_jobs 1\n\t\t\t\tlost_timeout 300ms", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)

	for _, c := range []struct {
		name   string
		outage time.Duration
		steps  int // differs, so that the sampler is not cached
	}{{"short", 50 * time.Millisecond, 15}, {"long", 3 * time.Second, 16}} {
		a := g.queue("alice", b.SID, samplerWorkflow(c.name, c.steps))
		b.waitType("progress", 10*time.Second)
		gpu.DropSockets(c.outage)
		frames := b.untilJobEnd(a.PromptID, 30*time.Second)
		if indexOf(frames, "execution_success") < 0 || indexOf(frames, "execution_error") >= 0 {
			t.Fatalf("%s outage: %v", c.name, types(frames))
		}
		ref := outputRef(t, frames, "3")
		want, _ := gpu.OutputFile("output", "", ref["filename"].(string))
		if st, got, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil); st != 200 || !bytes.Equal(got, want) {
			t.Fatalf("%s outage: /view of the output: %d", c.name, st)
		}
		var j map[string]any
		g.getJSON("alice", "/api/jobs/"+a.PromptID, &j)
		if j["status"] != "completed" {
			t.Fatalf("%s outage: job status %v", c.name, j["status"])
		}
	}
}
