package worker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"image"
	"image/color"
	"image/png"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/uuid"
	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfy"
	"github.com/comfyume/comfyume/comfytest"
)

var versions = []string{"2026", "2024-12"}

func testPNG(t testing.TB, c color.NRGBA) []byte {
	t.Helper()
	img := image.NewNRGBA(image.Rect(0, 0, 24, 16))
	for i := 0; i < len(img.Pix); i += 4 {
		img.Pix[i], img.Pix[i+1], img.Pix[i+2], img.Pix[i+3] = c.R, c.G, c.B, 255
	}
	var b bytes.Buffer
	if err := png.Encode(&b, img); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// invertWorkflow: LoadImage(input) → FakeSampler (previews) → ImageInvert → SaveImage.
func invertWorkflow(input, prefix string) json.RawMessage {
	return json.RawMessage(fmt.Sprintf(`{
		"1": {"class_type": "LoadImage", "inputs": {"image": %q}},
		"2": {"class_type": "FakeSampler", "inputs": {"image": ["1", 0], "steps": 3}},
		"3": {"class_type": "ImageInvert", "inputs": {"image": ["2", 0]}},
		"4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0], "filename_prefix": %q}}
	}`, input, prefix))
}

func bytesFile(name string, data []byte) InputFile {
	return InputFile{
		Ref:  comfy.FileRef{Filename: name, Type: comfy.TypeInput},
		Open: func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(data)), nil },
	}
}

// recorder is a Handler that keeps everything, in order.
type recorder struct {
	t        testing.TB
	readAll  bool // read outputs with Read (io.ReadAll) rather than WriteTo
	onEvent  func(comfy.Message)
	onAccept func()

	mu       sync.Mutex
	log      []string // "accepted", "event:<type>", "<binary>", "output:<filename>"
	promptID string
	number   float64
	events   []comfy.Message
	binaries [][]byte
	outputs  map[comfy.FileRef][]byte
	ctypes   map[comfy.FileRef]string
}

func newRecorder(t testing.TB) *recorder {
	return &recorder{t: t, outputs: map[comfy.FileRef][]byte{}, ctypes: map[comfy.FileRef]string{}}
}

func (r *recorder) Accepted(id string, number float64) {
	r.mu.Lock()
	r.log = append(r.log, "accepted")
	r.promptID, r.number = id, number
	r.mu.Unlock()
	if r.onAccept != nil {
		r.onAccept()
	}
}

func (r *recorder) Event(frame []byte, _ comfy.Head) {
	m, err := comfy.ParseMessage(frame)
	if err != nil {
		r.t.Errorf("event %q: %v", frame, err)
	}
	r.mu.Lock()
	r.log = append(r.log, "event:"+m.Type)
	r.events = append(r.events, m)
	r.mu.Unlock()
	if r.onEvent != nil {
		r.onEvent(m)
	}
}

func (r *recorder) Binary(f []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, "<binary>")
	r.binaries = append(r.binaries, f)
}

func (r *recorder) Output(ref comfy.FileRef, ct string, body io.Reader) error {
	var data []byte
	var err error
	if r.readAll {
		data, err = io.ReadAll(body)
	} else {
		var b bytes.Buffer
		_, err = io.Copy(&b, body)
		data = b.Bytes()
	}
	if err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.log = append(r.log, "output:"+ref.Filename)
	r.outputs[ref] = data
	r.ctypes[ref] = ct
	return nil
}

// sequence is the recorded events and binaries, as "<type>" / "<binary>".
func (r *recorder) sequence() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, l := range r.log {
		if s, ok := strings.CutPrefix(l, "event:"); ok {
			out = append(out, s)
		} else if l == "<binary>" {
			out = append(out, l)
		}
	}
	return out
}

func startWorker(t testing.TB, comfyURL string, opts Options) (*Server, *httptest.Server) {
	t.Helper()
	w := NewServer(comfyURL, opts)
	ts := httptest.NewServer(w)
	t.Cleanup(ts.Close)
	return w, ts
}

// roundRobin is a load balancer that buffers nothing and sends each
// request to the next target in turn.
func roundRobin(t testing.TB, targets ...string) *httptest.Server {
	t.Helper()
	var urls []*url.URL
	for _, s := range targets {
		u, err := url.Parse(s)
		if err != nil {
			t.Fatal(err)
		}
		urls = append(urls, u)
	}
	var n atomic.Uint64
	rp := &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.SetURL(urls[(n.Add(1)-1)%uint64(len(urls))])
		},
		FlushInterval: -1,
		ErrorLog:      log.New(io.Discard, "", 0),
	}
	ts := httptest.NewServer(rp)
	t.Cleanup(ts.Close)
	return ts
}

// reference runs the prompt directly against a fresh fake ComfyUI of the
// same version, the way the worker does, and returns the frame types its
// socket saw (without status and feature_flags).
func reference(t *testing.T, version, input string, inputData []byte, prompt json.RawMessage) []string {
	t.Helper()
	srv := comfytest.Start(t, comfytest.Options{Version: version, StepDelay: time.Millisecond})
	srv.PutInput("", input, inputData)
	ws, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(srv.URL(), "http")+"/ws?clientId=ref", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ws.Close()
	_ = ws.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := ws.ReadMessage(); err != nil { // status greeting
		t.Fatal(err)
	}
	_ = ws.WriteMessage(websocket.TextMessage, []byte(`{"type":"feature_flags","data":{"supports_preview_metadata":true}}`))
	if version == "2026" {
		if _, b, err := ws.ReadMessage(); err != nil || !isType(b, "feature_flags") {
			t.Fatalf("feature_flags reply %s %v", b, err)
		}
	}
	body, _ := json.Marshal(map[string]any{"prompt": prompt, "client_id": "ref"})
	resp, err := http.Post(srv.URL()+"/prompt", "application/json", bytes.NewReader(body))
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("reference prompt: %v %v", err, resp)
	}
	var pr struct {
		PromptID string `json:"prompt_id"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&pr)
	resp.Body.Close()
	var seq []string
	for {
		mt, b, err := ws.ReadMessage()
		if err != nil {
			t.Fatal(err)
		}
		if mt == websocket.BinaryMessage {
			seq = append(seq, "<binary>")
			continue
		}
		m, _ := comfy.ParseMessage(b)
		if m.Type == comfy.MsgStatus || m.Type == comfy.MsgFeatureFlags {
			continue
		}
		seq = append(seq, m.Type)
		var e comfy.ExecutingData
		_ = json.Unmarshal(m.Data, &e)
		if m.Type == comfy.MsgExecuting && e.Node == nil && e.PromptID == pr.PromptID {
			return seq
		}
	}
}

func TestEndToEnd(t *testing.T) {
	for _, version := range versions {
		t.Run(version, func(t *testing.T) {
			srv := comfytest.Start(t, comfytest.Options{Version: version, StepDelay: time.Millisecond})
			w, ts := startWorker(t, srv.URL(), Options{Token: "s3cret", ChunkSize: 100})
			in := testPNG(t, color.NRGBA{R: 10, G: 200, B: 90, A: 255})
			pid := uuid.NewString()
			job := Job{
				PromptID:  pid,
				Prompt:    invertWorkflow("cat.png", "pinned"),
				ExtraData: json.RawMessage(`{"extra_pnginfo":{"workflow":{"id":"wf-1"}}}`),
				Files:     []InputFile{bytesFile("cat.png", in)},
			}

			// Without the token: 401, and nothing reached ComfyUI.
			var we *WorkerError
			err := (&Client{URL: ts.URL}).Run(context.Background(), job, newRecorder(t))
			if !errors.As(err, &we) || we.Status != 401 {
				t.Fatalf("without token: %v", err)
			}

			rec := newRecorder(t)
			c := &Client{URL: ts.URL, Header: http.Header{"Authorization": {"Bearer s3cret"}}}
			if err := c.Run(context.Background(), job, rec); err != nil {
				t.Fatal(err)
			}

			// What reached the fake ComfyUI.
			ups := srv.Uploads()
			if len(ups) != 1 || ups[0].Name != "cat.png" || ups[0].Type != "input" || !bytes.Equal(ups[0].Data, in) {
				t.Fatalf("uploads %+v", ups)
			}
			prompts := srv.Prompts()
			if len(prompts) != 1 || prompts[0].ClientID == "" {
				t.Fatalf("prompts %+v", prompts)
			}
			local := prompts[0].PromptID
			if version == "2026" && local != pid {
				t.Fatalf("2026 must run the gateway's prompt_id: %s", local)
			}
			if version == "2024-12" && local == pid {
				t.Fatalf("2024-12 makes its own prompt ids")
			}
			if ed := prompts[0].ExtraData; ed["extra_pnginfo"] == nil {
				t.Fatalf("extra_data lost: %v", ed)
			}

			// The job's stream: accepted first, ComfyUI's order, done.
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
				switch version {
				case "2026":
					if p.Metadata == nil || p.Metadata.PromptID != pid || p.Metadata.NodeID != "2" {
						t.Fatalf("type-4 metadata %+v", p.Metadata)
					}
				default:
					if p.Metadata != nil {
						t.Fatalf("2024-12 sends type-1 previews")
					}
				}
			}

			// The output: delivered before the executed event, byte for byte.
			ref := comfy.FileRef{Filename: "pinned_00001_.png", Subfolder: "", Type: "output"}
			got, ok := rec.outputs[ref]
			if !ok || len(rec.outputs) != 1 {
				t.Fatalf("outputs %v", rec.outputs)
			}
			orig, _ := srv.OutputFile("output", "", ref.Filename)
			if !bytes.Equal(got, orig) || len(got) <= 100 {
				t.Fatalf("output %d bytes, ComfyUI has %d", len(got), len(orig))
			}
			if rec.ctypes[ref] != "image/png" {
				t.Fatalf("content type %q", rec.ctypes[ref])
			}
			iOut, iExec := indexOf(rec.log, "output:"+ref.Filename), indexOf(rec.log, "event:executed")
			if iOut < 0 || iExec < iOut {
				t.Fatalf("output at %d, executed at %d: %v", iOut, iExec, rec.log)
			}
			img, err := png.Decode(bytes.NewReader(got))
			if err != nil {
				t.Fatal(err)
			}
			if r, g, b, _ := img.At(3, 3).RGBA(); r>>8 != 245 || g>>8 != 55 || b>>8 != 165 {
				t.Fatalf("output is not the inverted input: %d %d %d", r>>8, g>>8, b>>8)
			}
			waitFor(t, "worker idle", func() bool { return w.Running() == 0 })
		})
	}
}

func indexOf(list []string, s string) int {
	for i, x := range list {
		if x == s {
			return i
		}
	}
	return -1
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestRejectedRelaysComfyUIBody(t *testing.T) {
	bad := json.RawMessage(`{"1":{"class_type":"NoSuchNode","inputs":{}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0]}}}`)
	for _, version := range versions {
		t.Run(version, func(t *testing.T) {
			srv := comfytest.Start(t, comfytest.Options{Version: version})
			_, ts := startWorker(t, srv.URL(), Options{})
			rec := newRecorder(t)
			err := (&Client{URL: ts.URL}).Run(context.Background(), Job{PromptID: uuid.NewString(), Prompt: bad}, rec)
			var re *RejectedError
			if !errors.As(err, &re) || re.Status != 400 {
				t.Fatalf("got %v", err)
			}
			// The same prompt straight to a ComfyUI of the same version.
			direct := comfytest.Start(t, comfytest.Options{Version: version})
			body, _ := json.Marshal(map[string]any{"prompt": bad, "client_id": "x", "prompt_id": uuid.NewString()})
			resp, err := http.Post(direct.URL()+"/prompt", "application/json", bytes.NewReader(body))
			if err != nil {
				t.Fatal(err)
			}
			want, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !bytes.Equal(re.Body, want) {
				t.Fatalf("body\n got %s\nwant %s", re.Body, want)
			}
			if !strings.Contains(string(re.Body), "NoSuchNode") || len(rec.log) != 0 {
				t.Fatalf("body %s, handler saw %v", re.Body, rec.log)
			}
		})
	}
}

// deadURL is an address nothing listens on.
func deadURL(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	return "http://" + addr
}

func TestNotAccepted(t *testing.T) {
	in := testPNG(t, color.NRGBA{R: 1, G: 2, B: 3, A: 255})
	job := Job{PromptID: uuid.NewString(), Prompt: invertWorkflow("a.png", "x"), Files: []InputFile{bytesFile("a.png", in)}}

	// The worker's ComfyUI is down.
	_, ts := startWorker(t, deadURL(t), Options{})
	var na *NotAcceptedError
	if err := (&Client{URL: ts.URL}).Run(context.Background(), job, newRecorder(t)); !errors.As(err, &na) || na.Status != 503 {
		t.Fatalf("ComfyUI down: %v", err)
	}
	// A large input streaming in while the worker refuses.
	bigJob := job
	bigJob.Files = []InputFile{bytesFile("a.png", bytes.Repeat([]byte{7}, 24<<20))}
	if err := (&Client{URL: ts.URL}).Run(context.Background(), bigJob, newRecorder(t)); !errors.As(err, &na) {
		t.Fatalf("ComfyUI down, large input: %v", err)
	}
	resp, err := http.Get(ts.URL)
	if err != nil {
		t.Fatal(err)
	}
	var st Status
	_ = json.NewDecoder(resp.Body).Decode(&st)
	resp.Body.Close()
	if resp.StatusCode != 503 || st.Ready {
		t.Fatalf("status %d %+v", resp.StatusCode, st)
	}

	// The worker itself is unreachable.
	if err := (&Client{URL: deadURL(t)}).Run(context.Background(), job, newRecorder(t)); !errors.As(err, &na) {
		t.Fatalf("worker down: %v", err)
	}
	// A balancer in front of dead workers answers 502.
	lb := roundRobin(t, deadURL(t))
	if err := (&Client{URL: lb.URL}).Run(context.Background(), job, newRecorder(t)); !errors.As(err, &na) || na.Status != 502 {
		t.Fatalf("balancer 502: %v", err)
	}
}

func TestStatus(t *testing.T) {
	srv := comfytest.Start(t, comfytest.Options{Version: "2026"})
	_, ts := startWorker(t, srv.URL(), Options{Token: "t"})
	resp, err := http.Get(ts.URL + "/anything")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != `{"ready":true,"running":0}` {
		t.Fatalf("%d %s", resp.StatusCode, b)
	}
	resp, _ = http.Post(ts.URL, "application/json", strings.NewReader("{}"))
	resp.Body.Close()
	if resp.StatusCode != 401 {
		t.Fatalf("POST without token: %d", resp.StatusCode)
	}
	// The token in the Authorization header, or in its own header next to
	// a platform's key; a wrong one in its own header is not rescued by
	// the Authorization header.
	for _, c := range []struct {
		name string
		hdr  map[string]string
		want int
	}{
		{"bearer", map[string]string{"Authorization": "Bearer t"}, 415},
		{"own header", map[string]string{"Authorization": "Bearer platform-key", TokenHeader: "t"}, 415},
		{"wrong own header", map[string]string{"Authorization": "Bearer t", TokenHeader: "nope"}, 401},
		{"wrong bearer", map[string]string{"Authorization": "Bearer platform-key"}, 401},
	} {
		req, _ := http.NewRequest(http.MethodPost, ts.URL, strings.NewReader("{}"))
		for k, v := range c.hdr {
			req.Header.Set(k, v)
		}
		req.Header.Set("Content-Type", "application/json")
		resp, _ = http.DefaultClient.Do(req)
		resp.Body.Close()
		if resp.StatusCode != c.want {
			t.Fatalf("%s: POST with another content type: %d, want %d", c.name, resp.StatusCode, c.want)
		}
	}
}

// historyStatus returns the status messages of a prompt's history entry
// on the fake ComfyUI (nil if it has none yet).
func historyStatus(t testing.TB, srv *comfytest.Server, id string) []string {
	t.Helper()
	resp, err := http.Get(srv.URL() + "/history/" + id)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var h map[string]struct {
		Status struct {
			Messages [][]json.RawMessage `json:"messages"`
		} `json:"status"`
	}
	_ = json.NewDecoder(resp.Body).Decode(&h)
	e, ok := h[id]
	if !ok {
		return nil
	}
	out := []string{}
	for _, m := range e.Status.Messages {
		var s string
		_ = json.Unmarshal(m[0], &s)
		out = append(out, s)
	}
	return out
}

type queueState struct {
	Running [][]json.RawMessage `json:"queue_running"`
	Pending [][]json.RawMessage `json:"queue_pending"`
}

func queueOf(t testing.TB, srv *comfytest.Server) queueState {
	t.Helper()
	resp, err := http.Get(srv.URL() + "/queue")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var q queueState
	_ = json.NewDecoder(resp.Body).Decode(&q)
	return q
}

func TestCancelInterruptsLocalPrompt(t *testing.T) {
	for _, version := range versions {
		for _, viaLB := range []bool{false, true} {
			name := version + "/direct"
			if viaLB {
				name = version + "/balancer"
			}
			t.Run(name, func(t *testing.T) {
				srv := comfytest.Start(t, comfytest.Options{Version: version, StepDelay: time.Millisecond})
				w, ts := startWorker(t, srv.URL(), Options{})
				target := ts.URL
				if viaLB {
					target = roundRobin(t, ts.URL).URL
				}
				srv.FailNext("hang") // the first node hangs until interrupted
				ctx, cancel := context.WithCancel(context.Background())
				defer cancel()
				rec := newRecorder(t)
				rec.onEvent = func(m comfy.Message) {
					var e comfy.ExecutingData
					if m.Type == comfy.MsgExecuting && json.Unmarshal(m.Data, &e) == nil && e.Node != nil {
						cancel() // the gateway gives up mid-job
					}
				}
				in := testPNG(t, color.NRGBA{R: 5, A: 255})
				job := Job{PromptID: uuid.NewString(), Prompt: invertWorkflow("c.png", "c"), Files: []InputFile{bytesFile("c.png", in)}}
				err := (&Client{URL: target}).Run(ctx, job, rec)
				if !errors.Is(err, context.Canceled) {
					t.Fatalf("Run: %v", err)
				}
				local := srv.Prompts()[0].PromptID
				waitFor(t, "the local prompt to be interrupted", func() bool {
					msgs := historyStatus(t, srv, local)
					return len(msgs) > 0 && msgs[len(msgs)-1] == comfy.MsgExecutionInterrupted
				})
				if q := queueOf(t, srv); len(q.Running)+len(q.Pending) != 0 {
					t.Fatalf("queue %+v", q)
				}
				waitFor(t, "worker idle", func() bool { return w.Running() == 0 })
			})
		}
	}
}

// A job cancelled while it waits behind another leaves the queue; the
// running one is left alone.
func TestCancelPendingPrompt(t *testing.T) {
	for _, version := range versions {
		t.Run(version, func(t *testing.T) {
			srv := comfytest.Start(t, comfytest.Options{Version: version, StepDelay: time.Millisecond})
			_, ts := startWorker(t, srv.URL(), Options{})
			c := &Client{URL: ts.URL}
			srv.FailNext("hang")
			ctxA, cancelA := context.WithCancel(context.Background())
			defer cancelA()
			started := make(chan struct{})
			var once sync.Once
			recA := newRecorder(t)
			recA.onEvent = func(m comfy.Message) {
				if m.Type == comfy.MsgExecuting {
					once.Do(func() { close(started) })
				}
			}
			jobA := Job{PromptID: uuid.NewString(), Prompt: json.RawMessage(`{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"a"}}}`)}
			errA := make(chan error, 1)
			go func() { errA <- c.Run(ctxA, jobA, recA) }()
			<-started

			ctxB, cancelB := context.WithCancel(context.Background())
			recB := newRecorder(t)
			recB.onAccept = cancelB
			jobB := Job{PromptID: uuid.NewString(), Prompt: json.RawMessage(`{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":255}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"b"}}}`)}
			if err := c.Run(ctxB, jobB, recB); !errors.Is(err, context.Canceled) {
				t.Fatalf("Run B: %v", err)
			}
			localA, localB := srv.Prompts()[0].PromptID, srv.Prompts()[1].PromptID
			waitFor(t, "B to leave the queue", func() bool {
				q := queueOf(t, srv)
				return len(q.Pending) == 0 && len(q.Running) == 1 && strings.Contains(string(q.Running[0][1]), localA)
			})
			cancelA()
			if err := <-errA; !errors.Is(err, context.Canceled) {
				t.Fatalf("Run A: %v", err)
			}
			waitFor(t, "A to be interrupted", func() bool {
				msgs := historyStatus(t, srv, localA)
				return len(msgs) > 0 && msgs[len(msgs)-1] == comfy.MsgExecutionInterrupted
			})
			time.Sleep(20 * time.Millisecond)
			if msgs := historyStatus(t, srv, localB); msgs != nil {
				t.Fatalf("B ran: %v", msgs)
			}
		})
	}
}

// The raw protocol: heartbeats while ComfyUI is silent, then the watchdog
// interrupts the prompt and ends the stream with an error frame.
func TestWatchdogAndHeartbeats(t *testing.T) {
	srv := comfytest.Start(t, comfytest.Options{Version: "2026", StepDelay: time.Millisecond})
	_, ts := startWorker(t, srv.URL(), Options{Idle: 300 * time.Millisecond, Heartbeat: 30 * time.Millisecond})
	srv.FailNext("hang")
	pid := uuid.NewString()
	var body bytes.Buffer
	fw := NewWriter(&body)
	_ = fw.WriteJSON(KindJob, JobSpec{PromptID: pid, Prompt: json.RawMessage(`{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":0}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"w"}}}`)})
	_ = fw.Write(KindStart)
	resp, err := http.Post(ts.URL+"/any/path", ContentType, &body)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != 200 || resp.Header.Get("Content-Type") != ContentType {
		t.Fatalf("%d %s", resp.StatusCode, resp.Header.Get("Content-Type"))
	}
	fr := NewReader(resp.Body)
	var kinds []Kind
	var last []byte
	for {
		k, p, err := fr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		kinds = append(kinds, k)
		last = p
	}
	heartbeats := 0
	for _, k := range kinds {
		if k == KindHeartbeat {
			heartbeats++
		}
	}
	if kinds[0] != KindAccepted || kinds[len(kinds)-1] != KindError || heartbeats < 4 {
		t.Fatalf("kinds %v", kinds)
	}
	if !strings.Contains(string(last), "no event from ComfyUI") {
		t.Fatalf("error frame %s", last)
	}
	waitFor(t, "the prompt to be interrupted", func() bool {
		msgs := historyStatus(t, srv, pid)
		return len(msgs) > 0 && msgs[len(msgs)-1] == comfy.MsgExecutionInterrupted
	})
}

// Two workers in front of two ComfyUIs behind a balancer that round-robins
// every request: each job's upload, prompt, events and outputs stay on the
// one replica its request reached.
func TestRoundRobinBalancerPinsEachJob(t *testing.T) {
	srvs := []*comfytest.Server{
		comfytest.Start(t, comfytest.Options{Version: "2026", StepDelay: time.Millisecond, Name: "a"}),
		comfytest.Start(t, comfytest.Options{Version: "2024-12", StepDelay: time.Millisecond, Name: "b"}),
	}
	var workers []string
	for _, s := range srvs {
		_, ts := startWorker(t, s.URL(), Options{})
		workers = append(workers, ts.URL)
	}
	lb := roundRobin(t, workers...)
	c := &Client{URL: lb.URL}

	const jobs = 6
	type result struct {
		rec *recorder
		err error
		pid string
		in  []byte
	}
	results := make([]result, jobs)
	var wg sync.WaitGroup
	for i := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			in := testPNG(t, color.NRGBA{R: uint8(20 * i), G: 100, B: 7, A: 255})
			rec := newRecorder(t)
			rec.readAll = i%2 == 0
			pid := uuid.NewString()
			job := Job{PromptID: pid, Prompt: invertWorkflow(fmt.Sprintf("in-%d.png", i), fmt.Sprintf("job%d", i)),
				Files: []InputFile{bytesFile(fmt.Sprintf("in-%d.png", i), in)}}
			err := c.Run(context.Background(), job, rec)
			results[i] = result{rec, err, pid, in}
		}()
	}
	wg.Wait()

	perServer := make([]int, len(srvs))
	for i, r := range results {
		if r.err != nil {
			t.Fatalf("job %d: %v", i, r.err)
		}
		home := -1
		for si, s := range srvs {
			for _, p := range s.Prompts() {
				save, _ := p.Prompt["4"].(map[string]any)
				inputs, _ := save["inputs"].(map[string]any)
				if inputs["filename_prefix"] == fmt.Sprintf("job%d", i) {
					if home != -1 {
						t.Fatalf("job %d queued twice", i)
					}
					home = si
				}
			}
		}
		if home < 0 {
			t.Fatalf("job %d never queued", i)
		}
		perServer[home]++
		s := srvs[home]
		uploaded := false
		for _, u := range s.Uploads() {
			if u.Name == fmt.Sprintf("in-%d.png", i) && bytes.Equal(u.Data, r.in) {
				uploaded = true
			}
		}
		if !uploaded {
			t.Fatalf("job %d: the input was not uploaded to the replica that ran it", i)
		}
		if len(r.rec.outputs) != 1 {
			t.Fatalf("job %d outputs %v", i, r.rec.outputs)
		}
		for ref, data := range r.rec.outputs {
			orig, ok := s.OutputFile(ref.Type, ref.Subfolder, ref.Filename)
			if !ok || !bytes.Equal(orig, data) || !strings.HasPrefix(ref.Filename, fmt.Sprintf("job%d_", i)) {
				t.Fatalf("job %d: output %v differs from the replica's", i, ref)
			}
		}
		for _, m := range r.rec.events {
			if cm, _ := m.Common(); cm.PromptID != r.pid {
				t.Fatalf("job %d: event %s", i, m.Encode())
			}
		}
		seq := r.rec.sequence()
		if r.rec.log[0] != "accepted" || seq[len(seq)-1] != comfy.MsgExecuting || indexOf(seq, comfy.MsgExecutionSuccess) < 0 {
			t.Fatalf("job %d: %v", i, r.rec.log)
		}
	}
	if perServer[0] != jobs/2 || perServer[1] != jobs/2 {
		t.Fatalf("jobs per replica %v", perServer)
	}
}

// An output body left unread by the handler is skipped; an output error
// aborts the job and the worker interrupts nothing that still runs.
func TestOutputHandlerError(t *testing.T) {
	srv := comfytest.Start(t, comfytest.Options{Version: "2026", StepDelay: time.Millisecond})
	_, ts := startWorker(t, srv.URL(), Options{ChunkSize: 100})
	in := testPNG(t, color.NRGBA{R: 9, A: 255})
	job := Job{PromptID: uuid.NewString(), Prompt: invertWorkflow("e.png", "e"), Files: []InputFile{bytesFile("e.png", in)}}
	h := &failingOutput{recorder: newRecorder(t), err: errors.New("blob store down")}
	err := (&Client{URL: ts.URL}).Run(context.Background(), job, h)
	if !errors.Is(err, h.err) {
		t.Fatalf("Run: %v", err)
	}
	if indexOf(h.log, "event:executed") >= 0 {
		t.Fatal("executed delivered although its output could not be stored")
	}

	// A handler that reads nothing and returns nil: the stream goes on.
	h2 := &failingOutput{recorder: newRecorder(t)}
	job.PromptID = uuid.NewString()
	if err := (&Client{URL: ts.URL}).Run(context.Background(), job, h2); err != nil {
		t.Fatal(err)
	}
	if indexOf(h2.log, "event:executed") < 0 {
		t.Fatalf("log %v", h2.log)
	}
}

type failingOutput struct {
	*recorder
	err error
}

func (f *failingOutput) Output(ref comfy.FileRef, ct string, body io.Reader) error {
	if sz, ok := body.(interface{ Size() int64 }); !ok || sz.Size() <= 0 {
		return fmt.Errorf("no size")
	}
	return f.err
}

// The client's idle timeout fails a stream that stops mid-job.
func TestClientIdleTimeout(t *testing.T) {
	stall := make(chan struct{})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", ContentType)
		fw := NewWriter(w)
		_ = fw.WriteJSON(KindAccepted, AcceptedInfo{PromptID: "p", Number: 3})
		w.(http.Flusher).Flush()
		<-stall
	}))
	defer ts.Close()
	defer close(stall)
	rec := newRecorder(t)
	start := time.Now()
	err := (&Client{URL: ts.URL, IdleTimeout: 100 * time.Millisecond}).Run(context.Background(), Job{PromptID: "p", Prompt: json.RawMessage(`{}`)}, rec)
	if !errors.Is(err, errIdle) || time.Since(start) > 5*time.Second || rec.number != 3 {
		t.Fatalf("%v after %v", err, time.Since(start))
	}
	var na *NotAcceptedError
	if errors.As(err, &na) {
		t.Fatal("an accepted job is not NotAccepted")
	}
}

// A prompt someone else removes from the local queue fails the job instead
// of leaving it waiting until the watchdog.
func TestPromptDeletedFromLocalQueue(t *testing.T) {
	srv := comfytest.Start(t, comfytest.Options{Version: "2026", StepDelay: time.Millisecond})
	_, ts := startWorker(t, srv.URL(), Options{})
	c := &Client{URL: ts.URL}
	srv.FailNext("hang")
	ctxA, cancelA := context.WithCancel(context.Background())
	defer cancelA()
	started := make(chan struct{})
	var once sync.Once
	recA := newRecorder(t)
	recA.onEvent = func(m comfy.Message) {
		if m.Type == comfy.MsgExecuting {
			once.Do(func() { close(started) })
		}
	}
	empty := `{"1":{"class_type":"EmptyImage","inputs":{"width":8,"height":8,"batch_size":1,"color":%d}},"2":{"class_type":"SaveImage","inputs":{"images":["1",0],"filename_prefix":"d"}}}`
	errA := make(chan error, 1)
	go func() {
		errA <- c.Run(ctxA, Job{PromptID: uuid.NewString(), Prompt: json.RawMessage(fmt.Sprintf(empty, 1))}, recA)
	}()
	<-started

	pidB := uuid.NewString()
	recB := newRecorder(t)
	recB.onAccept = func() {
		resp, err := http.Post(srv.URL()+"/queue", "application/json", strings.NewReader(`{"delete":["`+pidB+`"]}`))
		if err == nil {
			resp.Body.Close()
		}
		cancelA() // A is interrupted; the queue empties
	}
	err := c.Run(context.Background(), Job{PromptID: pidB, Prompt: json.RawMessage(fmt.Sprintf(empty, 2))}, recB)
	var we *WorkerError
	if !errors.As(err, &we) || !strings.Contains(we.Message, "left the local ComfyUI's queue") {
		t.Fatalf("Run B: %v", err)
	}
	<-errA
}

// Real ComfyUI answers with Python's json.dumps layout (", " and ": ") and
// messages such as "<class 'str'>": the body reaches the caller unchanged.
func TestRejectedBodyByteForByte(t *testing.T) {
	const body = `{"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}}, "node_errors": {"4": {"errors": [{"type": "bad_linked_input", "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]", "details": "images, <class 'str'> & more", "extra_info": {}}], "dependent_outputs": ["4"], "class_type": "SaveImage"}}}`
	fake := comfytest.New(comfytest.Options{Version: "2026"})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && r.URL.Path == "/prompt" {
			w.Header().Set("Content-Type", "application/json; charset=utf-8")
			w.WriteHeader(400)
			_, _ = io.WriteString(w, body)
			return
		}
		fake.Handler().ServeHTTP(w, r)
	}))
	defer ts.Close()
	defer fake.Close()
	_, wts := startWorker(t, ts.URL, Options{})
	err := (&Client{URL: wts.URL}).Run(context.Background(), Job{PromptID: uuid.NewString(), Prompt: json.RawMessage(`{"1":{}}`)}, newRecorder(t))
	var re *RejectedError
	if !errors.As(err, &re) || re.Status != 400 || string(re.Body) != body {
		t.Fatalf("%v\n got %s\nwant %s", err, re.Body, body)
	}
}
