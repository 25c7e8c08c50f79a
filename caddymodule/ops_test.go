package caddymodule_test

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/comfyume/comfyume/comfytest"
)

// opsPassword is the operator's basic_auth password in the tests below;
// opsHash its bcrypt hash (caddy hash-password).
const (
	opsPassword = "workshop-ops"
	opsHash     = "$2a$04$dCI4LsI1HKdoWNnjG3l0Hubj/b.nyzOmGMi1crh/ElBnQvmiHx19G"
)

// opsCaddyfile is a small workshop: one pool of one GPU that runs a job
// at a time, users named by X-User, and the operator's page at /ops behind
// basic_auth; the admin API at admin.
func opsCaddyfile(admin, home, gpu string) string {
	return `{
	admin ` + admin + `
	comfyume {
		pool gpu {
			quota 30m per day
			max_jobs_per_day 20
			upstream ` + gpu + ` {
				max_jobs 1
			}
		}
		outputs disk {DATA}
	}
}

:{PORT} {
	bind 127.0.0.1
	basic_auth /ops* {
		ops ` + opsHash + `
	}
	comfyume_ops /ops*
	comfyume {
		home ` + home + `
		run_on gpu
		user {http.request.header.X-User}
	}
	reverse_proxy ` + strings.TrimPrefix(home, "http://") + `
}
`
}

func opsAuth() string {
	return "Basic " + base64.StdEncoding.EncodeToString([]byte("ops:"+opsPassword))
}

// rowsJS lists a table's rows as arrays of cell texts.
func rowsJS(table string) string {
	return `[...document.querySelectorAll("#` + table + ` tbody tr")].map(tr => [...tr.cells].map(td => td.textContent))`
}

// A workshop of two people and one GPU, watched by its operator in a real
// browser (headless Chromium) on the page behind basic_auth: the page
// shows alice's job running (user, pool, endpoint), bob's waiting with
// why, bob's earlier job that failed with the GPU's message, and each
// person's prompts and GPU time today against the pool's quota; when
// alice cancels hers and bob's runs to its end, the page — not reloaded —
// shows nothing running or waiting. On a phone's screen it fits the width. Screenshots are kept (COMFYUME_TEST_ARTIFACTS).
func TestOpsPageInChromium(t *testing.T) {
	chromium := chromiumPath(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	g := startCaddy(t, opsCaddyfile(admin, home.URL(), gpu.URL()))
	artifacts := artifactDir(t)

	// Without the operator's password: nothing.
	if st, _, _ := g.do("", "GET", "/ops/", nil); st != http.StatusUnauthorized {
		t.Fatalf("GET /ops/ without credentials: %d, want 401", st)
	}

	gpu.FailNext("error") // bob's first job fails on the GPU
	gpu.FailNext("hang")  // alice's job runs until she cancels it
	bob := g.openBrowser("bob", "", true)
	x := g.queue("bob", bob.SID, samplerWorkflow("x", 1))
	bob.untilJobEnd(x.PromptID, 20*time.Second)
	alice := g.openBrowser("alice", "", true)
	a := g.queue("alice", alice.SID, samplerWorkflow("a", 1))
	alice.waitType("execution_start", 10*time.Second)
	b := g.queue("bob", bob.SID, samplerWorkflow("b", 1))

	c := startChrome(t, chromium)
	c.call("Network.enable", nil, 10*time.Second)
	c.call("Network.setExtraHTTPHeaders", map[string]any{"headers": map[string]string{"Authorization": opsAuth()}}, 10*time.Second)
	c.call("Emulation.setDeviceMetricsOverride", map[string]any{"width": 1280, "height": 560, "deviceScaleFactor": 1, "mobile": false}, 10*time.Second)
	c.navigate(g.Base + "/ops/")

	c.until("alice's job running on the GPU", `[...document.querySelectorAll("#running tbody tr")].some(tr =>
		tr.dataset.job === `+jsString(a.PromptID)+` && tr.cells[0].textContent === "alice" && tr.cells[1].textContent === "gpu" && tr.cells[2].textContent === `+jsString(gpu.URL())+`)`, 20*time.Second)
	c.until("bob's job waiting, and why", `[...document.querySelectorAll("#queue tbody tr")].some(tr =>
		tr.dataset.job === `+jsString(b.PromptID)+` && tr.cells[0].textContent === "1" && tr.cells[1].textContent === "bob" && /a free GPU server/.test(tr.cells[4].textContent))`, 20*time.Second)
	c.until("the endpoint up with its one job", `[...document.querySelectorAll("#pools .ep")].some(ep =>
		ep.dataset.endpoint === `+jsString(gpu.URL())+` && ep.querySelector(".pill").textContent === "up" && /jobs 1\/1/.test(ep.textContent) && /circuit closed/.test(ep.textContent))`, 20*time.Second)
	c.until("bob's failure with the GPU's message", `[...document.querySelectorAll("#failures tbody tr")].some(tr =>
		tr.dataset.job === `+jsString(x.PromptID)+` && tr.cells[1].textContent === "bob" && tr.cells[3].textContent === `+jsString(gpu.URL())+` &&
		tr.cells[4].textContent.includes("injected failure"))`, 20*time.Second)
	c.until("each person's prompts today against the quota", `[...document.querySelectorAll("#usage tbody tr")].some(tr =>
		tr.dataset.user === "bob" && tr.cells[1].textContent === "gpu" && tr.cells[2].textContent.endsWith(" / 30m") &&
		tr.cells[3].textContent === "2 / 20" && tr.cells[4].textContent === "1 (1 failed)") &&
		[...document.querySelectorAll("#usage tbody tr")].some(tr => tr.dataset.user === "alice" && tr.cells[3].textContent === "1 / 20")`, 20*time.Second)
	c.screenshot(filepath.Join(artifacts, "ops-page.png"))

	// On a phone: no sideways scrolling.
	c.call("Emulation.setDeviceMetricsOverride", map[string]any{"width": 390, "height": 844, "deviceScaleFactor": 2, "mobile": true}, 10*time.Second)
	c.until("the page fitting a phone's width", `document.documentElement.scrollWidth <= window.innerWidth && document.querySelector("#running tbody tr") !== null`, 10*time.Second)
	c.screenshot(filepath.Join(artifacts, "ops-page-phone.png"))
	c.call("Emulation.setDeviceMetricsOverride", map[string]any{"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": false}, 10*time.Second)

	// The page is not reloaded from here on: a reload would drop this.
	c.eval(`window.stillTheSamePage = true`, nil, 10*time.Second)
	if st, _, _ := g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": a.PromptID}); st != 200 {
		t.Fatalf("interrupt: %d", st)
	}
	bob.untilJobEnd(b.PromptID, 20*time.Second)
	c.until("both jobs gone from running and waiting, on the same page", `window.stillTheSamePage === true &&
		document.querySelectorAll("#running tbody tr").length === 0 && document.querySelectorAll("#queue tbody tr").length === 0 &&
		/0 running · 0 waiting/.test(document.querySelector("#pools .pool").textContent)`, 30*time.Second)
	c.screenshot(filepath.Join(artifacts, "ops-page-after.png"))
	var running [][]string
	c.eval(rowsJS("running"), &running, 10*time.Second)
	if len(running) != 0 {
		t.Fatalf("jobs still shown running after both ended: %v", running)
	}
}

func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// Names and messages are shown as text: a user named like an HTML image
// with an onerror script appears as those characters, and no element is
// made of them, in a real browser.
func TestOpsPageShowsNamesAsText(t *testing.T) {
	chromium := chromiumPath(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	g := startCaddy(t, opsCaddyfile(admin, home.URL(), gpu.URL()))
	evil := `<img src=x onerror="document.title='pwned'"><b>mallory</b>`
	gpu.FailNext("hang")
	b := g.openBrowser(evil, "", true)
	j := g.queue(evil, b.SID, samplerWorkflow("x", 1))
	b.waitType("execution_start", 10*time.Second)
	t.Cleanup(func() { g.do(evil, "POST", "/api/interrupt", map[string]any{"prompt_id": j.PromptID}) })

	c := startChrome(t, chromium)
	c.call("Network.enable", nil, 10*time.Second)
	c.call("Network.setExtraHTTPHeaders", map[string]any{"headers": map[string]string{"Authorization": opsAuth()}}, 10*time.Second)
	c.navigate(g.Base + "/ops")
	c.until("the job of the user with the odd name", `document.querySelector("#running tbody tr") !== null`, 20*time.Second)
	var got struct {
		User   string `json:"user"`
		Images int    `json:"images"`
		Bold   int    `json:"bold"`
		Title  string `json:"title"`
	}
	c.eval(`({user: document.querySelector("#running tbody tr").cells[0].textContent,
		images: document.querySelectorAll("img").length, bold: document.querySelectorAll("b").length, title: document.title})`, &got, 10*time.Second)
	if got.User != evil || got.Images != 0 || got.Bold != 0 || got.Title == "pwned" {
		t.Fatalf("the name was not shown as text: %+v", got)
	}
}

// The page is one response that loads nothing from elsewhere, under a
// strict Content-Security-Policy that allows only its own inline style
// and script. The admin API gives its state as JSON (GET /comfyume/ops)
// and as the page's stream (GET /comfyume/ops/events): a running job with
// its user, pool and endpoint, never its prompt.
func TestOpsPageAndAdminAPI(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	g := startCaddy(t, opsCaddyfile(admin, home.URL(), gpu.URL()))
	gpu.FailNext("hang")
	br := g.openBrowser("alice", "", true)
	a := g.queue("alice", br.SID, samplerWorkflow("a", 1))
	br.waitType("execution_start", 10*time.Second)
	t.Cleanup(func() { g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": a.PromptID}) })

	st, page, h := g.do("", "GET", "/ops", nil, "Authorization", opsAuth())
	csp := h.Get("Content-Security-Policy")
	if st != 200 || !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "script-src 'sha256-") ||
		strings.Contains(csp, "unsafe") || !strings.Contains(string(page), `name="viewport"`) || h.Get("X-Content-Type-Options") != "nosniff" {
		t.Fatalf("GET /ops: %d, CSP %q", st, csp)
	}
	for _, ref := range []string{"src=", "href=\"http", "@import", "url("} {
		if strings.Contains(strings.ReplaceAll(string(page), `href="data:,"`, ""), ref) {
			t.Fatalf("the page loads something (%s)", ref)
		}
	}

	resp, err := http.Get("http://" + admin + "/comfyume/ops/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.Header.Get("Content-Type") != "text/event-stream" {
		t.Fatalf("events: %d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(nil, 1<<20)
	var state struct {
		Running []struct{ User, Pool, Endpoint, ID string } `json:"running"`
	}
	for sc.Scan() {
		if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
			if err := json.Unmarshal([]byte(data), &state); err != nil {
				t.Fatal(err)
			}
			break
		}
	}
	if len(state.Running) != 1 || state.Running[0].User != "alice" || state.Running[0].Pool != "gpu" || state.Running[0].Endpoint != gpu.URL() || state.Running[0].ID != a.PromptID {
		t.Fatalf("first state on the stream: %+v", state)
	}

	resp2, err := http.Get("http://" + admin + "/comfyume/ops")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp2.Body)
	resp2.Body.Close()
	if resp2.StatusCode != 200 || !strings.Contains(string(body), `"user":"alice"`) || strings.Contains(string(body), "FakeSampler") {
		t.Fatalf("GET /comfyume/ops: %d %s", resp2.StatusCode, body)
	}
}

// With the store in Valkey the operator sees the whole workshop from any
// replica: jobs sent, waiting and failed through replica B are on replica
// A's /comfyume/ops — running with their endpoint, waiting in order,
// failed with the GPU's message (from the shared list of failures).
func TestOpsStateAcrossReplicas(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	startCaddy(t, strings.Replace(cf, "admin off", "admin "+admin, 1))
	b := startReplica(t, cf)

	gpu.FailNext("error")
	gpu.FailNext("hang")
	bob := b.openBrowser("bob", "", true)
	x := b.queue("bob", bob.SID, samplerWorkflow("x", 1))
	bob.untilJobEnd(x.PromptID, 20*time.Second)
	alice := b.openBrowser("alice", "", true)
	a := b.queue("alice", alice.SID, samplerWorkflow("a", 1))
	alice.waitType("execution_start", 10*time.Second)
	t.Cleanup(func() { b.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": a.PromptID}) })
	c := b.queue("carol", "", samplerWorkflow("c", 1))

	resp, err := http.Get("http://" + admin + "/comfyume/ops")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var st struct {
		Running []struct{ ID, User, Endpoint string }
		Waiting []struct {
			ID, User, Why string
			Position      int
		}
		Failures []struct {
			JobID   string `json:"job_id"`
			User    string
			Message string
		}
	}
	if err := json.NewDecoder(resp.Body).Decode(&st); err != nil {
		t.Fatal(err)
	}
	if len(st.Running) != 1 || st.Running[0].ID != a.PromptID || st.Running[0].User != "alice" || st.Running[0].Endpoint != gpu.URL() {
		t.Errorf("running, seen from the other replica: %+v", st.Running)
	}
	if len(st.Waiting) != 1 || st.Waiting[0].ID != c.PromptID || st.Waiting[0].Position != 1 || st.Waiting[0].Why == "" {
		t.Errorf("waiting, seen from the other replica: %+v", st.Waiting)
	}
	if len(st.Failures) == 0 || st.Failures[0].JobID != x.PromptID || st.Failures[0].User != "bob" || !strings.Contains(st.Failures[0].Message, "injected failure") {
		t.Errorf("failures, seen from the other replica: %+v", st.Failures)
	}
}

// A GPU server that does not answer shows as "starting" while a job waits
// for it (its circuit open, the job waiting for it to start, as its user
// is told), and as "down" once nothing waits: the states an operator
// reads off the page, here from its stream on the admin API.
func TestOpsShowsColdEndpoint(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	cold := fmt.Sprintf("http://127.0.0.1:%d", freePort(t)) // nothing listens
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	g := startCaddy(t, opsCaddyfile(admin, home.URL(), cold))
	resp, err := http.Get("http://" + admin + "/comfyume/ops/events")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	type state struct {
		Pools []struct {
			Endpoints []struct{ State, Circuit string }
		}
		Waiting []struct{ ID, Why string }
	}
	states := make(chan state, 64)
	go func() {
		defer close(states)
		sc := bufio.NewScanner(resp.Body)
		sc.Buffer(nil, 1<<20)
		for sc.Scan() {
			if data, ok := strings.CutPrefix(sc.Text(), "data: "); ok {
				var st state
				if json.Unmarshal([]byte(data), &st) == nil {
					states <- st
				}
			}
		}
	}()
	until := func(what string, ok func(state) bool) {
		t.Helper()
		deadline := time.After(30 * time.Second)
		var last state
		for {
			select {
			case st, open := <-states:
				if !open {
					t.Fatalf("stream ended before %s", what)
				}
				if ok(st) {
					return
				}
				last = st
			case <-deadline:
				t.Fatalf("not seen within 30s: %s; last state %+v", what, last)
			}
		}
	}
	endpoint := func(st state) (string, string) {
		if len(st.Pools) != 1 || len(st.Pools[0].Endpoints) != 1 {
			return "", ""
		}
		e := st.Pools[0].Endpoints[0]
		return e.State, e.Circuit
	}
	until("the idle endpoint up", func(st state) bool { s, c := endpoint(st); return s == "up" && c == "closed" })

	j := g.queue("alice", "", samplerWorkflow("a", 1))
	until("the endpoint starting, its circuit open, the job waiting for it", func(st state) bool {
		s, c := endpoint(st)
		return s == "starting" && c == "open" && len(st.Waiting) == 1 && st.Waiting[0].ID == j.PromptID &&
			strings.Contains(st.Waiting[0].Why, "a GPU server to start")
	})
	if st, b, _ := g.do("alice", "POST", "/api/jobs/"+j.PromptID+"/cancel", nil); st != 200 {
		t.Fatalf("cancel: %d %s", st, b)
	}
	until("the endpoint down, nothing waiting", func(st state) bool {
		s, c := endpoint(st)
		return s == "down" && c == "open" && len(st.Waiting) == 0
	})
}

// An open operator page does not hold up a config reload: its stream ends
// when the config it came through is replaced (the page reconnects to
// the new one), and the new config serves it.
func TestOpsStreamEndsOnReload(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	admin := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	cf := strings.ReplaceAll(opsCaddyfile(admin, home.URL(), gpu.URL()), "{DATA}", t.TempDir())
	g := startCaddy(t, cf)
	open := func() (*http.Response, *bufio.Reader) {
		t.Helper()
		req, _ := http.NewRequest("GET", g.Base+"/ops/events", nil)
		req.Header.Set("Authorization", opsAuth())
		resp, err := http.DefaultClient.Do(req)
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("GET /ops/events: %v %v", err, resp)
		}
		t.Cleanup(func() { resp.Body.Close() })
		r := bufio.NewReader(resp.Body)
		for {
			line, err := r.ReadString('\n')
			if err != nil {
				t.Fatal(err)
			}
			if strings.HasPrefix(line, "data: ") {
				return resp, r
			}
		}
	}
	_, r := open()

	port := strings.TrimPrefix(g.Base, "http://127.0.0.1:")
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(strings.ReplaceAll(cf, "{PORT}", port)), nil)
	if err != nil {
		t.Fatal(err)
	}
	loaded := make(chan error, 1)
	go func() { loaded <- caddy.Load(cfg, true) }()
	select {
	case err := <-loaded:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the reload waited 30s for the open operator page")
	}
	ended := make(chan error, 1)
	go func() {
		for {
			if _, err := r.ReadString('\n'); err != nil {
				ended <- err
				return
			}
		}
	}()
	select {
	case <-ended:
	case <-time.After(30 * time.Second):
		t.Fatal("the stream through the old config is still open 30s after the reload")
	}
	open() // through the new config
}
