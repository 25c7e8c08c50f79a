package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"image/color"
	"io"
	"net/http"
	"net/http/httptest"
	"reflect"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/comfytest"
)

// progressLog records AsyncOptions.Progress calls.
type progressLog struct {
	mu       sync.Mutex
	statuses []string
	elapsed  []time.Duration
}

func (p *progressLog) add(s string, d time.Duration) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if n := len(p.statuses); n == 0 || p.statuses[n-1] != s {
		p.statuses = append(p.statuses, s)
	}
	p.elapsed = append(p.elapsed, d)
}

func TestAsyncEndToEnd(t *testing.T) {
	const version = "2026"
	srv := comfytest.Start(t, comfytest.Options{Version: version, StepDelay: time.Millisecond})
	w, ts := startWorker(t, srv.URL(), Options{Token: "s3cret", ChunkSize: 100})
	plat := comfytest.StartAsyncPlatformWith(t, comfytest.AsyncPlatformOptions{
		Backend: ts.URL, Deployment: "comfy-worker",
		QueueDelay: 40 * time.Millisecond, StoreDelay: 40 * time.Millisecond,
	})
	in := testPNG(t, color.NRGBA{R: 10, G: 200, B: 90, A: 255})
	pid := uuid.NewString()
	job := Job{
		PromptID:  pid,
		Prompt:    invertWorkflow("cat.png", "pinned"),
		ExtraData: json.RawMessage(`{"extra_pnginfo":{"workflow":{"id":"wf-1"}}}`),
		Files:     []InputFile{bytesFile("cat.png", in)},
	}
	var prog progressLog
	rec := newRecorder(t)
	// No status/result URLs: they come from the 202's StatusPath/ResultPath.
	c := &Client{URL: plat.DeploymentURL(), Header: http.Header{"Authorization": {"Bearer s3cret"}},
		Async: &AsyncOptions{Poll: 2 * time.Millisecond, Progress: prog.add}}
	if err := c.Run(context.Background(), job, rec); err != nil {
		t.Fatal(err)
	}
	if ids := plat.Submitted(); len(ids) != 1 || plat.Status(ids[0]) != "Completed" {
		t.Fatalf("submitted %v", ids)
	}

	// What reached the fake ComfyUI.
	ups := srv.Uploads()
	if len(ups) != 1 || ups[0].Name != "cat.png" || !bytes.Equal(ups[0].Data, in) {
		t.Fatalf("uploads %+v", ups)
	}
	prompts := srv.Prompts()
	if len(prompts) != 1 || prompts[0].PromptID != pid || prompts[0].ExtraData["extra_pnginfo"] == nil {
		t.Fatalf("prompts %+v", prompts)
	}

	// Progress: Queue, then Inference, then Completed; elapsed grows.
	prog.mu.Lock()
	statuses, elapsed := slices.Clone(prog.statuses), slices.Clone(prog.elapsed)
	prog.mu.Unlock()
	if iq, ii := slices.Index(statuses, "Queue"), slices.Index(statuses, "Inference"); iq < 0 || ii < iq ||
		statuses[len(statuses)-1] != "Completed" {
		t.Fatalf("progress statuses %v", statuses)
	}
	if !slices.IsSorted(elapsed) || elapsed[len(elapsed)-1] < 80*time.Millisecond {
		t.Fatalf("progress elapsed %v", elapsed)
	}

	// The same stream as streaming mode: accepted first, ComfyUI's order.
	if rec.log[0] != "accepted" || rec.promptID != pid {
		t.Fatalf("first %q, prompt id %q", rec.log[0], rec.promptID)
	}
	want := reference(t, version, "cat.png", in, invertWorkflow("cat.png", "pinned"))
	if got := rec.sequence(); !reflect.DeepEqual(got, want) {
		t.Fatalf("sequence\n got %v\nwant %v", got, want)
	}
	if last := rec.log[len(rec.log)-1]; last != "event:executing" {
		t.Fatalf("last %s", last)
	}
	for _, m := range rec.events {
		if c, _ := m.Common(); c.PromptID != pid {
			t.Fatalf("event %s with prompt_id %q", m.Encode(), c.PromptID)
		}
	}
	if len(rec.binaries) != 3 {
		t.Fatalf("%d previews", len(rec.binaries))
	}
	for _, b := range rec.binaries {
		p, err := comfy.ParsePreview(b)
		if err != nil {
			t.Fatal(err)
		}
		if p.Metadata == nil || p.Metadata.PromptID != pid || p.Metadata.NodeID != "2" {
			t.Fatalf("type-4 metadata %+v", p.Metadata)
		}
	}
	ref := comfy.FileRef{Filename: "pinned_00001_.png", Type: "output"}
	got, ok := rec.outputs[ref]
	orig, _ := srv.OutputFile("output", "", ref.Filename)
	if !ok || len(rec.outputs) != 1 || !bytes.Equal(got, orig) || len(got) <= 100 {
		t.Fatalf("outputs %d, %d bytes, ComfyUI has %d", len(rec.outputs), len(got), len(orig))
	}
	if rec.ctypes[ref] != "image/png" {
		t.Fatalf("content type %q", rec.ctypes[ref])
	}
	if iOut, iExec := indexOf(rec.log, "output:"+ref.Filename), indexOf(rec.log, "event:executed"); iOut < 0 || iExec < iOut {
		t.Fatalf("output at %d, executed at %d: %v", iOut, iExec, rec.log)
	}
	waitFor(t, "worker idle", func() bool { return w.Running() == 0 })

	// Explicit status/result URLs, and outputs read with Read.
	rec = newRecorder(t)
	rec.readAll = true
	job.PromptID = uuid.NewString()
	job.Prompt = invertWorkflow("dog.png", "second") // not cached: previews again
	job.Files = []InputFile{bytesFile("dog.png", in)}
	c.Async = &AsyncOptions{StatusURL: plat.StatusURL(), ResultURL: plat.ResultURL(), Poll: 2 * time.Millisecond}
	if err := c.Run(context.Background(), job, rec); err != nil {
		t.Fatal(err)
	}
	if rec.promptID != job.PromptID || len(rec.outputs) != 1 || len(rec.binaries) != 3 {
		t.Fatalf("second job: %q, %d outputs, %d previews", rec.promptID, len(rec.outputs), len(rec.binaries))
	}
}

func TestAsyncRejectedAndRefused(t *testing.T) {
	srv := comfytest.Start(t, comfytest.Options{Version: "2026"})
	_, ts := startWorker(t, srv.URL(), Options{})
	plat := comfytest.StartAsyncPlatform(t, ts.URL, "dep")
	c := &Client{URL: plat.DeploymentURL(), Async: &AsyncOptions{Poll: time.Millisecond}}

	// ComfyUI refuses the prompt: the stored stream carries rejected.
	rec := newRecorder(t)
	bad := json.RawMessage(`{"1":{"class_type":"NoSuchNode","inputs":{}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}`)
	var re *RejectedError
	if err := c.Run(context.Background(), Job{PromptID: uuid.NewString(), Prompt: bad}, rec); !errors.As(err, &re) || re.Status != 400 {
		t.Fatalf("rejected: %v", err)
	}
	if len(rec.log) != 0 {
		t.Fatalf("handler saw %v", rec.log)
	}

	// The worker's ComfyUI is down: the stored answer is its 503.
	_, down := startWorker(t, deadURL(t), Options{})
	plat2 := comfytest.StartAsyncPlatform(t, down.URL, "dep")
	c2 := &Client{URL: plat2.DeploymentURL(), Async: &AsyncOptions{Poll: time.Millisecond}}
	in := testPNG(t, color.NRGBA{R: 1, G: 2, B: 3, A: 255})
	job := Job{PromptID: uuid.NewString(), Prompt: invertWorkflow("a.png", "x"), Files: []InputFile{bytesFile("a.png", in)}}
	var na *NotAcceptedError
	if err := c2.Run(context.Background(), job, newRecorder(t)); !errors.As(err, &na) || na.Status != 503 {
		t.Fatalf("stored 503: %v", err)
	}
}

func TestAsyncPlatformIgnoresPrefer(t *testing.T) {
	srv := comfytest.Start(t, comfytest.Options{Version: "2026", StepDelay: time.Millisecond})
	_, ts := startWorker(t, srv.URL(), Options{})
	in := testPNG(t, color.NRGBA{R: 9, G: 9, B: 9, A: 255})
	job := Job{PromptID: uuid.NewString(), Prompt: invertWorkflow("a.png", "p"), Files: []InputFile{bytesFile("a.png", in)}}
	var prog progressLog
	rec := newRecorder(t)
	// The worker itself (and a streaming balancer) answers 200 at once.
	lb := roundRobin(t, ts.URL)
	c := &Client{URL: lb.URL, Async: &AsyncOptions{StatusURL: lb.URL + "/nope", ResultURL: lb.URL + "/nope",
		Poll: time.Millisecond, Progress: prog.add}}
	if err := c.Run(context.Background(), job, rec); err != nil {
		t.Fatal(err)
	}
	if rec.promptID != job.PromptID || len(rec.outputs) != 1 || len(rec.binaries) != 3 || len(prog.statuses) != 0 {
		t.Fatalf("%q, %d outputs, %d previews, progress %v", rec.promptID, len(rec.outputs), len(rec.binaries), prog.statuses)
	}
}

func TestAsyncNotAccepted(t *testing.T) {
	in := testPNG(t, color.NRGBA{R: 1, G: 2, B: 3, A: 255})
	job := Job{PromptID: uuid.NewString(), Prompt: invertWorkflow("a.png", "x"), Files: []InputFile{bytesFile("a.png", in)}}
	dead := deadURL(t)
	c := &Client{URL: dead + "/dep", Async: &AsyncOptions{StatusURL: dead + "/status/dep", ResultURL: dead + "/result/dep", Poll: time.Millisecond}}
	var na *NotAcceptedError
	if err := c.Run(context.Background(), job, newRecorder(t)); !errors.As(err, &na) {
		t.Fatalf("platform down: %v", err)
	}
	// The platform itself refuses the submission (no replica quota, ...).
	busy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		http.Error(w, "no capacity", http.StatusServiceUnavailable)
	}))
	t.Cleanup(busy.Close)
	c = &Client{URL: busy.URL, Async: &AsyncOptions{StatusURL: busy.URL, ResultURL: busy.URL, Poll: time.Millisecond}}
	if err := c.Run(context.Background(), job, newRecorder(t)); !errors.As(err, &na) || na.Status != 503 {
		t.Fatalf("submission 503: %v", err)
	}
	// The platform took it but could not reach a replica: its stored 502
	// is reported like the streaming mode's.
	plat := comfytest.StartAsyncPlatform(t, deadURL(t), "dep")
	c = &Client{URL: plat.DeploymentURL(), Async: &AsyncOptions{Poll: time.Millisecond}}
	if err := c.Run(context.Background(), job, newRecorder(t)); !errors.As(err, &na) || na.Status != 502 {
		t.Fatalf("stored 502: %v", err)
	}
}

func TestAsyncErrors(t *testing.T) {
	srv := comfytest.Start(t, comfytest.Options{Version: "2026", StepDelay: time.Millisecond})
	_, ts := startWorker(t, srv.URL(), Options{})
	job := Job{PromptID: uuid.NewString(), Prompt: invertWorkflow("a.png", "x"),
		Files: []InputFile{bytesFile("a.png", testPNG(t, color.NRGBA{A: 255}))}}

	var na *NotAcceptedError
	var we *WorkerError
	// Backends that are not workers: the stored result is no frame
	// stream, or a stream that ends early.
	for name, body := range map[string]func(w http.ResponseWriter){
		"text": func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", "text/plain")
			_, _ = w.Write([]byte("hello"))
		},
		"garbage": func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", ContentType)
			_, _ = w.Write([]byte("hello, world"))
		},
		"cut": func(w http.ResponseWriter) {
			w.Header().Set("Content-Type", ContentType)
			fw := NewWriter(w)
			_ = fw.WriteJSON(KindAccepted, AcceptedInfo{PromptID: job.PromptID, Number: 1})
			_ = fw.Write(KindEvent, []byte(`{"type":"execution_start","data":{"prompt_id":"x"}}`))
		},
		"empty": func(w http.ResponseWriter) { w.Header().Set("Content-Type", ContentType) },
	} {
		backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			body(w)
		}))
		t.Cleanup(backend.Close)
		plat := comfytest.StartAsyncPlatform(t, backend.URL, "dep")
		c := &Client{URL: plat.DeploymentURL(), Async: &AsyncOptions{Poll: time.Millisecond}}
		err := c.Run(context.Background(), job, newRecorder(t))
		if err == nil || errors.As(err, &na) || errors.As(err, &we) {
			t.Fatalf("%s: %v", name, err)
		}
		t.Logf("%s: %v", name, err)
	}

	// The status URL does not know the id: a fatal poll error.
	plat := comfytest.StartAsyncPlatform(t, ts.URL, "dep")
	other := comfytest.StartAsyncPlatform(t, ts.URL, "dep")
	c := &Client{URL: plat.DeploymentURL(), Async: &AsyncOptions{StatusURL: other.StatusURL(), ResultURL: other.ResultURL(), Poll: time.Millisecond}}
	if err := c.Run(context.Background(), job, newRecorder(t)); err == nil || errors.As(err, &na) || errors.As(err, &we) {
		t.Fatalf("unknown id: %v", err)
	} else {
		t.Logf("unknown id: %v", err)
	}

	// Cancelling while the job waits: the context's error, at once.
	slow := comfytest.StartAsyncPlatformWith(t, comfytest.AsyncPlatformOptions{Backend: ts.URL, Deployment: "dep", QueueDelay: time.Hour})
	ctx, cancel := context.WithCancel(context.Background())
	var prog progressLog
	c = &Client{URL: slow.DeploymentURL(), Async: &AsyncOptions{Poll: time.Millisecond, Progress: func(s string, d time.Duration) {
		prog.add(s, d)
		if s == "Queue" {
			cancel()
		}
	}}}
	if err := c.Run(ctx, job, newRecorder(t)); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancel: %v", err)
	}
}
