package caddymodule_test

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"
)

// chrome is a headless Chromium driven over the DevTools protocol (its
// JSON messages on a WebSocket): navigate, evaluate, screenshot.
type chrome struct {
	t      testing.TB
	conn   *websocket.Conn
	stderr *bytes.Buffer

	mu      sync.Mutex
	nextID  int
	pending map[int]chan cdpReply
	wmu     sync.Mutex
	loaded  chan struct{} // a Page.loadEventFired
}

type cdpReply struct {
	Result json.RawMessage `json:"result"`
	Error  *struct {
		Message string `json:"message"`
	} `json:"error"`
}

// startChrome starts Chromium with a remote debugging port and attaches to
// its first page.
func startChrome(t testing.TB, path string) *chrome {
	t.Helper()
	dir := t.TempDir()
	var stderr bytes.Buffer
	cmd := exec.Command(path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--hide-scrollbars", "--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1",
		"--user-data-dir="+dir, "about:blank")
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// Chromium writes its port to DevToolsActivePort once it listens.
	var port string
	deadline := time.Now().Add(60 * time.Second)
	for port == "" {
		if b, err := os.ReadFile(filepath.Join(dir, "DevToolsActivePort")); err == nil {
			if lines := strings.Split(string(b), "\n"); len(lines) >= 2 && lines[0] != "" {
				port = strings.TrimSpace(lines[0])
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("chromium did not start its DevTools server within 60s:\n%s", stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	resp, err := http.Get("http://127.0.0.1:" + port + "/json/list")
	if err != nil {
		t.Fatal(err)
	}
	var targets []struct {
		Type string `json:"type"`
		WS   string `json:"webSocketDebuggerUrl"`
	}
	err = json.NewDecoder(resp.Body).Decode(&targets)
	resp.Body.Close()
	if err != nil {
		t.Fatal(err)
	}
	ws := ""
	for _, tg := range targets {
		if tg.Type == "page" {
			ws = tg.WS
			break
		}
	}
	if ws == "" {
		t.Fatalf("no page target in %+v", targets)
	}
	conn, _, err := websocket.DefaultDialer.Dial(ws, nil)
	if err != nil {
		t.Fatal(err)
	}
	conn.SetReadLimit(64 << 20)
	c := &chrome{t: t, conn: conn, stderr: &stderr, pending: map[int]chan cdpReply{}, loaded: make(chan struct{}, 1)}
	t.Cleanup(func() { conn.Close() })
	go func() {
		for {
			_, data, err := conn.ReadMessage()
			if err != nil {
				return
			}
			var m struct {
				ID     int    `json:"id"`
				Method string `json:"method"`
				cdpReply
			}
			if json.Unmarshal(data, &m) != nil {
				continue
			}
			if m.Method == "Page.loadEventFired" {
				select {
				case c.loaded <- struct{}{}:
				default:
				}
			}
			if m.ID == 0 {
				continue // an event
			}
			c.mu.Lock()
			ch := c.pending[m.ID]
			delete(c.pending, m.ID)
			c.mu.Unlock()
			if ch != nil {
				ch <- m.cdpReply
			}
		}
	}()
	return c
}

// call sends one DevTools command and returns its result.
func (c *chrome) call(method string, params any, timeout time.Duration) json.RawMessage {
	c.t.Helper()
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	ch := make(chan cdpReply, 1)
	c.pending[id] = ch
	c.mu.Unlock()
	if params == nil {
		params = map[string]any{}
	}
	msg, _ := json.Marshal(map[string]any{"id": id, "method": method, "params": params})
	c.wmu.Lock()
	err := c.conn.WriteMessage(websocket.TextMessage, msg)
	c.wmu.Unlock()
	if err != nil {
		c.t.Fatalf("%s: %v", method, err)
	}
	select {
	case r := <-ch:
		if r.Error != nil {
			c.t.Fatalf("%s: %s", method, r.Error.Message)
		}
		return r.Result
	case <-time.After(timeout):
		c.t.Fatalf("%s: no answer within %v; chromium said:\n%s", method, timeout, c.stderr.String())
	}
	return nil
}

// navigate opens url in the page and waits for its load event.
func (c *chrome) navigate(url string) {
	c.t.Helper()
	c.call("Page.enable", nil, 10*time.Second)
	select {
	case <-c.loaded: // an earlier page's
	default:
	}
	var r struct {
		ErrorText string `json:"errorText"`
	}
	if err := json.Unmarshal(c.call("Page.navigate", map[string]any{"url": url}, 30*time.Second), &r); err != nil || r.ErrorText != "" {
		c.t.Fatalf("navigate to %s: %v %s", url, err, r.ErrorText)
	}
	select {
	case <-c.loaded:
	case <-time.After(30 * time.Second):
		c.t.Fatalf("%s did not load within 30s", url)
	}
}

// eval runs an expression in the page (awaiting a promise) and decodes
// its value into v; a thrown error fails the test.
func (c *chrome) eval(expr string, v any, timeout time.Duration) {
	c.t.Helper()
	res := c.call("Runtime.evaluate", map[string]any{"expression": expr, "awaitPromise": true, "returnByValue": true}, timeout)
	var r struct {
		Result struct {
			Value json.RawMessage `json:"value"`
		} `json:"result"`
		Exception *struct {
			Text      string `json:"text"`
			Exception struct {
				Description string `json:"description"`
			} `json:"exception"`
		} `json:"exceptionDetails"`
	}
	if err := json.Unmarshal(res, &r); err != nil {
		c.t.Fatal(err)
	}
	if r.Exception != nil {
		c.t.Fatalf("in the page: %s %s", r.Exception.Text, r.Exception.Exception.Description)
	}
	if v != nil {
		if err := json.Unmarshal(r.Result.Value, v); err != nil {
			c.t.Fatalf("value of %.80s: %v (%s)", expr, err, r.Result.Value)
		}
	}
}

// until waits for a condition in the page, a JS expression, to become
// truthy, re-checking it whenever the page's DOM changes; past timeout it
// fails the test with the page's text.
func (c *chrome) until(what, cond string, timeout time.Duration) {
	c.t.Helper()
	expr := fmt.Sprintf(`new Promise((resolve, reject) => {
		const check = () => { try { return !!(%s); } catch (e) { return false; } };
		if (check()) return resolve(true);
		const obs = new MutationObserver(() => { if (check()) { obs.disconnect(); clearTimeout(timer); resolve(true); } });
		obs.observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
		const timer = setTimeout(() => { obs.disconnect(); reject(new Error("not seen: " + %q + "; the page says:\n" + document.body.innerText)); }, %d);
	})`, cond, what, timeout.Milliseconds())
	c.eval(expr, nil, timeout+10*time.Second)
}

// screenshot writes the page as a PNG.
func (c *chrome) screenshot(path string) {
	c.t.Helper()
	res := c.call("Page.captureScreenshot", map[string]any{"format": "png", "captureBeyondViewport": true}, 30*time.Second)
	var r struct {
		Data string `json:"data"`
	}
	if err := json.Unmarshal(res, &r); err != nil {
		c.t.Fatal(err)
	}
	png, err := base64.StdEncoding.DecodeString(r.Data)
	if err != nil || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		c.t.Fatalf("screenshot is not a PNG (%v)", err)
	}
	if err := os.WriteFile(path, png, 0o644); err != nil {
		c.t.Fatal(err)
	}
	c.t.Logf("screenshot: %s", path)
}

// artifactDir is where tests keep files for people to look at:
// $COMFYUME_TEST_ARTIFACTS (made if missing), else a temporary directory.
func artifactDir(t testing.TB) string {
	if d := os.Getenv("COMFYUME_TEST_ARTIFACTS"); d != "" {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
		return d
	}
	return t.TempDir()
}
