package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"image/color"
	"io"
	"mime/multipart"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
)

// send is g.do with full control over the request: "Host" in hdr sets the
// Host the gateway sees (as a proxy in front would).
func (g *gateway) send(user, method, path string, body []byte, hdr ...string) (int, []byte) {
	g.t.Helper()
	req, err := http.NewRequest(method, g.Base+path, bytes.NewReader(body))
	if err != nil {
		g.t.Fatal(err)
	}
	if user != "" {
		req.Header.Set("X-User", user)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		if hdr[i] == "Host" {
			req.Host = hdr[i+1]
			continue
		}
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		g.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, rb
}

// uploadBody is a multipart /upload/image body with one small PNG.
func uploadBody(t *testing.T, name string) ([]byte, string) {
	t.Helper()
	var buf bytes.Buffer
	mw := multipart.NewWriter(&buf)
	fw, err := mw.CreateFormFile("image", name)
	if err != nil {
		t.Fatal(err)
	}
	fw.Write(pngBytes(t, 4, 4, color.NRGBA{R: 200, A: 255}))
	mw.WriteField("overwrite", "true")
	mw.Close()
	return buf.Bytes(), mw.FormDataContentType()
}

func jsonBytes(v any) []byte { b, _ := json.Marshal(v); return b }

// A page on another site cannot make a visitor's browser queue prompts,
// interrupt, cancel, clear the queue or history, or upload through the
// gateway: each such request is refused with ComfyUI's 403 (empty body)
// and changes nothing, on the routes the gateway owns and on the ones it
// passes to home. Scripts (no Origin), same-origin pages and same-origin
// pages behind a TLS-terminating proxy keep working.
func TestCrossSiteRequestsRefused(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 50 * time.Millisecond})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	b := g.openBrowser("alice", "", true)
	done := g.queue("alice", b.SID, samplerWorkflow("keep", 1))
	b.untilJobEnd(done.PromptID, 30*time.Second)
	running := g.queue("alice", b.SID, samplerWorkflow("run", 400))
	g.waitStatus("alice", running.PromptID, "in_progress", 10*time.Second)

	crossSite := []string{"Origin", "http://evil.example", "Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "no-cors", "Content-Type", "text/plain;charset=UTF-8"}
	oldBrowser := []string{"Origin", "http://evil.example", "Content-Type", "text/plain"}
	upload, uploadType := uploadBody(t, "evil.png")
	attempts := []struct {
		method, path string
		body         []byte
		hdr          []string
	}{
		{"POST", "/prompt", jsonBytes(map[string]any{"prompt": samplerWorkflow("evil", 1), "client_id": b.SID}), crossSite},
		{"POST", "/api/prompt", jsonBytes(map[string]any{"prompt": samplerWorkflow("evil", 1)}), oldBrowser},
		{"POST", "/interrupt", []byte(`{}`), crossSite},
		{"POST", "/api/interrupt", jsonBytes(map[string]any{"prompt_id": running.PromptID}), oldBrowser},
		{"POST", "/api/jobs/" + running.PromptID + "/cancel", nil, crossSite},
		{"POST", "/queue", []byte(`{"clear":true}`), crossSite},
		{"POST", "/history", []byte(`{"clear":true}`), crossSite},
		{"POST", "/api/history", jsonBytes(map[string]any{"delete": []string{done.PromptID}}), oldBrowser},
		// Passed on to home. The gateway is reached by a public name, so
		// home's own loopback Host/Origin check does not apply: only the
		// fetch metadata said cross-site (ComfyUI refuses this upload when
		// it gets it directly) or only Origin shows a sibling site.
		{"POST", "/upload/image", upload, []string{"Host", "comfy.example.com", "Origin", "https://evil.example", "Sec-Fetch-Site", "cross-site", "Sec-Fetch-Mode", "navigate", "Content-Type", uploadType}},
		{"POST", "/api/upload/image", upload, []string{"Host", "comfy.example.com", "Origin", "https://wiki.example.com", "Sec-Fetch-Site", "same-site", "Content-Type", uploadType}},
	}
	for _, a := range attempts {
		st, body := g.send("alice", a.method, a.path, a.body, a.hdr...)
		if st != http.StatusForbidden || len(body) != 0 {
			t.Errorf("cross-site %s %s (%s): %d %q, want ComfyUI's 403 with an empty body", a.method, a.path, strings.Join(a.hdr[:4], " "), st, body)
		}
	}
	// Nor a cross-site WebSocket (it would read alice's events).
	h := http.Header{"X-User": {"alice"}, "Origin": {"http://evil.example"}}
	if c, resp, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(g.Base, "http")+"/ws", h); err == nil {
		c.Close()
		t.Errorf("cross-site WebSocket accepted")
	} else if resp == nil || resp.StatusCode != http.StatusForbidden {
		t.Errorf("cross-site WebSocket: %v %v", resp, err)
	}

	// A script's WebSocket client that sends its own Origin (Python's
	// websocket-client does) is same-origin and connects.
	h = http.Header{"X-User": {"alice"}, "Origin": {g.Base}}
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(g.Base, "http")+"/ws", h)
	if err != nil {
		t.Fatalf("same-origin WebSocket: %v", err)
	}
	c.Close()

	// Nothing changed.
	if n := len(gpu.Prompts()); n != 2 {
		t.Errorf("the GPU received %d prompts, want alice's 2", n)
	}
	g.waitStatus("alice", running.PromptID, "in_progress", time.Second)
	var hist map[string]any
	g.getJSON("alice", "/api/history", &hist)
	if _, ok := hist[done.PromptID]; !ok {
		t.Errorf("alice's history lost %s: %v", done.PromptID, hist)
	}
	if up := home.Uploads(); len(up) != 0 {
		t.Errorf("home stored %d cross-site uploads", len(up))
	}

	// What must keep working: a same-origin page's upload and prompt, a
	// script's prompt, and a same-origin page behind a TLS-terminating
	// proxy (Host rewritten, X-Forwarded-Host kept) interrupting its job.
	st, body := g.send("alice", "POST", "/api/upload/image", upload, "Origin", g.Base, "Sec-Fetch-Site", "same-origin", "Sec-Fetch-Mode", "cors", "Content-Type", uploadType)
	if st != 200 || len(home.Uploads()) != 1 {
		t.Fatalf("same-origin upload: %d %s", st, body)
	}
	st, body = g.send("alice", "POST", "/api/prompt", jsonBytes(map[string]any{"prompt": samplerWorkflow("ok", 1), "client_id": b.SID}),
		"Origin", g.Base, "Sec-Fetch-Site", "same-origin", "Content-Type", "application/json")
	if st != 200 {
		t.Fatalf("same-origin prompt: %d %s", st, body)
	}
	g.queue("alice", b.SID, samplerWorkflow("script", 1))
	st, body = g.send("alice", "POST", "/api/interrupt", jsonBytes(map[string]any{"prompt_id": running.PromptID}),
		"Host", "10.9.8.7:8080", "X-Forwarded-Host", "comfy.example.com", "Origin", "https://comfy.example.com", "Content-Type", "application/json")
	if st != 200 {
		t.Fatalf("interrupt from behind a proxy: %d %s", st, body)
	}
	g.waitStatus("alice", running.PromptID, "cancelled", 10*time.Second)
}

// A request whose user placeholder is empty (the auth handler is missing)
// is told why, in ComfyUI's error shape, instead of a bare 403; the
// operator's log says it once, not once per request. (The shared home of
// this config is warned about once, at start.)
func TestEmptyIdentitySaysWhy(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "\tadmin off\n", "\tadmin off\n\tlog {\n\t\toutput file "+logFile+"\n\t}\n", 1)
	g := startCaddy(t, cf)
	for i := 0; i < 3; i++ {
		st, body := g.send("", "GET", "/api/queue", nil)
		var e struct {
			Error struct {
				Type, Message, Details string
			} `json:"error"`
			NodeErrors map[string]any `json:"node_errors"`
		}
		if st != 403 || json.Unmarshal(body, &e) != nil || e.Error.Type != "no_user_identity" ||
			!strings.Contains(e.Error.Details, "{http.request.header.X-User}") || !strings.Contains(e.Error.Details, "auth handler") || e.NodeErrors == nil {
			t.Fatalf("empty identity: %d %s", st, body)
		}
	}
	log, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(string(log), "refusing requests without a user identity"); n != 1 {
		t.Errorf("the empty identity was logged %d times for 3 requests, want once:\n%s", n, log)
	}
	if n := strings.Count(string(log), "home is shared by every user"); n != 1 {
		t.Errorf("the shared home was warned about %d times, want once:\n%s", n, log)
	}
}

// With reverse_proxy sending home its own Host (header_up Host
// {upstream_hostport}), a loopback ComfyUI compares that Host with the
// browser's Origin and refuses every post; the gateway has already decided
// and passes the request on without Origin and fetch metadata, so the UI's
// saves work.
func TestSameOriginPassesHomeWithItsOwnHost(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	hostport := strings.TrimPrefix(home.URL(), "http://")
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "reverse_proxy "+hostport,
		"reverse_proxy "+hostport+" {\n\t\theader_up Host {upstream_hostport}\n\t}", 1)
	g := startCaddy(t, cf)
	st, body := g.send("alice", "POST", "/api/userdata/workflows%2Fsaved.json?overwrite=true", []byte(`{"nodes":[]}`),
		"Origin", g.Base, "Sec-Fetch-Site", "same-origin", "Sec-Fetch-Mode", "cors", "Content-Type", "application/json")
	if st != 200 {
		t.Fatalf("same-origin save through a proxy that sends home its own Host: %d %q", st, body)
	}
	for _, r := range home.Requests() {
		if r.Header.Get("Origin") != "" || r.Header.Get("Sec-Fetch-Site") != "" {
			t.Errorf("%s %s reached home with Origin %q, Sec-Fetch-Site %q", r.Method, r.Path, r.Header.Get("Origin"), r.Header.Get("Sec-Fetch-Site"))
		}
	}
}
