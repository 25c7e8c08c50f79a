package bench

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gorilla/websocket"

	"github.com/comfyume/comfyume/comfytest"
	"github.com/comfyume/comfyume/relay"
)

// BenchmarkReplicaFanout measures job events crossing from the replica
// that runs a job to a browser on another replica, through Valkey.
//
// bus/...: the relay.ValkeyBus alone, as two replicas use it: two
// instances (two Valkey clients) on one Valkey and one prefix; one
// publishes browser frames with Publish, the other receives them with
// Run. Frames carry their send time; latency is publish call → receive
// callback, one way, same clock.
//
//   - lockstep/frame=progress: publish one progress frame (146 B, not
//     kept: one PUBLISH), wait for it, repeat. The unloaded path.
//   - lockstep/frame=kept: the same with a lifecycle frame ("executed",
//     kept for replay: XADD + PEXPIRE + PUBLISH, three round trips).
//   - blast/publishers=P: P goroutines publish b.N progress frames as fast
//     as Publish returns (valkey-go pipelines concurrent calls). frames/s
//     is b.N over the time until the last one arrived; the latencies are
//     mostly queueing.
//
// e2e/...: real replicas and a fake GPU (comfytest, Version "2026",
// StepDelay 100µs) whose FakeSampler node emits, per step, a
// progress_state frame, a binary preview and a progress frame. One
// iteration is one job of 300 steps. Paths:
//
//   - path=memory: one comfyume (store memory, its own process); the
//     browser is on it. No bus: the baseline.
//   - path=valkey-local: comfyume B (store valkey, its own process); the
//     browser is on B. Every frame is published before B writes it to
//     its own socket.
//   - path=valkey-remote: the job runs on B, the browser is on replica A
//     (same config, in this process). A second browser with the same
//     session stays on B, so that remote-minus-local-µs is the delay the
//     hop to another replica adds to each progress frame.
//
// e2e reports the frames/s the browser receives while the job streams
// (all frames, text and binary), the job's time from the POST answer to
// execution_success at the browser, and the progress frames lost.
func BenchmarkReplicaFanout(b *testing.B) {
	env := needShared(b)
	b.Run("bus", func(b *testing.B) { benchBus(b, env) })
	b.Run("e2e", func(b *testing.B) { benchFanoutE2E(b, env) })
}

// busFrameText is a browser frame stamped with the current time in "ts":
// a progress frame like the home benchmark's, or (kept) an "executed"
// frame, which the bus keeps for replay.
func busFrameText(kept bool, v int) string {
	now := strconv.FormatInt(time.Now().UnixNano(), 10)
	if kept {
		return `{"type": "executed", "data": {"node": "9", "display_node": "9", "output": {"images": [{"filename": "bench_00001_.png", "subfolder": "", "type": "output"}]}, "prompt_id": "5c8a3e1b-6d2f-4f7a-9b1e-2d4c6f8a0b3e", "ts": ` + now + `}}`
	}
	return progressHead + strconv.Itoa(v%20+1) + progressMax + "20" + progressTail + now + "}}"
}

// frameStamp reads the "ts" of a busFrameText frame.
func frameStamp(text string) (int64, bool) {
	i := strings.LastIndex(text, `"ts": `)
	if i < 0 {
		return 0, false
	}
	var ts int64
	for _, c := range text[i+len(`"ts": `):] {
		if c < '0' || c > '9' {
			break
		}
		ts = ts*10 + int64(c-'0')
	}
	return ts, true
}

// busSink collects what the subscribed bus instance receives.
type busSink struct {
	mu     sync.Mutex
	lat    []int64
	want   int
	done   chan struct{}
	closed bool
}

func (s *busSink) on(m relay.BusMessage) {
	now := time.Now().UnixNano()
	ts, ok := frameStamp(m.Text)
	if !ok {
		return
	}
	s.mu.Lock()
	s.lat = append(s.lat, now-ts)
	if len(s.lat) >= s.want && !s.closed {
		s.closed = true
		close(s.done)
	}
	s.mu.Unlock()
}

func (s *busSink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.lat)
}

func benchBus(b *testing.B, env sharedServers) {
	prefix := env.newPrefix(b)
	pc, sc := env.valkeyClient(b), env.valkeyClient(b)
	defer pc.Close()
	defer sc.Close()
	pub := relay.NewValkeyBus(pc, prefix)
	sub := relay.NewValkeyBus(sc, prefix)
	var sink atomic.Pointer[busSink]
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	subscribed := make(chan struct{}, 4)
	go sub.Run(ctx, func(m relay.BusMessage) {
		if s := sink.Load(); s != nil {
			s.on(m)
		}
	}, func() { subscribed <- struct{}{} })
	select {
	case <-subscribed:
	case <-time.After(10 * time.Second):
		b.Fatal("the bus did not subscribe")
	}
	newSink := func(want int) *busSink {
		s := &busSink{want: want, done: make(chan struct{}), lat: make([]int64, 0, want)}
		sink.Store(s)
		return s
	}
	msg := func(kept bool, v int) *relay.BusMessage {
		return &relay.BusMessage{Kind: "frame", User: "alice", SID: "tab-1", Text: busFrameText(kept, v), Keep: kept, Origin: "replica-b"}
	}

	for _, kept := range []bool{false, true} {
		name := "lockstep/frame=progress"
		if kept {
			name = "lockstep/frame=kept"
		}
		b.Run(name, func(b *testing.B) {
			lat := make([]int64, 0, b.N)
			cpu0 := cpuTime()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				s := newSink(1)
				if err := pub.Publish(ctx, msg(kept, i)); err != nil {
					b.Fatal(err)
				}
				select {
				case <-s.done:
				case <-time.After(10 * time.Second):
					b.Fatalf("frame %d not received", i)
				}
				s.mu.Lock()
				lat = append(lat, s.lat[0])
				s.mu.Unlock()
			}
			b.StopTimer()
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
			reportLatency(b, lat)
		})
	}
	for _, publishers := range []int{1, 16} {
		b.Run(fmt.Sprintf("blast/publishers=%d", publishers), func(b *testing.B) {
			s := newSink(b.N)
			var (
				wg       sync.WaitGroup
				firstErr atomic.Value
			)
			cpu0 := cpuTime()
			b.ResetTimer()
			start := time.Now()
			for p := 0; p < publishers; p++ {
				n := b.N / publishers
				if p < b.N%publishers {
					n++
				}
				wg.Add(1)
				go func() {
					defer wg.Done()
					for v := 0; v < n; v++ {
						if err := pub.Publish(ctx, msg(false, v)); err != nil {
							firstErr.CompareAndSwap(nil, err)
							return
						}
					}
				}()
			}
			wg.Wait()
			if err, _ := firstErr.Load().(error); err != nil {
				b.Fatal(err)
			}
			select {
			case <-s.done:
			case <-time.After(30 * time.Second):
				b.Fatalf("%d of %d frames received (the subscriber fell behind and was dropped?)", s.count(), b.N)
			}
			elapsed := time.Since(start)
			b.StopTimer()
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "frames/s")
			b.ReportMetric(float64(cpuTime()-cpu0)/float64(b.N), "cpu-ns/op")
			s.mu.Lock()
			reportLatency(b, s.lat)
			s.mu.Unlock()
		})
	}
	sink.Store(nil)
}

// ---- end to end ----

const (
	fanoutSteps      = 300
	fanoutStepDelay  = 100 * time.Microsecond
	fanoutJobTimeout = 2 * time.Minute
)

func benchFanoutE2E(b *testing.B, env sharedServers) {
	bin := buildComfyume(b)
	home := comfytest.New(comfytest.Options{Version: "2026", Name: "home"})
	gpu := comfytest.New(comfytest.Options{Version: "2026", Name: "gpu", StepDelay: fanoutStepDelay})
	for _, s := range []*comfytest.Server{home, gpu} {
		if err := s.Listen("127.0.0.1:0"); err != nil {
			b.Fatal(err)
		}
		defer s.Close()
	}
	prefix := env.newPrefix(b)
	caddyfile := func(store, port string) string {
		return `{` + sharedGlobals + `
	comfyume {
		pool gpu {
			upstream ` + gpu.URL() + ` {
				max_jobs 1
			}
		}
		` + store + `
		outputs disk {DATA}/outputs
	}
}

:` + port + ` {
	bind 127.0.0.1
	comfyume {
		home ` + home.URL() + `
		run_on gpu
	}
	reverse_proxy ` + strings.TrimPrefix(home.URL(), "http://") + `
}
`
	}
	mem := startProc(b, bin, caddyfile("store memory", "{PORT}"))
	replB := startProc(b, bin, caddyfile(env.storeValkey(prefix), "{PORT}"))
	ports := startCaddy(b, caddyfile(env.storeValkey(prefix), "{PORT:a}"))
	replA := fmt.Sprintf("http://127.0.0.1:%d", ports["a"])
	// A different colour every time: the GPU caches the results of a
	// prompt it has run.
	prompt := func(sid string, color int64) []byte {
		return []byte(`{"client_id": "` + sid + `", "prompt": {` +
			`"1": {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1, "color": ` + strconv.FormatInt(color, 10) + `}}, ` +
			`"2": {"class_type": "FakeSampler", "inputs": {"image": ["1", 0], "steps": ` + strconv.Itoa(fanoutSteps) + `}}, ` +
			`"3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}}}}`)
	}
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	defer client.CloseIdleConnections()
	var sids atomic.Int64

	type path struct {
		name     string
		submitTo string // the replica that runs the job
		browser  string // where the measured browser is
		local    string // a second browser of the same session ("" = none)
	}
	paths := []path{
		{"memory", mem.base, mem.base, ""},
		{"valkey-local", replB.base, replB.base, ""},
		{"valkey-remote", replB.base, replA, replB.base},
	}
	for _, p := range paths {
		b.Run("path="+p.name, func(b *testing.B) {
			var (
				frames    int
				streaming time.Duration
				jobTime   []int64
				lost      int
				delta     []int64
			)
			var idHolder atomic.Pointer[string]
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				idHolder.Store(nil)
				seq := sids.Add(1)
				sid := fmt.Sprintf("fan%d", seq)
				br := openStreamBrowser(b, p.browser, sid)
				// The second browser of the session reads at the same time,
				// on its own goroutine.
				var (
					loc     *streamBrowser
					locDone chan streamResult
					locErr  error
				)
				if p.local != "" {
					loc = openStreamBrowser(b, p.local, sid)
					b.Cleanup(loc.close)
					locDone = make(chan streamResult, 1)
					go func() {
						r, err := loc.until(&idHolder, fanoutJobTimeout)
						locErr = err
						locDone <- r
					}()
				}
				b.StartTimer()
				id, err := postPrompt(client, p.submitTo, "", prompt(sid, seq))
				posted := time.Now()
				if err != nil {
					b.Fatal(err)
				}
				idHolder.Store(&id)
				r, err := br.until(&idHolder, fanoutJobTimeout)
				b.StopTimer()
				if err != nil {
					b.Fatal(err)
				}
				jobTime = append(jobTime, r.end.Sub(posted).Nanoseconds())
				if len(r.progress) > 1 {
					frames += r.frames
					streaming += r.last.Sub(r.first)
				}
				lost += fanoutSteps - len(r.progress)
				if locDone != nil {
					lr := <-locDone
					loc.close()
					if locErr != nil {
						b.Fatal(locErr)
					}
					for v, t := range r.progress {
						if lt, ok := lr.progress[v]; ok {
							delta = append(delta, t.Sub(lt).Nanoseconds())
						}
					}
				}
				br.close()
				b.StartTimer()
			}
			b.StopTimer()
			if streaming > 0 {
				b.ReportMetric(float64(frames)/streaming.Seconds(), "frames/s")
			}
			b.ReportMetric(float64(lost)/float64(b.N), "lost-progress/op")
			slices.Sort(jobTime)
			b.ReportMetric(quantileMs(jobTime, 0.5), "job-p50-ms")
			if len(delta) > 0 {
				slices.Sort(delta)
				q := func(p float64) float64 { return float64(delta[int(p*float64(len(delta)-1))]) / 1e3 }
				b.ReportMetric(q(0.5), "remote-minus-local-p50-µs")
				b.ReportMetric(q(0.99), "remote-minus-local-p99-µs")
				stalled := len(delta) - sort.Search(len(delta), func(i int) bool { return delta[i] > int64(time.Second) })
				b.ReportMetric(float64(stalled), "frames-late-by-1s+")
			}
		})
	}
}

// streamBrowser is a browser socket that records when each frame of a
// job arrives.
type streamBrowser struct {
	conn *websocket.Conn
}

type streamResult struct {
	// frames counts every frame (text or binary) from the job's first
	// progress frame to its last, which arrived at first and last.
	frames      int
	first, last time.Time
	end         time.Time         // arrival of execution_success
	progress    map[int]time.Time // arrival of each progress frame, by value
}

func openStreamBrowser(tb testing.TB, base, sid string) *streamBrowser {
	tb.Helper()
	c, _, err := websocket.DefaultDialer.Dial("ws"+strings.TrimPrefix(base, "http")+"/ws?clientId="+sid, http.Header{})
	if err != nil {
		tb.Fatal(err)
	}
	// The greeting: the gateway has attached the session.
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, _, err := c.ReadMessage(); err != nil {
		tb.Fatal(err)
	}
	return &streamBrowser{conn: c}
}

func (s *streamBrowser) close() { s.conn.Close() }

var progressType = []byte(`"progress"`)

// until reads frames until the execution_success of the job whose id
// *id holds (set once the POST is answered; frames may come before).
func (s *streamBrowser) until(id *atomic.Pointer[string], timeout time.Duration) (streamResult, error) {
	r := streamResult{progress: make(map[int]time.Time, fanoutSteps)}
	_ = s.conn.SetReadDeadline(time.Now().Add(timeout))
	n, firstN, lastN := 0, -1, -1
	for {
		typ, m, err := s.conn.ReadMessage()
		now := time.Now()
		if err != nil {
			return r, fmt.Errorf("browser socket: %v (after %d frames)", err, n)
		}
		n++
		if typ != websocket.TextMessage {
			continue
		}
		// progress_state, previews and the like are only counted. The
		// session is new, so every progress frame is of the job.
		if bytes.Contains(m[:min(len(m), 24)], progressType) {
			var v struct {
				Data struct {
					Value int `json:"value"`
				} `json:"data"`
			}
			if json.Unmarshal(m, &v) == nil {
				r.progress[v.Data.Value] = now
				if firstN < 0 {
					firstN, r.first = n, now
				}
				lastN, r.last = n, now
			}
			continue
		}
		if t, pid := frameHead(m); isJobEnd(t) {
			if want := id.Load(); want == nil || *want != pid {
				continue
			}
			r.end = now
			if t != "execution_success" {
				return r, fmt.Errorf("job %s: %s", pid, m)
			}
			if firstN >= 0 {
				r.frames = lastN - firstN + 1
			}
			return r, nil
		}
	}
}

// frameHead returns a ComfyUI text frame's type and prompt_id.
func frameHead(m []byte) (typ, promptID string) {
	var h struct {
		Type string `json:"type"`
		Data struct {
			PromptID string `json:"prompt_id"`
		} `json:"data"`
	}
	_ = json.Unmarshal(m, &h)
	return h.Type, h.Data.PromptID
}
