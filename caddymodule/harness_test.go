package caddymodule_test

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/gorilla/websocket"

	_ "github.com/comfyume/comfyume/caddymodule"
)

// caddyMu serialises tests that load a Caddy config: there is one running
// config per process.
var caddyMu sync.Mutex

// freePort hands out a port nothing listens on, for a server the test
// starts later. It picks from below the kernel's ephemeral range, so that
// an outgoing connection (whose local port comes from that range) or a
// ":0" listener elsewhere cannot take it between now and the bind, and
// never hands out the same port twice in one test binary.
func freePort(t testing.TB) int {
	t.Helper()
	portMu.Lock()
	defer portMu.Unlock()
	low := ephemeralLow()
	for i := 0; i < 1000; i++ {
		p := 10000 + rand.IntN(low-10000)
		if portsGiven[p] {
			continue
		}
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		portsGiven[p] = true
		return p
	}
	t.Fatal("no free port below the ephemeral range")
	return 0
}

var (
	portMu     sync.Mutex
	portsGiven = map[int]bool{}
)

// ephemeralLow is the first port the kernel hands out for outgoing
// connections (32768 on Linux unless configured otherwise).
func ephemeralLow() int {
	low := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 11000 {
				low = n
			}
		}
	}
	return low
}

// gateway is a running Caddy with comfyume, loaded from a Caddyfile.
type gateway struct {
	t    testing.TB
	Base string // http://127.0.0.1:port (https:// when served over TLS)
	// With TLS: the settings of the test's clients, and its HTTP client.
	tls    *tls.Config
	client *http.Client
}

// httpClient is the client for the gateway's requests.
func (g *gateway) httpClient() *http.Client {
	if g.client == nil {
		return http.DefaultClient
	}
	return g.client
}

// dialer is a WebSocket dialer for the gateway's sockets.
func (g *gateway) dialer() *websocket.Dialer {
	return &websocket.Dialer{Proxy: http.ProxyFromEnvironment, HandshakeTimeout: 45 * time.Second, TLSClientConfig: g.tls}
}

// wsURL is the gateway's WebSocket address for path.
func (g *gateway) wsURL(path string) string {
	return "ws" + strings.TrimPrefix(g.Base, "http") + path
}

// startCaddy adapts the Caddyfile and runs it in this process until the
// test ends. "{PORT}" in the text is replaced by a free port and "{DATA}"
// by a fresh directory.
func startCaddy(t testing.TB, caddyfile string) *gateway {
	t.Helper()
	caddyMu.Lock()
	port := freePort(t)
	caddyfile = strings.ReplaceAll(caddyfile, "{PORT}", fmt.Sprint(port))
	caddyfile = strings.ReplaceAll(caddyfile, "{DATA}", t.TempDir())
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		caddyMu.Unlock()
		t.Fatalf("adapting Caddyfile: %v\n%s", err, caddyfile)
	}
	if err := caddy.Load(cfg, true); err != nil {
		caddyMu.Unlock()
		t.Fatalf("loading config: %v", err)
	}
	t.Cleanup(func() {
		_ = caddy.Stop()
		caddyMu.Unlock()
	})
	g := &gateway{t: t, Base: fmt.Sprintf("http://127.0.0.1:%d", port)}
	// Wait until it answers.
	for i := 0; i < 100; i++ {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 100*time.Millisecond)
		if err == nil {
			c.Close()
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	return g
}

// startCaddyTLS runs the Caddyfile as startCaddy does, with its site
// ":{PORT}" served over HTTPS instead (a certificate from Caddy's own
// internal CA; the test's clients do not verify it).
func startCaddyTLS(t testing.TB, caddyfile string) *gateway {
	t.Helper()
	caddyfile = strings.Replace(caddyfile, "admin off\n",
		"admin off\n\tlocal_certs\n\tskip_install_trust\n\tauto_https disable_redirects\n\tstorage file_system {DATA}/caddy\n", 1)
	caddyfile = strings.Replace(caddyfile, "\n:{PORT} {\n", "\nhttps://127.0.0.1:{PORT} {\n", 1)
	g := startCaddy(t, caddyfile)
	g.Base = strings.Replace(g.Base, "http://", "https://", 1)
	g.tls = &tls.Config{InsecureSkipVerify: true}
	tr := &http.Transport{TLSClientConfig: g.tls}
	t.Cleanup(tr.CloseIdleConnections)
	g.client = &http.Client{Transport: tr}
	// Wait until it has its certificate.
	for i := 0; ; i++ {
		c, err := tls.Dial("tcp", strings.TrimPrefix(g.Base, "https://"), g.tls)
		if err == nil {
			c.Close()
			break
		}
		if i == 100 {
			t.Fatalf("no TLS handshake with %s: %v", g.Base, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	return g
}

// poolCaddyfile is the configuration contract with test addresses.
func poolCaddyfile(home, gpu string, extraSite string) string {
	return `{
	admin off
	comfyume {
		pool gpu {
			upstream ` + gpu + ` {
				header Authorization "Bearer {env.COMFYUME_TEST_TOKEN}"
				max_jobs 1
			}
		}
		outputs disk {DATA}
	}
}

:{PORT} {
	bind 127.0.0.1
	comfyume {
		home ` + home + `
		run_on gpu
		user {http.request.header.X-User}
		` + extraSite + `
	}
	reverse_proxy ` + strings.TrimPrefix(home, "http://") + `
}
`
}

// do sends a request as user (X-User header) and returns status and body.
func (g *gateway) do(user, method, path string, body any, hdr ...string) (int, []byte, http.Header) {
	g.t.Helper()
	var r io.Reader
	switch b := body.(type) {
	case nil:
	case []byte:
		r = bytes.NewReader(b)
	case string:
		r = strings.NewReader(b)
	default:
		j, _ := json.Marshal(b)
		r = bytes.NewReader(j)
	}
	req, err := http.NewRequest(method, g.Base+path, r)
	if err != nil {
		g.t.Fatal(err)
	}
	if user != "" {
		req.Header.Set("X-User", user)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := g.httpClient().Do(req)
	if err != nil {
		g.t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	rb, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, rb, resp.Header
}

func (g *gateway) getJSON(user, path string, v any) {
	g.t.Helper()
	st, b, _ := g.do(user, "GET", path, nil)
	if st != 200 {
		g.t.Fatalf("GET %s: %d %s", path, st, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		g.t.Fatalf("GET %s: %v in %s", path, err, b)
	}
}

// browser is a WebSocket client acting like the ComfyUI frontend.
type browser struct {
	t      testing.TB
	conn   *websocket.Conn
	SID    string
	frames chan wsFrame
	// held are frames read while waiting for the feature_flags reply, in
	// order; next returns them first.
	held []wsFrame
}

type wsFrame struct {
	text   bool
	data   []byte
	Type   string
	Data   map[string]any
	binary uint32
}

func (f wsFrame) str(k string) string { s, _ := f.Data[k].(string); return s }

// currentFlags are the feature flags the current frontend declares.
const currentFlags = `{"supports_preview_metadata":true,"supports_manager_v4_ui":true,"supports_progress_text_metadata":true}`

// openBrowser opens a socket as the current frontend (previewMeta: it
// declares its feature flags) or as one that declares none.
// aliceQueues starts Caddy with cf, opens alice's browser and queues a
// sampler workflow of steps steps for it.
func aliceQueues(t testing.TB, cf, name string, steps int) (*gateway, *browser, promptAnswer) {
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	return g, b, g.queue("alice", b.SID, samplerWorkflow(name, steps))
}

func (g *gateway) openBrowser(user, clientID string, previewMeta bool) *browser {
	g.t.Helper()
	flags := ""
	if previewMeta {
		flags = currentFlags
	}
	return g.openBrowserFlags(user, clientID, flags)
}

// openBrowserFlags opens a socket whose first frame declares flags (a JSON
// object; "" sends no feature_flags frame).
func (g *gateway) openBrowserFlags(user, clientID, flags string) *browser {
	g.t.Helper()
	u := g.wsURL("/ws")
	if clientID != "" {
		u += "?clientId=" + clientID
	}
	h := http.Header{}
	if user != "" {
		h.Set("X-User", user)
	}
	conn, _, err := g.dialer().Dial(u, h)
	if err != nil {
		g.t.Fatalf("dial %s: %v", u, err)
	}
	b := &browser{t: g.t, conn: conn, frames: make(chan wsFrame, 4096)}
	g.t.Cleanup(func() { conn.Close() })
	go func() {
		defer close(b.frames)
		for {
			typ, data, err := conn.ReadMessage()
			if err != nil {
				return
			}
			b.frames <- parseFrame(typ, data)
		}
	}()
	first := b.next(5 * time.Second)
	if first.Type != "status" {
		g.t.Fatalf("first frame is %q, want status", first.Type)
	}
	b.SID = first.str("sid")
	if b.SID == "" {
		g.t.Fatalf("first status has no sid: %s", first.data)
	}
	if flags != "" {
		_ = conn.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":`+flags+`}`))
		var held []wsFrame
		for {
			f := b.next(5 * time.Second)
			if f.Type == "feature_flags" {
				if f.Data["supports_preview_metadata"] != true {
					g.t.Fatalf("feature_flags reply lacks supports_preview_metadata: %s", f.data)
				}
				break
			}
			held = append(held, f)
		}
		b.held = held
	}
	return b
}

func (b *browser) next(d time.Duration) wsFrame {
	b.t.Helper()
	if len(b.held) > 0 {
		f := b.held[0]
		b.held = b.held[1:]
		return f
	}
	select {
	case f, ok := <-b.frames:
		if !ok {
			b.t.Fatalf("socket closed")
		}
		return f
	case <-time.After(d):
		b.t.Fatalf("no frame within %v", d)
	}
	return wsFrame{}
}

func (b *browser) waitType(typ string, d time.Duration) wsFrame {
	b.t.Helper()
	deadline := time.Now().Add(d)
	for {
		f := b.next(time.Until(deadline))
		if f.Type == typ {
			return f
		}
	}
}

// untilJobEnd collects frames until executing{node:null} for promptID.
func (b *browser) untilJobEnd(promptID string, d time.Duration) []wsFrame {
	b.t.Helper()
	var out []wsFrame
	deadline := time.Now().Add(d)
	for {
		f := b.next(time.Until(deadline))
		out = append(out, f)
		if f.Type == "executing" && f.Data["node"] == nil && f.str("prompt_id") == promptID {
			return out
		}
	}
}

// quiet asserts no frame for promptID arrives within d.
func (b *browser) noFrameFor(promptID string, d time.Duration) {
	b.t.Helper()
	deadline := time.After(d)
	for {
		select {
		case f, ok := <-b.frames:
			if !ok {
				return
			}
			if f.str("prompt_id") == promptID || (!f.text && bytes.Contains(f.data, []byte(promptID))) {
				b.t.Fatalf("frame of another user's job leaked: %s", f.data)
			}
		case <-deadline:
			return
		}
	}
}

func types(frames []wsFrame) []string {
	var out []string
	for _, f := range frames {
		if f.text {
			out = append(out, f.Type)
		} else {
			out = append(out, fmt.Sprintf("<binary %d>", f.binary))
		}
	}
	return out
}

// notices counts the progress-text frames (binary type 3) containing text:
// the messages the gateway shows under a job's node.
func notices(frames []wsFrame, text string) int {
	n := 0
	for _, f := range frames {
		if !f.text && f.binary == 3 && bytes.Contains(f.data, []byte(text)) {
			n++
		}
	}
	return n
}

// waitStatus polls /api/jobs/{id} until the job has the status.
func (g *gateway) waitStatus(user, id, status string, d time.Duration) {
	g.t.Helper()
	deadline := time.Now().Add(d)
	for {
		var j map[string]any
		g.getJSON(user, "/api/jobs/"+id, &j)
		if j["status"] == status {
			return
		}
		if time.Now().After(deadline) {
			g.t.Fatalf("job %s is %v, not %s, after %v", id, j["status"], status, d)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dropIdleConnections forgets the test client's idle connections, e.g.
// after a config reload: the old server closes them, and a request sent on
// one as it does ends in EOF.
func dropIdleConnections() { http.DefaultClient.CloseIdleConnections() }
