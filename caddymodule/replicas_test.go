package caddymodule_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/comfyume/comfyume/comfytest"
)

// sharedEnv returns the addresses of the Valkey and S3 servers the
// shared-state tests need (started by scripts/test.sh). Without them the
// tests skip locally and fail in CI.
func sharedEnv(t *testing.T) (valkeyAddr string, s3 [4]string) {
	t.Helper()
	valkeyAddr = os.Getenv("COMFYUME_TEST_VALKEY")
	s3 = [4]string{os.Getenv("COMFYUME_TEST_S3_ENDPOINT"), os.Getenv("COMFYUME_TEST_S3_ACCESS_KEY"),
		os.Getenv("COMFYUME_TEST_S3_SECRET_KEY"), os.Getenv("COMFYUME_TEST_S3_BUCKET")}
	if valkeyAddr == "" || s3[0] == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("COMFYUME_TEST_VALKEY / COMFYUME_TEST_S3_* not set: scripts/test.sh starts those servers")
		}
		t.Skip("needs Valkey and S3 (run scripts/test.sh)")
	}
	return valkeyAddr, s3
}

// sharedCaddyfile is one replica's config: Valkey store, S3 outputs, a
// private prefix per test so tests never see each other's state.
func sharedCaddyfile(prefix, valkeyAddr string, s3 [4]string, home, gpu, extraGlobal string) string {
	return `{
	admin off
	comfyume {
		pool gpu {
			upstream ` + gpu + ` {
				max_jobs 1
				lost_timeout 5s
			}
		}
		store valkey {
			address ` + valkeyAddr + `
			prefix ` + prefix + `
			lease_ttl 1s
		}
		` + s3Outputs("http://"+s3[0], prefix, s3) + `
		` + extraGlobal + `
	}
}

:{PORT} {
	bind 127.0.0.1
	comfyume {
		home ` + home + `
		run_on gpu
		user {http.request.header.X-User}
	}
	reverse_proxy ` + strings.TrimPrefix(home, "http://") + `
}
`
}

// s3Outputs is the outputs option for the test S3 (s3 as sharedEnv gives
// it) at endpoint, under prefix.
func s3Outputs(endpoint, prefix string, s3 [4]string) string {
	return `outputs s3 {
			endpoint ` + endpoint + `
			bucket ` + s3[3] + `
			prefix ` + prefix + `
			access_key ` + s3[1] + `
			secret_key ` + s3[2] + `
			region us-east-1
			spool {DATA}/spool
		}`
}

// replica is a second Caddy, in its own process.
type replica struct {
	gateway
	cmd  *exec.Cmd
	logs *bytes.Buffer
	mu   *sync.Mutex
}

func startReplica(t *testing.T, caddyfile string) *replica {
	t.Helper()
	bin := replicaBinary(t)
	port := freePort(t)
	dir := t.TempDir()
	cf := strings.ReplaceAll(strings.ReplaceAll(caddyfile, "{PORT}", fmt.Sprint(port)), "{DATA}", dir)
	path := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(cf), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "run", "--config", path, "--adapter", "caddyfile")
	cmd.Env = append(os.Environ(), "XDG_DATA_HOME="+dir, "XDG_CONFIG_HOME="+dir)
	logs := &bytes.Buffer{}
	mu := &sync.Mutex{}
	pr, pw, _ := os.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			mu.Lock()
			logs.WriteString(sc.Text() + "\n")
			mu.Unlock()
		}
	}()
	r := &replica{gateway: gateway{t: t, Base: fmt.Sprintf("http://127.0.0.1:%d", port)}, cmd: cmd, logs: logs, mu: mu}
	t.Cleanup(func() {
		r.kill()
		if t.Failed() {
			mu.Lock()
			t.Logf("replica logs:\n%s", logs.String())
			mu.Unlock()
		}
	})
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", fmt.Sprintf("127.0.0.1:%d", port), 100*time.Millisecond)
		if err == nil {
			c.Close()
			return r
		}
		if time.Now().After(deadline) {
			mu.Lock()
			defer mu.Unlock()
			t.Fatalf("replica did not start:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// kill ends the replica abruptly (SIGKILL), like a crashed container.
func (r *replica) kill() {
	if r.cmd.Process != nil {
		_ = r.cmd.Process.Signal(syscall.SIGKILL)
		_ = r.cmd.Wait()
	}
}

func testPrefix() string { return "t" + strings.ReplaceAll(uuid.NewString(), "-", "")[:10] + ":" }

// A browser on replica A sees, in order, every event of a job submitted
// through replica B (whose GPU stream B holds), previews included; the
// outputs are in S3, so A serves them after B and the GPU are gone.
func TestReplicasShareEventsAndOutputs(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 20 * time.Millisecond})
	prefix := testPrefix()
	cf := sharedCaddyfile(prefix, valkeyAddr, s3, home.URL(), gpu.URL(), "")
	a := startCaddy(t, cf)
	b := startReplica(t, cf)

	browser := a.openBrowser("alice", "tab-x", true)
	pa := b.queue("alice", browser.SID, samplerWorkflow("xr", 3))
	frames := browser.untilJobEnd(pa.PromptID, 30*time.Second)
	seq := types(frames)
	start, executed, success := indexOf(frames, "execution_start"), indexOf(frames, "executed"), indexOf(frames, "execution_success")
	if start < 0 || executed < start || success < executed {
		t.Fatalf("events across replicas out of order: %v", seq)
	}
	previews := 0
	for _, f := range frames {
		if !f.text && f.binary == 4 {
			previews++
		}
	}
	if previews != 3 {
		t.Fatalf("%d previews across replicas, want 3: %v", previews, seq)
	}
	// Both replicas list the job.
	for _, g := range []*gateway{a, &b.gateway} {
		var page jobsPage
		g.getJSON("alice", "/api/jobs", &page)
		if j := findJob(page.Jobs, pa.PromptID); j == nil || j["status"] != "completed" {
			t.Fatalf("%s lists %v", g.Base, page.Jobs)
		}
	}
	ref := outputRef(t, frames, "3")
	want, _ := gpu.OutputFile("output", "", ref["filename"].(string))
	b.kill()
	gpu.Kill()
	st, got, _ := a.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 || !bytes.Equal(got, want) {
		t.Fatalf("/view from the other replica after capture replica and GPU died: %d (%d bytes, want %d)", st, len(got), len(want))
	}
	st, part, _ := a.do("alice", "GET", "/api/view?"+viewQuery(ref), nil, "Range", "bytes=5-14")
	if st != 206 || !bytes.Equal(part, want[5:15]) {
		t.Fatalf("Range from S3: %d", st)
	}
	if st, _, _ := a.do("bob", "GET", "/api/view?"+viewQuery(ref), nil); st != 404 {
		t.Fatalf("bob reads alice's S3 output: %d", st)
	}
}

// A browser that reconnects to another replica gets what it missed.
func TestReconnectToOtherReplicaReplaysMissedEvents(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 30 * time.Millisecond})
	prefix := testPrefix()
	cf := sharedCaddyfile(prefix, valkeyAddr, s3, home.URL(), gpu.URL(), "")
	a := startCaddy(t, cf)
	b := startReplica(t, cf)

	tab := a.openBrowser("alice", "tab-r", true)
	pa := a.queue("alice", tab.SID, samplerWorkflow("rr", 6))
	tab.waitType("progress", 10*time.Second)
	tab.conn.Close()
	a.waitStatus("alice", pa.PromptID, "completed", 30*time.Second)
	again := b.openBrowser("alice", "tab-r", true)
	frames := again.untilJobEnd(pa.PromptID, 10*time.Second)
	if indexOf(frames, "executed") < 0 || indexOf(frames, "execution_success") < 0 {
		t.Fatalf("replayed on the other replica: %v", types(frames))
	}
	// bob on the same sid gets nothing of it.
	spy := b.openBrowser("bob", "tab-r", true)
	spy.noFrameFor(pa.PromptID, 300*time.Millisecond)
}

// The replica that runs a job dies mid-job: another takes the job over
// (after the lease expires), follows it on the GPU and the browser gets
// its outputs and end. Jobs waiting in the dead replica's queue run too.
func TestReplicaDeathMidJobIsRecovered(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 100 * time.Millisecond})
	prefix := testPrefix()
	cf := sharedCaddyfile(prefix, valkeyAddr, s3, home.URL(), gpu.URL(), "")
	b := startReplica(t, cf)
	a := startCaddy(t, cf)

	tab := a.openBrowser("alice", "tab-d", true)
	done := b.queue("alice", tab.SID, samplerWorkflow("done", 1))
	tab.untilJobEnd(done.PromptID, 30*time.Second)
	running := b.queue("alice", tab.SID, samplerWorkflow("dies", 20))
	waiting := b.queue("alice", tab.SID, samplerWorkflow("waits", 1))
	tab.waitType("progress", 10*time.Second)
	b.kill()
	var page jobsPage
	a.getJSON("alice", "/api/jobs", &page)
	for id, st := range map[string]string{done.PromptID: "completed", running.PromptID: "in_progress", waiting.PromptID: "pending"} {
		if j := findJob(page.Jobs, id); j == nil || j["status"] != st {
			t.Fatalf("after the replica died, job %s is %v, want %s", id, j, st)
		}
	}

	frames := tab.untilJobEnd(running.PromptID, 60*time.Second)
	if indexOf(frames, "execution_success") < 0 || indexOf(frames, "executed") < 0 {
		t.Fatalf("taken-over job: %v", types(frames))
	}
	ref := outputRef(t, frames, "3")
	want, _ := gpu.OutputFile("output", "", ref["filename"].(string))
	if st, got, _ := a.do("alice", "GET", "/api/view?"+viewQuery(ref), nil); st != 200 || !bytes.Equal(got, want) {
		t.Fatalf("output of the taken-over job: %d", st)
	}
	frames = tab.untilJobEnd(waiting.PromptID, 60*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("waiting job of the dead replica: %v %s", types(frames), frames[0].data)
	}
	n := 0
	for _, p := range gpu.Prompts() {
		if p.PromptID == running.PromptID {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("the running job was sent %d times", n)
	}
}

// With S3 unreachable, outputs land in the local spool and /view serves
// them from there.
func TestS3DownSpoolsOutputs(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	s3[0] = fmt.Sprintf("127.0.0.1:%d", freePort(t)) // nothing listens
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	a := startCaddy(t, sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), ""))
	tab := a.openBrowser("alice", "", true)
	pa := a.queue("alice", tab.SID, samplerWorkflow("sp", 1))
	frames := tab.untilJobEnd(pa.PromptID, 30*time.Second)
	ref := outputRef(t, frames, "3")
	want, _ := gpu.OutputFile("output", "", ref["filename"].(string))
	if st, got, _ := a.do("alice", "GET", "/api/view?"+viewQuery(ref), nil); st != 200 || !bytes.Equal(got, want) {
		t.Fatalf("/view from the spool: %d", st)
	}
}

// A retried POST /prompt with the same client-supplied prompt_id — to the
// same replica or another — runs once.
func TestRetriedPromptRunsOnce(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 20 * time.Millisecond})
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	a := startCaddy(t, cf)
	b := startReplica(t, cf)
	tab := a.openBrowser("alice", "", true)
	id := uuid.NewString()
	body := map[string]any{"prompt": samplerWorkflow("once", 2), "client_id": tab.SID, "prompt_id": id}
	var wg sync.WaitGroup
	answers := make([]string, 6)
	for i := range answers {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			g := a
			if i%2 == 1 {
				g = &b.gateway
			}
			st, rb, _ := g.do("alice", "POST", "/api/prompt", body)
			answers[i] = fmt.Sprintf("%d %s", st, rb)
		}(i)
	}
	wg.Wait()
	for _, ans := range answers {
		if !strings.HasPrefix(ans, "200 ") || !strings.Contains(ans, id) {
			t.Fatalf("retried prompt answered %q", ans)
		}
	}
	tab.untilJobEnd(id, 30*time.Second)
	n := 0
	for _, p := range gpu.Prompts() {
		if p.PromptID == id {
			n++
		}
	}
	if n != 1 {
		t.Fatalf("prompt ran %d times", n)
	}
	// Another user cannot take that id.
	if st, _, _ := a.do("bob", "POST", "/api/prompt", body); st != 400 {
		t.Fatalf("bob reusing alice's prompt_id: %d", st)
	}
}

// serve redirect: /view answers 302 to a presigned URL that serves the
// bytes; transformations are still served by the gateway.
func TestS3RedirectMode(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	cf := strings.Replace(sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), ""), "spool {DATA}/spool", "spool {DATA}/spool\n\t\t\tserve redirect 2m", 1)
	a := startCaddy(t, cf)
	tab := a.openBrowser("alice", "", true)
	pa := a.queue("alice", tab.SID, samplerWorkflow("redir", 1))
	ref := outputRef(t, tab.untilJobEnd(pa.PromptID, 30*time.Second), "3")
	want, _ := gpu.OutputFile("output", "", ref["filename"].(string))
	client := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	req, _ := http.NewRequest("GET", a.Base+"/api/view?"+viewQuery(ref), nil)
	req.Header.Set("X-User", "alice")
	resp, err := client.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc := resp.Header.Get("Location")
	if resp.StatusCode != 302 || !strings.Contains(loc, "X-Amz-Signature") {
		t.Fatalf("redirect mode: %d %q", resp.StatusCode, loc)
	}
	resp, err = http.Get(loc)
	if err != nil {
		t.Fatal(err)
	}
	got, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !bytes.Equal(got, want) {
		t.Fatalf("presigned GET: %d, %d bytes", resp.StatusCode, len(got))
	}
	if st, _, hdr := a.do("alice", "GET", "/api/view?"+viewQuery(ref)+"&channel=rgb", nil); st != 200 || hdr.Get("Content-Type") != "image/png" {
		t.Fatalf("channel=rgb in redirect mode: %d", st)
	}
	if st, _, _ := a.do("bob", "GET", "/api/view?"+viewQuery(ref), nil); st != 404 {
		t.Fatalf("bob in redirect mode: %d", st)
	}
}

// Caddy stops mid-job and starts again (a deploy): queued and finished jobs
// are still listed, and the job that was running is followed again and
// delivers its outputs.
func TestRestartMidJobKeepsJobs(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 60 * time.Millisecond})
	prefix := testPrefix()
	cf := sharedCaddyfile(prefix, valkeyAddr, s3, home.URL(), gpu.URL(), "")
	first := startReplica(t, cf)
	tab := first.openBrowser("alice", "tab-restart", true)
	done := first.queue("alice", tab.SID, samplerWorkflow("done", 1))
	tab.untilJobEnd(done.PromptID, 30*time.Second)
	running := first.queue("alice", tab.SID, samplerWorkflow("running", 12))
	waiting := first.queue("alice", tab.SID, samplerWorkflow("waiting", 1))
	tab.waitType("progress", 10*time.Second)
	// A graceful stop (SIGINT), as a deploy does.
	_ = first.cmd.Process.Signal(os.Interrupt)
	_ = first.cmd.Wait()

	second := startCaddy(t, cf)
	var page jobsPage
	second.getJSON("alice", "/api/jobs", &page)
	for _, id := range []string{done.PromptID, running.PromptID, waiting.PromptID} {
		if findJob(page.Jobs, id) == nil {
			t.Fatalf("job %s forgotten by the restart: %v", id, page.Jobs)
		}
	}
	again := second.openBrowser("alice", "tab-restart", true)
	frames := again.untilJobEnd(running.PromptID, 60*time.Second)
	if indexOf(frames, "execution_success") < 0 || indexOf(frames, "executed") < 0 {
		t.Fatalf("running job after restart: %v", types(frames))
	}
	ref := outputRef(t, frames, "3")
	want, _ := gpu.OutputFile("output", "", ref["filename"].(string))
	if st, got, _ := second.do("alice", "GET", "/api/view?"+viewQuery(ref), nil); st != 200 || !bytes.Equal(got, want) {
		t.Fatalf("output after restart: %d", st)
	}
	frames = again.untilJobEnd(waiting.PromptID, 60*time.Second)
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("waiting job after restart: %v", types(frames))
	}
}

// Gateways sharing a store share each endpoint's max_jobs: two replicas
// submitting at once never put two jobs on a max_jobs 1 GPU.
func TestReplicasShareEndpointSlots(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 40 * time.Millisecond})
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	a := startCaddy(t, cf)
	b := startReplica(t, cf)
	tab := a.openBrowser("alice", "tab-slots", true)
	t.Cleanup(func() {
		if t.Failed() {
			var page jobsPage
			a.getJSON("alice", "/api/jobs", &page)
			for _, j := range page.Jobs {
				t.Logf("job %v %v upstream-prompts=%d", j["id"], j["status"], len(gpu.Prompts()))
			}
		}
	})

	stop := make(chan struct{})
	maxOnGPU := 0
	var watch sync.WaitGroup
	watch.Add(1)
	go func() {
		defer watch.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			resp, err := http.Get(gpu.URL() + "/queue")
			if err == nil {
				var q struct {
					Running []any `json:"queue_running"`
					Pending []any `json:"queue_pending"`
				}
				_ = json.NewDecoder(resp.Body).Decode(&q)
				resp.Body.Close()
				maxOnGPU = max(maxOnGPU, len(q.Running)+len(q.Pending))
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	var ids [2]string
	var wg sync.WaitGroup
	for i, g := range []*gateway{a, &b.gateway} {
		wg.Add(1)
		go func(i int, g *gateway) {
			defer wg.Done()
			ids[i] = g.queue("alice", tab.SID, samplerWorkflow(fmt.Sprintf("slot%d", i), 8)).PromptID
		}(i, g)
	}
	wg.Wait()
	// Either job may finish first: collect both ends.
	succeeded, ended := map[string]bool{}, map[string]bool{}
	deadline := time.Now().Add(60 * time.Second)
	for len(ended) < len(ids) {
		f := tab.next(time.Until(deadline))
		switch pid := f.str("prompt_id"); {
		case f.Type == "execution_success":
			succeeded[pid] = true
		case f.Type == "executing" && f.Data["node"] == nil && pid != "":
			ended[pid] = true
		}
	}
	for _, id := range ids {
		if !succeeded[id] {
			t.Fatalf("job %s did not succeed", id)
		}
	}
	close(stop)
	watch.Wait()
	if maxOnGPU > 1 {
		t.Fatalf("%d jobs were on the max_jobs 1 GPU at once", maxOnGPU)
	}
}

// Replicas share one fair queue: alice's batch came in through replica A,
// bob's and carol's prompts through replica B, yet bob and carol run right
// after alice's current job — not when A's own queue runs dry. max_queued
// and the queue positions count every replica's jobs.
func TestReplicasShareOneFairQueue(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 40 * time.Millisecond})
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	cf = strings.Replace(cf, "pool gpu {", "pool gpu {\n\t\t\tmax_queued 4", 1)
	a := startCaddy(t, cf)
	b := startReplica(t, cf)
	alice := a.openBrowser("alice", "", true)
	bob := b.openBrowser("bob", "", true)
	carol := b.openBrowser("carol", "", true)

	var ids []string
	for i := 0; i < 5; i++ { // one runs, four wait
		ids = append(ids, a.queue("alice", alice.SID, samplerWorkflow("a", 8)).PromptID)
	}
	if st, body, _ := b.do("alice", "POST", "/api/prompt", map[string]any{"prompt": samplerWorkflow("a", 1), "client_id": alice.SID}); st != 429 {
		t.Fatalf("alice's sixth prompt, through the other replica: %d %s (want 429: max_queued counts every replica)", st, body)
	}
	bj := b.queue("bob", bob.SID, samplerWorkflow("b", 1)).PromptID
	cj := b.queue("carol", carol.SID, samplerWorkflow("c", 1)).PromptID

	var page jobsPage
	b.getJSON("carol", "/api/jobs?status=pending", &page)
	if j := findJob(page.Jobs, cj); j == nil || j["queue_position"] != float64(2) {
		t.Fatalf("carol's waiting job (bob's is first): %v", page.Jobs)
	}
	a.getJSON("alice", "/api/jobs?status=pending", &page)
	if j := findJob(page.Jobs, ids[1]); j == nil || j["queue_position"] != float64(3) {
		t.Fatalf("alice's second job, behind bob and carol: %v", page.Jobs)
	}

	bob.untilJobEnd(bj, 30*time.Second)
	carol.untilJobEnd(cj, 30*time.Second)
	alice.untilJobEnd(ids[4], 30*time.Second)
	var order []string
	for _, p := range gpu.Prompts() {
		order = append(order, p.PromptID)
	}
	want := []string{ids[0], bj, cj, ids[1], ids[2], ids[3], ids[4]}
	if strings.Join(order, ",") != strings.Join(want, ",") {
		t.Fatalf("GPU order\n%v\nwant\n%v (bob and carol right after alice's first)", order, want)
	}
}

// A job waiting in the shared queue is cancelled through the other
// replica: it leaves the queue (the next one moves up and runs), it never
// reaches the GPU, and it is listed as cancelled.
func TestCancelWaitingJobThroughOtherReplica(t *testing.T) {
	valkeyAddr, s3 := sharedEnv(t)
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 40 * time.Millisecond})
	cf := sharedCaddyfile(testPrefix(), valkeyAddr, s3, home.URL(), gpu.URL(), "")
	a := startCaddy(t, cf)
	b := startReplica(t, cf)
	tab := a.openBrowser("alice", "", true)
	running := a.queue("alice", tab.SID, samplerWorkflow("run", 8))
	tab.waitType("execution_start", 10*time.Second)
	doomed := a.queue("alice", tab.SID, samplerWorkflow("doomed", 1))
	next := a.queue("alice", tab.SID, samplerWorkflow("next", 1))

	var page jobsPage
	b.getJSON("alice", "/api/jobs?status=pending", &page)
	if j := findJob(page.Jobs, next.PromptID); j == nil || j["queue_position"] != float64(2) {
		t.Fatalf("before the cancel: %v", page.Jobs)
	}
	if st, _, _ := b.do("alice", "POST", "/api/jobs/"+doomed.PromptID+"/cancel", nil); st != 200 {
		t.Fatalf("cancel through replica B: %d", st)
	}
	b.waitStatus("alice", doomed.PromptID, "cancelled", 10*time.Second)
	b.getJSON("alice", "/api/jobs?status=pending", &page)
	if j := findJob(page.Jobs, next.PromptID); j == nil || j["queue_position"] != float64(1) {
		t.Fatalf("after the cancel: %v", page.Jobs)
	}
	tab.untilJobEnd(next.PromptID, 30*time.Second)
	for _, p := range gpu.Prompts() {
		if p.PromptID == doomed.PromptID {
			t.Fatal("the cancelled job reached the GPU")
		}
	}
	if n := len(gpu.Prompts()); n != 2 {
		t.Fatalf("%d prompts reached the GPU, want 2 (%s and %s)", n, running.PromptID, next.PromptID)
	}
}
