package caddymodule_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
)

// loadClient is a browser-like client for load tests: its own socket, then
// prompts back to back, each read until its executing{node:null}. It runs
// on its own goroutine, so it reports instead of failing the test.
type loadClient struct {
	g    *gateway
	user string
	conn *websocket.Conn
	sid  string
}

func (g *gateway) dialLoadClient(t testing.TB, user, sid string) *loadClient {
	u := "ws" + strings.TrimPrefix(g.Base, "http") + "/ws?clientId=" + sid
	h := http.Header{"X-User": {user}}
	conn, _, err := websocket.DefaultDialer.Dial(u, h)
	if err != nil {
		t.Fatalf("dial %s: %v", u, err)
	}
	t.Cleanup(func() { conn.Close() })
	return &loadClient{g: g, user: user, conn: conn, sid: sid}
}

// post queues a prompt and returns its id (or an error).
func (c *loadClient) post(prompt map[string]any) (string, error) {
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "client_id": c.sid})
	req, _ := http.NewRequest("POST", c.g.Base+"/api/prompt", bytes.NewReader(body))
	req.Header.Set("X-User", c.user)
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	var a promptAnswer
	if err := json.NewDecoder(resp.Body).Decode(&a); err != nil || resp.StatusCode != 200 || a.PromptID == "" {
		return "", fmt.Errorf("POST /api/prompt: %d %v", resp.StatusCode, err)
	}
	return a.PromptID, nil
}

// waitEnd reads frames until executing{node:null} of id, for at most d.
func (c *loadClient) waitEnd(id string, d time.Duration) error {
	_ = c.conn.SetReadDeadline(time.Now().Add(d))
	defer c.conn.SetReadDeadline(time.Time{})
	end := []byte(`"prompt_id": "` + id + `"`)
	end2 := []byte(`"prompt_id":"` + id + `"`)
	for {
		typ, b, err := c.conn.ReadMessage()
		if err != nil {
			return fmt.Errorf("job %s did not end within %v: %w", id, d, err)
		}
		if typ != websocket.TextMessage || !bytes.Contains(b, []byte(`"executing"`)) ||
			!(bytes.Contains(b, end) || bytes.Contains(b, end2)) {
			continue
		}
		var m struct {
			Data struct {
				Node *string `json:"node"`
			} `json:"data"`
		}
		if json.Unmarshal(b, &m) == nil && m.Data.Node == nil {
			return nil
		}
	}
}

// The wedge: under a sustained blast of event-heavy jobs from many
// browsers, a single gateway (store memory) took over one of its own jobs,
// dialed a second event stream with its endpoint's sid — which cut the
// endpoint's own stream — and from then on ran nothing. After the blast a
// one-step prompt must still complete within 2 s, every blast job must
// have ended, and no job may have been taken over. LOADTEST="20 1000 60"
// (clients, steps per job, seconds) runs the full minute.
func TestSustainedEventBlastThenPromptStillRuns(t *testing.T) {
	if testing.Short() {
		t.Skip("load test")
	}
	clients, steps, blast := 8, 1000, 10*time.Second
	if v := os.Getenv("LOADTEST"); v != "" {
		var secs int
		fmt.Sscan(v, &clients, &steps, &secs)
		blast = time.Duration(secs) * time.Second
	}
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	// Like real ComfyUI, the GPU sends a sid's events to its newest socket
	// only, and forgets the sid when one of its sockets closes.
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: time.Microsecond, KeepReplacedSockets: true})
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	g := startCaddy(t, `{
	admin off
	log {
		output file `+logFile+`
		format json
		level INFO
	}
	comfyume {
		pool gpu {
			upstream `+gpu.URL()+` {
				max_jobs 1000
			}
		}
		store memory {
			lease_ttl 1s
		}
		outputs disk {DATA}
	}
}

:{PORT} {
	bind 127.0.0.1
	comfyume {
		home `+home.URL()+`
		run_on gpu
		user {http.request.header.X-User}
	}
	reverse_proxy `+strings.TrimPrefix(home.URL(), "http://")+`
}
`)

	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		failures []string
		jobs     int
	)
	stop := time.Now().Add(blast)
	for i := 0; i < clients; i++ {
		c := g.dialLoadClient(t, fmt.Sprintf("user%d", i%4), fmt.Sprintf("load%02d", i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) {
				id, err := c.post(samplerWorkflow("blast", steps))
				if err == nil {
					// Generous: a wedged gateway never ends it; a slow
					// machine (or -race) only takes longer.
					err = c.waitEnd(id, time.Minute)
				}
				mu.Lock()
				if err != nil {
					failures = append(failures, err.Error())
				} else {
					jobs++
				}
				mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}
	wg.Wait()
	t.Logf("%d blast jobs ended", jobs)

	c := g.dialLoadClient(t, "after", "after-blast")
	id, err := c.post(samplerWorkflow("after", 1))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.waitEnd(id, 2*time.Second); err != nil {
		t.Errorf("one-step prompt after the blast: %v", err)
	}
	if len(failures) > 0 {
		t.Errorf("%d blast clients stuck: %s", len(failures), strings.Join(failures, "; "))
	}
	if lines := logLines(t, logFile, "took over"); len(lines) > 0 {
		t.Errorf("the only gateway took over its own jobs:\n%s", strings.Join(lines, "\n"))
	}
}

// logLines returns the lines of a log file that contain s.
func logLines(t *testing.T, file, s string) []string {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatalf("reading the log: %v", err)
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if strings.Contains(sc.Text(), s) {
			out = append(out, sc.Text())
		}
	}
	return out
}
