package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// chromiumPath finds Debian's Chromium; without it the browser test skips
// locally and fails in CI (scripts/test.sh installs it).
func chromiumPath(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv("CI") != "" {
		t.Fatal("chromium not found: scripts/test.sh installs it (apt-get install chromium)")
	}
	t.Skip("needs chromium (apt-get install chromium)")
	return ""
}

// attackPage is what a page on another site runs against the gateway: the
// requests a browser sends without asking anyone — no-cors fetches with a
// text/plain body and credentials, and text/plain form posts (into an
// iframe) whose field makes a JSON body — then it reports to its own server
// and goes on to next.
const attackPage = `<!doctype html><html><body><script>
const gw = %q, stage = %q, next = %q;
const prompt = {prompt: %s, client_id: "attacker"};
function post(path, body) {
	return fetch(gw + path, {method: "POST", mode: "no-cors", credentials: "include",
		headers: {"Content-Type": "text/plain"}, body: body}).catch(() => {});
}
function formPost(path, name, value) {
	return new Promise(done => {
		const sink = document.createElement("iframe");
		sink.name = "sink" + Math.random().toString(36).slice(2);
		document.body.appendChild(sink);
		sink.addEventListener("load", () => done(), {once: true});
		setTimeout(done, 5000);
		const f = document.createElement("form");
		f.method = "POST"; f.enctype = "text/plain"; f.action = gw + path; f.target = sink.name;
		const i = document.createElement("input");
		i.type = "hidden"; i.name = name; i.value = value;
		f.appendChild(i); document.body.appendChild(f); f.submit();
	});
}
(async () => {
	const body = JSON.stringify(prompt);
	await post("/prompt", body);
	await post("/api/prompt", body);
	await post("/api/interrupt", "{}");
	await post("/api/queue", '{"clear":true}');
	await post("/api/history", '{"clear":true}');
	await formPost("/api/prompt", body.slice(0, -1) + ',"x":"', '"}');
	await formPost("/history", '{"clear":true,"x":"', '"}');
	await fetch("/done?stage=" + stage);
	location.href = next;
})();
</script></body></html>`

// uiScript runs inside a page of the gateway's own origin: what the ComfyUI
// frontend does to queue a prompt.
const uiScript = `(async () => {
	let status = 0;
	try {
		const r = await fetch("/api/prompt", {method: "POST", headers: {"Content-Type": "application/json"},
			body: JSON.stringify({prompt: %s, client_id: "ui"})});
		status = r.status;
	} catch (e) {}
	await fetch(%q + "/done?stage=same-origin&status=" + status, {mode: "no-cors"});
})();`

// A page on another site, opened in a real browser (headless Chromium),
// tries to queue a prompt and clear the victim's history through the
// gateway with no-cors fetches and form posts: nothing is queued and the
// history stays. A page on the same host but another port (same-site, so
// only Origin tells it apart) fails the same way, and a page of the
// gateway's own origin still queues its prompt.
func TestCrossSiteAttackInChromium(t *testing.T) {
	chromium := chromiumPath(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})

	// The attacker's server: pages and a /done report, on a port of its own.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	atkPort := l.Addr().(*net.TCPAddr).Port
	var (
		mu     sync.Mutex
		stages = map[string]string{}
		doneCh = make(chan struct{}, 8)
	)
	evil := samplerWorkflow("evil", 1)
	evilJSON, _ := json.Marshal(evil)
	ui, _ := json.Marshal(samplerWorkflow("ui", 1))
	var gwBase string
	mux := http.NewServeMux()
	mux.HandleFunc("/cross.html", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, attackPage, gwBase, "cross-site", fmt.Sprintf("http://127.0.0.1:%d/same-site.html", atkPort), evilJSON)
	})
	mux.HandleFunc("/same-site.html", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html")
		fmt.Fprintf(w, attackPage, gwBase, "same-site", gwBase+"/ui.html", evilJSON)
	})
	mux.HandleFunc("/ui.js", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/javascript")
		fmt.Fprintf(w, uiScript, ui, fmt.Sprintf("http://127.0.0.1:%d", atkPort))
	})
	mux.HandleFunc("/done", func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		stages[r.URL.Query().Get("stage")] = r.URL.Query().Get("status")
		mu.Unlock()
		doneCh <- struct{}{}
	})
	atk := &http.Server{Handler: mux}
	go atk.Serve(l)
	t.Cleanup(func() { atk.Close() })

	// The gateway: no auth, so the browser's "credential" is being able
	// to reach it, like a personal ComfyUI on localhost or a LAN; a page
	// of its own origin (/ui.html) loads the UI script.
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "\t\tuser {http.request.header.X-User}\n", "", 1)
	cf = strings.Replace(cf, "\treverse_proxy ", "\theader /ui.html Content-Type text/html\n\trespond /ui.html `<!doctype html><script src=\"http://127.0.0.1:"+fmt.Sprint(atkPort)+"/ui.js\"></script>` 200\n\treverse_proxy ", 1)
	g := startCaddy(t, cf)
	gwBase = g.Base

	// The victim's finished job, in their history.
	b := g.openBrowser("", "", true)
	victim := g.queue("", b.SID, samplerWorkflow("victim", 1))
	b.untilJobEnd(victim.PromptID, 30*time.Second)

	// The visitor opens the attacker's page: localhost is another site
	// than 127.0.0.1.
	var stderr bytes.Buffer
	cmd := exec.Command(chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir="+t.TempDir(), fmt.Sprintf("http://localhost:%d/cross.html", atkPort))
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	deadline := time.After(90 * time.Second)
	for n := 0; n < 3; n++ {
		select {
		case <-doneCh:
		case <-deadline:
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("the pages did not finish within 90s (reported: %v); chromium said:\n%s", stages, stderr.String())
		}
	}
	mu.Lock()
	defer mu.Unlock()
	if _, ok := stages["cross-site"]; !ok {
		t.Fatalf("the cross-site page did not run: %v", stages)
	}
	if _, ok := stages["same-site"]; !ok {
		t.Fatalf("the same-site page did not run: %v", stages)
	}
	if stages["same-origin"] != "200" {
		t.Fatalf("the gateway's own page could not queue a prompt: %v", stages)
	}

	// The GPU ran the victim's job and the UI's, nothing of the attacker's.
	time.Sleep(300 * time.Millisecond)
	for _, p := range gpu.Prompts() {
		if fmt.Sprint(p.Prompt["3"]) == fmt.Sprint(evil["3"]) || p.ClientID == "attacker" {
			t.Errorf("the attacker's prompt reached the GPU: %s", p.PromptID)
		}
	}
	if n := len(gpu.Prompts()); n != 2 {
		t.Errorf("the GPU received %d prompts, want 2 (the victim's and the UI's)", n)
	}
	var hist map[string]any
	g.getJSON("", "/api/history", &hist)
	if _, ok := hist[victim.PromptID]; !ok {
		t.Errorf("the victim's history was cleared: %v", hist)
	}
}
