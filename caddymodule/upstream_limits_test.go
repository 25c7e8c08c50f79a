package caddymodule_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/dispatch"
	"github.com/comfyume/comfyume/worker"
)

// A GPU server that sends an oversized JSON event and an oversized preview
// in the middle of a job: both are skipped (the browser never gets them),
// and the job goes on to execution_success with its output served.
func TestOversizedUpstreamFramesAreSkipped(t *testing.T) {
	t.Setenv("COMFYUME_TEST_TOKEN", "s3cret")
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 50 * time.Millisecond})
	const maxBinary, maxText = 2 << 20, 512 << 10
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL(), ""), "outputs disk {DATA}",
		"outputs disk {DATA}\n\t\tmax_event_size 2MiB 512KiB", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)

	a := g.queue("alice", b.SID, samplerWorkflow("big", 20))
	b.waitType("progress", 30*time.Second) // the sampler runs

	pad := strings.Repeat("x", maxText)
	gpu.SendRaw(false, []byte(`{"type":"progress","data":{"value":1,"max":20,"prompt_id":"`+a.PromptID+`","node":"2","pad":"`+pad+`"}}`))
	md := `{"node_id":"2","prompt_id":"` + a.PromptID + `","display_node_id":"2","parent_node_id":null,"real_node_id":"2","image_type":"image/jpeg"}`
	preview := binary.BigEndian.AppendUint32(nil, 4)
	preview = binary.BigEndian.AppendUint32(preview, uint32(len(md)))
	preview = append(append(preview, md...), bytes.Repeat([]byte{0xff}, maxBinary)...)
	gpu.SendRaw(true, preview)

	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	seq := types(frames)
	for _, f := range frames {
		if f.text && len(f.data) > maxText || !f.text && len(f.data) > maxBinary {
			t.Fatalf("the browser got a %d-byte frame over the limit (%q…)", len(f.data), f.data[:40])
		}
	}
	if indexOf(frames, "execution_success") < 0 {
		t.Fatalf("the job did not succeed: %v", seq)
	}
	ref := outputRef(t, frames, "3")
	st, body, _ := g.do("alice", "GET", "/api/view?"+viewQuery(ref), nil)
	if st != 200 || !bytes.HasPrefix(body, []byte("\x89PNG")) {
		t.Fatalf("GET /api/view of the output: %d, %d bytes", st, len(body))
	}
}

// A GPU server that floods a job with lifecycle events while the gateway
// is still storing the job's output cannot make the gateway hold more
// than twice max_job_queue for it: the job ends with an execution_error
// that says why, the browser is not handed the flood, and the next job
// runs.
func TestLifecycleFloodIsBoundedByMaxJobQueue(t *testing.T) {
	t.Setenv("COMFYUME_TEST_TOKEN", "s3cret")
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu", StepDelay: 20 * time.Millisecond})
	// The GPU's /view answers only once the flood is sent: the job's
	// goroutine is busy capturing the output meanwhile.
	target, _ := url.Parse(gpu.URL())
	proxy := httputil.NewSingleHostReverseProxy(target)
	viewing, flooded := make(chan struct{}), make(chan struct{})
	var once sync.Once
	slow := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/view") {
			once.Do(func() { close(viewing) })
			<-flooded
		}
		proxy.ServeHTTP(w, r)
	}))
	defer slow.Close()
	cf := strings.Replace(poolCaddyfile(home.URL(), slow.URL, ""), "outputs disk {DATA}",
		"outputs disk {DATA}\n\t\tmax_job_queue 64KiB", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)

	a := g.queue("alice", b.SID, samplerWorkflow("flood", 3))
	select {
	case <-viewing:
	case <-time.After(30 * time.Second):
		t.Fatal("the gateway never fetched the output")
	}
	const n = 5000 // about 450 KiB of executing events, 7 times the bound
	for i := 0; i < n; i++ {
		gpu.SendRaw(false, []byte(fmt.Sprintf(`{"type":"executing","data":{"node":"%d","display_node":"%d","prompt_id":%q}}`, 1000+i, 1000+i, a.PromptID)))
	}
	close(flooded)
	frames := b.untilJobEnd(a.PromptID, 60*time.Second)
	if msg := exceptionMessage(frames); !strings.Contains(msg, "more than 128 KiB of events") {
		t.Fatalf("the job ended with %v %q", types(frames), msg)
	}
	if executing := strings.Count(strings.Join(types(frames), " "), "executing"); executing > n/4 {
		t.Fatalf("the browser was handed %d executing events of the flood", executing)
	}
	c := g.queue("alice", b.SID, samplerWorkflow("after", 2))
	if frames := b.untilJobEnd(c.PromptID, 60*time.Second); indexOf(frames, "execution_success") < 0 {
		t.Fatalf("the next job: %v %q", types(frames), exceptionMessage(frames))
	}
}

// A GPU server whose output file does not end is read only up to
// max_output_size: the gateway stops reading it, keeps nothing of it, and
// the job still ends. (The gateway copied whatever the server sent into
// the outputs store, retrying for up to 3×5 minutes: one server could
// fill the disk everyone's outputs share.)
func TestEndlessOutputIsCut(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := newScriptedGPU(t)
	var sent atomic.Int64
	chunk := bytes.Repeat([]byte{0x89}, 64<<10)
	gpu.view = func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		for sent.Load() < 64<<20 { // "endless" within what a test may cost
			n, err := w.Write(chunk)
			sent.Add(int64(n))
			if err != nil {
				return
			}
		}
	}
	dir := t.TempDir()
	cf := strings.Replace(poolCaddyfile(home.URL(), gpu.URL, ""), "outputs disk {DATA}",
		"outputs disk "+dir+"\n\t\tmax_output_size 1MiB", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("s", 1))
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	if indexOf(frames, "execution_success") < 0 && indexOf(frames, "execution_error") < 0 {
		t.Fatalf("the job did not end: %v", types(frames))
	}
	if n := sent.Load(); n > 32<<20 {
		t.Fatalf("the gateway read %d MiB of an output, with max_output_size 1MiB", n>>20)
	}
	var stored int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				stored += fi.Size()
			}
		}
		return nil
	})
	if stored > 1<<20 {
		t.Fatalf("%d bytes stored for the job, with max_output_size 1MiB", stored)
	}
}

// On a worker endpoint, whose outputs come in the job's stream, an output
// past max_output_size ends the job with an execution_error that says why.
func TestWorkerOutputPastBoundEndsJob(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "gpu"})
	ws := worker.NewServer(gpu.URL(), worker.Options{Heartbeat: time.Second})
	mux := http.NewServeMux()
	mux.Handle(dispatch.WorkerPath, ws)
	mux.Handle("/", gpu.Handler())
	w := httptest.NewServer(mux)
	defer w.Close()
	cf := strings.Replace(poolCaddyfile(home.URL(), w.URL, ""), "max_jobs 1", "max_jobs 1\n\t\t\t\ttransport worker", 1)
	cf = strings.Replace(cf, "outputs disk {DATA}", "outputs disk {DATA}\n\t\tmax_output_size 100B", 1)
	g := startCaddy(t, cf)
	b := g.openBrowser("alice", "", true)
	a := g.queue("alice", b.SID, samplerWorkflow("bound", 1))
	frames := b.untilJobEnd(a.PromptID, 30*time.Second)
	i := indexOf(frames, "execution_error")
	if i < 0 {
		t.Fatalf("the job did not fail: %v", types(frames))
	}
	if msg := frames[i].str("exception_message"); !strings.Contains(msg, "larger than the gateway keeps") {
		t.Fatalf("execution_error %q does not say the outputs are too large", msg)
	}
}

// A GPU server that trickles an output (a byte now and then, within every
// read timeout) does not hold a job the user cancelled: capturing that
// output is let go, the job ends for the browser at once, and the server's
// /view request is closed.
func TestCancelLetsGoOfATricklingOutput(t *testing.T) {
	home := comfytest.Start(t, comfytest.Options{Version: "2026", Name: "home"})
	gpu := newScriptedGPU(t)
	capturing := make(chan struct{}, 1)
	let := make(chan struct{})
	gpu.view = func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "image/png")
		select {
		case capturing <- struct{}{}:
		default:
		}
		for {
			select {
			case <-r.Context().Done():
				close(let)
				return
			case <-time.After(50 * time.Millisecond):
			}
			if _, err := w.Write([]byte{0x89}); err != nil {
				return
			}
			w.(http.Flusher).Flush()
		}
	}
	g, b, a := aliceQueues(t, poolCaddyfile(home.URL(), gpu.URL, ""), "s", 1)
	select {
	case <-capturing:
	case <-time.After(10 * time.Second):
		t.Fatal("the output was never fetched")
	}
	if st, _, _ := g.do("alice", "POST", "/api/interrupt", map[string]any{"prompt_id": a.PromptID}); st != 200 {
		t.Fatalf("interrupt: %d", st)
	}
	frames := b.untilJobEnd(a.PromptID, 10*time.Second)
	if indexOf(frames, "execution_success") < 0 && indexOf(frames, "execution_error") < 0 && indexOf(frames, "execution_interrupted") < 0 {
		t.Fatalf("the job did not end: %v", types(frames))
	}
	select {
	case <-let:
	case <-time.After(10 * time.Second):
		t.Fatal("the gateway still reads the output of the cancelled job")
	}
}
