package caddymodule_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"image"
	"image/png"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
)

// validationError is ComfyUI's 400 for a prompt that fails validation.
type validationError struct {
	Error struct {
		Type      string         `json:"type"`
		Details   string         `json:"details"`
		ExtraInfo map[string]any `json:"extra_info"`
	} `json:"error"`
	NodeErrors map[string]struct {
		Errors []struct {
			Type    string `json:"type"`
			Details string `json:"details"`
		} `json:"errors"`
		DependentOutputs []string `json:"dependent_outputs"`
	} `json:"node_errors"`
}

// A prompt of 4000 nodes naming a model the pool lacks is refused with a
// bounded answer: the first 50 nodes, and how many more fail. (The old
// answer repeated every output node in every node's error: 104 MiB.)
func TestHugeInvalidPromptGetsBoundedAnswer(t *testing.T) {
	var models []string
	for i := 0; i < 25; i++ {
		models = append(models, fmt.Sprintf("model_%02d.safetensors", i))
	}
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", Models: models})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	const nodes = 4000
	prompt := map[string]any{}
	for i := 0; i < nodes; i++ {
		prompt[fmt.Sprintf("%04d", i)] = map[string]any{"class_type": "FakeCheckpointImage", "inputs": map[string]any{"ckpt_name": "missing.safetensors"}}
	}
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": prompt})
	var ve validationError
	if st != 400 || json.Unmarshal(body, &ve) != nil || ve.Error.Type != "prompt_outputs_failed_validation" {
		t.Fatalf("status %d, body %.300s", st, body)
	}
	if len(body) > 64<<10 {
		t.Fatalf("answer is %d bytes", len(body))
	}
	if len(ve.NodeErrors) != 50 {
		t.Fatalf("node_errors names %d nodes, want the first 50", len(ve.NodeErrors))
	}
	first := ve.NodeErrors["0000"]
	if len(first.Errors) != 1 || first.Errors[0].Type != "value_not_in_list" ||
		first.Errors[0].Details != "ckpt_name: 'missing.safetensors' not in (list of length 25)" {
		t.Fatalf("first node's error: %+v", first)
	}
	if len(first.DependentOutputs) != 1 || first.DependentOutputs[0] != "0000" {
		t.Fatalf("dependent_outputs %v", first.DependentOutputs)
	}
	if !strings.Contains(ve.Error.Details, "(and 3950 more nodes with errors)") || ve.Error.ExtraInfo["omitted_node_errors"] != float64(3950) {
		t.Fatalf("details do not count the rest: %q %v", ve.Error.Details[len(ve.Error.Details)-80:], ve.Error.ExtraInfo)
	}
}

// 120 LoadImage nodes naming files the user does not have: the answer
// names the first 50, each with its own output only.
func TestManyMissingInputsGetBoundedAnswer(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	const nodes = 120
	prompt := map[string]any{}
	for i := 0; i < nodes; i++ {
		prompt[fmt.Sprintf("%03d", i)] = map[string]any{"class_type": "LoadImage", "inputs": map[string]any{"image": fmt.Sprintf("missing%d.png", i)}}
	}
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": prompt})
	var ve validationError
	if st != 400 || json.Unmarshal(body, &ve) != nil {
		t.Fatalf("status %d, body %.300s", st, body)
	}
	if len(ve.NodeErrors) != 50 || len(body) > 32<<10 {
		t.Fatalf("node_errors names %d nodes in %d bytes, want 50", len(ve.NodeErrors), len(body))
	}
	if e := ve.NodeErrors["000"]; len(e.Errors) != 1 || e.Errors[0].Details != "image - Invalid image file: missing0.png" || len(e.DependentOutputs) != 1 {
		t.Fatalf("first node's error: %+v", e)
	}
	if !strings.Contains(ve.Error.Details, "(and 70 more nodes with errors)") {
		t.Fatalf("details do not count the rest: %q", ve.Error.Details)
	}
}

// Page numbers past int64's range, or whose sum is, answer 200 with a
// clamped page (they panicked on a slice before).
func TestOverflowingPageQueries(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	b := g.openBrowser("alice", "", true)
	for i := 0; i < 2; i++ {
		a := g.queue("alice", b.SID, samplerWorkflow(fmt.Sprint("o", i), 1))
		b.untilJobEnd(a.PromptID, 20*time.Second)
	}
	var page jobsPage
	g.getJSON("alice", "/api/jobs?limit=9223372036854775807&offset=1", &page)
	if len(page.Jobs) != 1 {
		t.Fatalf("/api/jobs page has %d jobs, want 1", len(page.Jobs))
	}
	g.getJSON("alice", "/api/jobs?limit=1&offset=9223372036854775807", &page)
	if len(page.Jobs) != 0 {
		t.Fatalf("/api/jobs page past the end has %d jobs", len(page.Jobs))
	}
	var h map[string]any
	g.getJSON("alice", "/history?max_items=9223372036854775807&offset=1", &h)
	if len(h) != 1 {
		t.Fatalf("/history page has %d entries, want 1", len(h))
	}
	h = nil
	g.getJSON("alice", "/history?max_items=99999999999999999999&offset=-5", &h)
	if len(h) != 2 {
		t.Fatalf("/history page has %d entries, want 2", len(h))
	}
}

// viewSetup runs one job of alice's and returns the gateway, the outputs
// directory and the job's folder in it, where tests place further outputs
// as a GPU node could have made them.
func viewSetup(t *testing.T) (*gateway, string, string) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	dir := t.TempDir()
	g := startCaddy(t, strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "{DATA}", dir, 1))
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("v", 1))
	b.untilJobEnd(a.PromptID, 20*time.Second)
	jobDir := filepath.Join(dir, a.PromptID, "output")
	if _, err := os.Stat(jobDir); err != nil {
		t.Fatalf("the job's outputs are not where the test expects them: %v", err)
	}
	return g, jobDir, "comfyume/" + a.PromptID
}

// An output that is a page or a script (HTML, SVG) is a download with
// nosniff, never rendered in the gateway's origin; images stay inline.
func TestViewServesOnlyMediaInline(t *testing.T) {
	g, jobDir, sub := viewSetup(t)
	files := map[string]string{
		"evil.html": "<script>alert(document.cookie)</script>",
		"evil.svg":  `<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>`,
		"evil.xml":  `<x/>`,
		"notes.txt": "hello",
	}
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(jobDir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for name, inline := range map[string]bool{"evil.html": false, "evil.svg": false, "evil.xml": false, "notes.txt": true} {
		q := url.Values{"filename": {name}, "subfolder": {sub}, "type": {"output"}}
		st, body, h := g.do("alice", "GET", "/api/view?"+q.Encode(), nil)
		if st != 200 || string(body) != files[name] {
			t.Fatalf("%s: %d %q", name, st, body)
		}
		cd := h.Get("Content-Disposition")
		if h.Get("X-Content-Type-Options") != "nosniff" || strings.HasPrefix(cd, "attachment") == inline {
			t.Errorf("%s: Content-Type %q, Content-Disposition %q, X-Content-Type-Options %q", name, h.Get("Content-Type"), cd, h.Get("X-Content-Type-Options"))
		}
		if !inline && h.Get("Content-Type") != "application/octet-stream" {
			t.Errorf("%s: Content-Type %q", name, h.Get("Content-Type"))
		}
	}
}

// preview=jpeg and channel=a of an image above the pixel limit serve the
// file as stored instead of decoding it whole.
func TestViewTransformsOnlyBoundedImages(t *testing.T) {
	g, jobDir, sub := viewSetup(t)
	img := image.NewGray(image.Rect(0, 0, 4200, 4200)) // 17.6 MP
	var buf bytes.Buffer
	if err := (&png.Encoder{CompressionLevel: png.BestSpeed}).Encode(&buf, img); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(jobDir, "big.png"), buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, extra := range []string{"preview=jpeg;90", "channel=a"} {
		st, body, h := g.do("alice", "GET", "/api/view?filename=big.png&type=output&subfolder="+url.QueryEscape(sub)+"&"+extra, nil)
		if st != 200 || !bytes.Equal(body, buf.Bytes()) || h.Get("Content-Type") != "image/png" {
			t.Fatalf("%s: %d, %d bytes of %s, want the stored PNG", extra, st, len(body), h.Get("Content-Type"))
		}
	}
	// A small image is still transformed.
	small := image.NewGray(image.Rect(0, 0, 64, 64))
	buf.Reset()
	_ = png.Encode(&buf, small)
	if err := os.WriteFile(filepath.Join(jobDir, "small.png"), buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	st, body, h := g.do("alice", "GET", "/api/view?filename=small.png&type=output&preview=jpeg&subfolder="+url.QueryEscape(sub), nil)
	if st != 200 || h.Get("Content-Type") != "image/jpeg" || len(body) < 2 || body[0] != 0xff || body[1] != 0xd8 {
		t.Fatalf("small preview: %d %s", st, h.Get("Content-Type"))
	}
}

// A GPU server lost mid-job: the execution_error the user sees names the
// pool, never the server's address (whose path may be a secret deployment
// id, like a serverless platform's).
func TestGPUErrorNamesPoolNotAddress(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	lb := comfytest.StartBalancer(t, comfytest.BalancerOptions{Replicas: 1, PathPrefix: "/s3cret-deployment", Server: comfytest.Options{Version: "2026"}})
	lb.Replica(0).FailNext("hang")
	cf := strings.Replace(poolCaddyfile(home.URL(), lb.URL(), ""), "max_jobs 1", "max_jobs 1\n\t\t\t\tlost_timeout 300ms", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("d", 1))
	b.waitType("execution_start", 10*time.Second)
	lb.Kill(0)
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	i := indexOf(frames, "execution_error")
	if i < 0 {
		t.Fatalf("no execution_error: %v", types(frames))
	}
	msg := frames[i].str("exception_message")
	u, _ := url.Parse(lb.URL())
	for _, leak := range []string{u.Host, "s3cret", "127.0.0.1"} {
		if strings.Contains(msg, leak) {
			t.Fatalf("the message shows %q: %s", leak, msg)
		}
	}
	if !strings.Contains(msg, "pool gpu") {
		t.Fatalf("the message does not name the pool: %s", msg)
	}
}

// A user whose jobs carry big workflows keeps only the newest that fit in
// history_size: /history (no max_items) stays within it.
func TestHistorySizeBoundsStoredJobs(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}", "outputs disk {DATA}\n\t\thistory_size 1MiB", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	pad := strings.Repeat("x", 400<<10)
	var ids []string
	for i := 0; i < 5; i++ {
		extra := map[string]any{"extra_pnginfo": map[string]any{"workflow": map[string]any{"id": fmt.Sprint("wf", i), "pad": pad}}}
		st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow(fmt.Sprint("s", i), 1), "client_id": b.SID, "extra_data": extra})
		var a promptAnswer
		if st != 200 || json.Unmarshal(body, &a) != nil {
			t.Fatalf("POST /api/prompt: %d %.200s", st, body)
		}
		b.untilJobEnd(a.PromptID, 20*time.Second)
		ids = append(ids, a.PromptID)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		st, body, _ := g.do("alice", "GET", "/history", nil)
		var h map[string]json.RawMessage
		if st != 200 || json.Unmarshal(body, &h) != nil {
			t.Fatalf("/history: %d", st)
		}
		if len(h) == 2 {
			if h[ids[3]] == nil || h[ids[4]] == nil {
				t.Fatalf("kept the wrong jobs")
			}
			if len(body) > 1<<20+64<<10 {
				t.Fatalf("/history is %d bytes", len(body))
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("/history keeps %d jobs (%d bytes), want the newest 2", len(h), len(body))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// A user's ended jobs keep at most history_outputs bytes of captured
// outputs: past it, the user's oldest ended jobs are forgotten whole (the
// record and the files; /view of them finds nothing), the newest always
// kept, and other users' jobs untouched. (A user could otherwise fill the
// outputs disk with up to history_limit jobs of max_output_size each.)
func TestHistoryOutputsBoundsAUsersStoredOutputs(t *testing.T) {
	t.Run("memory", func(t *testing.T) {
		home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
		gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
		historyOutputsCheck(t, startCaddy(t, strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""),
			"outputs disk {DATA}", "outputs disk {DATA}\n\t\thistory_outputs 1", 1)))
	})
	t.Run("valkey+s3", func(t *testing.T) {
		valkeyAddr, s3 := sharedEnv(t)
		home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
		gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
		historyOutputsCheck(t, startCaddy(t, sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "history_outputs 1")))
	})
}

func historyOutputsCheck(t *testing.T, g *gateway) {
	run := func(user, prefix string) map[string]any {
		b := g.openBrowser(user, "", true)
		a := g.queue(user, b.SID, samplerWorkflow(prefix, 1))
		ref := outputRef(t, b.untilJobEnd(a.PromptID, 20*time.Second), "3")
		ref["id"] = a.PromptID
		return ref
	}
	served := func(user string, ref map[string]any) bool {
		st, _, _ := g.do(user, "GET", "/api/view?"+viewQuery(ref), nil)
		return st == 200
	}
	gone := func(user string, ref map[string]any) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); served(user, ref); {
			if time.Now().After(deadline) {
				t.Fatalf("%s's output %v still served", user, ref["filename"])
			}
			time.Sleep(20 * time.Millisecond)
		}
		if st, _, _ := g.do(user, "GET", "/api/jobs/"+ref["id"].(string), nil); st != 404 {
			t.Fatalf("%s's forgotten job: %d", user, st)
		}
	}
	bob := run("bob", "b1")
	first := run("alice", "a1")
	second := run("alice", "a2")
	gone("alice", first)
	if !served("alice", second) || !served("bob", bob) {
		t.Fatal("the newest job of alice, or bob's, lost its output")
	}
	third := run("alice", "a3")
	gone("alice", second)
	if !served("alice", third) || !served("bob", bob) {
		t.Fatal("the newest job of alice, or bob's, lost its output")
	}
}

// A client_id is kept with its job for as long as the job is (and is not
// counted in history_size), and names the session the job's events go to:
// one of megabytes is refused, in POST /prompt as in the socket's
// clientId, with ComfyUI's error shape. (A user could make the gateway
// keep a 90 MiB client_id with each of their 1000 jobs.)
func TestHugeClientIDRefused(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	huge := strings.Repeat("c", 8<<20)
	st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("cid", 2), "client_id": huge})
	promptError(t, "POST /prompt with an 8 MiB client_id", 400, st, body)
	var jobs struct {
		Jobs []any `json:"jobs"`
	}
	g.getJSON("alice", "/api/jobs", &jobs)
	if len(jobs.Jobs) != 0 {
		t.Fatalf("%d jobs after the refused prompt", len(jobs.Jobs))
	}
	// A normal one still goes.
	g.queue("alice", strings.Repeat("c", 32), samplerWorkflow("cid", 2))

	st, body, _ = g.do("alice", "GET", "/ws?clientId="+strings.Repeat("c", 16<<10), nil,
		"Connection", "Upgrade", "Upgrade", "websocket", "Sec-WebSocket-Version", "13", "Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
	promptError(t, "socket with a 16 KiB clientId", 400, st, body)
}

// Requests that name jobs to act on (POST /queue, /history, /interrupt,
// /api/jobs/cancel) are small in ComfyUI's UI; their bodies are bounded
// to 1 MiB (413 in ComfyUI's shape), and a cancel of many jobs asks home
// for its queue once. (A 30 MiB list of ids was decoded, looked up one by
// one and passed on to home: about a gigabyte of memory for one request;
// each id cancelled through /api/jobs/cancel read home's whole queue
// again — a shared home was asked thousands of times for one request.)
func TestJobListsInRequestsAreBounded(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))

	var big bytes.Buffer
	big.WriteString(`{"delete":[`)
	for i := 0; big.Len() < 30<<20; i++ {
		if i > 0 {
			big.WriteByte(',')
		}
		big.WriteString(`""`)
	}
	big.WriteString(`]}`)
	for _, path := range []string{"/api/queue", "/api/history", "/api/interrupt", "/api/jobs/cancel"} {
		st, body, _ := g.do("alice", "POST", path, big.Bytes())
		promptError(t, "POST "+path+" with 30 MiB of ids", 413, st, body)
	}

	ids := make([]string, 300)
	for i := range ids {
		ids[i] = fmt.Sprintf("00000000-0000-4000-8000-%012d", i)
	}
	before := queueReads(home)
	if st, body, _ := g.do("alice", "POST", "/api/jobs/cancel", map[string]any{"job_ids": ids}); st != 200 {
		t.Fatalf("POST /api/jobs/cancel of 300 ids: %d %s", st, body)
	}
	if n := queueReads(home) - before; n > 1 {
		t.Fatalf("cancelling 300 jobs asked home for its queue %d times", n)
	}
}

// queueReads counts the GET /queue requests home received.
func queueReads(home *comfytest.Server) int {
	n := 0
	for _, r := range home.Requests() {
		if r.Method == "GET" && strings.TrimPrefix(r.Path, "/api") == "/queue" {
			n++
		}
	}
	return n
}

// A prompt of more nodes, inputs and keys than any real workflow is
// refused before it is decoded, with ComfyUI's error shape. (Decoded, a
// key costs many times its bytes: 20 MiB of tiny nodes took 360 MiB of
// the gateway's memory and 4 s of CPU before any check, and the 100 MiB a
// body may have, about 1.8 GiB — for one request of one user.)
func TestPromptOfTooManyKeysRefused(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	for _, c := range []struct {
		name string
		body func(*bytes.Buffer)
	}{
		{"nodes", func(b *bytes.Buffer) {
			b.WriteString(`{"prompt":{`)
			for i := 0; i < 250_000; i++ {
				fmt.Fprintf(b, `"%d":{"class_type":"EmptyImage","inputs":{}},`, i)
			}
			b.WriteString(`"x":{"class_type":"EmptyImage","inputs":{}}}}`)
		}},
		{"inputs of one node", func(b *bytes.Buffer) {
			b.WriteString(`{"prompt":{"1":{"class_type":"EmptyImage","inputs":{`)
			for i := 0; i < 250_000; i++ {
				fmt.Fprintf(b, `"i%d":0,`, i)
			}
			b.WriteString(`"x":0}}}}`)
		}},
		{"extra_data keys", func(b *bytes.Buffer) {
			b.WriteString(`{"prompt":{"1":{"class_type":"EmptyImage","inputs":{}}},"extra_data":{`)
			for i := 0; i < 250_000; i++ {
				fmt.Fprintf(b, `"k%d":0,`, i)
			}
			b.WriteString(`"x":0}}`)
		}},
	} {
		var b bytes.Buffer
		c.body(&b)
		st, body, _ := g.do("alice", "POST", "/api/prompt", b.Bytes())
		if msg := promptError(t, c.name, 400, st, body); msg != "The prompt is too large" {
			t.Fatalf("%s: refused with %q", c.name, msg)
		}
	}
	// A prompt of ordinary size still goes.
	g.queue("alice", "", samplerWorkflow("keys", 2))
}

// What one user's waiting and running jobs keep of their prompts in the
// gateway's memory is bounded (max_queued_size): past it the user's next
// prompt is refused with 429 in ComfyUI's shape, and other users are not.
// (max_queued prompts of max_body_size each were kept whole: 100 × 100 MiB
// for one user.)
func TestQueuedPromptBytesBoundedPerUser(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 100 * time.Millisecond})
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}",
		"outputs disk {DATA}\n\t\tmax_queued_size 3MiB", 1)
	g := startCaddy(t, cf)
	pad := strings.Repeat("w", 1<<20)
	submit := func(user string, i int) (int, []byte) {
		st, body, _ := g.do(user, "POST", "/api/prompt", map[string]any{
			"prompt":     samplerWorkflow(fmt.Sprintf("%s%d", user, i), 200),
			"extra_data": map[string]any{"extra_pnginfo": map[string]any{"workflow": map[string]any{"pad": pad}}},
		})
		return st, body
	}
	for i := 0; i < 2; i++ {
		if st, body := submit("alice", i); st != 200 {
			t.Fatalf("alice's prompt %d: %d %.300s", i, st, body)
		}
	}
	st, body := submit("alice", 2)
	promptError(t, "alice's third 1 MiB prompt with max_queued_size 3MiB", 429, st, body)
	if st, body := submit("bob", 0); st != 200 {
		t.Fatalf("bob's prompt: %d %.300s", st, body)
	}
}

// GET /queue, which the legacy frontend asks on every status, reads the
// prompts of the user's waiting and running jobs only: it read every job
// the user keeps with its prompt and UI workflow (up to history_size,
// 256 MiB, per request) from the store and decoded it, to list none of
// them.
func TestQueueReadsOnlyActivePrompts(t *testing.T) {
	valkeyAddr, _ := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	prefix := fmt.Sprintf("queueread-%d:", time.Now().UnixNano())
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}",
		"outputs disk {DATA}\n\t\tstore valkey {\n\t\t\taddress "+valkeyAddr+"\n\t\t\tprefix "+prefix+"\n\t\t}", 1)
	g := startCaddy(t, cf)
	pad := strings.Repeat("w", 1<<20)
	var last string
	for i := 0; i < 16; i++ {
		st, body, _ := g.do("alice", "POST", "/api/prompt", map[string]any{
			"prompt":     samplerWorkflow(fmt.Sprintf("q%d", i), 1),
			"extra_data": map[string]any{"extra_pnginfo": map[string]any{"workflow": map[string]any{"pad": pad}}},
		})
		var a promptAnswer
		if st != 200 || json.Unmarshal(body, &a) != nil {
			t.Fatalf("prompt %d: %d %.200s", i, st, body)
		}
		last = a.PromptID
	}
	g.waitStatus("alice", last, "completed", 60*time.Second)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	st, body, _ := g.do("alice", "GET", "/api/queue", nil)
	runtime.ReadMemStats(&after)
	if st != 200 || !strings.Contains(string(body), `"queue_running"`) {
		t.Fatalf("GET /api/queue: %d %.200s", st, body)
	}
	if n := after.TotalAlloc - before.TotalAlloc; n > 8<<20 {
		t.Fatalf("GET /queue of no waiting job allocated %d MiB (16 ended jobs of 1 MiB kept)", n>>20)
	}
}

// A POST /prompt that announces a large body costs the gateway memory as
// the bytes come, not as announced: 8 connections that each announce
// 100 MiB and send nothing hold a few MiB. (The gateway made a buffer of
// the announced size at once: 800 MiB for 8 idle connections of one user,
// and as many more as connections opened.)
func TestAnnouncedBodyCostsOnlyWhatIsSent(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), ""))
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < 8; i++ {
		openStalledPrompt(t, g, "alice", 100<<20, nil)
	}
	// Long enough for the handlers to start reading (they did at once).
	time.Sleep(time.Second)
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 64<<20 {
		t.Fatalf("8 connections announcing 100 MiB and sending 10 bytes: %d MiB allocated", n>>20)
	}
	// A prompt of another user goes on.
	g.queue("bob", "", samplerWorkflow("announced", 1))
}

// One user's POST /prompt bodies are read two at a time: a user who opens
// a dozen connections, each sending nearly all of a max_body_size body
// and then stalling, holds two bodies in the gateway's memory, not a
// dozen; another user's prompt goes on meanwhile.
func TestOneUsersPromptBodiesReadFewAtATime(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	g := startCaddy(t, poolCaddyfile(home.URL(), gpu.URL(), "max_body_size 8MiB"))
	const size = 8 << 20
	chunk := bytes.Repeat([]byte(" "), size-16)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	for i := 0; i < 12; i++ {
		openStalledPrompt(t, g, "alice", size, chunk) // the last bytes never come
	}
	g.queue("bob", "", samplerWorkflow("slots", 1))
	time.Sleep(2 * time.Second) // long enough for every body to be read as far as it goes
	runtime.ReadMemStats(&after)
	if n := after.TotalAlloc - before.TotalAlloc; n > 80<<20 {
		t.Fatalf("12 stalled 8 MiB bodies of one user: %d MiB allocated", n>>20)
	}
}

// promptError checks an answer of status want in ComfyUI's error shape
// (error.message, node_errors) and returns its message.
func promptError(t *testing.T, what string, want, st int, body []byte) string {
	t.Helper()
	var pe struct {
		Error struct {
			Message string `json:"message"`
		} `json:"error"`
		NodeErrors map[string]any `json:"node_errors"`
	}
	if st != want || json.Unmarshal(body, &pe) != nil || pe.Error.Message == "" || pe.NodeErrors == nil {
		t.Fatalf("%s: %d %.300s, want %d in ComfyUI's error shape", what, st, body, want)
	}
	return pe.Error.Message
}

// openStalledPrompt opens a connection that posts a prompt of announced
// size as user and sends its first 10 bytes and part, then nothing (until
// the test ends).
func openStalledPrompt(t *testing.T, g *gateway, user string, size int, part []byte) {
	t.Helper()
	c, err := net.Dial("tcp", strings.TrimPrefix(g.Base, "http://"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	go func() {
		fmt.Fprintf(c, "POST /api/prompt HTTP/1.1\r\nHost: x\r\nX-User: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n{\"prompt\":", user, size)
		_, _ = c.Write(part)
	}()
}
